"""Reading and writing volumes: NIfTI, NRRD, MetaImage and DICOM series.

This is the only module that deals with on-disk orientation conventions: SimpleITK reads every
format into LPS (it converts NIfTI's RAS on the fly), and the nibabel fallback converts RAS to
LPS explicitly here. Everything returned is a :class:`~spasem.core.volume.Volume` in LPS with
arrays indexed ``[i, j, k]``.

Writes are atomic: the file is written under a temporary folder beside the target and renamed
into place, so a failed or interrupted write never leaves a partial file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from spasem.core.volume import Grid, Volume
from spasem.errors import InputError, OutputError

#: file suffixes we read and write (lower case); a folder is read as a DICOM series.
SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    # SimpleITK errors carry C++ file/line noise; keep the informative last sentence
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("sitk::ERROR", "in ")) and len(line) > 5:
            return line[:300]
    return lines[-1][:300] if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------
# SimpleITK <-> Volume
# ------------------------------------------------------------------------------------------
def from_sitk(image: sitk.Image, *, is_label: bool = False, name: str | None = None, modality: str | None = None) -> Volume:
    """Convert a 3D scalar SimpleITK image (LPS) to a :class:`Volume` (array ``[i, j, k]``)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"'{name}': has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume"
        )
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        size = "x".join(str(s) for s in image.GetSize())
        raise InputError(f"'{name}': expected a 3D volume, got a {dim}D image of size {size}")
    if min(image.GetSize()) < 1:
        raise InputError(f"'{name}': empty image of size {image.GetSize()}")
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).copy()
    grid = Grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), np.asarray(image.GetDirection()).reshape(3, 3))
    if is_label:
        array = _as_label_array(array, name)
    return Volume(array, grid, is_label=is_label, name=name, modality=modality)


def to_sitk(volume: Volume) -> sitk.Image:
    """Convert a :class:`Volume` to a SimpleITK image with the same LPS geometry."""
    array = volume.array
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction.ravel()))
    return image


def _as_label_array(array: np.ndarray, name: str | None) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.all(np.isfinite(array)):
        raise InputError(f"'{name}': label map has NaN/infinite values; expected integer label ids")
    rounded = np.rint(array)
    bad = np.abs(array - rounded) > 1e-3
    if bad.any():
        example = float(array[bad].flat[0])
        raise InputError(f"'{name}': label map has non-integer values (e.g. {example:g}); expected integer label ids")
    if rounded.min() < 0:
        raise InputError(f"'{name}': label map has negative values (min {rounded.min():g}); expected label ids >= 0")
    top = rounded.max(initial=0)
    dtype = np.uint8 if top < 256 else (np.uint16 if top < 65536 else np.uint32)
    return rounded.astype(dtype)


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
def load(
    path: str | os.PathLike,
    *,
    is_label: bool = False,
    modality: str | None = None,
    series_uid: str | None = None,
) -> Volume:
    """Read a 3D volume.

    :param path: a NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``) or MetaImage
        (``.mha``/``.mhd``) file, or a folder holding one DICOM series.
    :param is_label: read as a label map (integer ids; resampled nearest-neighbour later on).
    :param modality: 'CT' or 'MR' if known; DICOM series report their own.
    :param series_uid: for a folder holding several DICOM series, which one to read.
    :returns: the volume in LPS, named after ``path``.
    :raises InputError: missing, unreadable or corrupt file, not 3D, unsupported format.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InputError(f"'{name}': no such file or folder")
    if path.is_dir():
        return _load_dicom_series(path, is_label=is_label, modality=modality, series_uid=series_uid)
    if not os.access(path, os.R_OK):
        raise InputError(f"'{name}': file is not readable (permission denied)")
    suffix = _suffix(path)
    if not suffix:
        raise InputError(
            f"'{name}': unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)} or a DICOM folder"
        )
    try:
        image = sitk.ReadImage(name)
    except RuntimeError as exc:
        if suffix in (".nii", ".nii.gz"):
            return _load_nifti_with_nibabel(path, is_label=is_label, modality=modality, sitk_error=exc)
        raise InputError(f"'{name}': cannot read {suffix} file: {_first_line(exc)}") from None
    volume = from_sitk(image, is_label=is_label, name=name, modality=_normalise_modality(modality))
    if suffix in (".nii", ".nii.gz") and np.issubdtype(volume.array.dtype, np.floating):
        _restore_non_finite_nifti_values(path, volume.array)
    return volume


def _restore_non_finite_nifti_values(path: Path, array: np.ndarray) -> None:
    """ITK's NIfTI reader silently turns NaN/inf voxels into 0; put them back (read with
    nibabel, same [i, j, k] file order) so that validation can report them."""
    import nibabel as nib

    try:
        raw = np.asarray(nib.load(str(path)).dataobj)
    except Exception:  # pragma: no cover - SimpleITK read it, nibabel normally can too
        return
    raw = raw.reshape(array.shape) if raw.size == array.size else None
    if raw is None:
        return
    bad = ~np.isfinite(raw)
    if bad.any():
        array[bad] = raw[bad]


def read_grid(path: str | os.PathLike) -> Grid:
    """The grid of an image file without reading its voxels (whole load for DICOM folders)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"'{path}': no such file or folder")
    if path.is_dir():
        return load(path).grid
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if _suffix(path) in (".nii", ".nii.gz"):
            return load(path).grid
        raise InputError(f"'{path}': cannot read image header: {_first_line(exc)}") from None
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        return Grid(size[:3], reader.GetSpacing()[:3], reader.GetOrigin()[:3], np.asarray(reader.GetDirection()).reshape(4, 4)[:3, :3])
    if len(size) != 3:
        raise InputError(f"'{path}': expected a 3D volume, got a {len(size)}D image of size {size}")
    return Grid(size, reader.GetSpacing(), reader.GetOrigin(), np.asarray(reader.GetDirection()).reshape(3, 3))


