"""``aslcal calib`` in-process: formulas checked against closed forms written here, the
satrecov path on the noise-free phantom, NaN/Inf handling, and every bad-input case of
issue 4 (exit 2, one stderr line, no traceback, no output file).

Reference numbers: calibration.md §4 (longtr closed form), §3 (tissue table, copied into
``TABLE_3T`` below), §7.4 / satrecov module docstring (M0 scale), §9 (CBF).
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from aslcal.cli import main
from aslcal.testing.phantoms import look_locker_series

#: Tissue values of calibration.md §3 (3 T), written out here so that the tests do not
#: use the library's own table: T1 (s), T2 (ms), T2* (ms), partition coefficient (ml/g).
TABLE_3T = {
    "csf": {"t1": 4.3, "t2": 750.0, "t2star": 400.0, "pc": 1.15},
    "gm": {"t1": 1.3, "t2": 100.0, "t2star": 60.0, "pc": 0.98},
    "wm": {"t1": 1.0, "t2": 50.0, "t2star": 50.0, "pc": 0.82},
}
BLOOD_T2_MS = 150.0
BLOOD_T2STAR_MS = 50.0


def save_nifti(path: Path, data, affine, dtype=np.float32) -> Path:
    """Write ``data`` as a NIfTI-1 image with nibabel (not aslcal's writer)."""
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), np.asarray(affine, float)), str(path))
    return Path(path)


def read_nifti(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))


def m0a_longtr(c, mask, sens=None, *, tr=3.2, taq=0.0, te=0.0, t1r, t2r=None, t2b=None, pc, cgain=1.0):
    """calibration.md §4 closed form, in float64 over the mask voxels whose C/s is finite and
    non-zero: M0a = S_ref·cgain·exp(−TE/T2b) / (pc·(1 − exp(−(TR−TAQ)/T1r))·exp(−TE/T2r))."""
    c = np.asarray(c, np.float64)
    if c.ndim == 4:
        c = c.mean(axis=3)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = c[mask] / (np.asarray(sens, np.float64)[mask] if sens is not None else 1.0)
    v = v[np.isfinite(v) & (v != 0)]
    s_ref = v.sum() / v.size
    t2_term = math.exp(-te / t2r) if te > 0 else 1.0
    t2b_term = math.exp(-te / t2b) if te > 0 else 1.0
    return s_ref * cgain * t2b_term / (pc * (1.0 - math.exp(-(tr - taq) / t1r)) * t2_term)


# printed / --Mo values have 10 significant digits; the library divides C/s in float32 (the
# images' dtype) and sums in float64, the test in float64: 1e-6 covers float32 rounding.
RTOL_LONGTR = 1e-6


# ==========================================================================================
# longtr: closed forms
# ==========================================================================================


LONGTR_CASES = [
    # tissref, te (ms), tr (s), taq (s), cgain, t2star
    pytest.param("csf", 0.0, None, None, None, False, id="csf-defaults"),
    pytest.param("csf", 13.0, 2.5, 0.6, 2.5, False, id="csf-te-taq-cgain"),
    pytest.param("csf", 13.0, 4.0, 0.0, 1.0, True, id="csf-t2star"),
    pytest.param("gm", 20.0, 4.0, 0.3, 1.5, False, id="gm-te-taq-cgain"),
    pytest.param("gm", 20.0, 3.2, 0.0, 1.0, True, id="gm-t2star"),
    pytest.param("wm", 10.0, 5.0, 1.2, 0.8, False, id="wm-te-taq-cgain"),
    pytest.param("wm", 10.0, 6.0, 0.0, 1.0, True, id="wm-t2star"),
]


@pytest.mark.parametrize("tissref,te,tr,taq,cgain,t2star", LONGTR_CASES)
def test_longtr_closed_form(syn, cli, tissref, te, tr, taq, cgain, t2star):
    mo = syn.root / "m0.txt"
    argv = ["calib", "-c", syn.calib_path, "-m", syn.mask_path, "--tissref", tissref, "--Mo", mo]
    argv += ["--te", te] if te else []
    argv += ["--tr", tr] if tr is not None else []
    argv += ["--taq", taq] if taq is not None else []
    argv += ["--cgain", cgain] if cgain is not None else []
    argv += ["--t2star"] if t2star else []
    res = cli(*argv)
    assert res.rc == 0, res.err
    t = TABLE_3T[tissref]
    expected = m0a_longtr(
        syn.calib, syn.mask, tr=tr or 3.2, taq=taq or 0.0, te=te, t1r=t["t1"],
        t2r=t["t2star" if t2star else "t2"], t2b=BLOOD_T2STAR_MS if t2star else BLOOD_T2_MS,
        pc=t["pc"], cgain=cgain or 1.0,
    )
    assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)
    # the --Mo file holds the printed value (one number, one line)
    text = mo.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1
    assert float(text) == res.m0
    assert "Traceback" not in res.err


def test_longtr_phantom_with_sensitivity(phantom_ds, cli, tmp_path):
    """calib.nii.gz of the phantom (TR 3.2 s, TE 0), CSF reference, --isen the true
    receive sensitivity: the closed form over the image values read here, and (pure
    ventricle mask, noise free) the phantom's true M0a."""
    ph, root = phantom_ds.ph, phantom_ds.root
    c = read_nifti(root / "calib.nii.gz")
    s = read_nifti(root / "truth" / "sensitivity.nii.gz")
    for mask_path, mask in ((root / "truth" / "ventricle_mask.nii.gz", ph.ventricle_mask),
                            (phantom_ds.pure_vent_path, phantom_ds.pure_vent)):
        mo = tmp_path / f"m0_{mask_path.name}.txt"
        res = cli("calib", "-c", root / "calib.nii.gz", "-m", mask_path,
                  "--isen", root / "truth" / "sensitivity.nii.gz", "--Mo", mo)
        assert res.rc == 0, res.err
        expected = m0a_longtr(c, mask, s, t1r=4.3, pc=1.15)
        assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)
        assert float(mo.read_text()) == res.m0
    # pure CSF voxels: C/s = pc_csf·M0a·(1 − exp(−3.2/4.3)) exactly (float32 storage)
    assert res.m0 == pytest.approx(ph.m0a, rel=1e-5)


def test_longtr_sensitivity_synthetic_and_cagin_alias(syn, cli):
    expected = m0a_longtr(syn.calib, syn.mask, syn.sens, te=15.0, t1r=4.3, t2r=750.0, t2b=150.0,
                          pc=1.15, cgain=3.0)
    for gain in ("--cgain", "--cagin"):  # asl_calib's documented spelling is accepted too
        res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--isen", syn.sens_path,
                  "--te", 15, gain, 3)
        assert res.rc == 0, res.err
        assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)


