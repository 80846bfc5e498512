"""BIDS timing fields in a cohort: what the white-paper model and the M0 fit take as delays.

The phantom cohort is white-paper ΔM with a 2-D readout, slice z read 40 ms x z after the
PLD (``SliceTiming`` in the ASL sidecar, ``MRAcquisitionType`` "2D").  Truth: the
phantom's CBF map, and the known kinetic factor exp(PLD/T1b) of the (p)CASL model, so a
delay of d seconds taken wrongly scales the CBF by exp(d/T1b) exactly.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from aslcal.cohort import CohortOptions
from aslcal.cohort.subject import SubjectError, finish_subject, load_subject
from aslcal.io.bids import discover
from aslcal.testing import make_phantom
from aslcal.testing.bids import make_bids_cohort

SLICEDT = 0.04


@pytest.fixture(scope="module")
def wp_cohort(tmp_path_factory):
    # sub-01: PCASL, separate long-TR M0; sub-02: included M0; sub-03: PASL (Q2TIPS), M0Estimate
    return make_bids_cohort(tmp_path_factory.mktemp("wp2d"), n_subjects=3, seed=1, broken=0,
                            kinetics="whitepaper", slicedt=SLICEDT, n_pairs=1, shape=(32, 32, 12))


def _copy(cohort, tmp_path):
    root = tmp_path / "bids"
    shutil.copytree(cohort.root, root)
    return root


def _edit(path, **fields):
    meta = json.loads(path.read_text())
    meta.update(fields)
    path.write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def _run(root, key):
    return next(r for r in discover(root) if r.key == key)


def _calibrate(root, key, quantification="whitepaper", **options):
    opts = CohortOptions(ref_masks=str(root / "derivatives" / "refmasks"), quantification=quantification,
                         **options)
    prep = load_subject(_run(root, key), opts, bids_root=root)
    out = finish_subject(prep, {}, opts)
    return out.images["cbf"][0], prep.brain, out


def _phantom_cbf(truth):
    ph = make_phantom(shape=truth.shape, voxel_size=truth.voxel_size, seed=truth.phantom_seed,
                      field_strength=truth.field_strength, m0a=truth.m0a, struct_voxel_size=(3.4, 3.4, 3.4),
                      struct_oversample=1)
    return ph.cbf


# ------------------------------------------------------------ MRAcquisitionType


@pytest.mark.parametrize("edit", [dict(SliceTiming=None), dict(MRAcquisitionType="3D")],
                         ids=["2D-without-SliceTiming", "3D-with-SliceTiming"])
def test_slice_timing_contradicting_the_acquisition_type_is_refused(wp_cohort, tmp_path, edit):
    """A 2-D run without SliceTiming was quantified as 3-D (top slices x exp(-0.44/T1b) =
    0.72 at 1.5 T), silently; a 3-D run with SliceTiming had its delays applied.  Both
    contradict BIDS: the subject fails naming the sidecar and SliceTiming."""
    root = _copy(wp_cohort, tmp_path)
    js = root / "sub-01" / "perf" / "sub-01_asl.json"
    _edit(js, **edit)
    with pytest.raises(SubjectError) as info:
        _calibrate(root, "sub-01")
    assert info.value.details["field"] == "SliceTiming" and info.value.details["file"] == str(js)
    assert "MRAcquisitionType" in info.value.message
    # calibration only uses no slice delays: the run is fine there
    _calibrate(root, "sub-01", quantification="calibration")


def test_without_acquisition_type_slice_timing_decides(wp_cohort, tmp_path):
    root = _copy(wp_cohort, tmp_path)
    _edit(root / "sub-01" / "perf" / "sub-01_asl.json", MRAcquisitionType=None)
    cbf, brain, _ = _calibrate(root, "sub-01")
    truth = _phantom_cbf(wp_cohort.runs["sub-01"])
    np.testing.assert_allclose(cbf[brain], truth[brain], rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------ IntendedFor of the m0scan


@pytest.fixture(scope="module")
def cal_cohort(tmp_path_factory):
    # sub-01: PCASL, a separate long-TR m0scan whose IntendedFor names its ASL image
    return make_bids_cohort(tmp_path_factory.mktemp("cal"), n_subjects=1, seed=1, broken=0, n_pairs=1,
                            shape=(32, 32, 12))


def _rename(perf, old, new, masks=None):
    for f in list(perf.iterdir()):
        if f.name.startswith(old + "_"):
            f.rename(perf / (new + f.name[len(old):]))
    if masks is not None:
        (masks / f"{old}_desc-ref_mask.nii.gz").rename(masks / f"{new}_desc-ref_mask.nii.gz")


def _scale_image(path, factor):
    import nibabel

    img = nibabel.load(str(path))
    nibabel.save(nibabel.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * factor, img.affine), str(path))


def _two_runs(cohort, tmp_path):
    """sub-01_run-1 and sub-01_run-2: the same data, run-2's m0scan twice as bright."""
    root = _copy(cohort, tmp_path)
    perf, masks = root / "sub-01" / "perf", root / "derivatives" / "refmasks" / "sub-01" / "perf"
    _rename(perf, "sub-01", "sub-01_run-1", masks)
    for f in list(perf.iterdir()):
        shutil.copy(f, perf / f.name.replace("run-1", "run-2"))
    shutil.copy(masks / "sub-01_run-1_desc-ref_mask.nii.gz", masks / "sub-01_run-2_desc-ref_mask.nii.gz")
    _scale_image(perf / "sub-01_run-2_m0scan.nii.gz", 2.0)
    return root, perf


