"""aslcal.io.bids: discovery and the checked metadata of BIDS ASL runs."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest

import aslcal.io
from aslcal.errors import InputError
from aslcal.io import bids, save_image
from aslcal.io.bids import AslRun, BidsFieldError, discover, read_run
from aslcal.testing.bids import make_bids_cohort

AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])


def _base_meta(**extra):
    meta = {
        "ArterialSpinLabelingType": "PCASL",
        "M0Type": "Separate",
        "RepetitionTimePreparation": 4.0,
        "EchoTime": 0.012,
        "MagneticFieldStrength": 3,
        "BackgroundSuppression": False,
        "PostLabelingDelay": 1.8,
        "LabelingDuration": 1.8,
    }
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}


def _write_run(root, sub="01", *, ses=None, run=None, types=("control", "label") * 2,
               n_volumes=None, meta=None, m0=None, m0_meta=None, tsv_types=None):
    """Write one ASL run; return its perf folder.  ``m0`` is an m0scan volume count."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    perf = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "perf"
    perf.mkdir(parents=True, exist_ok=True)
    key = "_".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ([f"run-{run}"] if run else []))
    n = len(types) if n_volumes is None else n_volumes
    data = np.arange(4 * 4 * 3 * n, dtype=np.float32).reshape(4, 4, 3, n) + 100.0
    save_image(perf / f"{key}_asl.nii.gz", data if n > 1 else data[..., 0], AFFINE)
    (perf / f"{key}_asl.json").write_text(json.dumps(_base_meta() if meta is None else meta))
    lines = "".join(f"{t}\n" for t in (types if tsv_types is None else tsv_types))
    (perf / f"{key}_aslcontext.tsv").write_text("volume_type\n" + lines)
    if m0 is not None:
        m0data = np.full((4, 4, 3, m0), 500.0, dtype=np.float32) + np.arange(m0, dtype=np.float32)
        save_image(perf / f"{key}_m0scan.nii", m0data if m0 > 1 else m0data[..., 0], AFFINE)
        mm = {"RepetitionTimePreparation": 6.0, "EchoTime": 0.012} if m0_meta is None else m0_meta
        (perf / f"{key}_m0scan.json").write_text(json.dumps(mm))
    return perf


def _only(root, **kw):
    runs = discover(root, **kw)
    assert len(runs) == 1
    return runs[0]


# ----------------------------------------------------------------------- discovery


def test_discover_order_keys_and_paths(tmp_path):
    _write_run(tmp_path, "10", m0=1)
    _write_run(tmp_path, "02", ses="2", run="10")
    _write_run(tmp_path, "02", ses="2", run="9")
    _write_run(tmp_path, "02", ses="10")
    _write_run(tmp_path, "02", ses="1")
    runs = discover(tmp_path)
    assert [r.key for r in runs] == [
        "sub-02_ses-1", "sub-02_ses-2_run-9", "sub-02_ses-2_run-10", "sub-02_ses-10", "sub-10",
    ]
    r = runs[1]
    assert (r.subject, r.session, r.run) == ("02", "2", "9")
    assert r.entities == {"sub": "02", "ses": "2", "run": "9"}
    assert r.sidecar.name == "sub-02_ses-2_run-9_asl.json"
    assert r.aslcontext.name == "sub-02_ses-2_run-9_aslcontext.tsv"
    assert r.m0scan is None
    last = runs[-1]
    assert last.m0scan.name == "sub-10_m0scan.nii" and last.m0scan_sidecar.name == "sub-10_m0scan.json"


def test_discover_participant_filter(tmp_path):
    for s in ("01", "02", "03"):
        _write_run(tmp_path, s)
    assert [r.subject for r in discover(tmp_path, participant_label="sub-02")] == ["02"]
    assert [r.subject for r in discover(tmp_path, participant_label=["03", "sub-01"])] == ["01", "03"]
    with pytest.raises(InputError, match="99"):
        discover(tmp_path, participant_label="99")


def test_discover_skips_non_bids_names_without_stopping(tmp_path, caplog):
    """A *_asl file whose name BIDS ASL does not allow (task entity, entities out of
    order, a non-numeric run) is no run: listed in ``rejected`` (or logged), the other
    runs are found."""
    perf = _write_run(tmp_path, "01")
    _write_run(tmp_path, "02")
    for bad in ("sub-01_task-rest_asl.nii.gz", "sub-01_run-1_acq-x_asl.nii.gz", "sub-01_run-a_asl.nii.gz"):
        shutil.copy(perf / "sub-01_asl.nii.gz", perf / bad)
    rejected = []
    runs = discover(tmp_path, rejected=rejected)
    assert [r.key for r in runs] == ["sub-01", "sub-02"]
    reasons = {p.name: why for p, why in rejected}
    assert sorted(reasons) == ["sub-01_run-1_acq-x_asl.nii.gz", "sub-01_run-a_asl.nii.gz", "sub-01_task-rest_asl.nii.gz"]
    assert "'task' is not a BIDS ASL entity" in reasons["sub-01_task-rest_asl.nii.gz"]
    assert "out of BIDS order" in reasons["sub-01_run-1_acq-x_asl.nii.gz"]
    assert "index" in reasons["sub-01_run-a_asl.nii.gz"]
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        assert len(discover(tmp_path)) == 2
    assert sum("not a usable BIDS ASL file" in r.message for r in caplog.records) == 3


