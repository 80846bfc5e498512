"""Bad voxels, degenerate designs and invalid arguments of :func:`aslcal.fit_satrecov`.

Per-voxel problems must end in a status code (calibration.md §7.3: "a voxel with
non-finite data gets a status, never a crash and never a NaN that spreads"); bad
arguments must raise :class:`aslcal.InputError` naming what is wrong
(architecture.md §3 "Errors").
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import aslcal
from aslcal import fit_satrecov


STATUS_CONVERGED, STATUS_MAX_ITER, STATUS_SINGULAR, STATUS_NONFINITE, STATUS_OUT_OF_MASK, STATUS_UNDER = range(6)
PARAMS = ("m0t", "t1t", "a", "g")
MAPS = PARAMS + tuple(p + "_se" for p in PARAMS) + ("rss", "n_iter", "status")
# documented default bounds (calibration.md §7.1)
BOUNDS = {"m0t": (0.0, math.inf), "t1t": (0.05, 10.0), "a": (0.0, 2.0), "g": (0.5, 1.5)}

SR_TIS = [0.2, 0.5, 0.8, 1.2, 1.7, 2.3, 3.0, 4.0]
LL_TIS = list(np.round(0.1 + 0.3 * np.arange(12), 6))
LL_DUAL = {"fa": 35.0, "lfa": 11.7, "nphases": 3}


# -- an independent model: closed forms of calibration.md §7.1 ------------------------


def _sr(m0, t1, a, tis):
    return m0 * (1.0 - a * np.exp(-np.asarray(tis) / t1))


def _ll_dual(m0t, t1, a, g, tis, fa, lfa, nphases, dt=0.3):
    """Exact Look-Locker train; phase order high x nphases then low (TI list per phase)."""
    tis = np.asarray(tis, dtype=np.float64)
    out = []
    th_h = math.radians(g * fa)
    for low in [False] * nphases + [True]:
        th = math.radians((g + 0.023) * lfa) if low else th_h
        q = math.sin(th) / math.sin(th_h)
        e = math.exp(-dt / t1)
        r = (1 - e) / (1 - math.cos(th) * e)
        rate = 1 / t1 - math.log(math.cos(th)) / dt
        ti1 = tis[0]
        out.append(m0t * q * (r + (1 - a * math.exp(-ti1 / t1) - r) * np.exp(-(tis - ti1) * rate)))
    return np.concatenate(out)


DESIGNS = {
    "sr": (SR_TIS, {}, lambda p: _sr(p[0], p[1], p[2], SR_TIS)),
    "ll-dual": (LL_TIS, LL_DUAL, lambda p: _ll_dual(*p, LL_TIS, 35.0, 11.7, 3)),
}
TRUE_GOOD = [(1000.0, 1.4, 0.95, 1.05), (800.0, 0.9, 0.9, 0.92), (1200.0, 2.5, 1.0, 1.1)]


def _bad_image(design: str):
    """A 3 x 4 image: bad voxels interleaved with noise-free normal ones.

    Returns data (3, 4, n_vol), a dict name -> (row, col) of the bad voxels, the
    positions of the good voxels and their true parameters.
    """
    _, _, signal = DESIGNS[design]
    good = [signal(p) for p in TRUE_GOOD]
    n_vol = good[0].size
    data = np.zeros((3, 4, n_vol))
    bad = {
        "zero": (0, 0),
        "constant": (0, 2),
        "nan": (1, 1),
        "posinf": (1, 3),
        "neginf": (2, 0),
        "all-nan": (2, 2),
        "negative": (2, 3),
    }
    good_pos = [(0, 1), (1, 0), (1, 2)]
    data[bad["constant"]] = 500.0
    data[bad["nan"]] = good[0]
    data[bad["nan"] + (3,)] = np.nan
    data[bad["posinf"]] = good[1]
    data[bad["posinf"] + (n_vol - 1,)] = np.inf
    data[bad["neginf"]] = good[2]
    data[bad["neginf"] + (0,)] = -np.inf
    data[bad["all-nan"]] = np.nan
    data[bad["negative"]] = -good[0]
    for pos, s in zip(good_pos, good):
        data[pos] = s
    # (0, 3) stays all-zero as well: two zero voxels, one of them at the image's edge
    bad["zero-edge"] = (0, 3)
    return data, bad, good_pos


@pytest.mark.cudasim
@pytest.mark.parametrize("priors", [None, True], ids=["noprior", "priors"])
@pytest.mark.parametrize("design", list(DESIGNS))
def test_bad_voxels_get_a_status_and_do_not_leak(design, priors, backend):
    tis, kw, _ = DESIGNS[design]
    data, bad, good_pos = _bad_image(design)
    res = fit_satrecov(data, tis, priors=priors, backend=backend, dtype="float64", **kw)  # no exception

    for name in MAPS:
        assert getattr(res, name).shape == (3, 4), name
    # no NaN (or Inf) in any parameter map, anywhere
    for p in PARAMS:
        assert np.all(np.isfinite(getattr(res, p))), p
    status = res.status
    # non-finite input (NaN, +Inf, -Inf, all-NaN) -> status 3, documented
    for name in ("nan", "posinf", "neginf", "all-nan"):
        assert status[bad[name]] == STATUS_NONFINITE, (name, int(status[bad[name]]))
        assert res.n_iter[bad[name]] == 0
    # Degenerate but finite data.  Allowed: 2 "singular" (the Hessian at the solution is
    # rank deficient: for all-zero data M0t = 0 makes T1, A and g unidentifiable; for a
    # constant series A = 0 makes T1 unidentifiable; for negative data M0t sits on its
    # bound 0) or 0 "converged" (with priors the prior term makes the Hessian full rank,
    # and the dual-FA model cannot represent a constant, so it has a proper minimum).
    # Max-iterations (1) is not allowed: LM either stops on a small step or on λ > 1e12.
    for name in ("zero", "zero-edge", "constant", "negative"):
        assert status[bad[name]] in (STATUS_CONVERGED, STATUS_SINGULAR), (name, int(status[bad[name]]))
    # every fitted (finite-input) voxel lies inside the documented bounds
    fitted = status != STATUS_NONFINITE
    for p in PARAMS:
        lo, hi = BOUNDS[p]
        v = getattr(res, p)[fitted]
        assert np.all((v >= lo) & (v <= hi)), (p, v)
    # all-zero data: the least-squares solution with M0t >= 0 is exactly M0t = 0 (RSS 0)
    for name in ("zero", "zero-edge"):
        assert res.m0t[bad[name]] == 0.0
        assert res.rss[bad[name]] == 0.0
    if design == "sr":
        # a constant c is represented exactly by A = 0, M0t = c (any T1): RSS ~ 0
        pos = bad["constant"]
        assert res.m0t[pos] == pytest.approx(500.0, rel=1e-6)  # float64 LM at the exact solution
        assert res.a[pos] == pytest.approx(0.0, abs=1e-6)
        assert res.rss[pos] <= 1e-12 * 500.0**2 * len(tis)

    # The normal voxels: fitted exactly as when fitted alone (per-voxel independence:
    # the same arithmetic on the same numbers must give the same bits), and correctly.
    alone_data = np.stack([data[pos] for pos in good_pos])
    alone = fit_satrecov(alone_data, tis, priors=priors, backend=backend, dtype="float64", **kw)
    for name in MAPS:
        got = np.array([getattr(res, name)[pos] for pos in good_pos])
        np.testing.assert_array_equal(got, getattr(alone, name), err_msg=name)
    for i, pos in enumerate(good_pos):
        assert status[pos] == STATUS_CONVERGED
        for j, p in enumerate(PARAMS):
            if res.design.free[j]:
                assert np.isfinite(getattr(res, p + "_se")[pos]) and getattr(res, p + "_se")[pos] > 0
            # noise-free data: the exact minimum is the truth.  Without priors 1e-6 is
            # the float64 LM step tolerance (1e-8) with margin; with priors (MAP weight
            # σ̂² = RSS/dof = ~0 at an exact fit) the prior pull is ~1e-12.
            if p == "g" and design == "sr":
                assert res.g[pos] == 1.0  # g is not fitted without LFA
                continue
            assert getattr(res, p)[pos] == pytest.approx(TRUE_GOOD[i][j], rel=1e-6), (pos, p)
    counts = res.status_counts()
    assert counts.get("non-finite input") == 4
    assert sum(counts.values()) == 12


@pytest.mark.cudasim
@pytest.mark.parametrize(
    "tis, kw",
    [
        ([1.0], {"repeats": 3}),  # SR: 1 distinct TI for 3 free parameters
        ([1.0], {"repeats": 3, "fix_a": True}),  # still 1 < 2
        ([0.5, 1.5], {"repeats": 2}),  # 2 distinct TIs < 3 free (M0t, T1, A)
        ([0.5], {"fa": 35.0, "dt": 0.3, "repeats": 2}),  # Look-Locker: one readout time
        ([0.5], {"fa": 35.0, "lfa": 11.7, "dt": 0.3}),  # dual FA: 2 distinct for 4 free
    ],
    ids=["sr-1ti", "sr-1ti-fixA", "sr-2ti", "ll-1ti", "ll-dual-1ti"],
)
def test_underdetermined_design_marks_every_voxel(tis, kw, backend):
    # (no kernel launch: the design alone decides, so this also runs on the simulator)
    n_phase = 1 + (1 if kw.get("lfa") else 0)
    n_vol = len(tis) * kw.get("repeats", 1) * n_phase
    data = np.random.default_rng(3).uniform(100.0, 900.0, (2, 3, n_vol))
    res = fit_satrecov(data, tis, backend=backend, **kw)  # no exception
    assert np.all(res.status == STATUS_UNDER)
    assert res.status_counts() == {"underdetermined": 6}
    assert np.all(res.n_iter == 0)
    for p in PARAMS:
        assert np.all(np.isfinite(getattr(res, p))), p


def test_underdetermined_with_mask_keeps_out_of_mask_status():
    data = np.ones((2, 3, 3))
    mask = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    res = fit_satrecov(data, [1.0], repeats=3, mask=mask, backend="numba")
    np.testing.assert_array_equal(res.status, np.where(mask, STATUS_UNDER, STATUS_OUT_OF_MASK))


# -- invalid arguments -----------------------------------------------------------------

Y12 = np.full((2, 12), 100.0)
Y48 = np.full((2, 48), 100.0)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: fit_satrecov(Y12, LL_TIS, fa=35.0, dt=0.0), ["dt=0", "> 0"]),
        (lambda: fit_satrecov(Y12, LL_TIS, fa=35.0, dt=-0.3), ["dt=-0.3", "> 0"]),
        (lambda: fit_satrecov(Y12, LL_TIS, fa=0.0), ["fa=0", "(0, 90)"]),
        (lambda: fit_satrecov(Y12, LL_TIS, fa=90.0), ["fa=90", "(0, 90)"]),
        (lambda: fit_satrecov(Y12, LL_TIS, fa=-20.0), ["fa=-20", "(0, 90)"]),
        (lambda: fit_satrecov(Y48, LL_TIS, fa=35.0, lfa=95.0, nphases=3), ["lfa=95", "(0, 90)"]),
        (lambda: fit_satrecov(Y48, LL_TIS, lfa=11.7, nphases=3), ["lfa", "without fa"]),
        (lambda: fit_satrecov(Y12, LL_TIS, bounds={"t1t": (5.0, 1.0)}), ["bounds['t1t']", "lower must be < upper"]),
        (lambda: fit_satrecov(Y12, LL_TIS, bounds={"g": (1.2, 1.2)}), ["bounds['g']", "lower must be < upper"]),
        (lambda: fit_satrecov(Y12, LL_TIS, bounds={"t2": (0.0, 1.0)}), ["unknown parameter", "'t2'", "t1t"]),
        # off the TI1 + k*dt grid (last readout 0.1 s late)
        (
            lambda: fit_satrecov(Y12, LL_TIS[:-1] + [3.5], fa=35.0),
            ["Look-Locker", "grid", "dt=0.3"],
        ),
        # on the grid but a readout skipped, dt inferred: must say "equally spaced"
        (
            lambda: fit_satrecov(Y12[:, :4], [0.1, 0.4, 0.7, 1.3], fa=35.0),
            ["equally spaced", "0.6"],
        ),
        (lambda: fit_satrecov(Y12, LL_TIS[:5]), ["5 values", "12 volumes"]),
        (lambda: fit_satrecov(Y12, SR_TIS, repeats=2), ["8 values", "12 volumes", "= 16 volumes"]),
        (lambda: fit_satrecov(np.ones((2, 3, 8)), SR_TIS, mask=np.ones((3, 2), bool)), ["mask", "(3, 2)", "(2, 3)"]),
        (lambda: fit_satrecov(Y12, LL_TIS, backend="gpu"), ["backend='gpu'", "numba", "cuda"]),
    ],
    ids=[
        "dt-zero", "dt-negative", "fa-zero", "fa-90", "fa-negative", "lfa-95", "lfa-without-fa",
        "bounds-inverted", "bounds-empty", "bounds-unknown", "ll-off-grid", "ll-uneven-spacing",
        "ti-count", "ti-count-repeats", "mask-shape", "backend-name",
    ],
)
def test_invalid_arguments_raise_input_error(call, words):
    with pytest.raises(aslcal.InputError) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert isinstance(info.value, ValueError)  # InputError is also a ValueError


def test_skipped_readout_with_explicit_dt_is_accepted():
    # the counterpart of "ll-uneven-spacing": with dt given, a skipped readout is fine
    tis = [0.1, 0.4, 0.7, 1.3]
    data = np.array([[_ll_single(1000.0, 1.2, 0.95, t, 35.0, 0.1, 0.3) for t in tis]])
    res = fit_satrecov(data, tis, fa=35.0, dt=0.3, backend="numba")
    assert res.status[0] == STATUS_CONVERGED
    assert res.t1t[0] == pytest.approx(1.2, rel=1e-6)  # noise-free: exact minimum


def _ll_single(m0t, t1, a, ti, fa, ti1, dt):
    th = math.radians(fa)
    e = math.exp(-dt / t1)
    r = (1 - e) / (1 - math.cos(th) * e)
    rate = 1 / t1 - math.log(math.cos(th)) / dt
    return m0t * (r + (1 - a * math.exp(-ti1 / t1) - r) * math.exp(-(ti - ti1) * rate))


def test_unavailable_backend_raises_backend_unavailable():
    ok, reason = aslcal.backend.available_backends()["cuda"]
    if ok:
        pytest.skip(f"CUDA is available here ({reason}); nothing unavailable to request")
    with pytest.raises(aslcal.BackendUnavailableError) as info:
        fit_satrecov(Y12, LL_TIS, backend="cuda")
    msg = str(info.value)
    assert "cuda" in msg and reason in msg  # says which backend and why
    # never a silent fallback, also when asked through the configuration
    with aslcal.config_context(backend="cuda"):
        with pytest.raises(aslcal.BackendUnavailableError):
            fit_satrecov(Y12, LL_TIS)
