"""Tests for aslcal.masks.resample: averaging a fine map over coarse voxels.

Expected values come from outside the resampler: analytic covered fractions of a
box, a brute-force nearest-neighbour count at 12^3 points per voxel written here with
NumPy, exact values of linear maps, and the phantom's ASL partial-volume maps (built
from its finer label grid by a separate code path).
"""

from __future__ import annotations

import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.masks import default_supersample, resample_to_grid, resample_with_flirt
from aslcal.testing import phantoms


def _rotation(ax, ay, az) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _rigid(angles, shift) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = _rotation(*angles)
    m[:3, 3] = shift
    return m


def _centred_affine(shape, vox, *, flip_x: bool) -> np.ndarray:
    a = np.diag([(-1.0 if flip_x else 1.0) * vox[0], vox[1], vox[2], 1.0])
    a[:3, 3] = -a[:3, :3] @ ((np.asarray(shape, dtype=float) - 1) / 2)
    return a


# A 1 mm source grid (RAS) and a 3.4 x 3.4 x 5 mm reference grid (LAS), both centred.
SRC_SHAPE = (48, 48, 48)
SRC_AFF = _centred_affine(SRC_SHAPE, (1.0, 1.0, 1.0), flip_x=False)
REF_SHAPE = (14, 14, 10)
REF_AFF = _centred_affine(REF_SHAPE, (3.4, 3.4, 5.0), flip_x=True)
MOTION = _rigid((7.0, -5.0, 10.0), (0.4, -1.1, 0.7))


@pytest.fixture(scope="module")
def ph():
    return phantoms.make_phantom(seed=1)


# --------------------------------------------------------------------------------------
# Known values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [None, MOTION], ids=["aligned", "rotated"])
def test_constant_map_gives_constant_inside_and_cval_outside(world):
    src = np.full(SRC_SHAPE, 0.7)
    # Reference grid larger than the source FOV (7 mm voxels, 12 x 12 x 10 = 84 x 84 x 70 mm).
    ref_shape = (12, 12, 10)
    ref_aff = _centred_affine(ref_shape, (7.0, 7.0, 7.0), flip_x=True)
    out = resample_to_grid(src, SRC_AFF, ref_shape, ref_aff, world, cval=-1.0)
    w = np.eye(4) if world is None else world
    m = np.linalg.inv(SRC_AFF) @ w @ ref_aff  # ref index -> src index
    centres = np.indices(ref_shape).reshape(3, -1).T @ m[:3, :3].T + m[:3, 3]
    # Every sub-sample lies within half the voxel diagonal (in source voxels) of the centre.
    radius = 0.5 * np.linalg.norm(m[:3, :3] @ np.ones(3)) + 1e-9
    hi = np.asarray(SRC_SHAPE) - 1
    inside = ((centres - radius >= 0) & (centres + radius <= hi)).all(axis=1).reshape(ref_shape)
    outside = ((centres + radius < -1) | (centres - radius > hi + 1)).any(axis=1).reshape(ref_shape)
    assert inside.sum() > 50 and outside.sum() > 200  # both cases are really exercised
    np.testing.assert_allclose(out[inside], 0.7, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[outside], -1.0)
    assert out.shape == ref_shape and out.dtype == np.float64


def _box_fraction(lo, hi, ref_shape, ref_aff, src_aff) -> np.ndarray:
    """Exact fraction of each (axis-aligned) reference voxel covered by the union of
    source voxel cubes lo..hi (inclusive index ranges): a product of 1-D overlaps."""
    frac = np.ones(ref_shape)
    for a in range(3):
        step = abs(ref_aff[a, a])
        c = ref_aff[a, a] * np.arange(ref_shape[a]) + ref_aff[a, 3]
        blo = src_aff[a, 3] + (lo[a] - 0.5) * src_aff[a, a]
        bhi = src_aff[a, 3] + (hi[a] + 0.5) * src_aff[a, a]
        overlap = np.clip(np.minimum(c + step / 2, bhi) - np.maximum(c - step / 2, blo), 0, None)
        shape = [1, 1, 1]
        shape[a] = -1
        frac = frac * (overlap / step).reshape(shape)
    return frac


