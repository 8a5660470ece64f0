"""``spasem weights``: list, fetch, locate and verify the foundation models' weights."""

from __future__ import annotations

from pathlib import Path

import click


def _names(name: str) -> list[str]:
    from spasem.weights import WEIGHTS, get_spec

    if name == "all":
        return sorted(WEIGHTS)
    get_spec(name)  # unknown names fail here
    return [name]


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # pragma: no cover


@click.group()
def weights() -> None:
    """Foundation-model weights (SAM-Med3D-turbo, uniGradICON, multiGradICON).

    Files live in $SPASEM_HOME/weights, or in the platform's user cache folder when SPASEM_HOME
    is not set. Set SPASEM_OFFLINE=1 to forbid downloads.
    """


@weights.command(name="list")
def list_weights() -> None:
    """Known weights, whether they are present, and where they go."""
    from spasem.weights import WEIGHTS, expected_checksum, status, weights_dir

    click.echo(f"weights folder: {weights_dir()} (set SPASEM_HOME to change it)")
    for entry in status(check=False):
        spec = WEIGHTS[entry.name]
        _, source = expected_checksum(entry.name)
        state = f"present ({_size(entry.path)})" if entry.present else "missing"
        click.echo(f"{entry.name:16s} {state:20s} checksum: {source:24s} {entry.path}")
        click.echo(f"{'':16s} {spec.description}")
        click.echo(f"{'':16s} from {spec.url}")


@weights.command()
@click.argument("name")
@click.option("--url", default=None, help="download from this address (a mirror) instead of the official one")
@click.option("--from", "source_file", type=click.Path(path_type=Path), default=None,
              help="copy this local file (downloaded elsewhere) into the cache, checking its checksum")
@click.option("--force", is_flag=True, help="fetch again even if the file is present")
@click.option("-q", "--quiet", is_flag=True, help="no progress bar")
def fetch(name: str, url: str | None, source_file: Path | None, force: bool, quiet: bool) -> None:
    """Download NAME (or 'all') into the cache; the checksum is checked (official) or recorded
    (first fetch of files without a published checksum)."""
    from spasem.errors import WeightsError
    from spasem.weights import expected_checksum, fetch as fetch_weights, weights_path

    names = _names(name)
    if (url or source_file) and len(names) > 1:
        raise WeightsError("--url and --from need one weights name, not 'all'")
    for item in names:
        target = weights_path(item)
        if target.exists() and not force:
            click.echo(f"{item}: already present at {target} (use --force to fetch again)")
            continue
        path = fetch_weights(item, url=url, source_file=source_file, force=force, progress=not quiet)
        _, source = expected_checksum(item)
        check = "checksum verified" if source == "official" else "checksum recorded"
        click.echo(f"{item}: {path} ({_size(path)}, {check})")


@weights.command()
@click.argument("name")
def path(name: str) -> None:
    """Print where the weights NAME are expected (whether or not they are present)."""
    from spasem.weights import weights_path

    target = weights_path(name)
    click.echo(str(target))
    if not target.is_file():
        click.echo(f"(missing: `spasem weights fetch {name}` or copy the file there)", err=True)


@weights.command()
@click.argument("names", nargs=-1)
def verify(names: tuple[str, ...]) -> None:
    """Check the SHA-256 of the present weights (all, or NAMES) against the official or
    recorded checksum; exits with an error when one does not match."""
    from spasem.errors import WeightsError
    from spasem.weights import status

    wanted: list[str] = []
    for name in names or ("all",):
        wanted.extend(_names(name))
    bad = []
    for entry in status(wanted):
        if entry.state == "missing":
            click.echo(f"{entry.name:16s} missing      {entry.path}")
        elif entry.state == "ok":
            click.echo(f"{entry.name:16s} ok           sha256 {entry.sha256} ({entry.checksum_source})")
        elif entry.state == "unverified":
            click.echo(f"{entry.name:16s} unverified   sha256 {entry.sha256} (no published or recorded checksum)")
        else:
            bad.append(entry)
            click.echo(f"{entry.name:16s} MISMATCH     sha256 {entry.sha256}, expected {entry.expected} ({entry.checksum_source})")
    if bad:
        raise WeightsError(
            f"{len(bad)} weight file(s) do not match their checksum: {', '.join(e.name for e in bad)}; "
            f"fetch them again with `spasem weights fetch NAME --force`"
        )
