"""Coil sensitivity from a body-coil reference (calibration.md §6).

Expected: s = mean_t(cact or calib) / mean_t(cref) inside the brain mask, 1 outside;
non-finite or <= 0 ratios set to 1 and counted — computed here with plain NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

from aslcal.calibration import coil_sensitivity
from aslcal.errors import InputError
from aslcal.testing.phantoms import body_coil_reference, longtr_calibration, make_phantom


@pytest.fixture
def images():
    rng = np.random.default_rng(9)
    shape = (6, 5, 4)
    cref = rng.uniform(200.0, 400.0, shape)
    s_true = rng.uniform(0.7, 1.3, shape)
    brain = np.zeros(shape, dtype=bool)
    brain[1:5, 1:4, 1:3] = True
    return cref * s_true, cref, brain, s_true


def test_ratio_inside_brain_one_outside(images):
    calib, cref, brain, s_true = images
    res = coil_sensitivity(calib, cref, brain)
    np.testing.assert_allclose(res.map[brain], s_true[brain], rtol=1e-12)
    assert np.all(res.map[~brain] == 1.0)
    assert (res.n_invalid, res.n_brain, res.source) == (0, int(brain.sum()), "calib")


def test_series_are_time_averaged(images):
    calib, cref, brain, _ = images
    c4 = np.stack([calib, 3 * calib], axis=-1)  # mean_t = 2·calib
    r4 = np.stack([cref, cref, cref], axis=-1)  # mean_t = cref
    res = coil_sensitivity(c4, r4, brain)
    np.testing.assert_allclose(res.map[brain], (2 * calib / cref)[brain], rtol=1e-12)


def test_cact_replaces_calib(images):
    calib, cref, brain, _ = images
    cact = calib * 1.1
    res = coil_sensitivity(calib, cref, brain, cact=cact)
    # s = mean_t(cact) / mean_t(cref)
    np.testing.assert_allclose(res.map[brain], (cact / cref)[brain], rtol=1e-12)
    assert res.source == "cact"
    res = coil_sensitivity(None, cref, brain, cact=cact)
    np.testing.assert_allclose(res.map[brain], (cact / cref)[brain], rtol=1e-12)


def test_invalid_ratios_set_to_one_and_counted(images):
    calib, cref, brain, s_true = images
    calib, cref = calib.copy(), cref.copy()
    idx = [tuple(v) for v in np.argwhere(brain)[:5]]
    cref[idx[0]] = 0.0  # division by zero
    calib[idx[1]] = np.nan
    calib[idx[2]] = -5.0  # ratio < 0
    cref[idx[3]] = np.inf  # ratio 0
    calib[idx[4]] = 0.0  # ratio 0
    cref[0, 0, 0] = 0.0  # outside the brain: 1, not counted
    res = coil_sensitivity(calib, cref, brain)
    assert res.n_invalid == 5
    for i in idx:
        assert res.map[i] == 1.0
    good = brain.copy()
    for i in idx:
        good[i] = False
    np.testing.assert_allclose(res.map[good], s_true[good], rtol=1e-12)
    assert np.isfinite(res.map).all() and res.map[0, 0, 0] == 1.0


def test_phantom_body_coil_reference_recovers_the_receive_field():
    ph = make_phantom(shape=(32, 32, 12), voxel_size=(6.8, 6.8, 10.0))
    calib, _ = longtr_calibration(ph, tr=3.2, dtype=np.float64)
    cref, _ = body_coil_reference(ph, tr=3.2, dtype=np.float64)
    res = coil_sensitivity(calib, cref, ph.brain_mask)
    # noise-free: calib = s · X, cref = X, so s is exact wherever X > 0 (every brain voxel)
    np.testing.assert_allclose(res.map[ph.brain_mask], ph.sensitivity[ph.brain_mask], rtol=1e-12)
    assert res.n_invalid == 0


def test_bad_inputs(images):
    calib, cref, brain, _ = images
    with pytest.raises(InputError, match="calib: required"):
        coil_sensitivity(None, cref, brain)
    with pytest.raises(InputError, match="cref: required"):
        coil_sensitivity(calib, None, brain)
    with pytest.raises(InputError, match="cref: shape"):
        coil_sensitivity(calib, cref[:, :, :2], brain)
    with pytest.raises(InputError, match="calib: shape"):
        coil_sensitivity(calib[:3], cref, brain)
    with pytest.raises(InputError, match="calib: shape"):
        coil_sensitivity(calib[:3], cref, brain, cact=calib)
    with pytest.raises(InputError, match="cact: shape"):
        coil_sensitivity(calib, cref, brain, cact=calib[:3])
    with pytest.raises(InputError, match="brain_mask: the mask is empty"):
        coil_sensitivity(calib, cref, np.zeros_like(brain))
