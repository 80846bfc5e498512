"""Voxel-fits/s of the saturation-recovery fit vs the SciPy loop, in the same run.

Smoke mode (default, CI): one small size per case, each benchmark runs once.  Full mode
(``--benchmark-enable``): 1e3 to 1e6 voxels (and 1e7 on a GPU) x 8, 24 and 64
observations, plus a Look-Locker dual-flip-angle design of 7 phases x 13 TIs.
Kernel time (``timings["fit"]``) gives voxel-fits/s; host<->device transfers on the GPU
are reported separately.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import aslcal
from aslcal.backend import available_backends


CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
GPU = (not CUDASIM) and available_backends()["cuda"][0]

_BASELINE: dict[int, float] = {}


# The baseline users have today: SciPy least_squares looped over voxels, written the way a
# user would (residual function, default TRF solver with bounds and 2-point Jacobian, start
# M0 = max signal, T1 = 1.3 s, A = 1, default tolerances).
def scipy_loop_fits_per_second(y: np.ndarray, tis: np.ndarray, *, max_seconds: float = 3.0) -> tuple[float, int]:
    """Fit rows of ``y`` (n_vox, n_obs) one by one for up to ``max_seconds``; return (fits/s, n)."""
    from scipy.optimize import least_squares

    def resid(p, yi):
        return p[0] * (1.0 - p[2] * np.exp(-tis / p[1])) - yi

    lower, upper = [0.0, 0.05, 0.0], [np.inf, 10.0, 2.0]
    for yi in y[:5]:  # warm-up: first calls pay for lazy imports and caches
        least_squares(resid, [max(float(yi.max()), 1e-6), 1.3, 1.0], args=(yi,), bounds=(lower, upper))
    t0 = time.perf_counter()
    n = 0
    for yi in y:
        least_squares(resid, [max(float(yi.max()), 1e-6), 1.3, 1.0], args=(yi,), bounds=(lower, upper))
        n += 1
        if time.perf_counter() - t0 > max_seconds:
            break
    return n / (time.perf_counter() - t0), n


def sr_problem(n_vox: int, n_obs: int, seed: int = 0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    tis = np.linspace(0.1, 5.0, n_obs)
    t1 = rng.uniform(0.8, 4.5, n_vox)
    m0 = rng.uniform(800, 1200, n_vox)
    y = m0[:, None] * (1.0 - 0.95 * np.exp(-tis[None, :] / t1[:, None]))
    y += rng.normal(0.0, 20.0, y.shape)
    return y.astype(dtype), tis


def baseline(n_obs: int) -> float:
    if n_obs not in _BASELINE:
        y, tis = sr_problem(400, n_obs, seed=1)
        _BASELINE[n_obs] = scipy_loop_fits_per_second(y, tis)[0]
    return _BASELINE[n_obs]


CASES = [("numba", "float64"), ("numba", "float32")] + ([("cuda", "float32")] if GPU else [])


@pytest.mark.parametrize("n_obs", [8, 24, 64])
@pytest.mark.parametrize("backend,dtype", [pytest.param(*c, marks=pytest.mark.gpu) if c[0] == "cuda" else c for c in CASES])
def test_bench_satrecov(benchmark, bench_rows, full_run, backend, dtype, n_obs, n_vox):
    base = baseline(n_obs)
    if backend != "cuda" and n_vox > 1_000_000:
        pytest.skip("1e7 voxels is a GPU size (the GPU needs >= 1e5 voxels to fill)")
    y, tis = sr_problem(n_vox, n_obs, dtype=dtype)
    h2d = 0.0
    if backend == "cuda":
        import cupy

        t0 = time.perf_counter()
        y = cupy.asarray(y)  # the host->device copy, reported separately from the fit
        cupy.cuda.Device().synchronize()
        h2d = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = aslcal.fit_satrecov(y, tis, backend=backend, dtype=dtype)
    first_s = time.perf_counter() - t0
    fits = []

    def run():
        fits.append(aslcal.fit_satrecov(y, tis, backend=backend, dtype=dtype))

    benchmark.pedantic(run, rounds=3 if full_run else 1, iterations=1, warmup_rounds=0)
    warm = float(np.median([f.timings["fit"] for f in fits]))
    rate = n_vox / warm
    counts = first.status_counts()
    bench_rows.append({
        "problem": f"SR {backend}/{dtype}", "n_vox": n_vox, "n_obs": n_obs, "backend": f"{backend}/{dtype}",
        "warm_s": warm, "end_to_end_s": float(np.median([f.timings["total"] for f in fits])),
        "first_call_s": first_s, "fits_per_s": rate, "baseline_fits_per_s": base,
        "ratio_to_baseline": rate / base, "h2d_s": h2d or first.timings.get("h2d", 0.0),
        "d2h_s": first.timings.get("d2h", 0.0), "status_counts": dict(counts),
    })
    # after the row is recorded: a convergence shortfall on a new device still leaves its timing
    assert counts.get("converged", 0) >= 0.99 * n_vox, counts


def test_bench_scipy_baseline(bench_rows):
    for n_obs in (8, 24, 64):
        rate = baseline(n_obs)
        assert rate > 0
        bench_rows.append({"problem": "SR scipy least_squares loop", "n_vox": 400, "n_obs": n_obs,
                           "backend": "scipy", "warm_s": 400 / rate, "fits_per_s": rate,
                           "baseline_fits_per_s": rate, "ratio_to_baseline": 1.0})


@pytest.mark.parametrize("backend,dtype", [pytest.param(*c, marks=pytest.mark.gpu) if c[0] == "cuda" else c for c in CASES])
def test_bench_look_locker_dual_fa(benchmark, bench_rows, full_run, backend, dtype):
    """7 phases x 13 TIs (6 high-flip-angle phases + the low-flip-angle one), 4 parameters."""
    from aslcal.fitting import make_design
    from aslcal.fitting.reference import reference_signal

    n_vox = 100_000 if full_run else 5_000
    tis = 0.1 + 0.25 * np.arange(13)
    design = make_design(13 * 7, tis, fa=35.0, lfa=11.7, nphases=6)
    rng = np.random.default_rng(3)
    protos = np.stack([reference_signal((1000.0, t1, 0.95, g), design)
                       for t1, g in zip(rng.uniform(0.8, 4.3, 256), rng.uniform(0.85, 1.15, 256))])
    y = protos[rng.integers(0, 256, n_vox)] + rng.normal(0, 10.0, (n_vox, 91))
    y = y.astype(dtype)
    if backend == "cuda":
        import cupy

        y = cupy.asarray(y)
    kw = dict(fa=35.0, lfa=11.7, nphases=6, backend=backend, dtype=dtype)
    t0 = time.perf_counter()
    first = aslcal.fit_satrecov(y, tis, **kw)
    first_s = time.perf_counter() - t0
    fits = []
    benchmark.pedantic(lambda: fits.append(aslcal.fit_satrecov(y, tis, **kw)), rounds=3 if full_run else 1, iterations=1)
    warm = float(np.median([f.timings["fit"] for f in fits]))
    counts = first.status_counts()
    bench_rows.append({"problem": f"LL dual-FA {backend}/{dtype}", "n_vox": n_vox, "n_obs": 91,
                       "backend": f"{backend}/{dtype}", "warm_s": warm, "first_call_s": first_s,
                       "fits_per_s": n_vox / warm, "status_counts": dict(counts)})
    assert counts.get("converged", 0) >= 0.99 * n_vox, counts
