"""Synthetic abdominal phantoms: one anatomy per subject, rendered as CT-like or MR-T2-like scans.

Every (``seed``, ``subject``) pair defines one *anatomy* in the patient's own frame (LPS, mm,
origin at the body's centre at the level of the kidneys' hila): body outline, subcutaneous fat,
abdominal wall, bowel/mesentery with visceral fat and gas, lung bases above a diaphragm dome,
spine (vertebral bodies, discs, canal, arch), psoas muscles, aorta and IVC, stomach, and the four
labelled organs. Organ shape, size and position vary between subjects: per-organ random
scale / rotation / translation, a smooth random displacement of each organ's local coordinates
(sum of low-frequency sine modes), a smooth displacement of the whole anatomy, body size and fat
thickness, and a respiratory shift of the upper-abdominal organs.

A *scan* places that anatomy in a scanner frame (random table position and a small yaw) and
samples it on a modality-specific grid; the label map is sampled from the very same tissue map as
the image (labels at voxel centres), so image and labels are the same physical objects.

==========  ==========================  ===========================  =====================
modality    voxel size (mm)             field of view (mm)           file direction
==========  ==========================  ===========================  =====================
``ct``      0.8 x 0.8 x 2.5             body + ~12 mm, 160 (z)       LPS (i->L, j->P, k->S)
``mr``      1.5 x 1.5 x 6.0             ~380 x 300 x 180             RAS (i->R, j->A, k->S)
==========  ==========================  ===========================  =====================

Sizes: a CT case holds about 4.5-5.5 million voxels (int16 Hounsfield units), an MR case about
1.5 million (float32). Generation takes a few seconds per case on 2 cores.

Renderings:

* **CT** (portal-venous-like): air -1000 HU, fat -100, muscle 50, liver ~105, spleen ~115, kidney
  cortex ~170 / medulla ~120, bone 250-700, per-subject jitter of organ HU, Gaussian noise
  (sigma 12 HU) on top of a mild in-plane blur; stored as int16.
* **MR T2-like** (fast spin echo, no fat suppression): a different contrast ordering (CSF/fluid >
  fat > kidney medulla > kidney cortex > spleen > bowel > liver > muscle > flow voids/bone), a smooth multiplicative bias field
  (about +-15 %), partial volume across the 6 mm slices (3 sub-slices averaged) and Rician noise
  (magnitude of a complex Gaussian); stored as float32.

Labels (uint8): :data:`LABELS` = liver 1, spleen 2, left_kidney 3, right_kidney 4 (the patient's
left: +x in LPS). Intra-hepatic portal vessels belong to the liver; the IVC, renal sinus fat and
the hilum do not.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from spasem.core.volume import RAS_DIRECTION, Grid, Volume
from spasem.errors import InputError

#: label ids of the phantoms' organs (the evaluation relies on these names and ids)
LABELS: dict[str, int] = {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4}

#: modality names accepted by :func:`generate_case` -> modality written in manifests
MODALITY_NAMES: dict[str, str] = {"ct": "CT", "mr": "MR"}


# ------------------------------------------------------------------------------------------
# tissues and their appearance
# ------------------------------------------------------------------------------------------
AIR, FAT, MUSCLE, BOWEL, VISCERAL_FAT, GAS, LUNG, LIVER, PORTAL_VEIN, SPLEEN = range(10)
CORTEX, MEDULLA, SINUS_FAT, STOMACH, AORTA, IVC, BONE_CORTEX, MARROW, DISC, CSF = range(10, 20)
N_TISSUES = 20

#: mean CT value (HU) per tissue
CT_HU = np.array([
    -1000, -100, 50, 35, -90, -950, -850, 105, 165, 115,
    175, 120, -80, 15, 170, 135, 700, 240, 85, 10,
], dtype=np.float32)
#: mean T2-weighted MR signal (arbitrary units, ~0-1000) per tissue
MR_T2 = np.array([
    4, 600, 90, 190, 560, 8, 15, 120, 70, 300,
    380, 480, 560, 820, 30, 60, 25, 320, 480, 950,
], dtype=np.float32)

#: per-subject relative contrast jitter of the organs (same for both modalities of a subject)
_JITTERED = (LIVER, SPLEEN, CORTEX, MEDULLA, STOMACH, BOWEL)
#: the largest inter-subject variability factor accepted (:func:`make_anatomy`); at 4 the organ
#: radii vary by +-32 % (one standard deviation) and positions by 16 mm
MAX_VARIABILITY = 4.0


@dataclass(frozen=True)
class ScanProtocol:
    """How one modality samples an anatomy.

    :param spacing: voxel size along i, j, k (mm).
    :param direction: LPS direction of the file's i, j, k axes.
    :param fov_margin_mm: in-plane margin around the body (None: fixed in-plane field of view).
    :param fov_mm: fixed in-plane field of view (mm) when ``fov_margin_mm`` is None; z extent always.
    :param z_centre_mm: patient-frame z of the field-of-view centre (mean) and its jitter.
    :param subslices: samples averaged across each slice (partial volume along k).
    """

    spacing: tuple[float, float, float]
    direction: np.ndarray
    fov_margin_mm: float | None
    fov_mm: tuple[float, float, float]
    z_centre_mm: tuple[float, float]
    subslices: int


PROTOCOLS: dict[str, ScanProtocol] = {
    "ct": ScanProtocol((0.8, 0.8, 2.5), np.eye(3), 12.0, (0.0, 0.0, 160.0), (20.0, 6.0), 1),
    "mr": ScanProtocol((1.5, 1.5, 6.0), RAS_DIRECTION, None, (380.0, 300.0, 180.0), (20.0, 10.0), 3),
}


# ------------------------------------------------------------------------------------------
# anatomy
# ------------------------------------------------------------------------------------------
def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class SineField:
    """A smooth random field ``sum_m amp_m * sin(2 pi k_m . x + phase_m)`` with ``out`` components
    (a sum of many random plane waves is close to a Gaussian random field).

    :param wavevectors: ``[M, 3]`` cycles per unit of ``x``.
    :param phases: ``[M]``.
    :param amplitudes: ``[M, out]``; the field's standard deviation is about ``amplitude``.
    """

    wavevectors: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, modes: int, wavelength: tuple[float, float], amplitude: float,
               out: int = 1) -> "SineField":
        direction = rng.normal(size=(modes, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength, size=modes)
        amplitudes = rng.normal(size=(modes, out)) * amplitude / math.sqrt(modes / 2.0)
        return cls(direction / wavelengths[:, None], rng.uniform(0, 2 * math.pi, modes), amplitudes)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``[..., 3]`` -> ``[..., out]`` (float32)."""
        phase = np.asarray(x, np.float64) @ (2 * math.pi * self.wavevectors.T) + self.phases
        return (np.sin(phase) @ self.amplitudes).astype(np.float32)


