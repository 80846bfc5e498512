"""Reference-region M0a, long-TR mode (calibration.md §4), against hand-written closed forms.

Expected values are computed here from the closed form

    M0a = S_ref · cgain · exp(−TE/T2b) / (pc · (1 − exp(−(TR−TAQ)/T1r)) · exp(−TE/T2r))

with S_ref the plain NumPy mean of C/s over the usable mask voxels, and the tissue
numbers typed from the spec's table (§3: 3 T) or the data files (1.5 T, 7 T).
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from aslcal.calibration import RefRegionM0, m0_refregion
from aslcal.errors import InputError
from aslcal.physics.tissues import TissueParams, tissue_table

# calibration.md §3, 3 T: T1 (s), T2 (ms), T2* (ms), pc
T3 = {
    "csf": dict(t1=4.3, t2=750.0, t2s=400.0, pc=1.15),
    "gm": dict(t1=1.3, t2=100.0, t2s=60.0, pc=0.98),
    "wm": dict(t1=1.0, t2=50.0, t2s=50.0, pc=0.82),
}
BLOOD_T2, BLOOD_T2S = 150.0, 50.0
REL = 1e-12  # float64 throughout: only rounding of a few operations


def closed_form(s_ref, *, t1r, t2r, t2b, pc, te, tr, taq, cgain):
    """M0a = S·cgain·exp(−TE/T2b) / (pc·(1 − exp(−(TR−TAQ)/T1r))·exp(−TE/T2r))."""
    return s_ref * cgain * math.exp(-te / t2b) / (
        pc * (1.0 - math.exp(-(tr - taq) / t1r)) * math.exp(-te / t2r)
    )


@pytest.fixture
def scene():
    rng = np.random.default_rng(7)
    calib = rng.uniform(500.0, 900.0, size=(7, 6, 5))
    mask = np.zeros((7, 6, 5), dtype=bool)
    mask[2:5, 1:4, 1:4] = True  # 27 voxels
    return calib, mask


@pytest.mark.parametrize("tissref", ["csf", "wm", "gm"])
@pytest.mark.parametrize("t2star", [False, True])
def test_closed_form_each_tissref(scene, tissref, t2star):
    calib, mask = scene
    te, tr, taq, cgain = 13.0, 3.2, 0.6, 1.7
    res = m0_refregion(calib, mask, tissref=tissref, te=te, tr=tr, taq=taq, cgain=cgain, t2star=t2star)
    p = T3[tissref]
    s_ref = calib[mask].mean()
    t2r = p["t2s"] if t2star else p["t2"]
    t2b = BLOOD_T2S if t2star else BLOOD_T2
    expected = closed_form(s_ref, t1r=p["t1"], t2r=t2r, t2b=t2b, pc=p["pc"], te=te, tr=tr, taq=taq, cgain=cgain)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.s_ref == pytest.approx(s_ref, rel=REL)
    # every factor, written out
    assert res.tr_factor == pytest.approx(1.0 - math.exp(-(tr - taq) / p["t1"]), rel=REL)
    assert res.t2_factor == pytest.approx(math.exp(-te / t2r), rel=REL)
    assert res.t2b_factor == pytest.approx(math.exp(-te / t2b), rel=REL)
    assert res.m0_ref == pytest.approx(s_ref / (1.0 - math.exp(-(tr - taq) / p["t1"])) / math.exp(-te / t2r), rel=REL)
    assert (res.t1r, res.t2r, res.t2b, res.pc) == (p["t1"], t2r, t2b, p["pc"])
    tag = "default (T2*)" if t2star else "default"
    assert res.sources == {"t1r": "default", "pc": "default", "t2r": tag, "t2b": tag}
    assert (res.n_voxels, res.n_excluded, res.n_mask) == (27, 0, 27)
    assert (res.tissref, res.te, res.tr, res.taq, res.cgain, res.mode) == (tissref, te, tr, taq, cgain, "longtr")
    assert res.table == "built-in 3 T" and res.field_strength == 3.0 and res.sensitivity is False


def test_defaults_te0_tr32(scene):
    calib, mask = scene
    res = m0_refregion(calib, mask)
    # CSF, TE = 0: M0a = S / (1.15 · (1 − exp(−3.2/4.3)))
    assert res.m0a == pytest.approx(calib[mask].mean() / (1.15 * (1 - math.exp(-3.2 / 4.3))), rel=REL)
    assert res.t2_factor == 1.0 and res.t2b_factor == 1.0
    assert res.t2r is None and res.t2b is None
    assert res.sources["t2r"] == "unused" and res.sources["t2b"] == "unused"


def test_user_values_override_defaults_and_t2star_only_switches_defaults(scene):
    calib, mask = scene
    res = m0_refregion(calib, mask, te=20.0, t1r=3.9, t2r=600.0, t2b=140.0, pc=1.1, t2star=True)
    expected = closed_form(calib[mask].mean(), t1r=3.9, t2r=600.0, t2b=140.0, pc=1.1, te=20.0, tr=3.2, taq=0.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.sources == {"t1r": "user", "pc": "user", "t2r": "user", "t2b": "user"}
    # only t2b given: t2r default from the T2* column (CSF 400 ms)
    res = m0_refregion(calib, mask, te=20.0, t2b=140.0, t2star=True)
    expected = closed_form(calib[mask].mean(), t1r=4.3, t2r=400.0, t2b=140.0, pc=1.15, te=20.0, tr=3.2, taq=0.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)


def test_tissref_none_with_every_value(scene):
    calib, mask = scene
    res = m0_refregion(calib, mask, tissref="none", te=15.0, t1r=2.0, t2r=80.0, pc=0.95, tr=4.0, taq=1.0)
    # t2b still defaults to blood T2 at 3 T (150 ms)
    expected = closed_form(calib[mask].mean(), t1r=2.0, t2r=80.0, t2b=150.0, pc=0.95, te=15.0, tr=4.0, taq=1.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.sources == {"t1r": "user", "pc": "user", "t2r": "user", "t2b": "default"}
    # TE = 0: t2r not needed
    res = m0_refregion(calib, mask, tissref="none", t1r=2.0, pc=0.95)
    assert res.m0a == pytest.approx(calib[mask].mean() / (0.95 * (1 - math.exp(-3.2 / 2.0))), rel=REL)
    assert res.t2r is None and res.table == "not used"
    # TE = 0, tissref none: works for a field strength without a table
    assert m0_refregion(calib, mask, tissref="none", t1r=2.0, pc=0.95, field_strength=9.4).field_strength == 9.4


def test_t1r_and_t2r_images_use_their_mean_inside_the_mask(scene):
    calib, mask = scene
    rng = np.random.default_rng(3)
    t1map = np.full(mask.shape, 99.0)  # outside the mask: must not matter
    t1map[mask] = rng.uniform(3.5, 4.5, mask.sum())
    t2map = np.full(mask.shape, -5.0)
    t2map[mask] = rng.uniform(500.0, 900.0, mask.sum())
    t2map[3, 2, 2] = np.nan  # excluded from the T2 mean (finite, non-zero rule)
    t2map[2, 1, 1] = 0.0
    t1_mean = t1map[mask].mean()
    ok = mask & np.isfinite(t2map) & (t2map != 0)
    t2_mean = t2map[ok].mean()
    res = m0_refregion(calib, mask, te=25.0, t1r=t1map, t2r=t2map)
    expected = closed_form(calib[mask].mean(), t1r=t1_mean, t2r=t2_mean, t2b=150.0, pc=1.15, te=25.0, tr=3.2, taq=0.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.t1r == pytest.approx(t1_mean, rel=REL) and res.t2r == pytest.approx(t2_mean, rel=REL)
    assert res.sources["t1r"] == "image" and res.sources["t2r"] == "image"
    assert res.image_voxels == {"t1r": 27, "t2r": 25}


def test_sensitivity_divides_the_calibration_image(scene):
    calib, mask = scene
    s = np.linspace(0.7, 1.3, calib.size).reshape(calib.shape)
    res = m0_refregion(calib, mask, sensitivity=s, tissref="wm", te=10.0)
    # S_ref = mean(C/s) over the mask
    s_ref = (calib / s)[mask].mean()
    expected = closed_form(s_ref, t1r=1.0, t2r=50.0, t2b=150.0, pc=0.82, te=10.0, tr=3.2, taq=0.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.sensitivity is True


def test_zero_nan_inf_voxels_are_excluded_and_counted(scene):
    calib, mask = scene
    calib = calib.copy()
    idx = np.argwhere(mask)
    calib[tuple(idx[0])] = 0.0
    calib[tuple(idx[1])] = np.nan
    calib[tuple(idx[2])] = np.inf
    calib[tuple(idx[3])] = -np.inf
    calib[0, 0, 0] = np.nan  # outside the mask: ignored, not counted
    s = np.ones(calib.shape)
    s[tuple(idx[4])] = 0.0  # C/s undefined there: excluded as well
    res = m0_refregion(calib, mask, sensitivity=s)
    ok = mask & np.isfinite(calib) & (calib != 0)
    ok[tuple(idx[4])] = False
    assert (res.n_voxels, res.n_excluded, res.n_mask) == (22, 5, 27)
    assert res.m0a == pytest.approx(calib[ok].mean() / (1.15 * (1 - math.exp(-3.2 / 4.3))), rel=REL)
    assert math.isfinite(res.m0a)


def test_series_is_time_averaged(scene):
    calib, mask = scene
    series = np.stack([calib * 0.9, calib * 1.1, calib], axis=-1)
    a = m0_refregion(series, mask)
    b = m0_refregion(calib, mask)
    assert a.m0a == pytest.approx(b.m0a, rel=1e-12)


def test_no_truncation():
    # FSL truncates M0a·cgain/pc to two decimals; aslcal keeps every digit.
    calib = np.full((3, 3, 3), 1234.56789)
    mask = np.ones((3, 3, 3), dtype=bool)
    res = m0_refregion(calib, mask, tissref="none", t1r=1e-3, pc=1.0, tr=10.0)  # tr factor = 1
    assert res.m0a == pytest.approx(1234.56789, rel=1e-14)
    assert res.m0a != round(res.m0a, 2)


@pytest.mark.parametrize(
    "fs, t1, t2, pc, t2b",
    [(1.5, 4.3, 750.0, 1.15, 250.0), (7.0, 4.4, 750.0, 1.15, 65.0)],  # tissues_1.5T.json, tissues_7T.json
)
def test_field_strength_selects_the_table(scene, fs, t1, t2, pc, t2b):
    calib, mask = scene
    res = m0_refregion(calib, mask, te=10.0, field_strength=fs)
    expected = closed_form(calib[mask].mean(), t1r=t1, t2r=t2, t2b=t2b, pc=pc, te=10.0, tr=3.2, taq=0.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.table == f"built-in {fs:g} T"


def test_user_tissue_table(scene):
    calib, mask = scene
    table = tissue_table(3.0, overrides={"csf": {"t1": 3.8}, "blood": {"t2": 160.0}})
    res = m0_refregion(calib, mask, te=10.0, tissue_table=table)
    expected = closed_form(calib[mask].mean(), t1r=3.8, t2r=750.0, t2b=160.0, pc=1.15, te=10.0, tr=3.2, taq=0.0, cgain=1.0)
    assert res.m0a == pytest.approx(expected, rel=REL)
    assert res.table == "user"
    mini = {"blood": TissueParams(1.6, 150.0, 50.0, None)}
    with pytest.raises(InputError, match="tissue_table: no entry 'csf'"):
        m0_refregion(calib, mask, tissue_table=mini)


def test_integer_and_float32_inputs(scene):
    calib, mask = scene
    ints = np.round(calib).astype(np.int16)
    res = m0_refregion(ints, mask.astype(np.uint8))
    assert res.s_ref == pytest.approx(ints[mask].mean(), rel=REL)
    res32 = m0_refregion(calib.astype(np.float32), mask)
    # float32 image, float64 accumulation: relative 1e-6
    assert res32.m0a == pytest.approx(m0_refregion(calib, mask).m0a, rel=1e-6)


def test_as_dict_is_json_and_complete(scene):
    calib, mask = scene
    res = m0_refregion(calib, mask, te=12.0, cgain=2.0)
    d = json.loads(json.dumps(res.as_dict()))
    for key in ("m0a", "s_ref", "n_voxels", "n_excluded", "tr_factor", "t2_factor", "t2b_factor",
                "pc", "t1r", "t2r", "t2b", "cgain", "tissref", "field_strength", "sources", "units", "mode"):
        assert key in d
    assert d["units"]["te"] == "ms" and d["units"]["tr"] == "s"
    assert isinstance(res, RefRegionM0)


# -- bad input -----------------------------------------------------------------------------


def test_unknown_tissref(scene):
    with pytest.raises(InputError, match=r"tissref='bone': expected one of csf, wm, gm, none"):
        m0_refregion(*scene, tissref="bone")


def test_tissref_none_names_every_missing_option(scene):
    with pytest.raises(InputError, match=r"give t1r \(s\), pc$"):
        m0_refregion(*scene, tissref="none")
    with pytest.raises(InputError, match=r"give pc, t2r"):
        m0_refregion(*scene, tissref="none", t1r=2.0, te=10.0)
    with pytest.raises(InputError, match=r"give t2r"):
        m0_refregion(*scene, tissref="none", t1r=2.0, pc=0.9, te=10.0)


@pytest.mark.parametrize("tr, taq", [(3.0, 3.0), (2.0, 3.0)])
def test_tr_not_above_taq(scene, tr, taq):
    with pytest.raises(InputError, match=r"tr=.* <= taq=.*TR - TAQ must be > 0"):
        m0_refregion(*scene, tr=tr, taq=taq)


def test_empty_reference_mask(scene):
    calib, mask = scene
    with pytest.raises(InputError, match="reference mask is empty.*check the mask.*brain extraction"):
        m0_refregion(calib, np.zeros_like(mask))


def test_no_usable_voxel(scene):
    calib, mask = scene
    calib = calib.copy()
    calib[mask] = 0.0
    calib[2, 1, 1] = np.nan
    with pytest.raises(InputError, match="none of the 27 reference-mask voxels.*check the mask and its alignment.*brain extraction"):
        m0_refregion(calib, mask)


@pytest.mark.parametrize(
    "calib_shape, what",
    [((7, 6, 4), "calib: shape"), ((7, 6), "calib: shape"), ((7, 6, 5, 3, 2), "calib: shape")],
)
def test_shape_mismatch(scene, calib_shape, what):
    _, mask = scene
    with pytest.raises(InputError, match=what):
        m0_refregion(np.ones(calib_shape), mask)


def test_other_bad_inputs(scene):
    calib, mask = scene
    cases = [
        (dict(te=-1.0), "te=-1.0"),
        (dict(te=math.nan), "te=nan"),
        (dict(tr=0.0), "tr=0.0"),
        (dict(taq=-0.1), "taq=-0.1"),
        (dict(cgain=0.0), "cgain=0.0"),
        (dict(t1r=-4.0), "t1r=-4.0"),
        (dict(t2r=0.0, te=10.0), "t2r=0.0"),
        (dict(t2b="150"), "t2b='150'"),
        (dict(pc=np.ones(mask.shape)), "pc="),
        (dict(t2star="yes"), "t2star='yes'"),
        (dict(t1r=np.ones((2, 2))), "t1r: image of shape"),
        (dict(t1r=np.zeros(mask.shape)), "t1r: the image is zero"),
        (dict(sensitivity=np.ones((7, 6, 5, 2))), "sensitivity: shape"),
        (dict(field_strength=2.0), "field_strength=2.0"),
        (dict(field_strength=True), "field_strength=True"),
        (dict(te=1e6, t2r=10.0), "underflows"),
    ]
    from aslcal.calibration import CalibrationWarning

    for kwargs, match in cases:
        with pytest.raises(InputError, match=match), warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)  # te=1e6 also warns about its unit
            m0_refregion(calib, mask, **kwargs)
    bad_mask = mask.astype(float)
    bad_mask[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="refmask: the mask contains NaN"):
        m0_refregion(calib, bad_mask)
    with pytest.raises(InputError, match="calib: required"):
        m0_refregion(None, mask)
    with pytest.raises(InputError, match="calib: expected an array of real numbers"):
        m0_refregion(np.array(["a"] * 4), mask)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(te=0.013), "te=0.013 ms looks like seconds"),
        (dict(te=13.0, t2r=0.75), "t2r=0.75 ms looks like seconds"),
        (dict(te=13.0, t2b=0.15), "t2b=0.15 ms looks like seconds"),
        (dict(t1r=4300.0), "t1r=4300 s looks like milliseconds"),
        (dict(tr=3200.0), "tr=3200 s looks like milliseconds"),
        (dict(te=20000.0), "te=20000 ms is longer than any ASL or M0 echo time"),
    ],
)
def test_values_in_the_wrong_unit_warn(scene, kwargs, match):
    from aslcal.calibration import CalibrationWarning

    with pytest.warns(CalibrationWarning, match=match):
        m0_refregion(*scene, **kwargs)


def test_te_blood_separates_the_two_echo_times():
    """M0a = S·exp(-TE_blood/T2b) / (pc·(1-exp(-TR/T1r))·exp(-TE/T2r)), values by hand."""
    import math

    calib = np.full((4, 4, 3), 800.0)
    mask = np.zeros((4, 4, 3), bool)
    mask[1:3, 1:3, 1] = True
    kw = dict(tissref="csf", tr=5.0, t1r=4.3, t2r=750.0, t2b=150.0, pc=1.15)
    res = m0_refregion(calib, mask, te=30.0, te_blood=12.0, **kw)
    expected = 800.0 * math.exp(-12.0 / 150.0) / (1.15 * (1 - math.exp(-5.0 / 4.3)) * math.exp(-30.0 / 750.0))
    assert res.m0a == pytest.approx(expected, rel=1e-12)
    assert res.te == 30.0 and res.te_blood == 12.0
    same = m0_refregion(calib, mask, te=30.0, **kw)
    assert same.te_blood == 30.0 and same.m0a == pytest.approx(expected * math.exp(-18.0 / 150.0), rel=1e-12)
    # TE 0 for the calibration image but a blood echo: the blood T2 is still needed (table default)
    res0 = m0_refregion(calib, mask, te=0.0, te_blood=12.0, tissref="csf", tr=5.0)
    assert res0.t2b_factor < 1.0 and res0.t2_factor == 1.0


def test_negative_reference_signal_is_an_error():
    """A calibration image with negative values in the reference region (a phase or
    difference image given by mistake) gives a negative M0a: an error, not a result."""
    from aslcal.calibration import m0_refregion

    calib = np.full((4, 4, 3), -500.0)
    mask = np.ones((4, 4, 3), dtype=bool)
    with pytest.raises(InputError, match=r"M0a = -.* is not positive: the mean reference signal .* is -500"):
        m0_refregion(calib, mask, tr=3.2)
