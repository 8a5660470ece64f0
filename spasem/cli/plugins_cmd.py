"""``spasem plugins``: every backend per kind and every preset, with who provides it."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json: bool) -> None:
    """List registration, encoder, fusion and decoder backends and presets."""
    from spasem.core.registry import get_registry

    registry = get_registry()
    data = {
        "backends": {
            kind: [
                {
                    "name": info.name,
                    "description": info.description,
                    "plugin": info.provider.plugin,
                    "distribution": info.provider.distribution,
                    "version": info.provider.version,
                    "options": info.cls.Config.model_json_schema().get("properties", {}),
                }
                for info in sorted(entries.values(), key=lambda i: i.name)
            ]
            for kind, entries in registry.backends.items()
        },
        "presets": [
            {
                "name": p.name,
                "description": p.description,
                "config": p.config,
                "plugin": p.provider.plugin,
                "distribution": p.provider.distribution,
                "version": p.provider.version,
            }
            for p in sorted(registry.presets.values(), key=lambda p: p.name)
        ],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    for kind, entries in data["backends"].items():
        click.echo(f"{kind}:")
        width = max((len(e["name"]) for e in entries), default=0)
        for e in entries:
            provider = f"{e['distribution']} {e['version']}".strip()
            click.echo(f"  {e['name']:<{width}}  [{provider}]  {e['description']}")
            for opt, schema in e["options"].items():
                default = schema.get("default", "")
                desc = schema.get("description", "")
                click.echo(f"  {'':<{width}}    {opt}={default!s}: {desc}")
        click.echo("")
    click.echo("presets:")
    width = max((len(p["name"]) for p in data["presets"]), default=0)
    for p in data["presets"]:
        stages = ", ".join(
            f"{k}={v['name'] if isinstance(v, dict) else v}" for k, v in p["config"].items()
            if k in ("registration", "encoder", "fusion", "decoder")
        )
        click.echo(f"  {p['name']:<{width}}  [{p['distribution']} {p['version']}]  {p['description']}")
        if stages:
            click.echo(f"  {'':<{width}}    {stages}")
