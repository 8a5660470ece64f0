"""uniGradICON / multiGradICON (PyPI ``unigradicon`` + ``icon_registration``): network,
strict loading, inference, instance optimisation, and the physical-space transform.

Frames. The networks register in *array-index* space: the fixed image's box is mapped onto the
moving image's box voxel by voxel. Both images are therefore first resampled onto *network
boxes* (:func:`network_boxes`): canonical RAS grids of exactly the network's input shape (175^3
by default), so resizing is part of that one physical-space resampling and both arrays share an
orientation. The network sees them in the array order ``icon_registration.itk_wrapper`` gives
it (``np.array(itk_image)``, i.e. ``[k, j, i]``).

Result. The network returns, for every voxel ``p`` of the query (fixed) box, the index
``p + u(p)`` of the support (moving) box voxel it corresponds to. As a physical transform
(query LPS point -> support LPS point)::

    T(x) = A_s (A_q^-1 (x - o_q) + u) + o_s = M(x + A_q u)

with ``A = direction * spacing`` and ``o`` the origin of each box and ``M`` the affine map of
the query box onto the support box. :func:`make_transform` builds exactly that as a SimpleITK
composite (an affine after a displacement field on the query box, zero displacement outside
it, linear interpolation), which equals ``icon_registration.itk_wrapper.create_itk_transform``
for images given on the boxes (tested) and is built in well under a second instead of seconds.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Literal

import numpy as np
import SimpleITK as sitk
import torch

from spasem.core.volume import RAS_DIRECTION, Grid, Volume
from spasem.errors import ConfigError, InputError, WeightsError

#: the official network input shape
OFFICIAL_INPUT_SHAPE = (175, 175, 175)
#: the smallest side the network's pooling pyramid accepts (64 reaches a 1-voxel level and fails)
MIN_INPUT_SIDE = 65
#: instance-optimisation defaults of the official command line
DEFAULT_IO_STEPS = 50
DEFAULT_IO_LEARNING_RATE = 2e-5
ARCHITECTURES = {"uni": "uniGradICON", "multi": "multiGradICON"}
WEIGHT_NAMES = {"uni": "unigradicon", "multi": "multigradicon"}
#: CT intensities are clamped to this Hounsfield window, then scaled to [0, 1]
CT_WINDOW = (-1000.0, 1000.0)
#: an image whose low percentile is at or below this is taken for CT when its modality is unknown
CT_GUESS_HU = -500.0
CT_GUESS_PERCENTILE = 1.0

_INSTALL_HINT = "install them with `pip install unigradicon icon_registration` (spasem's dependencies)"


def _import_unigradicon():
    try:
        import icon_registration
        import unigradicon
    except ImportError as exc:
        raise ConfigError(f"the uniGradICON/multiGradICON backends need 'unigradicon' and 'icon_registration' ({exc}); {_INSTALL_HINT}") from None
    return unigradicon, icon_registration


def build_network(input_shape: tuple[int, int, int] = OFFICIAL_INPUT_SHAPE) -> torch.nn.Module:
    """The (uni|multi)GradICON architecture (both share it) with random weights, for inputs of
    ``input_shape`` voxels (each side >= 65). Its last layer is zero-initialised: a random
    network returns exactly zero displacement."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < MIN_INPUT_SIDE:
        raise ConfigError(f"network input shape {shape}: expected 3 sides of at least {MIN_INPUT_SIDE} voxels")
    unigradicon, icon = _import_unigradicon()
    return unigradicon.make_network([1, 1, *shape], include_last_step=True, loss_fn=icon.LNCC(sigma=5))