def test_longtr_4d_calibration_image_is_averaged(syn, cli):
    series = np.stack([syn.calib, 0.5 * syn.calib, 1.5 * syn.calib], axis=-1)
    path = save_nifti(syn.data / "calib4d.nii.gz", series, syn.affine)
    res = cli("calib", "-c", path, "-m", syn.mask_path)
    assert res.rc == 0, res.err
    assert res.m0 == pytest.approx(m0a_longtr(syn.calib, syn.mask, t1r=4.3, pc=1.15), rel=RTOL_LONGTR)


def test_tissref_none_with_user_values(syn, cli):
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--tissref", "none",
              "--t1r", 2.2, "--pc", 0.95, "--tr", 4.5)
    assert res.rc == 0, res.err
    assert res.m0 == pytest.approx(m0a_longtr(syn.calib, syn.mask, tr=4.5, t1r=2.2, pc=0.95), rel=RTOL_LONGTR)
    # TE > 0 with tissref none: T2r and T2b must be given too, and are used as given
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--tissref", "none",
              "--t1r", 2.2, "--pc", 0.95, "--te", 18, "--t2r", 300, "--t2b", 120)
    assert res.rc == 0, res.err
    expected = m0a_longtr(syn.calib, syn.mask, te=18.0, t1r=2.2, t2r=300.0, t2b=120.0, pc=0.95)
    assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)


def test_user_values_override_table(syn, cli):
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--tissref", "wm", "--t1r", 1.7,
              "--pc", 0.7, "--te", 12, "--t2r", 80, "--t2b", 90, "--tr", 2.0, "--taq", 0.5)
    assert res.rc == 0, res.err
    expected = m0a_longtr(syn.calib, syn.mask, tr=2.0, taq=0.5, te=12.0, t1r=1.7, t2r=80.0, t2b=90.0, pc=0.7)
    assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)


def test_t1r_and_t2r_as_images(syn, cli):
    """--t1r / --t2r given as image paths: their mean inside the reference mask is used."""
    rng = np.random.default_rng(3)
    t1 = rng.uniform(3.0, 5.0, syn.calib.shape).astype(np.float32)
    t1[~syn.mask] = 100.0  # outside the mask: must not count
    t2 = rng.uniform(500.0, 900.0, syn.calib.shape).astype(np.float32)
    t2[~syn.mask] = 1.0
    t1p = save_nifti(syn.data / "t1.nii.gz", t1, syn.affine)
    t2p = save_nifti(syn.data / "t2.nii.gz", t2, syn.affine)
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--t1r", t1p, "--t2r", t2p, "--te", 25)
    assert res.rc == 0, res.err
    t1_mean = float(np.mean(t1[syn.mask].astype(np.float64)))
    t2_mean = float(np.mean(t2[syn.mask].astype(np.float64)))
    expected = m0a_longtr(syn.calib, syn.mask, te=25.0, t1r=t1_mean, t2r=t2_mean, t2b=150.0, pc=1.15)
    assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)


def test_longtr_calibrated_perfusion_and_outputs(syn, cli):
    """-i/-o: CBF = 6000·perf/(s·M0a·α); --om, --osen and --outdir hold what was used."""
    out, om, osen, outdir = (syn.root / n for n in ("cbf.nii.gz", "ref.nii.gz", "sen.nii.gz", "od"))
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--isen", syn.sens_path,
              "-i", syn.perf_path, "-o", out, "--alpha", 0.9, "--om", om, "--osen", osen,
              "--outdir", outdir)
    assert res.rc == 0, res.err
    m0a = m0a_longtr(syn.calib, syn.mask, syn.sens, t1r=4.3, pc=1.15)
    cbf = 6000.0 * syn.perf.astype(np.float64) / (syn.sens.astype(np.float64) * m0a * 0.9)
    np.testing.assert_allclose(read_nifti(out), cbf, rtol=1e-5)  # float32 output
    np.testing.assert_array_equal(read_nifti(om) > 0, syn.mask)
    np.testing.assert_allclose(read_nifti(osen), syn.sens, rtol=0)
    assert sorted(p.name for p in outdir.iterdir()) == [
        "M0.txt", "perfusion_calib.nii.gz", "provenance.json", "qc.png", "refmask.nii.gz", "sensitivity.nii.gz"]
    # (no brainmask.nii.gz: this synthetic image has no brain for the automatic mask; the
    # run warns and still succeeds, since in longtr mode the brain mask is only for QC)
    np.testing.assert_allclose(read_nifti(outdir / "perfusion_calib.nii.gz"), cbf, rtol=1e-5)
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["m0a"] == pytest.approx(res.m0, rel=1e-9)
    assert prov["calibration"]["n_voxels"] == int(syn.mask.sum())
    assert prov["calibrated"]["alpha"] == 0.9
    assert float((outdir / "M0.txt").read_text()) == res.m0


def test_of_is_asl_calibs_name_for_the_calibrated_perfusion(syn, cli):
    """Scripts written for asl_calib pass --of OUT: the same image as -o OUT."""
    out = syn.root / "cbf_of.nii.gz"
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "-i", syn.perf_path, "--of", out, "--alpha", 0.9)
    assert res.rc == 0, res.err
    cbf = 6000.0 * syn.perf.astype(np.float64) / (m0a_longtr(syn.calib, syn.mask, t1r=4.3, pc=1.15) * 0.9)
    np.testing.assert_allclose(read_nifti(out), cbf, rtol=1e-5)


def test_known_m0a_calibrates_the_perfusion_without_a_calibration_image(syn, cli):
    """--m0a VALUE (oxford_asl's --M0): CBF = 6000·perf/(s·M0a·α), the same image as the
    run that estimated that M0a; its outputs and provenance say the M0a was given."""
    m0a = 1234.5
    out, outdir = syn.root / "cbf_known.nii.gz", syn.root / "known"
    res = cli("calib", "--m0a", m0a, "-i", syn.perf_path, "-o", out, "--alpha", 0.9, "--isen", syn.sens_path,
              "--outdir", outdir, "--Mo", syn.root / "m0a.txt")
    assert res.rc == 0, res.err
    assert res.m0 == m0a and float((syn.root / "m0a.txt").read_text()) == m0a
    cbf = 6000.0 * syn.perf.astype(np.float64) / (syn.sens.astype(np.float64) * m0a * 0.9)
    np.testing.assert_allclose(read_nifti(out), cbf, rtol=1e-6)
    assert sorted(p.name for p in outdir.iterdir()) == [
        "M0.txt", "perfusion_calib.nii.gz", "provenance.json", "sensitivity.nii.gz"]
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["m0a"] == m0a and prov["calibration"] == {"source": "--m0a (given)"}
    assert prov["calibrated"]["alpha"] == 0.9
    # the M0a of a calibration run, given back, calibrates to the same image
    est = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "-i", syn.perf_path, "-o", syn.root / "est.nii.gz")
    again = cli("calib", "--m0a", repr(est.m0), "-i", syn.perf_path, "-o", syn.root / "again.nii.gz")
    assert est.rc == again.rc == 0, (est.err, again.err)
    np.testing.assert_allclose(read_nifti(syn.root / "again.nii.gz"), read_nifti(syn.root / "est.nii.gz"), rtol=1e-6)


