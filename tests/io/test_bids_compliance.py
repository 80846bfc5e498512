"""aslcal.io.bids against the BIDS ASL specification: fields it must read, valid data it
must accept, contradictions it must refuse (each naming the file and the field)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aslcal.io import bids, save_image
from aslcal.io.bids import BidsFieldError, discover, read_run

AFFINE = np.diag([3.0, 3.0, 4.0, 1.0])


def _meta(**extra):
    meta = {"ArterialSpinLabelingType": "PCASL", "M0Type": "Separate", "RepetitionTimePreparation": 4.0,
            "EchoTime": 0.012, "MagneticFieldStrength": 3, "BackgroundSuppression": False,
            "PostLabelingDelay": 1.8, "LabelingDuration": 1.8}
    meta.update(extra)
    return {k: v for k, v in meta.items() if v is not None}


def _write(root, key="sub-01", *, types=("control", "label") * 2, meta=None, m0=None, m0_meta=None,
           data=None):
    """One ASL run in ``root/sub-01/perf`` (a 4x4x3 grid); ``m0``: m0scan volumes."""
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    perf = root / "sub-01" / "perf"
    perf.mkdir(parents=True, exist_ok=True)
    n = len(types)
    if data is None:
        data = np.arange(4 * 4 * 3 * n, dtype=np.float32).reshape(4, 4, 3, n) + 100.0
    save_image(perf / f"{key}_asl.nii.gz", data, AFFINE)
    (perf / f"{key}_asl.json").write_text(json.dumps(_meta() if meta is None else meta))
    (perf / f"{key}_aslcontext.tsv").write_text("volume_type\n" + "".join(f"{t}\n" for t in types))
    if m0 is not None:
        save_image(perf / f"{key}_m0scan.nii.gz", np.full((4, 4, 3, m0), 500.0, np.float32), AFFINE)
        mm = {"RepetitionTimePreparation": 6.0, "EchoTime": 0.012} if m0_meta is None else m0_meta
        (perf / f"{key}_m0scan.json").write_text(json.dumps(mm))
    return perf


def _run(root, key="sub-01"):
    return next(r for r in discover(root) if r.key == key)


# ------------------------------------------------------------ MRAcquisitionType


def test_recovery_m0_series_slice_timing_must_agree_with_the_acquisition_type(tmp_path):
    """The slice delays of a 2-D saturation-recovery M0 enter its fit: a 2-D series
    without SliceTiming (or a 3-D one with it) is refused on the m0scan JSON."""
    sr = {"RepetitionTimePreparation": [0.5, 1.0, 2.0], "EchoTime": 0.012}
    perf = _write(tmp_path / "a", m0=3, m0_meta={**sr, "MRAcquisitionType": "2D"})
    with pytest.raises(BidsFieldError, match="MRAcquisitionType") as info:
        read_run(_run(tmp_path / "a"))
    assert info.value.field == "SliceTiming" and info.value.file == str(perf / "sub-01_m0scan.json")
    perf = _write(tmp_path / "b", m0=3, m0_meta={**sr, "MRAcquisitionType": "3D", "SliceTiming": [0, 0.1, 0.2]})
    with pytest.raises(BidsFieldError, match="'3D'") as info:
        read_run(_run(tmp_path / "b"))
    assert info.value.field == "SliceTiming" and info.value.file == str(perf / "sub-01_m0scan.json")
    # agreeing, or without MRAcquisitionType: read
    _write(tmp_path / "c", m0=3, m0_meta={**sr, "MRAcquisitionType": "2d", "SliceTiming": [0, 0.1, 0.2]})
    assert read_run(_run(tmp_path / "c")).m0.slice_timing == pytest.approx((0, 0.1, 0.2))
    _write(tmp_path / "d", m0=3, m0_meta=sr)
    assert read_run(_run(tmp_path / "d")).m0.slice_timing is None
    # a long-TR M0 uses no slice delays: not refused for them
    _write(tmp_path / "e", m0=1, m0_meta={"RepetitionTimePreparation": 6.0, "EchoTime": 0.012,
                                          "MRAcquisitionType": "2D"})
    assert read_run(_run(tmp_path / "e")).m0.kind == "separate"
    _write(tmp_path / "f", m0=3, m0_meta={**sr, "MRAcquisitionType": "4D"})
    with pytest.raises(BidsFieldError, match="'2D' or '3D'") as info:
        read_run(_run(tmp_path / "f"))
    assert info.value.field == "MRAcquisitionType"


# ------------------------------------------------------------ IntendedFor


def test_m0scan_linked_by_intended_for_is_the_runs_m0_for_resume_too(tmp_path):
    """Discovery pairs an ASL image with the m0scan naming it in IntendedFor when none
    shares its name; its sidecars (inherited ones included) are the run's m0 sidecars, as
    a resume checks them."""
    perf = _write(tmp_path, key="sub-01_acq-pcasl", m0=None)
    save_image(perf / "sub-01_m0scan.nii.gz", np.full((4, 4, 3), 500.0, np.float32), AFFINE)
    (perf / "sub-01_m0scan.json").write_text(json.dumps(
        {"RepetitionTimePreparation": 6.0, "IntendedFor": "bids::sub-01/perf/sub-01_acq-pcasl_asl.nii.gz"}))
    (tmp_path / "m0scan.json").write_text(json.dumps({"EchoTime": 0.02}))
    run = _run(tmp_path, "sub-01_acq-pcasl")
    assert run.m0scan == perf / "sub-01_m0scan.nii.gz" and run.m0scan_linked
    assert bids.run_sidecars(run)[1] == [tmp_path / "m0scan.json", perf / "sub-01_m0scan.json"]
    m0 = read_run(run).m0
    assert m0.path == perf / "sub-01_m0scan.nii.gz" and m0.te_ms == pytest.approx(20.0)
    # named by no m0scan: M0Type Separate says what is missing
    (perf / "sub-01_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": 6.0,
                                                         "IntendedFor": "bids::sub-01/perf/sub-01_asl.nii.gz"}))
    with pytest.raises(BidsFieldError, match="IntendedFor") as info:
        read_run(_run(tmp_path, "sub-01_acq-pcasl"))
    assert info.value.field == "M0Type"


def test_a_second_m0scan_claiming_a_run_paired_by_name_is_an_error(tmp_path):
    """sub-01_m0scan pairs with sub-01_asl by name, and sub-01_acq-b_m0scan's IntendedFor
    names sub-01_asl too: the name-paired one was used without a word.  Which is the M0
    is unknown (as with two m0scans linked by IntendedFor): an error on the other's field."""
    perf = _write(tmp_path, m0=1)
    save_image(perf / "sub-01_acq-b_m0scan.nii.gz", np.full((4, 4, 3), 900.0, np.float32), AFFINE)
    (perf / "sub-01_acq-b_m0scan.json").write_text(json.dumps(
        {"RepetitionTimePreparation": 6.0, "EchoTime": 0.012, "IntendedFor": "bids::sub-01/perf/sub-01_asl.nii.gz"}))
    with pytest.raises(BidsFieldError, match="whose m0scan by name is sub-01_m0scan.nii.gz") as info:
        read_run(_run(tmp_path))
    assert info.value.field == "IntendedFor" and info.value.file == str(perf / "sub-01_acq-b_m0scan.json")
    # meant for another image: no claim on this run
    (perf / "sub-01_acq-b_m0scan.json").write_text(json.dumps(
        {"RepetitionTimePreparation": 6.0, "EchoTime": 0.012, "IntendedFor": "bids::sub-01/perf/sub-01_acq-b_asl.nii.gz"}))
    assert read_run(_run(tmp_path)).m0.path == perf / "sub-01_m0scan.nii.gz"


