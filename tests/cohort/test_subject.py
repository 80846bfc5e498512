"""aslcal.cohort.subject: options, the reader stage of one subject, its fit jobs and errors.

Every expected value is computed here independently of the code under test: straight
from the files of the phantom BIDS cohort (nibabel, the JSON sidecars, the aslcontext),
from the cohort generator's truth, or from the tissue tables.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest

from aslcal.cohort import CohortOptions, SubjectError, load_subject
from aslcal.cohort.subject import ref_mask_path
from aslcal.errors import InputError
from aslcal.io import save_image, write_json
from aslcal.io.bids import discover
from aslcal.physics.tissues import tissue_table
from aslcal.testing.bids import BROKEN_VARIANTS, GOOD_VARIANTS, make_bids_cohort

# 13 subjects, 3 broken: every broken variant once, every good variant twice.  Seed 2
# gives the recovery-series subjects several field strengths (1.5, 3 and 7 T).
N_SUBJECTS = 13
SEED = 2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids-subject")
    return make_bids_cohort(root, n_subjects=N_SUBJECTS, seed=SEED, shape=(32, 32, 12), broken=3)


@pytest.fixture(scope="module")
def runs(cohort):
    return {run.key: run for run in discover(cohort.root)}


@pytest.fixture(scope="module")
def masks_dir(cohort) -> str:
    return str(cohort.root / "derivatives" / "refmasks")


def _keys(cohort, variant: str) -> list[str]:
    keys = [k for k, t in cohort.runs.items() if t.variant == variant]
    assert keys, f"the cohort has no {variant!r} subject"
    return keys


def _first(cohort, variant: str) -> str:
    return _keys(cohort, variant)[0]


def _nifti(path: Path) -> np.ndarray:
    return np.asarray(nibabel.load(str(path)).get_fdata(dtype=np.float64))


def _volume_types(path: Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    assert lines[0] == "volume_type"
    return lines[1:]


def _ref_mask_file(cohort, key: str) -> Path:
    return cohort.root / cohort.runs[key].ref_mask


def _copy_subject(cohort, key: str, dest: Path):
    """Copy one subject's raw data into a new dataset; returns its AslRun there."""
    truth = cohort.runs[key]
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(cohort.root / "dataset_description.json", dest / "dataset_description.json")
    shutil.copytree(cohort.root / f"sub-{truth.subject}", dest / f"sub-{truth.subject}")
    (run,) = [r for r in discover(dest) if r.key == key]
    return run


def test_cohort_has_what_these_tests_need(cohort):
    variants = [t.variant for t in cohort.runs.values()]
    assert set(variants) == set(GOOD_VARIANTS) | set(BROKEN_VARIANTS)
    assert variants.count("satrecov") >= 2 and variants.count("look_locker") >= 2
    fields = {cohort.runs[k].field_strength for v in ("satrecov", "look_locker") for k in _keys(cohort, v)}
    assert len(fields) >= 2, "the priors tests need recovery series at several field strengths"


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tissref": "bone"},
        {"tissref": "CSF"},
        {"m0_scale": "linear"},
        {"model": "fast"},
        {"pc": -0.9},
        {"pc": 0.0},
        {"pc": math.nan},
        {"pc": math.inf},
        {"pc": "0.9"},
        {"t1r": -4.3},
        {"t2b": 0},
        {"cgain": -1.0},
        {"voxel_pc": 0.0},
        {"voxel_t1t": -1.3},
        {"taq": -0.5},
        {"taq": math.nan},
        {"taq": "1"},
        {"cgain": None},
        {"voxel_pc": None},
        {"voxel_t1t": None},
        {"pc": True},
        {"taq": True},
        {"edge_correction": "no"},
        {"priors": "yes"},
        {"fix_a": 1},
        {"ref_masks": ""},
    ],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_options_reject_bad_values(kwargs):
    with pytest.raises(InputError) as info:
        CohortOptions(**kwargs)
    name = next(iter(kwargs))
    assert name in str(info.value)


