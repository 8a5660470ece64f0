"""Validated pipeline configuration, presets and config files.

A configuration is built in layers, each overriding the previous one:
``PipelineConfig`` defaults < preset < config file (TOML or YAML) < command-line flags.

Config file layout (TOML; YAML has the same keys)::

    [registration]
    name = "centers"

    [encoder]
    name = "intensity"
    options = { stride = 2 }

    [fusion]
    name = "entropy_gate"

    [priors]
    sigma = 2.0
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spasem.core.backends import format_validation_error
from spasem.errors import ConfigError, InputError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(_Strict):
    """Which backend runs a stage, and its options (validated by the backend's own ``Config``)."""

    name: str = Field(description="registered backend name (see `spasem plugins`)")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value


class PriorsConfig(_Strict):
    """Parameters of the spatial and semantic priors (the paper's values by default)."""

    sigma: float = Field(2.0, gt=0, description="Gaussian sigma of the spatial prior, in working-grid voxels")
    tau_s: float = Field(0.1, gt=0, description="temperature of the similarity softmax (P_sim)")
    tau_e: float = Field(0.07, gt=0, description="temperature of the assignment softmax (entropy)")
    # --- options around the paper's formulas (all off by default; see spasem/core/adaptive.py) ---
    query_prototypes: Literal["off", "add", "replace"] = Field(
        "off", description="prototypes from the query's confident core (the warped mask eroded by core_margin_mm): "
        "'add' to the support's, 'replace' them, or 'off' (the paper)")
    semantic: Literal["paper", "contrastive"] = Field(
        "paper", description="'paper': P_sim from the foreground prototypes alone; 'contrastive': against background "
        "prototypes from the query's confident outside, H = entropy of that two-set assignment")
    core_margin_mm: float = Field(6.0, ge=0, description="depth inside the warped mask where query voxels are confidently inside (mm)")
    core_appearance: bool = Field(
        False, description="keep in the query core only the voxels whose intensity looks more like the support "
        "structure than like its surroundings, the support's appearance carried into the query's modality by the "
        "registration's joint histogram (unless under a quarter of the core would remain; False: the paper)")
    background_margin_mm: float = Field(
        20.0, ge=0, description="distance outside the warped mask beyond which query voxels are confidently outside (mm)")
    semantic_reach_mm: float | None = Field(
        None, gt=0, description="use the semantic prior only within this distance of the warped mask (mm); beyond it "
        "P_sim = 0 and H = 1, as outside the windows (None: everywhere in the windows, the paper)")
    realign_mm: float | None = Field(
        None, gt=0, description="before the final priors, translate the warped mask (at most this far, mm) to best "
        "agree with a first semantic prior computed around it (None: off, the paper)")
    max_prototypes: int | None = Field(
        None, ge=1, description="keep at most this many prototypes per set, evenly spaced over the list (None: all, the paper)")


class WindowConfig(_Strict):
    """The working grid and the windows the encoder/decoder see."""

    spacing_mm: float = Field(1.5, gt=0, description="isotropic spacing of the working grid (mm)")
    size: tuple[int, int, int] = Field((128, 128, 128), description="window size in voxels")
    min_overlap: float = Field(0.25, ge=0, lt=1, description="minimum overlap of neighbouring query windows (fraction)")
    margin_mm: float = Field(15.0, ge=0, description="margin added around the region of interest before placing windows (mm)")

    @field_validator("size", mode="before")
    @classmethod
    def _size_from_int(cls, value: Any) -> Any:
        if isinstance(value, int):
            return (value, value, value)
        return value

    @field_validator("size")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(value) < 8:
            raise ValueError(f"window sides must be >= 8 voxels, got {value}")
        return value


#: the paper's prior settings (every option of :class:`PriorsConfig` off); presets of other
#: encoders should set ``"priors": PAPER_PRIORS`` since the defaults below are the classical path's
PAPER_PRIORS: dict[str, Any] = PriorsConfig().model_dump()

#: the ``classical`` preset: weight-free and cross-modal; also the defaults of :class:`PipelineConfig`
#: (see docs/classical.md for the choices and the measured ablation)
CLASSICAL: dict[str, Any] = {
    "registration": {"name": "sitk", "options": {}},
    "encoder": {"name": "mind", "options": {"mind_weight": 0.5, "intensity_bins": 96, "intensity_range": (-2.0, 4.0)}},
    "fusion": {"name": "entropy_gate", "options": {}},
    "decoder": {"name": "appearance", "options": {"largest_component": True}},
    "priors": {**PAPER_PRIORS, "query_prototypes": "replace", "semantic": "contrastive", "semantic_reach_mm": 0.5,
               "max_prototypes": 1024},
}


class PipelineConfig(_Strict):
    """Everything that defines one run of the method (defaults: the ``classical`` preset)."""

    registration: StageConfig = Field(default_factory=lambda: StageConfig.model_validate(CLASSICAL["registration"]))
    encoder: StageConfig = Field(default_factory=lambda: StageConfig.model_validate(CLASSICAL["encoder"]))
    fusion: StageConfig = Field(default_factory=lambda: StageConfig.model_validate(CLASSICAL["fusion"]))
    decoder: StageConfig = Field(default_factory=lambda: StageConfig.model_validate(CLASSICAL["decoder"]))
    priors: PriorsConfig = Field(default_factory=lambda: PriorsConfig.model_validate(CLASSICAL["priors"]))
    window: WindowConfig = Field(default_factory=WindowConfig)
    label: int | None = Field(None, ge=1, description="label id to segment in multi-label support masks (None: all non-zero)")
    threshold: float = Field(0.0, description="decoder logits above this are inside the structure")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N")
    mixed_precision: bool = Field(False, description="allow fp16/bf16 autocast on CUDA")
    seed: int = Field(0, description="seed for anything random")
    resample_mask: bool = Field(False, description="resample a support mask stored on another grid than its image")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        v = value.strip().lower()
        if v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()) or v == "mps":
            return v
        raise ValueError(f"expected 'cpu', 'cuda' or 'cuda:N', got '{value}'")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge mappings; ``override`` wins. A stage given as a plain string replaces
    the stage (its options are dropped when the backend name changes)."""
    out: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key in ("registration", "encoder", "fusion", "decoder"):
            value = {"name": value} if isinstance(value, str) else dict(value)
            old = out.get(key)
            old = {"name": old} if isinstance(old, str) else dict(old or {})
            if "name" in value and value["name"] != old.get("name"):
                old = {}
            merged = {**old, **{k: v for k, v in value.items() if k != "options"}}
            if "options" in value:
                merged["options"] = {**old.get("options", {}), **value["options"]}
            out[key] = merged
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file '{path}': no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise InputError(f"config file '{path}': unsupported type '{suffix}'; expected .toml, .yaml or .yml")
    except InputError:
        raise
    except Exception as exc:  # parse errors of either library
        raise ConfigError(f"config file '{path}': cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level, got {type(data).__name__}")
    return data


def build_config(*layers: Mapping[str, Any] | None, source: str = "configuration") -> PipelineConfig:
    """Merge ``layers`` (later wins) and validate; :class:`ConfigError` lists ``field: message``."""
    merged: dict[str, Any] = PipelineConfig().model_dump()
    for layer in layers:
        if layer:
            merged = deep_merge(merged, layer)
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}: " + format_validation_error(exc)) from None


DeviceName = Literal["cpu", "cuda"]