@dataclass(frozen=True)
class Blob:
    """A deformed ellipsoid: inside where ``|q + d(q)| < 1`` with ``q = R^T (x - centre) / radii``
    (``d`` a smooth random displacement of the normalised local coordinates)."""

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    deformation: SineField | None = None

    def local(self, x: np.ndarray) -> np.ndarray:
        """Normalised local coordinates ``[..., 3]`` of points ``[..., 3]``, without the deformation."""
        return ((x - self.centre) @ self.rotation) / self.radii

    def local_xyz(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`local` for coordinates given as three arrays (float32, cheaper on big grids)."""
        dx, dy, dz = x - np.float32(self.centre[0]), y - np.float32(self.centre[1]), z - np.float32(self.centre[2])
        m = (self.rotation / self.radii[None, :]).astype(np.float32)
        return tuple(dx * m[0, a] + dy * m[1, a] + dz * m[2, a] for a in range(3))  # type: ignore[return-value]

    def bounds(self, margin_mm: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame box (lo, hi) that contains the organ (deformation included)."""
        half = np.abs(self.rotation) @ (self.radii * 1.4) + margin_mm
        return self.centre - half, self.centre + half


@dataclass(frozen=True)
class Anatomy:
    """One subject's anatomy in the patient frame (LPS mm); built by :func:`make_anatomy`."""

    body_axes: tuple[float, float]
    body_wobble: tuple[float, float, float]
    fat_thickness: float
    wall_thickness: float
    diaphragm_z: float
    spine_y: float
    texture: SineField
    visceral_fat: SineField
    visceral_fat_level: float
    liver: tuple[Blob, Blob]
    portal: tuple[np.ndarray, np.ndarray, float]
    spleen: Blob
    kidneys: dict[str, Blob]
    stomach: Blob
    gas: tuple[Blob, ...]
    jitter: np.ndarray


def check_variability(variability: float) -> float:
    """``variability`` as a float, or :class:`InputError` outside ``[0, MAX_VARIABILITY]``."""
    try:
        value = float(variability)
    except (TypeError, ValueError):
        raise InputError(f"phantom variability '{variability}': expected a number") from None
    if not 0.0 <= value <= MAX_VARIABILITY:
        raise InputError(f"phantom variability {variability}: expected a number in [0, {MAX_VARIABILITY:g}]")
    return value


def make_anatomy(subject: int, seed: int = 0, variability: float = 1.0) -> Anatomy:
    """The anatomy of ``subject`` (deterministic in ``(seed, subject, variability)``).

    :param variability: factor on the spread between subjects of the organs' position, size,
        orientation and shape, the overall organ scale and the respiratory shift (not the body
        outline). 1 is the default cohort; 0 puts every subject's organs at the mean anatomy's;
        2-3 brings registration alone down towards what it reaches between real patients. The
        random draws are the same for every value, so subjects keep their character.
    """
    v = check_variability(variability)
    rng = np.random.default_rng([int(seed), int(subject), 7919])
    a = rng.uniform(110.0, 126.0)  # half body width (LR), mm
    b = rng.uniform(84.0, 96.0)  # half body depth (AP)
    sx, sy = a / 118.0, b / 90.0
    g = 1.0 + v * (rng.uniform(0.93, 1.07) - 1.0)  # overall organ scale
    breath = v * rng.uniform(-6.0, 6.0)  # respiratory shift of the upper-abdominal organs (z, mm)

    def organ(centre, radii, angles, shift_sd=4.0, scale_sd=0.07, angle_sd=5.0, deform=0.05):
        c = np.array(centre, dtype=np.float64) * np.array([sx, sy, g]) + v * rng.normal(0, shift_sd, 3)
        r = np.array(radii, dtype=np.float64) * g * np.exp(v * rng.normal(0, scale_sd, 3))
        rot = _rotation(np.asarray(angles, dtype=np.float64) + v * rng.normal(0, angle_sd, 3))
        return Blob(c, r, rot, SineField.random(rng, 10, (1.6, 3.2), v * deform, out=3))

    spine_y = 0.42 * b
    liver_right = organ((-50, 0, 42 + breath), (60, 62, 55), (0, 0, 0))
    liver_left = organ((8, -36, 52 + breath), (46, 26, 27), (0, 0, -10))
    spleen = organ((68, 28, 46 + breath), (24, 50, 44), (0, 0, 35), deform=0.07)
    kidneys = {
        "left_kidney": organ((54, spine_y / sy + 2, 0 + 0.5 * breath), (26, 24, 50), (0, -10, 30)),
        "right_kidney": organ((-54, spine_y / sy + 2, -12 + 0.5 * breath), (26, 24, 50), (0, 10, -30)),
    }
    stomach = organ((50, -30, 42 + breath), (32, 24, 30), (0, 0, 20), deform=0.08)
    gas = tuple(
        Blob(np.array([rng.uniform(-60, 60), rng.uniform(-55, -20), rng.uniform(-60, 10)]),
             rng.uniform(5, 12, 3), _rotation(rng.uniform(0, 90, 3)))
        for _ in range(int(rng.integers(3, 7)))
    )
    portal_start = np.array([-8.0, 5.0, 15.0 + breath]) * np.array([sx, sy, g])
    portal_end = liver_right.centre + np.array([-15.0, -5.0, 5.0])
    jitter = np.ones(N_TISSUES)
    jitter[list(_JITTERED)] = np.exp(rng.normal(0, 0.06, len(_JITTERED)))  # contrast: not scaled by v
    return Anatomy(
        body_axes=(a, b),
        body_wobble=(rng.uniform(0.0, 0.05), rng.uniform(150.0, 300.0), rng.uniform(0, 2 * math.pi)),
        fat_thickness=rng.uniform(7.0, 22.0),
        wall_thickness=rng.uniform(6.0, 10.0),
        diaphragm_z=g * 100.0 + breath,
        spine_y=spine_y,
        texture=SineField.random(rng, 24, (16.0, 50.0), 1.0),
        visceral_fat=SineField.random(rng, 48, (18.0, 45.0), 1.0),
        visceral_fat_level=rng.uniform(0.2, 0.9),
        liver=(liver_right, liver_left),
        portal=(portal_start, portal_end, rng.uniform(5.0, 7.0)),
        spleen=spleen,
        kidneys=kidneys,
        stomach=stomach,
        gas=gas,
        jitter=jitter,
    )


# ------------------------------------------------------------------------------------------
# sampling an anatomy on a scan grid
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanPlacement:
    """Where the patient lies in the scanner: ``x_scanner = yaw @ x_patient + offset`` (LPS mm)."""

    yaw: np.ndarray
    offset: np.ndarray

    def to_patient(self, x_scanner: np.ndarray) -> np.ndarray:
        return (x_scanner - self.offset) @ self.yaw

    def to_scanner(self, x_patient: np.ndarray) -> np.ndarray:
        return x_patient @ self.yaw.T + self.offset


def _interp_matrix(n: int, m: int) -> np.ndarray:
    """``[n, m]`` linear interpolation from ``m`` nodes at ``linspace(0, n - 1, m)`` to ``0..n-1``."""
    pos = np.arange(n) * (m - 1) / max(n - 1, 1)
    lo = np.clip(np.floor(pos).astype(int), 0, m - 2)
    frac = pos - lo
    w = np.zeros((n, m), np.float32)
    w[np.arange(n), lo] = 1.0 - frac
    w[np.arange(n), lo + 1] += frac
    return w


class _Sampler:
    """Patient-frame coordinates of every voxel of a scan grid (k shifted by ``k_offset`` for
    sub-slices) as three float32 arrays ``x, y, z``, plus smooth fields evaluated on a coarse
    lattice and interpolated trilinearly."""

    def __init__(self, grid: Grid, placement: ScanPlacement, k_offset: float = 0.0, lattice_mm: float = 8.0):
        self.grid = grid
        lin = placement.yaw.T @ (grid.direction * grid.spacing[None, :])  # voxel index -> patient mm
        self.lin = lin
        self.shift = placement.yaw.T @ (grid.origin - placement.offset) + lin[:, 2] * k_offset
        ii, jj, kk = (np.arange(n, dtype=np.float32) for n in grid.shape)
        self.x, self.y, self.z = (
            (ii[:, None, None] * np.float32(lin[a, 0]) + jj[None, :, None] * np.float32(lin[a, 1]))
            + (kk[None, None, :] * np.float32(lin[a, 2]) + np.float32(self.shift[a]))
            for a in range(3)
        )
        nodes = [max(2, int(math.ceil(n * s / lattice_mm)) + 1) for n, s in zip(grid.shape, grid.spacing)]
        self.weights = [_interp_matrix(n, m) for n, m in zip(grid.shape, nodes)]
        node_idx = np.stack(np.meshgrid(*[np.linspace(0, n - 1, m) for n, m in zip(grid.shape, nodes)], indexing="ij"), -1)
        self.lattice = node_idx @ lin.T + self.shift

    def field(self, fn, box: tuple[slice, slice, slice] | None = None) -> list[np.ndarray]:
        """``fn`` (patient points ``[..., 3]`` -> ``[..., C]``) on the voxels of ``box``: C arrays
        ``[bi, bj, bk]``, evaluated on the coarse lattice and interpolated trilinearly."""
        box = box or (slice(None),) * 3
        coarse = np.asarray(fn(self.lattice), np.float32)  # [mi, mj, mk, C]
        wi, wj, wk = (w[s] for w, s in zip(self.weights, box))
        out = []
        for c in range(coarse.shape[-1]):
            v = coarse[..., c] @ wk.T  # [mi, mj, bk]
            v = np.matmul(wj, v)  # [mi, bj, bk]
            v = (wi @ v.reshape(v.shape[0], -1)).reshape(wi.shape[0], wj.shape[0], wk.shape[0])
            out.append(v)
        return out

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Voxel box covering the patient-frame box ``[lo, hi]`` (None when outside the grid)."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = np.linalg.solve(self.lin, (corners - self.shift).T).T
        start = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, np.asarray(self.grid.shape))
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