@pytest.mark.parametrize(
    ("vox", "shift"),
    [((3.4, 3.4, 5.0), (0.3, -0.7, 1.1)), ((2.5, 3.0, 4.0), (0.0, 0.0, 0.0)), ((3.0, 3.0, 3.0), (0.5, 0.5, 0.5))],
)
def test_binary_box_gives_true_covered_fraction(vox, shift):
    lo, hi = (12, 17, 20), (40, 33, 45)
    box = np.zeros((60, 60, 60), dtype=bool)
    box[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = True
    src_aff = _centred_affine(box.shape, (1.0, 1.0, 1.0), flip_x=False)
    ref_shape = tuple(int(np.ceil(60 / v)) + 2 for v in vox)
    ref_aff = _centred_affine(ref_shape, vox, flip_x=True)
    ref_aff[:3, 3] += shift
    out = resample_to_grid(box, src_aff, ref_shape, ref_aff)
    truth = _box_fraction(lo, hi, ref_shape, ref_aff, src_aff)
    assert ((truth > 0.05) & (truth < 0.95)).sum() > 100  # many partial voxels
    np.testing.assert_allclose(out, truth, rtol=0, atol=0.02)  # the 2 %
    assert abs(out.sum() - truth.sum()) < 1e-3 * truth.sum()


@pytest.mark.parametrize("vox", [(3.4, 3.4, 5.0), (2.5, 3.0, 4.0)])
def test_a_map_filling_its_whole_image_gives_the_covered_fraction_up_to_the_footprint(vox):
    """The source image extends half a voxel beyond its outer voxel centres (voxel index
    -0.5 .. n - 0.5, as FSL and ITK count it): an all-ones map covering the whole image is
    the box of the test above touching every edge.  Samples in that outer half-voxel
    used to count as outside: a 3.4 mm voxel wholly inside the image got 0.75."""
    src = np.ones((20, 22, 24))
    src_aff = _centred_affine(src.shape, (1.0, 1.0, 1.0), flip_x=False)
    ref_shape = tuple(int(np.ceil(n / v)) + 2 for n, v in zip(src.shape, vox))
    ref_aff = _centred_affine(ref_shape, vox, flip_x=True)
    ref_aff[:3, 3] += (0.3, -0.2, 0.1)
    out = resample_to_grid(src, src_aff, ref_shape, ref_aff)
    truth = _box_fraction((0, 0, 0), tuple(n - 1 for n in src.shape), ref_shape, ref_aff, src_aff)
    assert (truth == 1.0).sum() > 10 and ((truth > 0.05) & (truth < 0.95)).sum() > 50
    np.testing.assert_array_equal(out[truth == 1.0], 1.0)
    np.testing.assert_array_equal(out[truth == 0.0], 0.0)
    # voxels cut by the image's edge: the footprint ends sharply, so their fraction is
    # counted with the ceil(voxel / 1 mm) sub-samples per axis, no finer
    partial = (truth > 0) & (truth < 1)
    err = np.abs(out - truth)[partial]
    assert err.max() <= 1.0 / 3.0 and err.mean() < 0.08, (err.max(), err.mean())
    assert abs(out.sum() - truth.sum()) < 0.02 * truth.sum()


def test_resample_with_flirt_takes_the_header_voxel_sizes_as_fsl():
    """FLIRT's scaled-voxel coordinates use the header pixdim (FSL; fslpy's
    generateAffines): voxel index times pixdim, x mirrored first when the voxel -> world
    matrix has a positive determinant.  With pixdim 10 % above the affines' voxel sizes and
    a FLIRT matrix shifting by (11, 5.5, 22) mm, ASL voxel (i, j, k) (radiological: no
    mirror) sits at scaled (3.74 i + 11, 3.74 j + 5.5, 5.5 k + 22), which is structural voxel
    (47 - (3.74 i + 11) / 1.1, (3.74 j + 5.5) / 1.1, (5.5 k + 22) / 1.1) (neurological:
    mirrored), worked out here by hand; a map linear in the structural voxel index is then
    known exactly there (and so is its footprint average, inside the image)."""
    shape = (4, 4, 3)
    ref_aff = np.diag([-3.4, 3.4, 5.0, 1.0])  # det < 0: radiological, no mirror
    src_aff = np.eye(4)  # 48^3, det > 0: mirrored in FLIRT coordinates
    idx = np.indices(SRC_SHAPE).astype(float)
    f = 0.3 * idx[0] - 0.2 * idx[1] + 0.5 * idx[2] + 4.0
    src_zooms, ref_zooms = (1.1, 1.1, 1.1), (3.74, 3.74, 5.5)
    mat = np.eye(4)
    mat[:3, 3] = (11.0, 5.5, 22.0)
    out = resample_with_flirt(f, src_aff, shape, ref_aff, mat, src_zooms=src_zooms, ref_zooms=ref_zooms)
    i, j, k = np.indices(shape).astype(float)
    si, sj, sk = 47 - (3.74 * i + 11) / 1.1, (3.74 * j + 5.5) / 1.1, (5.5 * k + 22) / 1.1
    np.testing.assert_allclose(out, 0.3 * si - 0.2 * sj + 0.5 * sk + 4.0, atol=1e-9)
    plain = resample_with_flirt(f, src_aff, shape, ref_aff, mat)
    assert np.max(np.abs(out - plain)) > 0.5  # without the header sizes the map lands elsewhere


def _brute_force_fraction(binary, src_aff, ref_shape, ref_aff, world, k=12) -> np.ndarray:
    """Fraction of k^3 points per reference voxel whose nearest source voxel is set."""
    m = np.linalg.inv(src_aff) @ world @ ref_aff
    off = (np.arange(k) + 0.5) / k - 0.5
    vox = np.indices(ref_shape).reshape(3, -1).T.astype(float)
    hits = np.zeros(len(vox))
    for ox in off:
        for oy in off:
            for oz in off:
                q = np.rint((vox + (ox, oy, oz)) @ m[:3, :3].T + m[:3, 3]).astype(int)
                ok = ((q >= 0) & (q < binary.shape)).all(axis=1)
                hits[ok] += binary[q[ok, 0], q[ok, 1], q[ok, 2]]
    return (hits / k**3).reshape(ref_shape)


def test_binary_sphere_through_rotation_gives_true_fraction():
    g = np.indices(SRC_SHAPE).reshape(3, -1).T - (np.asarray(SRC_SHAPE) - 1) / 2
    sphere = (np.linalg.norm(g - (1.3, -0.8, 0.6), axis=1) <= 14.0).reshape(SRC_SHAPE)
    out = resample_to_grid(sphere, SRC_AFF, REF_SHAPE, REF_AFF, MOTION)
    truth = _brute_force_fraction(sphere, SRC_AFF, REF_SHAPE, REF_AFF, MOTION)
    assert ((truth > 0.05) & (truth < 0.95)).sum() > 50
    # 0.02: the 2 %; the brute force itself is good to ~1/12 of a voxel edge.
    np.testing.assert_allclose(out, truth, rtol=0, atol=0.02)


def test_linear_map_gives_its_value_at_the_mapped_centre():
    # f(world_src) = a . x + b is reproduced exactly by linear interpolation and by the
    # symmetric average, so each output is f(world_ref_to_src @ ref centre): this pins
    # the direction of world_ref_to_src.
    a, b = np.array([0.3, -0.2, 0.5]), 4.0
    world_src = np.indices(SRC_SHAPE).reshape(3, -1).T @ SRC_AFF[:3, :3].T + SRC_AFF[:3, 3]
    f = (world_src @ a + b).reshape(SRC_SHAPE)
    ref_shape = (6, 6, 4)  # well inside the source FOV
    ref_aff = _centred_affine(ref_shape, (3.4, 3.4, 5.0), flip_x=True)
    out = resample_to_grid(f, SRC_AFF, ref_shape, ref_aff, MOTION)
    centres = np.indices(ref_shape).reshape(3, -1).T @ ref_aff[:3, :3].T + ref_aff[:3, 3]
    mapped = centres @ MOTION[:3, :3].T + MOTION[:3, 3]
    np.testing.assert_allclose(out, (mapped @ a + b).reshape(ref_shape), atol=1e-10)
    # The inverse motion gives different numbers (direction matters here).
    wrong = resample_to_grid(f, SRC_AFF, ref_shape, ref_aff, np.linalg.inv(MOTION))
    assert np.abs(wrong - out).max() > 0.5


def test_flirt_direction_with_independent_matrix():
    # A FLIRT matrix ASL (ref grid) -> structural (src grid) made by the phantom's own
    # helper from a known world motion; resample_with_flirt must apply that motion.
    a, b = np.array([0.3, -0.2, 0.5]), 4.0
    world_src = np.indices(SRC_SHAPE).reshape(3, -1).T @ SRC_AFF[:3, :3].T + SRC_AFF[:3, 3]
    f = (world_src @ a + b).reshape(SRC_SHAPE)
    ref_shape = (6, 6, 4)
    ref_aff = _centred_affine(ref_shape, (3.4, 3.4, 5.0), flip_x=True)
    mat = phantoms.flirt_matrix(ref_aff, ref_shape, SRC_AFF, SRC_SHAPE, world_src_to_ref=MOTION)
    out = resample_with_flirt(f, SRC_AFF, ref_shape, ref_aff, mat)
    np.testing.assert_allclose(out, resample_to_grid(f, SRC_AFF, ref_shape, ref_aff, MOTION), atol=1e-10)
    centres = np.indices(ref_shape).reshape(3, -1).T @ ref_aff[:3, :3].T + ref_aff[:3, 3]
    mapped = centres @ MOTION[:3, :3].T + MOTION[:3, 3]
    np.testing.assert_allclose(out, (mapped @ a + b).reshape(ref_shape), atol=1e-10)


def test_default_supersample():
    s_aff = _centred_affine((10, 10, 10), (1.7, 1.7, 1.7), flip_x=False)
    r_aff = _centred_affine((10, 10, 10), (3.4, 3.4, 5.0), flip_x=True)
    assert default_supersample(s_aff, r_aff) == (2, 2, 3)  # 3.4/1.7 = 2 exactly, 5/1.7 -> 3
    assert default_supersample(s_aff, r_aff, MOTION) == (2, 2, 3)  # rigid motion keeps lengths
    assert default_supersample(r_aff, s_aff) == (1, 1, 1)  # finer reference: point samples


def test_supersample_argument_forms():
    g = np.indices(SRC_SHAPE).reshape(3, -1).T - (np.asarray(SRC_SHAPE) - 1) / 2
    sphere = (np.linalg.norm(g, axis=1) <= 12.0).reshape(SRC_SHAPE)
    three = resample_to_grid(sphere, SRC_AFF, REF_SHAPE, REF_AFF, supersample=3)
    np.testing.assert_array_equal(three, resample_to_grid(sphere, SRC_AFF, REF_SHAPE, REF_AFF, supersample=(3, 3, 3)))
    # supersample=1, order=0: the source voxel nearest to each reference centre.
    one = resample_to_grid(sphere, SRC_AFF, REF_SHAPE, REF_AFF, MOTION, supersample=1, order=0)
    m = np.linalg.inv(SRC_AFF) @ MOTION @ REF_AFF
    q = np.rint(np.indices(REF_SHAPE).reshape(3, -1).T @ m[:3, :3].T + m[:3, 3]).astype(int)
    q = np.clip(q, 0, np.asarray(SRC_SHAPE) - 1)  # the sphere is far from the edges
    np.testing.assert_array_equal(one, sphere[q[:, 0], q[:, 1], q[:, 2]].reshape(REF_SHAPE))


def test_chunking_gives_identical_results(ph):
    st = ph.structural
    full = resample_with_flirt(st.pv["csf"], st.affine, ph.shape, ph.affine, st.asl2struct, chunk_slices=ph.shape[2])
    for chunk in (1, 5, None):
        part = resample_with_flirt(st.pv["csf"], st.affine, ph.shape, ph.affine, st.asl2struct, chunk_slices=chunk)
        np.testing.assert_array_equal(part, full)


def test_dtypes_and_4d_reference_shape():
    src = np.random.default_rng(0).random(SRC_SHAPE)
    out64 = resample_to_grid(src, SRC_AFF, REF_SHAPE + (3,), REF_AFF)
    out32 = resample_to_grid(src.astype(np.float32), SRC_AFF, REF_SHAPE, REF_AFF)
    outint = resample_to_grid((src > 0.5).astype(np.uint8), SRC_AFF, REF_SHAPE, REF_AFF)
    assert out64.shape == REF_SHAPE and out64.dtype == np.float64
    assert out32.dtype == np.float32 and outint.dtype == np.float64
    np.testing.assert_allclose(out32, out64, atol=1e-6)  # float32 input rounding only
    np.testing.assert_array_equal(outint, resample_to_grid(src > 0.5, SRC_AFF, REF_SHAPE, REF_AFF))


# --------------------------------------------------------------------------------------
# Phantom: structural PV maps -> ASL space through the FLIRT matrix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tissue", ["csf", "gm", "wm"])
def test_phantom_pv_through_flirt_matches_asl_pv(ph, tissue):
    st = ph.structural
    out = resample_with_flirt(st.pv[tissue], st.affine, ph.shape, ph.affine, st.asl2struct)
    truth = ph.pv[tissue]
    touched = (out > 0) | (truth > 0)
    assert np.abs(out - truth).mean() < 0.02
    assert np.abs(out - truth)[touched].mean() < 0.05
    assert np.corrcoef(out.ravel(), truth.ravel())[0, 1] > 0.95
    # Same numbers from the phantom's own world motion (independent of the FLIRT algebra).
    direct = resample_to_grid(st.pv[tissue], st.affine, ph.shape, ph.affine, st.world_asl_to_struct)
    np.testing.assert_allclose(out, direct, atol=1e-5)  # float32 map, 1e-14 matrix difference


def test_phantom_ventricles_thresholded(ph):
    # The CSF map in ASL space, thresholded as asl_calib does, finds the ventricle cores
    # (the structural map has no ventricle-only PV, so compare the CSF >= 0.9 voxels).
    st = ph.structural
    out = resample_with_flirt(st.pv["csf"], st.affine, ph.shape, ph.affine, st.asl2struct)
    a, b = out >= 0.9, ph.pv["csf"] >= 0.9
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.8 and (a & ph.ventricle_mask).sum() >= 0.8 * ph.ventricle_mask.sum()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"src_map": np.zeros((4, 4))}, r"src_map: array of shape \(4, 4\); expected a 3-D map"),
        ({"src_map": np.zeros((4, 4, 4), dtype=complex)}, r"src_map: dtype complex128"),
        ({"ref_shape": (4, 4)}, r"ref_shape=\(4, 4\): expected 3 positive integers"),
        ({"ref_shape": (4, -1, 4)}, r"ref_shape="),
        ({"src_affine": np.zeros((4, 4))}, r"src_affine: .*last row|src_affine: singular"),
        ({"ref_affine": np.diag([1.0, np.inf, 1.0, 1.0])}, r"ref_affine: .*NaN or Inf"),
        ({"ref_affine": np.eye(3)}, r"ref_affine: matrix of shape \(3, 3\)"),
        ({"world_ref_to_src": np.diag([1.0, 0.0, 1.0, 1.0])}, r"world_ref_to_src: singular"),
        ({"supersample": 0}, r"supersample=0: expected"),
        ({"supersample": 1.5}, r"supersample=1.5"),
        ({"supersample": (1, 2)}, r"supersample=\(1, 2\)"),
        ({"supersample": True}, r"supersample=True"),
        ({"order": 3}, r"order=3: expected 0 \(nearest\) or 1 \(linear\)"),
        ({"cval": np.nan}, r"cval=nan: expected a finite number"),
        ({"cval": "zero"}, r"cval='zero'"),
        ({"chunk_slices": 0}, r"chunk_slices=0"),
    ],
)
def test_rejects_bad_input(kwargs, pattern):
    args = {"src_map": np.zeros((4, 4, 4)), "src_affine": np.eye(4), "ref_shape": (2, 2, 2),
            "ref_affine": np.diag([2.0, 2.0, 2.0, 1.0])}
    args.update(kwargs)
    with pytest.raises(InputError, match=pattern):
        resample_to_grid(**args)


