"""Dataset manifests: which cases exist, where their image and label files are, their modality,
and which label id is which organ.

JSON layout (what ``spasem phantoms`` writes; paths relative to the manifest's folder)::

    {
      "dataset": "phantoms",
      "label_names": {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4},
      "cases": [
        {"id": "s000_ct", "image": "s000_ct.nii.gz", "label": "s000_ct_label.nii.gz",
         "modality": "CT", "subject": "s000"}
      ]
    }

CSV layout: a header with ``id,image,label,modality`` (``subject`` optional); label names then
come from elsewhere (a built-in label map or a JSON file, see :mod:`spasem.data.labelmaps`).

Organ names in ``label_names`` are made canonical (``liver``, ``spleen``, ``left_kidney``,
``right_kidney``) when read. :func:`build_manifest` lists a folder of ``imagesTr/labelsTr``
files (nnU-Net / Medical Segmentation Decathlon layout).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spasem.core.backends import format_validation_error
from spasem.data.labelmaps import normalise_label_names
from spasem.errors import InputError


class Case(BaseModel):
    """One scan of a dataset."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="unique case id")
    image: str = Field(description="image file or DICOM folder (relative to the manifest's folder, or absolute)")
    label: str | None = Field(None, description="label map file on the image's grid")
    modality: str | None = Field(None, description="'CT' or 'MR'")
    subject: str | None = Field(None, description="patient / subject id (cases of one subject are never paired)")

    @field_validator("modality")
    @classmethod
    def _modality(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        v = value.strip().upper()
        return {"MRI": "MR"}.get(v, v)


class Manifest(BaseModel):
    """A list of cases plus the dataset's label names (organ name -> label id)."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = Field("", description="dataset name")
    label_names: dict[str, int] = Field(default_factory=dict, description="organ name -> label id")
    cases: list[Case] = Field(default_factory=list)
    root: Path | None = Field(None, exclude=True, description="folder relative paths are resolved against")

    @field_validator("label_names")
    @classmethod
    def _canonical_names(cls, names: dict[str, int]) -> dict[str, int]:
        for name, value in names.items():
            if value < 1:
                raise ValueError(f"label id of '{name}' must be >= 1, got {value}")
        try:
            return normalise_label_names(names, "label_names")
        except InputError as exc:
            raise ValueError(exc.message) from None

    @field_validator("cases")
    @classmethod
    def _unique_ids(cls, cases: list[Case]) -> list[Case]:
        seen: set[str] = set()
        for case in cases:
            if case.id in seen:
                raise ValueError(f"case id '{case.id}' appears twice")
            seen.add(case.id)
        return cases

    def resolve(self, relative: str) -> Path:
        """Absolute path of a file named in the manifest."""
        path = Path(relative)
        return path if path.is_absolute() or self.root is None else self.root / path

    def image_path(self, case: Case) -> Path:
        return self.resolve(case.image)

    def label_path(self, case: Case) -> Path | None:
        return self.resolve(case.label) if case.label else None

    def filter(self, modality: str | None = None) -> "Manifest":
        """The cases of one modality (all if None)."""
        if modality is None:
            return self
        wanted = Case._modality(modality)  # type: ignore[operator]
        return self.model_copy(update={"cases": [c for c in self.cases if c.modality == wanted]})


def read_manifest(path: str | os.PathLike, label_names: dict[str, int] | None = None) -> Manifest:
    """Read a JSON or CSV manifest; relative paths are resolved against its folder.

    :param label_names: organ name -> label id; replaces the manifest's own (CSV manifests have none).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest '{path}': no such file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            missing = {"id", "image"} - set(rows[0].keys() if rows else [])
            if missing:
                raise InputError(f"manifest '{path}': CSV lacks column(s) {', '.join(sorted(missing))}; "
                                 "expected id,image,label,modality[,subject]")
            data = {"cases": [{k: (v or None) for k, v in row.items() if k} for row in rows]}
        else:
            raise InputError(f"manifest '{path}': unsupported type '{path.suffix}'; expected .json or .csv")
    except json.JSONDecodeError as exc:
        raise InputError(f"manifest '{path}': invalid JSON: {exc}") from None
    if label_names is not None and isinstance(data, dict):
        data = {**data, "label_names": dict(label_names)}
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"manifest '{path}': " + format_validation_error(exc)) from None
    manifest.root = path.parent.resolve()
    return manifest


