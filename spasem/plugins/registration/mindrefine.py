"""Deformable refinement of a registration by MIND-SSC matching (weight-free, torch).

After the whole-scan registration the support still sits a few millimetres to a couple of
centimetres off the query, organ by organ (organs slide against each other; a 60 mm B-spline
cannot follow). This refinement estimates a dense residual displacement ``u`` on the coarse
query grid (3 mm voxels, cropped to the query's body inside the support's field of view) such
that the support, already warped by the whole-scan transform ``T``, matches the query at
``x + u(x)``:

1. MIND-SSC descriptors of both images (:func:`spasem.plugins.encoders.mind.mind_ssc`, at the
   neighbour distances ``dilations``): modality independent, so CT and MR compare by squared
   differences;
2. a discrete search per level (``levels``, coarse to fine, each ``(pooling, radius)``): the
   descriptors are block-averaged by ``pooling``, every integer displacement within ``+-radius``
   pooled voxels is scored by the mean squared descriptor difference averaged over a
   ``patch``^3 neighbourhood, and the best displacement per voxel is chosen with a growing pull
   towards the Gaussian-smoothed field of the previous choice (``penalties``; a coupled, convex
   regularisation), then the field is smoothed. Levels compose: each searches around the
   previous levels' result;
3. a few Adam steps (``iterations``) on a half-resolution control field minimising the
   descriptor differences inside the body plus ``smoothness`` times the squared field gradients.

The refined transform is ``T(x + u(x))``. Displacements ``u`` are in voxels of the coarse grid,
array axis order ``(z, y, x)``; :func:`displacement_transform` turns them into a physical
(LPS, mm) SimpleITK displacement field.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.priors import gaussian_smooth
from spasem.plugins.encoders.mind import block_average, mind_ssc


class MindRefineOptions(BaseModel):
    """Options of the MIND refinement (``registration.options.refine_*``)."""

    model_config = ConfigDict(extra="forbid")
    levels: tuple[tuple[int, int], ...] = Field(
        ((4, 2), (2, 2), (1, 2)), description="discrete search levels, coarse to fine: (pooling, radius in pooled voxels)")
    patch: int = Field(3, ge=1, le=9, description="side (voxels) of the neighbourhood a displacement's cost is averaged over")
    penalties: tuple[float, ...] = Field(
        (0.001, 0.003, 0.01), description="growing pulls towards the smoothed field in the discrete search")
    field_sigma: float = Field(1.0, ge=0, description="Gaussian sigma (voxels) smoothing the discrete field")
    iterations: int = Field(20, ge=0, description="Adam steps of the continuous refinement (0 = discrete search only)")
    learning_rate: float = Field(0.2, gt=0, description="Adam step (voxels)")
    smoothness: float = Field(1.0, ge=0, description="weight of the squared field gradients in the continuous refinement")
    dilations: tuple[int, ...] = Field((1, 2), min_length=1, description="MIND-SSC neighbour distances (voxels)")
    presmooth: float = Field(0.5, ge=0, description="Gaussian sigma (voxels) applied to the images before MIND")


def mind_features(image: np.ndarray | torch.Tensor, options: MindRefineOptions) -> torch.Tensor:
    """MIND-SSC ``[12 * len(dilations), D, H, W]`` of a ``[D, H, W]`` image."""
    x = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
    if options.presmooth > 0:
        x = gaussian_smooth(x, options.presmooth)
    return torch.cat([mind_ssc(x, d) for d in options.dilations])


def _identity(shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))


def warp_features(features: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``out[:, p] = features[:, p + displacement[:, p]]`` (trilinear, border values outside).

    :param features: ``[C, D, H, W]``.
    :param displacement: ``[3, D, H, W]`` in voxels, axis order ``(z, y, x)``.
    """
    shape = tuple(features.shape[1:])
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape]).view(3, 1, 1, 1)
    position = (_identity(shape) + displacement) * scale - 1.0
    grid = position.permute(1, 2, 3, 0).flip(-1)[None]  # grid_sample wants (x, y, z)
    return F.grid_sample(features[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _smooth_field(field: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.stack([gaussian_smooth(c, sigma) for c in field]) if sigma > 0 else field


def discrete_search(fixed: torch.Tensor, moving: torch.Tensor, radius: int, options: MindRefineOptions) -> torch.Tensor:
    """Best integer displacement ``[3, D, H, W]`` (voxels) of ``moving`` onto ``fixed`` (both
    ``[C, D, H, W]`` descriptors) within ``+-radius``, with the coupled smoothness of the module
    docstring. Outside the volume the moving descriptors repeat their border."""
    _, d, h, w = fixed.shape
    padded = F.pad(moving[None], (radius,) * 6, mode="replicate")[0]
    span = range(-radius, radius + 1)
    offsets = torch.tensor([(a, b, c) for a in span for b in span for c in span], dtype=torch.float32)
    cost = torch.empty(len(offsets), d, h, w)
    for n, (a, b, c) in enumerate(offsets.long().tolist()):
        shifted = padded[:, radius + a : radius + a + d, radius + b : radius + b + h, radius + c : radius + c + w]
        cost[n] = ((shifted - fixed) ** 2).mean(0)
    if options.patch > 1:
        low, high = (options.patch - 1) // 2, options.patch // 2
        padded_cost = F.pad(cost[None], (low, high) * 3, mode="replicate")  # edges repeat: any size works
        cost = F.avg_pool3d(padded_cost, options.patch, stride=1)[0]
    field = offsets[cost.argmin(0)].permute(3, 0, 1, 2)
    for penalty in options.penalties:
        smooth = _smooth_field(field, options.field_sigma)
        pull = ((offsets.view(-1, 3, 1, 1, 1) - smooth[None]) ** 2).sum(1)
        field = offsets[(cost + penalty * pull).argmin(0)].permute(3, 0, 1, 2)
    return _smooth_field(field, options.field_sigma)


def refine_displacement(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray | None,
                        options: MindRefineOptions) -> np.ndarray:
    """Residual displacement ``[3, D, H, W]`` (voxels, ``(z, y, x)``) aligning ``moving`` (already
    on ``fixed``'s grid) to ``fixed``; both ``[D, H, W]``. ``mask`` (``[D, H, W]`` bool, the query
    body) restricts the work to its bounding box and the continuous cost to its voxels; the field
    is zero outside that box."""
    fixed = np.asarray(fixed, dtype=np.float32)
    shape = fixed.shape
    displacement = np.zeros((3, *shape), np.float32)
    if mask is None:
        mask = np.ones(shape, bool)
    if not mask.any():
        return displacement
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    fixed_f = mind_features(fixed[box], options)
    moving_f = mind_features(np.asarray(moving, dtype=np.float32)[box], options)
    inside = torch.from_numpy(np.ascontiguousarray(mask[box])).float()
    size = tuple(fixed_f.shape[1:])
    field = torch.zeros(3, *size)
    with torch.no_grad():
        for pooling, radius in options.levels:
            warped = warp_features(moving_f, field)
            pooled_fixed, pooled_warped = block_average(fixed_f, pooling), block_average(warped, pooling)
            step = discrete_search(pooled_fixed, pooled_warped, radius, options) * pooling
            if pooling > 1:
                step = F.interpolate(step[None], size=size, mode="trilinear", align_corners=False)[0]
            field = step + warp_features(field, step)  # u(x) = du(x) + u(x + du(x))
    if options.iterations > 0 and inside.sum() > 0:
        coarse = tuple(max(2, n // 2) for n in size)
        control = F.interpolate(field[None], size=coarse, mode="trilinear", align_corners=True).requires_grad_(True)
        optimiser = torch.optim.Adam([control], lr=options.learning_rate)
        for _ in range(options.iterations):
            dense = F.interpolate(control, size=size, mode="trilinear", align_corners=True)[0]
            mismatch = ((warp_features(moving_f, dense) - fixed_f) ** 2).sum(0)
            loss = (mismatch * inside).sum() / inside.sum()
            loss = loss + options.smoothness * sum((torch.diff(control, dim=k) ** 2).mean() for k in (2, 3, 4)) / 4.0
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            field = F.interpolate(control, size=size, mode="trilinear", align_corners=True)[0]
    displacement[(slice(None), *box)] = field.detach().numpy()
    return displacement


def displacement_transform(displacement: np.ndarray, reference: sitk.Image) -> sitk.DisplacementFieldTransform:
    """``[3, D, H, W]`` voxel displacements (``(z, y, x)``) on ``reference``'s grid as a physical
    (mm, in ``reference``'s LPS frame) displacement field transform ``x -> x + u(x)``."""
    spacing = np.asarray(reference.GetSpacing())
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    index_mm = np.moveaxis(displacement[::-1], 0, -1) * spacing  # [D, H, W, (i, j, k)] mm along the index axes
    physical = index_mm @ direction.T
    image = sitk.GetImageFromArray(np.ascontiguousarray(physical, dtype=np.float64), isVector=True)
    image.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(image)
