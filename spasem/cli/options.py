"""Helpers shared by CLI commands: config layering from flags, `--set` parsing."""

from __future__ import annotations

from typing import Any, Iterable

import yaml

from spasem.errors import ConfigError


def parse_set_options(items: Iterable[str]) -> dict[str, Any]:
    """``KEY.PATH=VALUE`` strings -> nested mapping; VALUE is read as YAML (numbers, booleans,
    lists), e.g. ``encoder.options.stride=4``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. encoder.options.stride=4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set '{item}': empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out
