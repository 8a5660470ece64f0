"""Dataset manifests: which cases exist, where their image and label files are, their modality,
and which label id is which organ.

JSON layout (what ``spasem phantoms`` writes; paths relative to the manifest's folder)::

    {
      "dataset": "phantoms",
      "label_names": {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4},
      "cases": [
        {"id": "s000_ct", "image": "s000_ct.nii.gz", "label": "s000_ct_label.nii.gz",
         "modality": "CT", "subject": "s000"}
      ]
    }

CSV layout: a header with ``id,image,label,modality`` (``subject`` optional); label names then
come from elsewhere (a built-in label map or a JSON file).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from spasem.core.backends import format_validation_error
from spasem.errors import InputError


class Case(BaseModel):
    """One scan of a dataset."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="unique case id")
    image: str = Field(description="image file or DICOM folder (relative to the manifest's folder, or absolute)")
    label: str | None = Field(None, description="label map file on the image's grid")
    modality: str | None = Field(None, description="'CT' or 'MR'")
    subject: str | None = Field(None, description="patient / subject id (cases of one subject are never paired)")

    @field_validator("modality")
    @classmethod
    def _modality(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        v = value.strip().upper()
        return {"MRI": "MR"}.get(v, v)


class Manifest(BaseModel):
    """A list of cases plus the dataset's label names (organ name -> label id)."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = Field("", description="dataset name")
    label_names: dict[str, int] = Field(default_factory=dict, description="organ name -> label id")
    cases: list[Case] = Field(default_factory=list)
    root: Path | None = Field(None, exclude=True, description="folder relative paths are resolved against")

    @field_validator("cases")
    @classmethod
    def _unique_ids(cls, cases: list[Case]) -> list[Case]:
        seen: set[str] = set()
        for case in cases:
            if case.id in seen:
                raise ValueError(f"case id '{case.id}' appears twice")
            seen.add(case.id)
        return cases

    def resolve(self, relative: str) -> Path:
        """Absolute path of a file named in the manifest."""
        path = Path(relative)
        return path if path.is_absolute() or self.root is None else self.root / path

    def image_path(self, case: Case) -> Path:
        return self.resolve(case.image)

    def label_path(self, case: Case) -> Path | None:
        return self.resolve(case.label) if case.label else None

    def filter(self, modality: str | None = None) -> "Manifest":
        """The cases of one modality (all if None)."""
        if modality is None:
            return self
        wanted = Case._modality(modality)  # type: ignore[operator]
        return self.model_copy(update={"cases": [c for c in self.cases if c.modality == wanted]})


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a JSON or CSV manifest; relative paths are resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest '{path}': no such file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            missing = {"id", "image"} - set(rows[0].keys() if rows else [])
            if missing:
                raise InputError(f"manifest '{path}': CSV lacks column(s) {', '.join(sorted(missing))}; "
                                 "expected id,image,label,modality[,subject]")
            data = {"cases": [{k: (v or None) for k, v in row.items() if k} for row in rows]}
        else:
            raise InputError(f"manifest '{path}': unsupported type '{path.suffix}'; expected .json or .csv")
    except json.JSONDecodeError as exc:
        raise InputError(f"manifest '{path}': invalid JSON: {exc}") from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"manifest '{path}': " + format_validation_error(exc)) from None
    manifest.root = path.parent.resolve()
    return manifest


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write a JSON manifest atomically."""
    path = Path(path)
    text = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