def test_overwrite_removes_an_earlier_runs_outdir_files_this_run_does_not_write(syn, cli):
    """--outdir of a full calibration, then --m0a into the same folder with --overwrite:
    the earlier reference mask and QC figure went on sitting beside a provenance saying
    the M0a was given; without --overwrite the folder is refused untouched."""
    outdir = syn.root / "od_over"
    first = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "-i", syn.perf_path, "-o", syn.root / "o1.nii.gz",
                "--outdir", outdir)
    assert first.rc == 0, first.err
    assert {"refmask.nii.gz", "qc.png"} <= {p.name for p in outdir.iterdir()}
    refused = cli("calib", "--m0a", 1000.0, "-i", syn.perf_path, "-o", syn.root / "o2.nii.gz", "--outdir", outdir)
    assert refused.rc == 2 and (outdir / "refmask.nii.gz").exists()
    user_file = outdir / "sensitivity.nii.gz"  # a known name, but not the earlier run's output
    user_file.write_bytes(b"mine")
    again = cli("calib", "--m0a", 1000.0, "-i", syn.perf_path, "-o", syn.root / "o2.nii.gz", "--outdir", outdir,
                "--overwrite")
    assert again.rc == 0, again.err
    assert sorted(p.name for p in outdir.iterdir()) == [
        "M0.txt", "perfusion_calib.nii.gz", "provenance.json", "sensitivity.nii.gz"]
    assert float((outdir / "M0.txt").read_text()) == 1000.0 and user_file.read_bytes() == b"mine"
    assert "removed" in again.err and "refmask.nii.gz" in again.err  # said, not silent
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["outputs"] == ["M0.txt", "perfusion_calib.nii.gz", "provenance.json"]


def test_stale_output_removal_keeps_what_the_run_reads_or_an_older_record_did_not_list(tmp_path):
    """Only files the earlier run recorded as its outputs go, never one this run reads
    (an earlier T1 map given as --t1r), and nothing after a provenance without that record."""
    from aslcal.cli._common import earlier_aslcal_run, remove_stale_outputs

    outdir = tmp_path / "od"
    outdir.mkdir()
    for name in ("T1t.nii.gz", "qc.png", "rss.nii.gz"):
        (outdir / name).write_bytes(b"x")
    record = {"aslcal": "0", "command": "calib", "outputs": ["T1t.nii.gz", "qc.png", "provenance.json"]}
    (outdir / "provenance.json").write_text(json.dumps(record))
    earlier = earlier_aslcal_run(outdir, "calib")
    assert earlier == {"T1t.nii.gz", "qc.png", "provenance.json"} and earlier_aslcal_run(outdir, "voxelwise") == set()
    removed = remove_stale_outputs(outdir, sorted(earlier), [outdir / "provenance.json"],
                                   inputs=[str(tmp_path / "od" / ".." / "od" / "T1t.nii.gz"), 1.3, None])
    assert removed == [outdir / "qc.png"]
    assert (outdir / "T1t.nii.gz").exists() and (outdir / "rss.nii.gz").exists()
    (outdir / "provenance.json").write_text(json.dumps({"aslcal": "0", "command": "calib"}))  # older record
    assert earlier_aslcal_run(outdir, "calib") == set()


@pytest.mark.parametrize("extra, message", [
    (["-c", "CALIB"], "do not combine it with -c"),
    (["-m", "MASK"], "do not combine it with -m"),
    (["--mode", "satrecov"], "nothing to fit"),
    (["--m0a-only"], "needs -i PERF and -o OUT"),
])
def test_known_m0a_refuses_what_it_makes_meaningless(syn, cli, extra, message):
    args = ["calib", "--m0a", 1000.0]
    if extra != ["--m0a-only"]:
        args += ["-i", syn.perf_path, "-o", syn.root / "x.nii.gz"]
        args += [{"CALIB": syn.calib_path, "MASK": syn.mask_path}.get(a, a) for a in extra]
    res = cli(*args)
    assert res.rc == 2 and message in res.err, res.err
    assert not (syn.root / "x.nii.gz").exists()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_known_m0a_must_be_positive(syn, cli, value):
    res = cli("calib", "--m0a", value, "-i", syn.perf_path, "-o", syn.root / "x.nii.gz")
    assert res.rc == 2 and "M0a must be a positive number" in res.err, res.err


def test_known_m0a_says_which_options_it_ignores(syn, cli):
    res = cli("calib", "--m0a", 1000.0, "-i", syn.perf_path, "-o", syn.root / "x.nii.gz", "--te", 12, "--pc", 0.9)
    assert res.rc == 0, res.err
    assert "--te, --pc: no effect with --m0a" in res.err


def test_image_names_without_extension_as_fsl(syn, cli):
    """FSL-style names: an input without extension is NAME.nii.gz (else NAME.nii), an
    output without one gets .nii.gz; the result equals the run with full names."""
    full = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "-i", syn.perf_path,
               "-o", syn.root / "full.nii.gz", "--om", syn.root / "om_full.nii.gz")
    assert full.rc == 0, full.err
    plain_mask = syn.data / "plainmask.nii"
    save_nifti(plain_mask, read_nifti(syn.mask_path), nib.load(str(syn.mask_path)).affine, np.uint8)
    base = cli("calib", "-c", syn.data / "calib", "-m", syn.data / "plainmask", "-i", syn.data / "perf",
               "-o", syn.root / "short", "--om", syn.root / "om_short")
    assert base.rc == 0, base.err
    assert base.m0 == full.m0
    np.testing.assert_array_equal(read_nifti(syn.root / "short.nii.gz"), read_nifti(syn.root / "full.nii.gz"))
    np.testing.assert_array_equal(read_nifti(syn.root / "om_short.nii.gz"), read_nifti(syn.root / "om_full.nii.gz"))
    assert not (syn.root / "short").exists()
    (syn.data / "calib").mkdir()  # a folder of the bare name: FSL still reads calib.nii.gz
    assert cli("calib", "-c", syn.data / "calib", "-m", syn.mask_path).m0 == full.m0
    missing = cli("calib", "-c", syn.data / "nothere", "-m", syn.mask_path)
    assert missing.rc == 2 and "nothere" in missing.err and "does not exist" in missing.err


def test_intensity_image_as_mask_warns(syn, cli):
    """-m given an intensity image: its voxels > 0 are used (as asl_calib's fslstats -k),
    with a warning that it is no 0/1 mask; a 0/1 mask does not warn."""
    res = cli("calib", "-c", syn.calib_path, "-m", syn.calib_path)
    assert res.rc == 0, res.err
    assert "not a 0/1 mask" in res.err
    assert "not a 0/1 mask" not in cli("calib", "-c", syn.calib_path, "-m", syn.mask_path).err


