"""Metadata of an M0 recovery series (saturation recovery, Look-Locker) that contradicts
itself or uses the wrong units is a per-subject error naming the file and the field.

Each case was accepted before and changed M0a silently (an audit with the phantom cohort
of ``make_bids_cohort``; truth M0a as generated): a Look-Locker m0scan without
``"LookLocker": true`` was averaged as one long-TR M0 (M0a -87 %), slice times in
milliseconds were fitted as seconds (-57 %, -86 %), readout angles in radians were taken
as degrees (M0a x34), an ASL slice time beyond the repetition time went into the
white-paper delay (CBF x13).
"""

from __future__ import annotations

import json

import pytest

from aslcal.io.bids import BidsFieldError, asl_slice_timing, discover, read_run
from aslcal.testing.bids import make_bids_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    # 2-D readouts (60 ms per slice), every good variant; small images
    return make_bids_cohort(tmp_path_factory.mktemp("bids-m0-series"), n_subjects=5, seed=4, broken=0,
                            shape=(16, 16, 8), slicedt=0.06, ref_masks=False)


def _run_of(cohort, variant):
    key = next(k for k, t in cohort.runs.items() if t.variant == variant)
    return next(r for r in discover(cohort.root) if r.key == key)


def _edited(path, edit):
    """Apply ``edit(meta)`` to a sidecar; returns the original text (to restore)."""
    original = path.read_text()
    meta = json.loads(original)
    edit(meta)
    path.write_text(json.dumps(meta))
    return original


def _raises_on(run, path, field, match, edit):
    original = _edited(path, edit)
    try:
        with pytest.raises(BidsFieldError, match=match) as info:
            read_run(run)
        assert info.value.field == field and str(info.value.file) == str(path)
    finally:
        path.write_text(original)


def test_unedited_series_read(cohort):
    for variant in ("satrecov", "look_locker"):
        m0 = read_run(_run_of(cohort, variant)).m0
        assert m0.is_satrecov and m0.look_locker == (variant == "look_locker")


@pytest.mark.parametrize("variant", ["satrecov", "look_locker"])
def test_slice_times_in_milliseconds(cohort, variant):
    run = _run_of(cohort, variant)

    def ms(meta):
        meta["SliceTiming"] = [1000 * t for t in meta["SliceTiming"]]

    _raises_on(run, run.m0scan_sidecar, "SliceTiming", "milliseconds", ms)


def test_look_locker_series_without_its_flag(cohort):
    run = _run_of(cohort, "look_locker")
    assert len(set(json.loads(run.m0scan_sidecar.read_text())["InversionTime"])) > 1
    _raises_on(run, run.m0scan_sidecar, "LookLocker", "no field 'LookLocker'.*'InversionTime' differs",
               lambda meta: meta.pop("LookLocker"))
    _raises_on(run, run.m0scan_sidecar, "LookLocker", "'LookLocker' = False",
               lambda meta: meta.update(LookLocker=False))


def test_look_locker_flip_angles_in_radians(cohort):
    run = _run_of(cohort, "look_locker")

    def radians(meta):
        meta["FlipAngle"] = [round(a * 3.141592653589793 / 180, 4) for a in meta["FlipAngle"]]

    _raises_on(run, run.m0scan_sidecar, "FlipAngle", "radians", radians)


def test_asl_slice_times_beyond_the_repetition_time(cohort):
    run = _run_of(cohort, "separate")
    meta = json.loads(run.sidecar.read_text())
    tr = meta["RepetitionTimePreparation"]
    tr = min(tr) if isinstance(tr, list) else tr
    n_slices = cohort.runs[run.key].shape[2]

    def late(m):
        m["MRAcquisitionType"] = "2D"
        m["SliceTiming"] = [tr * 1.2 * z / (n_slices - 1) for z in range(n_slices)]

    original = _edited(run.sidecar, late)
    try:
        acq = read_run(run)
        with pytest.raises(BidsFieldError, match="not below the repetition time") as info:
            asl_slice_timing(acq)
        assert info.value.field == "SliceTiming"
    finally:
        run.sidecar.write_text(original)
