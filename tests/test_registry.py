"""The plugin engine: hook specs, built-ins, third-party plugins, entry points, errors."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field

import spasem
from spasem.cli.main import cli
from spasem.core import registry as reg
from spasem.core.backends import Encoder, Features, RegistrationBackend
from spasem.errors import ConfigError, PluginError, UnknownBackendError
from spasem.hookspecs import hookimpl


def _fresh(*plugins, load_entrypoints=False) -> reg.Registry:
    return reg.build_registry(reg.create_plugin_manager(load_entrypoints=load_entrypoints, extra_plugins=plugins))


def test_builtins_are_registered_like_plugins_with_their_provider():
    registry = _fresh()
    assert {"identity", "centers"} <= set(registry.names("registration"))
    assert {"entropy_gate", "mean", "spatial_only", "semantic_only"} <= set(registry.names("fusion"))
    info = registry.get("fusion", "entropy_gate")
    assert info.provider.distribution == "spasem" and info.provider.version == spasem.__version__
    assert info.provider.plugin == "spasem.plugins.fusion.builtin"
    assert "basic" in registry.presets


class TinyEncoder(Encoder):
    """Intensity as a one-channel feature."""

    name = "tiny"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        gain: float = Field(1.0, description="multiplies the intensity")

    def encode(self, image):
        data = torch.as_tensor(np.asarray(image.array, np.float32))[None] * self.config.gain
        return Features(data, image.grid, image.grid)


class TinyPlugin:
    @hookimpl
    def spasem_register_encoders(self, register):
        register(TinyEncoder)

    @hookimpl
    def spasem_register_presets(self, register):
        register("tiny-preset", {"encoder": "tiny"}, "uses the tiny encoder")


def test_third_party_plugin_object_adds_backend_and_preset():
    registry = _fresh(TinyPlugin())
    enc = registry.create("encoder", "tiny", {"gain": 2.0})
    assert isinstance(enc, TinyEncoder) and enc.config.gain == 2.0
    assert registry.preset("tiny-preset").config == {"encoder": "tiny"}


def test_unknown_backend_and_bad_options_name_kind_value_and_choices():
    registry = _fresh(TinyPlugin())
    with pytest.raises(UnknownBackendError, match=r"unknown encoder 'nope'; available: .*intensity.*, tiny") as err:
        registry.get("encoder", "nope")
    assert err.value.available == sorted(registry.names("encoder"))
    with pytest.raises(ConfigError, match=r"encoder 'tiny': gan: unknown option"):
        registry.create("encoder", "tiny", {"gan": 2})
    with pytest.raises(ConfigError, match=r"encoder 'tiny': gain: Input should be a valid number"):
        registry.create("encoder", "tiny", {"gain": "lots"})
    with pytest.raises(ConfigError, match="unknown preset 'x'; available: basic"):  # sorted list follows
        _fresh().preset("x")


def test_name_collision_is_refused_naming_both_plugins():
    class Clash:
        @hookimpl
        def spasem_register_fusions(self, register):
            from spasem.plugins.fusion.builtin import MeanFusion

            class OtherMean(MeanFusion):
                name = "mean"

            register(OtherMean)

    with pytest.raises(PluginError, match=r"fusion backend name 'mean' registered twice: by plugin 'spasem.plugins.fusion.builtin'"):
        _fresh(Clash())


def test_wrong_backend_type_or_abstract_class_is_refused():
    class WrongKind:
        @hookimpl
        def spasem_register_registrations(self, register):
            register(TinyEncoder)

    with pytest.raises(PluginError, match="expected a subclass of spasem.core.backends.RegistrationBackend"):
        _fresh(WrongKind())

    class Abstract(RegistrationBackend):
        name = "abstract"

    class Incomplete:
        @hookimpl
        def spasem_register_registrations(self, register):
            register(Abstract)

    with pytest.raises(PluginError, match="does not implement register"):
        _fresh(Incomplete())


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def spasem_register_encoder(self, register):  # missing "s"
            pass

    with pytest.raises(PluginError, match="spasem_register_encoder"):
        _fresh(Typo())


# ---------------------------------------------------------------------------------------------
# entry points, through a real (tiny) installed distribution
# ---------------------------------------------------------------------------------------------
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A third-party spasem plugin: a registration backend and an encoder."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from pydantic import BaseModel, ConfigDict, Field

    import spasem
    from spasem.core.backends import Encoder, Features, RegistrationBackend, SitkTransform


    class ShiftRegistration(RegistrationBackend):
        """Translation by a fixed vector (mm)."""
        name = "acme-shift"

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            shift_mm: tuple[float, float, float] = Field((0.0, 0.0, 0.0), description="query->support shift")

        def register(self, support, query):
            return SitkTransform(sitk.TranslationTransform(3, self.config.shift_mm))


    class BrightnessEncoder(Encoder):
        """Two channels: intensity and its complement."""
        name = "acme-brightness"

        def encode(self, image):
            x = torch.as_tensor(np.asarray(image.array, np.float32))
            x = (x - x.mean()) / (x.std() + 1e-6)
            pooled = torch.nn.functional.avg_pool3d(torch.stack([x, -x])[None], 4, 4, ceil_mode=True)[0]
            return Features(pooled, image.grid.scaled(4), image.grid)


    @spasem.hookimpl
    def spasem_register_registrations(register):
        register(ShiftRegistration)


    @spasem.hookimpl
    def spasem_register_encoders(register):
        register(BrightnessEncoder)
    '''
)


@pytest.fixture
def acme_distribution(tmp_path, monkeypatch):
    """Install a real tiny distribution 'acme-spasem' (package + dist-info with an entry point)
    on sys.path."""
    site = tmp_path / "site"
    (site / "acme_spasem").mkdir(parents=True)
    (site / "acme_spasem" / "__init__.py").write_text(PLUGIN_SOURCE)
    info = site / "acme_spasem-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-spasem\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[spasem]\nacme = acme_spasem\n")
    (info / "top_level.txt").write_text("acme_spasem\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "acme_spasem", raising=False)
    monkeypatch.delenv("SPASEM_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("SPASEM_LOAD_PLUGINS", raising=False)
    reg.reset_registry()
    return site


def test_entry_point_plugin_is_discovered_with_its_distribution(acme_distribution):
    registry = reg.build_registry(reg.create_plugin_manager())
    info = registry.get("registration", "acme-shift")
    assert (info.provider.plugin, info.provider.distribution, info.provider.version) == ("acme", "acme-spasem", "1.2.3")
    assert registry.get("encoder", "acme-brightness").provider.distribution == "acme-spasem"


def test_autoload_can_be_disabled_or_allow_listed(acme_distribution, monkeypatch):
    monkeypatch.setenv("SPASEM_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "acme-shift" not in reg.build_registry(reg.create_plugin_manager()).names("registration")
    monkeypatch.delenv("SPASEM_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("SPASEM_LOAD_PLUGINS", "someone-else")
    assert "acme-shift" not in reg.build_registry(reg.create_plugin_manager()).names("registration")
    monkeypatch.setenv("SPASEM_LOAD_PLUGINS", "acme-spasem")  # by distribution name
    assert "acme-shift" in reg.build_registry(reg.create_plugin_manager()).names("registration")
    monkeypatch.setenv("SPASEM_LOAD_PLUGINS", "acme")  # by entry point name
    assert "acme-shift" in reg.build_registry(reg.create_plugin_manager()).names("registration")


def test_broken_entry_point_is_reported(acme_distribution):
    (acme_distribution / "acme_spasem" / "__init__.py").write_text("raise ImportError('needs acme-core')\n")
    with pytest.raises(PluginError, match=r"plugin 'acme' \(from distribution acme-spasem\) failed to import: ImportError: needs acme-core"):
        reg.create_plugin_manager()


def test_cli_selects_third_party_backends_by_name(acme_distribution, tmp_path, blob):
    image, mask = blob
    spasem.save(image, tmp_path / "img.nii.gz")
    spasem.save(mask, tmp_path / "mask.nii.gz")
    runner = CliRunner()
    listing = runner.invoke(cli, ["plugins", "--json"])
    assert listing.exit_code == 0, listing.output
    data = json.loads(listing.output)
    shift = [b for b in data["backends"]["registration"] if b["name"] == "acme-shift"][0]
    assert (shift["distribution"], shift["version"]) == ("acme-spasem", "1.2.3")
    out = tmp_path / "pred.nii.gz"
    result = runner.invoke(cli, [
        "run", "--support", str(tmp_path / "img.nii.gz"), "--support-mask", str(tmp_path / "mask.nii.gz"),
        "--query", str(tmp_path / "img.nii.gz"), "-o", str(out), "--registration", "acme-shift",
        "--encoder", "acme-brightness", "--set", "window.size=48", "--fusion", "spatial_only", "-q",
    ])
    assert result.exit_code == 0, result.output
    pred = spasem.load(out, is_label=True)
    assert pred.grid.same_as(image.grid)
    overlap = 2 * np.sum((pred.array > 0) & (mask.array > 0)) / (pred.array.sum() + mask.array.sum())
    assert overlap > 0.9
    # an option of the third-party backend, validated by its own Config
    bad = runner.invoke(cli, [
        "run", "--support", str(tmp_path / "img.nii.gz"), "--support-mask", str(tmp_path / "mask.nii.gz"),
        "--query", str(tmp_path / "img.nii.gz"), "-o", str(out), "--registration", "acme-shift",
        "--set", "registration.options.shift_mm=[1, 2]",
    ])
    assert bad.exit_code == 2
    assert "registration 'acme-shift': shift_mm" in bad.output
