"""Parity of the LM kernels with the SciPy oracle (:func:`aslcal.fitting.reference.fit_reference`).

Twelve configurations: three acquisition designs (plain saturation recovery with 8 TIs;
single-flip-angle Look-Locker, FA 35 deg, TI1 0.1 s, dt 0.3 s, 12 readouts, 2 phases;
dual-flip-angle Look-Locker, FA 35 / LFA 11.7 deg, 3 + 1 phases, g in [0.85, 1.15]) x
fix_a False/True x priors None/fabber.  Voxels are noisy: T1 ~ U(0.8, 4.5) s, A ~ U(0.85,
1.05) (1 with fix_a), M0t ~ N(1000, 50), white Gaussian noise sigma = M0t / 50 (SNR 50
relative to the fully relaxed signal; the Look-Locker readouts themselves are 2-5x
smaller, as in real data).  Signals come from the oracle's own NumPy model
(:func:`reference_signal`), which shares no code with the kernels.

The oracle is slow (~250 fits/s), so its answers are computed once per configuration
and voxel count and cached for the module.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import pytest

from aslcal import fit_satrecov
from aslcal.fitting import make_design
from aslcal.fitting.reference import fit_reference, reference_signal

CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")

SR_TIS = tuple(np.round(np.linspace(0.2, 4.0, 8), 6).tolist())  # 0.2 ... 4.0 s
LL_TIS = tuple(np.round(0.1 + 0.3 * np.arange(12), 6).tolist())  # TI1 0.1 s, dt 0.3 s, 12 readouts
DESIGNS = {
    "sr": (SR_TIS, {}),
    "ll": (LL_TIS, {"fa": 35.0, "nphases": 2}),
    "ll-dual": (LL_TIS, {"fa": 35.0, "lfa": 11.7, "nphases": 3}),
}
CONFIGS = [
    (d, fix_a, priors)
    for d in DESIGNS
    for fix_a in (False, True)
    for priors in (None, True)
]
CONFIG_IDS = [f"{d}-{'fixA' if f else 'freeA'}-{'priors' if p else 'noprior'}" for d, f, p in CONFIGS]

N_FAST = 6 if CUDASIM else 40  # the CUDA simulator interprets every thread in Python
N_SLOW = 840  # x 12 configurations = 10,080 voxels

PARAMS = ("m0t", "t1t", "a", "g")


def _n_vol(design_name: str) -> int:
    tis, kw = DESIGNS[design_name]
    return len(tis) * (kw.get("nphases", 1) + (1 if kw.get("lfa") is not None else 0))


@lru_cache(maxsize=None)
def _problem(k: int, n: int):
    """Noisy data of configuration ``k`` (deterministic per (k, n)) and its oracle fit."""
    name, fix_a, priors = CONFIGS[k]
    tis, kw = DESIGNS[name]
    design = make_design(_n_vol(name), tis, fix_a=fix_a, priors=priors, **kw)
    rng = np.random.default_rng([20261121, k, n])
    t1 = rng.uniform(0.8, 4.5, n)
    a = np.ones(n) if fix_a else rng.uniform(0.85, 1.05, n)
    g = rng.uniform(0.85, 1.15, n) if kw.get("lfa") is not None else np.ones(n)
    m0 = rng.normal(1000.0, 50.0, n)
    clean = np.stack([reference_signal(p, design) for p in np.stack([m0, t1, a, g], axis=1)])
    y = clean + rng.normal(0.0, 1.0, clean.shape) * (m0 / 50.0)[:, None]
    ref = fit_reference(y, design)
    return y, ref


def _fit(k: int, y: np.ndarray, backend: str, dtype: str, stat_tol: float = 0.0):
    """The kernel's fit; ``stat_tol`` 0 (no statistical stop): parity is about reaching the
    oracle's minimum, to the step tolerance (the statistical stop has its own test)."""
    name, fix_a, priors = CONFIGS[k]
    tis, kw = DESIGNS[name]
    return fit_satrecov(y, list(tis), fix_a=fix_a, priors=priors, backend=backend, dtype=dtype,
                        stat_tol=stat_tol, **kw)


def _stack(res, suffix: str = "") -> np.ndarray:
    return np.stack([np.asarray(getattr(res, p + suffix), dtype=np.float64) for p in PARAMS], axis=1)