@pytest.mark.parametrize("value", [5, ["bids::sub-01/perf/sub-01_asl.nii.gz", 3]])
def test_malformed_intended_for_names_the_field(tmp_path, value):
    perf = _write(tmp_path, m0=1, m0_meta={"RepetitionTimePreparation": 6.0, "EchoTime": 0.012,
                                           "IntendedFor": value})
    with pytest.raises(BidsFieldError, match="expected a path or BIDS URI") as info:
        read_run(_run(tmp_path))
    assert info.value.field == "IntendedFor" and info.value.file == str(perf / "sub-01_m0scan.json")


# ------------------------------------------------------------ SliceTiming offset


def test_slice_times_are_relative_to_the_first_slice(tmp_path):
    """ASL (white-paper PLD per slice) and M0 series (recovery delays) alike; with k-
    the list runs from the top slice."""
    st = [0.15, 0.25, 0.05]
    sr = {"RepetitionTimePreparation": [0.5, 1.0, 2.0], "EchoTime": 0.012}
    _write(tmp_path, meta=_meta(SliceTiming=st, MRAcquisitionType="2D"), m0=3, m0_meta={**sr, "SliceTiming": st})
    acq = read_run(_run(tmp_path))
    assert bids.asl_slice_timing(acq) == (pytest.approx((0.1, 0.2, 0.0)), 2)
    assert acq.m0.slice_timing == pytest.approx((0.1, 0.2, 0.0))
    _write(tmp_path / "b", m0=3, m0_meta={**sr, "SliceTiming": st, "SliceEncodingDirection": "k-"})
    assert read_run(_run(tmp_path / "b")).m0.slice_timing == pytest.approx((0.0, 0.2, 0.1))