def _relative_to(target_dir: Path, path: Path) -> str:
    try:
        return Path(os.path.relpath(path, target_dir)).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path)


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write a JSON manifest atomically. File paths are written relative to the manifest's
    folder (re-based when ``manifest.root`` is another folder)."""
    path = Path(path)
    data = manifest.model_dump(mode="json")
    if manifest.root is not None:
        target_dir = path.parent.resolve()
        for case, out in zip(manifest.cases, data["cases"]):
            out["image"] = _relative_to(target_dir, manifest.image_path(case).resolve())
            if case.label:
                out["label"] = _relative_to(target_dir, manifest.resolve(case.label).resolve())
    text = json.dumps(data, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a manifest is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: channel suffix of nnU-Net image files (``case_0000.nii.gz``)
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _stem(path: Path) -> str | None:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _listing(folder: Path) -> dict[str, Path]:
    out = {}
    for item in sorted(folder.iterdir()):
        stem = _stem(item)
        if stem is not None and item.is_file() and not item.name.startswith("."):
            out[stem] = item
    return out


def _first(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` of ``names``, comma-separated, with ' ...' when there are more."""
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def build_manifest(
    folder: str | os.PathLike,
    *,
    modality: str | None,
    label_names: dict[str, int] | None = None,
    dataset: str = "",
    images: str = "imagesTr",
    labels: str = "labelsTr",
    subject_pattern: str | None = None,
    modality_patterns: Sequence[tuple[str, str]] = (),
) -> Manifest:
    """A manifest of the image/label pairs of a dataset folder.

    Images in ``folder/images`` are paired with labels in ``folder/labels`` by file name
    (``amos_0001.nii.gz`` <-> ``amos_0001.nii.gz``), else after removing an nnU-Net channel suffix
    (``case_0000.nii.gz`` <-> ``case.nii.gz``); failing that, by the last group of digits in the
    name (``img0001.nii.gz`` <-> ``label0001.nii.gz``).

    :param subject_pattern: regular expression whose first group (or whole match) in the case id
        is the subject id (e.g. ``'^(s\\d+)'``); None: no subject ids.
    :param modality_patterns: ``(modality, regular expression)`` pairs for a folder that mixes
        modalities (AMOS numbers its MR scans from 500: ``("MR", r"^amos_0[56]\\d\\d$")``): a
        case whose id the expression matches (``re.search``) gets that modality (CT or MR), the
        first matching pair wins; the others get ``modality``.
    :raises InputError: missing folders, images without labels or labels without images,
        a pattern that does not match, a modality pattern whose modality is not CT or MR, whose
        expression is not valid or matches no case.
    """
    root = Path(folder)
    image_dir, label_dir = root / images, root / labels
    for what, sub in (("images", image_dir), ("labels", label_dir)):
        if not sub.is_dir():
            raise InputError(f"dataset folder '{root}': no {what} folder '{sub.name}' (expected {images}/ and {labels}/)")
    image_files = _listing(image_dir)
    label_files = _listing(label_dir)
    if not image_files:
        raise InputError(f"dataset folder '{root}': '{images}/' holds no image file ({', '.join(_IMAGE_SUFFIXES)})")
    by_stem = dict(label_files)
    by_digits: dict[str, list[str]] = {}
    for stem in label_files:
        digits = re.findall(r"\d+", stem)
        if digits:
            by_digits.setdefault(digits[-1], []).append(stem)
    pattern = re.compile(subject_pattern) if subject_pattern else None
    modality_rules = []
    for rule_modality, expression in modality_patterns:
        if Case._modality(rule_modality) not in ("CT", "MR"):  # type: ignore[operator]
            raise InputError(f"--modality-pattern '{rule_modality}={expression}': modality '{rule_modality}' is not CT or MR")
        try:
            modality_rules.append((rule_modality, re.compile(expression)))
        except re.error as exc:
            raise InputError(f"--modality-pattern '{rule_modality}={expression}': not a regular expression ({exc})") from None
    cases: list[Case] = []
    used: set[str] = set()
    unpaired: list[str] = []
    for stem, image in image_files.items():
        # an image and its label of the same name pair first (AMOS: amos_0001.nii.gz in both, whose
        # "_0001" is the case number, not an nnU-Net channel suffix)
        case_id = stem if stem in by_stem else _CHANNEL_SUFFIX.sub("", stem)
        label_stem = case_id if case_id in by_stem else None
        if label_stem is None:
            digits = re.findall(r"\d+", case_id)
            candidates = by_digits.get(digits[-1], []) if digits else []
            label_stem = candidates[0] if len(candidates) == 1 else None
        if label_stem is None or label_stem in used:
            unpaired.append(image.name)
            continue
        used.add(label_stem)
        subject = None
        if pattern is not None:
            match = pattern.search(case_id)
            if match is None:
                raise InputError(f"--subject-pattern '{subject_pattern}': does not match case id '{case_id}'")
            subject = match.group(1) if match.groups() else match.group(0)
        case_modality = next((m for m, expression in modality_rules if expression.search(case_id)), modality)
        cases.append(Case(id=case_id, image=f"{images}/{image.name}", label=f"{labels}/{label_files[label_stem].name}",
                          modality=case_modality, subject=subject))
    orphans = sorted(label_files[s].name for s in label_files if s not in used)
    if unpaired or orphans:
        parts = []
        if unpaired:
            parts.append(f"image(s) without a label in {labels}/: {_first(unpaired, 10)}")
        if orphans:
            parts.append(f"label(s) without an image in {images}/: {_first(orphans, 10)}")
        raise InputError(f"dataset folder '{root}': " + "; ".join(parts))
    for rule_modality, expression in modality_rules:
        if not any(expression.search(case.id) for case in cases):
            raise InputError(f"--modality-pattern '{rule_modality}={expression.pattern}': matches no case id of "
                             f"'{root}' (ids: {_first([case.id for case in cases], 3)})")
    manifest = Manifest(dataset=dataset, label_names=label_names or {}, cases=cases)
    manifest.root = root.resolve()
    return manifest
