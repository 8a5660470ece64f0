"""The weights manager: cache location, downloads (file:// and a local HTTP server only, never
the network), checksums, offline errors, strict state-dict checks, and the CLI."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from spasem import weights
from spasem.cli.main import cli
from spasem.errors import WeightsError


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("SPASEM_HOME", str(home))
    monkeypatch.setenv("SPASEM_OFFLINE", "1")
    monkeypatch.setenv("SPASEM_DISABLE_PLUGIN_AUTOLOAD", "1")
    yield home


@pytest.fixture
def payload(tmp_path) -> Path:
    path = tmp_path / "upstream" / "Step_2_final.trch"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3 * (1 << 20) + 123))  # several download chunks
    return path


class _Server:
    """A tiny HTTP server on 127.0.0.1 serving one folder, stopped by the context manager."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(".part")] if folder.exists() else []


# -- location ---------------------------------------------------------------------------------
def test_default_cache_is_the_platform_user_cache_not_the_working_directory(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.delenv("SPASEM_HOME")
    monkeypatch.chdir(tmp_path)
    expected = Path(platformdirs.user_cache_dir("spasem")).resolve() / "weights"
    assert weights.weights_dir() == expected
    assert not str(weights.weights_path("unigradicon")).startswith(str(tmp_path))


def test_spasem_home_overrides_and_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPASEM_HOME", "relative/home")
    assert weights.weights_dir() == (tmp_path / "relative" / "home" / "weights").resolve()
    assert weights.weights_path("sam-med3d-turbo") == weights.weights_dir() / "sam-med3d" / "sam_med3d_turbo.pth"


def test_unknown_name_lists_known_ones():
    with pytest.raises(WeightsError, match="known: multigradicon, sam-med3d-turbo, unigradicon"):
        weights.weights_path("sam")


# -- downloads ----------------------------------------------------------------------------------
def test_fetch_from_file_url_records_the_checksum_and_verify_uses_it(payload, monkeypatch):
    monkeypatch.delenv("SPASEM_OFFLINE")
    path = weights.fetch("unigradicon", url=payload.as_uri(), progress=False)
    assert path == weights.weights_path("unigradicon")
    assert path.read_bytes() == payload.read_bytes()
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()
    assert weights.expected_checksum("unigradicon") == (sha, "recorded at first fetch")
    (entry,) = weights.status(["unigradicon"])
    assert entry.state == "ok" and entry.sha256 == sha
    # a damaged file is reported, and `spasem weights verify` fails
    with open(path, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00\x01\x02")
    (entry,) = weights.status(["unigradicon"])
    assert entry.state == "mismatch"
    result = CliRunner().invoke(cli, ["weights", "verify", "unigradicon"])
    assert result.exit_code == WeightsError.exit_code
    assert "MISMATCH" in result.output


def test_refetch_is_checked_against_the_recorded_checksum(payload, tmp_path, monkeypatch):
    monkeypatch.delenv("SPASEM_OFFLINE")
    weights.fetch("multigradicon", url=payload.as_uri(), progress=False)
    other = tmp_path / "other.trch"
    other.write_bytes(b"something else")
    with pytest.raises(WeightsError, match="recorded at the first fetch"):
        weights.fetch("multigradicon", url=other.as_uri(), force=True, progress=False)
    assert weights.weights_path("multigradicon").read_bytes() == payload.read_bytes()


def test_fetch_over_http_from_a_local_server(payload, monkeypatch):
    monkeypatch.delenv("SPASEM_OFFLINE")
    with _Server(payload.parent) as base:
        path = weights.fetch("multigradicon", url=f"{base}/{payload.name}", progress=True)
    assert path.read_bytes() == payload.read_bytes()
    assert _leftovers(weights.weights_dir()) == []


def test_official_checksum_mismatch_saves_nothing(payload, monkeypatch):
    monkeypatch.delenv("SPASEM_OFFLINE")
    with _Server(payload.parent) as base:
        with pytest.raises(WeightsError, match="SHA-256 .* expected 899a46d0"):
            weights.fetch("sam-med3d-turbo", url=f"{base}/{payload.name}", progress=False)
    assert not weights.weights_path("sam-med3d-turbo").exists()
    assert _leftovers(weights.weights_dir()) == []


def test_unreachable_address_and_missing_file_on_server(payload, monkeypatch):
    monkeypatch.delenv("SPASEM_OFFLINE")
    with _Server(payload.parent) as base:
        with pytest.raises(WeightsError, match="cannot download .*/absent.trch"):
            weights.fetch("unigradicon", url=f"{base}/absent.trch", progress=False)
    assert not weights.weights_path("unigradicon").exists()
    assert _leftovers(weights.weights_dir()) == []


def test_interrupted_transfer_leaves_no_file(tmp_path):
    class Broken(io.BytesIO):
        headers = {"Content-Length": str(10 << 20)}

        def read(self, n=-1):
            data = super().read(n)
            if not data:
                raise ConnectionResetError("connection reset by peer")
            return data

    target = tmp_path / "w" / "file.pth"
    with pytest.raises(WeightsError, match="interrupted"):
        weights.download("https://example.invalid/file.pth", target, progress=False,
                         opener=lambda url, timeout: Broken(b"x" * 1000))
    assert not target.exists() and _leftovers(tmp_path) == []

    class Short(io.BytesIO):
        headers = {"Content-Length": "5000"}

    with pytest.raises(WeightsError, match="incomplete: got 1000 of 5000 bytes"):
        weights.download("https://example.invalid/file.pth", target, progress=False,
                         opener=lambda url, timeout: Short(b"x" * 1000))
    assert not target.exists() and _leftovers(tmp_path) == []


def test_only_web_and_file_addresses(tmp_path):
    with pytest.raises(WeightsError, match="only https://, http:// and file://"):
        weights.download("ftp://example.invalid/x", tmp_path / "x", progress=False)


# -- missing and offline ----------------------------------------------------------------------
def test_offline_and_missing_is_one_clear_error():
    with pytest.raises(WeightsError) as info:
        weights.resolve("sam-med3d-turbo")
    message = info.value.message
    target = weights.weights_path("sam-med3d-turbo")
    assert "\n" not in message
    assert f"expected the file {target}" in message
    assert weights.WEIGHTS["sam-med3d-turbo"].url in message
    assert "spasem weights fetch sam-med3d-turbo" in message
    assert "SPASEM_OFFLINE=1" in message


def test_failed_download_becomes_the_missing_message(monkeypatch):
    monkeypatch.delenv("SPASEM_OFFLINE")

    def no_network(url, timeout):
        raise OSError("Network is unreachable")

    with pytest.raises(WeightsError) as info:
        weights.resolve("unigradicon", opener=no_network, progress=False)
    assert "Network is unreachable" in info.value.message
    assert str(weights.weights_path("unigradicon")) in info.value.message


def test_a_local_checkpoint_is_used_as_given(tmp_path):
    local = tmp_path / "mine.trch"
    local.write_bytes(b"weights")
    assert weights.resolve("unigradicon", str(local)) == local.resolve()
    with pytest.raises(WeightsError, match="checkpoint '.*nope.trch' for 'unigradicon': no such file"):
        weights.resolve("unigradicon", str(tmp_path / "nope.trch"))


# -- strict loading -----------------------------------------------------------------------------
def test_state_dict_check_names_the_first_mismatches():
    expected = {f"layer{i}.weight": torch.zeros(4, 4) for i in range(8)}
    found = dict(expected)
    for i in range(6):
        del found[f"layer{i}.weight"]
    found["extra.bias"] = torch.zeros(2)
    found["layer7.weight"] = torch.zeros(3, 4)
    with pytest.raises(WeightsError) as info:
        weights.check_state_dict(expected, found, "TestNet", "ckpt.pth")
    message = info.value.message
    assert "checkpoint 'ckpt.pth' does not match the TestNet architecture" in message
    assert "6 missing key(s): layer0.weight, layer1.weight, layer2.weight, layer3.weight, layer4.weight (+1 more)" in message
    assert "1 unexpected key(s): extra.bias" in message
    assert "layer7.weight (checkpoint (3, 4), model (4, 4))" in message
    weights.check_state_dict(expected, dict(expected), "TestNet", "ckpt.pth")  # a match passes


def test_unreadable_checkpoint_is_a_weights_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError, match="cannot read SAM-Med3D checkpoint '.*bad.pth'"):
        weights.torch_load(bad, "SAM-Med3D")


# -- command line -------------------------------------------------------------------------------
def test_cli_list_path_and_fetch_from_a_local_file(payload):
    runner = CliRunner()
    listed = runner.invoke(cli, ["weights", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"weights folder: {weights.weights_dir()}" in listed.output
    assert "unigradicon" in listed.output and "missing" in listed.output

    shown = runner.invoke(cli, ["weights", "path", "unigradicon"])
    assert shown.exit_code == 0
    assert shown.stdout.strip() == str(weights.weights_path("unigradicon"))

    fetched = runner.invoke(cli, ["weights", "fetch", "unigradicon", "--from", str(payload), "-q"])
    assert fetched.exit_code == 0, fetched.output
    assert "checksum recorded" in fetched.output
    assert weights.weights_path("unigradicon").read_bytes() == payload.read_bytes()
    verified = runner.invoke(cli, ["weights", "verify"])
    assert verified.exit_code == 0, verified.output
    line = next(l for l in verified.output.splitlines() if l.startswith("unigradicon"))
    assert line.split()[1] == "ok" and "recorded at first fetch" in line

    official = runner.invoke(cli, ["weights", "fetch", "sam-med3d-turbo", "--from", str(payload), "-q"])
    assert official.exit_code == WeightsError.exit_code
    assert "expected 899a46d0" in official.output
    unknown = runner.invoke(cli, ["weights", "fetch", "sam-med2d"])
    assert unknown.exit_code == WeightsError.exit_code and "known:" in unknown.output


def test_cli_fetch_offline_says_how_to_get_the_file():
    result = CliRunner().invoke(cli, ["weights", "fetch", "multigradicon"])
    assert result.exit_code == WeightsError.exit_code
    assert str(weights.weights_path("multigradicon")) in result.output
    assert weights.WEIGHTS["multigradicon"].url in result.output
