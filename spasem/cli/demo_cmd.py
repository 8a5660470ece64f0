"""``spasem demo``: the offline demonstration on synthetic CT/MR phantoms (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="output folder (created if missing)")
@click.option("--organs", default=None, help="comma-separated organs [default: liver,spleen,left_kidney,right_kidney]")
@click.option("--support-subject", type=click.IntRange(min=0), default=0, show_default=True, help="phantom subject of the CT support")
@click.option("--query-subject", type=click.IntRange(min=0), default=1, show_default=True, help="phantom subject of the MR query")
@click.option("--seed", type=int, default=0, show_default=True, help="phantom cohort seed")
@click.option("-q", "--quiet", is_flag=True, help="no progress on stderr (the results table is still printed)")
def demo(out_dir: Path, organs: str | None, support_subject: int, query_subject: int, seed: int, quiet: bool) -> None:
    """Segment the organs of a synthetic MR (query) from one annotated synthetic CT of another
    subject (support) with the default weight-free configuration; write the prediction, the
    priors and one figure per organ to OUT, and print Dice and seconds per stage."""
    from spasem.core.progress import Progress
    from spasem.demo import STAGES, parse_organs, run_demo

    names = parse_organs(organs)  # fail before any compute
    result = run_demo(out_dir, names, support_subject, query_subject, seed=seed, progress=Progress(enabled=not quiet))
    stages = [s for s in STAGES if any(s in r.timings for r in result.organs)]
    click.echo(f"one-shot CT (subject {support_subject}) -> MR (subject {query_subject}), default configuration")
    click.echo(f"{'organ':<14}{'Dice':>7}{'total s':>9}  " + "  ".join(f"{s:>9}" for s in stages))
    for r in result.organs:
        click.echo(f"{r.organ:<14}{r.dice:>7.3f}{r.seconds:>9.1f}  " + "  ".join(f"{r.timings.get(s, 0.0):>9.1f}" for s in stages))
    mean = sum(r.dice for r in result.organs) / len(result.organs)
    click.echo(f"{'mean':<14}{mean:>7.3f}{sum(r.seconds for r in result.organs):>9.1f}")
    click.echo(f"outputs in {out_dir}/ ({len(result.files)} files; figures: "
               + ", ".join(r.figure.name for r in result.organs if r.figure) + f"); {result.seconds:.0f} s in all")