def test_discover_rejects_files_that_cannot_be_runs(tmp_path):
    """Labels that are not alphanumeric (sub-0-1, sub-ü3), files whose sub/ses entities
    disagree with their folders, and dangling symbolic links (git-annex content not
    fetched) are listed in ``rejected``, never silently dropped; the good run is found."""
    _write_run(tmp_path, "01")
    bad = tmp_path / "sub-0-1" / "perf"
    bad.mkdir(parents=True)
    shutil.copy(tmp_path / "sub-01" / "perf" / "sub-01_asl.nii.gz", bad / "sub-0-1_asl.nii.gz")
    uni = tmp_path / "sub-\u00fc3" / "perf"
    uni.mkdir(parents=True)
    shutil.copy(tmp_path / "sub-01" / "perf" / "sub-01_asl.nii.gz", uni / "sub-\u00fc3_asl.nii.gz")
    ses = tmp_path / "sub-01" / "ses-1" / "perf"
    ses.mkdir(parents=True)
    shutil.copy(tmp_path / "sub-01" / "perf" / "sub-01_asl.nii.gz", ses / "sub-01_asl.nii.gz")  # no ses entity
    shutil.copy(tmp_path / "sub-01" / "perf" / "sub-01_asl.nii.gz", ses / "sub-09_ses-1_asl.nii.gz")  # other subject
    (tmp_path / "sub-01" / "perf" / "sub-01_run-2_asl.nii.gz").symlink_to("../.git/annex/objects/missing.nii.gz")
    rejected = []
    runs = discover(tmp_path, rejected=rejected)
    assert [r.key for r in runs] == ["sub-01"]
    reasons = {str(p.relative_to(tmp_path)): why for p, why in rejected}
    assert sorted(reasons) == sorted([
        "sub-0-1/perf/sub-0-1_asl.nii.gz", "sub-\u00fc3/perf/sub-\u00fc3_asl.nii.gz",
        "sub-01/ses-1/perf/sub-01_asl.nii.gz", "sub-01/ses-1/perf/sub-09_ses-1_asl.nii.gz",
        "sub-01/perf/sub-01_run-2_asl.nii.gz"])
    assert "letters and digits" in reasons["sub-0-1/perf/sub-0-1_asl.nii.gz"]
    assert "does not match ses-1" in reasons["sub-01/ses-1/perf/sub-01_asl.nii.gz"]
    assert "not the folder's sub-01" in reasons["sub-01/ses-1/perf/sub-09_ses-1_asl.nii.gz"]
    assert "missing file" in reasons["sub-01/perf/sub-01_run-2_asl.nii.gz"]


def test_discover_rejects_upper_case_names_and_folders_and_ignores_hidden_files(tmp_path):
    """An ASL image named in upper case (``_asl.NII.GZ``) or a folder named like one is
    listed in ``rejected`` (before: dropped without a word, the run ended with exit 0);
    hidden files (macOS ``._`` twins) are no part of a BIDS dataset: ignored, not rejected."""
    _write_run(tmp_path, "01")
    src = tmp_path / "sub-01" / "perf" / "sub-01_asl.nii.gz"
    upper = tmp_path / "sub-02" / "perf"
    upper.mkdir(parents=True)
    shutil.copy(src, upper / "sub-02_asl.NII.GZ")
    (tmp_path / "sub-03" / "perf" / "sub-03_asl.nii.gz").mkdir(parents=True)
    shutil.copy(src, src.parent / "._sub-01_asl.nii.gz")
    shutil.copy(src, src.parent / ".sub-01_run-2_asl.nii.gz")
    rejected = []
    runs = discover(tmp_path, rejected=rejected)
    assert [r.key for r in runs] == ["sub-01"]
    reasons = {str(p.relative_to(tmp_path)): why for p, why in rejected}
    assert sorted(reasons) == ["sub-02/perf/sub-02_asl.NII.GZ", "sub-03/perf/sub-03_asl.nii.gz"]
    assert "lower case" in reasons["sub-02/perf/sub-02_asl.NII.GZ"]
    assert "a folder" in reasons["sub-03/perf/sub-03_asl.nii.gz"]


def test_two_images_of_one_run_are_a_per_run_error(tmp_path):
    """sub-01_asl.nii beside sub-01_asl.nii.gz: one run (not a duplicate key that stops
    the cohort), refused by read_run naming both files; the other runs are unaffected."""
    perf = _write_run(tmp_path, "01", m0=1)
    _write_run(tmp_path, "02", m0=1)
    nibabel.save(nibabel.load(str(perf / "sub-01_asl.nii.gz")), str(perf / "sub-01_asl.nii"))
    runs = discover(tmp_path)
    assert [r.key for r in runs] == ["sub-01", "sub-02"]
    assert runs[0].asl.name == "sub-01_asl.nii.gz" and runs[0].duplicate.name == "sub-01_asl.nii"
    with pytest.raises(BidsFieldError) as info:
        read_run(runs[0])
    assert "sub-01_asl.nii.gz and sub-01_asl.nii" in str(info.value) and info.value.file == str(runs[0].duplicate)
    read_run(runs[1])


def test_discover_errors(tmp_path):
    with pytest.raises(InputError, match="not a folder"):
        discover(tmp_path / "nope")
    (tmp_path / "sub-01" / "perf").mkdir(parents=True)
    with pytest.raises(InputError, match="dataset_description.json"):
        discover(tmp_path)
    (tmp_path / "dataset_description.json").write_text("{}")
    with pytest.raises(InputError, match="no ASL runs"):
        discover(tmp_path)