def _m0a(root, key):
    _, _, out = _calibrate(root, key, quantification="calibration")
    return out.records["summary"]["M0a"], out


def test_m0scan_intended_for_another_run_is_refused(cal_cohort, tmp_path):
    """The m0scans' IntendedFor crossed (run-1's names run-2's ASL and back): pairing by
    name gave run-1 the M0 BIDS says is run-2's (M0a off by 2x), silently."""
    root, perf = _two_runs(cal_cohort, tmp_path)
    _edit(perf / "sub-01_run-1_m0scan.json", IntendedFor="bids::sub-01/perf/sub-01_run-2_asl.nii.gz")
    _edit(perf / "sub-01_run-2_m0scan.json", IntendedFor=["perf/sub-01_run-1_asl.nii.gz"])
    for key in ("sub-01_run-1", "sub-01_run-2"):
        with pytest.raises(SubjectError) as info:
            _calibrate(root, key, quantification="calibration")
        assert info.value.stage == "metadata" and info.value.details["field"] == "IntendedFor"
        assert info.value.details["file"] == str(perf / f"{key}_m0scan.json")


def test_m0scan_intended_for_its_run_in_any_bids_form_is_used(cal_cohort, tmp_path):
    truth = cal_cohort.runs["sub-01"].m0a_te
    root, perf = _two_runs(cal_cohort, tmp_path)
    # deprecated subject-relative path, .nii for .nii.gz, in a list
    _edit(perf / "sub-01_run-1_m0scan.json", IntendedFor=["perf/sub-01_run-1_asl.nii", "bids::x.nii"])
    _edit(perf / "sub-01_run-2_m0scan.json", IntendedFor="bids::sub-01/perf/sub-01_run-2_asl.nii.gz")
    assert _m0a(root, "sub-01_run-1")[0] == pytest.approx(truth, rel=1e-5)
    assert _m0a(root, "sub-01_run-2")[0] == pytest.approx(2 * truth, rel=1e-5)
    # relative to the dataset root (a common converter slip) or with a leading ./: the
    # same image, no other reading is possible (these were refused)
    _edit(perf / "sub-01_run-1_m0scan.json", IntendedFor="sub-01/perf/sub-01_run-1_asl.nii.gz")
    _edit(perf / "sub-01_run-2_m0scan.json", IntendedFor="./perf/sub-01_run-2_asl.nii.gz")
    assert _m0a(root, "sub-01_run-1")[0] == pytest.approx(truth, rel=1e-5)
    assert _m0a(root, "sub-01_run-2")[0] == pytest.approx(2 * truth, rel=1e-5)


