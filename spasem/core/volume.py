"""Volumes that carry their geometry.

Coordinate conventions (the ones ITK and DICOM use):

* Physical space is **LPS** in millimetres: +x towards the patient's Left, +y Posterior,
  +z Superior. Files stored in RAS (NIfTI) are converted in :mod:`spasem.core.io`, nowhere else.
* ``array[i, j, k]`` is voxel index ``(i, j, k)``: ``i`` is the fastest axis on disk (ITK's x).
  This is nibabel's array order and the transpose of ``SimpleITK.GetArrayFromImage``.
* ``point = origin + direction @ (spacing * index)``; ``direction`` columns are the unit
  vectors of the i, j, k axes in LPS; ``origin`` is the centre of voxel (0, 0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from spasem.errors import GeometryError, InputError

#: default tolerances used to decide that two grids are "the same" (float32 headers and format
#: conversions leave differences of this order): relative for spacing, absolute (mm) for the
#: origin, absolute for direction cosines.
SPACING_RTOL = 1e-3
ORIGIN_ATOL_MM = 1e-2
DIRECTION_ATOL = 1e-3

#: LPS direction of the canonical RAS+ array orientation (i -> Right, j -> Anterior, k -> Superior)
RAS_DIRECTION = np.diag([-1.0, -1.0, 1.0])


def _as_vec3(values: Iterable[float], what: str) -> np.ndarray:
    vec = np.asarray(list(values), dtype=np.float64)
    if vec.shape != (3,):
        raise InputError(f"{what} must have 3 values, got {vec.shape[0] if vec.ndim == 1 else vec.shape}")
    vec.setflags(write=False)
    return vec


@dataclass(frozen=True, eq=False)
class Grid:
    """A 3D voxel grid placed in physical LPS space.

    :param shape: number of voxels along i, j, k.
    :param spacing: voxel size along i, j, k in mm (positive).
    :param origin: LPS position (mm) of the centre of voxel (0, 0, 0).
    :param direction: 3x3 matrix whose columns are the LPS unit vectors of the i, j, k axes.
    """

    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"a grid needs 3 positive sizes, got {shape}")
        object.__setattr__(self, "shape", shape)
        spacing = _as_vec3(self.spacing, "spacing")
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InputError(f"spacing must be positive and finite, got {tuple(spacing)}")
        object.__setattr__(self, "spacing", spacing)
        origin = _as_vec3(self.origin, "origin")
        if not np.all(np.isfinite(origin)):
            raise InputError(f"origin must be finite, got {tuple(origin)}")
        object.__setattr__(self, "origin", origin)
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3).copy()
        if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
            raise InputError(f"direction must be an invertible 3x3 matrix, got {direction.tolist()}")
        direction.setflags(write=False)
        object.__setattr__(self, "direction", direction)

    # -- geometry -------------------------------------------------------------------------
    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to LPS (x, y, z, 1) in mm."""
        aff = np.eye(4)
        aff[:3, :3] = self.direction * self.spacing[None, :]
        aff[:3, 3] = self.origin
        return aff

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to RAS (mm), as NIfTI and nibabel store it."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Continuous voxel indices ``(..., 3)`` -> LPS points ``(..., 3)`` in mm."""
        index = np.asarray(index, dtype=np.float64)
        return index @ (self.direction * self.spacing[None, :]).T + self.origin

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS points ``(..., 3)`` in mm -> continuous voxel indices ``(..., 3)``."""
        points = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.direction * self.spacing[None, :])
        return (points - self.origin) @ inv.T

    def corners(self) -> np.ndarray:
        """LPS positions (8, 3) of the outer corners of the field of view (voxel edges)."""
        lo = np.full(3, -0.5)
        hi = np.asarray(self.shape, dtype=np.float64) - 0.5
        idx = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        return self.index_to_physical(idx)

    @property
    def extent_mm(self) -> np.ndarray:
        """Physical size of the field of view along i, j, k (mm)."""
        return self.spacing * np.asarray(self.shape)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.shape))

    # -- comparisons ----------------------------------------------------------------------
    def same_as(
        self,
        other: "Grid",
        spacing_rtol: float = SPACING_RTOL,
        origin_atol: float = ORIGIN_ATOL_MM,
        direction_atol: float = DIRECTION_ATOL,
    ) -> bool:
        """True when both grids have the same voxels (shape, spacing, origin, direction)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=spacing_rtol, atol=0)
            and np.allclose(self.origin, other.origin, rtol=0, atol=origin_atol)
            and np.allclose(self.direction, other.direction, rtol=0, atol=direction_atol)
        )

    def axis_mapping_to(self, other: "Grid", atol_mm: float = ORIGIN_ATOL_MM) -> tuple[tuple[int, ...], tuple[bool, ...]] | None:
        """How to turn an array on ``self`` into an array on ``other`` *exactly*, if possible.

        Returns ``(perm, flips)`` such that ``np.flip(a.transpose(perm), axes)`` (flipping the
        axes where ``flips`` is True) puts ``a`` (an array on ``self``) on ``other``'s voxels, when
        both grids hold exactly the same voxel centres with axes permuted and/or reversed
        (e.g. a label map stored with one axis flipped). ``None`` when they do not.
        """
        if self.num_voxels != other.num_voxels:
            return None
        # index of other -> index of self: M @ idx_other + t
        m = np.linalg.inv(self.direction * self.spacing[None, :]) @ (other.direction * other.spacing[None, :])
        t = self.physical_to_index(other.origin)
        rounded = np.round(m)
        if not np.allclose(m, rounded, atol=DIRECTION_ATOL):
            return None
        if not all(sorted(np.abs(rounded[:, c]).tolist()) == [0.0, 0.0, 1.0] for c in range(3)):
            return None
        if not all(sorted(np.abs(rounded[r, :]).tolist()) == [0.0, 0.0, 1.0] for r in range(3)):
            return None
        # other's axis c corresponds to self's axis perm[c]
        perm = tuple(int(np.argmax(np.abs(rounded[:, c]))) for c in range(3))
        flips = tuple(bool(rounded[perm[c], c] < 0) for c in range(3))
        if tuple(self.shape[perm[c]] for c in range(3)) != other.shape:
            return None
        expected_t = np.array(
            [0.0 if not flips[c] else self.shape[perm[c]] - 1.0 for c in range(3)], dtype=np.float64
        )
        t_by_other_axis = np.array([t[perm[c]] for c in range(3)])
        tol_index = atol_mm / np.array([self.spacing[perm[c]] for c in range(3)])
        if not np.all(np.abs(t_by_other_axis - expected_t) <= np.maximum(tol_index, 1e-4)):
            return None
        return perm, flips

    def describe(self) -> str:
        """One-line human-readable summary (size, spacing, origin, orientation code)."""
        sp = "x".join(f"{s:.4g}" for s in self.spacing)
        org = ", ".join(f"{o:.2f}" for o in self.origin)
        return f"{self.shape[0]}x{self.shape[1]}x{self.shape[2]} voxels, {sp} mm, origin ({org}), {orientation_code(self.direction)}"

    def __repr__(self) -> str:
        return f"Grid({self.describe()})"

    # -- derived grids --------------------------------------------------------------------
    def canonical(self, spacing: float | Sequence[float], margin_mm: float = 0.0) -> "Grid":
        """Axis-aligned RAS+ grid at ``spacing`` (mm) covering this grid's field of view.

        The new grid's voxel edges enclose every corner of the field of view (plus
        ``margin_mm`` on each side); its centre coincides with the field of view's centre.
        """
        spacing_v = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
        corners = self.corners()
        lo = corners.min(axis=0) - margin_mm
        hi = corners.max(axis=0) + margin_mm
        # extent along RAS axes (i: -x, j: -y, k: +z in LPS); the extent is symmetric in sign
        extent = hi - lo
        shape = np.maximum(1, np.ceil(extent / spacing_v - 1e-6)).astype(int)
        centre = (lo + hi) / 2
        half = (shape - 1) / 2 * spacing_v
        # RAS+ axes increase towards Right, Anterior, Superior, so voxel 0 is the Left-Posterior-Inferior corner
        origin = centre + RAS_DIRECTION @ (-half)
        return Grid(tuple(shape), spacing_v, origin, RAS_DIRECTION)

    def subgrid(self, start: Sequence[int], shape: Sequence[int]) -> "Grid":
        """The grid of the box ``[start, start + shape)`` in this grid's index space
        (``start`` may be negative or reach beyond the grid: the box can stick out)."""
        origin = self.index_to_physical(np.asarray(start, dtype=np.float64))
        return Grid(tuple(int(s) for s in shape), self.spacing, origin, self.direction)

    def scaled(self, factor: int | Sequence[int]) -> "Grid":
        """Coarser grid with ``factor`` x larger voxels covering the same field of view
        (voxel edges aligned): used for feature maps computed with a stride."""
        f = np.broadcast_to(np.asarray(factor, dtype=np.float64), (3,))
        shape = np.ceil(np.asarray(self.shape) / f).astype(int)
        spacing = self.spacing * f
        # centre of coarse voxel 0 = centre of the block of f fine voxels starting at fine voxel 0
        origin = self.index_to_physical((f - 1) / 2)
        return Grid(tuple(shape), spacing, origin, self.direction)