def _ellipse(x: np.ndarray, y: np.ndarray, ax: float, ay_front: float, ay_back: float) -> np.ndarray:
    """Inside an ellipse of half-width ``ax``, half-depth ``ay_front`` in front (``y < 0``) and
    ``ay_back`` behind."""
    ay = np.where(y > 0, np.float32(ay_back), np.float32(ay_front))
    u, v = x / ax, y / ay
    return u * u + v * v < 1


def _segment_distance(x: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance (mm) from points ``[..., 3]`` to the segment ``start``-``end``."""
    d = (end - start).astype(np.float32)
    t = np.clip(((x - start.astype(np.float32)) @ d) / float(d @ d), 0.0, 1.0)
    return np.linalg.norm(x - (start.astype(np.float32) + t[..., None] * d), axis=-1)


def sample_anatomy(anatomy: Anatomy, sampler: _Sampler) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue ids, organ labels and texture on the sampler's voxels.

    Structures are painted in order (later ones win), so the labels are exactly the organ
    tissues the image shows. Returns ``(tissue uint8, label uint8, texture float32)``, each the
    grid's shape.
    """
    x, y, z = sampler.x, sampler.y, sampler.z
    shape = x.shape
    tissue = np.zeros(shape, np.uint8)
    label = np.zeros(shape, np.uint8)
    everything = (slice(None),) * 3

    def paint(box, where: np.ndarray, tissue_id: int, label_id: int = 0) -> None:
        tissue[box][where] = tissue_id
        label[box][where] = label_id

    a, b = anatomy.body_axes
    amp, wavelength, phase = anatomy.body_wobble
    a_z = np.float32(a) * (1.0 + np.float32(amp) * np.sin(np.float32(2 * math.pi / wavelength) * z + np.float32(phase)))
    paint(everything, _ellipse(x, y, a_z, b, 0.92 * b), FAT)
    t_fat = anatomy.fat_thickness
    t_back = 0.6 * t_fat
    wall = anatomy.wall_thickness
    muscle_region = _ellipse(x, y, a_z - t_fat, b - t_fat, 0.92 * b - t_back)
    paint(everything, muscle_region, MUSCLE)
    cavity = _ellipse(x, y, a_z - t_fat - wall, b - t_fat - wall, 0.92 * b - t_back - wall)
    paint(everything, cavity, BOWEL)
    del a_z
    paint(everything, cavity & (sampler.field(anatomy.visceral_fat)[0] > anatomy.visceral_fat_level), VISCERAL_FAT)
    # diaphragm dome: lungs above it (heart/mediastinum in front)
    dome = np.float32(anatomy.diaphragm_z) - np.float32(0.0015) * x * x - np.float32(0.002) * (y + 10) * (y + 10)
    below = z <= dome
    del dome
    paint(everything, cavity & ~below & (y > -25.0), LUNG)
    paint(everything, cavity & ~below & (y <= -25.0), MUSCLE)
    organ_space = cavity & below

    def coords(box):
        return x[box], y[box], z[box]

    def level(blob: Blob, box) -> np.ndarray:
        """``|q + d(q)| - 1`` on the voxels of ``box``."""
        q = blob.local_xyz(*coords(box))
        if blob.deformation is not None:
            d = sampler.field(lambda pts: blob.deformation(blob.local(pts)), box)
            q = tuple(qa + da for qa, da in zip(q, d))
        return np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2]) - 1.0

    def union_box(*blobs: Blob, margin: float = 10.0):
        lo = np.min([bl.bounds(margin)[0] for bl in blobs], axis=0)
        hi = np.max([bl.bounds(margin)[1] for bl in blobs], axis=0)
        return sampler.box(lo, hi)

    for bubble in anatomy.gas:
        box = union_box(bubble, margin=2.0)
        if box is not None:
            paint(box, organ_space[box] & (level(bubble, box) < 0), GAS)
    sy = anatomy.spine_y
    spine_box = sampler.box(np.array([-70.0, sy - 45.0, -1e4]), np.array([70.0, sy + 60.0, 1e4]))
    if spine_box is not None:
        xs, ys, zs = coords(spine_box)
        # paraspinal and psoas muscles
        paint(spine_box, muscle_region[spine_box] & (ys > sy + 5.0) & (np.abs(xs) < 48.0), MUSCLE)
        psoas_r = np.clip(6.0 - 0.22 * zs, 0.0, 22.0)
        for side in (-1.0, 1.0):
            paint(spine_box, cavity[spine_box] & (np.hypot(xs - side * 32.0, (ys - sy - 4.0) * 1.2) < psoas_r), MUSCLE)

    right, left = anatomy.liver
    box = union_box(right, left)
    if box is not None:
        k = np.float32(0.25)  # smooth union of the two lobes
        liver_level = -k * np.logaddexp(-level(right, box) / k, -level(left, box) / k)
        liver = organ_space[box] & (liver_level < 0)
        paint(box, liver, LIVER, LABELS["liver"])
        ps, pe, pr = anatomy.portal
        vessel_box = sampler.box(np.minimum(ps, pe) - pr - 2, np.maximum(ps, pe) + pr + 2)
        if vessel_box is not None:
            pts = np.stack(coords(vessel_box), axis=-1)
            paint(vessel_box, (label[vessel_box] == LABELS["liver"]) & (_segment_distance(pts, ps, pe) < pr),
                  PORTAL_VEIN, LABELS["liver"])
    box = union_box(anatomy.stomach)
    if box is not None:
        inside = organ_space[box] & (level(anatomy.stomach, box) < 0)
        paint(box, inside, STOMACH)
        paint(box, inside & (anatomy.stomach.local_xyz(*coords(box))[1] < -0.5), GAS)
    box = union_box(anatomy.spleen)
    if box is not None:
        paint(box, organ_space[box] & (level(anatomy.spleen, box) < 0), SPLEEN, LABELS["spleen"])
    for name, kidney in anatomy.kidneys.items():
        box = union_box(kidney)
        if box is None:
            continue
        radius = level(kidney, box) + 1.0
        q = kidney.local_xyz(*coords(box))
        inside = cavity[box] & (radius < 1)
        medial = -np.sign(kidney.centre[0])  # the hilum faces the spine
        hilum = inside & (q[0] * medial > 0.55) & (np.abs(q[2]) < 0.3)
        lab = LABELS[name]
        paint(box, inside & ~hilum, CORTEX, lab)
        paint(box, inside & ~hilum & (radius < 0.72), MEDULLA, lab)
        paint(box, inside & (radius < 0.4), SINUS_FAT)
        paint(box, hilum, SINUS_FAT)
    if spine_box is not None:
        xs, ys, zs = coords(spine_box)
        cav, mus = cavity[spine_box], muscle_region[spine_box]
        paint(spine_box, cav & (np.hypot(xs - 14.0, ys - (sy - 26.0)) < 10.0), AORTA)
        paint(spine_box, cav & (np.hypot((xs + 22.0) / 1.25, ys - (sy - 28.0)) < 9.0), IVC)
        # vertebral bodies (cortex + marrow) separated by discs, canal, arch, spinous process
        segment = np.mod(zs + 12.0, 32.0)
        vert = np.hypot(xs / 19.0, (ys - sy) / 15.0)
        in_body = vert < 1.0
        paint(spine_box, in_body, BONE_CORTEX)
        paint(spine_box, in_body & (vert < 0.85), MARROW)
        paint(spine_box, in_body & (segment < 7.0), DISC)
        canal_y = sy + 24.0
        canal = np.hypot(xs, ys - canal_y)
        paint(spine_box, mus & (canal < 13.0) & (ys > sy + 12.0), BONE_CORTEX)
        paint(spine_box, mus & (np.abs(xs) < 4.0) & (ys > canal_y) & (ys < canal_y + 14.0) & (segment > 6.0), BONE_CORTEX)
        paint(spine_box, canal < 7.5, CSF)
    return tissue, label, sampler.field(anatomy.texture)[0]