def test_resample_with_flirt_rejects_bad_matrix():
    with pytest.raises(InputError, match=r"mat: singular"):
        resample_with_flirt(np.zeros((4, 4, 4)), np.eye(4), (2, 2, 2), np.eye(4), np.diag([1.0, 1.0, 0.0, 1.0]))


# --------------------------------------------------------------------------------------
# CuPy
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cupy_matches_numpy(ph):
    import cupy

    st = ph.structural
    for tissue in ("csf", "gm"):
        host = resample_with_flirt(st.pv[tissue], st.affine, ph.shape, ph.affine, st.asl2struct)
        dev = resample_with_flirt(cupy.asarray(st.pv[tissue]), st.affine, ph.shape, ph.affine, st.asl2struct)
        assert isinstance(dev, cupy.ndarray) and dev.dtype == cupy.float32
        np.testing.assert_allclose(dev.get(), host, atol=1e-5)
    box = np.zeros(SRC_SHAPE)
    box[10:30, 12:40, 5:25] = 1.0
    for order in (0, 1):
        host = resample_to_grid(box, SRC_AFF, REF_SHAPE, REF_AFF, MOTION, order=order, cval=-1.0)
        dev = resample_to_grid(cupy.asarray(box), SRC_AFF, REF_SHAPE, REF_AFF, MOTION, order=order, cval=-1.0,
                               chunk_slices=3)
        assert dev.dtype == cupy.float64
        np.testing.assert_allclose(dev.get(), host, atol=1e-9)
