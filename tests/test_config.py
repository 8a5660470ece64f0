"""Configuration layering, validation messages and config files."""

from __future__ import annotations

import pytest

from spasem.core.config import PipelineConfig, build_config, deep_merge, read_config_file
from spasem.errors import ConfigError, InputError


def test_layers_override_in_order_and_keep_options_of_the_same_backend():
    cfg = build_config(
        {"encoder": {"name": "intensity", "options": {"stride": 4, "scales": [1.0]}}, "priors": {"sigma": 3.0}},
        {"encoder": {"options": {"stride": 2}}},
        {"fusion": "mean", "window": {"size": 64}},
    )
    assert cfg.encoder.name == "intensity" and cfg.encoder.options == {"stride": 2, "scales": [1.0]}
    assert cfg.priors.sigma == 3.0 and cfg.priors.tau_s == 0.1 and cfg.priors.tau_e == 0.07
    assert cfg.fusion.name == "mean" and cfg.window.size == (64, 64, 64)


def test_changing_a_backend_drops_the_old_backends_options():
    merged = deep_merge({"encoder": {"name": "a", "options": {"x": 1}}}, {"encoder": "b"})
    assert merged["encoder"] == {"name": "b"}


def test_paper_defaults():
    cfg = PipelineConfig()
    assert (cfg.priors.sigma, cfg.priors.tau_s, cfg.priors.tau_e) == (2.0, 0.1, 0.07)
    assert cfg.window.spacing_mm == 1.5 and cfg.window.size == (128, 128, 128)
    assert cfg.fusion.name == "entropy_gate"


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"priors": {"tau_s": 0}}, "priors.tau_s: Input should be greater than 0"),
        ({"window": {"size": [4, 4, 4]}}, "window.size: Value error, window sides must be >= 8 voxels"),
        ({"device": "gpu"}, "device: Value error, expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ({"colour": "blue"}, "colour: unknown option"),
        ({"label": 0}, "label: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_values_are_reported_as_field_message(layer, message):
    with pytest.raises(ConfigError) as err:
        build_config(layer)
    assert message in str(err.value)


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('fusion = "mean"\n[encoder]\nname = "intensity"\noptions = { stride = 4 }\n')
    (tmp_path / "b.yml").write_text("fusion: spatial_only\n")
    assert read_config_file(tmp_path / "a.toml")["encoder"]["options"] == {"stride": 4}
    assert read_config_file(tmp_path / "b.yml") == {"fusion": "spatial_only"}
    (tmp_path / "bad.toml").write_text("fusion = \n")
    with pytest.raises(ConfigError, match="bad.toml': cannot parse"):
        read_config_file(tmp_path / "bad.toml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(InputError, match="unsupported type '.json'"):
        read_config_file(tmp_path / "c.json")
    with pytest.raises(InputError, match="no such file"):
        read_config_file(tmp_path / "missing.toml")
