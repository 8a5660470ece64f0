"""The plugin engine: a pluggy plugin manager plus the registry of backends and presets.

Loading order: the built-in plugin modules (:data:`BUILTIN_PLUGINS`), then every entry point of
the ``spasem`` group unless disabled. Environment variables:

* ``SPASEM_DISABLE_PLUGIN_AUTOLOAD=1`` — load no third-party entry points;
* ``SPASEM_LOAD_PLUGINS=a,b`` — load only the entry points whose name or distribution is listed
  (an empty value loads none).

After loading, ``pm.check_pending()`` makes a misspelled hook name fail loudly.
"""

from __future__ import annotations

import importlib
import importlib.metadata as importlib_metadata
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pluggy

from spasem import hookspecs
from spasem.core.backends import KIND_BASES, Backend, RunContext
from spasem.errors import ConfigError, PluginError, UnknownBackendError

ENTRY_POINT_GROUP = "spasem"

#: modules that register the built-in backends, loaded exactly like third-party plugins
BUILTIN_PLUGINS: tuple[str, ...] = (
    "spasem.plugins.registration.basic",
    "spasem.plugins.registration.multimodal",
    "spasem.plugins.encoders.intensity",
    "spasem.plugins.encoders.mind",
    "spasem.plugins.fusion.builtin",
    "spasem.plugins.decoders.threshold",
    "spasem.plugins.decoders.appearance",
    "spasem.plugins.presets",
    "spasem.plugins.registration.gradicon",
    "spasem.plugins.encoders.sam_med3d",
    "spasem.plugins.decoders.sam_med3d",
)

#: hook name per backend kind
KIND_HOOKS = {
    "registration": "spasem_register_registrations",
    "encoder": "spasem_register_encoders",
    "fusion": "spasem_register_fusions",
    "decoder": "spasem_register_decoders",
}


@dataclass(frozen=True)
class Provider:
    """Who registered something: plugin name, and the distribution (package) and version
    that ships it."""

    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class BackendInfo:
    kind: str
    name: str
    cls: type[Backend]
    provider: Provider

    @property
    def description(self) -> str:
        """The backend's ``description``, else the first line of its docstring."""
        if self.cls.description:
            return self.cls.description
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@dataclass(frozen=True)
class PresetInfo:
    name: str
    config: Mapping[str, Any]
    description: str
    provider: Provider


@dataclass
class Registry:
    """Backends and presets registered by all loaded plugins."""

    plugin_manager: pluggy.PluginManager
    backends: dict[str, dict[str, BackendInfo]] = field(default_factory=lambda: {k: {} for k in KIND_BASES})
    presets: dict[str, PresetInfo] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        return sorted(self.backends[kind])

    def get(self, kind: str, name: str) -> BackendInfo:
        if kind not in self.backends:
            raise ValueError(f"unknown backend kind {kind!r}")
        try:
            return self.backends[kind][name]
        except KeyError:
            raise UnknownBackendError(kind, name, self.names(kind)) from None

    def create(self, kind: str, name: str, options: Mapping[str, Any] | None = None, context: RunContext | None = None) -> Backend:
        """Instantiate backend ``name`` of ``kind`` with validated ``options``."""
        info = self.get(kind, name)
        config = info.cls.parse_options(options)
        return info.cls(config, context or RunContext())

    def preset(self, name: str) -> PresetInfo:
        try:
            return self.presets[name]
        except KeyError:
            names = ", ".join(sorted(self.presets)) or "(none registered)"
            raise ConfigError(f"unknown preset '{name}'; available: {names}") from None


def _provider_of_object(plugin: Any, name: str) -> Provider:
    """Provider of a plugin registered without an entry point: the distribution that ships its
    top-level package, if any."""
    module_name = getattr(plugin, "__module__", None) if not hasattr(plugin, "__spec__") else plugin.__name__
    top = (module_name or "").split(".")[0]
    if top == "spasem":
        from spasem import __version__

        return Provider(name, "spasem", __version__)
    for dist_name in importlib_metadata.packages_distributions().get(top, []):
        try:
            return Provider(name, dist_name, importlib_metadata.version(dist_name))
        except importlib_metadata.PackageNotFoundError:  # pragma: no cover - inconsistent metadata
            continue
    return Provider(name, top or "(unpackaged)", "")


def providers_of(pm: pluggy.PluginManager) -> dict[str, Provider]:
    """Plugin name -> provider, for every plugin registered through :func:`create_plugin_manager`."""
    return getattr(pm, "spasem_providers", {})


