"""Reading and writing volumes: formats, geometry round trips, RAS/LPS, DICOM, errors, atomicity."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from spasem.core import io
from spasem.core.volume import Grid, Volume
from spasem.errors import InputError, OutputError

FLIPPED_OBLIQUE = np.array(
    [[0.0, -1.0, 0.0], [np.cos(0.3), 0.0, -np.sin(0.3)], [np.sin(0.3), 0.0, np.cos(0.3)]]
)


def _volume(direction=np.eye(3), dtype=np.float32, is_label=False) -> Volume:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 7, size=(7, 5, 4)).astype(dtype) if is_label else rng.normal(size=(7, 5, 4)).astype(dtype)
    return Volume(arr, Grid(arr.shape, (0.7, 1.1, 2.5), (12.5, -30.25, 101.0), direction), is_label=is_label)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]), FLIPPED_OBLIQUE], ids=["lps", "flipped", "oblique"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path, suffix, direction):
    vol = _volume(direction)
    path = io.save(vol, tmp_path / f"v{suffix}")
    back = io.load(path)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.grid.same_as(vol.grid, origin_atol=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_labels_round_trip_with_integer_type(tmp_path):
    vol = _volume(is_label=True, dtype=np.int64)
    back = io.load(io.save(vol, tmp_path / "lab.nii.gz"), is_label=True)
    assert back.is_label and back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, vol.array)


def test_nifti_ras_affine_becomes_lps_and_array_is_ijk(tmp_path):
    """A NIfTI written by nibabel (RAS affine) is read into LPS with nibabel's [i, j, k] array."""
    arr = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    affine_ras = np.array([[-0.9, 0, 0, 90.0], [0, 0.8, 0, -126.0], [0, 0, 3.0, -72.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(arr, affine_ras), tmp_path / "ras.nii.gz")
    vol = io.load(tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.grid.affine_ras, affine_ras, atol=1e-5)
    np.testing.assert_allclose(vol.grid.affine[:3, 3], [-90.0, 126.0, -72.0], atol=1e-5)  # LPS origin
    # and what spasem writes, nibabel reads back with the same RAS affine
    io.save(vol, tmp_path / "out.nii.gz")
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").affine, affine_ras, atol=1e-5)


def test_nearly_orthonormal_nifti_is_read_through_nibabel(tmp_path):
    arr = np.ones((4, 4, 4), np.float32)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[1.0, 2e-4, 0], [0, 1.0, 0], [0, 0, 1.0]])  # ITK refuses such direction cosines
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "skewed.nii")
    vol = io.load(tmp_path / "skewed.nii")
    assert np.allclose(vol.grid.direction @ vol.grid.direction.T, np.eye(3), atol=1e-9)


def test_sheared_nifti_is_refused(tmp_path):
    affine = np.eye(4)
    affine[0, 1] = 0.5
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), affine)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "sheared.nii")
    with pytest.raises(InputError, match="sheared"):
        io.load(tmp_path / "sheared.nii")


def test_dicom_series_folder(tmp_path):
    """A DICOM series written slice by slice is read back as one volume with its geometry."""
    vol = _volume(dtype=np.int16)
    image = io.to_sitk(vol)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        s.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in origin))
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0008|0060", "CT")
        s.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0018|0050", "2.5")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)
    back = io.load(folder)
    assert back.modality == "CT"
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.grid.same_as(vol.grid, origin_atol=1e-3)


def test_shared_dicom_and_flipped_label_line_up(shared_data):
    """The real CT series and its y-flipped label file cover the same voxels."""
    folder = shared_data / "ct-dicom-liver-spleen"
    ct = io.load(folder / "dicom")
    labels = io.load(folder / "labels.nii.gz", is_label=True)
    assert ct.shape == (512, 512, 20) and ct.modality == "CT"
    assert np.allclose(ct.spacing, (0.9765625, 0.9765625, 2.0))
    assert not labels.grid.same_as(ct.grid)  # stored flipped
    aligned = labels.reoriented_onto(ct.grid)
    assert aligned is not None
    np.testing.assert_array_equal(aligned.array, labels.array[:, ::-1, :])
    # the liver (5) is bright soft tissue in the CT once aligned, mirrored it is not
    liver = aligned.array == 5
    assert 20 < np.median(ct.array[liver]) < 200
    mirrored = labels.array == 5
    assert np.mean(np.abs(ct.array[mirrored] - np.median(ct.array[liver])) < 60) < np.mean(
        np.abs(ct.array[liver] - np.median(ct.array[liver])) < 60
    )


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.nii.gz", None, "no such file"),
        ("notes.txt", b"hello", "unsupported file type"),
        ("corrupt.nii.gz", gzip.compress(b"not a nifti at all" * 30), "cannot read"),
        ("truncated.nrrd", b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n\x00\x01", "cannot read"),
    ],
)
def test_unreadable_inputs_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as err:
        io.load(path)
    assert str(path) in str(err.value)


def test_2d_and_4d_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="expected a 3D volume, got a 2D image"):
        io.load(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "series.nii.gz")
    with pytest.raises(InputError, match="expected a 3D volume, got a 4D image of size 4x4x4x3"):
        io.load(tmp_path / "series.nii.gz")
    # a 4D file with a single volume is accepted
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1), np.float32), np.eye(4)), tmp_path / "one.nii.gz")
    assert io.load(tmp_path / "one.nii.gz").shape == (4, 4, 4)


def test_label_with_fractional_values_is_refused(tmp_path):
    io.save(Volume.from_array(np.full((3, 3, 3), 0.5, np.float32)), tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match="non-integer values"):
        io.load(tmp_path / "soft.nii.gz", is_label=True)


def test_empty_dicom_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        io.load(tmp_path)


def test_save_refuses_missing_folder_and_bad_suffix(tmp_path):
    vol = _volume()
    with pytest.raises(OutputError, match="does not exist"):
        io.save(vol, tmp_path / "nope" / "x.nii.gz")
    with pytest.raises(OutputError, match="unsupported file type"):
        io.save(vol, tmp_path / "x.png")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"

    def broken_write(image, path, compress):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.sitk, "WriteImage", broken_write)
    with pytest.raises(OutputError, match="disk full"):
        io.save(_volume(), target)
    assert list(tmp_path.iterdir()) == []


def test_save_all_removes_earlier_files_when_a_later_one_fails(tmp_path, monkeypatch):
    real_save = io.save
    calls = []

    def flaky_save(volume, path, compress=True):
        calls.append(path)
        if len(calls) == 2:
            raise OutputError("simulated failure")
        return real_save(volume, path, compress=compress)

    monkeypatch.setattr(io, "save", flaky_save)
    with pytest.raises(OutputError):
        io.save_all({tmp_path / "a.nii.gz": _volume(), tmp_path / "b.nii.gz": _volume()})
    assert list(tmp_path.iterdir()) == []


def test_non_finite_nifti_voxels_are_kept_for_validation(tmp_path):
    """ITK zeroes NaN/inf when reading NIfTI; spasem restores them so they can be refused."""
    arr = np.zeros((4, 4, 4), np.float32)
    arr[1, 2, 3] = np.inf
    arr[0, 0, 1] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "bad.nii.gz")
    vol = io.load(tmp_path / "bad.nii.gz")
    assert np.isinf(vol.array[1, 2, 3]) and np.isnan(vol.array[0, 0, 1])
    with pytest.raises(InputError, match="2 NaN/infinite"):
        vol.check_finite()