# ------------------------------------------------------------ valid BIDS accepted


def test_na_volumes_are_ignored_like_norf(tmp_path):
    """BIDS 1.10 'n/a' volume_type: read, never used; a zero RepetitionTimePreparation
    (BIDS minimum 0) on such a volume or a noRF one is no error."""
    types = ("control", "label", "n/a", "noRF")
    _write(tmp_path, types=types, meta=_meta(RepetitionTimePreparation=[4.0, 4.0, 0, 0]), m0=1)
    acq = read_run(_run(tmp_path))
    assert acq.volume_types == types and acq.volumes_of("n/a") == (2,)
    assert acq.tr == (4.0, 4.0, 0.0, 0.0)
    # a used volume still needs a positive one
    _write(tmp_path / "b", types=types, meta=_meta(RepetitionTimePreparation=[4.0, 0, 0, 0]), m0=1)
    with pytest.raises(BidsFieldError, match=r"'RepetitionTimePreparation\[1\]' = 0") as info:
        read_run(_run(tmp_path / "b"))
    assert info.value.field == "RepetitionTimePreparation"
    _write(tmp_path / "c", types=types, meta=_meta(RepetitionTimePreparation=0), m0=1)
    with pytest.raises(BidsFieldError, match="'RepetitionTimePreparation' = 0"):
        read_run(_run(tmp_path / "c"))


def test_aslcontext_is_inherited(tmp_path):
    """An aslcontext one level up applies (inheritance principle), the lowest one wins;
    errors and the recorded inputs name the file read."""
    perf = _write(tmp_path, m0=1)
    (perf / "sub-01_aslcontext.tsv").rename(tmp_path / "sub-01" / "sub-01_aslcontext.tsv")
    (tmp_path / "aslcontext.tsv").write_text("volume_type\n" + "deltam\n" * 4)
    run = _run(tmp_path)
    acq = read_run(run)
    assert acq.volume_types == ("control", "label") * 2
    assert acq.aslcontext == tmp_path / "sub-01" / "sub-01_aslcontext.tsv"
    assert bids.run_sidecars(run)[0][-1] == acq.aslcontext  # a resume sees a new own one
    (tmp_path / "sub-01" / "sub-01_aslcontext.tsv").write_text("volume_type\ncontrol\n")
    with pytest.raises(BidsFieldError, match="has 1 entries") as info:
        read_run(run)
    assert info.value.file == str(tmp_path / "sub-01" / "sub-01_aslcontext.tsv")


def test_flip_angle_is_checked_as_a_look_locker_angle_only(tmp_path):
    """BIDS allows FlipAngle up to 360 degrees; aslcal uses it only as the Look-Locker
    readout angle, which must be in (0, 90)."""
    _write(tmp_path, meta=_meta(FlipAngle=200), m0=1,
           m0_meta={"RepetitionTimePreparation": 6.0, "EchoTime": 0.012, "FlipAngle": 90})
    assert read_run(_run(tmp_path)).flip_angle is None
    ll = {"RepetitionTimePreparation": 4.0, "EchoTime": 0.012, "LookLocker": True,
          "InversionTime": [0.1, 0.4, 0.7]}
    perf = _write(tmp_path / "b", m0=3, m0_meta={**ll, "FlipAngle": [35, 35, 120]})
    with pytest.raises(BidsFieldError, match=r"'FlipAngle\[2\]' = 120.0: expected a Look-Locker readout angle") as info:
        read_run(_run(tmp_path / "b"))
    assert info.value.field == "FlipAngle" and info.value.file == str(perf / "sub-01_m0scan.json")
    _write(tmp_path / "c", m0=3, m0_meta={**ll, "FlipAngle": 35})
    assert read_run(_run(tmp_path / "c")).m0.flip_angle == (35.0,) * 3


