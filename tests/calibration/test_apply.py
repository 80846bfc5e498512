"""Applying the calibration (calibration.md §9), against formulas written here:

    CBF = 6000·p/(s·M0a·α);  variance: 6000²·v/(s·M0a·α)²;  aCBV = 100·p/(s·M0a·α)

α = 0.85 for pCASL/CASL, 0.98 for PASL, 1 with a CalibrationWarning when unknown.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from aslcal.io.bids import DEFAULT_ALPHA
from aslcal.calibration import ALPHA_DEFAULTS, CalibratedImage, CalibrationWarning, apply_calibration
from aslcal.errors import InputError

REL = 1e-12


@pytest.fixture
def perf():
    return np.random.default_rng(5).normal(10.0, 3.0, (5, 4, 3))


def test_scalar_m0_perfusion(perf):
    res = apply_calibration(perf, 1234.5, alpha=0.8)
    np.testing.assert_allclose(res.image, 6000.0 * perf / (1234.5 * 0.8), rtol=REL)
    assert isinstance(res, CalibratedImage)
    assert (res.kind, res.units, res.m0a, res.m0_map, res.alpha, res.alpha_source) == (
        "perfusion", "ml/100g/min", 1234.5, False, 0.8, "user")
    assert res.scale == pytest.approx(6000.0 / (1234.5 * 0.8), rel=REL)
    assert res.n_zeroed == 0


@pytest.mark.parametrize("labelling, alpha", [("pcasl", 0.85), ("CASL", 0.85), ("pasl", 0.98)])
def test_alpha_defaults_by_labelling(perf, labelling, alpha):
    res = apply_calibration(perf, 1000.0, labelling=labelling)
    np.testing.assert_allclose(res.image, 6000.0 * perf / (1000.0 * alpha), rtol=REL)
    assert res.alpha == alpha and res.alpha_source == "labelling" and res.labelling == labelling.lower()
    assert ALPHA_DEFAULTS[labelling.lower()] == alpha
    # the BIDS reader's default (io keeps its own copy: io does not import calibration)
    assert DEFAULT_ALPHA[labelling.upper()] == alpha


def test_user_alpha_wins_over_labelling(perf):
    res = apply_calibration(perf, 1000.0, alpha=0.7, labelling="pasl")
    np.testing.assert_allclose(res.image, 6000.0 * perf / 700.0, rtol=REL)
    assert res.alpha_source == "user" and res.labelling == "pasl"


def test_unknown_alpha_is_one_with_a_warning(perf):
    with pytest.warns(CalibrationWarning, match="alpha = 1 assumed"):
        res = apply_calibration(perf, 1000.0)
    np.testing.assert_allclose(res.image, 6000.0 * perf / 1000.0, rtol=REL)
    assert res.alpha == 1.0 and res.alpha_source == "assumed"
    assert issubclass(CalibrationWarning, UserWarning)


def test_no_warning_when_alpha_known(perf):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_calibration(perf, 1000.0, labelling="pcasl")
        apply_calibration(perf, 1000.0, alpha=0.9)


def test_variance_and_acbv(perf):
    var = perf**2
    res = apply_calibration(var, 900.0, alpha=0.85, kind="variance")
    np.testing.assert_allclose(res.image, 6000.0**2 * var / (900.0 * 0.85) ** 2, rtol=REL)
    assert res.units == "(ml/100g/min)^2"
    res = apply_calibration(perf, 900.0, alpha=0.85, kind="acbv")
    np.testing.assert_allclose(res.image, 100.0 * perf / (900.0 * 0.85), rtol=REL)
    assert res.units == "ml/100g"


def test_sensitivity_scalar_m0(perf):
    s = np.random.default_rng(1).uniform(0.7, 1.3, perf.shape)
    res = apply_calibration(perf, 1100.0, alpha=0.85, sensitivity=s)
    np.testing.assert_allclose(res.image, 6000.0 * perf / (s * 1100.0 * 0.85), rtol=REL)
    res = apply_calibration(perf**2, 1100.0, alpha=0.85, sensitivity=s, kind="variance")
    np.testing.assert_allclose(res.image, 6000.0**2 * perf**2 / (s * 1100.0 * 0.85) ** 2, rtol=REL)
    res = apply_calibration(perf, 1100.0, alpha=0.85, sensitivity=s, kind="acbv")
    np.testing.assert_allclose(res.image, 100.0 * perf / (s * 1100.0 * 0.85), rtol=REL)
    assert res.sensitivity is True


def test_voxelwise_m0_with_invalid_voxels(perf):
    m0 = np.random.default_rng(2).uniform(800.0, 1200.0, perf.shape)
    m0[0, 0, 0] = 0.0
    m0[1, 1, 1] = -3.0
    m0[2, 2, 2] = np.nan
    m0[3, 3, 2] = np.inf
    res = apply_calibration(perf, m0, alpha=0.85)
    bad = ~(np.isfinite(m0) & (m0 > 0))
    expected = np.where(bad, 0.0, 6000.0 * perf / (np.where(bad, 1.0, m0) * 0.85))
    np.testing.assert_allclose(res.image, expected, rtol=REL)
    assert res.n_zeroed == 4 and res.m0_map is True and res.m0a is None
    assert np.isfinite(res.image).all()


def test_voxelwise_m0_variance_and_sensitivity(perf):
    rng = np.random.default_rng(3)
    m0 = rng.uniform(800.0, 1200.0, perf.shape)
    s = rng.uniform(0.8, 1.2, perf.shape)
    s[4, 3, 2] = 0.0  # unusable sensitivity: 0 and counted
    var = perf**2
    res = apply_calibration(var, m0, alpha=0.98, sensitivity=s, kind="variance")
    ok = s > 0
    den = np.where(ok, s, 1.0) * m0 * 0.98
    np.testing.assert_allclose(res.image, np.where(ok, 6000.0**2 * var / den**2, 0.0), rtol=REL)
    assert res.n_zeroed == 1


def test_series_broadcast_over_the_last_axis(perf):
    series = np.stack([perf, 2 * perf], axis=-1)
    m0 = np.full(perf.shape, 1000.0)
    res = apply_calibration(series, m0, alpha=0.85)
    np.testing.assert_allclose(res.image[..., 1], 2 * 6000.0 * perf / (1000.0 * 0.85), rtol=REL)
    res = apply_calibration(series, 1000.0, alpha=0.85, sensitivity=np.ones(perf.shape))
    np.testing.assert_allclose(res.image[..., 0], 6000.0 * perf / 850.0, rtol=REL)


def test_dtype_is_kept(perf):
    p32 = perf.astype(np.float32)
    assert apply_calibration(p32, 1000.0, alpha=0.85).image.dtype == np.float32
    m0 = np.full(perf.shape, 1000.0)  # float64 map, float32 image: float32 out
    assert apply_calibration(p32, m0, alpha=0.85).image.dtype == np.float32
    assert apply_calibration(perf.astype(np.int32), 1000.0, alpha=0.85).image.dtype == np.float64


def test_zero_d_array_m0(perf):
    res = apply_calibration(perf, np.array(1000.0), alpha=0.85)
    assert res.m0a == 1000.0 and res.m0_map is False


def test_as_dict(perf):
    d = apply_calibration(perf, 1000.0, alpha=0.85).as_dict()
    assert "image" not in d and d["alpha"] == 0.85 and "formula" in d


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m0a=0.0), "m0a=0.0"),
        (dict(m0a=-10.0), "m0a=-10.0"),
        (dict(m0a=math.nan), "m0a=nan"),
        (dict(m0a="1000"), "m0a='1000'"),
        (dict(m0a=np.ones((4, 4))), "m0a: map of shape"),
        (dict(alpha=0.0), "alpha=0.0"),
        (dict(alpha=85.0), "alpha=85.0.*\\(0, 1\\]"),
        (dict(labelling="fair"), "labelling='fair'"),
        (dict(kind="cbf"), "kind='cbf'"),
        (dict(sensitivity=np.ones((2, 2, 2))), "sensitivity: map of shape"),
    ],
)
def test_bad_inputs(perf, kwargs, match):
    args = dict(m0a=1000.0, alpha=0.85)
    args.update(kwargs)
    m0a = args.pop("m0a")
    with pytest.raises(InputError, match=match):
        apply_calibration(perf, m0a, **args)


def test_missing_perfusion():
    with pytest.raises(InputError, match="perfusion: required"):
        apply_calibration(None, 1000.0, alpha=0.85)


@pytest.mark.parametrize(
    ("p_shape", "m0_shape", "s_shape"),
    [((8, 8, 1, 1), (8, 8, 1, 1), (8, 8, 1)), ((8, 8, 20, 1), (8, 8, 20, 1), (8, 8, 20)),
     ((4, 4, 4, 4), (4, 4, 4), (4, 4, 4, 4)), ((4, 4, 4, 3), (4, 4, 4), (4, 4, 4))],
)
def test_m0_map_and_sensitivity_of_either_form_line_up(p_shape, m0_shape, s_shape):
    """An M0 map and a sensitivity map, each of the image's shape or its spatial shape:
    6000·p/(s·M0·α) voxel by voxel, the image's shape kept (plain broadcasting of one of
    each form gave a wrong shape, wrong values or a NumPy error)."""
    rng = np.random.default_rng(3)
    p = rng.normal(10.0, 1.0, p_shape)
    m0 = rng.uniform(800.0, 1200.0, m0_shape)
    s = rng.uniform(0.7, 1.3, s_shape)
    res = apply_calibration(p, m0, labelling="pcasl", sensitivity=s)
    m0_b = m0 if m0.ndim == p.ndim else m0[..., None]
    s_b = s if s.ndim == p.ndim else s[..., None]
    assert res.image.shape == p.shape
    np.testing.assert_allclose(res.image, 6000.0 * p / (s_b * m0_b * 0.85), rtol=1e-12)


def test_unusable_m0_voxels_are_zero_whatever_the_image_holds():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NumPy 'invalid value' warning either
        res = apply_calibration(np.array([np.nan, np.inf, 5.0, 7.0]), np.array([0.0, -1.0, np.nan, 1e-310]),
                                labelling="pcasl")
    np.testing.assert_array_equal(res.image, [0.0, 0.0, 0.0, 0.0])
    assert res.n_zeroed == 4  # 1e-310: a factor beyond float64 is unusable too
    f32 = apply_calibration(np.array([5.0, 5.0], np.float32), np.array([1e-38, 1000.0], np.float32), labelling="pasl")
    np.testing.assert_allclose(f32.image, [0.0, 6000.0 * 5.0 / (1000.0 * 0.98)], rtol=1e-6)


@pytest.mark.parametrize(("m0a", "alpha"), [(1e200, 0.85), (1e-200, 0.85), (1000.0, 1e-200)])
def test_unusable_factor_of_a_variance_is_an_input_error(m0a, alpha):
    with pytest.raises(InputError, match="calibration factor .* is not usable"):
        apply_calibration(np.ones(3), m0a, alpha=alpha, kind="variance")