def test_m0scan_found_by_intended_for_is_used_and_recorded(cal_cohort, tmp_path):
    """An ASL image with an acq- entity its m0scan lacks (valid BIDS: IntendedFor links
    them) was refused as having no m0scan; a decoy m0scan meant for another image is not
    taken."""
    truth = cal_cohort.runs["sub-01"].m0a_te
    root = _copy(cal_cohort, tmp_path)
    perf, masks = root / "sub-01" / "perf", root / "derivatives" / "refmasks" / "sub-01" / "perf"
    for suffix in ("asl.nii.gz", "asl.json", "aslcontext.tsv"):
        (perf / f"sub-01_{suffix}").rename(perf / f"sub-01_acq-pcasl_{suffix}")
    (masks / "sub-01_desc-ref_mask.nii.gz").rename(masks / "sub-01_acq-pcasl_desc-ref_mask.nii.gz")
    _edit(perf / "sub-01_m0scan.json", IntendedFor="bids::sub-01/perf/sub-01_acq-pcasl_asl.nii.gz")
    shutil.copy(perf / "sub-01_m0scan.nii.gz", perf / "sub-01_acq-other_m0scan.nii.gz")
    _scale_image(perf / "sub-01_acq-other_m0scan.nii.gz", 3.0)
    shutil.copy(perf / "sub-01_m0scan.json", perf / "sub-01_acq-other_m0scan.json")
    _edit(perf / "sub-01_acq-other_m0scan.json", IntendedFor="bids::sub-01/perf/sub-01_acq-other_asl.nii.gz")
    m0a, out = _m0a(root, "sub-01_acq-pcasl")
    assert m0a == pytest.approx(truth, rel=1e-5)
    inputs = out.provenance["inputs"]
    for name in ("sub-01/perf/sub-01_m0scan.nii.gz", "sub-01/perf/sub-01_m0scan.json"):
        assert name in inputs["files"] and inputs["checksums"][name]
    assert not any("acq-other" in name for name in inputs["files"])
    # a second m0scan naming it too: which one is meant is unknown
    _edit(perf / "sub-01_acq-other_m0scan.json", IntendedFor=["bids::sub-01/perf/sub-01_acq-pcasl_asl.nii.gz"])
    with pytest.raises(SubjectError) as info:
        _calibrate(root, "sub-01_acq-pcasl", quantification="calibration")
    assert info.value.details["field"] == "IntendedFor"
    assert info.value.details["file"] == str(perf / "sub-01_acq-other_m0scan.json")
    assert "sub-01_m0scan.json" in info.value.message


# ------------------------------------------------------------ SliceTiming offset


def test_slice_delays_count_from_the_first_slice_acquired(wp_cohort, tmp_path):
    """BIDS: the PLD runs until the first slice is excited, SliceTiming from the volume's
    start.  SliceTiming all +0.1 s (the first slice read 0.1 s into the volume) is the
    same acquisition; taken as delays it scaled every slice's CBF by exp(0.1/T1b) (+8 %)."""
    root = _copy(wp_cohort, tmp_path)
    js = root / "sub-01" / "perf" / "sub-01_asl.json"
    meta = json.loads(js.read_text())
    _edit(js, SliceTiming=[t + 0.1 for t in meta["SliceTiming"]])
    cbf, brain, out = _calibrate(root, "sub-01")
    truth = _phantom_cbf(wp_cohort.runs["sub-01"])
    np.testing.assert_allclose(cbf[brain], truth[brain], rtol=1e-4, atol=1e-3)
    times = out.provenance["calibration"]["cbf"]["slice_times_s"]
    assert times == pytest.approx(SLICEDT * np.arange(len(times)))


