"""The public API of :func:`aslcal.fit_satrecov`: shapes, masks, volume order, slice
timing, dtypes, the fabber form and the scoped configuration.

Truth comes from signals written here independently of the package: plain saturation
recovery S = M0 (1 - A exp(-TI/T1)), and a Look-Locker experiment simulated readout by
readout (calibration.md §7.1/§7.4: saturation at t = 0 leaves M0 (1 - A); before each
readout the signal is Mz sin(θ), after it Mz <- Mz cos(θ); between readouts Mz relaxes
to M0 with T1; θ = g FA, or (g + 0.023) LFA for the low-flip-angle phase), so the fitted
M0t is M0 sin(g FA).  On noise-free data the exact minimum is the truth; float64 fits
stop on relative steps of 1e-8, so 1e-6 relative is used throughout with margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import aslcal
from aslcal import config_context, fit_satrecov
from aslcal.fitting import make_design
from aslcal.errors import InputError
from aslcal.fitting.reference import reference_signal

PARAMS = ("m0t", "t1t", "a", "g")
MAPS = PARAMS + tuple(p + "_se" for p in PARAMS) + ("rss", "n_iter", "status")
LFA_OFFSET = 0.023  # fabber's empirical offset, calibration.md §7.1
EXACT = 1e-6  # noise-free float64 recovery (LM step tolerance 1e-8, with margin)

SR_TIS = np.array([0.2, 0.5, 0.8, 1.2, 1.7, 2.3, 3.0, 4.0])
TI1, DT, N_RO = 0.1, 0.3, 12
LL_TIS = np.round(TI1 + DT * np.arange(N_RO), 6)
FA, LFA = 35.0, 11.7


def sr_signal(m0, t1, a, tis, shift=0.0):
    return m0 * (1.0 - a * np.exp(-(np.asarray(tis, dtype=np.float64) + shift) / t1))


def ll_readouts(m0, t1, a, g, *, low=False, shift=0.0, fa=FA, lfa=LFA, ti1=TI1, dt=DT, n=N_RO):
    """One Look-Locker train simulated readout by readout (readouts at ti1 + shift + k dt)."""
    th = math.radians((g + LFA_OFFSET) * lfa if low else g * fa)
    mz, t, out = m0 * (1.0 - a), 0.0, []
    for k in range(n):
        tk = ti1 + shift + k * dt
        mz = m0 - (m0 - mz) * math.exp(-(tk - t) / t1)
        t = tk
        out.append(mz * math.sin(th))
        mz *= math.cos(th)
    return np.array(out)


def m0t_of(m0, g, fa=FA):
    return m0 * math.sin(math.radians(g * fa))


def _assert_truth(res, idx, truth, *, rel=EXACT, fit_g=True, what=""):
    """truth = (m0t, t1, a, g); idx indexes the result maps."""
    assert res.status[idx] == 0, (what, int(res.status[idx]))
    for j, p in enumerate(PARAMS):
        if p == "g" and not fit_g:
            assert getattr(res, p)[idx] == 1.0
            continue
        assert getattr(res, p)[idx] == pytest.approx(truth[j], rel=rel), (what, p)


# -- shapes and masks -------------------------------------------------------------------


def test_4d_input_with_mask_and_2d_input(rng):
    shape = (3, 4, 2)
    t1 = rng.uniform(0.7, 2.5, shape)
    a = rng.uniform(0.85, 1.0, shape)
    m0 = rng.uniform(500.0, 1500.0, shape)
    data = np.empty(shape + (SR_TIS.size,))
    for idx in np.ndindex(shape):
        data[idx] = sr_signal(m0[idx], t1[idx], a[idx], SR_TIS)
    mask = rng.random(shape) < 0.5
    mask[0, 0, 0], mask[2, 3, 1] = True, False  # both kinds present
    res = fit_satrecov(data, SR_TIS, mask=mask, backend="numba")

    assert res.n_fitted == int(mask.sum())
    for name in MAPS:
        m = getattr(res, name)
        assert isinstance(m, np.ndarray) and m.shape == shape, name
    # out of mask: status 4 "out of mask", every other map 0
    assert np.all(res.status[~mask] == 4)
    for name in MAPS[:-1]:
        assert np.all(getattr(res, name)[~mask] == 0), name
    assert res.status_counts() == {"converged": int(mask.sum()), "out of mask": int((~mask).sum())}
    for idx in zip(*np.nonzero(mask)):
        _assert_truth(res, idx, (m0[idx], t1[idx], a[idx], 1.0), fit_g=False, what=idx)

    # the same voxels as a 2-D (n_vox, n_vol) array: the same fits, bit for bit (the 4-D
    # path packs exactly these columns), and maps of shape (n_vox,)
    flat = fit_satrecov(data[mask], SR_TIS, backend="numba")
    for name in MAPS:
        assert getattr(flat, name).shape == (int(mask.sum()),)
        np.testing.assert_array_equal(getattr(flat, name), getattr(res, name)[mask], err_msg=name)
    assert flat.params.keys() == set(PARAMS) and flat.std_errors.keys() == set(PARAMS)


def test_mask_accepts_non_bool_values(rng):
    data = np.stack([sr_signal(1000.0, 1.2, 0.95, SR_TIS)] * 6).reshape(2, 3, -1)
    mask = np.array([[1, 0, 2], [0, 0, 1]])  # nonzero = inside
    res = fit_satrecov(data, SR_TIS, mask=mask, backend="numba")
    np.testing.assert_array_equal(res.status, np.where(mask != 0, 0, 4))


# -- volume order ---------------------------------------------------------------------


def _dual_fa_series(m0, t1, a, g, *, nphases, repeats):
    """Volumes in the documented order: phase (slowest; LFA last) -> TI -> repeat.

    Repeats carry a tiny deterministic offset so that a TI/repeat mix-up changes the data
    the fit sees (noise-free repeats would be identical).
    """
    vols = []
    for low in [False] * nphases + [True]:
        train = ll_readouts(m0, t1, a, g, low=low)
        for s in train:
            for r in range(repeats):
                vols.append(s * (1.0 + 1e-9 * (r - (repeats - 1) / 2)))
    return np.array(vols)


TRUE_LL = [(1000.0, 1.3, 0.95, 0.9), (900.0, 0.85, 0.92, 1.1), (1100.0, 2.2, 1.0, 1.02)]


def _truth_ll(p):
    m0, t1, a, g = p
    return (m0t_of(m0, g), t1, a, g)


def test_unique_tis_with_repeats_follow_phase_ti_repeat_order():
    nph, rep = 2, 3
    data = np.stack([_dual_fa_series(*p, nphases=nph, repeats=rep) for p in TRUE_LL])
    assert data.shape == (3, (nph + 1) * N_RO * rep)
    res = fit_satrecov(data, LL_TIS.tolist(), repeats=rep, nphases=nph, fa=FA, lfa=LFA, backend="numba")
    for i, p in enumerate(TRUE_LL):
        # the 1e-9 repeat offsets average out to < 1e-9 in the parameters
        _assert_truth(res, i, _truth_ll(p), what=f"voxel {i}")

    # The test can tell orders apart: the same volumes in TI-fastest order (repeat ->
    # TI) or with the LFA phase first are NOT the truth.
    by_phase = data.reshape(3, nph + 1, N_RO, rep)
    wrong_inner = by_phase.transpose(0, 1, 3, 2).reshape(3, -1)
    wrong_phase = np.roll(by_phase, 1, axis=1).reshape(3, -1)
    for wrong in (wrong_inner, wrong_phase):
        bad = fit_satrecov(wrong, LL_TIS.tolist(), repeats=rep, nphases=nph, fa=FA, lfa=LFA, backend="numba")
        t1_err = np.abs(bad.t1t / np.array([p[1] for p in TRUE_LL]) - 1)
        assert t1_err.max() > 1e-2


def test_one_ti_per_volume_in_any_order_gives_the_same_fit(rng):
    nph, rep = 2, 3
    data = np.stack([_dual_fa_series(*p, nphases=nph, repeats=rep) for p in TRUE_LL])
    ref = fit_satrecov(data, LL_TIS.tolist(), repeats=rep, nphases=nph, fa=FA, lfa=LFA, backend="numba")
    ti_vol = np.tile(np.repeat(LL_TIS, rep), nph + 1)
    # shuffle within the high-flip-angle phases and within the LFA phase (which must be
    # the last 1/(nphases+1) of the volumes, as documented)
    n_high = nph * N_RO * rep
    perm = np.concatenate([rng.permutation(n_high), n_high + rng.permutation(N_RO * rep)])
    res = fit_satrecov(data[:, perm], ti_vol[perm], nphases=nph, fa=FA, lfa=LFA, backend="numba")
    assert np.array_equal(res.design.low, np.repeat([0, 1], [n_high, N_RO * rep]))
    for i, p in enumerate(TRUE_LL):
        _assert_truth(res, i, _truth_ll(p), what=f"voxel {i}")
    # vs the unique-TI call: identical problem, only the summation order differs, so the
    # minimisers agree to the solver tolerance (1e-8 relative steps) -> 1e-7
    for name in PARAMS + ("t1t_se", "m0t_se", "g_se"):
        np.testing.assert_allclose(getattr(res, name), getattr(ref, name), rtol=1e-7, err_msg=name)


def test_one_ti_per_volume_with_variable_repeats_sr(rng):
    counts = np.array([1, 3, 2, 1, 4, 1, 2, 2])  # repeats per TI
    ti_vol = np.repeat(SR_TIS, counts)
    perm = rng.permutation(ti_vol.size)
    truth = [(1000.0, 1.1, 0.97), (700.0, 2.0, 0.9)]
    data = np.stack([sr_signal(*p, ti_vol[perm]) for p in truth])
    res = fit_satrecov(data, ti_vol[perm], backend="numba")
    assert res.design.n_obs == ti_vol.size and res.design.n_distinct == SR_TIS.size
    for i, p in enumerate(truth):
        _assert_truth(res, i, p + (1.0,), fit_g=False, what=i)


def test_one_ti_per_volume_look_locker_phases_of_unequal_size_are_refused():
    """The volumes split into equal phases (the LFA one last): a high phase of 12 readouts
    and an LFA phase of 12 readouts x 2 repeats (36 volumes) would put 6 LFA volumes in
    the high phase and fit them with the wrong flip angle (measured before the check:
    T1 2.5 s for 1.3 s, status converged)."""
    p = (1000.0, 1.3, 1.0, 1.1)
    data = np.concatenate([ll_readouts(*p), np.repeat(ll_readouts(*p, low=True), 2)])[None]
    ti_vol = np.concatenate([LL_TIS, np.repeat(LL_TIS, 2)])
    with pytest.raises(InputError, match=r"\[12, 24\] volumes.*one size"):
        fit_satrecov(data, ti_vol, fa=FA, lfa=LFA, backend="numba")
    # the same phases of one size are fitted exactly
    data = np.concatenate([np.repeat(ll_readouts(*p), 2), np.repeat(ll_readouts(*p, low=True), 2)])[None]
    res = fit_satrecov(data, np.tile(np.repeat(LL_TIS, 2), 2), fa=FA, lfa=LFA, backend="numba")
    _assert_truth(res, 0, _truth_ll(p))


def test_one_ti_per_volume_high_phases_starting_at_different_times_are_refused():
    """Every high-flip-angle train is modelled from one first readout; trains listed as
    starting at 0.1, 0.4 and 0.7 s were fitted from 0.1 s (T1 +8.5 %, silently)."""
    p = (1000.0, 1.3, 1.0, 1.1)
    starts = (0.1, 0.4, 0.7)
    data = np.concatenate([ll_readouts(*p, ti1=t) for t in starts] + [ll_readouts(*p, low=True)])[None]
    ti_vol = np.concatenate([t + DT * np.arange(N_RO) for t in starts] + [LL_TIS])
    with pytest.raises(InputError, match=r"start at different times \[0.1, 0.4, 0.7\]"):
        fit_satrecov(data, ti_vol, nphases=3, fa=FA, lfa=LFA, dt=DT, backend="numba")


def test_one_ti_per_volume_equal_tis_computed_two_ways_are_one_ti():
    """0.1 + 0.3k computed in floating point and the same TIs as written in a sidecar
    differ by 1 ulp: the readout spacing is still inferred as 0.3 s (it was refused with
    spacings of 1e-16 s)."""
    p = (1000.0, 1.3, 1.0, 1.0)
    computed = 0.1 + 0.3 * np.arange(N_RO)
    assert np.any(computed != np.round(computed, 6))
    data = np.tile(ll_readouts(*p), 2)[None]
    res = fit_satrecov(data, np.concatenate([computed, np.round(computed, 6)]), nphases=2, fa=FA, backend="numba")
    assert res.design.dt == pytest.approx(DT, rel=1e-12)
    _assert_truth(res, 0, (m0t_of(1000.0, 1.0), 1.3, 1.0, 1.0), fit_g=False)


def test_flip_angle_just_below_90_without_lfa_says_why():
    with pytest.raises(InputError, match=r"fa=89.95 deg.*below 89.9 deg"):
        make_design(N_RO, LL_TIS, fa=89.95)


# -- slice timing ---------------------------------------------------------------------


SLICEDT = 0.045  # s per slice


def _slice_image(kind, shifts):
    """(2, 2, n_slices, n_vol) noise-free data; voxel (x, y, z) has its own tissue and
    every readout of slice z is delayed by shifts[z]."""
    n_sl = len(shifts)
    r = np.random.default_rng(7)
    t1 = r.uniform(0.8, 2.0, (2, 2, n_sl))
    a = r.uniform(0.88, 1.0, (2, 2, n_sl))
    m0 = r.uniform(800.0, 1200.0, (2, 2, n_sl))
    g = r.uniform(0.88, 1.12, (2, 2, n_sl))
    vols = []
    truth = np.empty((2, 2, n_sl, 4))
    for idx in np.ndindex(2, 2, n_sl):
        s = shifts[idx[2]]
        if kind == "sr":
            vols.append(sr_signal(m0[idx], t1[idx], a[idx], SR_TIS, shift=s))
            truth[idx] = (m0[idx], t1[idx], a[idx], 1.0)
        else:
            p = (m0[idx], t1[idx], a[idx], g[idx])
            vols.append(np.concatenate([ll_readouts(*p, shift=s), ll_readouts(*p, low=True, shift=s)]))
            truth[idx] = _truth_ll(p)
    return np.array(vols).reshape(2, 2, n_sl, -1), truth


KINDS = {
    "sr": (SR_TIS, {}),
    "ll-dual": (LL_TIS, {"fa": FA, "lfa": LFA, "nphases": 1}),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("sliceband", [1, 3])
def test_slicedt_shifts_tis_per_slice(kind, sliceband):
    tis, kw = KINDS[kind]
    n_sl = 6
    z = np.arange(n_sl)
    # calibration.md §7.1: TI(z) = TI + slicedt * (z mod sliceband) if sliceband > 1,
    # else TI + slicedt * z
    shifts = SLICEDT * (z % sliceband if sliceband > 1 else z)
    data, truth = _slice_image(kind, shifts)
    res = fit_satrecov(data, tis, slicedt=SLICEDT, sliceband=sliceband, backend="numba", **kw)
    for idx in np.ndindex(2, 2, n_sl):
        _assert_truth(res, idx, truth[idx], fit_g=kind != "sr", what=idx)

    # The shift matters.  A delay s of every readout multiplies the saturation term by
    # exp(-s/T1) in both models (SR: 1 - A e^{-(TI+s)/T1}; Look-Locker: the first-readout
    # offset 1 - A e^{-(TI1+s)/T1}), so a fit that assumes a shift s' instead is still
    # exact but returns A' = A exp(-(s - s')/T1) with the other parameters unchanged.
    # Ignoring slicedt, or applying the other slice rule, must show exactly that.
    other = 1 if sliceband > 1 else 3
    other_shifts = SLICEDT * (z % other if other > 1 else z)
    for wrong, assumed in (
        (fit_satrecov(data, tis, backend="numba", **kw), 0.0 * z),
        (fit_satrecov(data, tis, slicedt=SLICEDT, sliceband=other, backend="numba", **kw), other_shifts),
    ):
        a_expected = truth[..., 2] * np.exp(-(shifts - assumed) / truth[..., 1])
        np.testing.assert_allclose(wrong.a, a_expected, rtol=EXACT)
        np.testing.assert_allclose(wrong.t1t, truth[..., 1], rtol=EXACT)
        np.testing.assert_allclose(wrong.m0t, truth[..., 0], rtol=EXACT)
        differs = ~np.isclose(assumed, shifts, rtol=0, atol=1e-12)
        assert differs.any()
        # the A of those slices is off by exp(-|Δs|/T1) - 1: >= 2 % here (|Δs| >= 45 ms)
        assert np.all(np.abs(wrong.a / truth[..., 2] - 1)[:, :, differs] > 1e-2)


def test_slicedt_needs_a_slice_axis():
    with pytest.raises(aslcal.InputError, match="slicedt"):
        fit_satrecov(np.ones((4, SR_TIS.size)), SR_TIS, slicedt=0.05, backend="numba")


# -- dtype and array types -------------------------------------------------------------


def _noisy_sr(rng, n):
    t1 = rng.uniform(0.8, 2.5, n)
    a = rng.uniform(0.88, 1.0, n)
    m0 = rng.uniform(800.0, 1200.0, n)
    y = np.stack([sr_signal(m0[i], t1[i], a[i], np.repeat(SR_TIS, 2)) for i in range(n)])
    return y + rng.normal(0.0, 20.0, y.shape)


@pytest.mark.parametrize("backend_", ["numba", "numpy"])
def test_float32_and_float64(rng, backend_):
    y = _noisy_sr(rng, 64 if backend_ == "numba" else 12)
    r64 = fit_satrecov(y, SR_TIS, repeats=2, backend=backend_, dtype="float64")
    r32 = fit_satrecov(y, SR_TIS, repeats=2, backend=backend_, dtype=np.float32)
    assert (r64.dtype, r32.dtype) == ("float64", "float32")
    assert r64.backend == r32.backend == backend_
    for name in PARAMS + tuple(p + "_se" for p in PARAMS) + ("rss",):
        assert getattr(r64, name).dtype == np.float64 and getattr(r32, name).dtype == np.float32, name
    for name in ("n_iter", "status"):
        assert getattr(r64, name).dtype == np.int32 and getattr(r32, name).dtype == np.int32
    assert np.all(r64.status == 0) and np.all(r32.status == 0)
    # float32: eps 1.2e-7 and a 1e-5 relative step tolerance; T1 <= 2.5 s inside a 4 s
    # window is well conditioned, so 1e-3 (the float32 parity target) holds for all voxels
    for p in ("m0t", "t1t", "a"):
        np.testing.assert_allclose(getattr(r32, p), getattr(r64, p), rtol=1e-3, err_msg=p)
    # standard errors: float32 Cholesky of JᵀJ, 1e-2
    for p in ("m0t_se", "t1t_se", "a_se"):
        np.testing.assert_allclose(getattr(r32, p), getattr(r64, p), rtol=1e-2, err_msg=p)
    # float32 input is computed in the requested float64
    r = fit_satrecov(y.astype(np.float32), SR_TIS, repeats=2, backend=backend_, dtype="float64")
    assert r.dtype == "float64" and r.t1t.dtype == np.float64


def test_default_dtype_on_cpu_is_float64():
    y = np.stack([sr_signal(1000.0, 1.2, 0.95, SR_TIS)])
    assert fit_satrecov(y, SR_TIS, backend="numba").dtype == "float64"
    assert fit_satrecov(y.astype(np.float32), SR_TIS, backend="numba").dtype == "float64"


def test_numpy_in_numpy_out():
    truth = (1000.0, 1.2, 0.95)
    y = [sr_signal(*truth, SR_TIS).tolist()] * 2  # nested lists are accepted too
    for data in (np.array(y), y):
        res = fit_satrecov(data, SR_TIS.tolist(), backend="numba")
        for name in MAPS:
            assert type(getattr(res, name)) is np.ndarray, name
        assert isinstance(res.status_counts(), dict)
        assert set(res.timings) >= {"fit", "total"} and res.timings["total"] >= res.timings["fit"] >= 0
        _assert_truth(res, 0, truth + (1.0,), fit_g=False)


# -- the fabber form -------------------------------------------------------------------


@pytest.mark.parametrize("nphases, lfa", [(2, None), (3, LFA)], ids=["single-fa", "dual-fa"])
def test_fabber_model_recovers_fabber_form_truth(nphases, lfa):
    n_vol = N_RO * (nphases + (1 if lfa else 0))
    design = make_design(n_vol, LL_TIS, fa=FA, lfa=lfa, nphases=nphases, model="fabber")
    truth = [(1000.0, 1.3, 0.9, 0.92), (800.0, 0.9, 0.95, 1.08), (1200.0, 2.4, 1.0, 1.0)]
    if lfa is None:
        truth = [t[:3] + (1.0,) for t in truth]
    y = np.stack([reference_signal(p, design) for p in truth])
    res = fit_satrecov(y, LL_TIS, fa=FA, lfa=lfa, nphases=nphases, model="fabber", backend="numba")
    assert res.design.as_dict()["model"] == "look-locker (fabber form)"
    for i, p in enumerate(truth):
        _assert_truth(res, i, p, fit_g=lfa is not None, what=i)
    if lfa is not None:
        # and the exact model does not fit fabber-form multi-angle data exactly
        # (calibration.md §7.1: the two differ when phases have different angles)
        exact = fit_satrecov(y, LL_TIS, fa=FA, lfa=lfa, nphases=nphases, backend="numba")
        assert np.max(np.abs(exact.g / np.array([p[3] for p in truth]) - 1)) > 1e-4


def test_unknown_model_is_an_input_error():
    with pytest.raises(aslcal.InputError, match="model"):
        fit_satrecov(np.ones((1, 12)), LL_TIS, fa=FA, model="vb")


# -- scoped configuration ------------------------------------------------------------


def test_config_context_is_honoured_when_not_passed():
    truth = (1000.0, 1.2, 0.95)
    y = np.stack([sr_signal(*truth, SR_TIS)] * 3)
    with config_context(backend="auto", dtype="auto"):  # independent of ASLCAL_* variables
        with config_context(backend="numpy", dtype="float32"):
            res = fit_satrecov(y, SR_TIS)
            assert (res.backend, res.dtype) == ("numpy", "float32")
            assert res.t1t.dtype == np.float32
            # float32 noise-free: 1e-4 (eps 1.2e-7, step tolerance 1e-5)
            _assert_truth(res, 0, truth + (1.0,), rel=1e-4, fit_g=False)
            # explicit arguments win over the context
            res = fit_satrecov(y, SR_TIS, backend="numba", dtype="float64")
            assert (res.backend, res.dtype) == ("numba", "float64")
            with config_context(backend="numba"):  # nested: inner backend, outer dtype
                res = fit_satrecov(y, SR_TIS)
                assert (res.backend, res.dtype) == ("numba", "float32")
        # restored on exit: auto -> numba for a 3-voxel host problem (a GPU is used only
        # from AUTO_CUDA_MIN_VOXELS on), float64 on the CPU
        assert aslcal.get_config()["backend"] == "auto"
        res = fit_satrecov(y, SR_TIS)
        assert (res.backend, res.dtype) == ("numba", "float64")


def test_ti_shift_equals_the_per_slice_delay(fast_backend):
    """ti_shift (any per-voxel delay) gives what slicedt gives for the same delays."""
    from aslcal import fit_satrecov
    from aslcal.testing.phantoms import make_phantom, satrecov_series

    ph = make_phantom(shape=(24, 24, 8), seed=4)
    tis = [0.3, 0.6, 1.2, 2.4, 4.8]
    data, _ = satrecov_series(ph, tis, slicedt=0.07)
    mask = ph.brain_mask
    by_slice = fit_satrecov(data, tis, mask=mask, slicedt=0.07, fix_a=True, backend=fast_backend, dtype="float64")
    delays = np.broadcast_to(0.07 * np.arange(8), mask.shape)
    by_voxel = fit_satrecov(data, tis, mask=mask, ti_shift=delays, fix_a=True, backend=fast_backend, dtype="float64")
    for name in ("m0t", "t1t", "a", "status"):
        np.testing.assert_array_equal(np.asarray(getattr(by_voxel, name)), np.asarray(getattr(by_slice, name)))
    # packed 2-D data (n_vox, n_obs) with the voxels' delays
    packed = fit_satrecov(data[mask], tis, ti_shift=delays[mask], fix_a=True, backend=fast_backend, dtype="float64")
    np.testing.assert_array_equal(np.asarray(packed.t1t), np.asarray(by_slice.t1t)[mask])


def test_ti_shift_bad_input():
    from aslcal import fit_satrecov

    data = np.ones((4, 5, 3))
    with pytest.raises(InputError, match="ti_shift shape"):
        fit_satrecov(data, [0.5, 1, 2], ti_shift=np.zeros(4))
    with pytest.raises(InputError, match="finite"):
        fit_satrecov(data, [0.5, 1, 2], ti_shift=np.full((4, 5), np.nan))
    with pytest.raises(InputError, match="not both"):
        fit_satrecov(np.ones((4, 5, 2, 3)), [0.5, 1, 2], ti_shift=np.zeros((4, 5, 2)), slicedt=0.05)


def test_tis_in_milliseconds_warn():
    """TIs are seconds: 3400 'seconds' is a TI given in milliseconds (a silent 3x wrong M0
    otherwise); realistic TIs do not warn."""
    with pytest.warns(UserWarning, match="3400 s looks like milliseconds"):
        make_design(3, [100.0, 1000.0, 3400.0])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_design(5, [0.1, 1.0, 3.4, 8.0, 30.0])


def test_small_cuda_grids_are_not_an_error_under_warnings_as_errors():
    """numba-cuda warns that a grid of fewer blocks than the GPU can hold under-uses it;
    a small fit is no error, also where warnings are errors (this suite, a user's)."""
    import warnings

    from aslcal.fitting._dispatch import _small_grids_allowed

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _small_grids_allowed():
            warnings.warn("Grid size 1 will likely result in GPU under-utilization due to low occupancy.",
                          RuntimeWarning, stacklevel=1)
        with pytest.raises(RuntimeWarning):  # outside it, the filter is as it was
            warnings.warn("Grid size 1 will likely result in GPU under-utilization due to low occupancy.",
                          RuntimeWarning, stacklevel=1)