def test_options_reject_missing_reference_mask_folder(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(InputError, match="does not exist"):
        CohortOptions(ref_masks=str(missing))
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder")
    with pytest.raises(InputError):
        CohortOptions(ref_masks=str(a_file))


def test_options_accept_boundary_values_and_m0_mode(tmp_path):
    opts = CohortOptions(taq=0.0, pc=0.9, t1r=4.3, t2b=50.0, cgain=2.0)
    assert opts.m0_mode == "voxel"
    assert opts.as_dict()["m0_mode"] == "voxel"
    with_masks = CohortOptions(ref_masks=str(tmp_path))
    assert with_masks.m0_mode == "refregion"
    assert with_masks.as_dict()["m0_mode"] == "refregion"
    assert with_masks.as_dict()["ref_masks"] == str(tmp_path)
    # A path-like folder works too.
    assert CohortOptions(ref_masks=tmp_path).m0_mode == "refregion"


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize("variant", BROKEN_VARIANTS)
def test_broken_run_fails_at_metadata_with_file_and_field(cohort, runs, masks_dir, variant):
    key = _first(cohort, variant)
    truth = cohort.runs[key]
    with pytest.raises(SubjectError) as info:
        load_subject(runs[key], CohortOptions(ref_masks=masks_dir), bids_root=cohort.root)
    err = info.value
    assert err.key == key
    assert err.stage == "metadata"
    assert err.details["file"] == str(cohort.root / truth.broken_file)
    assert err.details["field"] == truth.broken_field
    assert err.details["error"] == "BidsFieldError"
    assert truth.error_fragment in err.message
    assert str(err).startswith(f"{key}: metadata: ")


def _masks_copy(cohort, tmp_path) -> Path:
    dest = tmp_path / "refmasks"
    shutil.copytree(cohort.root / "derivatives" / "refmasks", dest)
    return dest


@pytest.mark.parametrize("variant", ["separate", "satrecov", "look_locker"])
def test_missing_reference_mask_fails_at_load_naming_the_path(cohort, runs, tmp_path, variant):
    key = _first(cohort, variant)
    truth = cohort.runs[key]
    masks = _masks_copy(cohort, tmp_path)
    rel = Path(truth.ref_mask).relative_to("derivatives/refmasks")
    (masks / rel).unlink()
    with pytest.raises(SubjectError) as info:
        load_subject(runs[key], CohortOptions(ref_masks=str(masks)), bids_root=cohort.root)
    err = info.value
    assert err.stage == "load"
    expected = f"sub-{truth.subject}/" + (f"ses-{truth.session}/" if truth.session else "") + (
        f"perf/{key}_desc-ref_mask.nii.gz")
    assert expected == rel.as_posix()
    assert expected in err.message
    assert str(masks) in err.message


def test_estimate_run_needs_no_reference_mask(cohort, runs, tmp_path):
    """M0Type Estimate gives M0a directly: its missing mask is not an error."""
    key = _first(cohort, "estimate")
    masks = _masks_copy(cohort, tmp_path)
    (masks / Path(cohort.runs[key].ref_mask).relative_to("derivatives/refmasks")).unlink()
    prep = load_subject(runs[key], CohortOptions(ref_masks=str(masks)), bids_root=cohort.root)
    assert prep.m0_kind == "estimate" and prep.ref is None and prep.jobs == []


def _replace_mask(cohort, key: str, masks: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = masks / Path(cohort.runs[key].ref_mask).relative_to("derivatives/refmasks")
    if affine is None:
        affine = nibabel.load(str(path)).affine
    save_image(path, data, affine, dtype=np.uint8, overwrite=True)
    return path


@pytest.mark.parametrize("variant", ["separate", "satrecov"])
def test_reference_mask_on_another_grid_fails_at_load(cohort, runs, tmp_path, variant):
    key = _first(cohort, variant)
    shape = cohort.runs[key].shape
    masks = _masks_copy(cohort, tmp_path)
    bigger = np.zeros((shape[0] + 2, shape[1], shape[2]), dtype=np.uint8)
    bigger[shape[0] // 2, shape[1] // 2, shape[2] // 2] = 1
    path = _replace_mask(cohort, key, masks, bigger)
    with pytest.raises(SubjectError) as info:
        load_subject(runs[key], CohortOptions(ref_masks=str(masks)), bids_root=cohort.root)
    assert info.value.stage == "load"
    assert str(path) in info.value.message
    assert str(tuple(bigger.shape)) in info.value.message and str(tuple(shape)) in info.value.message


def test_reference_mask_with_shifted_affine_fails_at_load(cohort, runs, tmp_path):
    key = _first(cohort, "separate")
    masks = _masks_copy(cohort, tmp_path)
    original = _ref_mask_file(cohort, key)
    img = nibabel.load(str(original))
    affine = img.affine.copy()
    affine[0, 3] += 2.0  # 2 mm off: same shape, not the ASL grid
    _replace_mask(cohort, key, masks, np.asarray(img.dataobj, dtype=np.uint8), affine)
    with pytest.raises(SubjectError) as info:
        load_subject(runs[key], CohortOptions(ref_masks=str(masks)), bids_root=cohort.root)
    assert info.value.stage == "load"
    assert "affine" in info.value.message


@pytest.mark.parametrize("variant", ["separate", "included", "satrecov", "look_locker"])
def test_empty_reference_mask_fails_at_prepare(cohort, runs, tmp_path, variant):
    key = _first(cohort, variant)
    masks = _masks_copy(cohort, tmp_path)
    path = _replace_mask(cohort, key, masks, np.zeros(cohort.runs[key].shape, dtype=np.uint8))
    with pytest.raises(SubjectError) as info:
        load_subject(runs[key], CohortOptions(ref_masks=str(masks)), bids_root=cohort.root)
    assert info.value.stage == "prepare"
    assert "empty" in info.value.message and str(path) in info.value.message


def test_reference_mask_path_finds_the_written_mask(cohort, runs, masks_dir, tmp_path):
    for key, truth in cohort.runs.items():
        assert ref_mask_path(masks_dir, runs[key]) == cohort.root / truth.ref_mask
        assert ref_mask_path(tmp_path, runs[key]) is None


# --------------------------------------------------------------------------- prepared


@pytest.mark.parametrize("variant", GOOD_VARIANTS)
def test_perfusion_is_mean_control_minus_mean_label(cohort, runs, masks_dir, variant):
    key = _first(cohort, variant)
    run = runs[key]
    prep = load_subject(run, CohortOptions(ref_masks=masks_dir), bids_root=cohort.root)
    data = _nifti(run.asl)
    types = _volume_types(run.aslcontext)
    assert len(types) == data.shape[-1]
    control = [i for i, t in enumerate(types) if t == "control"]
    label = [i for i, t in enumerate(types) if t == "label"]
    assert control and label
    expected = data[..., control].mean(axis=-1) - data[..., label].mean(axis=-1)
    assert prep.shape == tuple(cohort.runs[key].shape) == expected.shape
    assert prep.perf.shape == expected.shape
    np.testing.assert_allclose(prep.perf, expected, rtol=1e-6, atol=1e-6)
    # And the phantom's perfusion convention: control - label = cbf * M0a_TE * alpha / 6000
    # > 0 somewhere, never below 0 (a sign error would flip it).
    assert expected.max() > 0 and prep.perf.min() >= -1e-6
    np.testing.assert_allclose(prep.affine, nibabel.load(str(run.asl)).affine)


@pytest.mark.parametrize("variant", ["separate", "included"])
def test_long_tr_m0_image_is_the_mean_of_the_m0_volumes(cohort, runs, masks_dir, variant):
    key = _first(cohort, variant)
    run = runs[key]
    prep = load_subject(run, CohortOptions(ref_masks=masks_dir), bids_root=cohort.root)
    assert prep.m0_kind == "longtr" and prep.jobs == []
    if variant == "separate":
        m0 = _nifti(run.m0scan)
        m0 = m0 if m0.ndim == 3 else m0.mean(axis=-1)
        tr = json.loads(run.m0scan_sidecar.read_text())["RepetitionTimePreparation"]
    else:
        data = _nifti(run.asl)
        idx = [i for i, t in enumerate(_volume_types(run.aslcontext)) if t == "m0scan"]
        assert len(idx) == 2
        m0 = data[..., idx].mean(axis=-1)
        trs = json.loads(run.sidecar.read_text())["RepetitionTimePreparation"]
        tr = trs[idx[0]]
    assert prep.m0_tr == pytest.approx(tr) == cohort.runs[key].m0_trs[0]
    np.testing.assert_allclose(prep.m0_image, m0, rtol=1e-6)


def _expected_ref(cohort, key: str) -> np.ndarray:
    return _nifti(_ref_mask_file(cohort, key)) > 0.5


def test_satrecov_subject_has_one_job_with_the_sidecar_recovery_times(cohort, runs, masks_dir):
    for key in _keys(cohort, "satrecov"):
        run = runs[key]
        prep = load_subject(run, CohortOptions(ref_masks=masks_dir), bids_root=cohort.root)
        assert prep.m0_kind == "satrecov"
        sidecar = json.loads(run.m0scan_sidecar.read_text())
        trs = sidecar["RepetitionTimePreparation"]
        assert isinstance(trs, list) and len(set(trs)) > 1
        (job,) = prep.jobs
        assert job.role == "brain"
        assert job.tis == tuple(float(t) for t in trs)
        assert job.fa is None and job.lfa is None and job.dt is None and job.prior_t1 is None
        ref = _expected_ref(cohort, key)
        assert ref.sum() == cohort.runs[key].n_ref_voxels
        np.testing.assert_array_equal(prep.ref, ref)
        # Without priors one fit covers the brain and the reference region.
        np.testing.assert_array_equal(job.mask, prep.brain | ref)
        m0 = _nifti(run.m0scan)
        assert m0.shape[-1] == len(trs)
        assert job.series.dtype == np.float32 and job.series.flags.c_contiguous
        np.testing.assert_array_equal(job.series, m0[job.mask].astype(np.float32))
        assert job.n_vox == int((prep.brain | ref).sum())


def test_look_locker_subject_job_has_high_and_low_flip_angles(cohort, runs, masks_dir):
    for key in _keys(cohort, "look_locker"):
        run = runs[key]
        prep = load_subject(run, CohortOptions(ref_masks=masks_dir), bids_root=cohort.root)
        assert prep.m0_kind == "lookLocker"
        sidecar = json.loads(run.m0scan_sidecar.read_text())
        assert sidecar["LookLocker"] is True
        angles = sidecar["FlipAngle"]
        assert len(set(angles)) == 2
        (job,) = prep.jobs
        assert job.fa == max(angles) and job.lfa == min(angles)
        assert job.fa != job.lfa
        assert job.tis == tuple(float(t) for t in sidecar["InversionTime"])
        assert job.prior_t1 is None
        m0 = _nifti(run.m0scan)
        np.testing.assert_array_equal(job.series, m0[job.mask].astype(np.float32))


@pytest.mark.parametrize("variant", ["satrecov", "look_locker"])
def test_priors_give_a_brain_job_and_a_reference_job(cohort, runs, masks_dir, variant):
    for key in _keys(cohort, variant):
        truth = cohort.runs[key]
        prep = load_subject(runs[key], CohortOptions(ref_masks=masks_dir, priors=True), bids_root=cohort.root)
        assert [j.role for j in prep.jobs] == ["brain", "ref"]
        brain, ref = prep.jobs
        assert brain.prior_t1 == pytest.approx(1.3)
        csf_t1 = tissue_table(truth.field_strength)["csf"].t1
        assert ref.prior_t1 == pytest.approx(csf_t1), (key, truth.field_strength)
        assert brain.group != ref.group
        # Same design, its own voxels.
        assert (brain.tis, brain.fa, brain.lfa) == (ref.tis, ref.fa, ref.lfa)
        expected_ref = _expected_ref(cohort, key)
        np.testing.assert_array_equal(ref.mask, expected_ref)
        np.testing.assert_array_equal(brain.mask, prep.brain)
        assert ref.n_vox == truth.n_ref_voxels
        m0 = _nifti(runs[key].m0scan)
        np.testing.assert_array_equal(ref.series, m0[expected_ref].astype(np.float32))


def test_priors_reference_t1_follows_tissref_and_user_values(cohort, runs, masks_dir):
    key = _first(cohort, "satrecov")
    fs = cohort.runs[key].field_strength
    run = runs[key]

    def ref_prior(**kw):
        prep = load_subject(run, CohortOptions(ref_masks=masks_dir, priors=True, **kw), bids_root=cohort.root)
        return prep.jobs[1].prior_t1

    assert ref_prior(tissref="wm") == pytest.approx(tissue_table(fs)["wm"].t1)
    assert ref_prior(t1r=3.9) == pytest.approx(3.9)
    assert ref_prior(tissue_overrides={"csf": {"t1": 4.1}}) == pytest.approx(4.1)


def test_priors_without_reference_masks_fit_the_brain_only(cohort, runs):
    key = _first(cohort, "satrecov")
    prep = load_subject(runs[key], CohortOptions(priors=True), bids_root=cohort.root)
    (job,) = prep.jobs
    assert job.role == "brain" and job.prior_t1 == pytest.approx(1.3)
    np.testing.assert_array_equal(job.mask, prep.brain)


# --------------------------------------------------------------------------- designs


def _edit_m0scan_json(run, **changes) -> Path:
    path = run.m0scan_sidecar
    meta = json.loads(path.read_text())
    meta.update(changes)
    write_json(path, meta, overwrite=True)
    return path


def _ll_angles(cohort, runs) -> tuple[float, float, int, int]:
    """(high, low, n_high, n_low) of the cohort's Look-Locker sidecar."""
    key = _first(cohort, "look_locker")
    angles = json.loads(runs[key].m0scan_sidecar.read_text())["FlipAngle"]
    high, low = max(angles), min(angles)
    return high, low, angles.count(high), angles.count(low)


def test_valid_look_locker_copy_loads(cohort, runs, tmp_path):
    """The control for the next tests: an unedited copy of the run prepares fine."""
    key = _first(cohort, "look_locker")
    run = _copy_subject(cohort, key, tmp_path / "copy")
    prep = load_subject(run, CohortOptions(), bids_root=tmp_path / "copy")
    high, low, _, _ = _ll_angles(cohort, runs)
    assert (prep.jobs[0].fa, prep.jobs[0].lfa) == (high, low)


@pytest.mark.parametrize("layout", ["three_angles", "low_first", "low_interleaved"])
def test_bad_flip_angle_layout_fails_at_prepare(cohort, runs, tmp_path, layout):
    key = _first(cohort, "look_locker")
    high, low, n_high, n_low = _ll_angles(cohort, runs)
    if layout == "three_angles":
        angles = [high] * n_high + [low] * (n_low - 1) + [20.0]
        fragment = "3 distinct values"
    elif layout == "low_first":
        angles = [low] * n_low + [high] * n_high
        fragment = "must be the last phase"
    else:
        angles = [high] * (n_high - 1) + [low] + [high] + [low] * (n_low - 1)
        fragment = "must be the last phase"
    assert len(angles) == n_high + n_low
    run = _copy_subject(cohort, key, tmp_path / "copy")
    sidecar = _edit_m0scan_json(run, FlipAngle=angles)
    with pytest.raises(SubjectError) as info:
        load_subject(run, CohortOptions(), bids_root=tmp_path / "copy")
    err = info.value
    assert err.stage == "prepare"
    assert fragment in err.message
    assert str(sidecar) in err.message and "FlipAngle" in err.message


def test_look_locker_three_plus_one_phases_end_to_end(cohort, runs, masks_dir, tmp_path):
    """A QUASAR-like m0scan: 3 high-flip-angle phases of 10 readouts, then the low one
    (calibration.md §7.1).  The FlipAngle list gives nphases = 30 / 10 = 3: the design
    marks 10 volumes low (not the last half, 20) and M0a is the phantom's within 0.5 %
    (noise-free; it was off by +88 % with every voxel 'converged')."""
    import dataclasses

    from aslcal.cohort import run_cohort
    from aslcal.testing import make_phantom
    from aslcal.testing.phantoms import look_locker_series

    key = _first(cohort, "look_locker")
    truth = cohort.runs[key]
    ph = make_phantom(shape=truth.shape, voxel_size=truth.voxel_size, seed=truth.phantom_seed,
                      field_strength=truth.field_strength, m0a=truth.m0a,
                      struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
    ph = dataclasses.replace(ph, sensitivity=np.ones_like(ph.sensitivity))  # the cohort's flat coil
    data, ll = look_locker_series(ph, ti1=0.1, dt=0.3, n_ti=10, fa=35.0, lfa=11.7, nphases=3, te=truth.te_ms)
    assert data.shape[-1] == 40
    run = _copy_subject(cohort, key, tmp_path / "copy")
    save_image(run.m0scan, data, ph.affine, dtype="float32", overwrite=True)
    _edit_m0scan_json(run, FlipAngle=[35.0] * 30 + [11.7] * 10,
                      InversionTime=[round(float(x), 9) for x in ll["ti_per_volume"]])
    prep = load_subject(run, CohortOptions(ref_masks=masks_dir), bids_root=tmp_path / "copy")
    assert prep.jobs[0].nphases == 3
    report = run_cohort(tmp_path / "copy", tmp_path / "out", options=CohortOptions(ref_masks=masks_dir), workers=1)
    assert not report.failed, report.failed
    out = tmp_path / "out" / "derivatives" / "aslcal" / run.asl.parent.relative_to(tmp_path / "copy")
    summary = json.loads((out / f"{key}_desc-aslcal_summary.json").read_text())
    prov = json.loads((out / f"{key}_desc-aslcal_provenance.json").read_text())
    assert sum(prov["fits"]["brain"]["design"]["low_flip_angle_volume"]) == 10
    assert summary["M0a"] == pytest.approx(truth.m0a_te, rel=5e-3)


def test_look_locker_phases_of_unequal_length_fail_at_prepare(cohort, runs, tmp_path):
    key = _first(cohort, "look_locker")
    high, low, n_high, n_low = _ll_angles(cohort, runs)
    run = _copy_subject(cohort, key, tmp_path / "copy")
    angles = [high] * (n_high + n_low - 3) + [low] * 3  # 17 high volumes: not whole phases of 3
    _edit_m0scan_json(run, FlipAngle=angles)
    with pytest.raises(SubjectError, match="do not make whole phases"):
        load_subject(run, CohortOptions(), bids_root=tmp_path / "copy")


def test_single_flip_angle_look_locker_has_no_low_angle(cohort, runs, tmp_path):
    key = _first(cohort, "look_locker")
    high, _, n_high, n_low = _ll_angles(cohort, runs)
    run = _copy_subject(cohort, key, tmp_path / "copy")
    _edit_m0scan_json(run, FlipAngle=[high] * (n_high + n_low))
    prep = load_subject(run, CohortOptions(), bids_root=tmp_path / "copy")
    (job,) = prep.jobs
    assert job.fa == high and job.lfa is None


# --------------------------------------------------------------------------- M0Type Absent


def test_allow_control_m0_still_refuses_background_suppression(cohort, runs, masks_dir):
    key = _first(cohort, "absent_bs")
    truth = cohort.runs[key]
    for allow in (False, True):
        with pytest.raises(SubjectError) as info:
            load_subject(runs[key], CohortOptions(ref_masks=masks_dir, allow_control_m0=allow),
                         bids_root=cohort.root)
        err = info.value
        assert err.stage == "metadata"
        assert err.details["field"] == "M0Type"
        assert err.details["file"] == str(cohort.root / truth.broken_file)
    assert "BackgroundSuppression" in err.message  # the allowed fallback is refused for BS


def test_allow_control_m0_without_background_suppression_uses_mean_control(cohort, runs, tmp_path):
    """The positive control of the test above: BackgroundSuppression false makes it load."""
    key = _first(cohort, "absent_bs")
    run = _copy_subject(cohort, key, tmp_path / "copy")
    meta = json.loads(run.sidecar.read_text())
    meta["BackgroundSuppression"] = False
    write_json(run.sidecar, meta, overwrite=True)
    with pytest.raises(SubjectError) as info:
        load_subject(run, CohortOptions(), bids_root=tmp_path / "copy")
    assert info.value.stage == "metadata" and info.value.details["field"] == "M0Type"
    prep = load_subject(run, CohortOptions(allow_control_m0=True), bids_root=tmp_path / "copy")
    assert prep.m0_kind == "control" and prep.jobs == []
    data = _nifti(run.asl)
    control = [i for i, t in enumerate(_volume_types(run.aslcontext)) if t == "control"]
    np.testing.assert_allclose(prep.m0_image, data[..., control].mean(axis=-1), rtol=1e-6)
    trs = meta["RepetitionTimePreparation"]
    assert prep.m0_tr == pytest.approx(trs[control[0]] if isinstance(trs, list) else trs)


def test_tissref_none_needs_its_values_up_front(tmp_path):
    """--tissref none with reference masks: T1r and pc have no defaults, refused before any
    subject is fitted (every subject used to fail at calibrate)."""
    with pytest.raises(InputError, match=r"give t1r \(--t1r\), pc \(--pc\)"):
        CohortOptions(ref_masks=str(tmp_path), tissref="none")
    with pytest.raises(InputError, match=r"give pc \(--pc\)$"):
        CohortOptions(ref_masks=str(tmp_path), tissref="none", t1r=4.0)
    CohortOptions(ref_masks=str(tmp_path), tissref="none", t1r=4.0, pc=1.1)
    CohortOptions(tissref="none")  # voxelwise M0: no reference tissue


def test_priors_reference_t1_summary_comes_from_the_reference_fit(tmp_path):
    """With priors the reference region has its own fit (T1 prior = the tissue's T1) and
    that fit makes M0a; T1_mean_ref_csf must be its T1 (near the CSF table value 4.3 s
    at 3 T), not the whole-brain fit's, pulled towards the brain prior of 1.3 s (2.97 s
    was reported for a saturation-recovery subject at SNR 50)."""
    from aslcal.cohort import run_cohort

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=5, seed=7, broken=0, snr=50.0, image_dtype="int16")
    keys = [k for k, t in truth.runs.items() if t.variant in ("satrecov", "look_locker") and t.field_strength == 3.0]
    assert keys
    out = tmp_path / "out"
    opts = CohortOptions(ref_masks=str(truth.root / "derivatives" / "refmasks"), priors=True)
    report = run_cohort(truth.root, out, options=opts, workers=1,
                        participant_label=[truth.runs[k].subject for k in keys])
    assert not report.failed, report.failed
    for key in keys:
        t = truth.runs[key]
        perf = out / "derivatives" / "aslcal" / f"sub-{t.subject}" / (f"ses-{t.session}" if t.session else "") / "perf"
        summary = json.loads((perf / f"{key}_desc-aslcal_summary.json").read_text())
        assert summary["T1_mean_ref_csf"] == pytest.approx(tissue_table(3.0)["csf"].t1, rel=0.1), (key, summary)


@pytest.mark.parametrize(("tr", "fragment"), [(6.0, None), (3.0, "corrected for its short TR (3 s)")])
def test_voxelwise_m0_description_says_the_tr_correction_only_when_applied(tmp_path, tr, fragment):
    """calibration.md §5: the short-TR factor applies below 5 s only; the M0 map's
    sidecar says it was applied exactly then."""
    from aslcal.cohort import run_cohort

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=1, seed=1, broken=0, shape=(16, 16, 8), ref_masks=False)
    (t,) = truth.runs.values()
    assert t.variant == "separate"
    sidecar = truth.root / f"sub-{t.subject}" / "perf" / f"{t.key}_m0scan.json"
    meta = json.loads(sidecar.read_text())
    meta["RepetitionTimePreparation"] = tr
    write_json(sidecar, meta, overwrite=True)
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(), workers=1)  # no masks: voxelwise
    assert not report.failed, report.failed
    perf = tmp_path / "out" / "derivatives" / "aslcal" / f"sub-{t.subject}" / "perf"
    (m0_json,) = perf.glob(f"{t.key}_desc-M0_*.json")
    text = json.loads(m0_json.read_text())["Description"]
    if fragment is None:
        assert "TR" not in text, text
    else:
        assert fragment in text, text


def test_background_suppression_efficiency_scales_alpha(tmp_path):
    """--bs-efficiency E (opt-in): a run with BackgroundSuppression true, 4 pulses and no
    LabelingEfficiency gets alpha x E^4, so its CBF is the uncorrected one / E^4 voxel by
    voxel; without BackgroundSuppressionNumberPulses the run fails naming that field."""
    from aslcal.cohort import run_cohort
    from aslcal.io import load_image

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=1, broken=0, shape=(16, 16, 8), ref_masks=False)
    keys = sorted(truth.runs)
    labelling = {}
    for i, key in enumerate(keys):
        t = truth.runs[key]
        sidecar = truth.root / f"sub-{t.subject}" / (f"ses-{t.session}" if t.session else "") / "perf" / f"{key}_asl.json"
        meta = json.loads(sidecar.read_text())
        meta.pop("LabelingEfficiency", None)
        meta["BackgroundSuppression"] = True
        if i == 0:
            meta["BackgroundSuppressionNumberPulses"] = 4
        labelling[key] = meta["ArterialSpinLabelingType"]
        write_json(sidecar, meta, overwrite=True)
    reports = {name: run_cohort(truth.root, tmp_path / name, options=CohortOptions(bs_efficiency=eff), workers=1)
               for name, eff in (("plain", None), ("bs", 0.95))}
    assert not reports["plain"].failed
    assert [f["key"] for f in reports["bs"].failed] == [keys[1]]
    assert "BackgroundSuppressionNumberPulses" in reports["bs"].failed[0]["message"]
    t = truth.runs[keys[0]]
    rel = Path("derivatives/aslcal") / f"sub-{t.subject}" / (f"ses-{t.session}" if t.session else "") / "perf"
    (cbf_plain,) = (tmp_path / "plain" / rel).glob("*_desc-cbf_cbf.nii.gz")
    a = load_image(cbf_plain, dtype="float64").data
    b = load_image(tmp_path / "bs" / rel / cbf_plain.name, dtype="float64").data
    brain = a != 0
    np.testing.assert_allclose(b[brain], a[brain] / 0.95**4, rtol=1e-6)
    record = json.loads((tmp_path / "bs" / rel / cbf_plain.name.replace(".nii.gz", ".json")).read_text())
    base = 0.98 if labelling[keys[0]] == "PASL" else 0.85  # calibration.md §9 defaults
    assert record["LabelingEfficiency"] == pytest.approx(base * 0.95**4, rel=1e-12)
    # with LabelingEfficiency in the sidecar it is alpha as it is: the option is said to be unused
    sidecar = truth.root / f"sub-{t.subject}" / (f"ses-{t.session}" if t.session else "") / "perf" / f"{keys[0]}_asl.json"
    write_json(sidecar, {**json.loads(sidecar.read_text()), "LabelingEfficiency": 0.7}, overwrite=True)
    run_cohort(truth.root, tmp_path / "given", options=CohortOptions(bs_efficiency=0.95), workers=1)
    summary = json.loads(next((tmp_path / "given" / rel).glob("*_desc-aslcal_summary.json")).read_text())
    assert "--bs-efficiency not applied" in summary["warnings"] and "LabelingEfficiency" in summary["warnings"]
    given = json.loads((tmp_path / "given" / rel / cbf_plain.name.replace(".nii.gz", ".json")).read_text())
    assert given["LabelingEfficiency"] == 0.7


