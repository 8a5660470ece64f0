"""The whole ``classical`` pipeline (the default configuration) on a phantom pair: one annotated
CT of subject 0 (support) and the MR of subject 1 (query), through ``spasem run`` on NIfTI files.

Measured on this machine (2 shared cores), with the defaults: liver Dice 0.87 (`make demo`; registration ~22 s
of it); the floor below sits 0.17 under it. Priors on the query grid (measured before the MIND
refinement of the registration): mean P_reg 0.88 inside the true liver / 0.009 outside, mean P_sim 0.84 / 0.008, mean
entropy outside 0.99. (Spleen 0.89,
left kidney 0.79, right kidney 0.76 with the same settings, `make demo`; the demo test covers the
spleen.)"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from spasem.cli.main import cli
from spasem.core.config import CLASSICAL, PipelineConfig, build_config
from spasem.core.io import load, save
from spasem.core.metrics import dice
from spasem.core.registry import get_registry
from spasem.data.phantoms import LABELS
from tests.phantom_helpers import phantom_case

LIVER_FLOOR = 0.70


def test_default_configuration_is_the_classical_preset():
    preset = get_registry().preset("classical").config
    assert build_config(preset) == PipelineConfig() == build_config(CLASSICAL)
    config = PipelineConfig()
    assert (config.registration.name, config.encoder.name, config.fusion.name, config.decoder.name) == (
        "sitk", "mind", "entropy_gate", "appearance")
    assert config.priors.semantic == "contrastive" and config.priors.query_prototypes == "replace"
    # every backend of the preset accepts its options
    for kind in ("registration", "encoder", "fusion", "decoder"):
        stage = getattr(config, kind)
        get_registry().get(kind, stage.name).cls.parse_options(stage.options)


@pytest.mark.slow
def test_classical_run_ct_support_mr_query(tmp_path):
    support, support_label = phantom_case(0, "ct")
    query, query_label = phantom_case(1, "mr")
    files = {"support": tmp_path / "s000_ct.nii.gz", "support_mask": tmp_path / "s000_ct_label.nii.gz",
             "query": tmp_path / "s001_mr.nii.gz"}
    save(support, files["support"])
    save(support_label, files["support_mask"])
    save(query, files["query"])
    output, priors = tmp_path / "liver.nii.gz", tmp_path / "priors" / "liver"  # priors folder created
    result = CliRunner().invoke(cli, [
        "run", "--support", str(files["support"]), "--support-mask", str(files["support_mask"]),
        "--label", str(LABELS["liver"]), "--query", str(files["query"]), "-o", str(output),
        "--save-priors", str(priors), "--support-modality", "CT", "--query-modality", "MR",
    ])
    assert result.exit_code == 0, result.output
    assert "segmented" in result.output and "register" in result.output

    prediction = load(output, is_label=True)
    assert prediction.grid.same_as(query.grid)  # the query's own grid (RAS file direction, 6 mm slices)
    assert set(np.unique(prediction.array)) == {0, 1}
    truth = query_label.array == LABELS["liver"]
    score = dice(prediction.array, truth)
    assert score > LIVER_FLOOR, score
    # the largest-component clean-up of the preset: one 26-connected piece
    from scipy import ndimage

    assert ndimage.label(prediction.array, structure=np.ones((3, 3, 3)))[1] == 1

    maps = {name: load(priors / f"{name}.nii.gz") for name in ("p_reg", "p_sim", "entropy", "fused_logits", "logits")}
    for name, volume in maps.items():
        assert volume.grid.same_as(query.grid), name
        assert np.isfinite(volume.array).all(), name
    for name in ("p_reg", "p_sim", "entropy"):
        assert maps[name].array.min() >= -1e-6 and maps[name].array.max() <= 1 + 1e-6, name
    p_reg, p_sim, entropy = maps["p_reg"].array, maps["p_sim"].array, maps["entropy"].array
    assert p_reg.max() > 0.95 and p_reg[truth].mean() > 0.6 and p_reg[~truth].mean() < 0.05
    assert p_sim[truth].mean() > p_sim[~truth].mean() + 0.3
    assert entropy[~truth].mean() > 0.9  # outside the semantic reach: H = 1
    # the prediction is the decoder's logits > 0 (then the largest component) ...
    assert (maps["logits"].array[prediction.array > 0] > -1e-3).all()
    # ... and the appearance decoder moves the fused mask's boundary, not the structure: every
    # predicted voxel lies within 3 prior sigmas (18 mm) of the fused mask
    fused_mask = maps["fused_logits"].array > 0
    distance = ndimage.distance_transform_edt(~fused_mask, sampling=query.grid.spacing)
    assert distance[prediction.array > 0].max() < 18.0
    assert dice(prediction.array, fused_mask) > 0.7
