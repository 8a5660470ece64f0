"""Model weights: where they live, how they are fetched and checked, and strict loading.

Known weights (:data:`WEIGHTS`) are stored under :func:`weights_dir`:

* ``$SPASEM_HOME/weights`` when the environment variable ``SPASEM_HOME`` is set;
* otherwise the user cache folder of the platform (``platformdirs.user_cache_dir("spasem")/weights``,
  e.g. ``~/.cache/spasem/weights`` on Linux). Never the current working directory.

Fetching downloads into a temporary file beside the target (with a progress bar), checks the
SHA-256 and only then renames it into place, so an interrupted download never leaves a file
that looks complete. Checksums: where the publisher shows one (the Hugging Face LFS page of
SAM-Med3D) it is pinned here and every download is checked against it; the uniGradICON /
multiGradICON release assets publish none, so the checksum of the first fetch is recorded in
``checksums.json`` beside the files and later checks (``spasem weights verify``) compare to it.

``SPASEM_OFFLINE=1`` forbids downloads: a missing file is then one :class:`WeightsError` that
names the exact file expected, where to put it and how to fetch it elsewhere.

Tests never touch the network: :func:`download` reads ``file://`` URLs as well, and the
``opener`` argument of :func:`fetch` can be replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from spasem.errors import WeightsError

#: environment variable: root folder of spasem's files (weights go to ``$SPASEM_HOME/weights``)
HOME_ENV = "SPASEM_HOME"
#: environment variable: ``1`` forbids any download
OFFLINE_ENV = "SPASEM_OFFLINE"
CHECKSUM_FILE = "checksums.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightSpec:
    """One downloadable weight file.

    :param name: what users call it (``spasem weights fetch NAME``).
    :param relpath: path of the file under :func:`weights_dir`.
    :param url: official download address.
    :param sha256: published SHA-256 of the file, or None when the publisher shows none
        (then the first fetch records it).
    :param size: published size in bytes, if known (shown by ``spasem weights list``).
    :param description: one line.
    :param page: where a person can look the file up.
    """

    name: str
    relpath: str
    url: str
    sha256: str | None
    size: int | None
    description: str
    page: str


WEIGHTS: dict[str, WeightSpec] = {
    spec.name: spec
    for spec in (
        WeightSpec(
            name="sam-med3d-turbo",
            relpath="sam-med3d/sam_med3d_turbo.pth",
            url="https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
            # Hugging Face LFS page of sam_med3d_turbo.pth, commit 07f6f69 ("Update SAM-Med3D ckpt with new Torch Version")
            sha256="899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c",
            size=None,
            description="SAM-Med3D-turbo (ViT-B, 128^3 input): image encoder, prompt encoder, mask decoder (~402 MB)",
            page="https://huggingface.co/blueyo0/SAM-Med3D/blob/main/sam_med3d_turbo.pth",
        ),
        WeightSpec(
            name="unigradicon",
            relpath="unigradicon/Step_2_final.trch",
            url="https://github.com/uncbiag/uniGradICON/releases/download/unigradicon_weights/Step_2_final.trch",
            sha256=None,
            size=None,
            description="uniGradICON registration network (within one modality)",
            page="https://github.com/uncbiag/uniGradICON/releases/tag/unigradicon_weights",
        ),
        WeightSpec(
            name="multigradicon",
            relpath="multigradicon/Step_2_final.trch",
            url="https://github.com/uncbiag/uniGradICON/releases/download/multigradicon_weights/Step_2_final.trch",
            sha256=None,
            size=None,
            description="multiGradICON registration network (across modalities)",
            page="https://github.com/uncbiag/uniGradICON/releases/tag/multigradicon_weights",
        ),
    )
}


# ------------------------------------------------------------------------------------------
# locations
# ------------------------------------------------------------------------------------------
def home_dir() -> Path:
    """spasem's own folder: ``$SPASEM_HOME`` (made absolute) or the platform's user cache folder."""
    value = os.environ.get(HOME_ENV, "").strip()
    if value:
        return Path(value).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("spasem")).resolve()


def weights_dir() -> Path:
    """Folder holding the downloaded weights (``home_dir() / "weights"``)."""
    return home_dir() / "weights"


def get_spec(name: str) -> WeightSpec:
    try:
        return WEIGHTS[name]
    except KeyError:
        raise WeightsError(f"unknown weights '{name}'; known: {', '.join(sorted(WEIGHTS))}") from None


def weights_path(name: str) -> Path:
    """Where the weights ``name`` are expected (the file may not exist)."""
    return weights_dir() / get_spec(name).relpath


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------------------------------
# checksums
# ------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_file() -> Path:
    return weights_dir() / CHECKSUM_FILE


def recorded_checksums() -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "size", "url", "fetched"}}`` recorded by earlier fetches."""
    path = _checksum_file()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"checksum record '{path}' is unreadable ({exc}); delete it and fetch the weights again") from None
    return data if isinstance(data, dict) else {}