# -------------------------------------------------------------------- happy paths


def test_separate_single_volume_and_units(tmp_path):
    _write_run(tmp_path, m0=1)
    acq = read_run(_only(tmp_path))
    assert acq.labeling_type == "PCASL" and acq.alpha == 0.85
    assert acq.m0_type == "Separate" and acq.m0.kind == "separate"
    assert acq.te_ms == pytest.approx(12.0)  # BIDS 0.012 s -> 12 ms
    assert acq.m0.te_ms == pytest.approx(12.0)
    assert acq.field_strength == 3.0
    assert acq.n_volumes == 4 and acq.shape == (4, 4, 3, 4)
    assert acq.tr == (4.0,) * 4
    assert acq.volume_types == ("control", "label") * 2
    assert acq.volumes_of("control") == (0, 2)
    assert acq.m0.trs == (6.0,) and not acq.m0.is_satrecov
    assert acq.post_labeling_delay == (1.8,) * 4
    m0 = acq.load_m0()
    assert m0.data.shape == (4, 4, 3, 1) and np.all(m0.data == 500.0)
    assert acq.load_asl().data.shape == (4, 4, 3, 4)


def test_included_with_per_volume_tr(tmp_path):
    types = ("m0scan", "m0scan", "control", "label")
    meta = _base_meta(M0Type="Included", RepetitionTimePreparation=[5.0, 5.0, 4.0, 4.0],
                      PostLabelingDelay=[0.0, 0.0, 1.8, 1.8])
    _write_run(tmp_path, types=types, meta=meta)
    acq = read_run(_only(tmp_path))
    assert acq.m0.kind == "included" and acq.m0.volumes == (0, 1)
    assert acq.m0.trs == (5.0, 5.0) and acq.tr == (5.0, 5.0, 4.0, 4.0)
    assert acq.m0.path == acq.run.asl
    m0 = acq.load_m0()
    full = acq.load_asl()
    np.testing.assert_array_equal(m0.data, full.data[..., :2])


def test_estimate(tmp_path):
    _write_run(tmp_path, meta=_base_meta(M0Type="Estimate", M0Estimate=1234.5))
    acq = read_run(_only(tmp_path))
    assert acq.m0.kind == "estimate" and acq.m0.estimate == 1234.5 and acq.m0.path is None
    with pytest.raises(InputError, match="Estimate"):
        acq.load_m0()


def test_satrecov_m0_keeps_each_tr(tmp_path):
    trs = [0.5, 1.0, 2.0, 4.0]
    _write_run(tmp_path, m0=4, m0_meta={"RepetitionTimePreparation": trs, "EchoTime": 0.011})
    acq = read_run(_only(tmp_path))
    assert acq.m0.trs == tuple(trs) and acq.m0.distinct_trs == tuple(trs)
    assert acq.m0.is_satrecov and acq.m0.te_ms == pytest.approx(11.0)
    assert acq.load_m0().data.shape == (4, 4, 3, 4)


@pytest.mark.parametrize("where", ["asl", "m0scan"])
def test_echo_time_zero_is_refused(tmp_path, where):
    """BIDS: EchoTime > 0.  0 was accepted and silently dropped the T2 corrections (M0a
    +5.8 % for the ASL's, -1.8 % for the m0scan's in an audit)."""
    if where == "asl":
        _write_run(tmp_path, m0=1, meta=_base_meta(EchoTime=0.0))
    else:
        _write_run(tmp_path, m0=1, m0_meta={"RepetitionTimePreparation": 6.0, "EchoTime": 0.0})
    with pytest.raises(BidsFieldError, match="'EchoTime'") as info:
        read_run(_only(tmp_path))
    assert info.value.field == "EchoTime" and info.value.file.endswith(f"_{where}.json")


def test_look_locker_asl_and_m0(tmp_path):
    tis = [0.1, 0.4, 0.7]
    meta = _base_meta(M0Type="Included", LookLocker=True, FlipAngle=[35.0, 35.0, 35.0, 90.0],
                      InversionTime=tis + [1.0])
    _write_run(tmp_path, "01", types=("m0scan",) * 3 + ("control",), meta=meta)
    _write_run(tmp_path, "02", m0=3, m0_meta={
        "RepetitionTimePreparation": 4.1, "EchoTime": 0.01, "LookLocker": True,
        "FlipAngle": 35, "InversionTime": tis})
    a, b = (read_run(r) for r in discover(tmp_path))
    assert a.look_locker and a.flip_angle == (35.0, 35.0, 35.0, 90.0)
    assert a.m0.look_locker and a.m0.tis == tuple(tis) and a.m0.flip_angle == (35.0,) * 3
    assert a.m0.is_satrecov
    assert not b.look_locker and b.m0.look_locker and b.m0.tis == tuple(tis)
    assert b.m0.flip_angle == (35.0,) * 3 and b.m0.trs == (4.1,) * 3


@pytest.mark.parametrize(("value", "expected"), [(1.5, 1.5), (2.89, 3.0), (7, 7.0)])
def test_field_strength_tables(tmp_path, value, expected):
    _write_run(tmp_path, m0=1, meta=_base_meta(MagneticFieldStrength=value))
    acq = read_run(_only(tmp_path))
    assert acq.field_strength == expected and acq.magnetic_field_strength == value


