"""aslcal.testing.bids: the phantom BIDS cohort is valid, varied, broken where it says."""

from __future__ import annotations

import hashlib
import json
import math

import nibabel as nib
import numpy as np
import pytest

from aslcal.calibration.refregion import m0_refregion
from aslcal.errors import InputError
from aslcal.io import load_image
from aslcal.io.bids import discover, read_run
from aslcal.physics.tissues import tissue_table
from aslcal.testing import make_phantom
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
            # BIDS M0Estimate: the M0 of blood as seen at the sequence TE.
            t2b = tissue_table(truth.field_strength)["blood"].t2
            assert acq.m0.estimate == pytest.approx(truth.m0a * math.exp(-truth.te_ms / t2b), rel=1e-8)
            assert truth.m0a_te == pytest.approx(truth.m0a * math.exp(-truth.te_ms / t2b), rel=1e-12)
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


def test_reference_masks_written_and_true(cohort):
    root = cohort.root
    desc = json.loads((root / "derivatives/refmasks/dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"] == "1.9.0"
    assert desc["GeneratedBy"][0]["Name"] == "aslcal.testing.make_bids_cohort"
    for run in discover(root):  # the derivatives folder is not taken for raw data
        truth = cohort.runs[run.key]
        perf_rel = run.asl.parent.relative_to(root).as_posix()
        assert truth.ref_mask == f"derivatives/refmasks/{perf_rel}/{run.key}_desc-ref_mask.nii.gz"
        img = nib.load(root / truth.ref_mask)
        assert img.get_data_dtype() == np.uint8
        assert np.allclose(img.affine, nib.load(run.asl).affine)
        mask = np.asarray(img.dataobj)
        assert mask.shape == truth.shape and set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == truth.n_ref_voxels > 0
    # One subject: the mask is the pure lateral ventricle of a freshly made phantom.
    truth = next(t for t in cohort.runs.values() if t.session)
    ph = make_phantom(shape=truth.shape, voxel_size=truth.voxel_size, seed=truth.phantom_seed,
                      field_strength=truth.field_strength, m0a=truth.m0a,
                      struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
    mask = np.asarray(nib.load(root / truth.ref_mask).dataobj)
    np.testing.assert_array_equal(mask.astype(bool), ph.ventricle_pv >= 0.99)
    assert truth.cbf_gm == ph.cbf_gm and truth.cbf_wm == ph.cbf_wm and truth.flat_coil


def test_a_grid_without_pure_ventricle_is_refused_with_masks(tmp_path):
    """16x16x8 voxels over the phantom's field of view are 12-15 mm wide: no voxel is pure
    ventricle (partial volume >= 0.99), so a reference mask would be empty and a "good"
    subject would fail.  Refused, naming the grid; without masks the cohort is made."""
    shape = (16, 16, 8)
    ph = make_phantom(shape=shape, voxel_size=(217.6 / 16, 217.6 / 16, 120.0 / 8), seed=0,
                      struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
    assert not np.any(ph.ventricle_pv >= 0.99)  # why: the coarse grid has no pure voxel
    with pytest.raises(InputError, match=r"shape=\(16, 16, 8\): the grid of sub-01, .* no voxel of pure ventricle"):
        make_bids_cohort(tmp_path / "masks", n_subjects=2, seed=1, shape=shape, broken=0)
    truth = make_bids_cohort(tmp_path / "plain", n_subjects=2, seed=1, shape=shape, broken=0, ref_masks=False)
    assert all(t.ref_mask is None for t in truth.runs.values())


def _refregion_m0a(root, truth, mask_path):
    """m0_refregion on the run's written m0scan (a one-volume long-TR image, TR 6 s)."""
    run = next(r for r in discover(root) if r.key == truth.key)
    res = m0_refregion(load_image(run.m0scan).data, load_image(mask_path).data, tr=6.0,
                       te=truth.te_ms, field_strength=truth.field_strength)
    assert res.n_voxels == truth.n_ref_voxels
    return res


def test_flat_coil_refregion_recovers_m0a(cohort):
    """Noise-free, flat receive field: the ventricle reference region gives the true M0a.

    m0_refregion reports M0a at the echo time, ``M0a * exp(-TE/T2b)`` (the blood T2
    decay of the perfusion signal); that factor is divided out here.
    """
    truth = next(t for t in cohort.good.values() if t.variant == "separate")
    res = _refregion_m0a(cohort.root, truth, cohort.root / truth.ref_mask)
    t2b = res.t2b_factor
    assert t2b == pytest.approx(math.exp(-truth.te_ms / res.t2b) if truth.te_ms else 1.0)
    assert res.m0a / t2b == pytest.approx(truth.m0a, rel=1e-3)


def test_receive_coil_and_no_masks(tmp_path):
    """flat_coil=False keeps the phantom's receive map; ref_masks=False writes no masks."""
    flat = make_bids_cohort(tmp_path / "flat", 1, seed=2, broken=0, ref_masks=True)
    coil = make_bids_cohort(tmp_path / "coil", 1, seed=2, broken=0, flat_coil=False,
                            ref_masks=False)
    assert not (coil.root / "derivatives").exists()
    (key, t_coil), = coil.runs.items()
    t_flat = flat.runs[key]
    assert t_coil.ref_mask is None and not t_coil.flat_coil
    assert t_coil.n_ref_voxels == t_flat.n_ref_voxels > 0
    assert t_flat.variant == t_coil.variant == "separate"
    ph = make_phantom(shape=t_coil.shape, voxel_size=t_coil.voxel_size,
                      seed=t_coil.phantom_seed, field_strength=t_coil.field_strength,
                      m0a=t_coil.m0a, struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
    (run_flat,), (run_coil,) = discover(flat.root), discover(coil.root)
    m0_flat, asl_flat = load_image(run_flat.m0scan).data, load_image(run_flat.asl).data
    m0_coil, asl_coil = load_image(run_coil.m0scan).data, load_image(run_coil.asl).data
    # coil image = flat image * the receive map (M0 and every ASL volume).
    inside = m0_flat > 1e-3 * m0_flat.max()
    np.testing.assert_allclose(m0_coil[inside] / m0_flat[inside], ph.sensitivity[inside], rtol=1e-5)
    np.testing.assert_allclose(asl_coil, asl_flat * ph.sensitivity[..., None].astype(np.float32),
                               rtol=1e-5, atol=1e-4)


def test_deterministic_from_seed(tmp_path, cohort):
    small_a = make_bids_cohort(tmp_path / "a", 6, seed=5, broken=1)
    small_b = make_bids_cohort(tmp_path / "b", 6, seed=5, broken=1)
    assert _checksums(small_a.root) == _checksums(small_b.root)
    assert small_a.runs == small_b.runs
    other = make_bids_cohort(tmp_path / "c", 6, seed=6, broken=1)
    assert _checksums(other.root) != _checksums(small_a.root)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_subjects": 0}, "n_subjects"), ({"broken": 9}, "broken"), ({"shape": (4, 4, 4)}, "shape"),
     ({"flat_coil": 1}, "flat_coil"), ({"ref_masks": None}, "ref_masks"), ({"snr": 0}, "snr"),
     ({"snr": float("nan")}, "snr"), ({"snr": True}, "snr"), ({"image_dtype": "int8"}, "image_dtype"),
     ({"n_pairs": 0}, "n_pairs"), ({"n_pairs": 2.5}, "n_pairs")],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"n_subjects": 5, **kwargs}
    with pytest.raises(InputError, match=match):
        make_bids_cohort(tmp_path, **args)


def test_noisy_cohort_has_the_rician_noise_it_says(tmp_path):
    """snr: every ASL and m0scan volume has Rician noise of sigma = M0_gm / snr (flat
    coil).  Where the clean signal is 0 (outside the head) a Rician magnitude is
    Rayleigh: mean sigma * sqrt(pi / 2), mean square 2 sigma^2.  Same seed, same bytes."""
    truth = make_bids_cohort(tmp_path / "a", 6, seed=2, broken=0, snr=40)
    again = make_bids_cohort(tmp_path / "b", 6, seed=2, broken=0, snr=40)
    assert _checksums(truth.root) == _checksums(again.root)
    clean = make_bids_cohort(tmp_path / "c", 6, seed=2, broken=0)
    checked = 0
    for key, run in truth.runs.items():
        ph = make_phantom(shape=run.shape, voxel_size=run.voxel_size, seed=run.phantom_seed,
                          field_strength=run.field_strength, m0a=run.m0a,
                          struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
        expected = ph.m0_tissue["gm"] / 40  # flat coil: mean_GM(s) = 1
        assert run.noise_sigma == pytest.approx(expected, rel=1e-12)
        assert clean.runs[key].noise_sigma is None
        acq = read_run(discover(truth.root, participant_label=run.subject)[0])
        images = [acq.load_asl().data] + ([acq.load_m0().data] if acq.m0.kind == "separate" else [])
        clean_acq = read_run(discover(clean.root, participant_label=run.subject)[0])
        clean_images = [clean_acq.load_asl().data] + (
            [clean_acq.load_m0().data] if clean_acq.m0.kind == "separate" else [])
        for noisy, noise_free in zip(images, clean_images, strict=True):
            outside = noise_free == 0
            background = noisy[outside].astype(np.float64)
            assert background.size > 2000
            assert np.mean(background) == pytest.approx(expected * math.sqrt(math.pi / 2), rel=0.05)
            assert np.mean(background ** 2) == pytest.approx(2 * expected ** 2, rel=0.05)
            assert not np.array_equal(noisy, noise_free)
            checked += 1
    assert checked >= 6


def test_int16_images_are_the_float_images_rounded(tmp_path):
    """image_dtype="int16": the same images as float32, rounded to integers on disk."""
    ints = make_bids_cohort(tmp_path / "i", 6, seed=4, broken=0, snr=50, image_dtype="int16")
    floats = make_bids_cohort(tmp_path / "f", 6, seed=4, broken=0, snr=50)
    n = 0
    for key, run in ints.runs.items():
        for suffix in ("asl", "m0scan"):
            rel = next(ints.root.rglob(f"{key}_{suffix}.nii.gz"), None)
            if rel is None:
                continue
            a = nib.load(rel)
            b = nib.load(next(floats.root.rglob(f"{key}_{suffix}.nii.gz")))
            assert a.get_data_dtype() == np.int16 and b.get_data_dtype() == np.float32
            np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.rint(np.asanyarray(b.dataobj)))
            n += 1
    assert n >= 6


def test_n_pairs_sets_every_series_length(tmp_path):
    """n_pairs: every ASL series holds that many control/label pairs (plus the m0scan
    volumes of an "included" run), its aslcontext and TotalAcquiredPairs say so; the
    subjects are otherwise those of the same seed without it."""
    import json

    import nibabel as nib

    base = make_bids_cohort(tmp_path / "a", 6, seed=2, broken=0, shape=(12, 12, 8), ref_masks=False)
    long = make_bids_cohort(tmp_path / "b", 6, seed=2, broken=0, shape=(12, 12, 8), n_pairs=7, ref_masks=False)
    assert {k: t.m0a for k, t in base.runs.items()} == {k: t.m0a for k, t in long.runs.items()}
    for key, truth in long.runs.items():
        asl = next(long.root.rglob(f"{key}_asl.nii.gz"))
        types = (asl.parent / f"{key}_aslcontext.tsv").read_text().split()[1:]
        assert types.count("control") == 7 and types.count("label") == 7
        assert nib.load(asl).shape[3] == len(types) == 14 + types.count("m0scan")
        assert json.loads((asl.parent / f"{key}_asl.json").read_text())["TotalAcquiredPairs"] == 7
