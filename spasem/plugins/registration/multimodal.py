"""Multimodal intensity-based registration: ``sitk`` (SimpleITK) and ``ants`` (ANTsPy SyN).

Both register the support (moving) to the query (fixed) on coarse copies of the scans and return
a physical-space transform mapping query points to support points.

Preparation (:func:`prepare_for_registration`), shared by both backends:

1. block-average (``BinShrink``) towards the registration spacing, then resample linearly onto
   the canonical RAS grid at ``spacing_mm`` (3 mm) covering the scan;
2. intensities to [0, 1]: CT clipped to a soft-tissue window (``ct_window``, HU), MR (and
   unknown modalities) clipped to its 0.5-99.5 percentiles inside the body, so air is 0 in
   both and MI sees comparable dynamic ranges;
3. a body mask (threshold, largest component, holes filled, dilated) used for the
   initialisation and to restrict the metric to the query's body.

``sitk``: body-centroid initialisation, an exhaustive search of the cranio-caudal
translation (partial fields of view make centroids unreliable along z: the range grows with the
difference of the two bodies' heights, and only shifts that keep them overlapping compete),
affine with Mattes mutual information (multi-resolution), then a cubic B-spline (control
points every ``bspline_spacing_mm``) with Mattes MI and L-BFGS, multi-resolution. The result,
``affine(bspline(x))``, is sampled as a displacement field on the coarse query grid (fast to apply).

``ants``: ``antsRegistration`` through ANTsPy (``SyN``/``SyNRA``/``antsRegistrationSyNQuick[s]``,
Mattes MI for both the affine and the deformable stage); the forward warp field and affine are
read back as SimpleITK transforms, so the result is again a :class:`SitkTransform`.

Both then refine the whole-scan transform with a dense residual displacement found by MIND-SSC
matching (``refine="mind"``, :mod:`spasem.plugins.registration.mindrefine`): organs move
independently of each other by millimetres to centimetres, which neither a 60 mm B-spline nor
a whole-scan SyN at 3 mm follows. The residual is estimated only inside the query's body where
the support's field of view reaches (zero elsewhere: nothing to match). The refined transform is
again a displacement field on the coarse query grid.

Both memoise the last results per (support, query) content, so segmenting several organs of one
pair registers once.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import RegistrationBackend, SitkTransform, Transform
from spasem.core.cache import make_key, volume_digest
from spasem.core.io import to_sitk
from spasem.core.volume import Volume
from spasem.errors import ConfigError, PipelineError
from spasem.hookspecs import hookimpl
from spasem.plugins.registration.mindrefine import MindRefineOptions, displacement_transform, refine_displacement


# ------------------------------------------------------------------------------------------
# shared preparation
# ------------------------------------------------------------------------------------------
def guess_modality(volume: Volume) -> str:
    """'CT' or 'MR': the volume's own modality if set, else CT when the intensities look like
    Hounsfield units (1st percentile below -500 and maximum above 0)."""
    if volume.modality in ("CT", "MR"):
        return volume.modality
    sample = np.asarray(volume.array).ravel()[:: max(1, volume.array.size // 200_000)].astype(np.float32)
    return "CT" if np.percentile(sample, 1) < -500 and sample.max() > 0 else "MR"


@dataclass
class PreparedImage:
    """A scan ready for registration: [0, 1] intensities and a body mask on a coarse canonical grid."""

    image: sitk.Image
    body: sitk.Image
    modality: str


def _largest_component_filled(binary: sitk.Image) -> sitk.Image:
    components = sitk.ConnectedComponent(binary)
    relabelled = sitk.RelabelComponent(components, sortByObjectSize=True)
    largest = relabelled == 1
    return sitk.BinaryFillhole(largest)


def prepare_for_registration(volume: Volume, spacing_mm: float, ct_window: tuple[float, float]) -> PreparedImage:
    """Coarse canonical copy of ``volume`` with [0, 1] intensities, and its body mask."""
    modality = guess_modality(volume)
    image = to_sitk(volume.with_array(np.asarray(volume.array, dtype=np.float32)))
    factors = [max(1, int(math.floor(spacing_mm / s + 1e-6))) for s in volume.spacing]
    if any(f > 1 for f in factors):
        image = sitk.BinShrink(image, factors)
    grid = volume.grid.canonical(spacing_mm)
    reference = sitk.Image([int(s) for s in grid.shape], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in grid.spacing])
    reference.SetOrigin([float(o) for o in grid.origin])
    reference.SetDirection([float(d) for d in grid.direction.ravel()])
    background = float(np.min(volume.array))
    image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    if modality == "CT":
        lo, hi = ct_window
        body_arr = arr > -500.0
    else:
        # Otsu on log intensities separates air (noise) from tissue whatever the tissue contrast
        log_image = sitk.Log(sitk.Clamp(image, lowerBound=0.0) + 1.0)
        threshold = sitk.OtsuThresholdImageFilter()
        threshold.SetInsideValue(0)
        threshold.SetOutsideValue(1)
        threshold.Execute(log_image)
        body_arr = arr > math.expm1(threshold.GetThreshold())
    body = sitk.GetImageFromArray(body_arr.astype(np.uint8))
    body.CopyInformation(image)
    body = sitk.BinaryMorphologicalOpening(body, [1, 1, 1])
    body = _largest_component_filled(body) if sitk.GetArrayViewFromImage(body).any() else body
    if modality != "CT":
        inside = arr[sitk.GetArrayViewFromImage(body) > 0]
        inside = inside if inside.size > 100 else arr.ravel()
        lo, hi = (float(v) for v in np.percentile(inside, [0.5, 99.5]))
        lo = min(lo, float(np.percentile(arr, 1.0)))
    scaled = np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    out = sitk.GetImageFromArray(scaled)
    out.CopyInformation(image)
    return PreparedImage(out, body, modality)


def as_displacement_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Transform:
    """``transform`` sampled as a dense displacement field on ``reference``'s grid (the coarse query
    grid), which is much faster to apply than a B-spline composite. Outside that grid the
    displacement is zero (the field covers the query's whole field of view)."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(to_field.Execute(transform))


def _body_centroid(prepared: PreparedImage) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(prepared.body)
    if not stats.HasLabel(1):
        size = np.asarray(prepared.image.GetSize(), dtype=np.float64)
        return np.asarray(prepared.image.TransformContinuousIndexToPhysicalPoint(list((size - 1) / 2)))
    return np.asarray(stats.GetCentroid(1))


#: value of the support outside its field of view in the z search (prepared images are in [0, 1])
OUTSIDE_FOV = -0.25


def mutual_information(fixed: np.ndarray, moving: np.ndarray, bins: int) -> float:
    """Mutual information (nats) of paired samples: ``fixed`` in [0, 1] in ``bins`` bins, ``moving``
    in [0, 1] in ``bins`` bins plus one bin for values below ``OUTSIDE_FOV / 2`` (outside the
    support's field of view). Both 1-D, the same length."""
    f = np.clip((np.asarray(fixed) * bins).astype(np.int64), 0, bins - 1)
    m = np.asarray(moving)
    m = np.where(m < OUTSIDE_FOV / 2, bins, np.clip((m * bins).astype(np.int64), 0, bins - 1))
    joint = np.bincount(f * (bins + 1) + m, minlength=bins * (bins + 1)).reshape(bins, bins + 1).astype(np.float64)
    joint /= max(joint.sum(), 1.0)
    pf, pm = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pf @ pm)[nz])).sum())