def test_quiet_prints_only_the_result(syn, cli):
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--quiet")
    assert res.rc == 0 and res.err == ""
    assert res.out.startswith("M0: ") and len(res.out.splitlines()) == 1


def test_provenance_records_the_command_line_given_to_main(syn, cli):
    outdir = syn.root / "od"
    argv = ["calib", "-c", str(syn.calib_path), "-m", str(syn.mask_path), "--outdir", str(outdir)]
    assert cli(*argv).rc == 0
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["argv"] == argv


# ==========================================================================================
# NaN / Inf in the calibration image: excluded, counted, not propagated
# ==========================================================================================


def test_longtr_nonfinite_reference_voxels_are_excluded_and_counted(syn, cli):
    calib = syn.calib.copy()
    idx = np.argwhere(syn.mask)
    planted = [tuple(idx[0]), tuple(idx[7]), tuple(idx[-1])]
    for v, bad in zip(planted, (np.nan, np.inf, -np.inf)):
        calib[v] = bad
    cpath = save_nifti(syn.data / "calib_nan.nii.gz", calib, syn.affine)
    out, outdir = syn.root / "cbf.nii.gz", syn.root / "od"
    res = cli("calib", "-c", cpath, "-m", syn.mask_path, "--te", 10, "--cgain", 1.3, "-i", syn.perf_path,
              "-o", out, "--labelling", "pcasl", "--outdir", outdir, "--om", syn.root / "ref.nii.gz")
    assert res.rc == 0, res.err
    keep = syn.mask.copy()
    for v in planted:
        keep[v] = False
    expected = m0a_longtr(syn.calib, keep, te=10.0, t1r=4.3, t2r=750.0, t2b=150.0, pc=1.15, cgain=1.3)
    assert res.m0 == pytest.approx(expected, rel=RTOL_LONGTR)
    assert math.isfinite(res.m0)
    assert f"{int(keep.sum())} voxels used, 3 excluded" in res.err
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["calibration"]["n_excluded"] == 3
    assert prov["calibration"]["n_voxels"] == int(keep.sum())
    for f in [out, syn.root / "ref.nii.gz", *outdir.glob("*.nii.gz")]:
        assert np.isfinite(read_nifti(f)).all(), f
    np.testing.assert_allclose(read_nifti(out), 6000.0 * syn.perf / (expected * 0.85), rtol=1e-5)
    # quiet: no info line, same result
    res_q = cli("calib", "-c", cpath, "-m", syn.mask_path, "--te", 10, "--cgain", 1.3, "--quiet")
    assert res_q.rc == 0 and res_q.err == "" and res_q.m0 == res.m0