# ------------------------------------------------------------------------------------------
# scans
# ------------------------------------------------------------------------------------------
def scan_geometry(anatomy: Anatomy, modality: str, rng: np.random.Generator) -> tuple[Grid, ScanPlacement]:
    """The scan's grid (scanner frame) and the patient's placement in it (random table position,
    yaw of a few degrees)."""
    protocol = PROTOCOLS[modality]
    yaw = _rotation((0.0, 0.0, rng.uniform(-4.0, 4.0)))
    table_z = rng.uniform(-600, -100) if modality == "ct" else rng.uniform(-40, 40)
    placement = ScanPlacement(yaw, np.array([rng.uniform(-15, 15), rng.uniform(-10, 10), table_z]))
    spacing = np.asarray(protocol.spacing)
    a, b = anatomy.body_axes
    if protocol.fov_margin_mm is not None:
        a_max = a * (1.0 + anatomy.body_wobble[0])
        extent = np.array([2 * a_max + 2 * protocol.fov_margin_mm, 2 * b + 2 * protocol.fov_margin_mm, protocol.fov_mm[2]])
    else:
        extent = np.asarray(protocol.fov_mm, dtype=np.float64)
    shape = np.ceil(extent / spacing).astype(int)
    centre_patient = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), rng.normal(*protocol.z_centre_mm)])
    centre = placement.to_scanner(centre_patient)
    direction = np.asarray(protocol.direction, dtype=np.float64)
    origin = centre - direction @ (spacing * (shape - 1) / 2.0)
    return Grid(tuple(int(s) for s in shape), spacing, origin, direction), placement