def test_pasl_alpha_and_labeling_efficiency(tmp_path):
    _write_run(tmp_path, "01", m0=1, meta=_base_meta(ArterialSpinLabelingType="PASL"))
    _write_run(tmp_path, "02", m0=1, meta=_base_meta(LabelingEfficiency=0.7))
    a, b = (read_run(r) for r in discover(tmp_path))
    assert a.alpha == 0.98 and b.alpha == 0.7


def test_absent_allowed_uses_controls_without_background_suppression(tmp_path):
    _write_run(tmp_path, meta=_base_meta(M0Type="Absent"))
    run = _only(tmp_path)
    with pytest.raises(InputError, match="'M0Type' = 'Absent'"):
        read_run(run)
    acq = read_run(run, allow_control_m0=True)
    assert acq.m0.kind == "control" and acq.m0.volumes == (0, 2)


def test_single_volume_deltam(tmp_path):
    _write_run(tmp_path, types=("deltam",), m0=1)
    acq = read_run(_only(tmp_path))
    assert acq.n_volumes == 1 and acq.shape == (4, 4, 3) and acq.volume_types == ("deltam",)


def test_reading_metadata_loads_no_image_data(tmp_path, monkeypatch):
    _write_run(tmp_path, m0=3, m0_meta={"RepetitionTimePreparation": [1, 2, 3], "EchoTime": 0.01})
    run = _only(tmp_path)

    def boom(*args, **kwargs):
        raise AssertionError("image data read while reading metadata")

    monkeypatch.setattr(bids, "load_image", boom)
    monkeypatch.setattr(nibabel.Nifti1Image, "get_fdata", boom)
    monkeypatch.setattr(nibabel.arrayproxy.ArrayProxy, "__array__", boom)
    acq = read_run(run)
    assert acq.m0.trs == (1.0, 2.0, 3.0)
    with pytest.raises(AssertionError, match="image data read"):
        acq.load_m0()


# -------------------------------------------------------------------------- errors


def _json_of(tmp_path):
    return str(_only(tmp_path).sidecar)


def test_bolus_cutoff_and_slice_timing_are_read_when_asked(tmp_path):
    """Read (and checked) on demand, for the white-paper model: a calibration-only run does
    not fail on fields it does not use."""
    _write_run(tmp_path, meta=_base_meta(ArterialSpinLabelingType="PASL", BolusCutOffFlag=True,
                                         BolusCutOffDelayTime=[0.7, 1.6], SliceTiming=[0.0, 0.05, 0.1],
                                         M0Type="Estimate", M0Estimate=1000.0))
    acq = read_run(_only(tmp_path))
    assert bids.bolus_cutoff(acq) == (0.7, 1.6) and bids.asl_slice_timing(acq) == ((0.0, 0.05, 0.1), 2)
    _write_run(tmp_path / "b", meta=_base_meta(M0Type="Estimate", M0Estimate=1000.0))
    acq = read_run(_only(tmp_path / "b"))
    assert bids.bolus_cutoff(acq) is None and bids.asl_slice_timing(acq) == (None, 2)


@pytest.mark.parametrize(("extra", "field", "fragment"), [
    (dict(ArterialSpinLabelingType="PASL", BolusCutOffFlag=True), "BolusCutOffDelayTime",
     "required with BolusCutOffFlag"),
    (dict(ArterialSpinLabelingType="PASL", BolusCutOffFlag=True, BolusCutOffDelayTime=[1.6, 0.7]),
     "BolusCutOffDelayTime", "increasing"),
    (dict(BolusCutOffFlag=True, BolusCutOffDelayTime=700), "BolusCutOffDelayTime", "in seconds"),
    (dict(SliceTiming=[0.0, 0.1]), "SliceTiming", "2 entries for 3 slices"),
])
def test_kinetic_fields_errors_name_file_and_field(tmp_path, extra, field, fragment):
    _write_run(tmp_path, meta=_base_meta(M0Type="Estimate", M0Estimate=1000.0, **extra))
    acq = read_run(_only(tmp_path))  # not needed for calibration: no error here
    with pytest.raises(BidsFieldError) as info:
        bids.asl_slice_timing(acq) if field == "SliceTiming" else bids.bolus_cutoff(acq)
    assert info.value.field == field and fragment in str(info.value) and info.value.file == str(acq.run.sidecar)


