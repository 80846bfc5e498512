"""Tests for aslcal.io.transforms: FLIRT and ITK readers, FLIRT <-> world conversion.

Every expected matrix is computed by hand in the test (comments show the steps), or
by the phantom's own FLIRT helper (an independent implementation).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.io import (
    flirt_scaling,
    flirt_to_world,
    is_itk_transform,
    read_flirt_matrix,
    read_itk_affine,
    world_to_flirt,
)
from aslcal.testing import phantoms


def _write(folder: Path, name: str, text: str | bytes) -> Path:
    p = folder / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def _apply(m: np.ndarray, point) -> np.ndarray:
    return (m @ np.append(np.asarray(point, dtype=float), 1.0))[:3]


def _raises_naming(path: Path, pattern: str, func, *args, **kwargs) -> str:
    """``func`` raises a one-line InputError that names ``path`` and matches ``pattern``."""
    with pytest.raises(InputError) as info:
        func(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    assert re.search(pattern, msg.replace(str(path), "<file>")), msg
    return msg


# --------------------------------------------------------------------------------------
# FLIRT reader
# --------------------------------------------------------------------------------------


def test_read_flirt_pure_shift(tmp_path):
    # As flirt writes it: two spaces between numbers, trailing spaces, a final blank line.
    text = (
        "1  0  0  2.5  \n"
        "0  1  0  -3  \n"
        "0  0  1  0.25  \n"
        "0  0  0  1  \n\n"
    )
    mat = read_flirt_matrix(_write(tmp_path, "shift.mat", text))
    expected = np.eye(4)
    expected[:3, 3] = (2.5, -3.0, 0.25)
    np.testing.assert_array_equal(mat, expected)
    assert mat.dtype == np.float64


def test_read_flirt_phantom_file_roundtrip(tmp_path):
    ph = phantoms.make_phantom(shape=(16, 16, 8), voxel_size=(6.0, 6.0, 8.0), struct_voxel_size=(4.0, 4.0, 4.0), struct_oversample=1)
    files = phantoms.write_dataset(ph, tmp_path)
    mat = read_flirt_matrix(files["asl2struct"])
    np.testing.assert_allclose(mat, ph.structural.asl2struct, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("three_rows.mat", "1 0 0 0\n0 1 0 0\n0 0 0 1\n", r"3 non-empty rows; expected 4 rows of 4"),
        ("five_cols.mat", "1 0 0 0 9\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", r"row 1 has 5 entries"),
        ("letters.mat", "1 0 0 0\n0 1 x 0\n0 0 1 0\n0 0 0 1\n", r"row 2, column 3 is 'x'; expected a number"),
        ("nan.mat", "1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", r"row 1, column 4 .*finite"),
        ("inf.mat", "1 0 0 0\n0 1 0 0\n0 0 1 inf\n0 0 0 1\n", r"finite"),
        ("lastrow.mat", "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n", r"last row is 0 0 1 1; expected 0 0 0 1"),
        ("singular.mat", "1 0 0 0\n2 0 0 0\n0 0 1 0\n0 0 0 1\n", r"singular"),
        ("tiny.mat", "1e-3 0 0 0\n0 1e-3 0 0\n0 0 1e-3 0\n0 0 0 1\n", r"singular"),
        ("empty.mat", "\n\n", r"0 non-empty rows"),
    ],
)
def test_read_flirt_malformed(tmp_path, name, text, pattern):
    p = _write(tmp_path, name, text)
    _raises_naming(p, pattern, read_flirt_matrix, p)


def test_read_flirt_missing_and_binary(tmp_path):
    missing = tmp_path / "nope.mat"
    _raises_naming(missing, r"not found", read_flirt_matrix, missing)
    binary = _write(tmp_path, "bin.mat", b"\x00\x01\x02\xff\xfe")
    _raises_naming(binary, r"not a text file", read_flirt_matrix, binary)


# --------------------------------------------------------------------------------------
# FLIRT <-> world
# --------------------------------------------------------------------------------------


def _shift(t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def test_flirt_shift_identity_affines_flips_x():
    # Identity affines have det > 0, so FSL's scaled x is (nx - 1 - i).  With FLIRT
    # shift (tx, ty, tz):  nref - 1 - i_ref = nsrc - 1 - i_src + tx
    #   => x_ref = x_src + (nref - nsrc) - tx;  y_ref = y_src + ty;  z_ref = z_src + tz.
    mat = _shift((2.0, 3.0, -4.0))
    w = flirt_to_world(mat, np.eye(4), (10, 12, 14), np.eye(4), (10, 12, 14))
    np.testing.assert_allclose(w, _shift((-2.0, 3.0, -4.0)), atol=1e-12)
    w = flirt_to_world(mat, np.eye(4), (10, 12, 14), np.eye(4), (16, 12, 14))
    np.testing.assert_allclose(w, _shift((6.0 - 2.0, 3.0, -4.0)), atol=1e-12)


def test_flirt_shift_radiological_affines():
    # A = diag(-1, 1, 1): det < 0, no flip, scaled x = i = -x_world.
    # i_ref = i_src + tx  =>  x_ref = -(i_src + tx) = x_src - tx (nx irrelevant).
    a = np.diag([-1.0, 1.0, 1.0, 1.0])
    mat = _shift((2.0, 3.0, -4.0))
    for nref in (10, 16):
        w = flirt_to_world(mat, a, (10, 12, 14), a, (nref, 12, 14))
        np.testing.assert_allclose(w, _shift((-2.0, 3.0, -4.0)), atol=1e-12)


def test_flirt_scaling_different_voxel_sizes():
    # src: 2 mm, det < 0, origin (10, 20, 30): x = -2 i + 10, y = 2 j + 20, z = 2 k + 30.
    # ref: 1 mm, det < 0, origin (-5, 0, 5):   x = -i + -5,   y = j,          z = k + 5.
    # mat = diag(1.5, 1, 1):
    #   xs_src = 2 i = 10 - x_src;  xs_ref = 1.5 (10 - x_src) = i_ref
    #     => x_ref = -i_ref - 5 = 1.5 x_src - 20
    #   ys_src = 2 j = y_src - 20 = j_ref => y_ref = y_src - 20
    #   zs_src = z_src - 30 = k_ref      => z_ref = z_src - 25
    a_src = np.array([[-2.0, 0, 0, 10], [0, 2, 0, 20], [0, 0, 2, 30], [0, 0, 0, 1]])
    a_ref = np.array([[-1.0, 0, 0, -5], [0, 1, 0, 0], [0, 0, 1, 5], [0, 0, 0, 1]])
    mat = np.diag([1.5, 1.0, 1.0, 1.0])
    w = flirt_to_world(mat, a_src, (20, 20, 20), a_ref, (40, 40, 40))
    expected = np.array([[1.5, 0, 0, -20], [0, 1, 0, -20], [0, 0, 1, -25], [0, 0, 0, 1]])
    np.testing.assert_allclose(w, expected, atol=1e-12)
    np.testing.assert_allclose(world_to_flirt(w, a_src, (20, 20, 20), a_ref, (40, 40, 40)), mat, atol=1e-12)


def _las_ras_pair(nx=10, dx=2.0, centre=(3.0, -4.0, 5.0)):
    """The same FOV stored RAS (det > 0) and LAS (det < 0), centred at ``centre``."""
    c = np.asarray(centre)
    half = dx * (nx - 1) / 2.0
    ras = np.diag([dx, dx, dx, 1.0])
    ras[:3, 3] = c - np.array([half, dx * 3.5, dx * 2.5])
    las = ras.copy()
    las[0, 0] = -dx
    las[0, 3] = c[0] + half
    return ras, las, (nx, 8, 6)


def test_flirt_identity_between_ras_and_las_storage_is_world_identity():
    # FLIRT's scaled coordinates are the same for both storages of one FOV:
    #   RAS: xs = (nx-1-i) dx;  LAS: xs = i dx  =>  identity mat links i_las = nx-1-i_ras,
    #   i.e. the same world point.  (A convention without the flip would give a mirror.)
    ras, las, shape = _las_ras_pair()
    np.testing.assert_allclose(flirt_to_world(np.eye(4), ras, shape, las, shape), np.eye(4), atol=1e-12)
    np.testing.assert_allclose(flirt_to_world(np.eye(4), las, shape, ras, shape), np.eye(4), atol=1e-12)


def test_flirt_of_relabelled_array_is_left_right_mirror():
    # The same voxel array saved once with the RAS affine and once with the LAS affine:
    # voxel i of one is voxel i of the other, so the world mapping is the mirror about
    # the FOV centre c:  x_las(i) = -dx i + c + half = 2c - x_ras(i).
    # FLIRT: xs_ras = (nx-1-i) dx, xs_las = i dx  =>  xs_las = (nx-1) dx - xs_ras.
    nx, dx = 10, 2.0
    c = np.array([3.0, -4.0, 5.0])
    ras, las, shape = _las_ras_pair(nx, dx, c)
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    mirror[0, 3] = 2 * c[0]
    mat = np.diag([-1.0, 1.0, 1.0, 1.0])
    mat[0, 3] = (nx - 1) * dx
    np.testing.assert_allclose(las @ np.linalg.inv(ras), mirror, atol=1e-12)  # sanity of the setup
    np.testing.assert_allclose(flirt_to_world(mat, ras, shape, las, shape), mirror, atol=1e-12)
    np.testing.assert_allclose(world_to_flirt(mirror, ras, shape, las, shape), mat, atol=1e-12)
    # The FOV centre is fixed; a point 7 mm right of it goes 7 mm left.
    np.testing.assert_allclose(_apply(mirror, c + [7.0, 1.0, 2.0]), c + [-7.0, 1.0, 2.0])


@pytest.mark.parametrize("seed", [0, 3])
def test_flirt_to_world_matches_phantom(seed):
    ph = phantoms.make_phantom(seed=seed, struct_voxel_size=(4.0, 4.0, 4.0), struct_oversample=1)
    st = ph.structural
    w = flirt_to_world(st.asl2struct, ph.affine, ph.shape, st.affine, st.shape)
    np.testing.assert_allclose(w, st.world_asl_to_struct, atol=1e-6)
    back = world_to_flirt(st.world_asl_to_struct, ph.affine, ph.shape, st.affine, st.shape)
    np.testing.assert_allclose(back, st.asl2struct, atol=1e-6)
    for aff, shape in ((ph.affine, ph.shape), (st.affine, st.shape)):
        np.testing.assert_allclose(flirt_scaling(aff, shape), phantoms.flirt_scaling(aff, shape), atol=1e-12)


def test_flirt_to_world_oblique_roundtrip(rng):
    # An oblique source and a reference with a 4th (time) axis in its shape.
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    a_src = np.eye(4)
    a_src[:3, :3] = q @ np.diag([2.0, 2.5, 3.0])
    a_src[:3, 3] = rng.normal(0, 20, 3)
    a_ref = np.diag([-1.2, 1.1, 1.3, 1.0])
    a_ref[:3, 3] = (50.0, -60.0, -40.0)
    w = np.eye(4)
    w[:3, :3], _ = np.linalg.qr(rng.normal(size=(3, 3)))
    w[:3, 3] = rng.normal(0, 5, 3)
    mat = world_to_flirt(w, a_src, (30, 40, 20), a_ref, (90, 100, 80, 5))
    np.testing.assert_allclose(
        mat, phantoms.flirt_matrix(a_src, (30, 40, 20), a_ref, (90, 100, 80), world_src_to_ref=w), atol=1e-9
    )
    np.testing.assert_allclose(flirt_to_world(mat, a_src, (30, 40, 20), a_ref, (90, 100, 80, 5)), w, atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"mat": np.eye(3)}, r"mat: matrix of shape \(3, 3\); expected shape \(4, 4\)"),
        ({"mat": np.full((4, 4), np.nan)}, r"mat: .*NaN"),
        ({"src_affine": np.diag([1.0, 1.0, 0.0, 1.0])}, r"src_affine: singular"),
        ({"ref_affine": np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])}, r"ref_affine: last row"),
        ({"src_shape": (10, 10)}, r"src_shape=\(10, 10\): expected 3 positive integers"),
        ({"ref_shape": (10, 0, 10)}, r"ref_shape=.*positive integers"),
        ({"ref_shape": (10.0, 10, 10)}, r"ref_shape=.*positive integers"),
        ({"mat": "eye"}, r"mat: .*4x4"),
    ],
)
def test_flirt_to_world_rejects_bad_input(kwargs, pattern):
    args = {"mat": np.eye(4), "src_affine": np.eye(4), "src_shape": (10, 10, 10),
            "ref_affine": np.eye(4), "ref_shape": (10, 10, 10)}
    args.update(kwargs)
    with pytest.raises(InputError, match=pattern):
        flirt_to_world(**args)


# --------------------------------------------------------------------------------------
# ITK reader
# --------------------------------------------------------------------------------------

_ITK = """#Insight Transform File V1.0
#Transform 0
Transform: {kind}
Parameters: {params}
FixedParameters: {fixed}
"""


def _itk(folder: Path, name: str, a, t, c, kind="AffineTransform_double_3_3") -> Path:
    params = " ".join(repr(float(v)) for v in list(np.ravel(a)) + list(t))
    fixed = " ".join(repr(float(v)) for v in c)
    return _write(folder, name, _ITK.format(kind=kind, params=params, fixed=fixed))


def test_itk_pure_translation(tmp_path):
    # LPS shift (1, 2, 3) = RAS shift (-1, -2, 3).  The centre does not matter for A = I.
    p = _itk(tmp_path, "shift.txt", np.eye(3), (1.0, 2.0, 3.0), (10.0, -20.0, 30.0))
    np.testing.assert_allclose(read_itk_affine(p), _shift((-1.0, -2.0, 3.0)), atol=1e-12)
    np.testing.assert_allclose(read_itk_affine(p, invert=True), _shift((1.0, 2.0, -3.0)), atol=1e-12)


def test_itk_rotation_about_a_centre(tmp_path):
    # A = 90 deg about z (LPS), c = (10, 20, 30), t = (1, 2, 3), y = A (x - c) + t + c.
    # RAS point (5, 6, 7) -> LPS (-5, -6, 7); x - c = (-15, -26, -23);
    # A (x - c) = (26, -15, -23); + t + c = (37, 7, 10) LPS -> RAS (-37, -7, 10).
    a = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    p = _itk(tmp_path, "rot.txt", a, (1.0, 2.0, 3.0), (10.0, 20.0, 30.0),
             kind="MatrixOffsetTransformBase_double_3_3")
    m = read_itk_affine(p)
    np.testing.assert_allclose(_apply(m, (5.0, 6.0, 7.0)), (-37.0, -7.0, 10.0), atol=1e-12)
    # The centre maps to c + t: LPS (11, 22, 33) -> RAS (-11, -22, 33) from RAS (-10, -20, 30).
    np.testing.assert_allclose(_apply(m, (-10.0, -20.0, 30.0)), (-11.0, -22.0, 33.0), atol=1e-12)
    inv = read_itk_affine(p, invert=True)
    np.testing.assert_allclose(_apply(inv, (-37.0, -7.0, 10.0)), (5.0, 6.0, 7.0), atol=1e-12)


def test_itk_rotation_about_x_changes_sign_in_ras(tmp_path):
    # A = 90 deg about x (LPS), no centre or shift.  RAS (1, 2, 3) -> LPS (-1, -2, 3)
    # -> A: (-1, -3, -2) -> RAS (1, 3, -2).  (Using A directly on RAS would give (1, -3, 2).)
    a = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    p = _itk(tmp_path, "rotx.txt", a, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), kind="AffineTransform_float_3_3")
    np.testing.assert_allclose(_apply(read_itk_affine(p), (1.0, 2.0, 3.0)), (1.0, 3.0, -2.0), atol=1e-12)


def test_itk_fmriprep_style_file(tmp_path):
    # Layout as fMRIPrep writes *_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt.
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        "Transform: MatrixOffsetTransformBase_double_3_3\n"
        "Parameters: 0.999 0.0436 -0.0017 -0.0436 0.999 0.0012 0.0018 -0.0011 0.9999 "
        "-1.25 3.5 0.75\n"
        "FixedParameters: 0 0 0\n"
    )
    p = _write(tmp_path, "sub-01_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt", text)
    m = read_itk_affine(p)
    a = np.array([[0.999, 0.0436, -0.0017], [-0.0436, 0.999, 0.0012], [0.0018, -0.0011, 0.9999]])
    f = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(m[:3, :3], f @ a @ f, atol=1e-12)
    np.testing.assert_allclose(m[:3, 3], f @ np.array([-1.25, 3.5, 0.75]), atol=1e-12)
    np.testing.assert_allclose(read_itk_affine(p, invert=True) @ m, np.eye(4), atol=1e-12)


_GOOD_PARAMS = "1 0 0 0 1 0 0 0 1 0 0 0"


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("noheader.txt", f"Transform: AffineTransform_double_3_3\nParameters: {_GOOD_PARAMS}\nFixedParameters: 0 0 0\n",
         r"expected an ITK text transform"),
        ("euler.txt", _ITK.format(kind="Euler3DTransform_double_3_3", params="0 0 0 0 0 0", fixed="0 0 0"),
         r"transform type 'Euler3DTransform_double_3_3'"),
        ("short.txt", _ITK.format(kind="AffineTransform_double_3_3", params="1 0 0 0 1 0 0 0 1 0 0", fixed="0 0 0"),
         r"Parameters has 11 numbers; expected 12"),
        ("letters.txt", _ITK.format(kind="AffineTransform_double_3_3", params="1 0 0 0 one 0 0 0 1 0 0 0", fixed="0 0 0"),
         r"Parameters entry 5 is 'one'"),
        ("nan.txt", _ITK.format(kind="AffineTransform_double_3_3", params="1 0 0 0 1 0 0 0 1 nan 0 0", fixed="0 0 0"),
         r"NaN or Inf"),
        ("fixed.txt", _ITK.format(kind="AffineTransform_double_3_3", params=_GOOD_PARAMS, fixed="0 0"),
         r"FixedParameters has 2 numbers; expected 3"),
        ("singular.txt", _ITK.format(kind="AffineTransform_double_3_3", params="1 0 0 1 0 0 0 0 1 0 0 0", fixed="0 0 0"),
         r"singular"),
        ("two.txt", _ITK.format(kind="AffineTransform_double_3_3", params=_GOOD_PARAMS, fixed="0 0 0") * 2,
         r"unexpected line|2 transforms"),
        ("nofixed.txt", "#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\n"
         f"Parameters: {_GOOD_PARAMS}\n", r"0 'FixedParameters:' lines"),
        ("junk.txt", "#Insight Transform File V1.0\nhello world\n", r"unexpected line 'hello world'"),
        ("empty.txt", "", r"starts with nothing"),
    ],
)
def test_itk_malformed(tmp_path, name, text, pattern):
    p = _write(tmp_path, name, text)
    _raises_naming(p, pattern, read_itk_affine, p)


def test_itk_two_transforms_without_second_header(tmp_path):
    text = (
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {_GOOD_PARAMS}\nFixedParameters: 0 0 0\n#Transform 1\n"
        f"Transform: AffineTransform_double_3_3\nParameters: {_GOOD_PARAMS}\nFixedParameters: 0 0 0\n"
    )
    p = _write(tmp_path, "composite.txt", text)
    _raises_naming(p, r"2 transforms; expected exactly one", read_itk_affine, p)


def _itk_mat(folder: Path, name: str, a, t, c, kind="AffineTransform_double_3_3", fmt="4") -> Path:
    """The transform in ITK's binary MATLAB layout (as ANTs writes *GenericAffine.mat):
    the 12 parameters in a column named after the type, the centre in 'fixed'."""
    from scipy.io import savemat

    path = folder / name
    params = np.array(list(np.ravel(a)) + list(t), dtype=np.float64)[:, None]
    savemat(str(path), {kind: params, "fixed": np.asarray(c, dtype=np.float64)[:, None]}, format=fmt)
    return path


@pytest.mark.parametrize("fmt", ["4", "5"])
def test_itk_binary_matlab_file_reads_as_its_text_twin(tmp_path, fmt):
    """ANTs' binary *GenericAffine.mat: the same point mapping as the text file with the same
    numbers (the rotation about a centre worked by hand above)."""
    a = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    args = (a, (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))
    binary = _itk_mat(tmp_path, "rot.mat", *args, fmt=fmt)
    assert b"Insight" not in binary.read_bytes()
    m = read_itk_affine(binary)
    np.testing.assert_allclose(_apply(m, (5.0, 6.0, 7.0)), (-37.0, -7.0, 10.0), atol=1e-12)
    np.testing.assert_allclose(m, read_itk_affine(_itk(tmp_path, "rot.txt", *args)), atol=1e-12)
    np.testing.assert_allclose(read_itk_affine(binary, invert=True), np.linalg.inv(m), atol=1e-12)


def test_is_itk_transform_tells_itk_files_from_flirt_matrices(tmp_path):
    from scipy.io import savemat

    text = _itk(tmp_path, "a.txt", np.eye(3), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    binary = _itk_mat(tmp_path, "a.mat", np.eye(3), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    flirt = _write(tmp_path, "flirt.mat", "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    other = tmp_path / "other.mat"
    savemat(str(other), {"weights": np.ones((3, 1))}, format="4")
    assert is_itk_transform(text) and is_itk_transform(binary)
    assert not is_itk_transform(flirt) and not is_itk_transform(tmp_path / "missing.mat")
    # another MATLAB file goes to the ITK reader, which says what it holds (the FLIRT
    # reader could only say "not a text file")
    assert is_itk_transform(other)
    _raises_naming(other, r"variables \['weights'\]; expected an ITK affine transform", read_itk_affine, other)


def test_a_byte_order_mark_is_not_part_of_a_transform_file(tmp_path):
    """Some editors start text files with a UTF-8 BOM: an ITK file was then taken for a
    FLIRT matrix ('5 non-empty rows'), and a FLIRT matrix refused."""
    itk = _itk(tmp_path, "a.txt", np.eye(3), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + itk.read_bytes())
    assert is_itk_transform(bom)
    np.testing.assert_array_equal(read_itk_affine(bom), read_itk_affine(itk))
    flirt = _write(tmp_path, "flirt.mat", "1 0 0 2\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    flirt_bom = tmp_path / "flirt_bom.mat"
    flirt_bom.write_bytes(b"\xef\xbb\xbf" + flirt.read_bytes())
    assert not is_itk_transform(flirt_bom)
    np.testing.assert_array_equal(read_flirt_matrix(flirt_bom), read_flirt_matrix(flirt))


def test_itk_binary_file_hint(tmp_path):
    p = _write(tmp_path, "xfm.mat", b"MATLAB 5.0 MAT-file\x00\x00\x01\xff")
    _raises_naming(p, r"not a text file .*ConvertTransformFile", read_itk_affine, p)


def test_flirt_voxel_sizes_from_the_header_when_given():
    """FSL scales voxels by the header's pixdim: when the sform's column norms disagree
    (3.3 mm against pixdim 3.0), src_zooms/ref_zooms give FSL's mapping.  The expected
    matrix is built here from FSL's convention: scaled = diag(pixdim) @ index, x flipped
    ((nx - 1 - i) * dx) for a positive-determinant (neurological) affine."""
    from aslcal.geometry import flirt_to_world

    src_aff = np.diag([3.3, 3.0, 4.0, 1.0])
    src_aff[:3, 3] = (-90.0, -100.0, -40.0)
    ref_aff = np.diag([-1.0, 1.0, 1.0, 1.0])  # radiological: no flip
    ref_aff[:3, 3] = (90.0, -120.0, -60.0)
    src_shape, ref_shape = (64, 64, 20), (180, 240, 120)
    mat = np.eye(4)
    mat[:3, 3] = (2.0, -1.0, 0.5)

    def scaled(zooms, nx, flip):
        s = np.diag([*zooms, 1.0])
        if flip:
            s[0, 0], s[0, 3] = -zooms[0], (nx - 1) * zooms[0]
        return s

    s_src = scaled((3.0, 3.0, 4.0), 64, True)
    s_ref = scaled((1.0, 1.0, 1.0), 180, False)
    expected = ref_aff @ np.linalg.inv(s_ref) @ mat @ s_src @ np.linalg.inv(src_aff)
    got = flirt_to_world(mat, src_aff, src_shape, ref_aff, ref_shape, src_zooms=(3.0, 3.0, 4.0), ref_zooms=(1, 1, 1))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    by_norms = flirt_to_world(mat, src_aff, src_shape, ref_aff, ref_shape)
    assert np.abs(by_norms - expected).max() > 1.0  # the column norms (3.3) map elsewhere


def test_flirt_header_voxel_sizes_unusable_fall_back_to_the_affine():
    """pixdim of 0 or NaN (a broken header with a valid sform): the affine's column norms,
    as without header sizes; a negative pixdim counts by its size (FSL takes |pixdim|)."""
    from aslcal.geometry import flirt_to_world

    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    base = flirt_to_world(np.eye(4), aff, (10, 10, 10), aff, (10, 10, 10))
    for zooms in ((0.0, 0.0, 0.0), (float("nan"), 2.0, 3.0), (-2.0, 2.0, -3.0)):
        got = flirt_to_world(np.eye(4), aff, (10, 10, 10), aff, (10, 10, 10), src_zooms=zooms, ref_zooms=zooms)
        np.testing.assert_allclose(got, base, atol=1e-12)