def test_anat_paths_take_the_most_specific_matrix(tmp_path):
    """One structural for all sessions (sub-X/anat) with each session's own ASL->T1w
    matrix in its anat folder: the session's matrix is used (it was ignored, and the
    images taken as aligned in world coordinates); a run's own matrix wins over it."""
    from aslcal.cohort.subject import anat_paths
    from aslcal.io.bids import AslRun

    sub = tmp_path / "sub-04"
    (sub / "anat").mkdir(parents=True)
    (sub / "ses-1" / "anat").mkdir(parents=True)
    t1w = sub / "anat" / "sub-04_desc-brain_T1w.nii.gz"
    t1w.write_bytes(b"")
    suffix = "_from-asl_to-T1w_mode-image_xfm.mat"
    subject_mat = sub / "anat" / f"sub-04{suffix}"
    subject_mat.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    run = AslRun(subject="04", session="1", run="2", entities={"sub": "04", "ses": "1", "run": "2"},
                 key="sub-04_ses-1_run-2", asl=tmp_path / "x_asl.nii.gz", sidecar=tmp_path / "x_asl.json",
                 aslcontext=tmp_path / "x_aslcontext.tsv")
    assert anat_paths(tmp_path, run) == (t1w, subject_mat)
    session_mat = sub / "ses-1" / "anat" / f"sub-04_ses-1{suffix}"
    session_mat.write_text(subject_mat.read_text())
    assert anat_paths(tmp_path, run) == (t1w, session_mat)
    run_mat = sub / "ses-1" / "anat" / f"sub-04_ses-1_run-2{suffix}"
    run_mat.write_text(subject_mat.read_text())
    assert anat_paths(tmp_path, run) == (t1w, run_mat)
    # the session's own T1w: never paired with the subject-level matrix (made against
    # the other T1w); without a matrix of its own the images are taken as aligned
    for f in (session_mat, run_mat):
        f.unlink()
    ses_t1w = sub / "ses-1" / "anat" / "sub-04_ses-1_desc-brain_T1w.nii.gz"
    ses_t1w.write_bytes(b"")
    assert anat_paths(tmp_path, run) == (ses_t1w, None)
    # an ITK text transform of the session (fMRIPrep's form) is found like a matrix; with
    # a .mat of the same name beside it, which one is meant is unknown
    txt = sub / "ses-1" / "anat" / "sub-04_ses-1_from-asl_to-T1w_mode-image_xfm.txt"
    txt.write_text("#Insight Transform File V1.0\n")
    assert anat_paths(tmp_path, run) == (ses_t1w, txt)
    session_mat.write_text(subject_mat.read_text())
    with pytest.raises(InputError, match=r"two ASL->T1w transforms for sub-04_ses-1_run-2"):
        anat_paths(tmp_path, run)