def _body_z_range(prepared: PreparedImage) -> tuple[float, float]:
    """Lowest and highest LPS z (mm, voxel edges) of the body mask (the whole field of view if it
    is empty); the prepared grid is canonical RAS, so its third index axis is +z."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(prepared.body)
    if stats.HasLabel(1):
        box = stats.GetBoundingBox(1)  # (x, y, z starts, then x, y, z sizes)
        first, count = box[2], box[5]
    else:
        first, count = 0, prepared.image.GetSize()[2]
    spacing, origin = prepared.image.GetSpacing()[2], prepared.image.GetOrigin()[2]
    return origin + (first - 0.5) * spacing, origin + (first + count - 0.5) * spacing


class _Memo:
    """A small LRU of registration results keyed by (support, query, options) content."""

    def __init__(self, size: int = 8):
        self.size = size
        self.items: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key: str, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class _FocusConfig(BaseModel):
    """Options shared by the multimodal backends (mixed into their ``Config``)."""

    model_config = ConfigDict(extra="forbid")
    spacing_mm: float = Field(3.0, gt=0, le=20, description="isotropic spacing the registration runs at (mm)")
    ct_window: tuple[float, float] = Field((-160.0, 240.0), description="CT intensities clipped to this HU window")
    histogram_bins: int = Field(32, ge=8, le=256, description="Mattes MI histogram bins")
    focus_margin_mm: float | None = Field(
        None, gt=0, description="after the whole-scan registration, refine with an affine transform by Mattes MI "
        "restricted to the support structure's neighbourhood (its warped mask grown by this margin); None = off")
    focus_transform: Literal["translation", "rigid", "similarity", "scale_versor", "affine"] = Field(
        "rigid", description="transform of the structure-focused refinement")
    focus_iterations: int = Field(100, ge=1, description="iterations per level of the structure-focused affine")
    memoize: bool = Field(True, description="reuse the whole-scan transform for a (support, query) pair seen recently")
    deterministic: bool = Field(
        True, description="run the SimpleITK optimisations (affine, B-spline, focus) on one thread, so that the same "
        "inputs give the same transform (on several threads ITK sums the metric in an order that varies from run to "
        "run, and the optimisation drifts: up to 0.1 Dice on a kidney between two runs); False: all threads, faster")
    refine: Literal["mind", "none"] = Field(
        "mind", description="after the whole-scan registration, a dense residual displacement by MIND-SSC matching "
        "(discrete search + Adam, spasem.plugins.registration.mindrefine); 'none' = off")
    refine_options: MindRefineOptions = Field(default_factory=MindRefineOptions, description="options of the MIND refinement")


@dataclass
class _GlobalResult:
    transform: sitk.Transform
    fixed: PreparedImage
    moving: PreparedImage


class _MultimodalRegistration(RegistrationBackend):
    """Whole-scan registration (memoised per pair) + optional structure-focused affine refinement."""

    @property
    def uses_support_mask(self) -> bool:  # type: ignore[override]
        """Only the structure-focused refinement reads the support mask."""
        return self.config.focus_margin_mm is not None

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self._memo = _Memo()

    def register(self, support: Volume, query: Volume, support_mask: Volume | None = None) -> Transform:
        """Query -> support transform; with ``support_mask`` (and ``focus_margin_mm`` set) refined
        around that structure."""
        key = make_key(self.name, volume_digest(support), volume_digest(query), self.config.model_dump(mode="json"),
                       self.context.seed)
        result = self._memo.get(key) if self.config.memoize else None
        if result is None:
            cfg = self.config
            fixed = prepare_for_registration(query, cfg.spacing_mm, cfg.ct_window)
            moving = prepare_for_registration(support, cfg.spacing_mm, cfg.ct_window)
            with self._itk_threads():
                transform = self._register_prepared(fixed, moving)
            if cfg.refine == "mind":
                transform = self._refine(transform, fixed, moving)
            result = _GlobalResult(transform, fixed, moving)
            if self.config.memoize:
                self._memo.put(key, result)
        transform = result.transform
        if support_mask is not None and self.config.focus_margin_mm is not None:
            with self._itk_threads():
                transform = self._focus(result, support_mask)
        return SitkTransform(transform)

    @contextlib.contextmanager
    def _itk_threads(self):
        """With ``deterministic``, SimpleITK's global default number of threads is 1 inside (and
        restored after): on several threads ITK's registration sums its metric in an order that
        varies between runs. Not safe while other threads run SimpleITK filters."""
        if not self.config.deterministic:
            yield
            return
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)

    def _register_prepared(self, fixed: PreparedImage, moving: PreparedImage) -> sitk.Transform:  # pragma: no cover
        raise NotImplementedError

    def _refine(self, transform: sitk.Transform, fixed: PreparedImage, moving: PreparedImage) -> sitk.Transform:
        """``transform(x + u(x))`` with ``u`` the MIND refinement's residual field on the coarse query grid.

        ``u`` is estimated where both scans have data: the query's body (dilated) inside the
        support's field of view as ``transform`` maps it. Elsewhere there is nothing to match
        (a partial field of view, a whole-body query) and ``u`` stays zero; on a large query this
        also bounds the work by the support's field of view."""
        warped = sitk.Resample(moving.image, fixed.image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        body = sitk.GetArrayFromImage(sitk.BinaryDilate(fixed.body, [2, 2, 2])) > 0
        support_fov = sitk.Image(moving.image.GetSize(), sitk.sitkUInt8) + 1
        support_fov.CopyInformation(moving.image)
        covered = sitk.Resample(support_fov, fixed.image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        residual = refine_displacement(sitk.GetArrayFromImage(fixed.image), sitk.GetArrayFromImage(warped),
                                       body & (sitk.GetArrayFromImage(covered) > 0), self.config.refine_options)
        return as_displacement_field(
            sitk.CompositeTransform([transform, displacement_transform(residual, fixed.image)]), fixed.image)

    def _method(self, metric_mask: sitk.Image | None, sampling: float | None = None) -> sitk.ImageRegistrationMethod:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=self.config.histogram_bins)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(sampling or getattr(self.config, "sampling_fraction", 0.2), int(self.context.seed) + 1)
        if metric_mask is not None:
            method.SetMetricFixedMask(metric_mask)
        method.SetInterpolator(sitk.sitkLinear)
        return method

    def _execute(self, method: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image, stage: str) -> None:
        try:
            method.Execute(fixed, moving)
        except RuntimeError as exc:
            raise PipelineError(
                f"registration '{self.name}' failed in its {stage} stage ({str(exc).strip().splitlines()[-1][:200]}); "
                "the support and query may not overlap after initialisation"
            ) from None

    def _focus(self, result: _GlobalResult, support_mask: Volume) -> sitk.Transform:
        """``global(local(x))`` with ``local`` an affine transform found by Mattes MI in the
        neighbourhood of the structure (its warped mask grown by ``focus_margin_mm``)."""
        cfg = self.config
        mask = to_sitk(support_mask.with_array((np.asarray(support_mask.array) > 0).astype(np.uint8)))
        moving_mask = sitk.Resample(mask, result.moving.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        fixed_mask = sitk.Resample(mask, result.fixed.image, result.transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        if not sitk.GetArrayViewFromImage(fixed_mask).any():
            return result.transform
        radius = max(1, int(round(cfg.focus_margin_mm / cfg.spacing_mm)))
        region = sitk.BinaryDilate(fixed_mask, [radius] * 3)
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(region)
        box = stats.GetBoundingBox(1)
        fixed_crop = sitk.RegionOfInterest(result.fixed.image, box[3:], box[:3])
        region_crop = sitk.RegionOfInterest(region, box[3:], box[:3])
        stats.Execute(fixed_mask)
        local = {"translation": lambda: sitk.TranslationTransform(3), "rigid": sitk.Euler3DTransform,
                 "similarity": sitk.Similarity3DTransform, "scale_versor": sitk.ScaleVersor3DTransform,
                 "affine": sitk.AffineTransform}[cfg.focus_transform]()
        if cfg.focus_transform != "translation":
            local.SetCenter(stats.GetCentroid(1))
        method = self._method(region_crop, sampling=0.5)
        method.SetMetricMovingMask(sitk.BinaryDilate(moving_mask, [radius + 2] * 3))
        method.SetMovingInitialTransform(result.transform)
        method.SetInitialTransform(local, inPlace=True)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-3, numberOfIterations=cfg.focus_iterations, relaxationFactor=0.6,
            gradientMagnitudeTolerance=1e-6,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([cfg.spacing_mm, 0.0])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        self._execute(method, fixed_crop, result.moving.image, "structure-focused affine")
        return sitk.CompositeTransform([result.transform, local])


# ------------------------------------------------------------------------------------------
# SimpleITK
# ------------------------------------------------------------------------------------------
class SitkRegistration(_MultimodalRegistration):
    """Affine + B-spline registration with Mattes mutual information (SimpleITK), then the MIND refinement."""

    name = "sitk"
    description = ("multimodal: body-centroid init + z search, affine and B-spline with Mattes MI (SimpleITK), "
                   "MIND-SSC deformable refinement, optional structure-focused affine")

    class Config(_FocusConfig):
        z_search_mm: float = Field(40.0, ge=0, description="exhaustive cranio-caudal translation search range (+- mm); 0 = off")
        z_search_fov: bool = Field(
            True, description="widen the z search by half the difference of the two bodies' cranio-caudal extents "
            "(a partial field of view moves the body centroid by up to that)")
        z_search_min_overlap: float = Field(
            0.6, ge=0, le=1, description="least cranio-caudal overlap of the two bodies, as a fraction of the shorter "
            "one, for a shift of the z search to compete")
        z_search_step_mm: float = Field(5.0, gt=0, description="step of the z search (mm)")
        z_search_shrink: int = Field(1, ge=1, le=4, description="the z search scores at spacing_mm * z_search_shrink")
        sampling_fraction: float = Field(0.2, gt=0, le=1, description="fraction of query-body voxels sampled by the metric")
        affine_iterations: int = Field(100, ge=0, description="iterations per level of the affine stage (0 = skip)")
        affine_optimizer: Literal["rsgd", "gd"] = Field("rsgd", description="regular-step or plain gradient descent (learning rate estimated)")
        affine_shrink: tuple[int, ...] = Field((4, 2, 1), description="shrink factors of the affine levels")
        deformable: Literal["bspline", "none"] = Field("bspline", description="deformable stage")
        bspline_spacing_mm: float = Field(60.0, gt=5, description="B-spline control point spacing at the finest level (mm)")
        bspline_iterations: int = Field(30, ge=1, description="L-BFGS-B iterations of the B-spline stage")
        bspline_shrink: int = Field(2, ge=1, le=8, description="the B-spline stage runs at spacing_mm * bspline_shrink")

    def _register_prepared(self, fixed: PreparedImage, moving: PreparedImage) -> sitk.Transform:
        cfg = self.config
        metric_mask = sitk.BinaryDilate(fixed.body, [2, 2, 2])
        # 1. initialisation: body centroids, then a cranio-caudal search
        centre = _body_centroid(fixed)
        affine = sitk.AffineTransform(3)
        affine.SetCenter([float(c) for c in centre])
        affine.SetTranslation([float(v) for v in _body_centroid(moving) - centre])
        if cfg.z_search_mm > 0:
            affine = self._z_search(fixed, moving, metric_mask, affine)
        # 2. affine, Mattes MI, multi-resolution
        if cfg.affine_iterations > 0:
            method = self._method(metric_mask)
            if cfg.affine_optimizer == "rsgd":
                method.SetOptimizerAsRegularStepGradientDescent(
                    learningRate=2.0, minStep=1e-3, numberOfIterations=cfg.affine_iterations, relaxationFactor=0.6,
                    gradientMagnitudeTolerance=1e-6,
                )
            else:
                method.SetOptimizerAsGradientDescent(
                    learningRate=1.0, numberOfIterations=cfg.affine_iterations, convergenceMinimumValue=1e-6,
                    convergenceWindowSize=10, estimateLearningRate=method.EachIteration,
                )
            method.SetOptimizerScalesFromPhysicalShift()
            shrink = list(cfg.affine_shrink)
            method.SetShrinkFactorsPerLevel(shrink)
            method.SetSmoothingSigmasPerLevel([max(0.0, (f - 1) * 0.5 * cfg.spacing_mm) for f in shrink])
            method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
            method.SetInitialTransform(affine, inPlace=True)
            self._execute(method, fixed.image, moving.image, "affine")
        if cfg.deformable == "none":
            return affine
        # 3. cubic B-spline on top of the affine, Mattes MI, L-BFGS-B
        extent = np.asarray(fixed.image.GetSize()) * np.asarray(fixed.image.GetSpacing())
        mesh = [max(1, int(round(e / cfg.bspline_spacing_mm))) for e in extent]
        bspline = sitk.BSplineTransformInitializer(fixed.image, mesh, order=3)
        method = self._method(metric_mask)
        method.SetMovingInitialTransform(affine)
        method.SetInitialTransform(bspline, inPlace=True)
        method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=cfg.bspline_iterations,
                                    maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * cfg.bspline_iterations,
                                    costFunctionConvergenceFactor=1e7)
        method.SetShrinkFactorsPerLevel([cfg.bspline_shrink])
        method.SetSmoothingSigmasPerLevel([max(0.0, (cfg.bspline_shrink - 1) * 0.5 * cfg.spacing_mm)])
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        self._execute(method, fixed.image, moving.image, "B-spline")
        return as_displacement_field(sitk.CompositeTransform([affine, bspline]), fixed.image)

    def _z_search(self, fixed: PreparedImage, moving: PreparedImage, mask: sitk.Image,
                  initial: sitk.AffineTransform) -> sitk.AffineTransform:
        """Best cranio-caudal shift of ``initial`` (a translation) by mutual information.

        Shifts within ``+-z_search_mm``, widened by half the difference of the two bodies'
        cranio-caudal extents (``z_search_fov``: a partial field of view moves the body centroid
        by up to that), are scored by :func:`mutual_information` on every voxel of ``mask`` (the
        dilated query body), both images smoothed (Gaussian, sigma ``spacing_mm``), the query
        subsampled by ``z_search_shrink``. Outside its field of view the support reads
        :data:`OUTSIDE_FOV` (MI computed only where the support has data rewards sliding a short
        scan out of the other's field of view). Only shifts where the two bodies overlap along z
        by at least ``z_search_min_overlap`` of the shorter one compete."""
        cfg = self.config
        fixed_lo, fixed_hi = _body_z_range(fixed)
        moving_lo, moving_hi = _body_z_range(moving)
        shorter = max(min(fixed_hi - fixed_lo, moving_hi - moving_lo), 1e-6)
        search_mm = cfg.z_search_mm
        if cfg.z_search_fov:
            search_mm += abs((fixed_hi - fixed_lo) - (moving_hi - moving_lo)) / 2.0
        steps = int(math.floor(search_mm / cfg.z_search_step_mm))
        shrink = [cfg.z_search_shrink] * 3
        fixed_image = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed.image, cfg.spacing_mm), shrink)
        moving_image = sitk.SmoothingRecursiveGaussian(moving.image, cfg.spacing_mm)
        inside = sitk.GetArrayViewFromImage(sitk.Shrink(mask, shrink)) > 0
        fixed_values = sitk.GetArrayViewFromImage(fixed_image)[inside]
        translation = np.asarray(initial.GetTranslation(), dtype=np.float64)
        shifts = [n * cfg.z_search_step_mm for n in range(-steps, steps + 1)]
        # overlap of the query body, shifted into the support, with the support's body
        overlaps = [max(0.0, min(fixed_hi + translation[2] + z, moving_hi) - max(fixed_lo + translation[2] + z, moving_lo))
                    / shorter for z in shifts]
        wanted = min(cfg.z_search_min_overlap, max(overlaps))
        scored: list[tuple[float, float, float]] = []  # (-mutual information, |shift|, shift)
        for shift, overlap in zip(shifts, overlaps):
            if overlap < wanted:
                continue
            # every query-body voxel counts at every shift: outside its field of view the support
            # reads OUTSIDE_FOV (a histogram bin of its own), so a shift that slides the query out
            # of the support is charged for it rather than scored on fewer, easier voxels
            candidate = sitk.TranslationTransform(3, [float(translation[0]), float(translation[1]), float(translation[2] + shift)])
            warped = sitk.Resample(moving_image, fixed_image, candidate, sitk.sitkLinear, OUTSIDE_FOV, sitk.sitkFloat32)
            value = mutual_information(fixed_values, sitk.GetArrayViewFromImage(warped)[inside], cfg.histogram_bins)
            scored.append((-value, abs(shift), shift))
        best_shift = min(scored)[2]
        best = sitk.AffineTransform(initial)
        best.SetTranslation([float(translation[0]), float(translation[1]), float(translation[2] + best_shift)])
        return best


