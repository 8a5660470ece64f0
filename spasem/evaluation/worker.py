"""Running units of the protocol (in this process, a worker process or a Dask worker).

A unit is (method, query, organ, shots, draw): the volumes are loaded, the registration and
features computed once (:meth:`Engine.priors`, cached on disk by content hash), then every fusion
strategy is fused, decoded (:meth:`Engine.decode`) and scored. A failure is caught and returned
in the record (``error``), never raised, so one bad case does not stop the others.

A task is the units of one draw for several organs (:meth:`Plan.groups`): they run one after the
other with the registration of each (support, query) pair computed once for all of them
(:class:`PairMemo`); the on-disk cache keeps warped masks per organ.

Record layout (also the JSON file of a finished unit)::

    {"key", "method", "query", "organ", "shots", "draw", "direction", "supports": [ids],
     "error": null | "message", "seconds_load", "seconds_priors",
     "registrations": {"computed": n, "reused": n} (pair registrations run / taken from the memo),
     "fusions": {name: {"dice", "dice_2d", "hd95", "seconds", "timings": {stage: s},
                        "error", "prediction"}}}
"""

from __future__ import annotations

import math
import os
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spasem.core.volume import Volume
from spasem.errors import SpasemError
from spasem.evaluation.protocol import Unit, _safe

#: loaded volumes kept per process (a worker often sees the same query/supports again)
VOLUME_CACHE_SIZE = 12


@dataclass(frozen=True)
class UnitTask:
    """What a worker needs to run the units of one draw (one or more organs).

    :param cache_dir: folder of the on-disk stage cache (None: no cache).
    :param predictions_dir: folder to save predicted masks in (None: not saved).
    :param torch_threads: torch intra-op threads in a worker process (None: leave as is).
    :param parent_pid: the process that planned the run; its torch settings are never changed.
    """

    units: tuple[Unit, ...]
    cache_dir: str | None = None
    predictions_dir: str | None = None
    torch_threads: int | None = None
    parent_pid: int = 0


class PairMemo:
    """A registration backend that registers each (support image, query image) pair once and
    hands the same transform to every later request (e.g. the other organs of a draw).

    Pairs are recognised by object identity; the memo holds the images, so identities stay valid
    for its lifetime (one task)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.name = inner.name
        self.config = inner.config
        self.context = inner.context
        #: the engine passes ``support_mask=`` to backends that refine around the structure
        self.uses_support_mask = bool(getattr(inner, "uses_support_mask", False))
        self._transforms: dict[tuple[int, ...], tuple[Any, ...]] = {}
        #: registrations computed and reused so far
        self.computed = 0
        self.reused = 0

    def register(self, support: Volume, query: Volume, support_mask: Volume | None = None) -> Any:
        """The inner backend's transform; a mask-refining backend also gets ``support_mask``
        (and the mask is part of the pair's identity)."""
        objects = (support, query, support_mask) if self.uses_support_mask and support_mask is not None else (support, query)
        key = tuple(id(o) for o in objects)
        hit = self._transforms.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[:-1], objects)):
            if len(objects) == 3:
                transform = self.inner.register(support, query, support_mask=support_mask)
            else:
                transform = self.inner.register(support, query)
            hit = (*objects, transform)
            self._transforms[key] = hit
            self.computed += 1
        else:
            self.reused += 1
        return hit[-1]
_lock = threading.Lock()
_volumes: "OrderedDict[tuple[str, bool], Volume]" = OrderedDict()
_backends: dict[tuple[str, int], Any] = {}
_threads_set = False


def configure_process(torch_threads: int | None) -> None:
    """Once per worker process: torch thread count (several workers share the cores)."""
    global _threads_set
    if torch_threads is None or _threads_set:
        return
    import torch

    with _lock:
        if not _threads_set:
            torch.set_num_threads(max(1, int(torch_threads)))
            _threads_set = True


def _load(path: str, *, is_label: bool, modality: str | None = None) -> Volume:
    from spasem.core.io import load

    key = (path, is_label)
    with _lock:
        hit = _volumes.get(key)
        if hit is not None:
            _volumes.move_to_end(key)
            return hit
    volume = load(path, is_label=is_label, modality=modality)
    with _lock:
        _volumes[key] = volume
        while len(_volumes) > VOLUME_CACHE_SIZE:
            _volumes.popitem(last=False)
    return volume


def organ_mask(label: Volume, image: Volume, label_id: int, role: str) -> Volume:
    """The 0/1 mask of ``label_id`` on ``image``'s grid (label maps stored with flipped or
    permuted axes are moved exactly)."""
    from spasem.core.validation import align_mask

    aligned = align_mask(label, image)
    return Volume((aligned.array == label_id).astype(np.uint8), image.grid, is_label=True,
                  name=f"{role} (label {label_id})", modality=image.modality)