def _plant_nonfinite(phantom_ds, path: Path) -> list[tuple]:
    """Copy of the Look-Locker series with NaN/Inf in 3 pure-ventricle voxels."""
    img = nib.load(str(phantom_ds.root / "calib_ll.nii.gz"))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    idx = np.argwhere(phantom_ds.pure_vent)
    planted = [tuple(idx[0]), tuple(idx[len(idx) // 2]), tuple(idx[-1])]
    data[planted[0]][5] = np.nan       # one volume
    data[planted[1]][:] = np.inf       # every volume
    data[planted[2]][0] = -np.inf
    save_nifti(path, data, img.affine)
    return planted


def test_satrecov_nonfinite_reference_voxels_are_excluded(phantom_ds, cli, tmp_path):
    ph, root = phantom_ds.ph, phantom_ds.root
    planted = _plant_nonfinite(phantom_ds, tmp_path / "ll_nan.nii.gz")
    outdir = tmp_path / "od"
    res = cli("calib", "-c", tmp_path / "ll_nan.nii.gz", "-m", phantom_ds.pure_vent_path,
              *phantom_ds.ll_args, "--isen", root / "truth" / "sensitivity.nii.gz",
              "--bmask", root / "truth" / "brain_mask.nii.gz", "--outdir", outdir)
    assert res.rc == 0, res.err
    keep = phantom_ds.pure_vent.copy()
    for v in planted:
        keep[v] = False
    # readout scale (default): M0t/s = pc·M0a·sin(g·FA) in pure CSF, so M0a printed =
    # M0a·mean(sin(g·35°)) over the voxels used
    g = read_nifti(root / "truth" / "fa_scale.nii.gz")
    expected = ph.m0a * float(np.mean(np.sin(g[keep] * math.radians(35.0))))
    assert res.m0 == pytest.approx(expected, rel=1e-4)
    assert f"{int(keep.sum())} voxels used, 3 excluded" in res.err
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["calibration"]["n_excluded"] == 3
    for name in ("M0t", "T1t", "A", "facorr", "ref_M0t", "ref_T1t", "refmask", "status"):
        assert np.isfinite(read_nifti(outdir / f"{name}.nii.gz")).all(), name


def test_satrecov_nonfinite_input_gives_no_nan_in_any_output(phantom_ds, cli, tmp_path):
    root = phantom_ds.root
    _plant_nonfinite(phantom_ds, tmp_path / "ll_nan.nii.gz")
    outdir = tmp_path / "od"
    res = cli("calib", "-c", tmp_path / "ll_nan.nii.gz", "-m", phantom_ds.pure_vent_path,
              *phantom_ds.ll_args, "--bmask", root / "truth" / "brain_mask.nii.gz", "--outdir", outdir)
    assert res.rc == 0, res.err
    bad = [f.name for f in sorted(outdir.glob("*.nii.gz")) if not np.isfinite(read_nifti(f)).all()]
    assert bad == []


# ==========================================================================================
# satrecov on the noise-free phantom
# ==========================================================================================


FIT_FILES = [
    "A.nii.gz", "A_se.nii.gz", "M0.txt", "M0t.nii.gz", "M0t_se.nii.gz", "T1t.nii.gz", "T1t_se.nii.gz",
    "brainmask.nii.gz", "facorr.nii.gz", "facorr_se.nii.gz", "perfusion_calib.nii.gz", "provenance.json", "qc.png", "ref_M0t.nii.gz",
    "ref_T1t.nii.gz", "ref_status.nii.gz", "refmask.nii.gz", "rss.nii.gz", "sensitivity.nii.gz",
    "status.nii.gz",
]


def test_satrecov_relaxed_recovers_m0a_and_cbf(phantom_ds, cli, tmp_path):
    """Look-Locker dual flip angle (DEFAULT_LOOK_LOCKER), pure CSF reference, true receive
    sensitivity, m0-scale relaxed: M0a within 0.5 %, CBF within 1 % in pure GM/WM."""
    ph, root = phantom_ds.ph, phantom_ds.root
    cbf_path, outdir = tmp_path / "cbf.nii.gz", tmp_path / "od"
    res = cli("calib", "-c", root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path, *phantom_ds.ll_args,
              "--m0-scale", "relaxed", "--isen", root / "truth" / "sensitivity.nii.gz",
              "--bmask", root / "truth" / "brain_mask.nii.gz", "-i", root / "perfusion.nii.gz",
              "-o", cbf_path, "--labelling", "pcasl", "--outdir", outdir)
    assert res.rc == 0, res.err
    assert abs(res.m0 - ph.m0a) / ph.m0a < 5e-3
    cbf = read_nifti(cbf_path)
    true_cbf = read_nifti(root / "truth" / "cbf.nii.gz")
    for t in ("gm", "wm"):
        pure = ph.pv[t] >= 0.99
        assert pure.sum() > 10
        rel = np.abs(cbf[pure] - true_cbf[pure]) / true_cbf[pure]
        assert rel.max() < 1e-2, (t, rel.max())
    # every documented map (calibration.md §10; FIT_MAPS and _outputs of cli/calib.py)
    assert sorted(p.name for p in outdir.iterdir()) == FIT_FILES
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["m0a"] == pytest.approx(res.m0, rel=1e-9)
    assert float((outdir / "M0.txt").read_text()) == res.m0
    assert prov["calibration"]["m0_scale"] == "relaxed"
    np.testing.assert_allclose(read_nifti(outdir / "perfusion_calib.nii.gz"), cbf, rtol=0)
    # the whole-brain fit recovers g where the brain is pure tissue
    g = read_nifti(outdir / "facorr.nii.gz")
    pure_brain = (ph.pv["gm"] >= 0.99) | (ph.pv["wm"] >= 0.99)
    np.testing.assert_allclose(g[pure_brain], ph.fa_scale[pure_brain], atol=1e-3)


def test_satrecov_body_coil_sensitivity_with_cact(phantom_ds, cli):
    """--cref (flat body coil) with --cact (the same long-TR acquisition on the array coil):
    inside the brain s = cact / cref is the true receive field, so the relaxed M0a of the
    pure CSF mask is the phantom's M0a (the demo's path)."""
    ph, root = phantom_ds.ph, phantom_ds.root
    res = cli("calib", "-c", root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path, *phantom_ds.ll_args,
              "--m0-scale", "relaxed", "--cref", root / "cref.nii.gz", "--cact", root / "calib.nii.gz",
              "--bmask", root / "truth" / "brain_mask.nii.gz")
    assert res.rc == 0, res.err
    assert abs(res.m0 - ph.m0a) / ph.m0a < 5e-3


def test_satrecov_dtype_option(phantom_ds, cli, tmp_path):
    """--dtype float32 fits in single precision (as cohort --dtype); M0a within float32's
    fit tolerance of the float64 one."""
    root = phantom_ds.root
    runs = {}
    for dt in ("float32", "float64"):
        od = tmp_path / dt
        res = cli("calib", "-c", root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path, *phantom_ds.ll_args,
                  "--isen", root / "truth" / "sensitivity.nii.gz", "--dtype", dt, "--outdir", od,
                  "--bmask", root / "truth" / "brain_mask.nii.gz")
        assert res.rc == 0, res.err
        prov = json.loads((od / "provenance.json").read_text())
        assert prov["calibration"]["ref_fit"]["dtype"] == dt
        runs[dt] = res.m0
    assert runs["float32"] == pytest.approx(runs["float64"], rel=1e-4)


def test_satrecov_default_readout_scale(phantom_ds, cli):
    """Default --m0-scale readout (FSL asl_calib): M0t is left on the scale of the
    Look-Locker readout.  In a pure CSF voxel the fitted M0t, divided by the sensitivity
    given with --isen, is pc·M0a·sin(g·FA) (calibration.md §7.1: M0t = M0·sin θ_high,
    θ_high = g·FA); averaged over the mask and divided by pc, the printed M0 is
    M0a·mean(sin(g·35°)), g the true flip-angle scale of each mask voxel."""
    ph, root = phantom_ds.ph, phantom_ds.root
    res = cli("calib", "-c", root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path, *phantom_ds.ll_args,
              "--isen", root / "truth" / "sensitivity.nii.gz")
    assert res.rc == 0, res.err
    g = read_nifti(root / "truth" / "fa_scale.nii.gz")
    expected = ph.m0a * float(np.mean(np.sin(g[phantom_ds.pure_vent] * math.radians(35.0))))
    assert res.m0 == pytest.approx(expected, rel=1e-4)
    assert "fit_satrecov: 138 voxels" in res.err and "26307" not in res.err  # no --outdir: no whole-brain fit


# ==========================================================================================
# bad input: exit 2, one line on stderr, no traceback, no output files
# ==========================================================================================


def _all_outputs(root: Path) -> tuple[list, list[Path]]:
    """Every kind of output option, all under ``root`` (outdir does not exist yet)."""
    paths = {k: root / n for k, n in (("o", "cbf.nii.gz"), ("mo", "m0.txt"), ("om", "ref.nii.gz"),
                                       ("osen", "sen.nii.gz"), ("outdir", "od"))}
    argv = ["-o", paths["o"], "--Mo", paths["mo"], "--om", paths["om"], "--osen", paths["osen"],
            "--outdir", paths["outdir"]]
    return argv, list(paths.values())


def _syn_base(syn, **drop) -> list:
    args = {"-c": syn.calib_path, "-m": syn.mask_path, "-i": syn.perf_path, "--isen": syn.sens_path}
    argv = ["calib"]
    for k, v in args.items():
        if k not in drop.get("without", ()):
            argv += [k, v]
    return argv


def test_missing_calib(syn, bad_input):
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn, without=("-c",)) + outs, syn.root, outputs=paths)
    assert "-c" in err


def test_no_reference_mask(syn, bad_input):
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn, without=("-m",)) + outs, syn.root, outputs=paths)
    assert "mask" in err and "-m" in err


@pytest.mark.parametrize("auto,expected", [
    (["-s", "STRUCT"], "-t TRANS"),                       # a structural but no transform
    (["-t", "MAT"], "no way to make one"),                # a transform but nothing to segment
    (["-s", "STRUCT", "-t", "MAT"], "brain-extracted"),   # this "structural" is not a brain
])
def test_automatic_mask_needs_its_inputs(syn, bad_input, auto, expected):
    (syn.data / "struct.nii.gz").write_bytes((syn.calib_path).read_bytes())
    (syn.data / "asl2struct.mat").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    subst = {"STRUCT": syn.data / "struct.nii.gz", "MAT": syn.data / "asl2struct.mat"}
    outs, paths = _all_outputs(syn.root)
    argv = _syn_base(syn, without=("-m",)) + [subst.get(a, a) for a in auto] + outs
    err = bad_input(argv, syn.root, outputs=paths)
    assert expected in err


@pytest.mark.parametrize("extra,missing", [
    ([], ["t1r", "pc"]), (["--t1r", "3"], ["pc"]), (["--pc", "0.9"], ["t1r"])])
def test_tissref_none_needs_t1r_and_pc(syn, bad_input, extra, missing):
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn) + ["--tissref", "none", *extra] + outs, syn.root, outputs=paths)
    assert "none" in err and all(m in err for m in missing)


