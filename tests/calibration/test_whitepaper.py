"""White-paper CBF (calibration.md §11) against ΔM simulated from first principles.

The oracle integrates the label instead of using the closed form: pCASL labels the
inflowing blood during τ; blood labelled at time t reaches the readout (τ + PLD) having
decayed with T1b for τ + PLD − t (the white paper's assumptions: all label arrived, tissue
T1 = blood T1, no outflow), so

    ΔM = 2·α·M0a·f·∫₀^τ exp(−(τ + PLD − t)/T1b) dt,      f = CBF/6000 (ml/g/s);

PASL (QUIPSS II) inverts a bolus of temporal width TI1 at once, read at TI:
ΔM = 2·α·M0a·f·∫₀^TI1 exp(−TI/T1b) dt.  The integrals are done by scipy.integrate.quad.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad

from aslcal import quantify_whitepaper
from aslcal.calibration import kinetic_factor
from aslcal.errors import InputError


def _dm_pcasl(cbf, *, alpha, m0a, tau, pld, t1b):
    f = cbf / 6000.0
    integral, _ = quad(lambda t: math.exp(-(tau + pld - t) / t1b), 0.0, tau, epsabs=0, epsrel=1e-13)
    return 2.0 * alpha * m0a * f * integral


def _dm_pasl(cbf, *, alpha, m0a, ti, ti1, t1b):
    f = cbf / 6000.0
    integral, _ = quad(lambda t: math.exp(-ti / t1b), 0.0, ti1, epsabs=0, epsrel=1e-13)
    return 2.0 * alpha * m0a * f * integral


@pytest.mark.parametrize(("labelling", "alpha"), [("pcasl", 0.85), ("casl", 0.85)])
@pytest.mark.parametrize(("tau", "pld", "t1b"), [(1.8, 1.8, 1.65), (1.5, 2.0, 1.35), (1.8, 1.8, 2.1)])
def test_pcasl_recovers_the_simulated_cbf(labelling, alpha, tau, pld, t1b):
    cbf = np.array([[[60.0, 20.0], [45.0, 0.0]]])  # ml/100g/min
    m0a = 1234.5
    dm = np.vectorize(lambda c: _dm_pcasl(c, alpha=alpha, m0a=m0a, tau=tau, pld=pld, t1b=t1b))(cbf)
    res = quantify_whitepaper(dm, m0a, labelling=labelling, pld=pld, tau=tau, t1b=t1b)
    np.testing.assert_allclose(res.image, cbf, rtol=1e-12, atol=1e-12)
    assert res.calibrated.alpha == alpha and res.t1b_source == "user"
    assert res.as_dict()["kinetic_factors_per_s"] == [pytest.approx(
        math.exp(pld / t1b) / (2 * t1b * (1 - math.exp(-tau / t1b))), rel=1e-14)]


def test_pasl_recovers_the_simulated_cbf():
    m0a, ti, ti1, t1b = 987.0, 1.8, 0.7, 1.65
    dm = _dm_pasl(55.0, alpha=0.98, m0a=m0a, ti=ti, ti1=ti1, t1b=t1b)
    res = quantify_whitepaper(np.full((2, 2, 2), dm), m0a, labelling="pasl", pld=ti, ti1=ti1, t1b=t1b)
    np.testing.assert_allclose(res.image, 55.0, rtol=1e-12)
    assert res.tau is None and res.ti1 == ti1 and "TI1" in res.as_dict()["formula"]


def test_a_worked_number():
    """ΔM 1, M0a 100, PLD = τ = 1.8 s, α 0.85, 3 T (T1b 1.65 s from the table), by hand:
    6000·e^(1.8/1.65) / (2·0.85·1.65·100·(1 − e^(−1.8/1.65)))."""
    expected = 6000 * math.exp(1.8 / 1.65) / (2 * 0.85 * 1.65 * 100 * (1 - math.exp(-1.8 / 1.65)))
    res = quantify_whitepaper(np.ones((1, 1, 1)), 100.0, labelling="pcasl", pld=1.8, tau=1.8)
    assert float(res.image[0, 0, 0]) == pytest.approx(expected, rel=1e-12)
    assert res.t1b == 1.65 and res.t1b_source == "table 3 T"
    assert quantify_whitepaper(np.ones((1, 1, 1)), 100.0, labelling="pcasl", pld=1.8, tau=1.8,
                               field_strength=1.5).t1b == 1.35


def test_slice_times_delay_each_slice():
    """A 2-D readout: slice z is read slice_times[z] after the first, at PLD + that."""
    m0a, tau, pld, t1b = 1000.0, 1.8, 1.5, 1.65
    times = [0.0, 0.045, 0.09, 0.135]
    dm = np.stack([np.full((3, 3), _dm_pcasl(50.0, alpha=0.85, m0a=m0a, tau=tau, pld=pld + t, t1b=t1b))
                   for t in times], axis=2)
    res = quantify_whitepaper(dm, m0a, labelling="pcasl", pld=pld, tau=tau, t1b=t1b, slice_times=times)
    np.testing.assert_allclose(res.image, 50.0, rtol=1e-12)
    assert len(res.factors) == 4 and res.factors[0] < res.factors[-1]
    # the same ΔM quantified as if read at once underestimates the late slices
    flat = quantify_whitepaper(dm, m0a, labelling="pcasl", pld=pld, tau=tau, t1b=t1b)
    assert float(flat.image[0, 0, 3]) < 50.0 * 0.95


def test_voxelwise_m0_map_and_sensitivity():
    m0 = np.array([[[100.0, 200.0]]])
    s = np.array([[[1.0, 2.0]]])
    dm = np.array([[[_dm_pcasl(40.0, alpha=0.85, m0a=100.0, tau=1.8, pld=1.8, t1b=1.65),
                     2.0 * _dm_pcasl(40.0, alpha=0.85, m0a=200.0, tau=1.8, pld=1.8, t1b=1.65)]]])
    res = quantify_whitepaper(dm, m0, labelling="pcasl", pld=1.8, tau=1.8, t1b=1.65, sensitivity=s)
    np.testing.assert_allclose(res.image, 40.0, rtol=1e-12)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(labelling="pasl", pld=1.8), "PASL needs ti1"),
    (dict(labelling="pasl", pld=1.8, ti1=2.0), "cut off after the readout"),
    (dict(labelling="pcasl", pld=1.8), "needs tau"),
    (dict(labelling="vsasl", pld=1.8, tau=1.0), "labelling='vsasl'"),
    (dict(labelling="pcasl", pld=-1.0, tau=1.8), "pld=-1.0"),
    (dict(labelling="pcasl", pld=1.8, tau=1.8, t1b=0.0), "t1b=0.0"),
    (dict(labelling="pcasl", pld=1.8, tau=1.8, slice_times=[0.0, 0.1]), "slice_times: 2 values"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(InputError, match=match):
        quantify_whitepaper(np.ones((2, 2, 3)), 100.0, **kwargs)


def test_kinetic_factor_alone():
    assert kinetic_factor("pasl", pld=1.8, t1b=1.65, ti1=0.7) == pytest.approx(math.exp(1.8 / 1.65) / 1.4, rel=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"pld": 1800, "tau": 1.8}, "pld=1800 s looks like milliseconds"),
     ({"pld": 1.8, "tau": 1800}, "tau=1800 s looks like milliseconds"),
     ({"pld": 1.8, "tau": 1.8, "t1b": 1650}, "t1b=1650 s looks like milliseconds"),
     ({"pld": 1.8, "tau": 1.8, "slice_times": [0, 40, 80]}, "slice_times up to 80 s look like milliseconds"),
     ({"pld": 1.8, "tau": 1.8, "slice_times": 0.04}, "slice_times=0.04: expected one time"),
     ({"pld": 1.8, "tau": 1.8, "slice_times": [0, 0.04, 0.08], "slice_axis": "z"}, "slice_axis='z'"),
     ({"pld": 1.8, "tau": 1.8, "tissue_table": {"blood": {"t1": 1.7}}}, "tissue_table: expected a mapping"),
     ({"pld": 1.8, "tau": 1.8, "tissue_table": {}}, "with a 'blood' entry")],
)
def test_times_in_milliseconds_and_bad_arguments_are_input_errors(kwargs, match):
    """ExploreASL keeps PLD and labelling duration in ms: 1800 as seconds overflowed
    exp(PLD/T1b) (a traceback) or gave CBF of 1e212; tau in ms gave a plausible -34 %."""
    with pytest.raises(InputError, match=match):
        quantify_whitepaper(np.full((2, 2, 3), 10.0), 1000.0, labelling="pcasl", **kwargs)


def test_user_tissue_table_is_the_recorded_source():
    from aslcal.physics.tissues import tissue_table

    table = tissue_table(1.5, overrides={"blood": {"t1": 1.9}})
    res = quantify_whitepaper(np.full((2, 2, 1), 10.0), 1000.0, labelling="pcasl", pld=1.8, tau=1.8,
                              field_strength=1.5, tissue_table=table)
    assert res.t1b == 1.9 and res.t1b_source == "user tissue table"
    # a table that overrides other tissues only: blood T1 is still the built-in table's
    other = tissue_table(1.5, overrides={"csf": {"t1": 4.2}})
    res2 = quantify_whitepaper(np.full((2, 2, 1), 10.0), 1000.0, labelling="pcasl", pld=1.8, tau=1.8,
                               field_strength=1.5, tissue_table=other)
    assert res2.t1b == 1.35 and res2.t1b_source == "table 1.5 T"
    # m0a is the blood M0 (λ already in it): CBF = 6000·ΔM·K/(M0a·α)
    expected = 6000 * 10.0 * math.exp(1.8 / 1.9) / (2 * 0.85 * 1.9 * 1000.0 * (1 - math.exp(-1.8 / 1.9)))
    np.testing.assert_allclose(res.image, expected, rtol=1e-12)
