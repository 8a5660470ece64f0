"""``spasem phantoms``: write a synthetic CT/MR phantom cohort (NIfTI + manifest.json)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="output folder (created if missing)")
@click.option("--subjects", type=click.IntRange(min=1), required=True, help="number of subjects")
@click.option("--modalities", default="ct,mr", show_default=True, help="comma-separated modalities (ct, mr)")
@click.option("--seed", type=int, default=0, show_default=True, help="cohort seed (same seed -> same files)")
@click.option("--variability", type=float, default=1.0, show_default=True,
              help="factor on the organs' spread between subjects (position, size, orientation, shape), 0-4; "
                   "2-3 is closer to real inter-patient spread")
@click.option("-q", "--quiet", is_flag=True, help="no progress on stderr")
def phantoms(out_dir: Path, subjects: int, modalities: str, seed: int, variability: float, quiet: bool) -> None:
    """Write synthetic abdominal phantoms (liver 1, spleen 2, left_kidney 3, right_kidney 4)
    for SUBJECTS subjects in each modality, plus OUT/manifest.json."""
    from spasem.core.progress import Progress
    from spasem.data.phantoms import parse_modalities, write_cohort

    keys = parse_modalities(modalities)  # fail before any compute (write_cohort checks the variability first too)
    manifest = write_cohort(out_dir, subjects, keys, seed, progress=Progress(enabled=not quiet), variability=variability)
    if not quiet:
        click.echo(f"{subjects * len(keys)} case(s) -> {out_dir}/; manifest: {manifest}", err=True)
    click.echo(str(manifest))