@pytest.mark.parametrize(
    ("meta", "field", "fragment"),
    [
        (_base_meta(RepetitionTimePreparation=0), "RepetitionTimePreparation", "= 0"),
        (_base_meta(RepetitionTimePreparation=-1.0), "RepetitionTimePreparation", "> 0"),
        (_base_meta(RepetitionTimePreparation=[4.0, 4.0, 0.0, 4.0]),
         "RepetitionTimePreparation[2]", "> 0"),
        (_base_meta(RepetitionTimePreparation=[4.0, 4.0]), "RepetitionTimePreparation",
         "has 2 values but the image has 4 volumes"),
        (_base_meta(RepetitionTimePreparation=None), "RepetitionTimePreparation", "missing"),
        (_base_meta(ArterialSpinLabelingType=None), "ArterialSpinLabelingType", "missing"),
        (_base_meta(ArterialSpinLabelingType="VSASL"), "ArterialSpinLabelingType", "PCASL"),
        (_base_meta(M0Type=None), "M0Type", "missing"),
        (_base_meta(M0Type="Bogus"), "M0Type", "Separate"),
        (_base_meta(EchoTime=None), "EchoTime", "missing"),
        (_base_meta(EchoTime="12"), "EchoTime", "expected a number"),
        (_base_meta(EchoTime=[0.01, 0.02, 0.01, 0.02]), "EchoTime", "multi-echo"),
        (_base_meta(MagneticFieldStrength=None), "MagneticFieldStrength", "missing"),
        (_base_meta(MagneticFieldStrength=9.4), "MagneticFieldStrength", "1.5, 3 or 7"),
        (_base_meta(M0Type="Estimate"), "M0Estimate", "missing"),
        (_base_meta(M0Type="Estimate", M0Estimate=0), "M0Estimate", "> 0"),
        (_base_meta(M0Type="Included"), "volume_type", "no 'm0scan'"),
        (_base_meta(M0Type="Separate"), "M0Type", "m0scan image"),
        (_base_meta(LookLocker=True), "FlipAngle", "required with LookLocker"),
        (_base_meta(LookLocker="yes"), "LookLocker", "true or false"),
        (_base_meta(PostLabelingDelay=-0.5), "PostLabelingDelay", ">= 0"),
        # milliseconds where BIDS wants seconds: an error, never a silently absurd M0a
        (_base_meta(EchoTime=14), "EchoTime", "in seconds, not milliseconds"),
        (_base_meta(RepetitionTimePreparation=6000), "RepetitionTimePreparation", "in seconds"),
        (_base_meta(PostLabelingDelay=1800), "PostLabelingDelay", "in seconds"),
        (_base_meta(LabelingDuration=1800), "LabelingDuration", "in seconds"),
        (_base_meta(InversionTime=[100, 400, 700, 1000]), "InversionTime[0]", "in seconds"),
        (_base_meta(LabelingEfficiency=1.5), "LabelingEfficiency", "expected"),
    ],
)
def test_asl_json_errors_name_file_and_field(tmp_path, meta, field, fragment):
    _write_run(tmp_path, meta=meta)
    run = _only(tmp_path)
    with pytest.raises(InputError) as info:
        read_run(run)
    msg = str(info.value)
    where = run.aslcontext if field == "volume_type" else run.sidecar
    assert str(where) in msg and repr(field) in msg and fragment in msg, msg
    # The same file and field as data; an array element is reported by its JSON key.
    assert isinstance(info.value, BidsFieldError)
    assert info.value.file == str(where)
    assert info.value.field == field.split("[")[0]


def test_absent_with_background_suppression_is_refused(tmp_path):
    _write_run(tmp_path, meta=_base_meta(M0Type="Absent", BackgroundSuppression=True))
    run = _only(tmp_path)
    with pytest.raises(InputError, match="'BackgroundSuppression' = true") as info:
        read_run(run, allow_control_m0=True)
    assert str(run.sidecar) in str(info.value)
    # No usable M0 either way: M0Type 'Absent' is the field at fault (as without allow).
    assert (info.value.file, info.value.field) == (str(run.sidecar), "M0Type")
    with pytest.raises(BidsFieldError) as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.sidecar), "M0Type")
    _write_run(tmp_path, meta=_base_meta(M0Type="Absent", BackgroundSuppression=None))
    with pytest.raises(InputError, match="'BackgroundSuppression' is missing") as info:
        read_run(run, allow_control_m0=True)
    assert (info.value.file, info.value.field) == (str(run.sidecar), "BackgroundSuppression")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"tsv_types": ("control", "label", "control")}, "has 3 entries but"),
        ({"tsv_types": ("control", "label", "control", "tag")}, "line 5 = 'tag'"),
    ],
)
def test_aslcontext_errors(tmp_path, kwargs, fragment):
    _write_run(tmp_path, m0=1, **kwargs)
    run = _only(tmp_path)
    with pytest.raises(InputError, match=fragment) as info:
        read_run(run)
    assert str(run.aslcontext) in str(info.value) and "'volume_type'" in str(info.value)
    assert isinstance(info.value, BidsFieldError)
    assert (info.value.file, info.value.field) == (str(run.aslcontext), "volume_type")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "aslcontext is empty"), ("type\ncontrol\nlabel\n", "column 'volume_type' is missing")],
)
def test_aslcontext_without_column(tmp_path, text, fragment):
    _write_run(tmp_path, m0=1)
    run = _only(tmp_path)
    run.aslcontext.write_text(text)
    with pytest.raises(BidsFieldError, match=fragment) as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.aslcontext), "volume_type")


def test_missing_files(tmp_path):
    _write_run(tmp_path, m0=1)
    run = _only(tmp_path)
    run.aslcontext.unlink()
    with pytest.raises(InputError, match="aslcontext file is missing") as info:
        read_run(run)
    # A missing or unreadable file: that file, no single field.
    assert (info.value.file, info.value.field) == (str(run.aslcontext), None)
    _write_run(tmp_path, m0=1)
    run.sidecar.write_text("{not json")
    with pytest.raises(InputError, match="cannot read the ASL JSON") as info:
        read_run(run)
    assert str(run.sidecar) in str(info.value)
    assert (info.value.file, info.value.field) == (str(run.sidecar), None)
    run.sidecar.write_text("[1, 2]")
    with pytest.raises(BidsFieldError, match="expected a JSON object") as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.sidecar), None)
    run.sidecar.unlink()
    with pytest.raises(BidsFieldError, match="ASL sidecar is missing") as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.sidecar), None)
    _write_run(tmp_path, m0=1)
    run.m0scan_sidecar.unlink()
    with pytest.raises(BidsFieldError, match="m0scan sidecar is missing") as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.m0scan_sidecar), None)