def _render(tissue: np.ndarray, texture: np.ndarray, anatomy: Anatomy, modality: str) -> np.ndarray:
    """Noise-free intensities of a tissue map (modality contrast, organ jitter, texture)."""
    table = ((CT_HU if modality == "ct" else MR_T2) * anatomy.jitter).astype(np.float32)
    values = table[tissue]
    textured = np.zeros(N_TISSUES, bool)
    textured[[LIVER, SPLEEN, CORTEX, MEDULLA, MUSCLE, BOWEL, STOMACH]] = True
    if modality == "ct":
        values += np.where(textured[tissue], 6.0 * texture, 0.0).astype(np.float32)
    else:
        values *= np.where(textured[tissue], 1.0 + 0.05 * texture, 1.0).astype(np.float32)
    return values


def generate_case(subject: int, modality: str, seed: int = 0, variability: float = 1.0) -> tuple[Volume, Volume]:
    """One phantom scan and its label map (same grid).

    :param subject: subject number (the anatomy; the same for every modality of a subject).
    :param modality: 'ct' or 'mr' (case-insensitive).
    :param seed: cohort seed; ``(seed, subject, modality, variability)`` determines the result
        exactly.
    :param variability: spread of the organs between subjects (:func:`make_anatomy`).
    :returns: ``(image, label)``: the image (CT: int16 HU; MR: float32) and a uint8 label map
        with :data:`LABELS` ids, named ``s{subject:03d}_{modality}`` / ``..._label``, with the
        modality ('CT' / 'MR') set.
    """
    key = str(modality).strip().lower()
    if key not in PROTOCOLS:
        raise InputError(f"phantom modality '{modality}': unknown; expected one of {', '.join(PROTOCOLS)}")
    if int(subject) < 0:
        raise InputError(f"phantom subject {subject}: expected a number >= 0")
    anatomy = make_anatomy(subject, seed, variability)
    rng = np.random.default_rng([int(seed), int(subject), 1 if key == "ct" else 2])
    grid, placement = scan_geometry(anatomy, key, rng)
    protocol = PROTOCOLS[key]
    n_sub = protocol.subslices
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2.0) / n_sub
    image = np.zeros(grid.shape, np.float32)
    label = np.zeros(grid.shape, np.uint8)
    for n, offset in enumerate(offsets):
        sampler = _Sampler(grid, placement, float(offset))
        tissue, lab, texture = sample_anatomy(anatomy, sampler)
        image += _render(tissue, texture, anatomy, key)
        if n == n_sub // 2:
            label = lab
    image /= n_sub
    # in-plane point spread, then noise
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0.0), mode="nearest")
    if key == "ct":
        image += rng.normal(0.0, 12.0, image.shape).astype(np.float32)
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        image *= _bias_field(grid, placement, rng)
        sigma = 18.0
        real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
        image = np.sqrt(real * real + imag * imag).astype(np.float32)
    name = f"s{int(subject):03d}_{key}"
    modality_name = MODALITY_NAMES[key]
    return (
        Volume(image, grid, is_label=False, name=name, modality=modality_name),
        Volume(label, grid, is_label=True, name=f"{name}_label", modality=modality_name),
    )


