"""``spasem manifest``: build a dataset manifest from a folder, or check one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from spasem.data.labelmaps import label_map_choices


@click.group()
def manifest() -> None:
    """Dataset manifests (the case lists `spasem evaluate` reads)."""


@manifest.command("build")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--modality", required=True, help="modality of the cases (CT or MR); see --modality-pattern")
@click.option("--modality-pattern", "modality_patterns", multiple=True, metavar="MODALITY=REGEX",
              help="cases whose id matches REGEX get MODALITY instead (a folder mixing modalities; repeatable, "
                   "the first match wins), e.g. AMOS: 'MR=^amos_0[56]\\d\\d$'")
@click.option("--label-map", default=None, metavar="NAME|FILE",
              help="organ -> label id: " + label_map_choices())
@click.option("--dataset", default=None, help="dataset name [default: the folder's name]")
@click.option("--images", default="imagesTr", show_default=True, help="sub-folder of the images")
@click.option("--labels", default="labelsTr", show_default=True, help="sub-folder of the label maps")
@click.option("--subject-pattern", default=None, metavar="REGEX",
              help="regular expression whose first group in a case id is the subject id, e.g. '^(s\\d+)'")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="manifest file to write (.json)")
def build(folder, modality, modality_patterns, label_map, dataset, images, labels, subject_pattern, output) -> None:
    """List the image/label pairs of FOLDER (imagesTr/ + labelsTr/) as a JSON manifest."""
    from spasem.data.labelmaps import resolve_label_map
    from spasem.data.manifest import build_manifest, write_manifest
    from spasem.errors import OutputError

    if output.suffix.lower() != ".json":
        raise OutputError(f"--output '{output}': expected a .json file")
    if not output.parent.resolve().is_dir():
        raise OutputError(f"--output '{output}': folder '{output.parent}' does not exist")
    rules = [parse_modality_pattern(text) for text in modality_patterns]
    names = resolve_label_map(label_map) if label_map else None
    built = build_manifest(folder, modality=modality, label_names=names, dataset=dataset or Path(folder).resolve().name,
                           images=images, labels=labels, subject_pattern=subject_pattern, modality_patterns=rules)
    write_manifest(built, output)
    counts = Counter(case.modality or "?" for case in built.cases)
    click.echo(f"{len(built.cases)} case(s) ({', '.join(f'{m} {n}' for m, n in counts.items())}) -> {output}", err=True)


def parse_modality_pattern(text: str) -> tuple[str, str]:
    """``"MR=^amos_0[56]"`` -> ``("MR", "^amos_0[56]")`` (:func:`build_manifest` checks both parts)."""
    from spasem.errors import InputError

    modality, sep, expression = text.partition("=")
    if not sep or not expression:
        raise InputError(f"--modality-pattern '{text}': expected MODALITY=REGEX, e.g. 'MR=^amos_0[56]'")
    return modality.strip(), expression


@manifest.command("check")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--label-map", default=None, metavar="NAME|FILE", help="organ -> label id [default: the manifest's]")
@click.option("--organs", default="liver,left_kidney,right_kidney,spleen", show_default=True, help="organs to check")
@click.option("--modality", default=None, help="check only the cases of this modality")
def check(path, label_map, organs, modality) -> None:
    """Open every file of the manifest at PATH and report all problems at once."""
    from spasem.data.labelmaps import parse_organs, resolve_label_map
    from spasem.evaluation.datasets import case_refs, check_datasets
    from spasem.evaluation.evaluate import load_manifest

    organ_list = parse_organs(organs)
    loaded = load_manifest(path, resolve_label_map(label_map) if label_map else None, modality)
    refs, problems = case_refs(loaded, organ_list, f"manifest '{path}'")
    present = check_datasets(refs, refs, organ_list, [], problems=problems)
    counts = {o: sum(1 for r in refs if r.label_id(o) in present[r.label]) for o in organ_list}
    click.echo(f"{len(refs)} case(s) OK; cases per organ: " + ", ".join(f"{o} {n}" for o, n in counts.items()), err=True)