def test_inherited_aslcontext_is_read_and_recorded(cal_cohort, tmp_path):
    root = _copy(cal_cohort, tmp_path)
    shutil.move(root / "sub-01" / "perf" / "sub-01_aslcontext.tsv", root / "sub-01" / "sub-01_aslcontext.tsv")
    m0a, out = _m0a(root, "sub-01")
    assert m0a == pytest.approx(cal_cohort.runs["sub-01"].m0a_te, rel=1e-5)
    files = out.provenance["inputs"]["files"]
    assert "sub-01/sub-01_aslcontext.tsv" in files and "sub-01/perf/sub-01_aslcontext.tsv" not in files


# ------------------------------------------------------------ what messages and records name


def test_included_m0_volumes_with_their_own_echo_time(wp_cohort, tmp_path):
    """Per-volume EchoTime, the m0scan volumes of an Included M0 at 10 ms, the ASL volumes
    at 5 ms: refused as "multi-echo ASL" before.  The M0's tissue T2 correction takes the
    m0scan volumes' TE and the blood T2 decay the ASL volumes': against the run as written
    (one TE te0 for all), M0a x exp(10 ms / T2 of CSF) x exp(-5 ms / T2 of blood) x
    exp(te0 / T2 of blood) / exp(te0 / T2 of CSF) (750 and 150 ms at 3 T)."""
    root = _copy(wp_cohort, tmp_path)
    base = _m0a(root, "sub-02")[0]
    run = wp_cohort.runs["sub-02"]
    assert run.field_strength == 3.0
    te0 = run.te_ms
    _edit(root / "sub-02" / "perf" / "sub-02_asl.json", EchoTime=[0.010, 0.010, 0.005, 0.005])
    m0a, out = _m0a(root, "sub-02")
    assert m0a / base == pytest.approx(np.exp(10.0 / 750.0) * np.exp(-5.0 / 150.0) * np.exp(te0 / 150.0)
                                       / np.exp(te0 / 750.0), rel=1e-6)
    assert out.provenance["inputs"]["te_ms"] == 5.0


def test_m0_estimate_provenance_names_the_file_it_came_from(wp_cohort, tmp_path):
    root = _copy(wp_cohort, tmp_path)
    js = root / "sub-03" / "perf" / "sub-03_asl.json"
    meta = json.loads(js.read_text())
    (root / "sub-03" / "sub-03_asl.json").write_text(json.dumps({"M0Estimate": meta.pop("M0Estimate")}))
    js.write_text(json.dumps(meta))
    m0a, out = _m0a(root, "sub-03")
    assert m0a == pytest.approx(wp_cohort.runs["sub-03"].m0a_te, rel=1e-5)
    assert out.provenance["calibration"]["m0a_source"] == "M0Estimate of sub-03/sub-03_asl.json"


# ------------------------------------------------------------ accepted silently before


@pytest.mark.parametrize("technique", ["QUIPSS", "quipss ", "QUIPSS I", "QUIPSS-1", "PULSAR", 7])
def test_quipss_one_is_refused_by_the_white_paper_model(wp_cohort, tmp_path, technique):
    """The white-paper PASL formula needs a bolus TI1 long (QUIPSS II / Q2TIPS); QUIPSS I
    was quantified with it as if it were one."""
    root = _copy(wp_cohort, tmp_path)
    js = root / "sub-03" / "perf" / "sub-03_asl.json"
    _edit(js, BolusCutOffTechnique=technique)
    with pytest.raises(SubjectError) as info:
        _calibrate(root, "sub-03")
    assert info.value.details["field"] == "BolusCutOffTechnique" and info.value.details["file"] == str(js)
    truth = _phantom_cbf(wp_cohort.runs["sub-03"])
    for accepted in ("QUIPSSII", "QUIPSS II", "Q2TIPS"):
        _edit(js, BolusCutOffTechnique=accepted)
        cbf, brain, _ = _calibrate(root, "sub-03")
        np.testing.assert_allclose(cbf[brain], truth[brain], rtol=1e-4, atol=1e-3)


