"""End-to-end calibration on the noise-free brain phantom (aslcal.testing.phantoms).

Truth: ``ph.m0a`` (arterial-blood M0), tissue M0 = pc·M0a, the receive field
``ph.sensitivity`` and the transmit field ``ph.fa_scale`` (g).  The Look-Locker series
is simulated readout by readout by the phantom; a pure-CSF voxel reports

    M0t = 1.15·M0a · sin(g·FA) · s         (the fit's high-flip-angle readout scale)

so after dividing the series by s, M0a = mean(M0t / sin(g·FA)) / 1.15 (``m0_scale=
"relaxed"``: the phantom's perfusion image has its own readout), while the default, FSL's
readout scale, gives M0a·mean(sin(g·FA)).

Reference mask: the pure lateral-ventricle voxels (``ventricle_pv >= 0.99``).  The
phantom's ``ventricle_mask`` (pv >= 0.9) also holds voxels with up to 10 % WM/GM; a
mixture of two tissues is not one tissue's curve, which biases any reference-region
method (test_partial_volume_bias_of_the_09_mask documents how much).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from aslcal.calibration import apply_calibration, m0_refregion, m0_refregion_satrecov
from aslcal.calibration.satrecov import NOISE_FLOOR_LIMIT, RELIABLE_REL_SE, m0a_from_satrecov_maps, rician_mean
from aslcal.errors import InputError
from aslcal.testing.phantoms import (
    DEFAULT_LOOK_LOCKER,
    DEFAULT_SATRECOV_TIS,
    longtr_calibration,
    look_locker_series,
    make_phantom,
    perfusion_image,
    satrecov_series,
)

LL = dict(DEFAULT_LOOK_LOCKER)  # TI1 0.1 s, dt 0.3 s, 12 readouts, FA 35°, LFA 11.7°, 3 + 1 phases
PC_CSF, BLOOD_T2 = 1.15, 150.0  # calibration.md §3
TOL = 0.005  # acceptance: M0a within 0.5 %


@pytest.fixture(scope="module")
def ph():
    return make_phantom()  # default 64 x 64 x 24 grid: 138 pure ventricle voxels (the small grid has 2)


@pytest.fixture(scope="module")
def pure_ref(ph):
    mask = ph.ventricle_pv >= 0.99
    assert mask.sum() >= 50
    return mask


@pytest.fixture(scope="module")
def ll_series(ph):
    data, truth = look_locker_series(ph, **LL, dtype=np.float64)
    return data, truth


@pytest.fixture(scope="module")
def ll_cal(ph, pure_ref, ll_series):
    data, truth = ll_series
    return m0_refregion_satrecov(
        data, truth["tis"], pure_ref, ph.brain_mask, fa=LL["fa"], lfa=LL["lfa"],
        nphases=LL["nphases"], dt=LL["dt"], sensitivity=ph.sensitivity,
        m0_scale="relaxed",  # the phantom's perfusion image has its own (90°) readout
    )


def test_satrecov_look_locker_dual_fa_recovers_m0a(ph, ll_cal):
    res = ll_cal
    assert abs(res.m0a / ph.m0a - 1) < TOL
    # noise-free, exact model: in fact to fit precision
    assert res.m0a == pytest.approx(ph.m0a, rel=1e-6)
    r = res.refregion
    assert r.mode == "satrecov" and r.tr_factor == 1.0 and r.tr is None and r.taq is None
    assert r.n_excluded == 0 and r.n_voxels == r.n_mask
    assert r.m0t_rel_se < 1e-6  # noise-free: every voxel's M0t is exact
    assert res.m0_scale == "relaxed" and res.priors is False
    # no TR correction in this mode: T1r is only the prior mean, unused without priors
    assert r.t1r is None and r.sources["t1r"] == "unused" and r.pc == PC_CSF
    # the reference fit found the true flip-angle correction and CSF T1 (4.3 s)
    sel = res.ref_fit.status == 0
    assert sel.sum() == r.n_voxels
    np.testing.assert_allclose(res.ref_fit.g[sel], ph.fa_scale[sel], rtol=1e-6)
    np.testing.assert_allclose(res.ref_fit.t1t[sel], 4.3, rtol=1e-6)
    # readout factor: mean of sin(g·FA) over the reference voxels, written out
    assert res.readout_factor == pytest.approx(
        np.mean(np.sin(np.radians(ph.fa_scale[sel] * LL["fa"]))), rel=1e-6)


def test_readout_scale_is_fsl_m0t_mean(ph, pure_ref, ll_series, ll_cal):
    data, truth = ll_series
    res = m0_refregion_satrecov(
        data, truth["tis"], pure_ref, fa=LL["fa"], lfa=LL["lfa"], nphases=LL["nphases"],
        dt=LL["dt"], sensitivity=ph.sensitivity, m0_scale="readout",
    )
    # FSL: M0a = mean_R(M0t) / pc = M0a_true · mean_R(sin(g·FA)) for pure CSF
    expected = ph.m0a * np.mean(np.sin(np.radians(ph.fa_scale[pure_ref] * LL["fa"])))
    assert res.m0a == pytest.approx(expected, rel=1e-6)
    assert res.m0a == pytest.approx(ll_cal.m0a * ll_cal.readout_factor, rel=1e-9)
    assert res.brain_fit is None


def test_whole_brain_fit(ph, ll_cal, ll_series):
    fit = ll_cal.brain_fit
    assert fit is not None and fit.n_fitted == int(ph.brain_mask.sum())
    for tissue, t1 in (("gm", 1.3), ("wm", 1.0)):
        sel = (ph.pv[tissue] >= 0.99) & ph.brain_mask
        np.testing.assert_allclose(fit.t1t[sel], t1, rtol=1e-5)
        # not divided by the sensitivity: M0t = pc·M0a·sin(g·FA)·s
        pc = {"gm": 0.98, "wm": 0.82}[tissue]
        np.testing.assert_allclose(
            fit.m0t[sel], pc * ph.m0a * np.sin(np.radians(ph.fa_scale[sel] * LL["fa"])) * ph.sensitivity[sel],
            rtol=1e-5)
    d = json.loads(json.dumps(ll_cal.as_dict()))
    assert d["brain_fit"]["n_fitted"] == fit.n_fitted and d["design"]["lfa_deg"] == LL["lfa"]
    assert d["m0_scale"] == "relaxed" and d["mode"] == "satrecov" and d["m0a"] == ll_cal.m0a


def test_sensitivity_matters(ph, pure_ref, ll_series):
    data, truth = ll_series
    res = m0_refregion_satrecov(
        data, truth["tis"], pure_ref, fa=LL["fa"], lfa=LL["lfa"], nphases=LL["nphases"], dt=LL["dt"],
        m0_scale="relaxed",
    )
    # without s, each voxel's M0 carries its receive field: mean(s)·M0a over the region
    assert res.m0a == pytest.approx(ph.m0a * np.mean(ph.sensitivity[pure_ref]), rel=1e-6)


def test_priors_keep_noise_free_truth(ph, pure_ref, ll_series):
    data, truth = ll_series
    res = m0_refregion_satrecov(
        data, truth["tis"], pure_ref, fa=LL["fa"], lfa=LL["lfa"], nphases=LL["nphases"],
        dt=LL["dt"], sensitivity=ph.sensitivity, priors=True, m0_scale="relaxed",
    )
    assert abs(res.m0a / ph.m0a - 1) < TOL
    assert res.as_dict()["ref_fit"]["t1_prior_mean_s"] == 4.3


def test_noisy_look_locker_reference_fit_is_flagged_without_priors(ph, pure_ref, caplog):
    """The mean of noisy CSF Look-Locker fits is biased high; the fit's own standard
    errors flag it, and fabber's priors (FSL's behaviour) remove both.

    Rician noise at grey-matter SNR 50 (aslcal.testing.phantoms).  Measured: median
    relative standard error of M0t 53 % and M0a +33 % without priors; 8 % and +0.1 %
    with them.
    """
    data, truth = look_locker_series(ph, **LL, snr=50, dtype=np.float64)
    kw = dict(fa=LL["fa"], lfa=LL["lfa"], nphases=LL["nphases"], dt=LL["dt"],
              sensitivity=ph.sensitivity, m0_scale="relaxed")
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        plain = m0_refregion_satrecov(data, truth["tis"], pure_ref, **kw)
    assert plain.refregion.m0t_rel_se > RELIABLE_REL_SE[False]
    assert plain.m0a / ph.m0a - 1 > 0.10  # the bias the warning is about
    flagged = [r.message for r in caplog.records if "reference-region fit unreliable" in r.message]
    assert len(flagged) == 1 and "priors" in flagged[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        fabber = m0_refregion_satrecov(data, truth["tis"], pure_ref, priors=True, **kw)
    assert fabber.refregion.m0t_rel_se < RELIABLE_REL_SE[True]
    assert abs(fabber.m0a / ph.m0a - 1) < 0.01
    assert not [r for r in caplog.records if "unreliable" in r.message]
    assert fabber.as_dict()["m0t_rel_se"] == fabber.refregion.m0t_rel_se  # in the provenance


def test_reference_m0t_relative_standard_error_is_the_median_over_used_voxels():
    """m0t_rel_se: median of |se / M0t| over the voxels averaged (finite, non-zero M0t),
    ignoring undefined (NaN) standard errors."""
    m0t = np.full((4, 5, 1), 100.0)
    se = np.full((4, 5, 1), 5.0)
    se[0, :, 0] = [10.0, 20.0, 30.0, 40.0, 50.0]  # 0.1 .. 0.5
    se[1, 0, 0] = np.nan  # a singular voxel: no standard error
    m0t[1, 1, 0] = 0.0  # not averaged (zero M0t), its se ignored too
    se[1, 1, 0] = 1e9
    ref = np.zeros((4, 5, 1), bool)
    ref[:2] = True  # 10 voxels: rel = 0.1 .. 0.5, NaN, (excluded), 0.05 x 3
    res, _ = m0a_from_satrecov_maps(m0t, np.ones_like(m0t), None, ref, m0t_se=se)
    expected = np.median([0.1, 0.2, 0.3, 0.4, 0.5, 0.05, 0.05, 0.05])
    assert res.m0t_rel_se == pytest.approx(expected, rel=1e-12) and res.n_voxels == 9
    assert m0a_from_satrecov_maps(m0t, np.ones_like(m0t), None, ref)[0].m0t_rel_se is None
    with pytest.raises(InputError, match="m0t_se"):
        m0a_from_satrecov_maps(m0t, np.ones_like(m0t), None, ref, m0t_se=se[:2])


def test_rician_mean_matches_its_limits_and_a_monte_carlo():
    """E|S + n| under complex Gaussian noise: the Rayleigh mean σ·sqrt(π/2) at S = 0,
    S + σ²/(2S) far above the noise, and the sample mean of 4e6 draws in between."""
    sigma = 3.0
    assert rician_mean(0.0, sigma) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=1e-12)
    big = 400.0 * sigma
    assert rician_mean(big, sigma) == pytest.approx(big + sigma**2 / (2 * big), rel=1e-9)
    rng = np.random.default_rng(7)
    n = rng.normal(0.0, sigma, (2, 4_000_000))
    for s in (0.5 * sigma, 1.0 * sigma, 2.5 * sigma):
        r = np.hypot(s + n[0], n[1])
        assert rician_mean(s, sigma) == pytest.approx(r.mean(), abs=4 * r.std() / math.sqrt(r.size))
    assert np.array_equal(rician_mean(np.array([-2.0, 5.0]), 0.0), [2.0, 5.0])  # no noise: |S|


def test_reference_series_near_the_noise_floor_is_flagged_even_with_priors(ph, pure_ref, caplog):
    """fabber's priors keep the standard errors small when the CSF Look-Locker series sinks
    into the magnitude noise floor, so only the noise-floor lift can flag the biased M0a.

    Grey-matter SNR 10 (Rician, aslcal.testing.phantoms): measured lift 15-16 % and M0a
    +13 %; at SNR 50: lift 2 % and M0a +0.1 %, no warning.
    """
    kw = dict(fa=LL["fa"], lfa=LL["lfa"], nphases=LL["nphases"], dt=LL["dt"],
              sensitivity=ph.sensitivity, m0_scale="relaxed", priors=True)
    data, truth = look_locker_series(ph, **LL, snr=10, seed=0, dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        low = m0_refregion_satrecov(data, truth["tis"], pure_ref, **kw)
    assert low.m0a / ph.m0a - 1 > 0.05  # the bias the warning is about
    assert low.refregion.m0t_rel_se < RELIABLE_REL_SE[True]  # the standard errors do not see it
    assert low.refregion.noise_floor_lift > NOISE_FLOOR_LIMIT
    flagged = [r.message for r in caplog.records if "noise floor" in r.message]
    assert len(flagged) == 1 and "reference-region fit unreliable" in flagged[0]
    assert low.as_dict()["noise_floor_lift"] == low.refregion.noise_floor_lift  # in the provenance
    caplog.clear()
    data, truth = look_locker_series(ph, **LL, snr=50, seed=0, dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        good = m0_refregion_satrecov(data, truth["tis"], pure_ref, **kw)
    assert abs(good.m0a / ph.m0a - 1) < 0.01
    assert 0 < good.refregion.noise_floor_lift < 0.05
    assert not [r for r in caplog.records if "unreliable" in r.message]


def test_noise_floor_lift_is_the_rician_lift_of_the_median_fitted_curve():
    """noise_floor_lift: the curve of the median parameters over the averaged voxels and
    σ̂ = sqrt(median RSS / (n − p)), against the same computed here by hand."""
    from aslcal.fitting import make_design

    tis = [0.5, 1.0, 2.0, 4.0, 8.0]
    design = make_design(5, tis)
    shape = (3, 3, 1)
    m0t = np.full(shape, 100.0)
    m0t[0, 0, 0] = 1e6  # one outlier: the median ignores it
    t1t, a, g = np.full(shape, 4.0), np.full(shape, 0.9), np.ones(shape)
    rss = np.full(shape, 2.0 * 8.0**2)  # dof 5 - 3 = 2: σ̂ = 8
    ref = np.ones(shape, bool)
    res, _ = m0a_from_satrecov_maps(m0t, g, None, ref, design=design, t1t=t1t, a=a, rss=rss)
    curve = 100.0 * (1.0 - 0.9 * np.exp(-np.array(tis) / 4.0))
    x = curve**2 / (2 * 64.0)
    from scipy.special import ive

    mean = 8.0 * math.sqrt(math.pi / 2) * ((1 + x) * ive(0, x / 2) + x * ive(1, x / 2))
    assert res.noise_floor_lift == pytest.approx(np.mean(mean - curve) / np.mean(curve), rel=1e-9)
    assert m0a_from_satrecov_maps(m0t, g, None, ref)[0].noise_floor_lift is None  # no design given


def test_satrecov_te_cgain_and_plain_saturation_recovery(ph, pure_ref):
    data, truth = satrecov_series(ph, DEFAULT_SATRECOV_TIS, dtype=np.float64)
    res = m0_refregion_satrecov(data, truth["tis"], pure_ref, sensitivity=ph.sensitivity,
                                te=18.0, cgain=2.0)
    # plain SR: M0t is the relaxed M0, no sin factor; the phantom has no T2 decay, so the
    # tail multiplies M0a by cgain·exp(−TE/T2b)/exp(−TE/T2r) (T2r = 750 ms, T2b = 150 ms)
    expected = ph.m0a * 2.0 * math.exp(-18.0 / BLOOD_T2) / math.exp(-18.0 / 750.0)
    assert res.m0a == pytest.approx(expected, rel=1e-6)
    assert res.readout_factor is None


@pytest.mark.parametrize("te", [0.0, 20.0])
def test_longtr_recovers_m0a(ph, pure_ref, te):
    calib, _ = longtr_calibration(ph, tr=3.2, te=te, dtype=np.float64)
    res = m0_refregion(calib, pure_ref, tr=3.2, te=te, sensitivity=ph.sensitivity)
    # M0a at the sequence TE: M0a_true · exp(−TE/T2b)  (blood T2 150 ms)
    expected = ph.m0a * math.exp(-te / BLOOD_T2)
    assert abs(res.m0a / expected - 1) < TOL
    assert res.m0a == pytest.approx(expected, rel=1e-9)


def test_partial_volume_bias_of_the_09_mask(ph, ll_series):
    """The phantom's ventricle_mask (pv >= 0.9) mixes CSF with up to 10 % WM/GM.

    Long TR: WM recovers faster (T1 1.0 s vs 4.3 s), so mixed voxels read high; the
    Look-Locker fit of a two-tissue curve reads low.  Neither is a calibration error.
    """
    calib, _ = longtr_calibration(ph, tr=3.2, dtype=np.float64)
    lt = m0_refregion(calib, ph.ventricle_mask, sensitivity=ph.sensitivity)
    assert 0.0 < lt.m0a / ph.m0a - 1 < 0.01
    data, truth = ll_series
    sr = m0_refregion_satrecov(data, truth["tis"], ph.ventricle_mask, fa=LL["fa"], lfa=LL["lfa"],
                               nphases=LL["nphases"], dt=LL["dt"], sensitivity=ph.sensitivity,
                               m0_scale="relaxed")
    assert -0.05 < sr.m0a / ph.m0a - 1 < 0.0


def test_cbf_recovered_in_pure_tissue(ph, ll_cal):
    perf, truth = perfusion_image(ph, alpha=0.85, dtype=np.float64)
    res = apply_calibration(perf, ll_cal.m0a, labelling="pcasl", sensitivity=ph.sensitivity)
    for tissue, cbf in (("gm", ph.cbf_gm), ("wm", ph.cbf_wm)):
        sel = ph.pv[tissue] >= 0.99
        assert sel.sum() > 10
        np.testing.assert_allclose(res.image[sel], ph.cbf[sel], rtol=0.01)
        np.testing.assert_allclose(res.image[sel], cbf, rtol=0.011)  # pv >= 0.99 of cbf_tissue
    assert res.n_zeroed == 0


# -- bad input -----------------------------------------------------------------------------


def test_satrecov_bad_inputs(ph, pure_ref, ll_series):
    data, truth = ll_series
    kw = dict(fa=LL["fa"], lfa=LL["lfa"], nphases=LL["nphases"], dt=LL["dt"], m0_scale="relaxed")
    with pytest.raises(InputError, match="tis has 11 values but the data have 48 volumes"):
        m0_refregion_satrecov(data, truth["tis"][:-1], pure_ref, **kw)
    with pytest.raises(InputError, match="dt=-0.3"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, **{**kw, "dt": -0.3})
    with pytest.raises(InputError, match="refmask: shape"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref[:, :, :5], **kw)
    with pytest.raises(InputError, match="brain_mask: shape"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, pure_ref[:5], **kw)
    with pytest.raises(InputError, match="reference mask is empty.*check the mask"):
        m0_refregion_satrecov(data, truth["tis"], np.zeros_like(pure_ref), **kw)
    with pytest.raises(InputError, match="give pc"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, tissref="none", **kw)
    with pytest.raises(InputError, match=r"give t1r \(s\)"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, tissref="none", pc=1.15, priors=True, **kw)
    with pytest.raises(InputError, match="m0_scale='fsl'"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, **{**kw, "m0_scale": "fsl"})
    with pytest.raises(InputError, match="priors='fabber'"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, priors="fabber", **kw)
    with pytest.raises(InputError, match="tissref='ventricle'"):
        m0_refregion_satrecov(data, truth["tis"], pure_ref, tissref="ventricle", **kw)
    with pytest.raises(InputError, match="series: expected shape"):
        m0_refregion_satrecov(np.ones(5), [1.0], np.ones(5, dtype=bool))
    bad = data.copy()
    bad[pure_ref] = np.nan  # every reference voxel non-finite: no usable fit
    with pytest.raises(InputError, match="none of the .* reference-mask voxels.*fitted M0t"):
        m0_refregion_satrecov(bad, truth["tis"], pure_ref, **kw)
    # tissref none works when pc (and, without priors, nothing else) is given
    res = m0_refregion_satrecov(data, truth["tis"], pure_ref, tissref="none", pc=PC_CSF,
                                sensitivity=ph.sensitivity, **kw)
    assert res.m0a == pytest.approx(ph.m0a, rel=1e-6) and res.refregion.t1r is None