def _backends_for(config) -> Any:
    """Backends of ``config``, built once per (configuration, thread)."""
    from spasem.core.cache import make_key
    from spasem.core.pipeline import create_backends, make_context

    key = (make_key("backends", config.model_dump(mode="json")), threading.get_ident())
    with _lock:
        hit = _backends.get(key)
    if hit is None:
        hit = create_backends(config, make_context(config))
        with _lock:
            _backends[key] = hit
    return hit


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, SpasemError):
        return f"{type(exc).__name__}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def base_record(unit: Unit) -> dict[str, Any]:
    return {
        "key": unit.key,
        "method": unit.method.name,
        "query": unit.query.id,
        "query_modality": unit.query.modality,
        "subject": unit.query.subject,
        "organ": unit.organ,
        "shots": unit.shots,
        "draw": unit.draw,
        "direction": unit.direction,
        "supports": [s.id for s in unit.supports],
        "error": None,
        "fusions": {},
    }


def run_task(task: UnitTask) -> list[dict[str, Any]]:
    """Run the units of a task; one record per unit (errors included, never raised except
    interrupts)."""
    from spasem.core.config import PipelineConfig
    from spasem.core.pipeline import Backends

    if task.torch_threads is not None and os.getpid() != task.parent_pid:
        configure_process(task.torch_threads)
    records = []
    memos: dict[str, Any] = {}
    for unit in task.units:
        try:
            config = PipelineConfig.model_validate(unit.method.config)
            backends = _backends_for(config)
            memo = memos.setdefault(unit.method.digest, PairMemo(backends.registration))
            shared = Backends(memo, backends.encoder, backends.fusion, backends.decoder)  # type: ignore[arg-type]
        except Exception as exc:
            record = base_record(unit)
            record["error"] = _error_text(exc)
            record["fusions"] = {name: {"error": record["error"]} for name in unit.method.fusion_names}
            records.append(record)
            continue
        before = (memo.computed, memo.reused)
        record = run_unit(unit, config, shared, task)
        record["registrations"] = {"computed": memo.computed - before[0], "reused": memo.reused - before[1]}
        records.append(record)
    return records


def run_unit(unit: Unit, config, backends, task: UnitTask) -> dict[str, Any]:
    """Run one unit with ``backends``; returns its record."""
    from spasem.core.cache import DiskCache
    from spasem.core.metrics import dice, dice_2d, hd95
    from spasem.core.pipeline import Engine, Support
    from spasem.core.registry import get_registry

    record = base_record(unit)
    record["host"] = f"{os.uname().nodename}:{os.getpid()}"
    organ = unit.organ
    try:
        t0 = time.perf_counter()
        query_image = _load(unit.query.image, is_label=False, modality=unit.query.modality)
        truth = organ_mask(_load(unit.query.label, is_label=True), query_image, unit.query.label_id(organ),
                           f"query {unit.query.id}")
        supports = []
        for case in unit.supports:
            image = _load(case.image, is_label=False, modality=case.modality)
            mask = organ_mask(_load(case.label, is_label=True), image, case.label_id(organ), f"support {case.id}")
            supports.append(Support(image, mask))
        seconds_load = time.perf_counter() - t0
        registry = get_registry()
        engine = Engine(config, backends=backends, registry=registry,
                        cache=DiskCache(task.cache_dir) if task.cache_dir else None)
        t0 = time.perf_counter()
        priors = engine.priors(supports, query_image)
        seconds_priors = time.perf_counter() - t0
    except Exception as exc:  # recorded; the other units go on
        record["error"] = _error_text(exc)
        record["traceback"] = traceback.format_exc()
        record["fusions"] = {name: {"error": record["error"]} for name in unit.method.fusion_names}
        return record
    record["seconds_load"] = seconds_load
    record["seconds_priors"] = seconds_priors
    for spec in unit.method.fusions:
        name = spec["name"]
        try:
            fusion = registry.create("fusion", name, spec.get("options") or {}, engine.context)
            t0 = time.perf_counter()
            result = engine.decode(priors, fusion)  # type: ignore[arg-type]
            seconds_decode = time.perf_counter() - t0
            prediction = result.mask
            entry: dict[str, Any] = {
                "dice": float(dice(prediction, truth)),
                "dice_2d": float(dice_2d(prediction, truth)),
                "hd95": _finite(hd95(prediction, truth)),
                "seconds": seconds_load + seconds_priors + seconds_decode,
                "timings": {"load": seconds_load, **{k: float(v) for k, v in result.timings.items()}},
                "predicted_voxels": int(np.count_nonzero(prediction.array)),
                "error": None,
            }
            if task.predictions_dir:
                from spasem.core.io import save

                path = (Path(task.predictions_dir) / _safe(unit.method.name) / _safe(name) / _safe(unit.query.id)
                        / f"{unit.stem}.nii.gz")
                path.parent.mkdir(parents=True, exist_ok=True)
                save(prediction, path)
                entry["prediction"] = str(path)
        except Exception as exc:
            entry = {"error": _error_text(exc), "traceback": traceback.format_exc()}
        record["fusions"][name] = entry
    return record
