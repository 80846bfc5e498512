"""Voxels whose optimum lies on a bound: the kernels must reach the bounded minimum.

The oracle here is independent of the kernels and of :mod:`aslcal.fitting.reference`:
SciPy's bounded ``least_squares`` from 15 starts (a T1 x A grid), the lowest cost kept,
on the plain saturation-recovery model S = M0 (1 - A exp(-TI/T1)) written out below.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import least_squares

from aslcal import fit_satrecov
from aslcal.errors import InputError

TIS = np.array([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0])
LOWER, UPPER = [0.0, 0.05, 0.0], [np.inf, 10.0, 2.0]  # the documented default bounds (m0t, t1t, a)


def _oracle(y: np.ndarray) -> tuple[np.ndarray, float]:
    def resid(p):
        return y - p[0] * (1.0 - p[2] * np.exp(-TIS / p[1]))

    best = min(
        (least_squares(resid, [max(float(np.mean(y)), 1.0), t1, a], bounds=(LOWER, UPPER),
                       xtol=1e-15, ftol=1e-15, gtol=1e-15)
         for t1 in (0.2, 0.5, 1.0, 2.0, 5.0) for a in (0.5, 1.0, 1.8)),
        key=lambda s: s.cost,
    )
    return best.x, 2.0 * best.cost


# Noisy voxels (sigma ~ 20) whose unbounded start has A < 0 or M0 < 0: a start clipped
# onto the bound sits where T1 no longer changes the model (A = 0 or M0 = 0), and a fit
# from there stopped at once ("singular") with a far larger residual than the bounded
# optimum (here T1 and A end on their upper bounds).
DEGENERATE = {
    "all-positive": [46.412, 11.707, 22.774, 12.712, 8.825, 17.904, 30.725, 43.942],
    "mostly-negative": [-35.199, 17.506, -21.79, -20.999, 5.022, -40.552, -19.261, -18.415],
}


@pytest.mark.cudasim
@pytest.mark.parametrize("name", list(DEGENERATE))
def test_start_within_bounds_reaches_the_bounded_minimum(name, backend):
    y = np.array(DEGENERATE[name])
    x, rss = _oracle(y)
    res = fit_satrecov(y[None], TIS, backend=backend, dtype="float64")
    assert res.status[0] == 0, res.status_counts()
    sigma2 = rss / (len(TIS) - 3)
    assert res.rss[0] <= rss + 1e-6 * sigma2, (res.rss[0], rss)
    np.testing.assert_allclose([res.m0t[0], res.t1t[0], res.a[0]], x, rtol=1e-5)


@pytest.mark.cudasim
def test_statistical_stop_not_taken_while_a_parameter_is_held_on_a_bound(backend):
    """A voxel whose fit passes through A on its upper bound (2) on its way to an interior
    optimum: while A is held there the local Gauss-Newton step is tiny, and a statistical
    stop then ended the fit 1.9 SE away from the optimum with 10 % more residual."""
    y = np.array([-20.940307545590702, 36.85693747859249, 1.0388381964879354, 3.386614849104772,
                  3.910561933899505, 16.14484792472217, 12.17966785054982, 38.57179290062193])
    x, rss = _oracle(y)
    for stat_tol in (1e-3, 1e-2):
        res = fit_satrecov(y[None], TIS, backend=backend, dtype="float64", stat_tol=stat_tol)
        assert res.status[0] == 0
        se = np.array([res.m0t_se[0], res.t1t_se[0], res.a_se[0]])
        got = np.array([res.m0t[0], res.t1t[0], res.a[0]])
        free = np.isfinite(se) & (se > 0)
        assert np.all(np.abs(got - x)[free] <= 3 * stat_tol * se[free]), (got, x, se)
        assert res.rss[0] <= rss * (1 + 1e-6)


def test_bounded_start_keeps_population_fits_at_their_minimum():
    """Low-SNR saturation-recovery voxels (M0 0-150, sigma 20): every converged fit is at
    least as good as the oracle's multistart minimum (no voxel stuck at a degenerate
    start), checked on 200 voxels."""
    rng = np.random.default_rng(3)
    n = 200
    t1 = rng.uniform(0.3, 4.5, n)
    m0 = rng.uniform(0, 150, n)
    a = rng.uniform(0.8, 1.1, n)
    y = m0[:, None] * (1 - a[:, None] * np.exp(-TIS / t1[:, None])) + rng.normal(0, 20, (n, TIS.size))
    res = fit_satrecov(y, TIS, backend="numba", dtype="float64", stat_tol=0.0)
    worse = []
    for i in range(n):
        _, rss = _oracle(y[i])
        sigma2 = rss / (len(TIS) - 3)
        if res.rss[i] > rss + 1e-3 * sigma2:
            worse.append((i, res.rss[i], rss, res.status[i]))
    assert not worse, worse[:5]


@pytest.mark.cudasim
def test_exactly_determined_fit_converges_with_undefined_standard_errors(backend):
    """3 TIs, 3 free parameters: the fit is exact (the noise-free truth), its status
    'converged', its standard errors NaN (no residual to estimate sigma from)."""
    tis = np.array([0.5, 1.5, 4.0])
    y = 1000.0 * (1.0 - 0.95 * np.exp(-tis / 1.2))
    res = fit_satrecov(y[None], tis, backend=backend, dtype="float64")
    assert res.status[0] == 0, res.status_counts()
    np.testing.assert_allclose([res.m0t[0], res.t1t[0], res.a[0]], [1000.0, 1.2, 0.95], rtol=1e-6)
    assert np.isnan(res.m0t_se[0]) and np.isnan(res.t1t_se[0]) and np.isnan(res.a_se[0])
    assert res.g_se[0] == 0.0  # fixed


@pytest.mark.cudasim
def test_nonfinite_voxel_keeps_zero_standard_error_for_fixed_parameters(backend):
    y = np.array([[np.nan] * 8, list(1000.0 * (1.0 - np.exp(-TIS / 1.3)))])
    res = fit_satrecov(y, TIS, backend=backend, dtype="float64", fix_a=True)
    assert res.status[0] == 3
    assert np.isnan(res.m0t_se[0]) and np.isnan(res.t1t_se[0])
    assert res.a_se[0] == 0.0 and res.g_se[0] == 0.0


def test_input_forms_and_priors_without_residual(caplog):
    y = 1000.0 * (1.0 - np.exp(-TIS / 1.3)) * np.ones((3, 8))
    mask_list = [True, False, True]
    res = fit_satrecov(y, TIS, mask=mask_list, tol=np.float32(1e-8), stat_tol=np.float64(1e-3))
    assert list(res.status) == [0, 4, 0]
    with pytest.raises(InputError, match="complex"):
        fit_satrecov(y.astype(np.complex128), TIS)
    tis3 = np.array([0.5, 1.5, 4.0])
    with caplog.at_level("WARNING", logger="aslcal"):
        fit_satrecov((1000.0 * (1.0 - np.exp(-tis3 / 1.3)))[None], tis3, priors=True)
    assert "priors ignored" in caplog.text
    with pytest.raises(InputError, match=r"exclude g = 1"):
        fit_satrecov(np.ones((2, 12)), 0.1 + 0.3 * np.arange(12), fa=35.0, bounds={"g": (1.1, 1.3)})