def load_network(path: str | os.PathLike, model: str, input_shape=OFFICIAL_INPUT_SHAPE,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the network and load ``Step_2_final.trch`` (the state dict of ``regis_net``)
    strictly; eval mode, on ``device``."""
    from spasem.weights import check_state_dict, strip_prefix, torch_load

    net = build_network(input_shape)
    state = torch_load(path, ARCHITECTURES[model])
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state):
        raise WeightsError(
            f"checkpoint '{path}' is not a {ARCHITECTURES[model]} checkpoint: expected the state dict of "
            f"the registration network (Step_2_final.trch), got {type(state).__name__}"
        )
    state = strip_prefix(state)
    check_state_dict(net.regis_net.state_dict(), state, f"{ARCHITECTURES[model]} (regis_net)", path)
    net.regis_net.load_state_dict(state, strict=True)
    return net.to(device).eval()


# ------------------------------------------------------------------------------------------
# modality and intensity preprocessing
# ------------------------------------------------------------------------------------------
def guess_modality(volume: Volume) -> str:
    """'CT' when the image's 1st percentile is at or below -500 (air is -1000 HU in CT; MR
    intensities are not negative), else 'MR'."""
    low = float(np.percentile(_sample(volume.array), CT_GUESS_PERCENTILE))
    return "CT" if low <= CT_GUESS_HU else "MR"


def _sample(array: np.ndarray, limit: int = 2_000_000) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // limit)
    return flat[::step]


def _kth_quantile(array: np.ndarray, q: float) -> float:
    """``unigradicon.quantile``: the ``max(1, min(int(q * n), n))``-th smallest value."""
    flat = np.asarray(array, dtype=np.float32).reshape(-1)
    k = max(1, min(int(q * flat.size), flat.size))
    return float(np.partition(flat, k - 1)[k - 1])


def intensity_window(volume: Volume, modality: str) -> tuple[float, float]:
    """The range clamped and scaled to [0, 1] (as ``unigradicon.preprocess``): CT [-1000, 1000];
    MR [minimum, 99th percentile]."""
    if modality == "CT":
        return CT_WINDOW
    if modality == "MR":
        lo = float(np.min(volume.array))
        hi = _kth_quantile(volume.array, 0.99)
        if hi <= lo:
            raise InputError(
                f"{volume.label_for_messages}: its 99th intensity percentile equals its minimum ({lo:g}); "
                "cannot normalise it for registration (an empty or binary image?)"
            )
        return lo, hi
    raise ConfigError(f"modality '{modality}': expected 'CT' or 'MR'")


def normalise(volume: Volume, modality: str) -> Volume:
    """Clamp to :func:`intensity_window` and scale to [0, 1] (float32, same grid)."""
    lo, hi = intensity_window(volume, modality)
    arr = (np.clip(volume.array.astype(np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return Volume(arr, volume.grid, name=volume.name, modality=volume.modality)


# ------------------------------------------------------------------------------------------
# network boxes
# ------------------------------------------------------------------------------------------
def fov_centre_and_extent(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Centre (LPS mm) and axis-aligned extent (mm along x, y, z) of a grid's field of view."""
    corners = grid.corners()
    return corners.mean(axis=0), corners.max(axis=0) - corners.min(axis=0)


def box_grid(centre: np.ndarray, extent: np.ndarray, shape: tuple[int, int, int]) -> Grid:
    """Canonical RAS grid of ``shape`` voxels whose edges span ``extent`` (mm) around ``centre``."""
    shape_v = np.asarray(shape, dtype=np.float64)
    spacing = np.asarray(extent, dtype=np.float64) / shape_v
    origin = np.asarray(centre) + RAS_DIRECTION @ (-(shape_v - 1) / 2 * spacing)
    return Grid(tuple(int(s) for s in shape), spacing, origin, RAS_DIRECTION)


def network_boxes(support: Grid, query: Grid, shape: tuple[int, int, int],
                  field_of_view: Literal["common", "own"] = "common") -> tuple[Grid, Grid]:
    """The network-input grids of the support and the query.

    * ``own``: each box covers its scan's own field of view (what ``register_pair`` does; the
      network then starts from a map that stretches one field of view onto the other);
    * ``common``: both boxes have the same physical size (the larger extent per axis) centred on
      their own scan, so the network starts from a translation of the centres, without scaling.
    """
    c_s, e_s = fov_centre_and_extent(support)
    c_q, e_q = fov_centre_and_extent(query)
    if field_of_view == "common":
        e_s = e_q = np.maximum(e_s, e_q)
    elif field_of_view != "own":
        raise ConfigError(f"field_of_view '{field_of_view}': expected 'common' or 'own'")
    return box_grid(c_s, e_s, shape), box_grid(c_q, e_q, shape)