def test_two_t1w_images_of_one_run_are_refused(tmp_path):
    """--anat: a .nii.gz and a .nii T1w side by side; which one is meant is unknown (as
    for two reference masks or two ASL images): the run fails naming both."""
    from aslcal.cohort.subject import _load_reference
    from aslcal.io.bids import AslRun

    anat = tmp_path / "anat" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    img = np.zeros((4, 4, 4), np.float32)
    for ext in (".nii.gz", ".nii"):
        save_image(anat / f"sub-01_desc-brain_T1w{ext}", img, np.eye(4))
    run = AslRun(subject="01", session=None, run=None, entities={"sub": "01"}, key="sub-01",
                 asl=tmp_path / "sub-01_asl.nii.gz", sidecar=tmp_path / "sub-01_asl.json",
                 aslcontext=tmp_path / "sub-01_aslcontext.tsv")
    with pytest.raises(InputError, match="two brain-extracted T1w images for sub-01"):
        _load_reference(run, None, CohortOptions(anat=str(tmp_path / "anat")))


@pytest.mark.parametrize("value", [10**400, -1, 2.5, "4", True])
def test_background_suppression_pulse_count_is_checked_before_the_fit(cohort, runs, tmp_path, value):
    """With --bs-efficiency, BackgroundSuppressionNumberPulses must be an integer 0..20:
    anything else fails the run while it is prepared (before any fit), naming the file
    and the field (a 400-digit integer was an OverflowError after the fit); without the
    option the field is not read."""
    key = _first(cohort, "separate")
    run = _copy_subject(cohort, key, tmp_path / "copy")
    meta = json.loads(run.sidecar.read_text())
    meta.pop("LabelingEfficiency", None)
    meta["BackgroundSuppression"] = True
    meta["BackgroundSuppressionNumberPulses"] = value
    run.sidecar.write_text(json.dumps(meta))
    with pytest.raises(SubjectError) as info:
        load_subject(run, CohortOptions(bs_efficiency=0.95), bids_root=tmp_path / "copy")
    err = info.value
    assert err.stage == "prepare" and "BackgroundSuppressionNumberPulses" in err.message
    assert str(run.sidecar) in err.message
    load_subject(run, CohortOptions(), bids_root=tmp_path / "copy")  # not read: no error
