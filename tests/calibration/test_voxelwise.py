"""Voxelwise M0 (calibration.md §5): the formula, the short-TR rule and the edge correction.

The formula is checked against M0 = C·cgain·[1/(1 − exp(−TR/T1t)) if TR < 5 s]/pc
written here; the edge correction against a plain loop over voxels written here from
the words of §5 (3×3×3 median with half-sample-symmetric edges, brain mask, erosion by
a 3×3×3 box, fill with the mean of the non-zero values of the 5×5 in-plane window until
the mask is filled, 5×5×5 where a slice is left empty).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from aslcal.calibration import edge_correct, m0_voxelwise
from aslcal.errors import InputError

REL = 1e-12


def ragged_brain(shape=(16, 14, 7), seed=0):
    """An ellipsoid with a jagged boundary (random ±1 voxel), one connected blob."""
    rng = np.random.default_rng(seed)
    c = (np.array(shape) - 1) / 2.0
    i, j, k = np.indices(shape, dtype=float)
    r = np.sqrt(((i - c[0]) / (shape[0] / 2.4)) ** 2 + ((j - c[1]) / (shape[1] / 2.4)) ** 2
                + ((k - c[2]) / (shape[2] / 2.2)) ** 2)
    return r < 1.0 + rng.uniform(-0.12, 0.12, shape)


def smooth_image(shape, seed=1):
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape, dtype=float)
    return 800.0 + 60.0 * np.sin(i / 3.0) + 40.0 * np.cos(j / 4.0) + 10.0 * k + rng.normal(0, 5.0, shape)


def reference_edge_correction(m0, brain):
    """§5 written as loops over voxels (slow; small arrays only)."""
    nx, ny, nz = m0.shape
    pad = np.pad(m0, 1, mode="symmetric")  # scipy's 'reflect' (half-sample symmetric)
    med = np.empty_like(m0)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                med[i, j, k] = np.median(pad[i:i + 3, j:j + 3, k:k + 3])
    med[~brain] = 0.0
    nz_pad = np.pad(med != 0, 1, mode="constant", constant_values=False)
    out = np.zeros_like(med)
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                if nz_pad[i:i + 3, j:j + 3, k:k + 3].all():
                    out[i, j, k] = med[i, j, k]

    def fill_pass(cur, half_z):
        new = cur.copy()
        n = 0
        for i, j, k in np.argwhere(brain & (cur == 0)):
            win = cur[max(i - 2, 0):i + 3, max(j - 2, 0):j + 3, max(k - half_z, 0):k + half_z + 1]
            vals = win[win != 0]
            if vals.size:
                new[i, j, k] = vals.mean()
                n += 1
        return new, n

    while (brain & (out == 0)).any():
        new, n = fill_pass(out, 0)  # 5×5 in-plane
        if n == 0:
            new, n = fill_pass(out, 2)  # 5×5×5 for slices left empty
            if n == 0:
                raise AssertionError("reference fill stuck")
        out = new
    return out


# -- the formula ---------------------------------------------------------------------------


@pytest.mark.parametrize("tr, short", [(2.5, True), (4.99, True), (5.0, False), (8.0, False), (None, False)])
def test_formula_and_short_tr_rule(tr, short):
    rng = np.random.default_rng(2)
    calib = rng.uniform(100.0, 1000.0, (5, 4, 3))
    brain = np.zeros(calib.shape, dtype=bool)
    brain[1:4, 1:3, :] = True
    res = m0_voxelwise(calib, brain, tr=tr, t1t=1.4, pc=0.92, cgain=1.3, edge_correction=False)
    factor = 1.0 / (1.0 - math.exp(-tr / 1.4)) if short else 1.0  # only when TR < 5 s
    expected = np.where(brain, calib * 1.3 * factor / 0.92, 0.0)
    np.testing.assert_allclose(res.m0, expected, rtol=REL, atol=0)
    assert res.short_tr is short
    assert res.tr_factor == pytest.approx(1.0 - math.exp(-tr / 1.4) if short else 1.0, rel=REL)
    assert (res.tr, res.t1t, res.pc, res.cgain) == (tr, 1.4, 0.92, 1.3)
    assert res.n_brain == 18 and res.n_filled == 0 and res.edge_correction is False


def test_defaults_t1t_13_pc_09():
    calib = np.full((3, 3, 3), 600.0)
    brain = np.ones((3, 3, 3), dtype=bool)
    res = m0_voxelwise(calib, brain, tr=3.0, edge_correction=False)
    # M0 = 600 / (0.9 · (1 − exp(−3/1.3)))
    np.testing.assert_allclose(res.m0, 600.0 / (0.9 * (1 - math.exp(-3.0 / 1.3))), rtol=REL)


def test_sensitivity_and_series():
    rng = np.random.default_rng(4)
    calib = rng.uniform(100.0, 1000.0, (4, 4, 3))
    s = rng.uniform(0.7, 1.3, calib.shape)
    brain = np.ones(calib.shape, dtype=bool)
    series = np.stack([calib * 0.5, calib * 1.5], axis=-1)  # mean over the last axis = calib
    res = m0_voxelwise(series, brain, sensitivity=s, edge_correction=False)
    np.testing.assert_allclose(res.m0, calib / s / 0.9, rtol=REL)  # TR None: no short-TR factor
    assert res.sensitivity is True


def test_float32_stays_float32():
    calib = np.full((8, 8, 6), 700.0, dtype=np.float32)
    brain = np.zeros(calib.shape, dtype=bool)
    brain[1:7, 1:7, 1:5] = True
    res = m0_voxelwise(calib, brain, tr=3.2)
    assert res.m0.dtype == np.float32


def test_nonfinite_voxels_are_counted_and_zeroed_without_edge_correction():
    calib = np.full((4, 4, 3), 500.0)
    calib[1, 1, 1] = np.nan
    calib[2, 2, 2] = np.inf
    calib[0, 0, 0] = np.nan  # outside the brain: not counted
    brain = np.ones(calib.shape, dtype=bool)
    brain[0, 0, 0] = False
    res = m0_voxelwise(calib, brain, edge_correction=False)
    assert res.n_nonfinite == 2
    assert np.isfinite(res.m0).all() and res.m0[1, 1, 1] == 0 and res.m0[2, 2, 2] == 0


# -- edge correction -----------------------------------------------------------------------


def test_edge_correction_matches_the_reference_loops():
    brain = ragged_brain()
    calib = smooth_image(brain.shape)
    res = m0_voxelwise(calib, brain, tr=3.2)
    # §5 (and FSL's ``fslmaths M0 -fmedian -mas mask -ero``): the median filter sees the
    # whole M0 image, the mask comes after it
    m0 = calib / (0.9 * (1 - math.exp(-3.2 / 1.3)))
    expected = reference_edge_correction(m0, brain)
    np.testing.assert_allclose(res.m0, expected, rtol=1e-12, atol=1e-9)
    assert res.n_filled > 0 and res.fill_passes["inplane"] >= 1
    # masking first would differ at the edge (zeros in the medians' windows)
    masked_first = reference_edge_correction(np.where(brain, m0, 0.0), brain)
    assert np.count_nonzero(np.abs(masked_first - expected) > 1e-6 * np.abs(expected).max()) > 0


def test_edge_correction_fills_every_brain_voxel_and_leaves_the_rest_at_zero():
    brain = ragged_brain(seed=5)
    calib = smooth_image(brain.shape, seed=6)
    calib[~brain] = 0.0
    calib[brain & (np.indices(brain.shape)[0] % 4 == 0)] *= 0.2  # partial-volume-like dips
    res = m0_voxelwise(calib, brain)
    assert np.all(res.m0[brain] != 0) and np.isfinite(res.m0).all()
    assert np.all(res.m0[~brain] == 0)


def test_edge_correction_of_a_constant_image_is_that_constant():
    brain = ragged_brain(shape=(18, 15, 8), seed=11)
    calib = np.full(brain.shape, 432.1)
    res = m0_voxelwise(calib, brain, pc=1.0)
    np.testing.assert_allclose(res.m0[brain], 432.1, rtol=1e-12)
    assert np.all(res.m0[~brain] == 0)


def test_empty_slice_needs_the_3d_pass():
    # one slice of the brain has no signal at all: in-plane filling cannot reach it
    brain = np.zeros((9, 9, 7), dtype=bool)
    brain[1:8, 1:8, 1:6] = True
    calib = smooth_image(brain.shape, seed=2)
    calib[:, :, 3] = 0.0
    res = m0_voxelwise(calib, brain, pc=1.0)
    assert res.fill_passes["3d"] >= 1
    assert np.all(res.m0[brain] > 0) and np.all(res.m0[~brain] == 0)
    expected = reference_edge_correction(calib, brain)  # median of the whole image, then the mask
    np.testing.assert_allclose(res.m0, expected, rtol=1e-12, atol=1e-9)


def test_nonfinite_voxels_are_filled_by_the_edge_correction():
    brain = np.zeros((10, 10, 6), dtype=bool)
    brain[1:9, 1:9, 1:5] = True
    calib = np.full(brain.shape, 300.0)
    calib[4, 4, 2] = np.nan
    res = m0_voxelwise(calib, brain, pc=1.0)
    assert res.n_nonfinite == 1
    np.testing.assert_allclose(res.m0[brain], 300.0, rtol=1e-12)


def test_edge_correct_direct_call():
    brain = ragged_brain()
    m0 = np.where(brain, smooth_image(brain.shape), 0.0)
    out, n_filled, passes = edge_correct(m0, brain)
    np.testing.assert_allclose(out, reference_edge_correction(m0, brain), rtol=1e-12, atol=1e-9)
    assert 0 < n_filled < int(np.count_nonzero(brain))
    assert set(passes) == {"inplane", "3d"}


# -- bad input -----------------------------------------------------------------------------


def test_fill_that_cannot_progress_is_an_error():
    brain = np.zeros((8, 8, 4), dtype=bool)
    brain[2:6, 2:6, 1:3] = True
    with pytest.raises(InputError, match="edge correction cannot fill .* brain-mask voxels"):
        m0_voxelwise(np.zeros(brain.shape), brain)
    # an island 4 voxels away from the rest (beyond every 5-wide window) cannot be reached
    brain = np.zeros((20, 9, 5), dtype=bool)
    brain[1:8, 1:8, 1:4] = True
    brain[15, 4, 2] = True
    with pytest.raises(InputError, match="cannot fill 1 brain-mask voxels"):
        m0_voxelwise(np.full(brain.shape, 100.0), brain)
    # ... and without edge correction the map is simply defined there
    assert m0_voxelwise(np.full(brain.shape, 100.0), brain, edge_correction=False).m0[15, 4, 2] > 0


def test_bad_inputs():
    calib = np.ones((4, 4, 3))
    brain = np.ones((4, 4, 3), dtype=bool)
    cases = [
        (dict(tr=0.0), "tr=0.0"),
        (dict(tr=-2.0), "tr=-2.0"),
        (dict(t1t=0.0), "t1t=0.0"),
        (dict(pc=math.nan), "pc=nan"),
        (dict(cgain=-1.0), "cgain=-1.0"),
        (dict(edge_correction=1), "edge_correction=1"),
        (dict(sensitivity=np.ones((4, 4))), "sensitivity: shape"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            m0_voxelwise(calib, brain, **kwargs)
    with pytest.raises(InputError, match="calib: shape"):
        m0_voxelwise(np.ones((4, 4, 2)), brain)
    with pytest.raises(InputError, match="brain_mask: the mask is empty"):
        m0_voxelwise(calib, np.zeros_like(brain))
    with pytest.raises(InputError, match="edge_correction=True needs 3-D images"):
        m0_voxelwise(np.ones((4, 4)), np.ones((4, 4), dtype=bool))
    # 2-D works without the edge correction
    np.testing.assert_allclose(
        m0_voxelwise(np.full((4, 4), 9.0), np.ones((4, 4)), edge_correction=False).m0, 10.0
    )


def test_edge_correct_takes_any_mask_dtype_and_rejects_nan():
    brain = ragged_brain()
    m0 = np.where(brain, smooth_image(brain.shape), 0.0)
    a, _, _ = edge_correct(m0, brain)
    b, _, _ = edge_correct(m0, brain.astype(np.uint8))
    np.testing.assert_array_equal(a, b)
    m0[5, 5, 3] = np.nan
    with pytest.raises(InputError, match="m0: the map contains NaN"):
        edge_correct(m0, brain)
    with pytest.raises(InputError, match="brain_mask: shape"):
        edge_correct(m0[:, :, :3], brain)


def test_tr_in_milliseconds_warns():
    from aslcal.calibration import CalibrationWarning

    with pytest.warns(CalibrationWarning, match="tr=3200 s looks like milliseconds"):
        m0_voxelwise(np.ones((3, 3, 3)), np.ones((3, 3, 3)), tr=3200.0, edge_correction=False)


def test_t1t_in_milliseconds_warns():
    from aslcal.calibration import CalibrationWarning

    with pytest.warns(CalibrationWarning, match="t1t=1300 s looks like milliseconds"):
        m0_voxelwise(np.ones((3, 3, 3)), np.ones((3, 3, 3)), tr=3.2, t1t=1300.0, edge_correction=False)


@pytest.mark.parametrize("nz", [1, 2])
def test_edge_correction_of_one_or_two_slices(nz):
    """A slab of 1-2 slices: the erosion is in-plane (no voxel has 26 neighbours in the
    image), so a constant image stays that constant (it failed: nothing to fill from)."""
    calib = np.full((20, 20, nz), 1000.0)
    brain = np.zeros(calib.shape, dtype=bool)
    brain[5:15, 5:15] = True
    res = m0_voxelwise(calib, brain, tr=None, pc=1.0)
    np.testing.assert_allclose(res.m0[brain], 1000.0, rtol=1e-12)
    assert np.all(res.m0[~brain] == 0)
