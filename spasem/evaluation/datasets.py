"""Datasets for an evaluation: manifests -> cases, and every check done before any compute.

:func:`check_datasets` reads every image header and every label map once and collects *all*
problems (missing/unreadable files, label maps not on their image's grid, organs missing from a
label map or from every support, too few supports for the requested shots) into one
:class:`DatasetError`. The label ids present in each label file are remembered in an inventory
(``DIR/inventory.json``, keyed by path, size and modification time) so reruns skip the reading.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from spasem.core.cache import grid_from_dict, grid_to_dict
from spasem.core.io import load, read_grid
from spasem.core.progress import Progress
from spasem.core.volume import Grid
from spasem.data.labelmaps import label_map_choices
from spasem.data.manifest import Manifest
from spasem.errors import InputError, SpasemError
from spasem.evaluation.files import write_json
from spasem.evaluation.protocol import CaseRef, pool_shortfalls


class DatasetError(InputError):
    """One report of every problem found in the datasets (raised before any compute)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem(s) in the datasets; nothing was computed:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass
class LabelInfo:
    """What the checks learnt about one label file."""

    grid: Grid
    ids: set[int]


def case_refs(manifest: Manifest, organs: Sequence[str], source: str) -> tuple[list[CaseRef], list[str]]:
    """The manifest's cases as :class:`CaseRef` (absolute paths) and the problems found without
    opening any file (organs missing from the label names, cases without a label)."""
    problems = []
    missing = [o for o in organs if o not in manifest.label_names]
    if missing:
        known = ", ".join(f"{k} {v}" for k, v in manifest.label_names.items()) or "none"
        problems.append(
            f"{source}: organ(s) {', '.join(missing)} not in its label names ({known}); give a label map "
            f"({label_map_choices()}) with the label-map option"
        )
    dataset = manifest.dataset or str(manifest.root or "")
    ids = tuple((o, int(manifest.label_names[o])) for o in organs if o in manifest.label_names)
    refs = []
    for case in manifest.cases:
        if not case.label:
            problems.append(f"{source}: case {case.id} has no label map (every case needs its ground truth)")
            continue
        refs.append(CaseRef(id=case.id, image=str(manifest.image_path(case).resolve()),
                            label=str(manifest.label_path(case).resolve()),  # type: ignore[union-attr]
                            modality=case.modality, subject=case.subject, dataset=dataset, label_ids=ids))
    return refs, problems


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _read_inventory(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _inspect_label(path: str, known: dict) -> tuple[LabelInfo | None, str | None, dict | None]:
    """(info, problem, inventory entry) for one label file."""
    p = Path(path)
    if not p.exists():
        return None, f"label '{path}': no such file", None
    try:
        stamp = _file_stamp(p)
    except OSError as exc:
        return None, f"label '{path}': {exc}", None
    entry = known.get(path)
    if entry and entry.get("stamp") == stamp:
        return LabelInfo(grid_from_dict(entry["grid"]), set(entry["ids"])), None, entry
    try:
        volume = load(p, is_label=True)
    except SpasemError as exc:
        return None, f"label {exc.message}", None
    ids = {int(v) for v in np.unique(volume.array) if v != 0}
    entry = {"stamp": stamp, "grid": grid_to_dict(volume.grid), "ids": sorted(ids)}
    return LabelInfo(volume.grid, ids), None, entry


def _inspect_image(path: str) -> tuple[Grid | None, str | None]:
    try:
        return read_grid(path), None
    except SpasemError as exc:
        return None, f"image {exc.message}"


def check_datasets(
    supports: Sequence[CaseRef],
    queries: Sequence[CaseRef],
    organs: Sequence[str],
    shots: Sequence[int],
    *,
    problems: Sequence[str] = (),
    inventory: Path | None = None,
    workers: int = 1,
    progress: Progress | None = None,
) -> dict[str, set[int]]:
    """Check every file of both case lists; returns label path -> label ids present.

    :param shots: the numbers of supports; every query needs ``max(shots)`` eligible supports
        (empty: not checked).
    :param problems: problems already found (e.g. by :func:`case_refs`), reported together.
    :param inventory: JSON file remembering the label ids of label files already read.
    :raises DatasetError: listing every problem found.
    """
    progress = progress or Progress(enabled=False)
    found = list(problems)
    if not supports:
        found.append("the support set is empty (check --supports and --support-modality)")
    if not queries:
        found.append("the query set is empty (check --queries and --query-modality)")
    cases: dict[str, CaseRef] = {}
    for case in [*supports, *queries]:
        cases.setdefault(case.image, case)
    label_paths = sorted({c.label for c in [*supports, *queries]})
    known = _read_inventory(inventory)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        image_results = dict(zip(cases, pool.map(_inspect_image, cases)))
        label_results = dict(zip(label_paths, progress.iterate(
            pool.map(lambda p: _inspect_label(p, known), label_paths), "checking label maps", total=len(label_paths))))
    for problem in [r[1] for r in image_results.values()] + [r[1] for r in label_results.values()]:
        if problem:
            found.append(problem)
    present: dict[str, set[int]] = {}
    new_inventory = dict(known)
    for path, (info, _, entry) in label_results.items():
        if info is not None:
            present[path] = info.ids
            new_inventory[path] = entry
    seen_pairs = set()
    for case in [*supports, *queries]:
        if (case.image, case.label) in seen_pairs:
            continue
        seen_pairs.add((case.image, case.label))
        image_grid = image_results[case.image][0]
        info = label_results[case.label][0]
        if image_grid is None or info is None:
            continue
        if not (info.grid.same_as(image_grid) or info.grid.axis_mapping_to(image_grid) is not None):
            found.append(
                f"case {case.id}: label '{case.label}' is not on its image's voxel grid: label {info.grid.describe()}; "
                f"image {image_grid.describe()}"
            )
    for role, group in (("support", supports), ("query", queries)):
        readable = [c for c in group if c.label in present]
        if not readable:
            continue
        for organ, label_id in readable[0].label_ids:
            if organ not in organs:
                continue
            if not any(label_id in present[c.label] for c in readable):
                found.append(f"organ {organ}: no {role} label map contains its label id {label_id} "
                             f"(ids present: {_ids_summary(readable, present)}); is the label map right?")
    if not found and shots:
        found.extend(pool_shortfalls(supports, queries, organs, shots, present))
    if inventory is not None and new_inventory != known:
        write_json(inventory, new_inventory)
    if found:
        raise DatasetError(found)
    return present


def _ids_summary(cases: Sequence[CaseRef], present: dict[str, set[int]]) -> str:
    ids = sorted(set().union(*(present[c.label] for c in cases)))
    return ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "") if ids else "none"
