"""Evenly spaced Look-Locker readouts: one exponential per train, the rest by recurrence.

The kernels advance the decay F = exp(-tau * rate) of an evenly spaced readout train by
one multiplication per readout (re-anchored with an exponential every
``EVEN_REANCHOR`` readouts).  The oracle is the same fit with the recurrence switched
off (an exponential per readout, ``even_spacing`` made to find nothing).
"""

from __future__ import annotations

import numpy as np
import pytest

import aslcal.kernels.lm as lm
from aslcal import fit_satrecov
from aslcal.fitting import satrecov as fit_module
from aslcal.fitting.design import make_design


def test_even_spacing_finds_trains():
    train = 0.1 + 0.3 * np.arange(12)
    assert lm.even_spacing(train) == pytest.approx((0.3, 12))
    assert lm.even_spacing(np.tile(train, 3))[1] == 12  # three high-flip-angle phases
    assert lm.even_spacing(np.concatenate([train, train + 0.05]))[1] == 12  # trains may start anywhere
    assert lm.even_spacing(train[::-1])[0] == pytest.approx(-0.3)


@pytest.mark.parametrize("ti", [
    [0.5, 1.0, 2.0, 4.0, 8.0],                      # saturation-recovery times
    np.repeat(0.1 + 0.3 * np.arange(6), 2),          # repeated TIs
    [0.1, 0.4, 0.7, 1.0, 1.3, 1.61],                 # one readout off by 10 ms
    np.concatenate([0.1 + 0.3 * np.arange(6), 0.1 + 0.2 * np.arange(6)]),  # two spacings
    [1.0],
    [2.0, 2.0, 2.0],
])
def test_even_spacing_rejects_other_designs(ti):
    assert lm.even_spacing(np.asarray(ti, dtype=float)) is None


def _series(n_ro: int, nphases: int, dt: float, seed: int):
    """Noisy dual-flip-angle Look-Locker voxels (closed form of calibration.md section 7.1)."""
    rng = np.random.default_rng(seed)
    n = 400
    t1 = rng.uniform(0.6, 4.5, n)
    g = rng.uniform(0.85, 1.15, n)
    a = rng.uniform(0.85, 1.0, n)
    m0 = rng.uniform(800.0, 1500.0, n)
    ti = 0.1 + dt * np.arange(n_ro)

    def train(theta):
        c = np.cos(theta)
        e = np.exp(-dt / t1)
        r = (1 - e) / (1 - c * e)
        rate = 1 / t1 - np.log(c) / dt
        k = r[:, None] + (1 - a * np.exp(-ti[0] / t1) - r)[:, None] * np.exp(-(ti - ti[0])[None, :] * rate[:, None])
        return m0[:, None] * np.sin(theta)[:, None] * k

    high = train(np.radians(35.0 * g))
    low = train(np.radians(11.7 * (g + 0.023)))
    y = np.concatenate([high] * nphases + [low], axis=1)
    return y + rng.normal(0, 5.0, y.shape), ti


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-6), ("float32", 2e-3)])
@pytest.mark.parametrize("n_ro, nphases, dt", [(12, 3, 0.3), (40, 1, 0.1)])  # 40: re-anchored twice
def test_recurrence_equals_an_exponential_per_readout(fast_backend, monkeypatch, n_ro, nphases, dt, dtype, rtol):
    # rtol: both paths stop at the same minimum within the LM stopping rule (relative
    # step < 1e-8 in float64, 1e-5 in float32), which the conditioning of slow T1 (up to
    # 4.5 s, noisy data) amplifies; the recurrence itself adds < 16 ulp to F.
    y, ti = _series(n_ro, nphases, dt, seed=n_ro)
    kw = dict(fa=35.0, lfa=11.7, nphases=nphases, backend=fast_backend, dtype=dtype)
    fast = fit_satrecov(y, ti, **kw)
    monkeypatch.setattr(fit_module.lm, "even_spacing", lambda ti: None)
    slow = fit_satrecov(y, ti, **kw)
    ok = (np.asarray(fast.status) == 0) & (np.asarray(slow.status) == 0)
    assert ok.mean() > 0.98
    for name in ("m0t", "t1t", "a", "g"):
        a, b = np.asarray(getattr(fast, name))[ok], np.asarray(getattr(slow, name))[ok]
        worst = np.max(np.abs(a - b) / np.abs(b))
        print(f"{dtype} {n_ro}x{nphases + 1} {name}: worst relative difference {worst:.2e}")
        assert worst <= rtol, name


def test_kernel_parameters_mark_look_locker_trains():
    fpar, ipar = fit_module._pack_params(
        make_design(48, 0.1 + 0.3 * np.arange(12), fa=35.0, lfa=11.7, nphases=3),
        np.dtype("float64"), 1e-8, 100, 10,
    )
    assert list(ipar[lm.I_EVEN:lm.I_EVEN + 2]) == [12, 12]
    assert fpar[lm.F_STEP:lm.F_STEP + 2] == pytest.approx([0.3, 0.3])
