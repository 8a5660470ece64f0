"""The engine through the Python API: results, geometry, k-shot, fusions sharing work, caching."""

from __future__ import annotations

import io

import numpy as np
import pytest
import SimpleITK as sitk

import spasem
from spasem.core import registry as reg
from spasem.core.backends import RegistrationBackend, SitkTransform
from spasem.core.cache import DiskCache, MemoryCache
from spasem.core.config import PAPER_PRIORS
from spasem.core.metrics import dice
from spasem.core.pipeline import Engine
from spasem.core.progress import Progress
from spasem.core.resample import resample
from spasem.errors import InputError, PipelineError
from spasem.hookspecs import hookimpl
from tests.conftest import blob_pair

CALLS = {"register": 0}


class CountingRegistration(RegistrationBackend):
    """Identity that counts its calls."""

    name = "counting"

    def register(self, support, query):
        CALLS["register"] += 1
        return SitkTransform(sitk.TranslationTransform(3))


class CountingPlugin:
    @hookimpl
    def spasem_register_registrations(self, register):
        register(CountingRegistration)


@pytest.fixture
def counting_registry():
    CALLS["register"] = 0
    return reg.build_registry(reg.create_plugin_manager(load_entrypoints=False, extra_plugins=(CountingPlugin(),)))


def test_segment_returns_mask_on_query_grid_and_all_maps(blob, fast_config):
    image, mask = blob
    query, truth = blob_pair(shift_vox=1, origin=(0.0, 0.0, 0.0))
    result = spasem.segment([(image, mask)], query, {**fast_config, "fusion": "spatial_only"})
    assert result.mask.grid is query.grid and result.mask.is_label
    assert dice(result.mask, truth) > 0.85
    assert set(result.maps) == {"p_reg", "p_sim", "entropy", "fused_logits", "logits"}
    for m in result.maps.values():
        assert m.grid.same_as(result.work_grid) and np.isfinite(m.array).all()
    assert 0 <= result.maps["entropy"].array.min() and result.maps["entropy"].array.max() <= 1
    on_query = result.maps_on_query_grid(["p_reg"])
    assert on_query["p_reg"].grid is query.grid
    assert result.num_prototypes > 0 and {"register", "encode", "fuse", "decode"} <= set(result.timings)


def test_run_fusions_registers_and_encodes_once(blob, fast_config, counting_registry):
    image, mask = blob
    engine = Engine({**fast_config, "registration": "counting"}, registry=counting_registry)
    results = engine.run_fusions([(image, mask)], image, ["spatial_only", "semantic_only", "mean", "entropy_gate"])
    assert list(results) == ["spatial_only", "semantic_only", "mean", "entropy_gate"]
    assert CALLS["register"] == 1
    assert not np.array_equal(results["spatial_only"].maps["fused_logits"].array, results["mean"].maps["fused_logits"].array)
    np.testing.assert_array_equal(results["mean"].maps["p_sim"].array, results["entropy_gate"].maps["p_sim"].array)


@pytest.mark.parametrize("cache_kind", ["memory", "disk"])
def test_stage_cache_skips_registration_and_encoding(blob, fast_config, counting_registry, tmp_path, cache_kind):
    image, mask = blob
    cache = MemoryCache() if cache_kind == "memory" else DiskCache(tmp_path / "cache")
    config = {**fast_config, "registration": "counting"}
    first = spasem.segment([(image, mask)], image, config, registry=counting_registry, cache=cache)
    second = spasem.segment([(image, mask)], image, config, registry=counting_registry, cache=cache)
    assert CALLS["register"] == 1
    assert "encode" in first.timings and "encode" not in second.timings
    np.testing.assert_array_equal(first.mask.array, second.mask.array)
    # another encoder option is another cache entry
    spasem.segment([(image, mask)], image, {**config, "encoder": {"name": "intensity", "options": {"stride": 2}}},
                   registry=counting_registry, cache=cache)
    assert CALLS["register"] == 1  # registration did not depend on the encoder


def test_k_shot_concatenates_prototypes(blob, fast_config):
    image, mask = blob
    paper = {**fast_config, "priors": PAPER_PRIORS}  # support prototypes (the classical default replaces them)
    one = spasem.segment([(image, mask)], image, paper)
    two = spasem.segment([(image, mask), (image, mask)], image, paper)
    assert two.num_prototypes == 2 * one.num_prototypes


def test_empty_support_list_and_bad_supports(blob, fast_config):
    image, mask = blob
    with pytest.raises(spasem.SpasemError, match="at least one support"):
        spasem.segment([], image, fast_config)
    with pytest.raises(InputError, match="support mask .* is empty"):
        spasem.segment([(image, mask.with_array(np.zeros_like(mask.array)))], image, fast_config)


def test_registration_that_loses_the_organ_is_a_pipeline_error(blob, fast_config):
    image, mask = blob
    far, _ = blob_pair(origin=(500.0, 0, 0))
    with pytest.raises(PipelineError, match="entirely outside"):
        spasem.segment([(image, mask)], far, fast_config)


def test_progress_reports_stages(blob, fast_config):
    image, mask = blob
    stream = io.StringIO()
    paper = {**fast_config, "priors": PAPER_PRIORS}  # encodes the supports (the classical default does not)
    spasem.segment([(image, mask)], image, paper, progress=Progress(enabled=True, stream=stream))
    text = stream.getvalue()
    for fragment in ("registering support 1", "encoding supports", "encoding query", "decoding", "pasting back"):
        assert fragment in text


def test_core_appearance_keeps_the_query_core_on_the_structure(blob, fast_config, counting_registry):
    """Identity registration with the query's organ 10 mm away: the warped mask's core lies half on
    the body around the organ. ``priors.core_appearance`` keeps only its organ-like voxels."""
    image, mask = blob
    query, truth = blob_pair(shift_vox=5)
    cache = MemoryCache()
    config = {**fast_config, "registration": "counting", "priors": {"core_margin_mm": 2.0}}
    engine = Engine(config, registry=counting_registry, cache=cache)
    plain = engine.run([(image, mask)], query)
    checked = Engine({**config, "priors": {"core_margin_mm": 2.0, "core_appearance": True}},
                     registry=counting_registry, cache=cache).run([(image, mask)], query)
    assert CALLS["register"] == 2  # its own cache entry: the warp stage also returns the appearance map
    assert checked.num_prototypes < plain.num_prototypes  # body voxels left the core
    # the kept core is the organ part of the old one: the prototypes are the organ's intensities
    truth_work = resample(truth, plain.work_grid).array > 0
    assert checked.maps["p_sim"].array[truth_work].mean() >= plain.maps["p_sim"].array[truth_work].mean() - 1e-4
    assert checked.mask.grid is query.grid and dice(checked.mask, truth) > 0.5