def test_unknown_tissref(syn, bad_input):
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn) + ["--tissref", "bone"] + outs, syn.root, outputs=paths)
    assert "bone" in err and "csf" in err


def test_empty_reference_mask(syn, bad_input):
    empty = save_nifti(syn.data / "empty.nii.gz", np.zeros(syn.calib.shape), syn.affine, np.uint8)
    outs, paths = _all_outputs(syn.root)
    argv = _syn_base(syn, without=("-m",)) + ["-m", empty] + outs
    err = bad_input(argv, syn.root, outputs=paths)
    assert "empty" in err and "check the mask" in err


def test_reference_mask_with_no_usable_voxel(syn, bad_input):
    """Every reference voxel zero in the calibration image: same advice as an empty mask."""
    calib = syn.calib.copy()
    calib[syn.mask] = 0.0
    cpath = save_nifti(syn.data / "calib0.nii.gz", calib, syn.affine)
    outs, paths = _all_outputs(syn.root)
    argv = _syn_base(syn, without=("-c",)) + ["-c", cpath] + outs
    err = bad_input(argv, syn.root, outputs=paths)
    assert "check the mask and its alignment" in err


def test_mask_shape_mismatch(syn, bad_input):
    mask = np.zeros((10, 9, 7), np.uint8)
    mask[3:6, 3:6, 3:5] = 1
    mpath = save_nifti(syn.data / "mask_shape.nii.gz", mask, syn.affine, np.uint8)
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn, without=("-m",)) + ["-m", mpath] + outs, syn.root, outputs=paths)
    assert "shape" in err and "(10, 9, 7)" in err and "(10, 9, 6)" in err


def test_mask_affine_mismatch(syn, bad_input):
    shifted = syn.affine.copy()
    shifted[0, 3] += 2.0  # one voxel along x
    mpath = save_nifti(syn.data / "mask_shift.nii.gz", syn.mask, shifted, np.uint8)
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn, without=("-m",)) + ["-m", mpath] + outs, syn.root, outputs=paths)
    assert "grid" in err or "voxel-to-world" in err


@pytest.mark.parametrize("opt", ["--isen", "-i"])
def test_other_inputs_off_grid(syn, bad_input, opt):
    shifted = syn.affine.copy()
    shifted[2, 3] -= 3.0
    path = save_nifti(syn.data / "off.nii.gz", syn.sens, shifted)
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn, without=(opt,)) + [opt, path] + outs, syn.root, outputs=paths)
    assert "off.nii.gz" in err


def _ll_bad(phantom_ds, tmp_path, bad_input, extra, tis=None) -> str:
    root = phantom_ds.root
    args = list(phantom_ds.ll_args)
    if tis is not None:
        args[args.index("--tis") + 1] = tis
    outs, paths = _all_outputs(tmp_path)
    argv = ["calib", "-c", root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path, *args,
            "--isen", root / "truth" / "sensitivity.nii.gz", "--bmask", root / "truth" / "brain_mask.nii.gz",
            "-i", root / "perfusion.nii.gz", *outs, *extra]
    return bad_input(argv, tmp_path, outputs=paths)


def test_ti_count_not_matching_volumes(phantom_ds, tmp_path, bad_input):
    # 48 volumes = 12 TIs x (3 + 1) phases; 5 TIs give 20 expected volumes
    err = _ll_bad(phantom_ds, tmp_path, bad_input, [], tis="0.1,0.4,0.7,1.0,1.3")
    assert "5" in err and "48" in err and "20" in err


@pytest.mark.parametrize("dt", ["-0.3", "0"])
def test_nonpositive_dt(phantom_ds, tmp_path, bad_input, dt):
    err = _ll_bad(phantom_ds, tmp_path, bad_input, ["--dt", dt])
    assert "dt" in err and "> 0" in err


@pytest.mark.parametrize("tr,taq", [("1.0", "1.5"), ("2.0", "2.0")])
def test_tr_not_above_taq(syn, bad_input, tr, taq):
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn) + ["--tr", tr, "--taq", taq] + outs, syn.root, outputs=paths)
    assert "tr" in err and "taq" in err


def test_satrecov_without_tis(phantom_ds, tmp_path, bad_input):
    outs, paths = _all_outputs(tmp_path)
    argv = ["calib", "-c", phantom_ds.root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path,
            "--mode", "satrecov", "--fa", "35", "-i", phantom_ds.root / "perfusion.nii.gz", *outs]
    err = bad_input(argv, tmp_path, outputs=paths)
    assert "--tis" in err


def test_satrecov_cref_needs_cact(phantom_ds, tmp_path, bad_input):
    """The ratio of a saturation-recovery series to a long-TR body-coil image is not the
    coil sensitivity (it was used as one, giving an M0 5x off): --cact is required."""
    outs, paths = _all_outputs(tmp_path)
    argv = ["calib", "-c", phantom_ds.root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path,
            *phantom_ds.ll_args, "--cref", phantom_ds.root / "cref.nii.gz", "-i", phantom_ds.root / "perfusion.nii.gz",
            *outs]
    err = bad_input(argv, tmp_path, outputs=paths)
    assert "--cact" in err and "satrecov" in err


@pytest.mark.parametrize("given", ["-i", "-o"])
def test_i_and_o_go_together(syn, bad_input, given):
    argv = ["calib", "-c", syn.calib_path, "-m", syn.mask_path, "--Mo", syn.root / "m0.txt"]
    argv += ["-i", syn.perf_path] if given == "-i" else ["-o", syn.root / "cbf.nii.gz"]
    err = bad_input(argv, syn.root, outputs=[syn.root / "m0.txt", syn.root / "cbf.nii.gz"])
    assert "-i" in err and "-o" in err


def _unreadable(kind: str, folder: Path, good: Path) -> Path:
    if kind == "missing":
        return folder / "nonexistent.nii.gz"
    if kind == "text":
        p = folder / "notes.nii.gz"
        p.write_text("this is not an image\n")
        return p
    if kind == "truncated-gz":
        p = folder / "truncated.nii.gz"
        raw = good.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return p
    if kind == "truncated-nii":  # valid gzip of a NIfTI whose data are cut short
        p = folder / "short.nii.gz"
        raw = gzip.decompress(good.read_bytes())
        p.write_bytes(gzip.compress(raw[: 352 + 100]))
        return p
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "text", "truncated-gz", "truncated-nii"])
@pytest.mark.parametrize("opt", ["-c", "-m", "--isen", "-i"])
def test_unreadable_input(syn, bad_input, kind, opt):
    good = {"-c": syn.calib_path, "-m": syn.mask_path, "--isen": syn.sens_path, "-i": syn.perf_path}[opt]
    bad = _unreadable(kind, syn.data, good)
    outs, paths = _all_outputs(syn.root)
    err = bad_input(_syn_base(syn, without=(opt,)) + [opt, bad] + outs, syn.root, outputs=paths)
    assert bad.name in err


