"""Recovery of the true T1, M0t and g from simulated acquisitions.

Noise-free: the Look-Locker experiment is simulated readout by readout (calibration.md
§7.4: saturation at t = 0; before each readout signal = Mz sin(true angle), after it
Mz <- Mz cos(true angle); between readouts Mz relaxes to M0 with T1; true angles g FA and
(g + 0.023) LFA), both by the phantom generator :func:`aslcal.testing.phantoms.
look_locker_series` (pure-tissue voxels, pv = 1) and by a small simulator written here.
The fit (the closed form of §7.1) must recover T1, g and M0t = M0 sin(g FA) s to 1e-4.

Noisy: thousands of Gaussian-noise realisations (sigma = M0t / 50) of a few voxels, for
dual-flip-angle Look-Locker and saturation recovery: the mean estimate must match the
truth, and the reported standard error the empirical spread.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from aslcal import fit_satrecov
from aslcal.testing.phantoms import TISSUES, look_locker_series, make_phantom, satrecov_series

PARAMS = ("m0t", "t1t", "a", "g")
FA, LFA, TI1, DT, N_RO = 35.0, 11.7, 0.1, 0.3, 12
LL_TIS = np.round(TI1 + DT * np.arange(N_RO), 12)
LFA_OFFSET = 0.023  # calibration.md §7.1
# Noise-free recovery: the model is exact, so only the LM step tolerance (1e-8 relative
# in float64) and the conditioning of slow-recovering CSF (T1 4.3 s against a 3.4 s
# readout window) limit it: 1e-4 as required by calibration.md §7.4, with the achieved
# worst error printed.
NOISE_FREE_REL = 1e-4


def ll_readouts(m0, t1, a, g, *, low=False, fa=FA, lfa=LFA, ti1=TI1, dt=DT, n=N_RO):
    """One Look-Locker train of one voxel, readout by readout (vectorised over voxels)."""
    m0, t1, a, g = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (m0, t1, a, g)))
    th = np.radians((g + LFA_OFFSET) * lfa if low else g * fa)
    mz = m0 * (1.0 - a)
    t = 0.0
    out = []
    for k in range(n):
        tk = ti1 + k * dt
        mz = m0 - (m0 - mz) * np.exp(-(tk - t) / t1)
        t = tk
        out.append(mz * np.sin(th))
        mz = mz * np.cos(th)
    return np.stack(out, axis=-1)


def ll_dual_series(m0t, t1, a, g, nphases=3):
    """Volumes phase -> TI: nphases high-FA trains then the LFA train; M0 from M0t."""
    m0 = np.asarray(m0t) / np.sin(np.radians(np.asarray(g) * FA))
    high = ll_readouts(m0, t1, a, g)
    low = ll_readouts(m0, t1, a, g, low=True)
    return np.concatenate([high] * nphases + [low], axis=-1)


def _rel(x, ref):
    return np.abs(np.asarray(x, dtype=np.float64) / ref - 1.0)


# -- noise-free: the phantom -----------------------------------------------------------


@pytest.fixture(scope="module")
def phantom():
    """The default phantom (64 x 64 x 24, 3.4 x 3.4 x 5 mm): ~6,300 voxels of pure tissue."""
    return make_phantom(seed=3)


def _pure(ph):
    """tissue -> mask of its pure voxels (pv >= 0.999, which is pv == 1 on this grid)."""
    return {t: ph.pv[t] >= 0.999 for t in TISSUES}


def _ramp_field(ph, lo=0.85, hi=1.15):
    """A smooth transmit field g rising linearly along x over the pure-tissue voxels."""
    any_pure = np.logical_or.reduce(list(_pure(ph).values()))
    xs = np.nonzero(any_pure)[0]
    x = np.arange(ph.shape[0], dtype=np.float64)
    g1 = np.clip(lo + (hi - lo) * (x - xs.min()) / (xs.max() - xs.min()), lo, hi)
    return np.broadcast_to(g1[:, None, None], ph.shape).copy()


@pytest.mark.parametrize(
    "field, lfa, slicedt",
    [
        ("phantom", LFA, 0.0),  # the phantom's own smooth field, g in ~(0.89, 1.08) on pure voxels
        ("ramp", LFA, 0.0),  # g from 0.85 to 1.15 across the brain
        ("ramp", LFA, 0.04),  # and a 2-D multi-slice readout (TI1 + 0.04 s * z)
        ("uniform", None, 0.0),  # single flip angle: g = 1 is not fitted, so it must be true
    ],
    ids=["dual-fa-phantom-field", "dual-fa-ramp-field", "dual-fa-ramp-slicedt", "single-fa"],
)
def test_phantom_look_locker_noise_free(phantom, fast_backend, field, lfa, slicedt):
    ph = phantom
    if field == "ramp":
        ph = dataclasses.replace(ph, fa_scale=_ramp_field(ph))
    elif field == "uniform":
        ph = dataclasses.replace(ph, fa_scale=np.ones(ph.shape))
    z = np.arange(ph.shape[2])
    a_map = np.broadcast_to(0.9 + 0.08 * z / (ph.shape[2] - 1), ph.shape).copy()  # A varies by slice
    nphases = 3 if lfa else 2
    data, truth = look_locker_series(
        ph, ti1=TI1, dt=DT, n_ti=N_RO, fa=FA, lfa=lfa, nphases=nphases, a=a_map,
        slicedt=slicedt, snr=None, dtype=np.float64,
    )
    pure = _pure(ph)
    mask = np.logical_or.reduce(list(pure.values()))
    res = fit_satrecov(
        data, truth["tis"], mask=mask, fa=FA, lfa=lfa, nphases=nphases, slicedt=slicedt,
        backend=fast_backend, dtype="float64",
    )
    assert np.all(res.status[mask] == 0), res.status_counts()
    if field == "ramp":
        g_pure = truth["g"][mask]
        assert g_pure.min() <= 0.851 and g_pure.max() >= 1.149  # both extremes are fitted
    worst = {}
    for t in TISSUES:
        m = pure[t]
        if not m.any():
            continue
        errs = {
            "t1t": _rel(res.t1t[m], truth["t1"][t]),
            "m0t": _rel(res.m0t[m], truth["m0t"][t][m]),  # M0_t sin(g FA) s
            "a": _rel(res.a[m], truth["a"][m]),
            "g": _rel(res.g[m], truth["g"][m] if lfa else 1.0),
        }
        worst[t] = {k: float(v.max()) for k, v in errs.items()}
        for k, v in errs.items():
            assert v.max() <= NOISE_FREE_REL, (t, k, v.max())
    print(f"\n{field}/{'dual' if lfa else 'single'}-FA slicedt={slicedt}: worst relative errors {worst}")


def test_phantom_saturation_recovery_noise_free(phantom, fast_backend):
    tis = [0.2, 0.5, 0.8, 1.2, 1.7, 2.3, 3.0, 4.0, 5.0]
    data, truth = satrecov_series(phantom, tis, a=0.95, snr=None, dtype=np.float64)
    pure = _pure(phantom)
    mask = np.logical_or.reduce(list(pure.values()))
    res = fit_satrecov(data, tis, mask=mask, backend=fast_backend, dtype="float64")
    assert np.all(res.status[mask] == 0), res.status_counts()
    sens = phantom.sensitivity
    for t in TISSUES:
        m = pure[t]
        if m.any():
            assert _rel(res.t1t[m], truth["t1"][t]).max() <= NOISE_FREE_REL, t
            # plain SR: M0t = M0_t * s (no flip-angle factor)
            assert _rel(res.m0t[m], phantom.m0_tissue[t] * sens[m]).max() <= NOISE_FREE_REL, t
            assert _rel(res.a[m], 0.95).max() <= NOISE_FREE_REL, t


# -- noise-free: an independent small simulator, extreme flip-angle errors -------------


def test_own_simulation_dual_fa_extreme_g(fast_backend):
    t1 = np.array([0.8, 1.3, 1.9, 4.3, 0.8, 1.3, 1.9, 4.3])
    g = np.array([0.85] * 4 + [1.15] * 4)
    a = np.array([0.9, 1.0, 0.95, 0.85, 1.0, 0.92, 0.97, 0.88])
    m0t = np.array([900.0, 1000.0, 1100.0, 1500.0, 800.0, 950.0, 1050.0, 1400.0])
    y = ll_dual_series(m0t, t1, a, g)
    res = fit_satrecov(y, LL_TIS, fa=FA, lfa=LFA, nphases=3, backend=fast_backend, dtype="float64")
    assert np.all(res.status == 0)
    for name, tr in (("t1t", t1), ("m0t", m0t), ("a", a), ("g", g)):
        assert _rel(getattr(res, name), tr).max() <= NOISE_FREE_REL, name


# -- noisy: bias and standard errors ---------------------------------------------------


N_REAL = 8000  # realisations per voxel: the SD of an SD estimate is 1/sqrt(2 N) = 0.8 %
SNR = 50.0
NOISY_T1 = np.array([0.8, 1.1, 1.5, 2.0])
NOISY_G = np.array([0.88, 1.0, 1.05, 1.12])
NOISY_A = 0.95
SR_TIS = np.linspace(0.2, 4.0, 8)
SR_REPEATS = 2


def _box_bias(model, p, free, sigma):
    """Second-order bias of least squares (Box 1971): b = -σ²/2 (JᵀJ)⁻¹ Jᵀ d,
    d_i = tr((JᵀJ)⁻¹ H_i), from central finite differences of ``model``.
    Returns the bias of every parameter (0 for fixed ones)."""
    p = np.asarray(p, dtype=np.float64)
    idx = np.flatnonzero(free)
    h = 1e-4 * np.abs(p)
    e = np.eye(p.size)

    def f(q):
        return model(q)

    jac = np.stack([(f(p + h[i] * e[i]) - f(p - h[i] * e[i])) / (2 * h[i]) for i in idx], axis=1)
    hess = np.empty((jac.shape[0], idx.size, idx.size))
    for a_, i in enumerate(idx):
        for b_, j in enumerate(idx):
            di, dj = h[i] * e[i], h[j] * e[j]
            hess[:, a_, b_] = (f(p + di + dj) - f(p + di - dj) - f(p - di + dj) + f(p - di - dj)) / (4 * h[i] * h[j])
    cov = np.linalg.inv(jac.T @ jac)
    d = np.einsum("ab,iab->i", cov, hess)
    out = np.zeros(p.size)
    out[idx] = -0.5 * sigma**2 * cov @ jac.T @ d
    return out


def _ll_model(q):
    m0t, t1, a, g = q
    return ll_dual_series(m0t, t1, a, g)


def _sr_model(q):
    m0, t1, a, _ = q
    return np.repeat(m0 * (1.0 - a * np.exp(-SR_TIS / t1)), SR_REPEATS)


@pytest.mark.parametrize("design", ["ll-dual", "sr"])
def test_noisy_bias_and_standard_errors(design, fast_backend, rng):
    n_vox = NOISY_T1.size
    if design == "ll-dual":
        m0t = 1000.0 * np.sin(np.radians(NOISY_G * FA))  # M0 = 1000
        g = NOISY_G
        truth = np.stack([m0t, NOISY_T1, np.full(n_vox, NOISY_A), g], axis=1)
        clean = np.stack([_ll_model(p) for p in truth])
        tis, kw, model, free = LL_TIS, {"fa": FA, "lfa": LFA, "nphases": 3}, _ll_model, [1, 1, 1, 1]
    else:
        truth = np.stack([np.full(n_vox, 1000.0), NOISY_T1, np.full(n_vox, NOISY_A), np.ones(n_vox)], axis=1)
        clean = np.stack([_sr_model(p) for p in truth])
        tis, kw, model, free = SR_TIS, {"repeats": SR_REPEATS}, _sr_model, [1, 1, 1, 0]
    sigma = truth[:, 0] / SNR  # SNR 50 relative to M0t
    y = clean[None] + rng.standard_normal((N_REAL,) + clean.shape) * sigma[None, :, None]
    res = fit_satrecov(y, tis, backend=fast_backend, dtype="float64", **kw)  # (N_REAL, n_vox) maps
    assert np.all(res.status == 0), res.status_counts()

    checked = ("m0t", "t1t", "a", "g") if design == "ll-dual" else ("m0t", "t1t", "a")
    lines = []
    for v in range(n_vox):
        box = _box_bias(model, truth[v], free, sigma[v])
        for name in checked:
            j = PARAMS.index(name)
            est = getattr(res, name)[:, v]
            se = getattr(res, name + "_se")[:, v]
            tr = truth[v, j]
            mean, sd = est.mean(), est.std(ddof=1)
            sem = sd / math.sqrt(N_REAL)
            bias = mean / tr - 1
            ratio = float(np.median(se)) / sd
            lines.append(
                f"  {design} T1={NOISY_T1[v]:.1f} {name:<4} bias {100 * bias:+.3f} % "
                f"(Box 2nd order {100 * box[j] / tr:+.3f} %, MC s.e. {100 * sem / tr:.3f} %)  "
                f"median SE / SD {ratio:.3f}"
            )
            # Unbiasedness within 1 % (of the expectation, so the Monte-Carlo mean gets 3
            # standard errors on top): holds for T1 <= 1.5 s.  At T1 = 2 s (A free) the
            # least-squares estimator itself is biased by ~1.5 % (T1) and ~0.9 % (M0t)
            # at SNR 50 (the SciPy oracle gives the same mean: an O(σ²) effect, not an
            # implementation error), so there the 1 % applies after removing Box's
            # second-order bias, an independent prediction from the model alone.
            if NOISY_T1[v] <= 1.5:
                assert abs(mean - tr) <= 0.01 * abs(tr) + 3 * sem, lines[-1]
            assert abs(mean - tr - box[j]) <= 0.01 * abs(tr), lines[-1]
            # and the mean agrees with Box's prediction to within its neglected O(σ⁴)
            # terms (taken as 25 % of the O(σ²) term) plus 4 Monte-Carlo standard errors
            assert abs(mean - tr - box[j]) <= 0.25 * abs(box[j]) + 4 * sem, lines[-1]
            # Reported standard error vs the empirical spread: within 15 %.  (With
            # few degrees of freedom the median of σ̂ is below σ: for SR with 16
            # volumes and 3 parameters median sqrt(χ²₁₃/13) = 0.974.)
            assert abs(ratio - 1) <= 0.15, lines[-1]
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("design", ["ll-dual", "sr"])
def test_noisy_mean_within_one_percent_at_snr50_of_the_series(design, fast_backend, rng):
    """The acceptance criterion literally: mean error within 1 % for T1 in [0.8, 2] s at
    SNR 50, with SNR defined as the mean signal of the series over sigma (the usual
    definition for a measured series).  The stricter sigma = M0t/50 above puts the
    Look-Locker samples, which sit near the steady state r·M0t, at an SNR of ~12."""
    n_vox = NOISY_T1.size
    if design == "ll-dual":
        m0t = 1000.0 * np.sin(np.radians(NOISY_G * FA))
        truth = np.stack([m0t, NOISY_T1, np.full(n_vox, NOISY_A), NOISY_G], axis=1)
        clean = np.stack([_ll_model(p) for p in truth])
        tis, kw = LL_TIS, {"fa": FA, "lfa": LFA, "nphases": 3}
    else:
        truth = np.stack([np.full(n_vox, 1000.0), NOISY_T1, np.full(n_vox, NOISY_A), np.ones(n_vox)], axis=1)
        clean = np.stack([_sr_model(p) for p in truth])
        tis, kw = SR_TIS, {"repeats": SR_REPEATS}
    sigma = clean.mean(axis=1) / SNR
    y = clean[None] + rng.standard_normal((2000,) + clean.shape) * sigma[None, :, None]
    res = fit_satrecov(y, tis, backend=fast_backend, dtype="float64", **kw)
    assert np.all(res.status == 0), res.status_counts()
    for name in ("t1t", "m0t") + (("g",) if design == "ll-dual" else ()):
        j = PARAMS.index(name)
        mean = getattr(res, name).mean(axis=0)
        err = np.abs(mean / truth[:, j] - 1)
        # measured: <= 0.3 % for T1, <= 0.15 % for M0t and g at every T1 in [0.8, 2] s
        assert np.all(err < 0.01), (name, err)
