"""Errors shown to the user.

Every error a user can cause or fix (bad file, bad option, missing weights, ...) is a
:class:`SpasemError`. The CLI prints its message on one line (no traceback) and exits with its
``exit_code``. Anything else that escapes is a bug in spasem or in a plugin.
"""

from __future__ import annotations


class SpasemError(Exception):
    """Base of all errors meant to be shown to the user as a one-line message."""

    exit_code: int = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message


class InputError(SpasemError):
    """An input file or value is missing, unreadable, or not what was expected."""

    exit_code = 2


class GeometryError(InputError):
    """Two volumes that must share a voxel grid (e.g. an image and its mask) do not."""


class ConfigError(SpasemError):
    """A configuration value, preset, or backend option is invalid."""

    exit_code = 2


class PluginError(SpasemError):
    """A plugin is broken: bad hook implementation, wrong backend type, name collision."""

    exit_code = 3


class UnknownBackendError(ConfigError):
    """A backend name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: list[str]):
        names = ", ".join(sorted(available)) or "(none registered)"
        super().__init__(f"unknown {kind} '{name}'; available: {names}")
        self.kind = kind
        self.name = name
        self.available = sorted(available)


class OutputError(SpasemError):
    """An output cannot be written (missing directory, no permission, ...)."""

    exit_code = 2


class WeightsError(SpasemError):
    """Model weights are missing, unreachable, corrupt, or do not match the architecture."""

    exit_code = 4


class PipelineError(SpasemError):
    """The method cannot produce a result for these inputs (e.g. registration lost the organ)."""

    exit_code = 5