def test_bad_image_headers_name_the_image(tmp_path):
    _write_run(tmp_path, m0=1)
    run = _only(tmp_path)
    run.m0scan.write_bytes(b"not a nifti image" * 40)
    with pytest.raises(BidsFieldError, match="cannot read the m0scan NIfTI header") as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.m0scan), None)
    save_image(run.asl, np.zeros((4, 4), dtype=np.float32), AFFINE)  # 2-D
    with pytest.raises(BidsFieldError, match="expected 3-D or 4-D") as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.asl), None)
    run.asl.unlink()
    with pytest.raises(BidsFieldError, match="ASL image is missing") as info:
        read_run(run)
    assert (info.value.file, info.value.field) == (str(run.asl), None)


def test_dataset_description_missing_names_it(tmp_path):
    (tmp_path / "sub-01" / "perf").mkdir(parents=True)
    with pytest.raises(BidsFieldError, match="dataset_description.json") as info:
        discover(tmp_path)
    assert info.value.file == str(tmp_path / "dataset_description.json")
    assert info.value.field is None


def test_estimate_has_no_m0_image_error_names_m0type(tmp_path):
    _write_run(tmp_path, meta=_base_meta(M0Type="Estimate", M0Estimate=1000.0))
    acq = read_run(_only(tmp_path))
    with pytest.raises(BidsFieldError, match="Estimate") as info:
        acq.load_m0()
    assert (info.value.file, info.value.field) == (str(acq.run.sidecar), "M0Type")


@pytest.mark.parametrize(
    ("m0_meta", "field", "fragment"),
    [
        ({"RepetitionTimePreparation": 0, "EchoTime": 0.01}, "RepetitionTimePreparation", "= 0"),
        ({"EchoTime": 0.01}, "RepetitionTimePreparation", "missing"),
        ({"RepetitionTimePreparation": [1, 2], "EchoTime": 0.01}, "RepetitionTimePreparation",
         "has 2 values but the image has 3 volumes"),
        ({"RepetitionTimePreparation": 6}, "EchoTime", "missing"),
        ({"RepetitionTimePreparation": 6, "EchoTime": 12.0}, "EchoTime", "in seconds"),
        ({"RepetitionTimePreparation": 6000, "EchoTime": 0.01}, "RepetitionTimePreparation", "in seconds"),
        ({"RepetitionTimePreparation": 6, "EchoTime": 0.01, "LookLocker": True, "FlipAngle": 35},
         "InversionTime", "required with LookLocker"),
    ],
)
def test_m0scan_json_errors(tmp_path, m0_meta, field, fragment):
    _write_run(tmp_path, m0=3, m0_meta=m0_meta)
    run = _only(tmp_path)
    with pytest.raises(InputError) as info:
        read_run(run)
    msg = str(info.value)
    assert str(run.m0scan_sidecar) in msg and repr(field) in msg and fragment in msg, msg
    assert isinstance(info.value, BidsFieldError)
    assert (info.value.file, info.value.field) == (str(run.m0scan_sidecar), field)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_bids_cohort(tmp_path_factory.mktemp("cohort") / "bids", n_subjects=8, broken=3,
                            shape=(16, 16, 8), ref_masks=False)


@pytest.mark.parametrize("allow", [False, True])
def test_cohort_broken_runs_carry_file_and_field(cohort, allow):
    runs = {r.key: r for r in discover(cohort.root)}
    assert len(cohort.broken) == 3
    for key, truth in cohort.broken.items():
        with pytest.raises(BidsFieldError) as info:
            read_run(runs[key], allow_control_m0=allow)
        assert info.value.file == str(cohort.root / truth.broken_file), (key, info.value)
        assert info.value.field == truth.broken_field, (key, info.value)
        assert truth.error_fragment in str(info.value)


def test_bids_field_error_class():
    assert issubclass(BidsFieldError, InputError) and issubclass(BidsFieldError, ValueError)
    assert aslcal.io.BidsFieldError is BidsFieldError
    assert "BidsFieldError" in bids.__all__ and "BidsFieldError" in aslcal.io.__all__
    err = BidsFieldError("x.json: field 'EchoTime' is missing", file=Path("a") / "x.json",
                         field="EchoTime")
    assert str(err) == "x.json: field 'EchoTime' is missing"  # message as given
    assert err.file == str(Path("a") / "x.json") and isinstance(err.file, str)
    assert err.field == "EchoTime"
    assert BidsFieldError("m", file="f").field is None
    with pytest.raises(TypeError):
        BidsFieldError("m")  # type: ignore[call-arg]  # file is required
    again = pickle.loads(pickle.dumps(err))  # process pools / dask send errors back
    assert type(again) is BidsFieldError and str(again) == str(err)
    assert (again.file, again.field) == (err.file, err.field)


def test_read_run_rejects_non_run():
    with pytest.raises(InputError, match="AslRun"):
        read_run("sub-01")  # type: ignore[arg-type]
    assert AslRun.__dataclass_params__.frozen