def _bias_field(grid: Grid, placement: ScanPlacement, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative MR bias field on ``grid`` (roughly 0.8-1.2)."""
    field = SineField.random(rng, 6, (250.0, 500.0), 0.1)
    sampler = _Sampler(grid, placement, lattice_mm=30.0)
    return np.exp(sampler.field(field)[0])


# ------------------------------------------------------------------------------------------
# cohorts on disk
# ------------------------------------------------------------------------------------------
def parse_modalities(modalities: str | Iterable[str]) -> tuple[str, ...]:
    """'ct,mr' or an iterable -> validated lower-case names (order kept, duplicates dropped)."""
    items = modalities.split(",") if isinstance(modalities, str) else list(modalities)
    out: list[str] = []
    for item in items:
        key = str(item).strip().lower()
        if not key:
            continue
        if key not in PROTOCOLS:
            raise InputError(f"phantom modality '{item}': unknown; expected a comma-separated list of {', '.join(PROTOCOLS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise InputError(f"phantom modalities '{modalities}': none given; expected e.g. 'ct,mr'")
    return tuple(out)


def cohort_name(seed: int = 0, variability: float = 1.0) -> str:
    """The manifest's ``dataset`` name of a cohort: ``phantoms`` for the defaults, else with the
    seed and variability that made it (``phantoms-seed3-var2.5``)."""
    name = "phantoms"
    if int(seed) != 0:
        name += f"-seed{int(seed)}"
    if float(variability) != 1.0:
        name += f"-var{float(variability):g}"
    return name


def write_cohort(out_dir: str | os.PathLike, subjects: int, modalities: str | Iterable[str] = ("ct", "mr"),
                 seed: int = 0, progress=None, variability: float = 1.0) -> Path:
    """Write ``subjects`` phantoms per modality as NIfTI plus ``out_dir/manifest.json``.

    Files: ``s{NNN}_{modality}.nii.gz`` (image) and ``s{NNN}_{modality}_label.nii.gz``; each is
    written atomically, the manifest last (:mod:`spasem.data.manifest` format: per case id, image,
    label, modality 'CT'/'MR', subject; ``label_names`` = :data:`LABELS`; ``dataset`` =
    :func:`cohort_name`).

    :returns: the manifest's path.
    """
    from spasem.core.io import save
    from spasem.data.manifest import Case, Manifest, write_manifest

    if int(subjects) < 1:
        raise InputError(f"phantom subjects {subjects}: expected at least 1")
    keys = parse_modalities(modalities)
    variability = check_variability(variability)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"phantom output '{out}': exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    jobs = [(s, m) for s in range(int(subjects)) for m in keys]
    iterator = progress.iterate(jobs, "phantoms", total=len(jobs)) if progress is not None else jobs
    for subject, key in iterator:
        image, label = generate_case(subject, key, seed, variability)
        image_file, label_file = f"{image.name}.nii.gz", f"{image.name}_label.nii.gz"
        save(image, out / image_file)
        save(label, out / label_file)
        cases.append(Case(id=image.name, image=image_file, label=label_file, modality=MODALITY_NAMES[key],
                          subject=f"s{subject:03d}"))
    manifest = Manifest(dataset=cohort_name(seed, variability), label_names=dict(LABELS), cases=cases)
    return write_manifest(manifest, out / "manifest.json")


__all__ = ["LABELS", "MAX_VARIABILITY", "PROTOCOLS", "check_variability", "cohort_name", "generate_case", "make_anatomy", "parse_modalities", "sample_anatomy", "write_cohort"]
