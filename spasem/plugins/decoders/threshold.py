"""``threshold``: the simplest weight-free decoder. The fused logits are the segmentation logits
(inside where > 0); optional clean-up of the final mask: largest connected component, hole filling."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from spasem.core.backends import Decoder, Features
from spasem.core.volume import Volume
from spasem.hookspecs import hookimpl


class CleanupConfig(BaseModel):
    """Options of the final mask's clean-up (:func:`clean_mask`), shared by the weight-free decoders."""

    model_config = ConfigDict(extra="forbid")
    largest_component: bool = Field(False, description="keep only the largest 26-connected component")
    fill_holes: bool = Field(False, description="fill enclosed holes (3D)")


class ThresholdDecoder(Decoder):
    """Fused logits are the output; optional largest-component and hole-filling clean-up."""

    name = "threshold"
    description = "weight-free: fused logits > 0, optional largest component / hole filling"

    Config = CleanupConfig

    def decode(self, fused_logits: Volume, query_features: Features, query_image: Volume) -> Volume:
        return fused_logits

    def postprocess(self, mask: Volume) -> Volume:
        return clean_mask(mask, self.config.largest_component, self.config.fill_holes)


def clean_mask(mask: Volume, largest_component: bool, fill_holes: bool) -> Volume:
    """``mask`` (non-zero = inside) as uint8 0/1, optionally reduced to its largest 26-connected
    component and with enclosed 3D holes filled."""
    arr = mask.array > 0
    if largest_component and arr.any():
        labels, n = ndimage.label(arr, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            arr = labels == (int(np.argmax(sizes)) + 1)
    if fill_holes:
        arr = ndimage.binary_fill_holes(arr)
    return mask.with_array(arr.astype(np.uint8))


@hookimpl
def spasem_register_decoders(register):
    register(ThresholdDecoder)