def _normalise_modality(modality: str | None) -> str | None:
    if modality is None:
        return None
    m = modality.strip().upper()
    if m in ("MRI", "MR", "T1", "T2"):
        return "MR"
    if m in ("CT", "CBCT"):
        return "CT"
    return m or None


def _load_dicom_series(folder: Path, *, is_label: bool, modality: str | None, series_uid: str | None) -> Volume:
    name = str(folder)
    reader = sitk.ImageSeriesReader()
    try:
        uids = list(reader.GetGDCMSeriesIDs(name))
    except RuntimeError as exc:  # pragma: no cover - GDCM rarely raises here
        raise InputError(f"'{name}': cannot scan folder for DICOM files: {_first_line(exc)}") from None
    if not uids:
        raise InputError(f"'{name}': folder holds no DICOM series (expected a folder of DICOM files of one series)")
    if series_uid is None:
        if len(uids) > 1:
            raise InputError(
                f"'{name}': folder holds {len(uids)} DICOM series ({', '.join(uids)}); pass one series' folder or its UID"
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputError(f"'{name}': no DICOM series '{series_uid}' here; found {', '.join(uids)}")
    files = reader.GetGDCMSeriesFileNames(name, series_uid)
    if len(files) < 2:
        raise InputError(f"'{name}': DICOM series has {len(files)} slice(s); a 3D volume needs at least 2")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"'{name}': cannot read DICOM series: {_first_line(exc)}") from None
    if modality is None:
        try:
            modality = reader.GetMetaData(0, "0008|0060").strip() or None
        except RuntimeError:
            modality = None
    return from_sitk(image, is_label=is_label, name=name, modality=_normalise_modality(modality))


def _load_nifti_with_nibabel(path: Path, *, is_label: bool, modality: str | None, sitk_error: Exception) -> Volume:
    """Fallback for NIfTI files SimpleITK refuses (e.g. direction cosines that are orthonormal
    only to a few decimals). Converts nibabel's RAS affine to LPS."""
    import nibabel as nib

    name = str(path)
    try:
        img = nib.load(name)
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"'{name}': cannot read NIfTI file: {_first_line(sitk_error)}; nibabel: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"'{name}': expected a 3D volume, got a {data.ndim}D image of shape {data.shape}")
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    linear = affine_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing[None, :]
    u, _, vt = np.linalg.svd(direction)
    orthonormal = u @ vt
    if np.abs(orthonormal - direction).max() > 1e-3:
        raise InputError(
            f"'{name}': the voxel axes are sheared (non-orthogonal affine); resample it to an orthogonal grid first"
        )
    grid = Grid(data.shape, spacing, affine_lps[:3, 3], orthonormal)
    array = _as_label_array(data, name) if is_label else data
    return Volume(array, grid, is_label=is_label, name=name, modality=_normalise_modality(modality))


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early, before any compute, if ``path`` cannot be written as a volume file."""
    path = Path(path)
    if not _suffix(path):
        raise OutputError(f"{what} '{path}': unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    if path.is_dir():
        raise OutputError(f"{what} '{path}': is a folder; expected a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{what} '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{path}': folder '{parent}' is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} '{path}': file exists and is not writable")
    return path


def save(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` atomically; the format follows the suffix.

    Labels are stored with the smallest unsigned integer type that holds them, float64 images as
    float32. The target appears complete or not at all.
    """
    path = check_writable(path)
    image = to_sitk(_storage_volume(volume))
    parent = path.parent if str(path.parent) else Path(".")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        staged = tmpdir / path.name
        try:
            sitk.WriteImage(image, str(staged), compress)
        except RuntimeError as exc:
            raise OutputError(f"cannot write '{path}': {_first_line(exc)}") from None
        produced = sorted(tmpdir.iterdir(), key=lambda p: p.name == path.name)  # header/main file last
        for item in produced:
            os.replace(item, parent / item.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _storage_volume(volume: Volume) -> Volume:
    arr = volume.array
    if volume.is_label:
        if arr.dtype == bool or arr.size == 0:
            arr = arr.astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.integer) and arr.min(initial=0) >= 0:
            top = int(arr.max(initial=0))
            arr = arr.astype(np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return volume.with_array(arr) if arr is not volume.array else volume


def remove_quietly(paths: Iterable[Path]) -> None:
    for p in paths:
        try:
            Path(p).unlink()
        except OSError:
            pass


def save_all(outputs: dict[str | os.PathLike, Volume]) -> list[Path]:
    """Write several volumes as one unit: either all appear or none does.

    Each file is written atomically (:func:`save`); if one fails, the files this call already
    put in place are removed and the error is raised.
    """
    for path in outputs:
        check_writable(path)
    written: list[Path] = []
    try:
        for path, volume in outputs.items():
            written.append(save(volume, path))
    except BaseException:
        remove_quietly(written)
        raise
    return written