def _record_checksum(name: str, sha256: str, size: int, url: str) -> None:
    records = recorded_checksums()
    records[name] = {"sha256": sha256, "size": size, "url": url, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = _checksum_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checksums-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def expected_checksum(name: str) -> tuple[str | None, str]:
    """The SHA-256 the file ``name`` must have and where it comes from ('official',
    'recorded at first fetch', or 'none')."""
    spec = get_spec(name)
    if spec.sha256:
        return spec.sha256, "official"
    record = recorded_checksums().get(name)
    if record and record.get("sha256"):
        return str(record["sha256"]), "recorded at first fetch"
    return None, "none"


# ------------------------------------------------------------------------------------------
# download
# ------------------------------------------------------------------------------------------
Opener = Callable[[str, float], Any]


def _default_opener(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "spasem-weights/1"})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - https/http/file only (checked)


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    opener: Opener | None = None,
) -> str:
    """Download ``url`` (https, http or file) to ``dest`` through a temporary file in the same
    folder, renamed into place only when complete and (if given) matching ``expected_sha256``.

    :returns: the file's SHA-256.
    :raises WeightsError: unreachable address, interrupted transfer or checksum mismatch (no
        file is left at ``dest`` then).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("https", "http", "file"):
        raise WeightsError(f"download address '{url}': only https://, http:// and file:// are supported")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = opener or _default_opener
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            response = opener(url, timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WeightsError(f"cannot download {url}: {reason}") from None
        with response, open(tmp, "wb") as out:
            headers = getattr(response, "headers", None)
            total_header = headers.get("Content-Length") if headers is not None else None
            total = int(total_header) if total_header and str(total_header).isdigit() else None
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, leave=False)
            written = 0
            try:
                while True:
                    try:
                        chunk = response.read(_CHUNK)
                    except (OSError, urllib.error.URLError) as exc:
                        raise WeightsError(f"download of {url} interrupted after {written} bytes: {exc}") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and written != total:
                raise WeightsError(f"download of {url} incomplete: got {written} of {total} bytes")
        sha = digest.hexdigest()
        if expected_sha256 and sha != expected_sha256.lower():
            raise WeightsError(
                f"download of {url} has SHA-256 {sha}, expected {expected_sha256}: the file is corrupt or "
                "the publisher replaced it; nothing was saved"
            )
        os.replace(tmp, dest)
        return sha
    finally:
        tmp.unlink(missing_ok=True)


def fetch(
    name: str,
    *,
    url: str | None = None,
    source_file: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    opener: Opener | None = None,
) -> Path:
    """Put the weights ``name`` into the cache and return their path.

    :param url: download from this address instead of the official one (a mirror); the
        official checksum still applies.
    :param source_file: copy this local file instead of downloading (e.g. fetched on another
        machine); checked like a download.
    :param force: replace a file that is already there.
    """
    spec = get_spec(name)
    target = weights_path(name)
    if target.exists() and not force:
        return target
    expected, source = expected_checksum(name)
    if source_file is not None:
        local = Path(source_file).expanduser()
        if not local.is_file():
            raise WeightsError(f"--from '{local}': no such file")
        address = local.resolve().as_uri()
    else:
        if offline():
            raise WeightsError(missing_message(name, reason=f"downloads are disabled ({OFFLINE_ENV}=1)"))
        address = url or spec.url
    try:
        sha = download(address, target, expected_sha256=expected, progress=progress, opener=opener)
    except WeightsError as exc:
        if expected is not None and source != "official" and "SHA-256" in exc.message:
            raise WeightsError(
                f"{exc.message} (the expected value was recorded at the first fetch in {_checksum_file()}; "
                f"remove the entry '{name}' there if the publisher really replaced the file)"
            ) from None
        raise
    _record_checksum(name, sha, target.stat().st_size, address)
    return target


def missing_message(name: str, reason: str | None = None) -> str:
    """The one-line explanation for missing weights: the exact file expected, where it goes,
    and how to get it on a machine without internet."""
    spec = get_spec(name)
    target = weights_path(name)
    why = f" ({reason})" if reason else ""
    return (
        f"weights '{name}' not found{why}: expected the file {target}. "
        f"Fetch it with `spasem weights fetch {name}`; without internet here, download {spec.url} "
        f"on another machine and copy it to {target} (or run `spasem weights fetch {name} --from FILE`, "
        f"set {HOME_ENV} to a folder holding weights/{spec.relpath}, or pass the file with the backend's "
        "`checkpoint` option)"
    )


def resolve(name: str, checkpoint: str | os.PathLike | None = None, *, progress: bool = True,
            opener: Opener | None = None) -> Path:
    """Path of the weights to load: ``checkpoint`` when given (must exist), else the cached file,
    downloaded first when missing and downloads are allowed.

    :raises WeightsError: one message naming the expected file and how to get it.
    """
    if checkpoint is not None and str(checkpoint).strip():
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsError(f"checkpoint '{path}' for '{name}': no such file")
        return path.resolve()
    target = weights_path(name)
    if target.is_file():
        return target
    if offline():
        raise WeightsError(missing_message(name, reason=f"downloads are disabled ({OFFLINE_ENV}=1)"))
    try:
        return fetch(name, progress=progress, opener=opener)
    except WeightsError as exc:
        raise WeightsError(missing_message(name, reason=exc.message)) from None


# ------------------------------------------------------------------------------------------
# status and verification
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightStatus:
    """State of one cached weight file. ``state``: 'ok', 'mismatch', 'missing', 'unverified'
    (present but no checksum known)."""

    name: str
    path: Path
    state: str
    sha256: str | None
    expected: str | None
    checksum_source: str

    @property
    def present(self) -> bool:
        return self.state != "missing"


def status(names: Iterable[str] | None = None, *, check: bool = True) -> list[WeightStatus]:
    """Status of the cached weights; ``check=False`` skips hashing (state 'present' instead of
    ok/mismatch)."""
    out = []
    for name in names or sorted(WEIGHTS):
        path = weights_path(name)
        expected, source = expected_checksum(name)
        if not path.is_file():
            out.append(WeightStatus(name, path, "missing", None, expected, source))
            continue
        if not check:
            out.append(WeightStatus(name, path, "present", None, expected, source))
            continue
        sha = sha256_file(path)
        if expected is None:
            state = "unverified"
        else:
            state = "ok" if sha == expected else "mismatch"
        out.append(WeightStatus(name, path, state, sha, expected, source))
    return out


# ------------------------------------------------------------------------------------------
# strict loading
# ------------------------------------------------------------------------------------------
def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_state_dict(expected: Mapping[str, Any], found: Mapping[str, Any], what: str, source: str | os.PathLike) -> None:
    """Refuse a checkpoint whose keys or tensor shapes differ from the architecture's.

    :param expected: the model's ``state_dict()``.
    :param found: the checkpoint's state dict.
    :param what: the architecture, for the message.
    :param source: the checkpoint file, for the message.
    :raises WeightsError: naming the first missing keys, unexpected keys and shape mismatches.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    not_tensors = [k for k in expected if k in found and not hasattr(found[k], "shape")]
    if not (missing or unexpected or shapes or not_tensors):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_preview(shapes, 3)}")
    if not_tensors:
        parts.append(f"non-tensor value(s): {_preview(not_tensors)}")
    raise WeightsError(f"checkpoint '{source}' does not match the {what} architecture: " + "; ".join(parts))


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` from every key that has it (checkpoints saved from DataParallel)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def torch_load(path: str | os.PathLike, what: str) -> Any:
    """``torch.load`` on CPU without executing arbitrary pickled code: tensors, containers and
    ``argparse.Namespace`` (training scripts store their arguments beside the weights)."""
    import argparse
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # truncated file, not a torch file, foreign pickled objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"cannot read {what} checkpoint '{path}': {first[:300]}") from None


__all__ = [
    "WEIGHTS",
    "WeightSpec",
    "WeightStatus",
    "check_state_dict",
    "download",
    "expected_checksum",
    "fetch",
    "home_dir",
    "missing_message",
    "resolve",
    "sha256_file",
    "status",
    "strip_prefix",
    "torch_load",
    "weights_dir",
    "weights_path",
]
