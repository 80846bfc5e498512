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


def _calibrate(root, key, quantification="whitepaper"):
    opts = CohortOptions(ref_masks=str(root / "derivatives" / "refmasks"), quantification=quantification)
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