# ------------------------------------------------------------------------------------------
# ANTs
# ------------------------------------------------------------------------------------------
def _to_ants(image: sitk.Image):
    import ants

    arr = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)
    return ants.from_numpy(
        arr, origin=list(image.GetOrigin()), spacing=list(image.GetSpacing()),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
    )


class AntsRegistration(_MultimodalRegistration):
    """The ``sitk`` affine stage, then ANTs SyN with Mattes MI (ANTsPy), as one SimpleITK transform."""

    name = "ants"
    description = ("multimodal: sitk affine, then ANTs SyN with Mattes MI (antspyx), MIND-SSC deformable refinement, "
                   "optional structure-focused affine")

    class Config(_FocusConfig):
        syn_iterations: tuple[int, ...] = Field((40, 20, 10), description="SyN iterations per level (coarse to fine)")
        syn_metric: Literal["mattes", "CC", "meansquares"] = Field("mattes", description="SyN similarity metric")

    def _register_prepared(self, fixed: PreparedImage, moving: PreparedImage) -> sitk.Transform:
        try:
            import ants
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigError(f"registration 'ants' needs the antspyx package ({exc}); pip install 'spasem[ants]' (or antspyx)") from None
        cfg = self.config
        affine_backend = SitkRegistration(SitkRegistration.Config(
            spacing_mm=cfg.spacing_mm, ct_window=cfg.ct_window, histogram_bins=cfg.histogram_bins, deformable="none",
            focus_margin_mm=None, memoize=False, refine="none"), self.context)
        affine = affine_backend._register_prepared(fixed, moving)
        moving_image = sitk.Resample(moving.image, fixed.image, affine, sitk.sitkLinear, 0.0)
        mask = sitk.Cast(sitk.BinaryDilate(fixed.body, [2, 2, 2]), sitk.sitkFloat32)
        with tempfile.TemporaryDirectory(prefix="spasem-ants-") as tmp:
            result = ants.registration(
                fixed=_to_ants(fixed.image), moving=_to_ants(moving_image), type_of_transform="SyNOnly",
                syn_metric=cfg.syn_metric, syn_sampling=cfg.histogram_bins if cfg.syn_metric == "mattes" else 2,
                reg_iterations=tuple(cfg.syn_iterations), mask=_to_ants(mask), outprefix=str(Path(tmp) / "reg_"),
                random_seed=int(self.context.seed) + 1,
            )
            # ANTs maps query points through the forward list last-to-first (x = t0(t1(x'))),
            # SimpleITK's composite [T0, T1, T2] is T0(T1(T2(x))): append the list reversed.
            transforms: list[sitk.Transform] = [affine]
            for path in reversed(result["fwdtransforms"]):
                if path.endswith((".nii.gz", ".nii")):
                    transforms.append(sitk.DisplacementFieldTransform(sitk.ReadImage(path, sitk.sitkVectorFloat64)))
                else:
                    transforms.append(sitk.ReadTransform(path))
        return as_displacement_field(sitk.CompositeTransform(transforms), fixed.image)


@hookimpl
def spasem_register_registrations(register):
    register(SitkRegistration)
    register(AntsRegistration)
