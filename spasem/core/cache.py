"""Caching stage results by content hash, so repeated work (the same registration or the same
features under several fusion strategies, reruns of an evaluation) is done once.

Keys are SHA-256 digests of everything a stage's result depends on: the voxel data and
geometry of its input volumes (:func:`volume_digest`), the backend's name and validated options,
and the relevant configuration. Values are dictionaries of tensors and plain Python values.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spasem.core.volume import Grid, Volume

CACHE_FORMAT_VERSION = 1


def volume_digest(volume: Volume) -> str:
    """SHA-256 of a volume's voxels (dtype, shape, bytes) and geometry."""
    h = hashlib.sha256()
    arr = np.ascontiguousarray(volume.array)
    h.update(str(arr.dtype).encode())
    h.update(np.asarray(arr.shape, dtype=np.int64).tobytes())
    h.update(memoryview(arr).cast("B"))
    h.update(grid_digest(volume.grid).encode())
    h.update(str(volume.is_label).encode())
    return h.hexdigest()


def grid_digest(grid: Grid) -> str:
    """SHA-256 of a grid's shape, spacing, origin and direction (rounded to 1e-6 mm)."""
    values = [*grid.shape, *np.round(grid.spacing, 6), *np.round(grid.origin, 6), *np.round(grid.direction.ravel(), 6)]
    return hashlib.sha256(json.dumps([float(v) for v in values]).encode()).hexdigest()


def make_key(*parts: Any) -> str:
    """Stable digest of JSON-serialisable parts (strings, numbers, dicts, lists)."""
    payload = json.dumps([CACHE_FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def grid_to_dict(grid: Grid) -> dict[str, Any]:
    return {
        "shape": list(grid.shape),
        "spacing": grid.spacing.tolist(),
        "origin": grid.origin.tolist(),
        "direction": grid.direction.ravel().tolist(),
    }


def grid_from_dict(data: dict[str, Any]) -> Grid:
    return Grid(tuple(data["shape"]), data["spacing"], data["origin"], np.asarray(data["direction"]).reshape(3, 3))


class StageCache(ABC):
    """Where stage results are kept between calls."""

    @abstractmethod
    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stored value or None."""

    @abstractmethod
    def store(self, stage: str, key: str, value: dict[str, Any]) -> None:
        """Keep ``value`` (a dict of tensors / plain values)."""


class MemoryCache(StageCache):
    """In-process cache (a dict)."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], dict[str, Any]] = {}

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        return self._data.get((stage, key))

    def store(self, stage: str, key: str, value: dict[str, Any]) -> None:
        self._data[(stage, key)] = value


class DiskCache(StageCache):
    """One file per result under ``root/stage/kk/key.pt`` (written atomically); safe to share
    between processes (a result is complete or absent; concurrent writers write the same bytes)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / f"{key}.pt"

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        path = self._path(stage, key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt entry is recomputed
            return None

    def store(self, stage: str, key: str, value: dict[str, Any]) -> None:
        path = self._path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(value, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
