"""A separate M0 scan at another echo time than the ASL data (BIDS EchoTime of each).

M0a = S_ref·exp(−TE_asl/T2b) / (pc·(1 − e^(−TR/T1r))·exp(−TE_m0/T2r)): the tissue T2
correction belongs to the M0 image's echo, the blood T2 decay to the ASL data's.  The
phantom's M0 scan is acquired at 30 ms, its ASL data at 0, 11 or 14 ms; the truth is
the generator's M0a at the ASL echo.  The control uses the M0's echo for both (the
behaviour before the echo times were told apart) and must miss.
"""

from __future__ import annotations

import json

import pytest

import aslcal.calibration as calibration
from aslcal.cohort import CohortOptions, run_cohort
from aslcal.io import DerivativesWriter
from aslcal.testing.bids import make_bids_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_bids_cohort(tmp_path_factory.mktemp("bids-te"), n_subjects=12, seed=4, broken=0,
                            m0_echo_time=0.030)


def _m0a_errors(cohort, out):
    opts = CohortOptions(ref_masks=str(cohort.root / "derivatives" / "refmasks"))
    report = run_cohort(cohort.root, out, options=opts, workers=2)
    assert not report.failed
    writer = DerivativesWriter(out)
    separate = {k: t for k, t in cohort.runs.items() if t.variant == "separate"}
    assert any(t.te_ms != 30.0 for t in separate.values())  # echoes that differ
    return {k: json.loads(writer.subject_paths(k)["summary"].read_text())["M0a"] / t.m0a_te - 1
            for k, t in separate.items()}


def test_m0a_uses_each_echo_time(cohort, tmp_path):
    errors = _m0a_errors(cohort, tmp_path / "out")
    assert max(abs(e) for e in errors.values()) < 1e-5, errors  # noise-free


def test_one_echo_time_for_both_misses(cohort, tmp_path, monkeypatch):
    # finish_subject imports m0_refregion from aslcal.calibration when it runs
    original = calibration.m0_refregion

    def same_echo(*args, te_blood=None, te=0.0, **kwargs):
        return original(*args, te=te, te_blood=te, **kwargs)

    monkeypatch.setattr(calibration, "m0_refregion", same_echo)
    errors = _m0a_errors(cohort, tmp_path / "same")
    print(f"\nM0a errors with the M0's echo for the blood decay too: {errors}")
    assert max(abs(e) for e in errors.values()) > 1e-2
