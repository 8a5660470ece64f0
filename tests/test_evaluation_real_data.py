"""The dataset checks on the real CT (DICOM series + TotalSegmentator labels stored y-flipped)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from spasem.cli.main import cli
from spasem.core.io import load
from spasem.core.metrics import axial_axis, dice_2d
from spasem.evaluation.worker import organ_mask


def test_manifest_check_accepts_the_flipped_label_map_of_a_dicom_series(shared_data, tmp_path):
    root = shared_data / "ct-dicom-liver-spleen"
    (tmp_path / "map.json").write_text(json.dumps({"spleen": 1, "liver": 5}))
    manifest = {"dataset": "tsg", "cases": [
        {"id": "ct", "image": str(root / "dicom"), "label": str(root / "labels.nii.gz"), "modality": "CT"}]}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["manifest", "check", str(tmp_path / "m.json"), "--label-map", str(tmp_path / "map.json"),
                                      "--organs", "liver,spleen"])
    assert result.exit_code == 0, result.output
    assert "1 case(s) OK; cases per organ: liver 1, spleen 1" in result.output
    # the mask is moved exactly onto the series' grid; axial slices are along the series' k axis
    image = load(root / "dicom")
    liver = organ_mask(load(root / "labels.nii.gz", is_label=True), image, 5, "ct")
    assert liver.grid is image.grid and axial_axis(image.grid) == 2
    mirrored = liver.with_array(liver.array[:, ::-1, :].copy())
    assert dice_2d(liver, liver) == 1.0
    assert dice_2d(mirrored, liver) < 0.9  # the y-flip trap would be visible in the metric
