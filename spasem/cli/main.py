"""The ``spasem`` command line. This module only parses arguments and reports; the work happens
in :mod:`spasem.core`.

Errors: a :class:`~spasem.errors.SpasemError` is printed as one line ``spasem: error: ...`` and
exits with its ``exit_code``; a pydantic validation error as ``field: message`` (exit 2). Any other
exception is a bug: it is reported in one line with exit code 70, and re-raised with its
traceback when ``SPASEM_DEBUG=1`` or under pytest.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from pydantic import ValidationError

from spasem import __version__
from spasem.core.backends import format_validation_error
from spasem.errors import PluginError, SpasemError

INTERNAL_ERROR_EXIT = 70


def debug_mode() -> bool:
    """Re-raise unexpected exceptions (with traceback) instead of a one-line message."""
    return os.environ.get("SPASEM_DEBUG", "").strip() not in ("", "0") or "PYTEST_CURRENT_TEST" in os.environ


class UserFacingError(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"spasem: error: {self.format_message()}", err=True)


class SpasemGroup(click.Group):
    """Maps errors to clean messages and loads sub-commands contributed by plugins."""

    _plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        try:
            from spasem.core.registry import get_registry

            get_registry().plugin_manager.hook.spasem_register_commands(cli=self)
        except PluginError as exc:  # reported when a command needs the registry
            click.echo(f"spasem: warning: plugin commands not loaded: {exc}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, cmd_name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpasemError as exc:
            raise UserFacingError(exc.message, exc.exit_code) from exc
        except ValidationError as exc:
            raise UserFacingError(format_validation_error(exc), 2) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if debug_mode():
                raise
            raise UserFacingError(
                f"internal error: {type(exc).__name__}: {exc} (run with SPASEM_DEBUG=1 for the traceback and please report it)",
                INTERNAL_ERROR_EXIT,
            ) from exc


@click.group(cls=SpasemGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="spasem")
def cli() -> None:
    """spasem: training-free, one-shot, cross-modal 3D segmentation.

    Give one annotated scan (support image + mask) and a scan to segment (query); spasem
    registers, compares features, fuses both priors and decodes a mask on the query's grid.
    """


def _register_builtin_commands() -> None:
    from spasem.cli import demo_cmd, evaluate_cmd, manifest_cmd, phantoms_cmd, plugins_cmd, run_cmd, weights_cmd

    cli.add_command(run_cmd.run)
    cli.add_command(plugins_cmd.plugins)
    cli.add_command(phantoms_cmd.phantoms)
    cli.add_command(demo_cmd.demo)
    cli.add_command(weights_cmd.weights)
    cli.add_command(evaluate_cmd.evaluate)
    cli.add_command(manifest_cmd.manifest)


_register_builtin_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="spasem")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