# ------------------------------------------------------------------ BIDS inheritance


def test_sidecars_are_inherited_from_the_root_down(tmp_path):
    """BIDS inheritance: root asl.json < sub-level < ses-level < the run's own sidecar,
    each applying only when its entities are a subset of the run's; the nearer wins,
    and a field's error names the file that gave it."""
    shared = _base_meta()
    _write_run(tmp_path, "01", ses="1", meta={"EchoTime": 0.02}, m0=1, m0_meta={"EchoTime": 0.012})
    _write_run(tmp_path, "01", ses="2", run="1", meta={}, m0=1, m0_meta={})
    _write_run(tmp_path, "02", meta={"M0Type": "Separate"}, m0=1, m0_meta={})
    (tmp_path / "asl.json").write_text(json.dumps(shared))
    (tmp_path / "m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": 6.0, "EchoTime": 0.012}))
    (tmp_path / "sub-01" / "sub-01_asl.json").write_text(json.dumps({"LabelingEfficiency": 0.7}))
    (tmp_path / "sub-01" / "ses-2" / "sub-01_ses-2_asl.json").write_text(json.dumps({"PostLabelingDelay": 2.0}))
    # applies to run-2 only: not to run-1
    (tmp_path / "sub-01" / "ses-2" / "sub-01_ses-2_run-2_asl.json").write_text(json.dumps({"PostLabelingDelay": 9.0}))
    acq = {r.key: read_run(r) for r in discover(tmp_path)}

    a = acq["sub-01_ses-1"]
    assert a.te_ms == pytest.approx(20.0) and a.alpha == 0.7 and a.post_labeling_delay[0] == 1.8
    assert [p.relative_to(tmp_path).as_posix() for p in a.sidecar_files] == [
        "asl.json", "sub-01/sub-01_asl.json", "sub-01/ses-1/perf/sub-01_ses-1_asl.json"]
    assert a.source_of("EchoTime").name == "sub-01_ses-1_asl.json" and a.source_of("M0Type").name == "asl.json"
    b = acq["sub-01_ses-2_run-1"]
    assert b.te_ms == pytest.approx(12.0) and b.alpha == 0.7 and b.post_labeling_delay[0] == 2.0
    assert b.m0.trs == (6.0,) and [p.name for p in b.m0.sidecar_files] == ["m0scan.json", "sub-01_ses-2_run-1_m0scan.json"]
    c = acq["sub-02"]
    assert c.alpha == 0.85 and c.post_labeling_delay[0] == 1.8  # sub-01's files do not apply

    # an error names the file that gave the field
    (tmp_path / "sub-01" / "sub-01_asl.json").write_text(json.dumps({"LabelingEfficiency": 7}))
    (run,) = [r for r in discover(tmp_path) if r.key == "sub-01_ses-1"]
    with pytest.raises(BidsFieldError) as info:
        read_run(run)
    assert info.value.file == str(tmp_path / "sub-01" / "sub-01_asl.json") and info.value.field == "LabelingEfficiency"


def test_two_sidecars_at_one_level_are_an_error(tmp_path):
    _write_run(tmp_path, "01", run="1")
    perf = tmp_path / "sub-01" / "perf"
    (perf / "sub-01_asl.json").write_text(json.dumps({"EchoTime": 0.02}))  # also applies to run-1
    (run,) = discover(tmp_path)
    with pytest.raises(BidsFieldError, match="both apply"):
        read_run(run)


def test_only_inherited_sidecars_are_enough(tmp_path):
    perf = _write_run(tmp_path, "01", m0=1)
    (perf / "sub-01_asl.json").unlink()
    (tmp_path / "sub-01" / "sub-01_asl.json").write_text(json.dumps(_base_meta()))
    acq = read_run(_only(tmp_path))
    assert acq.te_ms == pytest.approx(12.0) and acq.sidecar_files == (tmp_path / "sub-01" / "sub-01_asl.json",)
    (tmp_path / "sub-01" / "sub-01_asl.json").unlink()
    with pytest.raises(BidsFieldError, match="ASL sidecar is missing"):
        read_run(_only(tmp_path))


def test_numbers_too_large_for_a_float_name_file_and_field(tmp_path):
    """A 401-digit integer (no float can hold it) and a 5000-digit one (beyond Python's
    int-parsing limit) are field errors naming the file, not OverflowError/ValueError."""
    perf = _write_run(tmp_path, "01", m0=1)
    js = perf / "sub-01_asl.json"
    text = json.dumps(_base_meta())
    js.write_text(text.replace('"RepetitionTimePreparation": 4.0', '"RepetitionTimePreparation": 1' + "0" * 400))
    with pytest.raises(BidsFieldError, match="RepetitionTimePreparation") as info:
        read_run(_only(tmp_path))
    assert info.value.file == str(js) and info.value.field == "RepetitionTimePreparation"
    js.write_text(text.replace('"EchoTime": 0.012', '"EchoTime": 1' + "0" * 5000))
    with pytest.raises(BidsFieldError, match="EchoTime") as info:
        read_run(_only(tmp_path))
    assert info.value.file == str(js) and info.value.field == "EchoTime"
    assert len(str(info.value)) < 300  # the number is not printed whole
    js.write_text(text.replace('"EchoTime": 0.012', '"EchoTime": 0.012, "SliceTiming": [0, 1' + "0" * 400 + "]"))
    acq = read_run(_only(tmp_path))
    with pytest.raises(BidsFieldError, match="SliceTiming"):
        bids.asl_slice_timing(acq)


