"""uniGradICON / multiGradICON registration on random weights: the transform's frames and its
equality with icon_registration's own ITK transform, preprocessing, modality handling, model
choice, instance optimisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tests.backbone_helpers import isolate, phantom, shared_weights_home

from spasem.core.backends import RunContext
from spasem.core.progress import Progress
from spasem.core.volume import Grid, Volume
from spasem.errors import ConfigError, WeightsError
from spasem.models import gradicon as G

pytest.importorskip("unigradicon", reason="unigradicon is not installed")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    isolate(monkeypatch, shared_weights_home())


def _backend(name: str, progress: Progress | None = None, **options):
    from spasem.core.registry import get_registry

    return get_registry().create("registration", name, options, RunContext(progress=progress or Progress(enabled=False)))


SUPPORT_GRID = Grid((100, 90, 40), (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), np.eye(3))
QUERY_GRID = Grid((80, 70, 50), (1.0, 1.1, 2.0), (-5.0, 15.0, -40.0), np.diag([-1.0, 1.0, 1.0]))


# -- frames --------------------------------------------------------------------------------------
def test_network_boxes():
    shape = (20, 24, 28)
    s_box, q_box = G.network_boxes(SUPPORT_GRID, QUERY_GRID, shape, "common")
    c_s, e_s = G.fov_centre_and_extent(SUPPORT_GRID)
    c_q, e_q = G.fov_centre_and_extent(QUERY_GRID)
    for box, centre in ((s_box, c_s), (q_box, c_q)):
        assert box.shape == shape
        assert np.allclose(box.direction, np.diag([-1.0, -1.0, 1.0]))  # canonical RAS
        assert np.allclose(box.corners().mean(axis=0), centre)
    assert np.allclose(s_box.extent_mm, np.maximum(e_s, e_q)) and np.allclose(q_box.extent_mm, s_box.extent_mm)
    s_own, q_own = G.network_boxes(SUPPORT_GRID, QUERY_GRID, shape, "own")
    assert np.allclose(s_own.extent_mm, e_s) and np.allclose(q_own.extent_mm, e_q)


def test_zero_displacement_maps_box_onto_box():
    shape = (20, 24, 28)
    s_box, q_box = G.network_boxes(SUPPORT_GRID, QUERY_GRID, shape, "common")
    transform = G.make_transform(np.zeros((3, *shape)), q_box, s_box)
    rng = np.random.default_rng(0)
    index = rng.uniform(-3, 30, size=(50, 3))  # also outside the box: zero displacement there
    for idx, point in zip(index, q_box.index_to_physical(index)):
        assert np.allclose(transform.TransformPoint(point.tolist()), s_box.index_to_physical(idx), atol=1e-9)
    # common boxes: a translation of the field-of-view centres
    c_s, _ = G.fov_centre_and_extent(SUPPORT_GRID)
    c_q, _ = G.fov_centre_and_extent(QUERY_GRID)
    assert np.allclose(transform.TransformPoint(c_q.tolist()), c_s, atol=1e-9)


def test_displacement_components_and_axes():
    """The network map [1, 3, K, J, I] (channel 0 along K) becomes a displacement [3, I, J, K]
    with components (i, j, k), in box voxels."""
    shape_ijk = (6, 7, 8)
    net_shape = shape_ijk[::-1]
    axes = [torch.linspace(0, 1, n) for n in net_shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    field = identity.clone()
    field[0, 0] += 2.0 / (net_shape[0] - 1)  # +2 voxels along the network's first axis = k
    field[0, 2, 1, 2, 3] += 0.5 / (net_shape[2] - 1)  # +0.5 voxel along i at (k=1, j=2, i=3)
    disp = G._field_to_displacement(field, identity)
    assert disp.shape == (3, *shape_ijk)
    assert np.allclose(disp[2], 2.0, atol=1e-5)
    assert np.isclose(disp[0, 3, 2, 1], 0.5, atol=1e-5) and np.abs(disp[0]).sum() == pytest.approx(0.5, abs=1e-4)
    assert np.allclose(disp[1], 0.0)


@pytest.mark.slow
def test_transform_equals_icon_registrations_itk_transform():
    """For images given on the network boxes, our SimpleITK transform and
    icon_registration.itk_wrapper.create_itk_transform map points identically."""
    itk = pytest.importorskip("itk")
    from icon_registration.itk_wrapper import create_itk_transform
    from icon_registration.mermaidlite import identity_map_multiN

    rng = np.random.default_rng(1)
    shape = (12, 14, 16)
    s_box, q_box = G.network_boxes(SUPPORT_GRID, QUERY_GRID, shape, "common")
    net_shape = shape[::-1]
    identity = torch.from_numpy(identity_map_multiN([1, 1, *net_shape], 1.0 / (np.array(net_shape) - 1)))
    phi = identity + 0.05 * torch.from_numpy(rng.standard_normal(identity.shape).astype(np.float32))

    def itk_image(box: Grid):
        image = itk.image_from_array(np.zeros(box.shape[::-1], np.float32))
        image.SetSpacing(box.spacing.tolist())
        image.SetOrigin(box.origin.tolist())
        image.SetDirection(itk.matrix_from_array(box.direction.copy()))
        return image

    reference = create_itk_transform(phi, identity, itk_image(s_box), itk_image(q_box))
    ours = G.make_transform(G._field_to_displacement(phi, identity), q_box, s_box)
    points = q_box.index_to_physical(rng.uniform(-2, np.array(shape) + 1, size=(300, 3)))
    diff = max(np.abs(np.array(reference.TransformPoint(p.tolist())) - np.array(ours.TransformPoint(p.tolist()))).max()
               for p in points)
    assert diff < 1e-6


# -- intensities and modality -------------------------------------------------------------------
def test_normalisation_per_modality():
    import unigradicon

    ct, _ = phantom("CT")
    normal_ct = G.normalise(ct, "CT")
    expected = (np.clip(ct.array, -1000, 1000) + 1000) / 2000
    assert np.allclose(normal_ct.array, expected, atol=1e-6)
    mr, _ = phantom("MR")
    lo, hi = G.intensity_window(mr, "MR")
    assert lo == float(mr.array.min())
    assert hi == pytest.approx(float(unigradicon.quantile(torch.from_numpy(mr.array), 0.99)))
    normal_mr = G.normalise(mr, "MR")
    assert normal_mr.array.min() == 0.0 and normal_mr.array.max() == pytest.approx(1.0)
    with pytest.raises(Exception, match="99th intensity percentile equals its minimum"):
        G.intensity_window(mr.with_array(np.zeros(mr.shape, np.float32)), "MR")


def test_modality_guess():
    assert G.guess_modality(phantom("CT")[0]) == "CT"
    assert G.guess_modality(phantom("MR")[0]) == "MR"


def test_model_choice_and_the_weights_it_needs(tmp_path, monkeypatch):
    backend = _backend("gradicon")
    assert backend.choose_model("CT", "MR") == "multi" and backend.choose_model("MR", "CT") == "multi"
    assert backend.choose_model("CT", "CT") == "uni" and backend.choose_model("MR", "MR") == "uni"
    assert _backend("gradicon", model="uni").choose_model("CT", "MR") == "uni"
    assert _backend("unigradicon").choose_model("CT", "MR") == "uni"
    assert _backend("multigradicon").choose_model("CT", "CT") == "multi"
    # with an empty cache, a CT -> CT pair asks for uniGradICON's file, a CT -> MR pair for multiGradICON's
    isolate(monkeypatch, tmp_path)
    ct, _ = phantom("CT")
    mr, _ = phantom("MR")
    ct = Volume(ct.array, ct.grid, modality="CT")
    mr = Volume(mr.array, mr.grid, modality="MR")
    with pytest.raises(WeightsError, match="weights 'unigradicon' not found"):
        _backend("gradicon").register(ct, ct)
    with pytest.raises(WeightsError, match="weights 'multigradicon' not found"):
        _backend("gradicon").register(ct, mr)


def test_instance_optimisation_default_depends_on_the_device():
    cpu_out, cuda_out = io.StringIO(), io.StringIO()
    cpu = _backend("gradicon", progress=Progress(enabled=True, stream=cpu_out))
    assert cpu.io_steps() == 0 and "instance optimisation: off (CPU default" in cpu_out.getvalue()
    from spasem.core.registry import get_registry

    # a CUDA context (the device object needs no GPU; nothing runs on it here)
    cuda = get_registry().create("registration", "gradicon", {},
                                 RunContext(device=torch.device("cuda"), progress=Progress(enabled=True, stream=cuda_out)))
    assert cuda.io_steps() == 50 and "50 steps (the models' default, on CUDA)" in cuda_out.getvalue()
    forced = _backend("gradicon", io_steps=3)
    assert forced.io_steps() == 3


def test_options_are_validated():
    from spasem.core.registry import get_registry

    info = get_registry().get("registration", "gradicon")
    assert info.cls.parse_options({"input_shape": 80}).input_shape == (80, 80, 80)
    with pytest.raises(ConfigError, match="at least 65 voxels"):
        info.cls.parse_options({"input_shape": [64, 80, 80]})
    with pytest.raises(ConfigError, match="checkpoint: unknown option"):
        info.cls.parse_options({"checkpoint": "x.trch"})  # gradicon takes uni_/multi_checkpoint
    assert get_registry().get("registration", "unigradicon").cls.parse_options({"checkpoint": "x.trch"}).checkpoint == "x.trch"


def test_missing_package_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "unigradicon", None)
    with pytest.raises(ConfigError, match="need 'unigradicon' and 'icon_registration'.*pip install unigradicon"):
        G.build_network((80, 80, 80))


# -- registration with the real network (random weights: zero displacement) ----------------------
def test_register_random_network_and_warp(monkeypatch):
    stream = io.StringIO()
    backend = _backend("gradicon", progress=Progress(enabled=True, stream=stream), input_shape=[65, 65, 65])
    support, mask = phantom("CT", seed=3)
    query, _ = phantom("MR", shift_mm=7.5, seed=4)  # same grid shape, field of view 7.5 mm further along x
    transform = backend.register(support, query)
    out = stream.getvalue()
    assert backend.last_choice == {"model": "multi", "support_modality": "CT", "query_modality": "MR"}
    assert "support modality unknown: taken for CT" in out and "query modality unknown: taken for MR" in out
    assert "instance optimisation: off (CPU default" in out
    assert np.all(transform.displacement == 0.0)  # zero-initialised last layer
    # zero displacement + common boxes: the support's field of view lands on the query's
    warped = transform.warp(Volume(mask.array.astype(np.float32), mask.grid), query.grid)
    assert warped.grid.same_as(query.grid)
    assert np.array_equal(warped.array >= 0.5, mask.array > 0)


@pytest.mark.slow
def test_instance_optimisation_tunes_a_copy_of_the_weights():
    stream = io.StringIO()
    backend = _backend("unigradicon", progress=Progress(enabled=True, stream=stream), input_shape=65, io_steps=1,
                       io_similarity="lncc")
    support, _ = phantom("CT", seed=5)
    query, _ = phantom("CT", shift_mm=10.0, seed=6)
    net = backend.network("uni")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    transform = backend.register(support, query)
    assert "instance optimisation: 1 step(s) (lncc)" in stream.getvalue()
    assert "instance optimisation step 1/1: loss" in stream.getvalue()
    assert np.isfinite(transform.displacement).all()
    assert np.abs(transform.displacement).max() > 0  # the tuned network moved
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored
    assert all(p.grad is None for p in net.parameters())
