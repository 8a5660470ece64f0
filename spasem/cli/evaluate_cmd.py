"""``spasem evaluate``: the paper's evaluation protocol on your datasets (see docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path

import click

from spasem.cli.options import parse_set_options
from spasem.data.labelmaps import label_map_choices
from spasem.errors import ConfigError


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} '{text}': expected comma-separated integers, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{option} '{text}': expected positive integers, e.g. 1,2,4,8")
    return values


def _names(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


@click.command()
@click.option("--supports", required=True, type=click.Path(path_type=Path),
              help="manifest (JSON or CSV) of the annotated cases supports are drawn from")
@click.option("--queries", type=click.Path(path_type=Path), default=None,
              help="manifest of the cases to segment [default: the --supports manifest (uni-modal)]")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output folder (rerun to resume)")
@click.option("--organs", default="liver,left_kidney,right_kidney,spleen", show_default=True,
              help="organs, each evaluated on its own (liver, spleen, left_kidney / LK, right_kidney / RK)")
@click.option("--shots", default="1", show_default=True, help="numbers of supports k, e.g. 1,2,4,8")
@click.option("--draws", type=int, default=5, show_default=True, help="random support draws per query, organ and k")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the support draws")
@click.option("--preset", "presets", default=None,
              help="preset(s) to compare, comma-separated (see `spasem plugins`; 'default' = the default configuration) "
                   "[default: default]")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML or YAML configuration file applied on top of each preset")
@click.option("--set", "set_options", multiple=True, metavar="KEY=VALUE",
              help="any configuration field, e.g. window.size=64 (repeatable; applied to each preset)")
@click.option("--fusion", "fusions", default=None,
              help="fusion strategies to compare, comma-separated (entropy_gate,mean,spatial_only,semantic_only) "
                   "[default: the preset's]")
@click.option("--workers", type=int, default=None,
              help="worker processes on this machine [default: one per core, at most one per 3 GiB of memory]")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="run on a Dask distributed cluster, e.g. tcp://host:8786 (files must be visible to the workers)")
@click.option("--support-modality", default=None, help="use only the support cases of this modality (CT or MR)")
@click.option("--query-modality", default=None, help="use only the query cases of this modality (CT or MR)")
@click.option("--support-label-map", default=None, metavar="NAME|FILE",
              help="organ -> label id of the support dataset: " + label_map_choices() + " "
                   "[default: the manifest's label_names]")
@click.option("--query-label-map", default=None, metavar="NAME|FILE",
              help="the same for the query dataset [default: the manifest's label_names]")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: the preset's]")
@click.option("--save-predictions", is_flag=True, help="save every predicted mask under OUT/predictions/")
@click.option("--retry-failed", is_flag=True, help="rerun the cases that failed in an earlier run")
@click.option("--no-cache", is_flag=True, help="do not keep registrations and features under OUT/cache/")
@click.option("-q", "--quiet", is_flag=True, help="no progress on stderr")
def evaluate(supports, queries, out, organs, shots, draws, seed, presets, config_file, set_options, fusions, workers,
             scheduler, support_modality, query_modality, support_label_map, query_label_map, device, save_predictions,
             retry_failed, no_cache, quiet) -> None:
    """Evaluate 1-way k-shot segmentation: for every query, organ, k and draw, segment the query
    from k supports drawn from the support set, score Dice 3D / 2D and HD95, and write
    OUT/cases.csv, OUT/summary.json, OUT/table.md and plots."""
    from spasem.core.config import read_config_file
    from spasem.data.labelmaps import parse_organs, resolve_label_map
    from spasem.evaluation.evaluate import build_methods, evaluate as run_evaluation

    if workers is not None and scheduler is not None:
        raise click.UsageError("give either --workers (this machine) or --scheduler (a Dask cluster), not both")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1")
    organ_list = parse_organs(organs)
    shot_list = _int_list(shots, "--shots")
    layers = []
    if config_file is not None:
        layers.append(read_config_file(config_file))
    if device is not None:
        layers.append({"device": device})
    layers.append(parse_set_options(set_options))
    methods = build_methods(_names(presets) or [None], fusions=_names(fusions), layers=layers)
    outcome = run_evaluation(
        supports=supports, queries=queries, out=out, methods=methods, organs=organ_list, shots=shot_list,
        draws=draws, seed=seed, support_modality=support_modality, query_modality=query_modality,
        support_label_map=resolve_label_map(support_label_map, "--support-label-map") if support_label_map else None,
        query_label_map=resolve_label_map(query_label_map, "--query-label-map") if query_label_map else None,
        workers=workers, scheduler=scheduler, save_predictions=save_predictions, retry_failed=retry_failed,
        use_cache=not no_cache, progress=not quiet,
    )
    if not quiet:
        click.echo(
            f"{outcome.units} case(s): {outcome.skipped_finished} already finished, {outcome.ran} run now"
            f"{f', {outcome.lost} not finished (rerun to retry)' if outcome.lost else ''}; "
            f"{outcome.failed_rows} failed row(s) in cases.csv; {outcome.seconds:.1f} s",
            err=True,
        )
        click.echo(f"results -> {out}/table.md, cases.csv, summary.json, dice_vs_shots.png", err=True)
