"""aslcal.testing.bids: the phantom BIDS cohort is valid, varied, broken where it says."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.io.bids import discover, read_run
from aslcal.testing.bids import BROKEN_VARIANTS, GOOD_VARIANTS, make_bids_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return make_bids_cohort(root, 20, seed=3)


def _checksums(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_cohort_layout_and_coverage(cohort):
    root = cohort.root
    assert (root / "dataset_description.json").is_file()
    lines = (root / "participants.tsv").read_text().splitlines()
    assert lines[0] == "participant_id" and len(lines) == 21
    runs = discover(root)
    assert [r.key for r in runs] == list(cohort.runs)
    assert len(cohort.runs) == 20 and len(cohort.broken) == 3
    variants = {t.variant for t in cohort.runs.values()}
    assert variants == set(GOOD_VARIANTS) | set(BROKEN_VARIANTS)
    assert any(r.session for r in runs) and any(r.run for r in runs)
    assert len({t.shape for t in cohort.runs.values()}) > 1


def test_reader_reads_good_and_reports_broken(cohort):
    for run in discover(cohort.root):
        truth = cohort.runs[run.key]
        if truth.broken:
            for allow in (False, True):
                with pytest.raises(InputError) as info:
                    read_run(run, allow_control_m0=allow)
                msg = str(info.value)
                assert str(cohort.root / truth.broken_file) in msg, msg
                assert repr(truth.broken_field) in msg and truth.error_fragment in msg, msg
            continue
        acq = read_run(run)
        assert acq.field_strength == truth.field_strength
        assert acq.te_ms == pytest.approx(truth.te_ms)
        assert acq.alpha == truth.alpha and acq.m0_type == truth.m0_type
        assert acq.shape[:3] == truth.shape
        assert acq.m0.trs == truth.m0_trs
        if truth.variant == "estimate":
            assert acq.m0.estimate == truth.m0a
        assert acq.m0.is_satrecov == (truth.variant in ("satrecov", "look_locker"))
        if truth.variant == "look_locker":
            assert acq.m0.look_locker and acq.m0.tis is not None and acq.m0.flip_angle


def test_images_match_truth(cohort):
    """The written images load through the acquisition record and look sane."""
    run = next(r for r in discover(cohort.root) if cohort.runs[r.key].variant == "separate")
    acq = read_run(run)
    m0 = acq.load_m0().data[..., 0]
    assert np.isfinite(m0).all() and m0.max() > 0
    asl = acq.load_asl().data
    control, label = asl[..., 0], asl[..., 1]
    assert np.all(control - label >= -1e-3)  # perfusion signal is non-negative


def test_deterministic_from_seed(tmp_path, cohort):
    small_a = make_bids_cohort(tmp_path / "a", 6, seed=5, broken=1)
    small_b = make_bids_cohort(tmp_path / "b", 6, seed=5, broken=1)
    assert _checksums(small_a.root) == _checksums(small_b.root)
    assert small_a.runs == small_b.runs
    other = make_bids_cohort(tmp_path / "c", 6, seed=6, broken=1)
    assert _checksums(other.root) != _checksums(small_a.root)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_subjects": 0}, "n_subjects"), ({"broken": 9}, "broken"), ({"shape": (4, 4, 4)}, "shape")],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"n_subjects": 5, **kwargs}
    with pytest.raises(InputError, match=match):
        make_bids_cohort(tmp_path, **args)