def orientation_code(direction: np.ndarray) -> str:
    """Three-letter code of the directions the i, j, k axes point *to*, in the RAS letter
    convention nibabel uses (e.g. 'RAS' for a canonical NIfTI, 'LPS' for a typical DICOM)."""
    letters = {0: ("L", "R"), 1: ("P", "A"), 2: ("S", "I")}
    code = []
    for c in range(3):
        col = np.asarray(direction)[:, c]
        axis = int(np.argmax(np.abs(col)))
        positive, negative = letters[axis]
        code.append(positive if col[axis] > 0 else negative)
    return "".join(code)


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image or label map together with its grid.

    :param array: voxel values, shape ``grid.shape``, indexed ``[i, j, k]``.
    :param grid: where the voxels are in LPS physical space.
    :param is_label: True for label maps / masks: they are only ever resampled nearest-neighbour.
    :param name: where it came from (file path) or what it is, used in messages.
    :param modality: 'CT', 'MR' or None when unknown.
    """

    array: np.ndarray
    grid: Grid
    is_label: bool = False
    name: str | None = None
    modality: str | None = None

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise InputError(f"{self.label_for_messages}: expected a 3D volume, got {arr.ndim}D array of shape {arr.shape}")
        if tuple(arr.shape) != self.grid.shape:
            raise InputError(
                f"{self.label_for_messages}: array shape {arr.shape} does not match its grid {self.grid.shape}"
            )
        object.__setattr__(self, "array", arr)

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        origin: Sequence[float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | Sequence[float] = np.eye(3),
        **kwargs,
    ) -> "Volume":
        """Build a volume from an ``[i, j, k]`` array and its LPS geometry."""
        arr = np.asarray(array)
        return cls(arr, Grid(arr.shape, spacing, origin, np.asarray(direction, dtype=float).reshape(3, 3)), **kwargs)

    # geometry shortcuts
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def spacing(self) -> np.ndarray:
        return self.grid.spacing

    @property
    def origin(self) -> np.ndarray:
        return self.grid.origin

    @property
    def direction(self) -> np.ndarray:
        return self.grid.direction

    @property
    def affine(self) -> np.ndarray:
        return self.grid.affine

    @property
    def label_for_messages(self) -> str:
        return f"'{self.name}'" if self.name else ("label map" if self.is_label else "image")

    def with_array(self, array: np.ndarray, *, is_label: bool | None = None, name: str | None = None) -> "Volume":
        """Same grid (and modality), new voxel values."""
        return Volume(
            np.asarray(array),
            self.grid,
            is_label=self.is_label if is_label is None else is_label,
            name=self.name if name is None else name,
            modality=self.modality,
        )

    def reoriented_onto(self, grid: Grid) -> "Volume | None":
        """Exact (interpolation-free) copy on ``grid`` when both hold the same voxels with
        axes permuted/flipped, else None. Values are moved, never interpolated."""
        mapping = self.grid.axis_mapping_to(grid)
        if mapping is None:
            return None
        perm, flips = mapping
        arr = self.array.transpose(perm)
        flip_axes = tuple(c for c in range(3) if flips[c])
        if flip_axes:
            arr = np.flip(arr, axis=flip_axes)
        return Volume(np.ascontiguousarray(arr), grid, self.is_label, self.name, self.modality)

    def check_finite(self) -> None:
        """Raise :class:`InputError` naming the volume if any voxel is NaN or infinite."""
        if np.issubdtype(self.array.dtype, np.floating):
            bad = ~np.isfinite(self.array)
            n_bad = int(bad.sum())
            if n_bad:
                first = tuple(int(v) for v in np.argwhere(bad)[0])
                raise InputError(
                    f"{self.label_for_messages} has {n_bad} NaN/infinite voxel(s) (first at index {first}); "
                    "expected finite intensities"
                )

    def __repr__(self) -> str:
        kind = "label" if self.is_label else "image"
        return f"Volume({kind}, {self.array.dtype}, {self.grid.describe()}, name={self.name!r})"


def require_same_grid(a: Volume, b: Volume, what: str = "volumes") -> None:
    """Raise :class:`GeometryError` naming both geometries unless ``a`` and ``b`` share a grid."""
    if not a.grid.same_as(b.grid):
        raise GeometryError(
            f"{what} are on different voxel grids: {a.label_for_messages} is {a.grid.describe()}; "
            f"{b.label_for_messages} is {b.grid.describe()}"
        )