def _wanted_entry_points() -> list[importlib_metadata.EntryPoint]:
    if os.environ.get("SPASEM_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0", "false", "no"):
        return []
    eps = list(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP))
    allow = os.environ.get("SPASEM_LOAD_PLUGINS")
    if allow is None:
        return eps
    wanted = {item.strip() for item in allow.split(",") if item.strip()}
    return [ep for ep in eps if ep.name in wanted or (ep.dist is not None and ep.dist.metadata["name"] in wanted)]


def create_plugin_manager(load_entrypoints: bool = True, extra_plugins: tuple[Any, ...] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with the hook specs, the built-in plugins, the entry-point
    plugins (unless disabled) and ``extra_plugins`` (objects or modules) registered."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, Provider] = {}
    pm.spasem_providers = providers  # type: ignore[attr-defined]
    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        _register(pm, module, module_name)
        providers[module_name] = _provider_of_object(module, module_name)
    if load_entrypoints:
        for ep in _wanted_entry_points():
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                dist = ep.dist.metadata["name"] if ep.dist is not None else "?"
                raise PluginError(
                    f"plugin '{ep.name}' (from distribution {dist}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            _register(pm, plugin, ep.name)
            if ep.dist is not None:
                providers[ep.name] = Provider(ep.name, ep.dist.metadata["name"], ep.dist.version)
            else:  # pragma: no cover - entry points always come from a distribution
                providers[ep.name] = _provider_of_object(plugin, ep.name)
    for plugin in extra_plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        _register(pm, plugin, name)
        providers[name] = _provider_of_object(plugin, name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"invalid plugin hook: {exc}") from None
    return pm


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin '{name}': {exc}") from None
    except ValueError as exc:  # name already registered
        raise PluginError(f"plugin '{name}': {exc}") from None


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Ask every plugin to register its backends and presets, checking types and names."""
    registry = Registry(pm)
    providers = providers_of(pm)

    def provider_of(impl: pluggy.HookImpl) -> Provider:
        return providers.get(impl.plugin_name) or _provider_of_object(impl.plugin, impl.plugin_name)

    for kind, hook_name in KIND_HOOKS.items():
        base = KIND_BASES[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = provider_of(impl)
            impl.function(register=_backend_registrar(registry, kind, base, provider))
    for impl in pm.hook.spasem_register_presets.get_hookimpls():
        impl.function(register=_preset_registrar(registry, provider_of(impl)))
    return registry


def _backend_registrar(registry: Registry, kind: str, base: type[Backend], provider: Provider) -> Callable[[type], None]:
    def register(cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(
                f"plugin '{provider.plugin}' registered {cls!r} as a {kind} backend; expected a subclass of "
                f"{base.__module__}.{base.__qualname__}"
            )
        if getattr(cls, "__abstractmethods__", None):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise PluginError(f"plugin '{provider.plugin}': {kind} backend {cls.__qualname__} does not implement {missing}")
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name.strip():
            raise PluginError(f"plugin '{provider.plugin}': {kind} backend {cls.__qualname__} has no name")
        existing = registry.backends[kind].get(name)
        if existing is not None:
            raise PluginError(
                f"{kind} backend name '{name}' registered twice: by plugin '{existing.provider.plugin}' "
                f"({existing.provider.distribution}) and by plugin '{provider.plugin}' ({provider.distribution})"
            )
        registry.backends[kind][name] = BackendInfo(kind, name, cls, provider)

    return register


def _preset_registrar(registry: Registry, provider: Provider) -> Callable[..., None]:
    def register(name: str, config: Mapping[str, Any], description: str = "") -> None:
        if not isinstance(name, str) or not name.strip():
            raise PluginError(f"plugin '{provider.plugin}' registered a preset without a name")
        if not isinstance(config, Mapping):
            raise PluginError(f"plugin '{provider.plugin}': preset '{name}' config must be a mapping")
        existing = registry.presets.get(name)
        if existing is not None:
            raise PluginError(
                f"preset '{name}' registered twice: by plugin '{existing.provider.plugin}' and by plugin '{provider.plugin}'"
            )
        registry.presets[name] = PresetInfo(name, dict(config), description, provider)

    return register


_default_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _default_registry
    if _default_registry is None or reload:
        _default_registry = build_registry(create_plugin_manager())
    return _default_registry


def reset_registry() -> None:
    """Forget the process-wide registry (tests, after changing plugin environment variables)."""
    global _default_registry
    _default_registry = None