def test_byte_order_marks_and_blank_lines(tmp_path):
    """UTF-8 files written with a byte-order mark are read; an aslcontext error cites the
    line as an editor shows it (blank lines counted)."""
    perf = _write_run(tmp_path, "01", m0=1)
    js = perf / "sub-01_asl.json"
    js.write_bytes(b"\xef\xbb\xbf" + js.read_bytes())
    tsv = perf / "sub-01_aslcontext.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes())
    assert read_run(_only(tmp_path)).volume_types == ("control", "label") * 2
    tsv.write_text("volume_type\ncontrol\n\nlabel\ncontrl\nlabel\n")
    with pytest.raises(BidsFieldError, match=r"line 5 = 'contrl'"):
        read_run(_only(tmp_path))


def test_two_m0scan_images_are_a_per_run_error(tmp_path):
    """sub-01_m0scan.nii beside sub-01_m0scan.nii.gz: which is the M0 is unknown; the run
    is refused naming both (as for two ASL images), other runs are unaffected."""
    perf = _write_run(tmp_path, "01", m0=1)
    _write_run(tmp_path, "02", m0=1)
    shutil.copy(perf / "sub-01_m0scan.nii", perf / "sub-01_m0scan.nii.gz")
    (first, second) = discover(tmp_path)
    with pytest.raises(BidsFieldError, match="two m0scan images, sub-01_m0scan.nii.gz and sub-01_m0scan.nii"):
        read_run(first)
    assert read_run(second).m0.kind == "separate"


def test_unfetched_annex_links_say_so(tmp_path):
    """Sidecars, aslcontext and m0scan images that are links to missing files (DataLad /
    git-annex content not fetched) are reported as such, naming the file."""
    for what, name in (("sidecar", "sub-01_asl.json"), ("aslcontext", "sub-01_aslcontext.tsv"),
                       ("m0scan", "sub-01_m0scan.nii"), ("inherited", "asl.json")):
        root = tmp_path / what
        perf = _write_run(root, "01", m0=1)
        link = (root if what == "inherited" else perf) / name
        link.unlink(missing_ok=True)
        link.symlink_to(".git/annex/objects/missing")
        with pytest.raises(BidsFieldError, match="DataLad/git-annex content not fetched") as info:
            read_run(_only(root))
        assert info.value.file == str(link), what


# ------------------------------------------------------------ ambiguous or unreadable files


def test_a_field_given_twice_in_a_sidecar_is_an_error_naming_it(tmp_path):
    """Python's JSON parser keeps the last of two equal keys: EchoTime 0.014 then 0.030 was
    read as 0.030 (M0a -6 % in an audit).  Which one is meant is unknown: an error."""
    perf = _write_run(tmp_path, m0=1)
    js = perf / "sub-01_asl.json"
    js.write_text(js.read_text().rstrip("}") + ', "EchoTime": 0.030}')
    with pytest.raises(BidsFieldError, match="'EchoTime' is given twice") as info:
        read_run(_only(tmp_path))
    assert info.value.field == "EchoTime" and info.value.file == str(js)


def test_a_sidecar_nested_too_deeply_is_an_error_naming_the_file(tmp_path):
    perf = _write_run(tmp_path, m0=1)
    js = perf / "sub-01_asl.json"
    js.write_text(js.read_text().rstrip("}") + ', "Deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BidsFieldError, match="nested too deeply") as info:
        read_run(_only(tmp_path))
    assert info.value.file == str(js)


def test_two_volume_type_columns_are_an_error(tmp_path):
    """The first of two 'volume_type' columns was read (the CBF sign flipped in an audit)."""
    perf = _write_run(tmp_path, m0=1)
    tsv = perf / "sub-01_aslcontext.tsv"
    rows = tsv.read_text().splitlines()
    swap = {"control": "label", "label": "control"}
    tsv.write_text("volume_type\tvolume_type\n" + "".join(f"{r}\t{swap.get(r, r)}\n" for r in rows[1:]))
    with pytest.raises(BidsFieldError, match="'volume_type' appears 2 times") as info:
        read_run(_only(tmp_path))
    assert info.value.field == "volume_type" and info.value.file == str(tsv)


def test_an_unreadable_m0scan_sidecar_is_named_when_the_run_has_no_m0scan_of_its_name(tmp_path):
    """An m0scan linked only by its IntendedFor whose JSON cannot be parsed was skipped, and
    the run failed on its own asl.json ("m0scan missing"): the file to fix is the m0scan's."""
    perf = _write_run(tmp_path)
    m0 = np.full((4, 4, 3), 500.0, dtype=np.float32)
    save_image(perf / "sub-01_acq-x_m0scan.nii.gz", m0, AFFINE)
    (perf / "sub-01_acq-x_m0scan.json").write_text(
        '{"IntendedFor": "perf/sub-01_asl.nii.gz", "RepetitionTimePreparation": 6.0, "EchoTime": 0.012,}')
    with pytest.raises(BidsFieldError, match="cannot read the m0scan JSON") as info:
        read_run(_only(tmp_path))
    assert info.value.file == str(perf / "sub-01_acq-x_m0scan.json")
