"""2-D multi-slice M0 series in a cohort: BIDS ``SliceTiming`` reaches the fit.

The phantom cohort is acquired with a 2-D readout (slice z read 60 ms x z after the
volume's recovery time, 11-13 slices: up to 0.72 s late) and says so in the m0scan
sidecar.  Truth: the generator's M0a and the phantom's GM T1.

A delay common to every volume of a voxel is absorbed exactly by a free saturation
efficiency (A e^-(TI+d)/T1 = A' e^-TI/T1, and likewise for the Look-Locker train), so
M0, T1 and g come out right with or without the delays when A is fitted; with A fixed
at 1 (``--fixa``) they do not.  The control run ignores SliceTiming with A fixed and
must miss (so the tolerance proves the delays are applied).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import aslcal.cohort.subject as subject_module
from aslcal.cohort import CohortOptions, run_cohort
from aslcal.io import DerivativesWriter, load_image
from aslcal.io.bids import BidsFieldError, discover, read_run
from aslcal.testing import make_phantom
from aslcal.testing.bids import make_bids_cohort

SLICEDT = 0.06


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_bids_cohort(tmp_path_factory.mktemp("bids-2d"), n_subjects=8, seed=3, broken=0,
                            slicedt=SLICEDT)


def _run(cohort, out, fix_a=False):
    opts = CohortOptions(ref_masks=str(cohort.root / "derivatives" / "refmasks"), fix_a=fix_a)
    report = run_cohort(cohort.root, out, options=opts, workers=2)
    assert not report.failed
    return DerivativesWriter(out)


def _fitted(cohort):
    return {k: t for k, t in cohort.runs.items() if t.variant in ("satrecov", "look_locker")}


def test_slice_timing_is_read_by_slice_index(cohort):
    for key, truth in _fitted(cohort).items():
        run = next(r for r in discover(cohort.root) if r.key == key)
        m0 = read_run(run).m0
        assert m0.slice_axis == 2
        assert m0.slice_timing == pytest.approx(SLICEDT * np.arange(truth.shape[2]))


@pytest.mark.parametrize("fix_a", [False, True], ids=["A-free", "A-fixed"])
def test_m0a_and_t1_recovered_with_slice_delays(cohort, tmp_path, fix_a):
    writer = _run(cohort, tmp_path / "out", fix_a)
    fitted = _fitted(cohort)
    assert {t.variant for t in fitted.values()} == {"satrecov", "look_locker"}
    for key, truth in fitted.items():
        paths = writer.subject_paths(key)
        m0a = json.loads(paths["summary"].read_text())["M0a"]
        assert m0a == pytest.approx(truth.m0a_te, rel=1e-5), key  # noise-free
        ph = make_phantom(shape=truth.shape, voxel_size=truth.voxel_size, seed=truth.phantom_seed,
                          field_strength=truth.field_strength, m0a=truth.m0a,
                          struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
        t1 = load_image(paths["t1"]).data
        brain = load_image(paths["brain_mask"]).data > 0
        pure = brain & (ph.pv["gm"] > 0.999)
        np.testing.assert_allclose(t1[pure], ph.tissues["gm"].t1, rtol=1e-3)
        prov = json.loads(paths["provenance"].read_text())["calibration"]["slice_timing_s"]
        assert prov["axis"] == "k" and prov["times"] == pytest.approx(SLICEDT * np.arange(truth.shape[2]))


def test_ignoring_slice_timing_misses(cohort, tmp_path, monkeypatch):
    monkeypatch.setattr(subject_module, "_slice_delays", lambda src, shape: None)
    writer = _run(cohort, tmp_path / "ignored", fix_a=True)
    worst = max(abs(json.loads(writer.subject_paths(k)["summary"].read_text())["M0a"] / t.m0a_te - 1)
                for k, t in _fitted(cohort).items())
    print(f"\nM0a error with SliceTiming ignored and A fixed: {worst:.2%}")
    assert worst > 1e-3


def _sidecar_with(cohort, **fields):
    key = next(iter(_fitted(cohort)))
    run = next(r for r in discover(cohort.root) if r.key == key)
    meta = json.loads(run.m0scan_sidecar.read_text())
    original = run.m0scan_sidecar.read_text()
    meta.update(fields)
    run.m0scan_sidecar.write_text(json.dumps(meta))
    return run, original


@pytest.mark.parametrize("fields, match", [
    ({"SliceTiming": [0.0, 0.1]}, "'SliceTiming' has 2 entries"),
    ({"SliceTiming": [0.0, -0.1]}, "expected a list of slice times"),
    ({"SliceTiming": "ascending"}, "expected a list of slice times"),
    ({"SliceEncodingDirection": "z"}, "'SliceEncodingDirection'"),
])
def test_bad_slice_timing_names_the_field(cohort, fields, match):
    run, original = _sidecar_with(cohort, **fields)
    try:
        with pytest.raises(BidsFieldError, match=match) as info:
            read_run(run)
        assert info.value.field == next(iter(fields)) and str(info.value.file) == str(run.m0scan_sidecar)
    finally:
        run.m0scan_sidecar.write_text(original)


def test_negative_direction_lists_the_highest_slice_first(cohort):
    key = next(iter(_fitted(cohort)))
    n = cohort.runs[key].shape[0]
    # slice i at 0.1 * i s (a readout shorter than the longest recovery time, 8 s)
    run, original = _sidecar_with(cohort, SliceEncodingDirection="i-", SliceTiming=[0.1 * t for t in range(n)])
    try:
        m0 = read_run(run).m0
        assert m0.slice_axis == 0 and m0.slice_timing == tuple(0.1 * t for t in range(n - 1, -1, -1))
    finally:
        run.m0scan_sidecar.write_text(original)
