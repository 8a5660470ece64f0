"""Simple registration backends: ``identity`` and ``centers`` (translation only).

They need no optimisation and serve as baselines and for scans already in one frame.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import RegistrationBackend, SitkTransform, Transform
from spasem.core.volume import Volume
from spasem.hookspecs import hookimpl


class IdentityRegistration(RegistrationBackend):
    """Physical-space identity: support and query already share one patient frame."""

    name = "identity"
    description = "no alignment: support and query are already in the same physical frame"

    def register(self, support: Volume, query: Volume) -> Transform:
        return SitkTransform(sitk.TranslationTransform(3))


def _body_centroid(volume: Volume) -> np.ndarray:
    """LPS centroid (mm) of the largest bright connected region (Otsu threshold), i.e. the body."""
    from scipy import ndimage

    arr = volume.array.astype(np.float32)
    lo, hi = np.percentile(arr, [1, 99.5])
    clipped = np.clip(arr, lo, hi)
    threshold = sitk.OtsuThresholdImageFilter()
    threshold.SetInsideValue(0)
    threshold.SetOutsideValue(1)
    threshold.Execute(sitk.GetImageFromArray(clipped))
    body = clipped > threshold.GetThreshold()
    labels, n = ndimage.label(body)
    if n == 0:
        return volume.grid.index_to_physical((np.asarray(volume.shape) - 1) / 2)
    sizes = ndimage.sum(body, labels, index=np.arange(1, n + 1))
    centroid_index = np.asarray(ndimage.center_of_mass(labels == (int(np.argmax(sizes)) + 1)))
    return volume.grid.index_to_physical(centroid_index)


class CentersRegistration(RegistrationBackend):
    """Translation that superimposes the centres of the two scans."""

    name = "centers"
    description = "translation aligning the field-of-view centres (or body centroids) of support and query"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["fov", "body"] = Field(
            "body", description="'fov': centres of the fields of view; 'body': centroids of the body (Otsu foreground)"
        )

    def register(self, support: Volume, query: Volume) -> Transform:
        if self.config.mode == "fov":
            c_support = support.grid.corners().mean(axis=0)
            c_query = query.grid.corners().mean(axis=0)
        else:
            c_support = _body_centroid(support)
            c_query = _body_centroid(query)
        # T(x_query) = x_query + (c_support - c_query)
        return SitkTransform(sitk.TranslationTransform(3, tuple(float(v) for v in c_support - c_query)))


@hookimpl
def spasem_register_registrations(register):
    register(IdentityRegistration)
    register(CentersRegistration)
