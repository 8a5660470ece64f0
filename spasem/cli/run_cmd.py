"""``spasem run``: segment one query from k annotated supports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click
import numpy as np

from spasem.cli.options import parse_set_options
from spasem.core.progress import Progress
from spasem.errors import OutputError

PRIOR_FILES = {
    "p_reg": "p_reg.nii.gz",
    "p_sim": "p_sim.nii.gz",
    "entropy": "entropy.nii.gz",
    "fused_logits": "fused_logits.nii.gz",
    "logits": "logits.nii.gz",
}


def _check_priors_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError(f"--save-priors '{path}': exists and is not a folder")
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--save-priors '{path}': folder '{parent}' is not writable")


@click.command()
@click.option("--support", "supports", multiple=True, required=True, type=click.Path(path_type=Path),
              help="support image (file or DICOM folder); repeat for k shots")
@click.option("--support-mask", "support_masks", multiple=True, required=True, type=click.Path(path_type=Path),
              help="mask / label map of the support on its image's grid; one per --support, same order")
@click.option("--label", type=int, default=None, help="label id to segment in multi-label masks [default: all non-zero]")
@click.option("--query", required=True, type=click.Path(path_type=Path), help="image to segment (file or DICOM folder)")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="output mask (.nii.gz, .nii, .nrrd, .mha, ...) on the query's grid")
@click.option("--preset", default=None, help="named configuration (see `spasem plugins`)")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML or YAML configuration file (overrides the preset)")
@click.option("--registration", default=None, help="registration backend")
@click.option("--encoder", default=None, help="feature encoder backend")
@click.option("--fusion", default=None, help="fusion strategy (entropy_gate, mean, spatial_only, semantic_only, ...)")
@click.option("--decoder", default=None, help="decoder backend")
@click.option("--set", "set_options", multiple=True, metavar="KEY=VALUE",
              help="any configuration field, e.g. encoder.options.stride=4 or priors.sigma=3 (repeatable)")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cpu]")
@click.option("--seed", type=int, default=None, help="random seed [default: 0]")
@click.option("--support-modality", default=None, type=click.Choice(["CT", "MR"], case_sensitive=False),
              help="modality of the supports when the files do not say it")
@click.option("--query-modality", default=None, type=click.Choice(["CT", "MR"], case_sensitive=False),
              help="modality of the query when the file does not say it")
@click.option("--resample-mask", is_flag=True, help="resample a mask stored on another grid than its image (nearest neighbour)")
@click.option("--save-priors", type=click.Path(path_type=Path), default=None,
              help="folder for P_reg, P_sim, entropy, fused logits and decoder logits on the query's grid (NIfTI)")
@click.option("-q", "--quiet", is_flag=True, help="no progress or summary on stderr")
def run(supports, support_masks, label, query, output, preset, config_file, registration, encoder, fusion, decoder,
        set_options, device, seed, support_modality, query_modality, resample_mask, save_priors, quiet) -> None:
    """Segment QUERY with the structure drawn in the support mask(s)."""
    from spasem.core.config import build_config, read_config_file
    from spasem.core.io import check_writable, load, save_all
    from spasem.core.pipeline import Support, segment
    from spasem.core.registry import get_registry

    if len(supports) != len(support_masks):
        raise click.UsageError(
            f"got {len(supports)} --support and {len(support_masks)} --support-mask; give one mask per support image"
        )
    # fail on outputs and configuration before any compute
    check_writable(output, "output")
    if save_priors is not None:
        _check_priors_dir(save_priors)
    registry = get_registry()
    layers = []
    if preset is not None:
        layers.append(registry.preset(preset).config)
    if config_file is not None:
        layers.append(read_config_file(config_file))
    flags = {key: value for key, value in {
        "registration": registration, "encoder": encoder, "fusion": fusion, "decoder": decoder,
        "device": device, "seed": seed, "label": label,
    }.items() if value is not None}
    if resample_mask:
        flags["resample_mask"] = True
    layers.append(flags)
    layers.append(parse_set_options(set_options))
    config = build_config(*layers, source="configuration")
    for kind in ("registration", "encoder", "fusion", "decoder"):
        stage = getattr(config, kind)
        registry.get(kind, stage.name).cls.parse_options(stage.options)  # unknown names/options fail now

    progress = Progress(enabled=not quiet)
    pairs = []
    for image_path, mask_path in zip(supports, support_masks):
        image = load(image_path, modality=support_modality)
        mask = load(mask_path, is_label=True)
        pairs.append(Support(image, mask))
    query_volume = load(query, modality=query_modality)

    result = segment(pairs, query_volume, config, registry=registry, progress=progress)

    outputs = {output: result.mask}
    created_dir = False
    if save_priors is not None:
        if not save_priors.exists():
            save_priors.mkdir(parents=True)
            created_dir = True
        on_query = result.maps_on_query_grid(list(PRIOR_FILES))
        for name, filename in PRIOR_FILES.items():
            outputs[save_priors / filename] = on_query[name]
    try:
        save_all(outputs)
    except BaseException:
        if created_dir:
            shutil.rmtree(save_priors, ignore_errors=True)
        raise
    if not quiet:
        voxels = int(np.count_nonzero(result.mask.array))
        ml = voxels * float(np.prod(result.mask.spacing)) / 1000.0
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
        click.echo(f"segmented {voxels} voxels ({ml:.1f} mL) -> {output}", err=True)
        click.echo(f"{len(result.windows)} window(s), {result.num_prototypes} prototypes; {stages}", err=True)
        if save_priors is not None:
            click.echo(f"priors -> {save_priors}/", err=True)
    if not result.mask.array.any() and not quiet:
        click.echo("warning: the predicted mask is empty", err=True)

