"""The whole protocol through the CLI on a small ``spasem phantoms`` cohort (3 CT + 3 MR
subjects, every organ, k in {1, 2}, 2 draws; CT supports -> MR queries), with the weight-free
``basic`` preset on a coarse grid; the tables' numbers are checked against cases.csv."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.evaluation_helpers import check_protocol_outputs, invoke

phantoms = pytest.importorskip(
    "spasem.data.phantoms", reason="spasem.data.phantoms (branch 'classical') is not merged into this checkout yet")

#: a coarse working grid and light features for the full-size phantom scans
CHEAP_PHANTOMS = ["--preset", "basic", "--set", "window.size=24", "--set", "window.spacing_mm=4",
                  "--set", "encoder.options.stride=4", "--set", "encoder.options.scales=[1.0, 2.0]", "-q"]


@pytest.mark.slow
def test_protocol_on_phantoms(tmp_path):
    manifest = phantoms.write_cohort(tmp_path / "phantoms", 3)
    out = tmp_path / "out"
    invoke("--supports", str(manifest), "--support-modality", "CT", "--queries", str(manifest), "--query-modality", "MR",
           "--out", str(out), "--shots", "1,2", "--draws", "2", "--fusion", "entropy_gate,mean", "--workers", "2",
           *CHEAP_PHANTOMS)
    check_protocol_outputs(out, "basic", ["entropy_gate", "mean"])
