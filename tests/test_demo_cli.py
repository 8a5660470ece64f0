"""``spasem demo``: the offline demonstration (CT support of subject 0 -> MR query of subject 1,
default configuration). One run, limited to the spleen with ``--organs`` (measured on this
machine: Dice 0.89, ~45 s in all on 2 shared cores; the floor sits 0.24 under it)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from spasem.cli.main import cli
from spasem.core.io import load
from spasem.core.metrics import dice
from spasem.data.phantoms import LABELS
from spasem.demo import STAGES

SPLEEN_FLOOR = 0.65


@pytest.mark.slow
def test_demo_writes_prediction_priors_figure_and_prints_dice(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--organs", "spleen", "-q"])
    assert result.exit_code == 0, result.output
    text = result.output
    print(text)

    # files: the phantoms, the prediction on the query's grid, the priors, one figure per organ
    query = load(out / "query_mr.nii.gz")
    query_label = load(out / "query_mr_label.nii.gz", is_label=True)
    support = load(out / "support_ct.nii.gz")
    assert query.modality in (None, "MR") and support.grid.spacing[2] == pytest.approx(2.5)
    prediction = load(out / "prediction.nii.gz", is_label=True)
    assert prediction.grid.same_as(query.grid)
    assert set(np.unique(prediction.array)) == {0, LABELS["spleen"]}
    for name in ("p_reg", "p_sim", "entropy"):
        prior = load(out / "priors" / f"spleen_{name}.nii.gz")
        assert prior.grid.same_as(query.grid)
        assert 0.0 <= prior.array.min() and prior.array.max() <= 1.0 + 1e-6
    figure = out / "demo_spleen.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(figure)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000 and pixels[..., :3].std() > 0.05  # a real picture
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    assert not (out / "demo_liver.png").exists()  # only the organs asked for

    # the table: header with the stages, the organ's Dice as the files give it, a mean row
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("organ"))
    assert "Dice" in header and "register" in header and "encode" in header
    assert header.split()[:4] == ["organ", "Dice", "total", "s"]
    assert all(column in STAGES for column in header.split()[4:]), header
    row = next(line for line in lines if line.startswith("spleen"))
    printed = float(row.split()[1])
    truth = query_label.array == LABELS["spleen"]
    measured = dice(prediction.array > 0, truth)
    assert printed == pytest.approx(measured, abs=5e-4)
    assert measured > SPLEEN_FLOOR, measured
    seconds = [float(v) for v in row.split()[2:]]
    assert seconds[0] > 0 and all(s >= 0 for s in seconds) and seconds[0] >= max(seconds[1:]) - 0.1
    assert re.search(r"^mean\s+\d\.\d{3}", text, re.MULTILINE)
    assert "demo_spleen.png" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--organs", "kidney"], "--organs 'kidney': unknown organ(s) kidney"),
        (["--organs", ","], "(none given)"),
        (["--support-subject", "2", "--query-subject", "2"], "support and query subjects must differ"),
        (["--query-subject", "-1"], "-1 is not in the range x>=0"),
    ],
)
def test_demo_bad_arguments_fail_cleanly_before_computing(tmp_path, args, message):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "-q", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