def test_t1r_image_unreadable(syn, bad_input):
    outs, paths = _all_outputs(syn.root)
    bad = _unreadable("text", syn.data, syn.calib_path)
    err = bad_input(_syn_base(syn) + ["--t1r", bad] + outs, syn.root, outputs=paths)
    assert bad.name in err


@pytest.mark.parametrize("opt", ["-o", "--Mo", "--om", "--osen"])
@pytest.mark.parametrize("where", ["missing-folder", "under-a-file"])
def test_unwritable_output(syn, bad_input, opt, where):
    if where == "under-a-file":
        (syn.root / "somefile.txt").write_text("a regular file\n")
        target = syn.root / "somefile.txt" / "out.nii.gz"
    else:
        target = syn.root / "no_such_folder" / "out.nii.gz"
    outs, paths = _all_outputs(syn.root)
    i = outs.index(opt)
    outs[i + 1] = target
    err = bad_input(_syn_base(syn) + outs, syn.root, outputs=paths)
    assert str(target.parent) in err


@pytest.mark.parametrize("where", ["missing-parent", "under-a-file", "is-a-file"])
def test_unwritable_outdir(syn, bad_input, where):
    (syn.root / "somefile.txt").write_text("a regular file\n")
    target = {"missing-parent": syn.root / "a" / "b", "under-a-file": syn.root / "somefile.txt" / "od",
              "is-a-file": syn.root / "somefile.txt"}[where]
    outs, paths = _all_outputs(syn.root)
    outs[outs.index("--outdir") + 1] = target
    bad_input(_syn_base(syn) + outs, syn.root, outputs=paths)


@pytest.mark.parametrize("opt", ["-o", "--Mo", "--om", "--osen", "--outdir"])
def test_existing_output_needs_overwrite(syn, bad_input, cli, opt):
    outs, paths = _all_outputs(syn.root)
    existing = paths[["-o", "--Mo", "--om", "--osen", "--outdir"].index(opt)]
    if opt == "--outdir":
        existing.mkdir()
        existing = existing / "M0.txt"
    existing.write_text("precious\n")
    err = bad_input(_syn_base(syn) + outs, syn.root, outputs=paths)
    assert "exists" in err and "overwrite" in err
    assert existing.read_text() == "precious\n"
    # --overwrite replaces it (and writes every other output)
    res = cli(*_syn_base(syn), *outs, "--overwrite")
    assert res.rc == 0, res.err
    assert existing.read_bytes() != b"precious\n"
    for p in paths:
        assert p.exists()
    assert float((syn.root / "m0.txt").read_text()) == res.m0


def test_same_output_twice(syn, bad_input):
    outs, paths = _all_outputs(syn.root)
    outs[outs.index("--om") + 1] = outs[outs.index("-o") + 1]
    bad_input(_syn_base(syn) + outs, syn.root, outputs=paths)


def test_osen_without_sensitivity_source_is_not_silently_ignored(syn, cli):
    osen = syn.root / "sen.nii.gz"
    res = cli("calib", "-c", syn.calib_path, "-m", syn.mask_path, "--osen", osen)
    assert res.rc == 2 or osen.exists(), res.err