def test_absent_m0type_beside_an_m0scan_is_a_warning(cal_cohort, tmp_path):
    root = _copy(cal_cohort, tmp_path)
    _edit(root / "sub-01" / "perf" / "sub-01_asl.json", M0Type="Absent")
    _, _, out = _calibrate(root, "sub-01", quantification="calibration", allow_control_m0=True)
    warnings = out.records["summary"]["warnings"]
    assert "M0Type 'Absent'" in warnings and "sub-01_m0scan.nii.gz" in warnings
    assert out.provenance["calibration"]["warnings"] == [warnings]


def test_several_plds_averaged_in_calibration_mode_are_a_warning(cal_cohort, tmp_path):
    root = _copy(cal_cohort, tmp_path)
    js = root / "sub-01" / "perf" / "sub-01_asl.json"
    _, _, out = _calibrate(root, "sub-01", quantification="calibration")
    assert "warnings" not in out.records["summary"]
    _edit(js, PostLabelingDelay=[1.8, 0.5])
    _, _, out = _calibrate(root, "sub-01", quantification="calibration")
    assert "PLDs were averaged" in out.records["summary"]["warnings"]
    assert "[0.5, 1.8]" in out.records["summary"]["warnings"]


# ------------------------------------------------------------ vendor scaling (warned, not corrected)


def _warnings(root, key="sub-01"):
    _, _, out = _calibrate(root, key, quantification="calibration")
    return out.records["summary"].get("warnings", "")


def test_ge_deltam_scaling_is_a_warning(cal_cohort, tmp_path):
    import nibabel

    root = _copy(cal_cohort, tmp_path)
    perf = root / "sub-01" / "perf"
    js = perf / "sub-01_asl.json"
    _edit(js, Manufacturer="GE MEDICAL SYSTEMS", NumberOfAverages=3)
    assert "GE" not in _warnings(root)  # control and label volumes: no product deltam
    img = nibabel.load(str(perf / "sub-01_asl.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    nibabel.save(nibabel.Nifti1Image(data[..., 0] - data[..., 1], img.affine), str(perf / "sub-01_asl.nii.gz"))
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\ndeltam\n")
    warning = _warnings(root)
    assert "32 x NumberOfAverages" in warning and "--cgain 96" in warning
    # without NumberOfAverages: TotalAcquiredPairs, which GE's NEX usually is, as a hint
    _edit(js, Manufacturer="ge", NumberOfAverages=None, TotalAcquiredPairs=4)
    warning = _warnings(root)
    assert "--cgain 32*NEX" in warning and "TotalAcquiredPairs, 4 here: --cgain 128" in warning
    _edit(js, TotalAcquiredPairs=None)
    assert "--cgain 32*NEX" in _warnings(root) and "TotalAcquiredPairs" not in _warnings(root)
    _edit(js, Manufacturer="Siemens")
    assert _warnings(root) == ""


def test_philips_display_values_with_different_slopes_are_a_warning(cal_cohort, tmp_path):
    root = _copy(cal_cohort, tmp_path)
    perf = root / "sub-01" / "perf"
    _edit(perf / "sub-01_asl.json", Manufacturer="Philips", UsePhilipsFloatNotDisplayScaling=0,
          PhilipsRescaleSlope=2.5, PhilipsScaleSlope=0.01)
    _edit(perf / "sub-01_m0scan.json", PhilipsRescaleSlope=1.25, PhilipsScaleSlope=0.01)
    warning = _warnings(root)
    assert "PhilipsRescaleSlope 2.5 (ASL) vs 1.25 (M0), ratio 2" in warning and "PhilipsScaleSlope" not in warning
    assert "off by the ratio of the slopes" in warning
    _edit(perf / "sub-01_asl.json", UsePhilipsFloatNotDisplayScaling=1)
    assert _warnings(root) == ""
    _edit(perf / "sub-01_asl.json", UsePhilipsFloatNotDisplayScaling=0, PhilipsRescaleSlope=1.25)
    assert _warnings(root) == ""
