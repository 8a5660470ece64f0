"""Label maps (organ name -> label id) of the datasets the paper uses, and canonical organ names.

Organ names are canonical everywhere in spasem: ``liver``, ``spleen``, ``left_kidney``,
``right_kidney`` (patient's left/right). :func:`canonical_organ` accepts common spellings
(``LK``, ``kidney_left``, ``Left Kidney``, ...).

Built-in maps (``--label-map NAME``):

* ``btcv`` — Abdomen-CT, Beyond The Cranial Vault (MICCAI 2015): spleen 1, right kidney 2,
  left kidney 3, liver 6 (other ids are other organs).
* ``amos`` — AMOS 2022 (CT and MR of different patients; MR case numbers from 500): the same
  ids as ``btcv`` for the four organs (15 organs in all).
* ``chaos`` — CHAOS T2-SPIR as commonly converted to NIfTI: liver 1, right kidney 2,
  left kidney 3, spleen 4.
* ``chaos_png`` — CHAOS MR ground truth as the raw PNG intensities: liver 63, right kidney 126,
  left kidney 189, spleen 252.
* ``phantoms`` — ``spasem phantoms``: liver 1, spleen 2, left kidney 3, right kidney 4.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from spasem.errors import InputError

#: canonical organ names, in the column order of the paper's tables
ORGANS: tuple[str, ...] = ("liver", "left_kidney", "right_kidney", "spleen")

#: table column header per organ
ORGAN_COLUMNS: dict[str, str] = {"liver": "Liver", "left_kidney": "LK", "right_kidney": "RK", "spleen": "Spleen"}

BUILTIN_LABEL_MAPS: dict[str, dict[str, int]] = {
    "btcv": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6},
    "amos": {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6},
    "chaos": {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4},
    "chaos_png": {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252},
    "phantoms": {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4},
}

_ALIASES = {
    "liver": "liver",
    "spleen": "spleen",
    "lk": "left_kidney",
    "leftkidney": "left_kidney",
    "kidneyleft": "left_kidney",
    "kidneyl": "left_kidney",
    "lkidney": "left_kidney",
    "rk": "right_kidney",
    "rightkidney": "right_kidney",
    "kidneyright": "right_kidney",
    "kidneyr": "right_kidney",
    "rkidney": "right_kidney",
}


def label_map_choices() -> str:
    """The built-in label map names and 'a JSON file', for help texts and messages."""
    return ", ".join(BUILTIN_LABEL_MAPS) + " or a JSON file"


def canonical_organ(name: str) -> str | None:
    """The canonical name of an organ spelling (case, spaces, '-' and '_' ignored), or None
    when the name is not one of the four abdominal organs."""
    key = re.sub(r"[\s_\-]+", "", name.strip().lower())
    return _ALIASES.get(key)


def parse_organs(text: str, option: str = "--organs") -> list[str]:
    """``"liver,LK"`` -> ``["liver", "left_kidney"]`` (canonical, in the given order, no repeats)."""
    out: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        organ = canonical_organ(item)
        if organ is None:
            raise InputError(f"{option} '{item}': unknown organ; expected some of {', '.join(ORGANS)} (or LK, RK)")
        if organ not in out:
            out.append(organ)
    if not out:
        raise InputError(f"{option} '{text}': no organ given; expected some of {', '.join(ORGANS)}")
    return out


def normalise_label_names(names: dict[str, int], source: str) -> dict[str, int]:
    """Label names with the four organs under their canonical names (other names kept as given)."""
    out: dict[str, int] = {}
    for name, value in names.items():
        canonical = canonical_organ(name) or name
        if canonical in out and out[canonical] != value:
            raise InputError(f"{source}: organ '{canonical}' given two label ids ({out[canonical]} and {value})")
        out[canonical] = int(value)
    return out


def resolve_label_map(spec: str, option: str = "--label-map") -> dict[str, int]:
    """A built-in map by name (:data:`BUILTIN_LABEL_MAPS`: ``btcv``, ``amos``, ``chaos``, ...) or a JSON file
    ``{"liver": 1, ...}`` (or a manifest holding ``label_names``)."""
    key = spec.strip().lower()
    if key in BUILTIN_LABEL_MAPS:
        return dict(BUILTIN_LABEL_MAPS[key])
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise InputError(
            f"{option} '{spec}': neither a built-in label map ({', '.join(BUILTIN_LABEL_MAPS)}) nor a JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{option} '{spec}': cannot read JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("label_names"), dict):
        data = data["label_names"]
    if not isinstance(data, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in data.values()):
        raise InputError(f"{option} '{spec}': expected a JSON object of organ name -> positive integer label id")
    return normalise_label_names(data, f"{option} '{spec}'")