def test_bad_input_from_a_real_process(syn):
    """``python -m aslcal calib`` with a missing input: exit 2, one stderr line, no file."""
    mo = syn.root / "m0.txt"
    res = subprocess.run(
        [sys.executable, "-m", "aslcal", "calib", "-c", str(syn.data / "missing.nii.gz"), "-m",
         str(syn.mask_path), "--Mo", str(mo), "--outdir", str(syn.root / "od")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aslcal: error: "), res.stderr
    assert "missing.nii.gz" in lines[0] and "Traceback" not in res.stderr
    assert res.stdout == ""
    assert not mo.exists() and not (syn.root / "od").exists()


# ==========================================================================================
# help
# ==========================================================================================


def test_help(cli):
    res = cli("calib", "--help")
    assert res.rc == 0
    assert "usage: aslcal calib" in res.out
    for word in ("milliseconds", "seconds", "degrees"):
        assert word in res.out
    for opt in ("--te", "--tr", "--taq", "--t2star", "--cgain", "--Mo", "--om", "--osen", "--isen", "--tis",
                "--fa", "--lfa", "--nphases", "--outdir", "--overwrite"):
        assert opt in res.out


# ==========================================================================================
# timing (slow): 7 phases x 13 TIs, warm compile cache
# ==========================================================================================


@pytest.mark.slow
def test_timing_satrecov_look_locker_7x13(phantom_ds, tmp_path):
    ph, root = phantom_ds.ph, phantom_ds.root
    data, truth = look_locker_series(ph, ti1=0.1, dt=0.25, n_ti=13, fa=35, lfa=11.7, nphases=6, snr=None)
    assert data.shape[-1] == 7 * 13
    series = save_nifti(tmp_path / "ll_7x13.nii.gz", data, ph.affine)
    tis = ",".join(f"{t:g}" for t in truth["tis"])

    def argv(outdir):
        return [str(a) for a in (
            "calib", "-c", series, "-m", phantom_ds.pure_vent_path, "--mode", "satrecov", "--tis", tis,
            "--fa", 35, "--lfa", 11.7, "--nphases", 6, "--bmask", root / "truth" / "brain_mask.nii.gz",
            "--isen", root / "truth" / "sensitivity.nii.gz", "--m0-scale", "relaxed", "--outdir", outdir,
            "--quiet")]

    assert main(argv(tmp_path / "warm")) == 0  # fills the compile cache
    t0 = time.perf_counter()
    rc = main(argv(tmp_path / "timed"))
    total = time.perf_counter() - t0
    assert rc == 0
    prov = json.loads((tmp_path / "timed" / "provenance.json").read_text())
    cal = prov["calibration"]
    ref_t, brain_t = cal["ref_fit"]["timings_s"], cal["brain_fit"]["timings_s"]
    fit_kernel = ref_t["fit"] + brain_t["fit"]
    fit_total = ref_t["total"] + brain_t["total"]
    n_ref, n_brain = cal["ref_fit"]["n_fitted"], cal["brain_fit"]["n_fitted"]
    print(
        f"\naslcal calib --mode satrecov, Look-Locker 7 phases x 13 TIs = {data.shape[-1]} volumes, "
        f"grid {ph.shape}, backend {cal['brain_fit']['backend']}/{cal['brain_fit']['dtype']}\n"
        f"  end to end (main(), warm cache): {total:.3f} s\n"
        f"  load: {prov['timings_s']['load']:.3f} s, calibration step: {prov['timings_s']['calibration']:.3f} s\n"
        f"  reference fit ({n_ref} voxels): total {ref_t['total']:.3f} s, kernel {ref_t['fit']:.4f} s, "
        f"timings {ref_t}\n"
        f"  brain fit ({n_brain} voxels): total {brain_t['total']:.3f} s, kernel {brain_t['fit']:.4f} s, "
        f"timings {brain_t}\n"
        f"  fit share: fit_satrecov calls {fit_total:.3f} s = {100 * fit_total / total:.1f} % of the run; "
        f"LM kernels alone {fit_kernel:.3f} s = {100 * fit_kernel / total:.1f} %\n"
        f"  M0a {prov['m0a']:.6g} (true {ph.m0a:g})"
    )
    assert abs(prov["m0a"] - ph.m0a) / ph.m0a < 5e-3
    assert total < 30.0


def test_satrecov_float64_reads_the_data_in_float64(cli, tmp_path):
    """A float64 saturation-recovery series fitted in float64: M0a = mean(M0t)/pc (pure
    CSF table, TE 0) to the fit tolerance (~1e-9), which a float32 copy of the data
    (rounding 6e-8 per volume) cannot reach."""
    tis = np.array([0.3, 0.7, 1.3, 2.2, 3.5, 5.0, 8.0])
    rng = np.random.default_rng(0)
    shape = (5, 4, 3)
    t1 = rng.uniform(3.5, 4.8, shape)
    m0 = rng.uniform(900.0, 1300.0, shape) * 1.000000123
    y = m0[..., None] * (1.0 - np.exp(-tis / t1[..., None]))
    aff = np.diag([3.0, 3.0, 4.0, 1.0])
    save_nifti(tmp_path / "sr.nii.gz", y, aff, dtype=np.float64)
    rel = []
    for voxel in [(0, 0, 0), (2, 1, 1), (4, 3, 2)]:  # one-voxel reference masks: no averaging
        mask = np.zeros(shape)
        mask[voxel] = 1
        save_nifti(tmp_path / "mask.nii.gz", mask, aff, dtype=np.uint8)
        res = cli("calib", "-c", tmp_path / "sr.nii.gz", "-m", tmp_path / "mask.nii.gz", "--mode", "satrecov",
                  "--tis", ",".join(str(t) for t in tis), "--dtype", "float64")
        assert res.rc == 0, res.err
        expected = float(m0[voxel]) / TABLE_3T["csf"]["pc"]
        rel.append(abs(res.m0 - expected) / expected)
    assert max(rel) <= 1e-8, rel


def test_satrecov_too_few_tis_is_named(cli, tmp_path):
    """Two TIs for three free parameters: the error says so (and suggests --fixa), instead
    of a later 'no usable reference voxel'."""
    shape = (4, 4, 3)
    tis = np.array([0.5, 2.0])
    y = 1000.0 * (1.0 - np.exp(-tis / 4.3)) * np.ones(shape + (2,))
    aff = np.diag([3.0, 3.0, 4.0, 1.0])
    save_nifti(tmp_path / "sr.nii.gz", y, aff)
    save_nifti(tmp_path / "mask.nii.gz", np.ones(shape), aff, dtype=np.uint8)
    res = cli("calib", "-c", tmp_path / "sr.nii.gz", "-m", tmp_path / "mask.nii.gz", "--mode", "satrecov",
              "--tis", "0.5,2.0")
    assert res.rc == 2
    assert "2 distinct recovery times (TIs) for 3 free parameters (M0t, T1t, A)" in res.err
    assert "--fixa" in res.err and "usable value" not in res.err
    fixed = cli("calib", "-c", tmp_path / "sr.nii.gz", "-m", tmp_path / "mask.nii.gz", "--mode", "satrecov",
                "--tis", "0.5,2.0", "--fixa")
    assert fixed.rc == 0, fixed.err
    assert fixed.m0 == pytest.approx(1000.0 / TABLE_3T["csf"]["pc"], rel=1e-6)


def test_options_of_the_other_mode_are_said_to_be_ignored(phantom_ds, cli):
    root = phantom_ds.root
    res = cli("calib", "-c", root / "calib.nii.gz", "-m", phantom_ds.pure_vent_path, "--priors", "--nphases", "3",
              "--dtype", "float32")
    assert res.rc == 0, res.err
    assert "--nphases, --priors, --dtype: no effect in --mode longtr (ignored)" in res.err
    plain = cli("calib", "-c", root / "calib.nii.gz", "-m", phantom_ds.pure_vent_path)
    assert "ignored" not in plain.err and plain.m0 == pytest.approx(res.m0, rel=1e-6)
    sr = cli("calib", "-c", root / "calib_ll.nii.gz", "-m", phantom_ds.pure_vent_path, *phantom_ds.ll_args,
             "--tr", "1.0", "--taq", "0.5")
    assert sr.rc == 0, sr.err
    assert "--tr, --taq: no effect in --mode satrecov (ignored)" in sr.err


def test_output_folder_given_to_o_is_refused(phantom_ds, cli, tmp_path):
    """asl_calib's -o is an output folder; here -o is the calibrated image (its --of): a
    folder given to -o is refused instead of writing FOLDER.nii.gz beside it."""
    root = phantom_ds.root
    folder = tmp_path / "fslout"
    folder.mkdir()
    res = cli("calib", "-c", root / "calib.nii.gz", "-m", phantom_ds.pure_vent_path, "-i", root / "perfusion.nii.gz",
              "-o", folder, "--alpha", "1")
    assert res.rc == 2 and "is a folder" in res.err and "--outdir" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fslout"] and not any(folder.iterdir())


@pytest.mark.parametrize("option, value, message", [
    ("--pc", "0", "--pc 0.0: expected a finite number > 0 (ml/g)"),
    ("--t1r", "-1", "--t1r -1.0: expected a finite number > 0 (s)"),
    ("--taq", "-1", "--taq -1.0: expected a finite number >= 0 (s)"),
    ("--te", "-1", "--te -1.0: expected a finite number >= 0 (ms)"),
    ("--tr", "0", "--tr 0.0: expected a finite number > 0 (s)"),
])
def test_bad_values_are_named_by_the_option_typed(syn, bad_input, option, value, message):
    """The library words a bad value by its keyword (pc=0.0); the command line says the
    option the user typed, with nothing written."""
    line = bad_input(["calib", "-c", syn.calib_path, "-m", syn.mask_path, "--mode", "longtr", option, value],
                     syn.root)
    assert line == f"aslcal: error: {message}"


def test_a_keyword_value_that_was_not_typed_is_left_as_the_library_says(syn):
    """Only a value the user typed is rewritten: a message about another value of the
    same keyword (read from a file, say) keeps the keyword."""
    import argparse

    from aslcal.cli import _as_typed

    args = argparse.Namespace(te=12.0, anat="/a b", ref_masks=None)
    options = {"te": "--te", "anat": "--anat", "ref_masks": "--ref-masks"}
    assert _as_typed("te=12.0: bad", args, options) == "--te 12.0: bad"
    assert _as_typed("te=0.0: bad", args, options) == "te=0.0: bad"
    assert _as_typed("anat='/a b': missing", args, options) == "--anat '/a b': missing"
    assert _as_typed("ref_masks and anat: one", args, options) == "ref_masks and anat: one"  # --ref-masks not given
    assert _as_typed("other=1: x", args, options) == "other=1: x"
