"""A tiny synthetic cohort in the manifest format of ``spasem phantoms`` (for evaluation tests):
per subject and modality one NIfTI image with a body ellipsoid and four organ ellipsoids
(liver 1, spleen 2, left kidney 3, right kidney 4) and its label map."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spasem.core.io import save
from spasem.core.volume import Volume
from spasem.data.manifest import Case, Manifest, write_manifest

LABELS = {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4}
#: organ: (offset from the body centre in voxels along i, j, k; semi-axes in voxels)
ORGAN_SHAPES = {
    "liver": ((-6, 0, 1), (8, 7, 6)),
    "spleen": ((8, 4, 1), (4, 4, 5)),
    "left_kidney": ((7, -6, -4), (3, 3, 4)),
    "right_kidney": ((-8, -6, -4), (3, 3, 4)),
}
CONTRAST = {"ct": {"body": 40.0, "liver": 80.0, "spleen": 60.0, "left_kidney": 150.0, "right_kidney": 150.0},
            "mr": {"body": 300.0, "liver": 150.0, "spleen": 450.0, "left_kidney": 400.0, "right_kidney": 400.0}}


def make_case(subject: int, modality: str, seed: int = 0, shape=(40, 40, 28), spacing=(3.0, 3.0, 3.5),
              drop: Sequence[str] = ()) -> tuple[Volume, Volume]:
    """Image and label volumes of one synthetic subject (LPS identity direction)."""
    rng = np.random.default_rng([seed, subject, 0 if modality == "ct" else 1])
    anatomy = np.random.default_rng([seed, subject])  # shared by a subject's CT and MR
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = np.asarray(shape, dtype=np.float32) / 2 + anatomy.normal(0, 1.0, 3)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    body = ((ii - centre[0]) / 17) ** 2 + ((jj - centre[1]) / 14) ** 2 + ((kk - centre[2]) / 12) ** 2 < 1
    image[body] = CONTRAST[modality]["body"]
    for organ, (offset, axes) in ORGAN_SHAPES.items():
        if organ in drop:
            continue
        c = centre + np.asarray(offset) + anatomy.normal(0, 0.6, 3)
        r = np.asarray(axes) * anatomy.uniform(0.9, 1.1, 3)
        inside = ((ii - c[0]) / r[0]) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((kk - c[2]) / r[2]) ** 2 < 1
        label[inside] = LABELS[organ]
        image[inside] = CONTRAST[modality][organ]
    image += rng.normal(0, 5.0, shape).astype(np.float32)
    origin = (-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, -shape[2] * spacing[2] / 2)
    return (Volume.from_array(image, spacing=spacing, origin=origin),
            Volume.from_array(label, spacing=spacing, origin=origin, is_label=True))


def write_cohort(folder: Path, subjects: int = 3, modalities: Sequence[str] = ("ct", "mr"), seed: int = 0,
                 drop: dict[str, Sequence[str]] | None = None, shift_mm: dict[str, Sequence[float]] | None = None) -> Path:
    """Write the cohort and its ``manifest.json`` under ``folder``; ``drop``: case id -> organs left
    out; ``shift_mm``: case id -> translation of its origin (image and label alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for s in range(subjects):
        for modality in modalities:
            case_id = f"s{s:03d}_{modality}"
            image, label = make_case(s, modality, seed, drop=(drop or {}).get(case_id, ()))
            if shift_mm and case_id in shift_mm:
                origin = image.origin + np.asarray(shift_mm[case_id], dtype=float)
                image = Volume.from_array(image.array, spacing=image.spacing, origin=origin)
                label = Volume.from_array(label.array, spacing=label.spacing, origin=origin, is_label=True)
            save(image, folder / f"{case_id}.nii.gz")
            save(label, folder / f"{case_id}_label.nii.gz")
            cases.append(Case(id=case_id, image=f"{case_id}.nii.gz", label=f"{case_id}_label.nii.gz",
                              modality=modality.upper(), subject=f"s{s:03d}"))
    manifest = Manifest(dataset="synthetic", label_names=dict(LABELS), cases=cases)
    return write_manifest(manifest, folder / "manifest.json")
