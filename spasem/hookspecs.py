"""Every hook a spasem plugin can implement.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names match
the specs below. Built-in backends are plugins of exactly this kind (see ``spasem/plugins/``);
third-party packages expose theirs through the ``spasem`` entry-point group::

    [project.entry-points.spasem]
    my_backends = "my_package.spasem_plugin"

Each ``spasem_register_*`` hook receives a ``register`` callback; call it once per backend class.
The host checks the class (it must subclass the kind's base class in :mod:`spasem.core.backends`
and define ``name``) and refuses a name that another plugin already registered.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "spasem"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: decorator for plugin hook implementations: ``@spasem.hookimpl``
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def spasem_register_registrations(register):
    """Register registration backends (support -> query alignment).

    :param register: ``register(cls)`` where ``cls`` subclasses
        :class:`spasem.core.backends.RegistrationBackend`.
    :returns: nothing.
    """


@hookspec
def spasem_register_encoders(register):
    """Register feature encoders (window image -> feature map).

    :param register: ``register(cls)`` where ``cls`` subclasses :class:`spasem.core.backends.Encoder`.
    :returns: nothing.
    """


@hookspec
def spasem_register_fusions(register):
    """Register fusion strategies (P_reg, P_sim, entropy -> fused logits).

    :param register: ``register(cls)`` where ``cls`` subclasses :class:`spasem.core.backends.Fusion`.
    :returns: nothing.
    """


@hookspec
def spasem_register_decoders(register):
    """Register decoders (fused logits + query features -> segmentation logits).

    :param register: ``register(cls)`` where ``cls`` subclasses :class:`spasem.core.backends.Decoder`.
    :returns: nothing.
    """


@hookspec
def spasem_register_presets(register):
    """Register named pipeline presets (``spasem run --preset NAME``).

    :param register: ``register(name, config, description="")`` where ``config`` is a mapping
        accepted by :class:`spasem.core.config.PipelineConfig` (partial: unspecified fields keep
        their defaults).
    :returns: nothing.
    """


@hookspec
def spasem_register_commands(cli):
    """Add sub-commands to the ``spasem`` command line.

    :param cli: the top-level :class:`click.Group`; call ``cli.add_command(...)`` or decorate
        functions with ``@cli.command()``.
    :returns: nothing.
    """
