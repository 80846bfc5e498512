"""Tests for aslcal.io.nifti: round trips, and every kind of bad input file."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel
import numpy as np
import pytest

import aslcal
import aslcal.io.nifti as nifti_module
from aslcal.errors import BackendUnavailableError, InputError
from aslcal.io import Image, gzip_backend, gzip_backends, load_image, save_image


@contextlib.contextmanager
def raises_input_error(pattern: str, folder: Path) -> Iterator[pytest.ExceptionInfo[InputError]]:
    """``pytest.raises(InputError)``, searching ``pattern`` in the message with ``folder``
    blanked out: tmp_path names contain the test's name, which would match by itself."""
    with pytest.raises(InputError) as info:
        yield info
    message = str(info.value).replace(str(folder), "<folder>")
    assert re.search(pattern, message), f"{pattern!r} not found in {message!r}"


def _names(folder: Path) -> list[str]:
    """Every entry of a folder, hidden ones (temporary files) included."""
    return sorted(os.listdir(folder))


# An oblique-free affine whose entries are all exactly representable in float32
# (the NIfTI-1 sform is stored as float32): voxel sizes 2, 2.5, 3 mm, axes permuted
# and flipped, origin (-90.5, 126.25, -72) mm.
AFFINE = np.array(
    [
        [0.0, -2.5, 0.0, -90.5],
        [2.0, 0.0, 0.0, 126.25],
        [0.0, 0.0, 3.0, -72.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# A sheared affine (only the sform can hold it); also float32-exact.
SHEARED = np.array(
    [
        [2.0, 0.25, 0.0, 10.0],
        [0.0, 2.0, 0.5, -20.0],
        [0.0, 0.0, 3.0, 30.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

# Byte offsets of scl_slope and scl_inter in a NIfTI-1 header (nifti1.h:
# 'float scl_slope; /* Data scaling: slope. */ off 112', 'scl_inter off 116').
SCL_SLOPE_OFFSET = 112
SCL_INTER_OFFSET = 116


def _ramp(shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """0, 1, 2, ... laid out in ``shape``: every value known without computing."""
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def _random(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(1234).standard_normal(shape).astype(np.float32)


def _nib_write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Write with nibabel directly (independent of save_image)."""
    nibabel.save(nibabel.Nifti1Image(data, affine), os.fspath(path))
    return path


@pytest.fixture(params=["isal", "zlib"])
def any_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with ISA-L and once with the standard library (ASLCAL_GZIP)."""
    if request.param == "isal":
        pytest.importorskip("isal")
    monkeypatch.setenv("ASLCAL_GZIP", request.param)
    assert gzip_backend() == request.param
    return request.param


def _set_scaling(path: Path, slope: float, inter: float) -> None:
    """Patch scl_slope/scl_inter in an uncompressed little-endian NIfTI-1 file."""
    raw = bytearray(path.read_bytes())
    raw[SCL_SLOPE_OFFSET : SCL_SLOPE_OFFSET + 4] = struct.pack("<f", slope)
    raw[SCL_INTER_OFFSET : SCL_INTER_OFFSET + 4] = struct.pack("<f", inter)
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 5, 6, 3)])
def test_round_trip_float32_exact(tmp_path: Path, suffix: str, shape: tuple[int, ...]) -> None:
    data = _random(shape)
    out = save_image(tmp_path / f"img{suffix}", data, AFFINE)
    assert out == tmp_path / f"img{suffix}"
    image = load_image(out)
    assert isinstance(image, Image)
    assert image.data.dtype == np.float32
    assert image.shape == shape
    assert image.ndim == len(shape)
    np.testing.assert_array_equal(image.data, data)  # float32 stored as float32: exact
    np.testing.assert_array_equal(image.affine, AFFINE)
    assert image.affine.dtype == np.float64
    assert image.voxel_size == (2.0, 2.5, 3.0)  # column norms of AFFINE[:3, :3]
    assert image.path == out
    assert int(image.header["sform_code"]) == 1
    assert int(image.header["qform_code"]) == 1
    # The qform is stored as float32 quaternion parameters (b, c, d) and is rebuilt
    # through sqrt(1 - b^2 - c^2 - d^2): equal to AFFINE up to float32 rounding.
    np.testing.assert_allclose(image.header.get_qform(), AFFINE, rtol=0, atol=1e-6)
    assert image.header.get_xyzt_units() == ("mm", "sec")
    assert _names(tmp_path) == [f"img{suffix}"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_file_format_follows_extension(tmp_path: Path, suffix: str) -> None:
    out = save_image(tmp_path / f"img{suffix}", _ramp((2, 2, 2)), AFFINE)
    head = out.read_bytes()[:4]
    if suffix == ".nii.gz":
        assert head[:2] == b"\x1f\x8b"  # gzip magic
    else:
        assert head == struct.pack("<i", 348)  # NIfTI-1 sizeof_hdr


def test_float64_request_and_float64_storage(tmp_path: Path) -> None:
    data = np.array([0.1, 1.0 / 3.0, 2.0**-40, 1e300]).reshape(1, 2, 2)
    out = save_image(tmp_path / "d.nii.gz", data, AFFINE, dtype="float64")
    image = load_image(out, dtype="float64")
    assert image.data.dtype == np.float64
    np.testing.assert_array_equal(image.data, data)  # float64 on disk: exact


def test_float64_file_as_float32(tmp_path: Path) -> None:
    data = np.array([0.5, 1.0 / 3.0]).reshape(1, 1, 2)
    out = save_image(tmp_path / "d.nii", data, AFFINE, dtype=np.float64)
    image = load_image(out, dtype=np.float32)
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data.ravel(), np.array([0.5, 1.0 / 3.0], dtype=np.float32))
    # 1e300 has no float32 representation: an error that says what to do, not Inf.
    big = save_image(tmp_path / "big.nii", np.array([1e300]).reshape(1, 1, 1), AFFINE, dtype="float64")
    with raises_input_error("float64", tmp_path):
        load_image(big)


def test_default_float32_from_float64(tmp_path: Path) -> None:
    data = np.array([0.1, 0.25]).reshape(1, 1, 2)
    out = save_image(tmp_path / "d.nii", data, AFFINE)
    assert nibabel.load(out).get_data_dtype() == np.float32
    # 0.25 is float32-exact; 0.1 becomes float32(0.1).
    np.testing.assert_array_equal(load_image(out).data.ravel(), np.array([0.1, 0.25], np.float32))


def test_bool_saved_as_uint8(tmp_path: Path) -> None:
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[1, 1, 1] = True
    out = save_image(tmp_path / "mask.nii.gz", mask, AFFINE)
    assert nibabel.load(out).get_data_dtype() == np.uint8
    image = load_image(out)
    assert image.data.sum() == 1.0 and image.data[1, 1, 1] == 1.0


def test_integer_dtype_rounds_and_checks(tmp_path: Path) -> None:
    out = save_image(tmp_path / "s.nii", np.array([1.4, -2.6, 3.5]).reshape(1, 1, 3), AFFINE, dtype="int16")
    assert nibabel.load(out).get_data_dtype() == np.int16
    # np.rint rounds half to even: 3.5 -> 4, 1.4 -> 1, -2.6 -> -3.
    np.testing.assert_array_equal(load_image(out).data.ravel(), [1.0, -3.0, 4.0])
    with raises_input_error("NaN", tmp_path):
        save_image(tmp_path / "n.nii", np.array([np.nan, 1.0]).reshape(1, 1, 2), AFFINE, dtype="int16")
    with raises_input_error("does not fit", tmp_path):
        save_image(tmp_path / "o.nii", np.array([40000.0]).reshape(1, 1, 1), AFFINE, dtype="int16")
    assert _names(tmp_path) == ["s.nii"]


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_64_bit_integers_saved_when_asked(tmp_path: Path, dtype: str) -> None:
    data = np.arange(24).reshape(2, 3, 4)
    save_image(tmp_path / "i.nii.gz", data, AFFINE, dtype=dtype)
    img = nibabel.load(os.fspath(tmp_path / "i.nii.gz"))
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_float16_and_singular_affine_refused(tmp_path: Path) -> None:
    with raises_input_error("float16.* cannot be stored in NIfTI", tmp_path):
        save_image(tmp_path / "h.nii.gz", np.ones((2, 2, 2)), AFFINE, dtype="float16")
    singular = AFFINE.copy()
    singular[:3, 2] = 0.0
    with raises_input_error("singular", tmp_path):
        save_image(tmp_path / "s.nii.gz", np.ones((2, 2, 2)), singular)
    assert _names(tmp_path) == []


def test_float32_overflow_refused(tmp_path: Path) -> None:
    with raises_input_error("float64", tmp_path):
        save_image(tmp_path / "big.nii", np.array([1e300]).reshape(1, 1, 1), AFFINE)
    assert _names(tmp_path) == []


def test_header_codes_and_sheared_affine_preserved(tmp_path: Path) -> None:
    header = nibabel.Nifti1Header()
    header.set_data_shape((3, 4, 5))
    header.set_sform(SHEARED, code=4)  # 4 = MNI152
    header.set_qform(SHEARED, code=2)  # 2 = aligned anatomical
    header["intent_name"] = b"m0"
    out = save_image(tmp_path / "h.nii.gz", _ramp((3, 4, 5)), SHEARED, header=header)
    image = load_image(out)
    assert int(image.header["sform_code"]) == 4
    assert int(image.header["qform_code"]) == 2
    assert image.header["intent_name"] == b"m0"  # other header fields carried over
    np.testing.assert_array_equal(image.affine, SHEARED)  # sform wins: exact
    np.testing.assert_array_equal(image.data, _ramp((3, 4, 5)))


def test_header_affine_used_when_affine_omitted(tmp_path: Path) -> None:
    src = load_image(save_image(tmp_path / "a.nii", _ramp((2, 3, 4)), AFFINE))
    out = save_image(tmp_path / "b.nii", src.data * 2, header=src.header)
    np.testing.assert_array_equal(load_image(out).affine, AFFINE)
    np.testing.assert_array_equal(load_image(out).data, 2 * _ramp((2, 3, 4)))


def test_header_with_zero_codes_still_places_image(tmp_path: Path) -> None:
    header = nibabel.Nifti1Header()
    header.set_data_shape((2, 2, 2))
    out = save_image(tmp_path / "z.nii", _ramp((2, 2, 2)), AFFINE, header=header)
    image = load_image(out)
    assert int(image.header["sform_code"]) == 1
    np.testing.assert_array_equal(image.affine, AFFINE)


def test_loaded_header_roundtrip_3d_from_4d(tmp_path: Path) -> None:
    # A single-volume 4-D file loaded as 3-D and saved with its own header.
    src_path = _nib_write(tmp_path / "one.nii", _ramp((2, 3, 4, 1)))
    src = load_image(src_path, ndim=3)
    assert src.shape == (2, 3, 4)
    out = save_image(tmp_path / "copy.nii.gz", src.data, header=src.header)
    again = load_image(out)
    assert again.shape == (2, 3, 4)
    np.testing.assert_array_equal(again.data, _ramp((2, 3, 4)))


def test_nifti2_round_trip(tmp_path: Path) -> None:
    header = nibabel.Nifti2Header()
    header.set_data_shape((2, 2, 3))
    out = save_image(tmp_path / "n2.nii.gz", _ramp((2, 2, 3)), AFFINE, header=header)
    image = load_image(out)
    assert isinstance(image.header, nibabel.Nifti2Header)
    np.testing.assert_array_equal(image.data, _ramp((2, 2, 3)))
    np.testing.assert_array_equal(image.affine, AFFINE)


def test_scaling_applied(tmp_path: Path) -> None:
    # int16 0..7 with slope 2 and intercept 1 -> 1, 3, 5, ..., 15 (value = 2 * raw + 1).
    path = _nib_write(tmp_path / "s.nii", _ramp((2, 2, 2), np.int16))
    _set_scaling(path, 2.0, 1.0)
    for dtype in ("float32", "float64"):
        image = load_image(path, dtype=dtype)
        assert image.data.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(image.data.ravel(), [1, 3, 5, 7, 9, 11, 13, 15])


@pytest.mark.parametrize(
    ("slope", "inter"),
    [
        (0.0, float("nan")),  # NIfTI-1: slope 0 means no scaling; inter ignored
        (float("nan"), 0.0),  # nibabel writes NaN slope for "no scaling"
    ],
)
def test_unset_scaling_means_raw_values(tmp_path: Path, slope: float, inter: float) -> None:
    path = _nib_write(tmp_path / "s.nii", _ramp((2, 2, 2), np.int16))
    _set_scaling(path, slope, inter)
    np.testing.assert_array_equal(load_image(path).data.ravel(), np.arange(8))


@pytest.mark.parametrize(
    ("slope", "inter"),
    [
        (2.0, float("nan")),
        (2.0, float("inf")),
        (float("inf"), 0.0),  # nibabel would silently ignore this slope
        (float("-inf"), 1.0),
    ],
)
def test_nonfinite_scaling_rejected(tmp_path: Path, slope: float, inter: float) -> None:
    path = _nib_write(tmp_path / "s.nii", _ramp((2, 2, 2), np.int16))
    _set_scaling(path, slope, inter)
    with raises_input_error(r"scaling is not finite \(scl_slope=", tmp_path) as info:
        load_image(path, name="calibration image (-c)")
    assert "calibration image (-c)" in str(info.value)
    assert str(path) in str(info.value)


def test_nonfinite_scaling_rejected_in_gzip(tmp_path: Path) -> None:
    plain = _nib_write(tmp_path / "s.nii", _ramp((2, 2, 2), np.int16))
    _set_scaling(plain, 2.0, float("nan"))
    gz = tmp_path / "s.nii.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    with raises_input_error(r"scaling is not finite \(scl_slope=2\.0, scl_inter=nan\)", tmp_path):
        load_image(gz)


# --------------------------------------------------------------- dimensionality


def test_ndim_rules(tmp_path: Path) -> None:
    single = _nib_write(tmp_path / "single.nii", _ramp((2, 3, 4, 1)))
    five = _nib_write(tmp_path / "five.nii", _ramp((2, 3, 4, 1, 1)))
    series = _nib_write(tmp_path / "series.nii", _ramp((2, 3, 4, 3)))
    vol = _nib_write(tmp_path / "vol.nii", _ramp((2, 3, 4)))

    assert load_image(single, ndim=3).shape == (2, 3, 4)
    assert load_image(single, ndim=4).shape == (2, 3, 4, 1)
    assert load_image(single).shape == (2, 3, 4)
    assert load_image(five).shape == (2, 3, 4)
    assert load_image(five, ndim=(3, 4)).shape == (2, 3, 4)
    assert load_image(five, ndim=4).shape == (2, 3, 4, 1)
    assert load_image(series).shape == (2, 3, 4, 3)  # a time series stays 4-D
    assert load_image(series, ndim=(3, 4)).shape == (2, 3, 4, 3)
    assert load_image(vol, ndim=3).shape == (2, 3, 4)
    np.testing.assert_array_equal(load_image(five).data, _ramp((2, 3, 4)))


def test_4d_with_several_volumes_when_3d_required(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "series.nii.gz", _ramp((2, 3, 4, 3)))
    with raises_input_error("3-D", tmp_path) as info:
        load_image(path, ndim=3, name="calibration image (-c)")
    message = str(info.value)
    assert "calibration image (-c)" in message and str(path) in message
    assert "(2, 3, 4, 3)" in message


def test_3d_when_4d_required(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "vol.nii", _ramp((2, 3, 4)))
    with raises_input_error("4-D", tmp_path):
        load_image(path, ndim=4)


def test_2d_rejected(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "flat.nii", _ramp((4, 5)))
    with raises_input_error("2-D", tmp_path):
        load_image(path)


def test_5d_with_real_fifth_axis_rejected(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "five.nii", _ramp((2, 2, 2, 2, 3)))
    with raises_input_error("5-D", tmp_path):
        load_image(path)


@pytest.mark.parametrize("bad,pattern", [
    (np.nan, "non-finite"),  # a NaN in the sform
    (0.0, "singular"),  # the z column zeroed: every slice at one place
])
def _write_with_header(path: Path, data: np.ndarray, edit) -> Path:
    """Write with nibabel, then change header fields in the bytes (nibabel's own writer
    would make pixdim and the sform agree with the image's affine again) and gzip."""
    raw = tmp = path.with_suffix("")  # .nii
    nibabel.save(nibabel.Nifti1Image(data, np.diag([2.5, 3.0, 4.0, 1.0])), os.fspath(tmp))
    blob = bytearray(raw.read_bytes())
    hdr = nibabel.Nifti1Header.from_fileobj(io.BytesIO(bytes(blob[:348])))
    edit(hdr)
    blob[:348] = hdr.binaryblock
    path.write_bytes(gzip.compress(bytes(blob)))
    tmp.unlink()
    return path


def _set_sform_column(value: float):
    def edit(hdr: nibabel.Nifti1Header) -> None:
        hdr["qform_code"] = 0
        hdr["sform_code"] = 1
        hdr["srow_z"][2] = value
    return edit


@pytest.mark.parametrize("bad,pattern", [
    (np.nan, "non-finite"),  # a NaN in the sform
    (0.0, "singular"),  # the z column zeroed: every slice at one place
])
def test_affine_that_places_no_voxel_is_refused_naming_the_file(tmp_path: Path, bad: float, pattern: str) -> None:
    """Before: such an image was read, fitted and calibrated, and failed only when its
    maps were written (naming an output, or the m0scan as "misaligned")."""
    path = _write_with_header(tmp_path / "odd.nii.gz", _ramp((3, 4, 5)), _set_sform_column(bad))
    assert nibabel.load(os.fspath(path)).header.get_sform(coded=True)[1] == 1
    with raises_input_error(rf"odd\.nii\.gz.*{pattern}", tmp_path):
        load_image(path)


def test_zero_pixdim_takes_the_voxel_size_of_the_affine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pixdim 0 with a valid sform: nibabel reads the zoom as 1 mm; the voxel size (the
    brain mask's balls are sized in mm with it) is the affine's 2.5 mm, with a warning."""
    def edit(hdr: nibabel.Nifti1Header) -> None:
        hdr["pixdim"][1] = 0.0
        hdr["qform_code"] = 0
        hdr["sform_code"] = 1
    path = _write_with_header(tmp_path / "zero.nii.gz", _ramp((3, 4, 5)), edit)
    assert struct.unpack("<f", gzip.decompress(path.read_bytes())[80:84])[0] == 0.0  # the file's pixdim[1]
    with caplog.at_level("WARNING", logger="aslcal"):
        loaded = load_image(path)
    np.testing.assert_allclose(loaded.voxel_size, (2.5, 3.0, 4.0))
    assert any("disagrees with its affine" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ndim", [2, 5, (3, 5), ()])
def test_bad_ndim_argument(tmp_path: Path, ndim: object) -> None:
    path = _nib_write(tmp_path / "vol.nii", _ramp((2, 3, 4)))
    with raises_input_error("ndim", tmp_path):
        load_image(path, ndim=ndim)  # type: ignore[arg-type]


def test_bad_dtype_argument(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "vol.nii", _ramp((2, 3, 4)))
    with raises_input_error("dtype", tmp_path):
        load_image(path, dtype="int16")


# -------------------------------------------------------------- bad input files


def _assert_input_error(path: Path, match: str) -> None:
    with raises_input_error(match, path.parent) as info:
        load_image(path, name="calibration image (-c)")
    message = str(info.value)
    assert "calibration image (-c)" in message
    assert str(path) in message
    assert "expected a 3-D or 4-D NIfTI image" in message


def test_missing_file(tmp_path: Path) -> None:
    _assert_input_error(tmp_path / "nope.nii.gz", "does not exist")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "calib.nii.gz"
    folder.mkdir()
    _assert_input_error(folder, "folder")


def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    path = tmp_path / "calib.nii.gz"
    path.write_text("this is not an image\n" * 30)
    _assert_input_error(path, "not a NIfTI")


def test_png_named_nii(tmp_path: Path) -> None:
    path = tmp_path / "calib.nii"
    # PNG signature and a 1x1 IHDR chunk, padded past the 348-byte NIfTI header size.
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + struct.pack(">II", 1, 1) + b"\x08\x02\x00\x00\x00"
    path.write_bytes(png + bytes(400))
    _assert_input_error(path, "not a NIfTI")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "calib.nii"
    path.write_bytes(b"")
    _assert_input_error(path, "not a NIfTI")


def test_nifti_pair_header_rejected(tmp_path: Path) -> None:
    nibabel.save(nibabel.Nifti1Pair(_ramp((2, 2, 2)), AFFINE), os.fspath(tmp_path / "pair.img"))
    _assert_input_error(tmp_path / "pair.hdr", "not a NIfTI")


def test_truncated_nii_gz(tmp_path: Path, any_backend: str) -> None:
    path = _nib_write(tmp_path / "calib.nii.gz", _random((8, 8, 8, 4)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _assert_input_error(path, "gzip stream is truncated or corrupt")


def test_corrupt_gzip_stream(tmp_path: Path, any_backend: str) -> None:
    path = _nib_write(tmp_path / "calib.nii.gz", _random((8, 8, 8, 4)))
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    for i in range(middle, middle + 16):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    _assert_input_error(path, "gzip stream is truncated or corrupt")


def test_truncated_uncompressed_nii(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "calib.nii", _random((8, 8, 8, 4)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _assert_input_error(path, "file is truncated: the header describes")


@pytest.mark.parametrize("missing", [1, 10, 300])
def test_truncated_by_fewer_bytes_than_the_header(tmp_path: Path, missing: int) -> None:
    """The check counts the file's own vox_offset (352 here): a file short by fewer bytes
    than that is caught too, and the message gives the header's true byte count."""
    data = np.arange(16 * 16 * 10, dtype=np.int16).reshape(16, 16, 10)
    path = _nib_write(tmp_path / "calib.nii", data)
    raw = path.read_bytes()
    assert len(raw) == 352 + data.nbytes
    path.write_bytes(raw[:-missing])
    _assert_input_error(path, f"the header describes {352 + data.nbytes} bytes .* holds {len(raw) - missing}")
    with raises_input_error("truncated", tmp_path) as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_vox_offset_inside_the_header_rejected(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "calib.nii", _random((4, 4, 4)))
    raw = bytearray(path.read_bytes())
    raw[108:112] = struct.pack("<f", 0.0)  # vox_offset: the voxels would start at byte 0
    path.write_bytes(bytes(raw))
    _assert_input_error(path, "vox_offset 0 points into the header")


@pytest.mark.parametrize("shape", [(8, 0, 4), (4, 4, 4, 0)])
def test_axis_of_length_zero_rejected(tmp_path: Path, shape) -> None:
    path = _nib_write(tmp_path / "calib.nii.gz", np.zeros(shape, np.float32))
    _assert_input_error(path, r"axis of length 0")


@pytest.mark.parametrize(("unit", "factor"), [("meter", 1000.0), ("micron", 1e-3)])
def test_spatial_unit_converted_to_millimetres(tmp_path: Path, unit: str, factor: float) -> None:
    """A header in metres or micrometres: the loaded affine is in mm (as documented), and
    saving with the loaded header keeps the geometry (no 1000x shrink)."""
    img = nibabel.Nifti1Image(_random((4, 5, 6)), np.diag([2.0, 2.5, 3.0, 1.0]) / np.array([factor] * 3 + [1.0]))
    img.header.set_xyzt_units(xyz=unit, t="sec")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    path = tmp_path / "m.nii"
    nibabel.save(img, os.fspath(path))
    loaded = load_image(path)
    np.testing.assert_allclose(np.diag(loaded.affine)[:3], [2.0, 2.5, 3.0], rtol=1e-6)
    np.testing.assert_allclose(loaded.voxel_size, (2.0, 2.5, 3.0), rtol=1e-6)
    out = tmp_path / "out.nii"
    save_image(out, loaded.data, header=loaded.header)
    again = nibabel.load(os.fspath(out))
    assert again.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(np.diag(again.affine)[:3], [2.0, 2.5, 3.0], rtol=1e-6)
    # a header still in metres given to save_image: its affine is converted as well
    out2 = tmp_path / "out2.nii"
    save_image(out2, loaded.data, header=img.header)
    np.testing.assert_allclose(np.diag(nibabel.load(os.fspath(out2)).affine)[:3], [2.0, 2.5, 3.0], rtol=1e-6)


def test_truncated_inside_header(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "calib.nii", _random((2, 2, 2)))
    path.write_bytes(path.read_bytes()[:200])
    _assert_input_error(path, "not a NIfTI")


def test_complex_data_rejected(tmp_path: Path) -> None:
    path = _nib_write(tmp_path / "c.nii", np.ones((2, 2, 2), dtype=np.complex64))
    _assert_input_error(path, "complex")


# ------------------------------------------------------------- gzip backends

# RFC 1952: ID1 ID2 CM FLG MTIME(4, little-endian) XFL OS; FLG bit 3 = FNAME.
GZIP_FNAME = 0x08


def _gzip_member_header(raw: bytes) -> tuple[int, int]:
    """(FLG, MTIME) of the first gzip member (RFC 1952 section 2.3)."""
    assert raw[:3] == b"\x1f\x8b\x08", raw[:3]  # magic and CM = 8 (deflate)
    return raw[3], struct.unpack("<I", raw[4:8])[0]


def _nifti_from_gzip_module(path: Path) -> np.ndarray:
    """Voxels of a .nii.gz decompressed by the standard library, parsed by nibabel."""
    img = nibabel.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))
    return np.asarray(img.dataobj)


class _Recorder:
    """Wraps isal.igzip, counting compress/decompress calls."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.calls: list[str] = []

    def compress(self, *args: object, **kwargs: object) -> bytes:
        self.calls.append("compress")
        return self.real.compress(*args, **kwargs)  # type: ignore[attr-defined]

    def decompress(self, *args: object, **kwargs: object) -> bytes:
        self.calls.append("decompress")
        return self.real.decompress(*args, **kwargs)  # type: ignore[attr-defined]


class _Forbidden:
    """Stands in for isal.igzip where it must not be used."""

    def compress(self, *args: object, **kwargs: object) -> bytes:
        raise AssertionError("isal used although ASLCAL_GZIP=zlib")

    decompress = compress


def test_gzip_backend_values(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("isal")
    monkeypatch.delenv("ASLCAL_GZIP", raising=False)
    # isal importable: the default reads with ISA-L and writes with zlib (deterministic bytes)
    assert (gzip_backend(), gzip_backend("read"), gzip_backend("write")) == ("isal", "isal", "zlib")
    assert gzip_backends() == "isal read, zlib write"
    for value, read, write in [("zlib", "zlib", "zlib"), (" ZLIB ", "zlib", "zlib"), ("isal", "isal", "isal"),
                               ("auto", "isal", "zlib"), ("", "isal", "zlib")]:
        monkeypatch.setenv("ASLCAL_GZIP", value)
        assert (gzip_backend("read"), gzip_backend("write")) == (read, write), value
    monkeypatch.setenv("ASLCAL_GZIP", "zstd")
    with pytest.raises(InputError, match="ASLCAL_GZIP='zstd'"):
        gzip_backend()
    monkeypatch.delenv("ASLCAL_GZIP")
    with pytest.raises(InputError, match="purpose='both'"):
        gzip_backend("both")


def test_gzip_backend_without_isal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nifti_module, "_igzip", None)  # as if isal were not installed
    monkeypatch.delenv("ASLCAL_GZIP", raising=False)
    assert gzip_backend() == "zlib"
    monkeypatch.setenv("ASLCAL_GZIP", "auto")
    assert gzip_backend() == "zlib"
    data = _random((4, 5, 6, 2))
    out = save_image(tmp_path / "a.nii.gz", data, AFFINE)
    np.testing.assert_array_equal(_nifti_from_gzip_module(out), data)
    np.testing.assert_array_equal(load_image(out).data, data)
    monkeypatch.setenv("ASLCAL_GZIP", "isal")  # explicitly requested but missing
    with pytest.raises(BackendUnavailableError, match="isal"):
        gzip_backend()
    with pytest.raises(BackendUnavailableError, match="isal"):
        save_image(tmp_path / "b.nii.gz", data, AFFINE)
    assert _names(tmp_path) == ["a.nii.gz"]


def test_isal_reads_by_default_zlib_writes_and_either_forced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    igzip = pytest.importorskip("isal.igzip")
    recorder = _Recorder(igzip)
    monkeypatch.setattr(nifti_module, "_igzip", recorder)
    monkeypatch.delenv("ASLCAL_GZIP", raising=False)
    data = _random((3, 4, 5))
    out = save_image(tmp_path / "a.nii.gz", data, AFFINE)
    # written by zlib: the standard library's own bytes for this content
    assert out.read_bytes() == gzip.compress(gzip.decompress(out.read_bytes()), compresslevel=1, mtime=0)
    np.testing.assert_array_equal(load_image(out).data, data)
    assert recorder.calls == ["decompress"]
    recorder.calls.clear()
    monkeypatch.setenv("ASLCAL_GZIP", "isal")
    np.testing.assert_array_equal(load_image(save_image(tmp_path / "i.nii.gz", data, AFFINE)).data, data)
    assert recorder.calls == ["compress", "decompress"]
    monkeypatch.delenv("ASLCAL_GZIP")
    recorder.calls.clear()
    load_image(save_image(tmp_path / "b.nii", data, AFFINE))  # uncompressed: no gzip at all
    assert recorder.calls == []
    monkeypatch.setattr(nifti_module, "_igzip", _Forbidden())
    monkeypatch.setenv("ASLCAL_GZIP", "zlib")
    out = save_image(tmp_path / "c.nii.gz", data, AFFINE)
    np.testing.assert_array_equal(load_image(out).data, data)
    np.testing.assert_array_equal(load_image(tmp_path / "a.nii.gz").data, data)


@pytest.mark.parametrize("shape", [(4, 5, 6), (6, 5, 4, 3)])
def test_round_trip_each_backend(tmp_path: Path, any_backend: str, shape: tuple[int, ...]) -> None:
    data = _random(shape)
    out = save_image(tmp_path / "img.nii.gz", data, AFFINE)
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    image = load_image(out)
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_array_equal(image.affine, AFFINE)
    # Readable without aslcal: the standard library gzip and plain nibabel.load.
    np.testing.assert_array_equal(_nifti_from_gzip_module(out), data)
    loaded = nibabel.load(os.fspath(out))
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), data)
    np.testing.assert_array_equal(loaded.affine, AFFINE)
    # Same content as the uncompressed file written by the same call.
    plain = save_image(tmp_path / "img.nii", data, AFFINE)
    assert gzip.decompress(out.read_bytes()) == plain.read_bytes()
    assert _names(tmp_path) == ["img.nii", "img.nii.gz"]


def test_nifti2_round_trip_each_backend(tmp_path: Path, any_backend: str) -> None:
    header = nibabel.Nifti2Header()
    header.set_data_shape((2, 2, 3))
    out = save_image(tmp_path / "n2.nii.gz", _ramp((2, 2, 3)), AFFINE, header=header)
    raw = gzip.decompress(out.read_bytes())
    assert struct.unpack("<i", raw[:4])[0] == 540  # NIfTI-2 sizeof_hdr
    np.testing.assert_array_equal(np.asarray(nibabel.load(os.fspath(out)).dataobj), _ramp((2, 2, 3)))
    np.testing.assert_array_equal(load_image(out).data, _ramp((2, 2, 3)))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_output_is_deterministic(tmp_path: Path, any_backend: str, suffix: str) -> None:
    data = _random((5, 6, 7, 2))
    first = save_image(tmp_path / f"a{suffix}", data, AFFINE).read_bytes()
    os.utime(tmp_path / f"a{suffix}", (0, 0))  # nothing depends on the clock or the name
    second = save_image(tmp_path / f"other-name{suffix}", data, AFFINE).read_bytes()
    third = save_image(tmp_path / f"a{suffix}", data, AFFINE).read_bytes()  # overwrite
    assert first == second == third
    if suffix == ".nii.gz":
        flags, mtime = _gzip_member_header(first)
        assert mtime == 0
        assert not flags & GZIP_FNAME  # no (temporary) file name in the header


def test_files_of_one_backend_read_by_the_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("isal")
    data = _random((6, 5, 4, 2))
    written = {}
    for backend in ("isal", "zlib"):
        monkeypatch.setenv("ASLCAL_GZIP", backend)
        written[backend] = save_image(tmp_path / f"{backend}.nii.gz", data, AFFINE)
    for backend in ("isal", "zlib"):
        monkeypatch.setenv("ASLCAL_GZIP", backend)
        for path in written.values():
            np.testing.assert_array_equal(load_image(path).data, data)
    for path in written.values():
        np.testing.assert_array_equal(_nifti_from_gzip_module(path), data)
        np.testing.assert_array_equal(np.asarray(nibabel.load(os.fspath(path)).dataobj), data)
    # The compressed bytes may differ; the NIfTI they hold does not.
    assert gzip.decompress(written["isal"].read_bytes()) == gzip.decompress(written["zlib"].read_bytes())


def test_foreign_gzip_files_read_by_each_backend(tmp_path: Path, any_backend: str) -> None:
    data = _random((4, 4, 3, 2))
    nib = _nib_write(tmp_path / "nib.nii.gz", data)  # nibabel's own gzip writer
    plain = _nib_write(tmp_path / "plain.nii", data)
    level9 = tmp_path / "level9.nii.gz"
    level9.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9))
    # Two gzip members (as `cat a.gz b.gz` makes): one file of the concatenated content.
    raw = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    for path in (nib, level9, multi):
        np.testing.assert_array_equal(load_image(path).data, data)


def _invalid_deflate_block() -> bytes:
    """A gzip header then a deflate block of the reserved type BTYPE=11 (RFC 1951)."""
    header = b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x00\xff"
    return header + b"\x07" + bytes(64)  # bits: BFINAL=1, BTYPE=11 (reserved: an error)


def test_invalid_deflate_block_is_input_error(tmp_path: Path, any_backend: str) -> None:
    stream = _invalid_deflate_block()
    with pytest.raises(zlib.error):  # what zlib itself says of this stream
        gzip.decompress(stream)
    if any_backend == "isal":
        from isal import igzip, isal_zlib

        with pytest.raises(isal_zlib.error):  # ISA-L's own error type (not OSError)
            igzip.decompress(stream)
    path = tmp_path / "calib.nii.gz"
    path.write_bytes(stream)
    _assert_input_error(path, "gzip stream is truncated or corrupt")


def test_bad_crc_is_input_error(tmp_path: Path, any_backend: str) -> None:
    plain = _nib_write(tmp_path / "s.nii", _random((4, 4, 4)))
    raw = bytearray(gzip.compress(plain.read_bytes(), mtime=0))
    raw[-8] ^= 0x01  # CRC32 is the 8th..5th byte from the end (RFC 1952)
    path = tmp_path / "calib.nii.gz"
    path.write_bytes(bytes(raw))
    _assert_input_error(path, "gzip stream is truncated or corrupt")


@pytest.mark.parametrize("keep", [0.5, 0.99, 10])
def test_truncated_gzip_each_point(tmp_path: Path, any_backend: str, keep: float) -> None:
    out = save_image(tmp_path / "calib.nii.gz", _random((8, 8, 8, 4)), AFFINE)
    raw = out.read_bytes()
    cut = int(keep) if keep >= 1 else int(len(raw) * keep)
    out.write_bytes(raw[:cut])
    _assert_input_error(out, "gzip stream is truncated or corrupt")


# ----------------------------------------------------------------------- saving


def test_failing_writer_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = nifti_module._write_file

    def half_then_fail(path: Path, payload: bytes) -> None:
        real_write(path, payload)
        full = Path(path).read_bytes()
        Path(path).write_bytes(full[: len(full) // 2])
        raise OSError(28, "No space left on device")

    dest = tmp_path / "m0.nii.gz"
    previous = save_image(dest, _ramp((2, 2, 2)), AFFINE)
    before = previous.read_bytes()
    monkeypatch.setattr(nifti_module, "_write_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_image(dest, _random((4, 4, 4)), AFFINE)
    with pytest.raises(OSError, match="No space left"):
        save_image(tmp_path / "new.nii", _random((4, 4, 4)), AFFINE)
    assert _names(tmp_path) == ["m0.nii.gz"]
    assert dest.read_bytes() == before


def test_overwrite_false(tmp_path: Path) -> None:
    dest = save_image(tmp_path / "m0.nii", _ramp((2, 2, 2)), AFFINE)
    before = dest.read_bytes()
    with raises_input_error("overwrite", tmp_path):
        save_image(dest, _random((2, 2, 2)), AFFINE, overwrite=False)
    assert dest.read_bytes() == before


def test_missing_output_folder(tmp_path: Path) -> None:
    with raises_input_error("does not exist", tmp_path):
        save_image(tmp_path / "sub" / "m0.nii.gz", _ramp((2, 2, 2)), AFFINE)
    assert not (tmp_path / "sub").exists()


class FakeDeviceArray:
    """Stands in for a CuPy array: device memory NumPy cannot read without .get()."""

    def __init__(self, host: np.ndarray) -> None:
        self._host = host
        self.get_calls = 0
        self.__cuda_array_interface__ = {
            "shape": host.shape,
            "typestr": host.dtype.str,
            "data": (0, False),
            "version": 3,
        }

    def get(self) -> np.ndarray:
        self.get_calls += 1
        return self._host.copy()

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise TypeError("implicit host conversion of a device array")  # like CuPy


def test_save_device_array_copies_to_host(tmp_path: Path) -> None:
    host = _ramp((2, 3, 4))
    fake = FakeDeviceArray(host)
    out = save_image(tmp_path / "gpu.nii.gz", fake, AFFINE)
    assert fake.get_calls == 1
    np.testing.assert_array_equal(load_image(out).data, host)


@pytest.mark.parametrize("name", ["m0.img", "m0.nii.bz2", "m0.mgz", "m0.gz", "m0", "m0.nii.gz.tmp", ".nii"])
def test_bad_extension(tmp_path: Path, name: str) -> None:
    with raises_input_error(r"\.nii or \.nii\.gz", tmp_path):
        save_image(tmp_path / name, _ramp((2, 2, 2)), AFFINE)
    assert _names(tmp_path) == []


def test_affine_and_header_missing(tmp_path: Path) -> None:
    with raises_input_error("affine or a header", tmp_path):
        save_image(tmp_path / "m0.nii", _ramp((2, 2, 2)))


@pytest.mark.parametrize("affine", [np.eye(3), np.full((4, 4), np.nan), "eye"])
def test_bad_affine(tmp_path: Path, affine: object) -> None:
    with raises_input_error("affine", tmp_path):
        save_image(tmp_path / "m0.nii", _ramp((2, 2, 2)), affine)


@pytest.mark.parametrize("data", [np.ones((2, 2), dtype=np.complex64), np.array(["a", "b"]), np.float32(1.0)])
def test_bad_data(tmp_path: Path, data: np.ndarray) -> None:
    with raises_input_error("data", tmp_path):
        save_image(tmp_path / "m0.nii", data, AFFINE)


def test_description(tmp_path: Path) -> None:
    default = load_image(save_image(tmp_path / "a.nii", _ramp((2, 2, 2)), AFFINE))
    assert default.header["descrip"].item() == f"aslcal {aslcal.__version__}".encode()
    long = load_image(save_image(tmp_path / "b.nii", _ramp((2, 2, 2)), AFFINE, description="x" * 100))
    assert long.header["descrip"].item() == b"x" * 79
    # "µ" is 2 bytes in UTF-8: 39 whole characters fit in 79 bytes, never half of one.
    wide = load_image(save_image(tmp_path / "c.nii", _ramp((2, 2, 2)), AFFINE, description="µ" * 50))
    assert wide.header["descrip"].item() == ("µ" * 39).encode()


def test_saved_values_unscaled(tmp_path: Path) -> None:
    # The stored values are the data themselves: slope 1/intercept 0 or unset.
    out = save_image(tmp_path / "a.nii", _ramp((2, 2, 2)) + 1000.5, AFFINE)
    slope, inter = struct.unpack("<ff", out.read_bytes()[SCL_SLOPE_OFFSET : SCL_INTER_OFFSET + 4])
    assert (slope, inter) == (1.0, 0.0) or (np.isnan(slope) and np.isnan(inter)) or slope == 0.0
    np.testing.assert_array_equal(load_image(out).data, _ramp((2, 2, 2)) + 1000.5)


# ----------------------------------------------------------------------- Image


def test_voxel_size_in_mm_from_header_units(tmp_path: Path) -> None:
    img = nibabel.Nifti1Image(_ramp((2, 2, 2)), np.diag([0.002, 0.002, 0.003, 1.0]))
    img.header.set_xyzt_units(xyz="meter")
    nibabel.save(img, os.fspath(tmp_path / "m.nii"))
    voxel = load_image(tmp_path / "m.nii").voxel_size
    # 0.002 m = 2 mm, 0.003 m = 3 mm (float32 zooms, so compare approximately).
    np.testing.assert_allclose(voxel, (2.0, 2.0, 3.0), rtol=1e-6)


def test_image_validates_affine() -> None:
    with pytest.raises(InputError, match="affine"):
        Image(data=np.zeros((2, 2, 2)), affine=np.eye(3), header=nibabel.Nifti1Header())


def test_image_repr_is_short(tmp_path: Path) -> None:
    image = load_image(save_image(tmp_path / "a.nii", _ramp((20, 20, 20)), AFFINE))
    text = repr(image)
    assert text.startswith("Image(shape=(20, 20, 20)")
    assert len(text) < 200


def test_import_is_light() -> None:
    code = (
        "import sys, aslcal.io; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'cupy')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["x.nii", "x.nii.gz"])
def test_encode_image_gives_the_bytes_save_image_writes(tmp_path: Path, name: str) -> None:
    from aslcal.io.nifti import encode_image, save_image

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) / 7.0
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    saved = save_image(tmp_path / name, data, affine, description="test")
    assert encode_image(name, data, affine, description="test") == saved.read_bytes()
    with pytest.raises(InputError, match="unsupported extension"):
        encode_image("x.img", data, affine)