def to_network(array_ijk: np.ndarray, device: torch.device) -> torch.Tensor:
    """A box array ``[i, j, k]`` -> network input ``[1, 1, k, j, i]`` (float32)."""
    return torch.from_numpy(np.ascontiguousarray(array_ijk.transpose(2, 1, 0), dtype=np.float32))[None, None].to(device)


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------
def _field_to_displacement(field: torch.Tensor, identity: torch.Tensor) -> np.ndarray:
    """Network map ``[1, 3, K, J, I]`` in [0, 1] coordinates -> displacement in box voxels,
    ``[3, I, J, K]`` with components (i, j, k)."""
    shape = torch.tensor(field.shape[2:], dtype=field.dtype, device=field.device)
    disp = (field - identity)[0] * (shape - 1)[:, None, None, None]  # components (k, j, i) on [K, J, I]
    return disp.flip(0).permute(0, 3, 2, 1).detach().to("cpu", torch.float64).numpy()


def predict_displacement(net: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor) -> np.ndarray:
    """One forward pass ``phi_AB = regis_net(moving, fixed)`` -> displacement ``[3, I, J, K]``
    (query box voxels, components i, j, k)."""
    regis = net.regis_net
    with torch.no_grad():
        phi = regis(moving, fixed)
        field = phi(regis.identity_map)
    return _field_to_displacement(field, regis.identity_map)


def instance_optimise(net: torch.nn.Module, moving: torch.Tensor, fixed: torch.Tensor, steps: int,
                      learning_rate: float = DEFAULT_IO_LEARNING_RATE, similarity: str = "lncc",
                      report: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Instance optimisation as the official command line does it: fine-tune a copy of the
    network's weights on this pair (GradICON loss with ``similarity``, Adam, ``steps`` steps),
    predict with the tuned weights, restore the weights. Returns the displacement like
    :func:`predict_displacement`."""
    unigradicon, icon = _import_unigradicon()
    from icon_registration import config as icon_config

    device = fixed.device
    saved_state = copy.deepcopy(net.state_dict())
    saved_similarity = net.similarity
    saved_device = icon_config.device
    icon_config.device = device  # GradICON's loss draws its random probes on config.device
    try:
        net.similarity = unigradicon.make_sim(similarity)
        optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
        for step in range(steps):
            optimizer.zero_grad()
            loss = net(moving, fixed)
            loss.all_loss.backward()
            optimizer.step()
            if report is not None:
                report(step + 1, float(loss.all_loss.detach()))
        return predict_displacement(net, moving, fixed)
    finally:
        net.load_state_dict(saved_state)
        net.similarity = saved_similarity
        icon_config.device = saved_device
        net.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------
# the physical transform
# ------------------------------------------------------------------------------------------
def box_affine(query_box: Grid, support_box: Grid) -> sitk.AffineTransform:
    """``M``: the affine map taking query-box index coordinates onto the same support-box index
    coordinates, as LPS point -> LPS point."""
    a_q = query_box.direction * query_box.spacing[None, :]
    a_s = support_box.direction * support_box.spacing[None, :]
    matrix = a_s @ np.linalg.inv(a_q)
    translation = support_box.origin - matrix @ query_box.origin
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in matrix.ravel()])
    affine.SetTranslation([float(v) for v in translation])
    return affine


def make_transform(displacement: np.ndarray, query_box: Grid, support_box: Grid) -> sitk.CompositeTransform:
    """SimpleITK transform (query LPS point -> support LPS point) of a network displacement.

    :param displacement: ``[3, I, J, K]`` in query-box voxels, components (i, j, k).
    :param query_box: the query's network box (the field's grid).
    :param support_box: the support's network box.
    """
    if tuple(displacement.shape[1:]) != query_box.shape:
        raise ValueError(f"displacement {displacement.shape} does not match the query box {query_box.shape}")
    a_q = query_box.direction * query_box.spacing[None, :]
    physical = np.einsum("xc,cijk->ijkx", a_q, displacement.astype(np.float64))  # LPS mm on [I, J, K]
    image = sitk.GetImageFromArray(np.ascontiguousarray(physical.transpose(2, 1, 0, 3)), isVector=True)
    image.SetSpacing([float(s) for s in query_box.spacing])
    image.SetOrigin([float(o) for o in query_box.origin])
    image.SetDirection([float(d) for d in query_box.direction.ravel()])
    field = sitk.DisplacementFieldTransform(image)  # takes the image over
    return sitk.CompositeTransform([box_affine(query_box, support_box), field])