def _rel(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|x - ref| / |ref|, with 0/0 = 0 (fixed parameters: both exactly 0 standard error)."""
    diff = np.abs(x - ref)
    den = np.abs(ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, diff / den)


@pytest.mark.cudasim
@pytest.mark.parametrize("k", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_parity_with_oracle(k, backend):
    y, ref = _problem(k, N_FAST)
    res = _fit(k, y, backend, "float64")
    assert res.backend == backend and res.dtype == "float64"
    # every voxel here is a well-posed noisy fit: the oracle converges on all of them
    assert np.all(res.status == 0), res.status_counts()
    # float64: both solvers stop at relative steps <= 1e-8 (kernel) / 1e-13 (oracle) at
    # the same minimum; 1e-5 leaves three orders of magnitude for ill-conditioned voxels
    # (T1 = 4.5 s against a 4 s / 3.4 s sampling window).
    p_err = _rel(_stack(res), ref["params"])
    assert p_err.max() <= 1e-5, f"worst relative parameter error per (m0t, t1t, a, g): {p_err.max(axis=0)}"
    # standard errors: analytic J (kernel) vs SciPy's 3-point finite-difference J at the
    # solution (relative accuracy ~1e-7); 1e-4 covers that and the parameter differences.
    se = _stack(res, "_se")
    assert np.all(np.isfinite(se))
    s_err = _rel(se, ref["se"])
    assert s_err.max() <= 1e-4, f"worst relative SE error per parameter: {s_err.max(axis=0)}"
    # residual sum of squares: stationary at the minimum, so second order in the
    # parameter differences (<= 1e-10 relative); 1e-7 is a loose float64 bound.
    np.testing.assert_allclose(np.asarray(res.rss), ref["rss"], rtol=1e-7)


@pytest.mark.cudasim
@pytest.mark.parametrize("k", range(len(CONFIGS)), ids=CONFIG_IDS)
def test_statistical_stop_stays_within_its_standard_errors(k, backend):
    """The default statistical stop (stat_tol 1e-3: the undamped Gauss–Newton step to the
    optimum below 1e-3 standard errors) ends noisy fits early.  Every parameter must stay
    within a few 1e-3 of its oracle standard error of the oracle's minimum (the step
    bounds the distance up to the linear convergence factor, ~0.1 here: 5e-3 allows
    for it), and the iterations must drop against full convergence."""
    y, ref = _problem(k, N_FAST)
    res = _fit(k, y, backend, "float64", stat_tol=1e-3)
    full = _fit(k, y, backend, "float64", stat_tol=0.0)
    assert np.all(res.status == 0), res.status_counts()
    free = np.asarray(res.design.free)
    dist = np.abs(_stack(res) - ref["params"])[:, free] / ref["se"][:, free]
    assert dist.max() <= 5e-3, f"worst distance in standard errors per free parameter: {dist.max(axis=0)}"
    assert np.mean(res.n_iter) <= 0.8 * np.mean(full.n_iter), (np.mean(res.n_iter), np.mean(full.n_iter))


# -- large-sample parity (slow) ---------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_large():
    """The oracle on N_SLOW voxels of every configuration (~40-60 s, computed once)."""
    return [_problem(k, N_SLOW) for k in range(len(CONFIGS))]


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, tol, se_tol",
    [
        # float64: same minimum, solver tolerances only (see the fast test)
        ("float64", 1e-5, 1e-4),
        # float32: eps 1.2e-7, kernel step tolerance 1e-5 and sums over 8-48 residuals
        # of ~1e3 give ~1e-4 on poorly determined T1 (T1 > sampling window); 1e-3 is the
        # documented float32 target for 99.9 % of voxels.  Standard errors come from a
        # float32 Cholesky solve of JᵀJ (condition ~1e4-1e6): 1e-2.
        ("float32", 1e-3, 1e-2),
    ],
)
def test_parity_large_sample(oracle_large, dtype, tol, se_tol):
    frac_need = 0.999  # ≥ 99.9 % of all voxels, per parameter, pooled over configurations
    per_param_err: dict[str, list[np.ndarray]] = {p: [] for p in PARAMS}
    se_err: dict[str, list[np.ndarray]] = {p: [] for p in PARAMS}
    n_total = 0
    statuses = np.zeros(6, dtype=np.int64)
    print(f"\nparity vs SciPy oracle, numba/{dtype}, tolerance {tol:g} relative")
    for k, (y, ref) in enumerate(oracle_large):
        _, fix_a, _ = CONFIGS[k]
        res = _fit(k, y, "numba", dtype)
        assert res.dtype == dtype
        statuses += np.bincount(res.status, minlength=6)
        p_err = _rel(_stack(res), ref["params"])
        s_err = _rel(_stack(res, "_se"), ref["se"])
        free = res.design.free
        for j, p in enumerate(PARAMS):
            if free[j]:  # fixed parameters are exact by construction: do not dilute the fraction
                per_param_err[p].append(p_err[:, j])
                se_err[p].append(s_err[:, j])
        n_total += y.shape[0]
        worst = ", ".join(f"{p} {p_err[:, j].max():.2e}" for j, p in enumerate(PARAMS) if free[j])
        print(f"  {CONFIG_IDS[k]:<28} worst: {worst}")
    assert n_total >= 10_000
    print(f"  voxels: {n_total}, status counts (0..5): {statuses.tolist()}")
    failures = []
    for p in PARAMS:
        e = np.concatenate(per_param_err[p])
        s = np.concatenate(se_err[p])
        frac = float(np.mean(e <= tol))
        frac_se = float(np.mean(s <= se_tol))
        print(
            f"  {p:<4} n={e.size:6d}  within {tol:g}: {100 * frac:.3f} %  worst {e.max():.3e}  "
            f"median {np.median(e):.2e} | SE within {se_tol:g}: {100 * frac_se:.3f} %  worst {s.max():.3e}"
        )
        if frac < frac_need:
            failures.append(f"{p}: {100 * frac:.3f} % within {tol:g}")
        if frac_se < frac_need:
            failures.append(f"{p} SE: {100 * frac_se:.3f} % within {se_tol:g}")
    assert not failures, failures
