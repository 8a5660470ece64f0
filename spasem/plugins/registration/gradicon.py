"""Foundation-model registration: ``unigradicon``, ``multigradicon`` and ``gradicon`` (picks one
of them from the two scans' modalities).

* ``unigradicon``: uniGradICON, trained within modalities (CT-CT, MR-MR).
* ``multigradicon``: multiGradICON, trained across modalities as well (CT-MR).
* ``gradicon`` (the paper preset's choice): ``model: auto`` uses multiGradICON when support and
  query differ in modality and uniGradICON when they share one; ``uni`` / ``multi`` force one.

Steps for one pair (details in :mod:`spasem.models.gradicon`):

1. modality of each scan: ``Volume.modality`` (DICOM sets it; the CLI has ``--support-modality``
   / ``--query-modality``), else guessed from intensities: CT when the 1st percentile is at or
   below -500 (HU air), else MR;
2. intensities clamped and scaled to [0, 1] as the models expect: CT [-1000, 1000] HU, MR
   [minimum, 99th percentile];
3. both resampled (linearly, in physical space) onto canonical RAS *network boxes* of the
   network's input shape (175^3 by default), of a common physical size by default;
4. one forward pass support -> query (plus optional instance optimisation), giving a dense
   displacement on the query box;
5. returned as a SimpleITK transform (query LPS point -> support LPS point) that warps a
   support mask onto any grid of the query frame.

Instance optimisation fine-tunes the network on the pair (the models' default: 50 Adam steps,
learning rate 2e-5, LNCC). It costs minutes and >10 GB per step on a CPU, so ``io_steps``
defaults to 0 on CPU and to 50 on CUDA; the choice is reported on the progress output.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from spasem.core.backends import RegistrationBackend, SitkTransform, Transform
from spasem.core.resample import resample
from spasem.core.volume import Volume
from spasem.hookspecs import hookimpl

OFFICIAL_INPUT_SHAPE = (175, 175, 175)


class GradICONOptions(BaseModel):
    """Options shared by the GradICON-family backends."""

    model_config = ConfigDict(extra="forbid")

    input_shape: tuple[int, int, int] = Field(
        OFFICIAL_INPUT_SHAPE, description="network input grid in voxels (official 175^3; each side >= 65)"
    )
    io_steps: int | None = Field(
        None, ge=0, le=10_000,
        description="instance-optimisation steps (0 = none; default: 0 on CPU, the models' 50 on CUDA)",
    )
    io_similarity: Literal["lncc", "lncc2", "mind"] = Field(
        "lncc", description="similarity of the instance optimisation (lncc, squared lncc, MIND-SSC)"
    )
    io_learning_rate: float = Field(2e-5, gt=0, description="Adam learning rate of the instance optimisation")
    field_of_view: Literal["common", "own"] = Field(
        "common",
        description="network boxes: 'common' = same physical size for both scans (centres aligned, no "
        "scaling); 'own' = each scan's own field of view stretched onto the network grid",
    )

    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape_from_int(cls, value):
        if isinstance(value, int):
            return (value, value, value)
        return value

    @field_validator("input_shape")
    @classmethod
    def _shape_large_enough(cls, value):
        if min(value) < 65:
            raise ValueError(f"each side must be at least 65 voxels (the network's pooling pyramid), got {value}")
        return value


class _GradICONBase(RegistrationBackend):
    """Registration with a GradICON-family foundation model (see module docstring)."""

    #: 'uni', 'multi' or None (choose from the modalities)
    fixed_model: ClassVar[str | None] = None
    Config = GradICONOptions

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self._networks: dict[str, object] = {}
        self._io_reported = False
        #: the model ('uni'/'multi') and modalities used by the last :meth:`register` call
        self.last_choice: dict[str, str] = {}

    # -- choices ---------------------------------------------------------------------------
    def _modality(self, volume: Volume, role: str) -> str:
        from spasem.models.gradicon import guess_modality

        if volume.modality in ("CT", "MR"):
            return volume.modality
        guessed = guess_modality(volume)
        self.context.progress.message(
            f"{role} modality unknown: taken for {guessed} from its intensities "
            f"({'1st percentile <= -500, i.e. air in HU' if guessed == 'CT' else 'no air-like values below -500'}); "
            f"give --{role}-modality to set it"
        )
        return guessed

    def choose_model(self, support_modality: str, query_modality: str) -> str:
        """'uni' or 'multi' for this pair."""
        if self.fixed_model is not None:
            return self.fixed_model
        requested = getattr(self.config, "model", "auto")
        if requested != "auto":
            return requested
        return "uni" if support_modality == query_modality else "multi"

    def io_steps(self) -> int:
        steps = self.config.io_steps
        if steps is None:
            steps = 50 if self.device.type == "cuda" else 0
            if not self._io_reported:
                self.context.progress.message(
                    "instance optimisation: 50 steps (the models' default, on CUDA)"
                    if steps
                    else "instance optimisation: off (CPU default; it takes minutes and >10 GB per step here; "
                    "set registration.options.io_steps=N to force it)"
                )
        elif not self._io_reported:
            self.context.progress.message(f"instance optimisation: {steps} step(s) ({self.config.io_similarity})")
        self._io_reported = True
        return int(steps)

    def checkpoint_for(self, model: str) -> str | None:
        """The local weights file the options give for 'uni' / 'multi' (None: the cached official file)."""
        return getattr(self.config, f"{model}_checkpoint", None) or getattr(self.config, "checkpoint", None)

    def network(self, model: str):
        """The loaded network for 'uni' or 'multi' (weights resolved, downloaded if allowed)."""
        if model not in self._networks:
            from spasem import weights
            from spasem.models.gradicon import ARCHITECTURES, WEIGHT_NAMES, load_network

            path = weights.resolve(WEIGHT_NAMES[model], self.checkpoint_for(model), progress=self.context.progress.enabled)
            with self.context.progress.stage(f"loading {ARCHITECTURES[model]} ({path.name})"):
                self._networks[model] = load_network(path, model, self.config.input_shape, self.device)
        return self._networks[model]

    # -- registration ----------------------------------------------------------------------
    def register(self, support: Volume, query: Volume) -> Transform:
        from spasem.models import gradicon as G

        s_mod = self._modality(support, "support")
        q_mod = self._modality(query, "query")
        model = self.choose_model(s_mod, q_mod)
        self.last_choice = {"model": model, "support_modality": s_mod, "query_modality": q_mod}
        net = self.network(model)
        steps = self.io_steps()
        shape = tuple(int(s) for s in self.config.input_shape)
        support_box, query_box = G.network_boxes(support.grid, query.grid, shape, self.config.field_of_view)
        moving = resample(G.normalise(support, s_mod), support_box, interpolation="linear", fill=0.0)
        fixed = resample(G.normalise(query, q_mod), query_box, interpolation="linear", fill=0.0)
        moving_t = G.to_network(moving.array, self.device)
        fixed_t = G.to_network(fixed.array, self.device)
        with self.context.progress.stage(f"{G.ARCHITECTURES[model]}: {s_mod} support -> {q_mod} query at {'x'.join(map(str, shape))}"):
            if steps > 0:
                displacement = G.instance_optimise(
                    net, moving_t, fixed_t, steps, self.config.io_learning_rate, self.config.io_similarity,
                    report=self._report_step(steps),
                )
            else:
                displacement = G.predict_displacement(net, moving_t, fixed_t)
        if not np.all(np.isfinite(displacement)):
            from spasem.errors import PipelineError

            raise PipelineError(f"{G.ARCHITECTURES[model]} returned a non-finite displacement (corrupt weights?)")
        return GradICONTransform(G.make_transform(displacement, query_box, support_box), displacement, query_box, support_box)

    def _report_step(self, total: int):
        progress = self.context.progress

        def report(step: int, loss: float) -> None:
            if step == 1 or step == total or step % 10 == 0:
                progress.message(f"instance optimisation step {step}/{total}: loss {loss:.4f}")

        return report


class GradICONTransform(SitkTransform):
    """A GradICON result: the SimpleITK transform plus the raw displacement and the boxes.

    :param displacement: ``[3, I, J, K]`` query-box voxels, components (i, j, k).
    """

    def __init__(self, transform, displacement: np.ndarray, query_box, support_box):
        super().__init__(transform)
        self.displacement = displacement
        self.query_box = query_box
        self.support_box = support_box


class SingleModelConfig(GradICONOptions):
    checkpoint: str | None = Field(
        None, description="local weights file (Step_2_final.trch) instead of the cached official one"
    )


class GradICONConfig(GradICONOptions):
    model: Literal["auto", "uni", "multi"] = Field(
        "auto", description="'auto': multiGradICON across modalities, uniGradICON within one; or force 'uni'/'multi'"
    )
    uni_checkpoint: str | None = Field(None, description="local uniGradICON weights file instead of the cached official one")
    multi_checkpoint: str | None = Field(None, description="local multiGradICON weights file instead of the cached official one")


class GradICONRegistration(_GradICONBase):
    """uniGradICON within a modality, multiGradICON across modalities (the paper's choice)."""

    name = "gradicon"
    description = "foundation-model registration: multiGradICON across modalities, uniGradICON within one"
    Config = GradICONConfig


class UniGradICONRegistration(_GradICONBase):
    """uniGradICON foundation-model registration (within one modality)."""

    name = "unigradicon"
    description = "uniGradICON foundation-model registration (weights: `spasem weights fetch unigradicon`)"
    fixed_model = "uni"
    Config = SingleModelConfig


class MultiGradICONRegistration(_GradICONBase):
    """multiGradICON foundation-model registration (also across modalities)."""

    name = "multigradicon"
    description = "multiGradICON foundation-model registration, cross-modal (weights: `spasem weights fetch multigradicon`)"
    fixed_model = "multi"
    Config = SingleModelConfig


@hookimpl
def spasem_register_registrations(register):
    register(GradICONRegistration)
    register(UniGradICONRegistration)
    register(MultiGradICONRegistration)