# ------------------------------------------------------------ messages name the file that gave the field


def test_inherited_m0type_and_background_suppression_are_named_by_their_file(tmp_path):
    perf = _write(tmp_path)
    (tmp_path / "asl.json").write_text((perf / "sub-01_asl.json").read_text())
    (perf / "sub-01_asl.json").unlink()
    with pytest.raises(BidsFieldError, match="'Separate' but the m0scan image") as info:
        read_run(_run(tmp_path))
    assert info.value.file == str(tmp_path / "asl.json") and info.value.field == "M0Type"
    assert str(info.value).startswith(str(tmp_path / "asl.json"))
    # M0Type Absent in the run's sidecar, BackgroundSuppression true inherited from the root
    (tmp_path / "asl.json").write_text(json.dumps({"BackgroundSuppression": True}))
    (perf / "sub-01_asl.json").write_text(json.dumps(_meta(M0Type="Absent", BackgroundSuppression=None)))
    with pytest.raises(BidsFieldError, match="'BackgroundSuppression' = true") as info:
        read_run(_run(tmp_path), allow_control_m0=True)
    assert f"(in {tmp_path / 'asl.json'})" in str(info.value)
    assert info.value.file == str(perf / "sub-01_asl.json") and info.value.field == "M0Type"


def test_included_m0_echo_time_is_the_m0scan_volumes(tmp_path):
    types = ("m0scan", "control", "label")
    _write(tmp_path, types=types, meta=_meta(M0Type="Included", EchoTime=[0.02, 0.01, 0.01]))
    acq = read_run(_run(tmp_path))
    assert acq.te_ms == pytest.approx(10.0) and acq.m0.te_ms == pytest.approx(20.0)
    # several echoes within the ASL volumes (or within the m0scan ones) stay unsupported
    _write(tmp_path / "b", types=types, meta=_meta(M0Type="Included", EchoTime=[0.02, 0.01, 0.03]))
    with pytest.raises(BidsFieldError, match="multi-echo ASL") as info:
        read_run(_run(tmp_path / "b"))
    assert info.value.field == "EchoTime"
    _write(tmp_path / "c", types=("m0scan",) + types, meta=_meta(M0Type="Included", EchoTime=[0.02, 0.03, 0.01, 0.01]))
    with pytest.raises(BidsFieldError, match="multi-echo M0"):
        read_run(_run(tmp_path / "c"))


def test_acquisition_type_from_another_file_is_named(tmp_path):
    """MRAcquisitionType inherited from the root, SliceTiming missing in the run's sidecar:
    the error is on the run's sidecar (where SliceTiming belongs) and names the root file."""
    perf = _write(tmp_path, m0=3, m0_meta={"RepetitionTimePreparation": [0.5, 1.0, 2.0], "EchoTime": 0.01})
    (tmp_path / "m0scan.json").write_text(json.dumps({"MRAcquisitionType": "2D"}))
    with pytest.raises(BidsFieldError) as info:
        read_run(_run(tmp_path))
    assert info.value.file == str(perf / "sub-01_m0scan.json") and info.value.field == "SliceTiming"
    assert f"'2D' (in {tmp_path / 'm0scan.json'})" in str(info.value)
    # the same file: said once
    (tmp_path / "m0scan.json").unlink()
    (perf / "sub-01_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": [0.5, 1.0, 2.0],
                                                         "EchoTime": 0.01, "MRAcquisitionType": "2D"}))
    with pytest.raises(BidsFieldError) as info:
        read_run(_run(tmp_path))
    assert str(info.value).count("sub-01_m0scan.json") == 1
