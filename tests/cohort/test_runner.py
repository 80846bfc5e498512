"""aslcal cohort: correct outputs, broken subjects reported, resume after SIGKILL, Dask, shards.

The truth comes from the phantom cohort's generator (aslcal.testing.bids): M0a at the
echo time (``m0a_te``), the phantom's CBF map, and for broken subjects the file and field
that were broken on purpose.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aslcal.cli import main
from aslcal.cohort import CohortOptions, CohortReport, FailureLog, run_cohort
from aslcal.cohort.state import shard
from aslcal.errors import InputError
from aslcal.io import load_image
from aslcal.io.bids import discover
from aslcal.io.derivatives import DerivativesWriter
from aslcal.io.atomic import _TEMP_MARKER
from aslcal.testing import make_phantom
from aslcal.testing.bids import GOOD_VARIANTS, make_bids_cohort

N_SUBJECTS = 20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    truth = make_bids_cohort(root, n_subjects=N_SUBJECTS, seed=11, broken=3)
    return truth


@pytest.fixture(scope="module")
def reference_run(cohort, tmp_path_factory):
    """An uninterrupted in-process run with reference masks (the other tests compare to it)."""
    out = tmp_path_factory.mktemp("out-ref")
    report = run_cohort(cohort.root, out, options=_options(cohort), workers=2, batch_size=4)
    return out, report


def _options(cohort) -> CohortOptions:
    return CohortOptions(ref_masks=str(cohort.root / "derivatives" / "refmasks"))


def _checksums(out: Path, *, logs: bool = False) -> dict[str, str]:
    root = out / "derivatives" / "aslcal"
    sums = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and (logs or "logs" not in path.relative_to(root).parts):
            sums[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if _TEMP_MARKER in p.name]


def _summary_rows(out: Path) -> dict[str, dict[str, str]]:
    lines = (out / "derivatives" / "aslcal" / "summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    rows = [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]
    return {_row_key(r): r for r in rows}


def _row_key(row) -> str:
    parts = [row["participant_id"]]
    if row["session"] != "n/a":
        parts.append(row["session"])
    if row["run"] != "n/a":
        parts.append(f"run-{row['run']}")
    return "_".join(parts)


def test_cohort_covers_every_variant(cohort):
    variants = {r.variant for r in cohort.good.values()}
    assert variants == set(GOOD_VARIANTS)
    assert len(cohort.broken) == 3 and len(cohort.runs) == N_SUBJECTS


def test_good_subjects_m0a_and_cbf_match_truth(cohort, reference_run):
    out, report = reference_run
    assert sorted(report.done) == sorted(cohort.good)
    rows = _summary_rows(out)
    for key, truth in cohort.good.items():
        row = rows[key]
        assert row["status"] == "ok"
        m0a = float(row["M0a"])
        # Acceptance: within 0.5 % of truth, noise-free (observed: < 1e-6).
        assert m0a == pytest.approx(truth.m0a_te, rel=5e-3), (key, truth.variant)
        assert m0a == pytest.approx(truth.m0a_te, rel=1e-5), (key, truth.variant)
        # reliability of a fitted reference region: noise-free, every M0t is exact
        if truth.variant in ("satrecov", "look_locker"):
            assert 0 <= float(row["ref_m0t_rel_se"]) < 1e-6, key
            assert 0 <= float(row["ref_noise_floor_lift"]) < 1e-6, key
        else:
            assert row["ref_m0t_rel_se"] == row["ref_noise_floor_lift"] == "n/a", key


def test_maps_sidecars_say_skullstripped_exactly_when_zero_outside_the_brain_mask(cohort, reference_run):
    """BIDS ImageDerivatives: every map's sidecar says SkullStripped: true for the fitted
    and calibrated maps (zero outside the brain mask written beside them), false for an
    M0 calibration image written as acquired."""
    import collections

    import nibabel

    out, _ = reference_run
    n_maps, counts = 0, collections.Counter()
    for key in cohort.good:
        perf = next((out / "derivatives" / "aslcal").rglob(f"{key}_desc-brain_mask.nii.gz")).parent
        brain = np.asarray(nibabel.load(perf / f"{key}_desc-brain_mask.nii.gz").dataobj) > 0
        for stem in ("desc-M0_M0map", "desc-T1_T1map", "desc-facorr_TB1map", "desc-cbf_cbf"):
            path = perf / f"{key}_{stem}.nii.gz"
            if not path.exists():
                continue
            n_maps += 1
            outside = np.asarray(nibabel.load(path).dataobj)[~brain]
            stripped = json.loads((perf / f"{key}_{stem}.json").read_text())["SkullStripped"]
            assert stripped is (not np.any(outside)), (key, stem)
            counts[stem, stripped] += 1
    assert n_maps >= 2 * len(cohort.good)
    # the calibrated and fitted maps are stripped, an M0 image as acquired is not
    assert counts["desc-cbf_cbf", True] == len(cohort.good) and counts["desc-T1_T1map", False] == 0
    assert counts["desc-M0_M0map", False] > 0


def test_calibration_mode_says_its_cbf_has_no_kinetic_model(cohort, reference_run, tmp_path, caplog):
    """The default --quantification calibration divides the raw control-label difference by
    M0a * alpha: no kinetic model, so the desc-cbf maps are not CBF (1.5-2.2 times below the
    white-paper value on real protocols).  The run's log and every desc-cbf sidecar say so;
    a white-paper run does not."""
    import logging

    out, _ = reference_run
    key = next(iter(cohort.good))
    sidecar = json.loads(next(out.rglob(f"{key}_desc-cbf_cbf.json")).read_text())
    assert sidecar["Quantification"] == "calibration" and "no kinetic model" in sidecar["Description"]
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        run_cohort(cohort.root, tmp_path / "o", options=_options(cohort), participant_label=[cohort.runs[key].subject])
    assert sum("without a kinetic model" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        run_cohort(cohort.root, tmp_path / "w", participant_label=[cohort.runs[key].subject],
                   options=CohortOptions(ref_masks=_options(cohort).ref_masks, quantification="whitepaper"))
    assert not any("without a kinetic model" in r.message for r in caplog.records)


def test_summary_tsv_from_memory_equals_one_read_back_from_disk(cohort, reference_run, tmp_path):
    """The runner builds summary.tsv from the summaries it just wrote; reading every
    subject's summary JSON back from disk (what a later shard or resume does) gives the
    same bytes."""
    from aslcal.cohort import rebuild_summary
    from aslcal.io.derivatives import DerivativesWriter

    out, report = reference_run
    assert sorted(report.done) == sorted(cohort.good)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tsv = copy / "derivatives" / "aslcal" / "summary.tsv"
    tsv.unlink()
    rebuild_summary(DerivativesWriter(copy), list(cohort.runs))
    assert tsv.read_bytes() == (out / "derivatives" / "aslcal" / "summary.tsv").read_bytes()
    assert len(tsv.read_text().splitlines()) == 1 + N_SUBJECTS  # header, every subject (ok or failed)


@pytest.mark.parametrize("variant", ["separate", "satrecov", "look_locker"])
def test_cbf_and_t1_maps_match_the_phantom(cohort, reference_run, variant):
    out, _ = reference_run
    key, truth = next((k, t) for k, t in cohort.good.items() if t.variant == variant)
    ph = make_phantom(shape=truth.shape, voxel_size=truth.voxel_size, seed=truth.phantom_seed,
                      field_strength=truth.field_strength, m0a=truth.m0a,
                      struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
    perf = out / "derivatives" / "aslcal" / f"sub-{truth.subject}" / (
        f"ses-{truth.session}" if truth.session else "") / "perf"
    cbf = load_image(perf / f"{key}_desc-cbf_cbf.nii.gz").data
    brain = load_image(perf / f"{key}_desc-brain_mask.nii.gz").data > 0
    # CBF = 6000 * dM / (M0a alpha) with dM = cbf * M0a_TE * alpha / 6000: the phantom's map.
    np.testing.assert_allclose(cbf[brain], ph.cbf[brain], rtol=1e-4, atol=1e-3)
    if variant != "separate":
        t1 = load_image(perf / f"{key}_desc-T1_T1map.nii.gz").data
        pure = brain & (ph.pv["gm"] > 0.999)
        assert pure.any()
        np.testing.assert_allclose(t1[pure], ph.tissues["gm"].t1, rtol=1e-3)
    if variant == "look_locker":
        g = load_image(perf / f"{key}_desc-facorr_TB1map.nii.gz").data
        pure = brain & (ph.pv["gm"] + ph.pv["wm"] > 0.999)
        np.testing.assert_allclose(g[pure], ph.fa_scale[pure], rtol=2e-3)


def test_broken_subjects_reported_with_file_and_field(cohort, reference_run):
    out, report = reference_run
    failed = {r["key"]: r for r in report.failed}
    assert sorted(failed) == sorted(cohort.broken)
    for key, truth in cohort.broken.items():
        rec = failed[key]
        assert rec["stage"] == "metadata"
        assert rec["details"]["file"] == str(cohort.root / truth.broken_file)
        assert rec["details"]["field"] == truth.broken_field
        assert truth.error_fragment in rec["message"]
    logged = {r.key: r for r in FailureLog(report.failure_log).load()}
    assert sorted(logged) == sorted(cohort.broken)
    rows = _summary_rows(out)
    assert {k for k, r in rows.items() if r["status"] == "failed"} == set(cohort.broken)
    assert report.exit_code == 1
    assert not _temp_files(out)


def test_voxelwise_mode_without_masks(cohort, tmp_path):
    """No reference masks: voxelwise M0; in pure GM, CBF = cbf_gm * M0a_TE / M0(x).

    Without the edge correction (its median filter changes the cortex by design), so that
    M0(x) = C(x) / pc exactly.
    """
    keys = [k for k, t in cohort.good.items() if t.variant == "separate"][:1]
    key = keys[0]
    truth = cohort.runs[key]
    report = run_cohort(cohort.root, tmp_path, participant_label=truth.subject,
                        options=CohortOptions(edge_correction=False))
    assert report.done == [key] and report.exit_code == 0
    perf = tmp_path / "derivatives" / "aslcal" / f"sub-{truth.subject}" / (
        f"ses-{truth.session}" if truth.session else "") / "perf"
    m0 = load_image(perf / f"{key}_desc-M0_M0map.nii.gz").data
    cbf = load_image(perf / f"{key}_desc-cbf_cbf.nii.gz").data
    ph = make_phantom(shape=truth.shape, voxel_size=truth.voxel_size, seed=truth.phantom_seed,
                      field_strength=truth.field_strength, m0a=truth.m0a,
                      struct_voxel_size=(3.4, 3.4, 3.4), struct_oversample=1)
    gm = ph.tissues["gm"]
    # Long-TR M0 (TR 6 s >= 5 s: no short-TR factor): M0(x) = C(x) / 0.9.
    expected_m0 = ph.m0_tissue["gm"] * (1 - math.exp(-6.0 / gm.t1)) * math.exp(-truth.te_ms / gm.t2) / 0.9
    pure = (ph.pv["gm"] > 0.999) & (m0 > 0)
    assert pure.sum() >= 5
    np.testing.assert_allclose(m0[pure], expected_m0, rtol=1e-4)
    np.testing.assert_allclose(cbf[pure], ph.cbf_gm * truth.m0a_te / expected_m0, rtol=1e-4)


def test_rerun_without_resume_is_refused_and_resume_skips(cohort, reference_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference_run[0], out)
    code = main(["cohort", str(cohort.root), str(out), "--ref-masks",
                 str(cohort.root / "derivatives" / "refmasks"), "--no-progress"])
    assert code == 2
    assert "already have outputs" in capsys.readouterr().err
    report = run_cohort(cohort.root, out, options=_options(cohort), resume=True)
    assert sorted(report.skipped) == sorted(cohort.good)
    assert report.done == [] and sorted(r["key"] for r in report.failed) == sorted(cohort.broken)
    assert _checksums(out) == _checksums(reference_run[0])


def _cli(cohort, out, *extra) -> list[str]:
    return [sys.executable, "-m", "aslcal", "cohort", str(cohort.root), str(out), "--ref-masks",
            str(cohort.root / "derivatives" / "refmasks"), "--no-progress", "--workers", "1",
            "--batch-size", "1", *extra]


def _markers(out: Path) -> int:
    return len(list((out / "derivatives").rglob("*_desc-aslcal_complete.json"))) if (out / "derivatives").exists() else 0


def _start_and_wait(cmd, out: Path, n_markers: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=handle, env=env)
    deadline = time.monotonic() + 120
    while _markers(out) < n_markers:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"run ended before {n_markers} subjects: {log.read_text()}")
        time.sleep(0.01)
    return proc


def test_sigkill_then_resume_gives_identical_outputs(cohort, reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = _start_and_wait(_cli(cohort, out), out, 3, tmp_path / "killed.log")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    n_killed = _markers(out)
    print(f"killed with {n_killed} of {len(cohort.good)} subjects complete")
    assert n_killed < len(cohort.good), "the run finished before the kill; the test proved nothing"
    done = subprocess.run(_cli(cohort, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr  # the broken subjects
    assert _checksums(out) == _checksums(reference_run[0])
    assert not _temp_files(out)
    # Failure records: the broken subjects once each, whatever the first run logged.
    assert sorted(r.key for r in FailureLog(out / "derivatives/aslcal/logs/failures.jsonl").load()) == sorted(cohort.broken)


def test_sigterm_finishes_the_batch_and_exits_130(cohort, tmp_path):
    good = sorted(t.subject for t in cohort.good.values())
    out = tmp_path / "term"
    cmd = _cli(cohort, out, "--participant-label", *good)
    proc = _start_and_wait(cmd, out, 1, tmp_path / "term.log")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = (tmp_path / "term.log").read_text()
    if proc.returncode == 0:
        pytest.skip("the run ended before SIGTERM arrived")
    assert proc.returncode == 130, text
    assert "--resume" in text
    # Every subject is complete or absent: nothing partial, no temporary file.
    from aslcal.io.derivatives import DerivativesWriter

    writer = DerivativesWriter(out)
    states = {k: writer.status(k) for k in cohort.good}
    assert set(states.values()) <= {"complete", "absent"} and "absent" in states.values()
    assert not _temp_files(out)
    rerun = subprocess.run(_cli(cohort, out, "--participant-label", *good, "--resume"),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert all(writer.is_complete(k) for k in cohort.good)


def test_shards_cover_every_subject_once(cohort, reference_run, tmp_path):
    out = tmp_path / "sharded"
    seen = []
    for spec in ("1/2", "2/2"):
        report = run_cohort(cohort.root, out, options=_options(cohort), shard_spec=spec, batch_size=3)
        seen += report.done + [r["key"] for r in report.failed]
        assert sorted(report.done + [r["key"] for r in report.failed]) == sorted(report.selected)
    assert sorted(seen) == sorted(cohort.runs)  # every subject exactly once
    assert len(seen) == len(set(seen))
    assert _checksums(out) == _checksums(reference_run[0])


def test_a_shard_that_read_the_state_early_cannot_write_its_table_last(cohort, tmp_path, monkeypatch):
    """Shard 1 reads every subject's state for summary.tsv; shard 2 then completes its
    subjects and rebuilds the table; shard 1 writes.  Without the summary lock shard 1's
    older table (its own rows only) was the last word; with it, shard 2's rebuild waits,
    reads everything and writes last.  (Subjects without a fit: the two in-process runs
    share no numba launch.)"""
    import threading

    import aslcal.cohort.runner as runner_module

    labels = sorted({t.subject for t in cohort.good.values() if t.variant in ("separate", "estimate")})
    out = tmp_path / "race"
    original = runner_module.write_summary_tsv
    other: dict = {}

    def write_after_the_other_shard(rows, path):
        if not other:  # shard 1, between reading the state and writing the table
            worker = threading.Thread(target=lambda: other.setdefault("report", run_cohort(
                cohort.root, out, options=_options(cohort), shard_spec="2/2", participant_label=labels)))
            other["thread"] = worker
            worker.start()
            worker.join(timeout=4.0)  # it ends (no lock), or waits at the lock (then this times out)
        return original(rows, path)

    monkeypatch.setattr(runner_module, "write_summary_tsv", write_after_the_other_shard)
    first = run_cohort(cohort.root, out, options=_options(cohort), shard_spec="1/2", participant_label=labels)
    other["thread"].join(timeout=60)
    second = other["report"]
    assert first.done and second.done and not set(first.done) & set(second.done)
    rows = (out / "derivatives" / "aslcal" / "summary.tsv").read_text().splitlines()[1:]
    assert len(rows) == len(first.done) + len(second.done)


def test_dask_local_two_workers_identical(cohort, reference_run, tmp_path):
    pytest.importorskip("dask.distributed")
    out = tmp_path / "dask"
    report = run_cohort(cohort.root, out, options=_options(cohort), dask="local", workers=2, batch_size=4)
    assert "LocalCluster (2 workers)" in report.executor
    assert sorted(report.done) == sorted(cohort.good)
    assert sorted(r["key"] for r in report.failed) == sorted(cohort.broken)
    assert _checksums(out) == _checksums(reference_run[0])
    logged = FailureLog(report.failure_log).load()
    assert sorted(r.key for r in logged) == sorted(cohort.broken)
    assert all(json.dumps(r.to_json()) for r in logged)


def test_automatic_reference_masks_from_anat(tmp_path):
    """--anat: segmentation of each subject's brain-extracted T1w, lateral ventricles,
    resampled through the ASL->T1w FLIRT matrix; M0a against the phantom's truth."""
    from aslcal.testing.bids import ANAT_DIR

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=5, seed=4, shape=(64, 64, 24), broken=0,
                             anat=True, ref_masks=False,
                             phantom_options={"struct_voxel_size": (1.7, 1.7, 1.7), "struct_oversample": 1})
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(anat=str(truth.root / ANAT_DIR)))
    assert report.exit_code == 0 and sorted(report.done) == sorted(truth.runs)
    rows = _summary_rows(tmp_path / "out")
    for key, t in truth.runs.items():
        assert rows[key]["m0_mode"] == ("estimate" if t.variant == "estimate" else "refregion")
        # Automatic masks are not the phantom's own: 1 % (observed: < 1e-6 on this cohort).
        assert float(rows[key]["M0a"]) == pytest.approx(t.m0a_te, rel=1e-2), (key, t.variant)
        if t.variant in ("satrecov", "look_locker"):
            # T1 per tissue of the segmentation (pv >= 0.9 in ASL space): the phantom's T1s
            # (its field strength's table), to 3 % (the 10 % of other tissue mixes in)
            tissues = make_phantom(shape=t.shape, voxel_size=t.voxel_size, seed=t.phantom_seed,
                                   field_strength=t.field_strength).tissues
            for tissue in ("gm", "wm", "csf"):
                assert int(rows[key][f"n_{tissue}_voxels"]) > 50, (key, tissue)
                assert float(rows[key][f"T1_mean_{tissue}"]) == pytest.approx(tissues[tissue].t1, rel=0.03), (key, tissue)
        else:
            assert rows[key]["T1_mean_gm"] == "n/a"  # no T1 map
        if t.variant != "estimate":
            prov = json.loads(next((tmp_path / "out").rglob(f"{key}_desc-aslcal_provenance.json")).read_text())
            assert prov["reference_mask"]["source"] == "automatic"
            assert prov["reference_mask"]["transform"] == "FLIRT ASL->T1w"
            # no timings (resumed runs are byte-identical); the transform is an input
            assert "elapsed_s" not in json.dumps(prov)
            assert any(p.endswith("_from-asl_to-T1w_mode-image_xfm.mat") for p in prov["inputs"]["files"])
            ref_json = next((tmp_path / "out").rglob(f"{key}_desc-ref_mask.json"))
            ref_sidecar = json.loads(ref_json.read_text())
            assert "lateral ventricles" in ref_sidecar["Description"]
            assert [u.rsplit("_", 1)[-1] for u in ref_sidecar["Sources"]] == ["T1w.nii.gz", "xfm.mat"]


def test_anat_transform_as_itk_text_or_ants_binary_gives_the_flirt_result(tmp_path):
    """--anat takes the ASL->T1w transform as fMRIPrep's ITK text affine (..._xfm.txt) or
    ANTs' binary ..._xfm.mat too (an ITK .txt was ignored, the images then taken as aligned;
    a binary .mat was refused): the same reference masks and M0a as the FLIRT matrices."""
    from scipy.io import savemat

    from aslcal.geometry import flirt_to_world
    from aslcal.io import load_image, read_flirt_matrix
    from aslcal.testing.bids import ANAT_DIR

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=4, shape=(64, 64, 24), broken=0,
                             anat=True, ref_masks=False,
                             phantom_options={"struct_voxel_size": (1.7, 1.7, 1.7), "struct_oversample": 1})
    anat = truth.root / ANAT_DIR
    variants = {"txt": tmp_path / "anat_txt", "bin": tmp_path / "anat_bin"}
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    for kind, folder in variants.items():
        shutil.copytree(anat, folder)
        for mat in folder.rglob("*_from-asl_to-T1w_mode-image_xfm.mat"):
            prefix = mat.name.removesuffix("_from-asl_to-T1w_mode-image_xfm.mat")
            asl = load_image(next(truth.root.rglob(f"{prefix}*_asl.nii*")))
            t1w = load_image(next(mat.parent.glob("*_desc-brain_T1w.nii*")))
            world = flirt_to_world(read_flirt_matrix(mat), asl.affine, asl.shape[:3], t1w.affine, t1w.shape[:3],
                                   src_zooms=asl.voxel_size, ref_zooms=t1w.voxel_size)
            lps = flip @ np.linalg.inv(world) @ flip  # ITK: fixed (T1w) points -> moving (ASL), LPS
            params = list(lps[:3, :3].ravel()) + list(lps[:3, 3])
            mat.unlink()
            if kind == "txt":
                mat.with_suffix(".txt").write_text(
                    "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                    f"Parameters: {' '.join(repr(float(v)) for v in params)}\nFixedParameters: 0 0 0\n")
            else:
                savemat(str(mat), {"AffineTransform_double_3_3": np.array(params)[:, None],
                                   "fixed": np.zeros((3, 1))}, format="4")
    results = {}
    for kind, folder in {"flirt": anat, **variants}.items():
        report = run_cohort(truth.root, tmp_path / f"out_{kind}", options=CohortOptions(anat=str(folder)))
        assert report.exit_code == 0 and sorted(report.done) == sorted(truth.runs), kind
        results[kind] = _summary_rows(tmp_path / f"out_{kind}")
    fitted = [k for k, t in truth.runs.items() if t.variant != "estimate"]
    assert fitted
    for key in fitted:
        masks = {kind: np.asarray(load_image(next((tmp_path / f"out_{kind}").rglob(f"{key}_desc-ref_mask.nii.gz"))).data)
                 for kind in results}
        for kind in variants:
            assert float(results[kind][key]["M0a"]) == pytest.approx(float(results["flirt"][key]["M0a"]), rel=1e-9)
            np.testing.assert_array_equal(masks[kind], masks["flirt"], err_msg=f"{key} {kind}")
            prov = json.loads(next((tmp_path / f"out_{kind}").rglob(f"{key}_desc-aslcal_provenance.json")).read_text())
            assert prov["reference_mask"]["transform"] == "ITK/ANTs affine from-asl_to-T1w", kind
            # the mask's sidecar names the T1w and the transform it was made from
            ref_json = next((tmp_path / f"out_{kind}").rglob(f"{key}_desc-ref_mask.json"))
            suffix = "xfm.txt" if kind == "txt" else "xfm.mat"
            assert [u.rsplit("_", 1)[-1] for u in json.loads(ref_json.read_text())["Sources"]] == ["T1w.nii.gz", suffix]
        assert float(results["flirt"][key]["M0a"]) == pytest.approx(truth.runs[key].m0a_te, rel=1e-2)
    # a .txt added beside a .mat: on resume that subject is redone and fails on its own
    # (which transform is meant is unknown), the run goes on
    key = fitted[0]
    mat = next(anat.rglob(f"sub-{truth.runs[key].subject}*_from-asl_to-T1w_mode-image_xfm.mat"))
    shutil.copy(next(variants["txt"].rglob(mat.with_suffix(".txt").name)), mat.with_suffix(".txt"))
    again = run_cohort(truth.root, tmp_path / "out_flirt", options=CohortOptions(anat=str(anat)), resume=True)
    failed = {f["key"]: f["message"] for f in again.failed}
    assert again.exit_code == 1 and list(failed) == [key] and "two ASL->T1w transforms" in failed[key]


def test_cli_refuses_two_mask_sources_and_bad_shard(cohort, tmp_path, capsys):
    masks = str(cohort.root / "derivatives" / "refmasks")
    code = main(["cohort", str(cohort.root), str(tmp_path / "o"), "--ref-masks", masks, "--anat", masks])
    assert code == 2 and "not both" in capsys.readouterr().err
    code = main(["cohort", str(cohort.root), str(tmp_path / "o"), "--shard", "3/2"])
    assert code == 2 and "--shard" in capsys.readouterr().err
    assert not (tmp_path / "o" / "derivatives" / "aslcal" / "summary.tsv").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--bs-efficiency", "2"], "aslcal: error: --bs-efficiency 2.0: expected the efficiency of one pulse, in (0, 1]"),
    (["--pve-threshold", "1.5"], "aslcal: error: --pve-threshold 1.5: expected a number in (0, 1]"),
    (["--t1r", "-1"], "aslcal: error: --t1r -1.0: expected a positive number"),
    (["--voxel-t1t", "0"], "aslcal: error: --voxel-t1t 0.0: expected a positive number"),
    (["--taq", "-2"], "aslcal: error: --taq -2.0: expected a number of seconds >= 0"),
    (["--anat", "no such/folder"], "aslcal: error: --anat 'no such/folder': the anatomical folder does not exist"),
])
def test_cli_option_errors_name_the_option_typed(cohort, tmp_path, capsys, monkeypatch, args, expected):
    """A bad calibration option is reported as typed (it used to read bs_efficiency=2.0,
    the library's keyword), before any output exists."""
    monkeypatch.chdir(tmp_path)
    code = main(["cohort", str(cohort.root), str(tmp_path / "o"), *args])
    assert code == 2 and capsys.readouterr().err.strip() == expected
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("failed", "interrupted", "code"), [
    (False, False, 0), (True, False, 1), (False, True, 130), (True, True, 130),
])
def test_exit_code_says_interrupted_before_failed(failed, interrupted, code):
    """An interrupted run is unfinished whatever failed: 130 tells a wrapper to requeue it."""
    report = CohortReport(n_discovered=2, selected=["a", "b"], skipped=[], redo=[],
                       failed=[{"key": "a", "stage": "load", "message": "x"}] if failed else [],
                       interrupted=interrupted)
    assert report.exit_code == code


def test_resume_with_other_calibration_options_is_refused(cohort, reference_run, capsys):
    """--resume (or a shard) into a folder calibrated otherwise: exit 2 before any work,
    each difference named, nothing changed; the same options resume as usual."""
    out = reference_run[0]
    before = _checksums(out, logs=True)
    refs = str(cohort.root / "derivatives" / "refmasks")
    code = main(["cohort", str(cohort.root), str(out), "--resume", "--no-progress", "--ref-masks", refs,
                 "--tissref", "wm"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "tissref (--tissref): 'wm' now, 'csf' before" in err
    code = main(["cohort", str(cohort.root), str(out), "--resume", "--no-progress"])  # voxelwise M0 now
    err = capsys.readouterr().err
    assert code == 2 and "ref_masks (--ref-masks): None now" in err, err
    assert _checksums(out, logs=True) == before
    good = sorted(t.subject for t in cohort.good.values())
    code = main(["cohort", str(cohort.root), str(out), "--resume", "--no-progress", "--ref-masks", refs,
                 "--participant-label", *good, "--backend", "numpy"])
    assert code == 0, capsys.readouterr().err  # all complete: skipped, whatever the backend


def test_unavailable_backend_is_refused_before_any_work(cohort, tmp_path, capsys):
    from aslcal.backend import available_backends

    if available_backends()["cuda"][0]:
        pytest.skip("a CUDA GPU is present")
    out = tmp_path / "cuda"
    code = main(["cohort", str(cohort.root), str(out), "--no-progress", "--backend", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "backend 'cuda' is unavailable" in err, err
    assert not out.exists()


def test_unavailable_backend_from_the_environment_is_refused_too(cohort, tmp_path, capsys, monkeypatch):
    """ASLCAL_BACKEND=cuda is as explicit as --backend cuda: refused before any work
    (every fitted subject failed at its fit, and an output folder was left); --backend auto
    overrides it."""
    from aslcal.backend import available_backends

    if available_backends()["cuda"][0]:
        pytest.skip("a CUDA GPU is present")
    from aslcal import config

    monkeypatch.setenv("ASLCAL_BACKEND", "cuda")
    monkeypatch.setattr(config, "_ENV_DEFAULTS", None)  # read the environment afresh
    out = tmp_path / "env"
    code = main(["cohort", str(cohort.root), str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "backend 'cuda' is unavailable" in err, err
    assert not out.exists()
    good = sorted(t.subject for t in cohort.good.values())[:2]
    assert good
    code = main(["cohort", str(cohort.root), str(tmp_path / "auto"), "--no-progress", "--backend", "auto",
                 "--participant-label", *good])
    assert code == 0, capsys.readouterr().err


def test_quiet_cohort_prints_where_the_results_are(cohort, reference_run, capsys):
    refs = str(cohort.root / "derivatives" / "refmasks")
    good = sorted(t.subject for t in cohort.good.values())
    code = main(["cohort", str(cohort.root), str(reference_run[0]), "-q", "--resume", "--no-progress",
                 "--ref-masks", refs, "--participant-label", *good])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert cap.out.splitlines() == [f"aslcal: summary: {reference_run[0] / 'derivatives' / 'aslcal' / 'summary.tsv'}"]


def test_bad_file_names_do_not_stop_the_cohort(tmp_path):
    """A *_asl file with a non-BIDS name is skipped and reported (exit 1); a run with two
    images (.nii beside .nii.gz) fails alone at 'metadata' naming both; the others are done."""
    import nibabel

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=5, shape=(32, 32, 12), broken=0)
    keys = sorted(truth.runs)
    first = next(truth.root.rglob(f"{keys[0]}_asl.nii.gz"))
    shutil.copy(first, first.with_name(first.name.replace("_asl", "_task-rest_asl")))
    second = next(truth.root.rglob(f"{keys[1]}_asl.nii.gz"))
    nibabel.save(nibabel.load(str(second)), str(second.with_name(second.name.removesuffix(".gz"))))
    report = run_cohort(truth.root, tmp_path / "out")
    assert [Path(p).name for p, _ in report.rejected] == [first.name.replace("_asl", "_task-rest_asl")]
    assert [(r["key"], r["stage"]) for r in report.failed] == [(keys[1], "metadata")]
    assert "two images" in report.failed[0]["message"]
    assert sorted(report.done) == sorted(k for k in keys if k != keys[1])
    assert report.exit_code == 1
    # the finished run still says what it left out, in its logs
    rejected = tmp_path / "out" / "derivatives" / "aslcal" / "logs" / "rejected.tsv"
    lines = rejected.read_text().splitlines()
    bad = first.with_name(first.name.replace("_asl", "_task-rest_asl")).relative_to(truth.root).as_posix()
    assert lines[0] == "path\treason" and len(lines) == 2 and lines[1].startswith(bad + "\tentity 'task'")
    first.with_name(first.name.replace("_asl", "_task-rest_asl")).unlink()
    run_cohort(truth.root, tmp_path / "out", resume=True)
    assert not rejected.exists()  # nothing left out any more


def test_participant_label_keeps_the_other_rows_of_the_summary(tmp_path):
    """summary.tsv is the dataset's: a later run on one participant rewrites it with
    every subject's row, not only that participant's."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=6, shape=(32, 32, 12), broken=0)
    out = tmp_path / "out"
    subjects = sorted({t.subject for t in truth.runs.values()})
    first = run_cohort(truth.root, out, participant_label=subjects[:2])
    assert first.exit_code == 0
    assert len(_summary_rows(out)) == sum(t.subject in subjects[:2] for t in truth.runs.values())
    second = run_cohort(truth.root, out, participant_label=subjects[2], resume=True)
    assert second.exit_code == 0
    rows = _summary_rows(out)
    assert sorted(rows) == sorted(truth.runs) and {r["status"] for r in rows.values()} == {"ok"}


def test_dask_scheduler_gets_absolute_paths(tmp_path, monkeypatch):
    """Relative BIDS_ROOT/OUT_ROOT with an existing cluster whose workers run in another
    working directory: they are resolved before submission (the workers wrote elsewhere
    and the run died)."""
    distributed = pytest.importorskip("dask.distributed")
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=7, shape=(32, 32, 12), broken=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the workers' working directory
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        monkeypatch.chdir(tmp_path)
        report = run_cohort("bids", "out", dask=cluster.scheduler_address, batch_size=1)
    assert report.exit_code == 0 and sorted(report.done) == sorted(truth.runs)
    assert all(DerivativesWriter(tmp_path / "out").is_complete(k) for k in truth.runs)
    assert not any(elsewhere.iterdir())


def test_whitepaper_quantification_recovers_the_phantom_cbf(tmp_path):
    """--quantification whitepaper on a cohort whose ΔM follows the single-PLD model
    (PCASL and PASL with Q2TIPS, 2-D ASL readouts 40 ms a slice, 1.5 and 3 T): the CBF
    map is the phantom's, with reference-region, M0Estimate and fitted M0s alike; the
    calibration-only CBF of the same data is off by the kinetic factor."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=5, seed=1, broken=0, kinetics="whitepaper",
                             slicedt=0.04)
    assert {t.labeling_type for t in truth.runs.values()} == {"PCASL", "PASL"}
    refs = str(truth.root / "derivatives" / "refmasks")
    report = run_cohort(truth.root, tmp_path / "wp", options=CohortOptions(ref_masks=refs, quantification="whitepaper"))
    assert report.exit_code == 0 and sorted(report.done) == sorted(truth.runs)
    plain = run_cohort(truth.root, tmp_path / "cal", options=CohortOptions(ref_masks=refs))
    assert plain.exit_code == 0
    for key, t in truth.runs.items():
        ph = make_phantom(shape=t.shape, voxel_size=t.voxel_size, seed=t.phantom_seed,
                          field_strength=t.field_strength, m0a=t.m0a, struct_voxel_size=(3.4, 3.4, 3.4),
                          struct_oversample=1)
        rel = Path(f"sub-{t.subject}") / (f"ses-{t.session}" if t.session else "") / "perf"
        perf = tmp_path / "wp" / "derivatives" / "aslcal" / rel
        cbf = load_image(perf / f"{key}_desc-cbf_cbf.nii.gz").data
        brain = load_image(perf / f"{key}_desc-brain_mask.nii.gz").data > 0
        np.testing.assert_allclose(cbf[brain], ph.cbf[brain], rtol=1e-4, atol=1e-3, err_msg=key)
        sidecar = json.loads((perf / f"{key}_desc-cbf_cbf.json").read_text())
        assert sidecar["Quantification"] == "whitepaper", key
        cal = load_image(tmp_path / "cal" / "derivatives" / "aslcal" / rel / f"{key}_desc-cbf_cbf.nii.gz").data
        pure = brain & (ph.pv["gm"] > 0.999)
        assert np.all(np.abs(cal[pure] / ph.cbf[pure] - 1) > 0.05), key  # calibration only is not CBF here


def test_whitepaper_needs_its_timing_fields(tmp_path):
    """A PASL run without bolus cut-off fails alone at 'prepare', naming the field."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=5, seed=1, broken=0)  # PASL: BolusCutOffFlag false
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(quantification="whitepaper"))
    pasl = sorted(k for k, t in truth.runs.items() if t.labeling_type == "PASL")
    assert sorted(r["key"] for r in report.failed) == pasl
    assert all(r["details"]["field"] == "BolusCutOffFlag" and "TI1" in r["message"] for r in report.failed)
    assert sorted(report.done) == sorted(set(truth.runs) - set(pasl))


def test_whitepaper_refuses_a_zero_labelling_duration_naming_the_field(tmp_path):
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    key = sorted(truth.runs)[0]
    (js,) = truth.root.rglob(f"{key}_asl.json")
    meta = json.loads(js.read_text())
    assert meta["ArterialSpinLabelingType"] == "PCASL"
    js.write_text(json.dumps({**meta, "LabelingDuration": 0}))
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(quantification="whitepaper"))
    (failure,) = report.failed
    assert failure["key"] == key and failure["details"]["field"] == "LabelingDuration"
    assert failure["details"]["file"] == str(js)


def test_whitepaper_refuses_timings_outside_the_repetition_time_naming_the_field(tmp_path):
    """A PLD of 5 s in volumes repeated every ~4 s was taken as it stood (CBF x10.7 in an
    audit), and a PASL bolus cut off after the inversion time failed without naming a file:
    both are now the subject's own error on the field that is wrong."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=1, broken=0, kinetics="whitepaper")
    pcasl = next(k for k, t in truth.runs.items() if t.labeling_type == "PCASL")
    pasl = next(k for k, t in truth.runs.items() if t.labeling_type == "PASL")
    (js_c,) = truth.root.rglob(f"{pcasl}_asl.json")
    (js_p,) = truth.root.rglob(f"{pasl}_asl.json")
    meta_c, meta_p = json.loads(js_c.read_text()), json.loads(js_p.read_text())
    tr = meta_c["RepetitionTimePreparation"]
    tr = min(tr) if isinstance(tr, list) else tr
    js_c.write_text(json.dumps({**meta_c, "PostLabelingDelay": round(tr + 1.0, 3)}))
    ti = meta_p["PostLabelingDelay"]
    ti = ti[0] if isinstance(ti, list) else ti
    js_p.write_text(json.dumps({**meta_p, "BolusCutOffDelayTime": [round(ti + 0.5, 3)]}))
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(quantification="whitepaper"))
    failed = {r["key"]: r for r in report.failed}
    assert sorted(failed) == sorted([pcasl, pasl])
    assert failed[pcasl]["details"] == {**failed[pcasl]["details"], "field": "PostLabelingDelay", "file": str(js_c)}
    assert "repetition time" in failed[pcasl]["message"]
    assert failed[pasl]["details"] == {**failed[pasl]["details"], "field": "BolusCutOffDelayTime", "file": str(js_p)}
    assert sorted(report.done) == sorted(set(truth.runs) - {pcasl, pasl})


def test_a_subject_without_a_finite_cbf_fails_and_an_implausible_mean_is_flagged(tmp_path):
    """An M0Estimate of 1e-40 made every brain voxel's CBF overflow to inf, and a control
    volume of NaN made every one NaN: both subjects were "ok" with cbf_mean_brain null.
    Control and label swapped in the aslcontext gave a negative whole-brain mean without
    a word.  Now the first two fail at 'calibrate' and the third is written with a
    warning that says what to check."""
    import nibabel

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=1, broken=0)
    est = next(k for k, t in truth.runs.items() if t.variant == "estimate")
    inc = next(k for k, t in truth.runs.items() if t.variant == "included")
    sep = next(k for k, t in truth.runs.items() if t.variant == "separate")
    (js,) = truth.root.rglob(f"{est}_asl.json")
    js.write_text(json.dumps({**json.loads(js.read_text()), "M0Estimate": 1e-40}))
    (asl,) = truth.root.rglob(f"{inc}_asl.nii.gz")
    (ctx,) = truth.root.rglob(f"{inc}_aslcontext.tsv")
    first_control = ctx.read_text().splitlines()[1:].index("control")
    img = nibabel.load(asl)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[..., first_control] = np.nan
    nibabel.save(nibabel.Nifti1Image(data, img.affine, img.header), asl)
    (tsv,) = truth.root.rglob(f"{sep}_aslcontext.tsv")
    swap = {"control": "label", "label": "control"}
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join([lines[0]] + [swap.get(v, v) for v in lines[1:]]) + "\n")
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(ref_masks=str(truth.root / "derivatives" / "refmasks")))
    failed = {r["key"]: r for r in report.failed}
    assert sorted(failed) == sorted([est, inc]) and all(r["stage"] == "calibrate" for r in failed.values())
    assert "beyond float32" in failed[est]["message"]  # the factor 6000/(M0a alpha) itself overflows
    assert "no brain voxel has a finite CBF" in failed[inc]["message"]
    assert report.done == [sep]
    summary = json.loads(DerivativesWriter(tmp_path / "out").subject_paths(sep)["summary"].read_text())
    assert summary["cbf_mean_brain"] < 0
    prov = json.loads(DerivativesWriter(tmp_path / "out").subject_paths(sep)["provenance"].read_text())
    assert any("control and label swapped" in w for w in json.dumps(prov).split('"') if "mean brain CBF" in w)


def test_a_partial_volume_reference_mask_is_read_as_aslcal_calib_reads_it(tmp_path):
    """A given reference mask of fractions (0.3 inside): the cohort cut it at 0.5 without a
    word (an all-0.3 mask was "empty"), aslcal calib -m takes every voxel > 0 and warns.
    Now one mask is one set of voxels, with the same warning in the subject's provenance."""
    import nibabel

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=1, seed=1, broken=0)
    (key,) = truth.runs
    refs = truth.root / "derivatives" / "refmasks"
    (mask_file,) = refs.rglob(f"{key}_desc-ref_mask.nii*")
    img = nibabel.load(mask_file)
    binary = np.asarray(img.dataobj) > 0
    fractions = np.where(binary, 0.3, 0.0).astype(np.float32)
    fractions[np.argwhere(binary)[0][0], np.argwhere(binary)[0][1], np.argwhere(binary)[0][2]] = 1.0
    nibabel.save(nibabel.Nifti1Image(fractions, img.affine), mask_file)
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(ref_masks=str(refs)))
    assert report.done == [key]
    writer = DerivativesWriter(tmp_path / "out")
    assert json.loads(writer.subject_paths(key)["summary"].read_text())["n_ref_voxels"] == int(binary.sum())
    assert "not a 0/1 mask" in writer.subject_paths(key)["provenance"].read_text()


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_bad_max_memory_is_refused(cohort, tmp_path, capsys, value):
    assert main(["cohort", str(cohort.root), str(tmp_path / "o"), "--max-memory", value]) == 2
    assert "--max-memory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sidecars_name_their_sources_as_bids_uris(cohort, reference_run):
    out = reference_run[0] / "derivatives" / "aslcal"
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": cohort.root.resolve().as_uri()}
    key, t = next((k, t) for k, t in cohort.good.items() if t.variant == "separate")
    perf = Path(f"sub-{t.subject}") / (f"ses-{t.session}" if t.session else "") / "perf"
    for name in (f"{key}_desc-cbf_cbf.json", f"{key}_desc-M0_M0map.json", f"{key}_desc-brain_mask.json"):
        sources = json.loads((out / perf / name).read_text())["Sources"]
        assert sources == [f"bids:raw:{(perf / f'{key}_asl.nii.gz').as_posix()}",
                           f"bids:raw:{(perf / f'{key}_m0scan.nii.gz').as_posix()}"], name
        for uri in sources:
            assert (cohort.root / uri.removeprefix("bids:raw:")).is_file()
    ref = json.loads((out / perf / f"{key}_desc-ref_mask.json").read_text())["Sources"]
    assert ref == [f"bids:raw:{t.ref_mask}"] and (cohort.root / t.ref_mask).is_file()
    # every output is on the ASL image's grid: its SpatialReference (BIDS, native space)
    for name in (out / perf).glob(f"{key}_desc-*.json"):
        if name.name.endswith(("_summary.json", "_provenance.json", "_complete.json")):
            continue
        assert json.loads(name.read_text())["SpatialReference"] == f"bids:raw:{(perf / f'{key}_asl.nii.gz').as_posix()}"


def test_symlinked_inputs_are_named_as_in_the_dataset(tmp_path):
    """DataLad/git-annex datasets hold symbolic links into .git/annex/objects, and a
    subject folder may itself be a link: Sources and the provenance name the files by
    their dataset paths, not by the link targets."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    root = truth.root
    key1, key2 = sorted(truth.runs)
    (asl,) = root.rglob(f"{key1}_asl.nii.gz")
    store = root / ".git" / "annex" / "objects" / "Xy" / "SHA256E-s1--abc.nii.gz"
    store.parent.mkdir(parents=True)
    asl.rename(store)
    asl.symlink_to(os.path.relpath(store, asl.parent))
    sub2 = root / f"sub-{truth.runs[key2].subject}"
    shutil.move(sub2, tmp_path / "elsewhere")
    sub2.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    report = run_cohort(root, tmp_path / "out")
    assert report.exit_code == 0
    for key in (key1, key2):
        (cbf_json,) = (tmp_path / "out").rglob(f"{key}_desc-cbf_cbf.json")
        perf = Path(f"sub-{truth.runs[key].subject}") / "perf"
        assert json.loads(cbf_json.read_text())["Sources"][0] == f"bids:raw:{(perf / f'{key}_asl.nii.gz').as_posix()}"
        prov = json.loads(next((tmp_path / "out").rglob(f"{key}_desc-aslcal_provenance.json")).read_text())
        assert (perf / f"{key}_asl.nii.gz").as_posix() in prov["inputs"]["files"]
        assert not any("annex" in f or "elsewhere" in f for f in prov["inputs"]["files"])


def test_a_shard_with_other_options_is_refused_before_any_subject_exists(cohort, tmp_path):
    """Job-array shards start together: the first one's record stands even while the
    folder holds no subject yet (a second shard with other options used to replace it)."""
    from aslcal.cohort.state import check_run_options

    out = tmp_path / "shards"
    logs = DerivativesWriter(out).root / "logs"
    logs.mkdir()
    check_run_options(logs, _options(cohort))  # shard 1/2 got there first
    with pytest.raises(InputError, match="ref_masks .* None now"):
        run_cohort(cohort.root, out, shard_spec="2/2")  # voxelwise M0
    assert not any((out / "derivatives" / "aslcal").glob("sub-*"))


def test_abandoned_cohort_says_how_to_finish(cohort, tmp_path, capsys, monkeypatch):
    """A second signal (KeyboardInterrupt) abandons the run: exit 130 with the --resume hint."""
    import aslcal.cohort

    def abandoned(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aslcal.cohort, "run_cohort", abandoned)
    assert main(["cohort", str(cohort.root), str(tmp_path / "o"), "--no-progress"]) == 130
    assert "interrupted: rerun with --resume to finish" in capsys.readouterr().err


def test_relative_folders_are_resolved(tmp_path, monkeypatch):
    """--ref-masks given relative to the working directory: recorded absolute (the same
    bytes from any directory), and the masks' Sources are BIDS URIs inside the dataset,
    file:// URIs outside it."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    shutil.copytree(truth.root / "derivatives" / "refmasks", tmp_path / "outside")
    monkeypatch.chdir(tmp_path)
    for masks, name in (("bids/derivatives/refmasks", "in"), ("outside", "out")):
        report = run_cohort("bids", name, options=CohortOptions(ref_masks=masks))
        assert report.exit_code == 0
        for key, t in truth.runs.items():
            perf = Path(name) / "derivatives" / "aslcal" / f"sub-{t.subject}" / (
                f"ses-{t.session}" if t.session else "") / "perf"
            prov = json.loads((perf / f"{key}_desc-aslcal_provenance.json").read_text())
            assert prov["options"]["ref_masks"] == str((tmp_path / masks).resolve())
            (source,) = json.loads((perf / f"{key}_desc-ref_mask.json").read_text())["Sources"]
            rel = Path(t.ref_mask).relative_to("derivatives/refmasks")
            expected = (f"bids:raw:{t.ref_mask}" if name == "in" else (tmp_path / "outside" / rel).resolve().as_uri())
            assert source == expected, (name, key)


def test_unreliable_reference_fit_is_flagged_in_the_summary(tmp_path):
    """A noisy Look-Locker reference fit without priors is 'ok' but doubtful: its warning
    is in summary.tsv (not only on stderr and in the provenance)."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=6, seed=2, shape=(32, 32, 12), broken=0, snr=50)
    ll = [k for k, t in truth.runs.items() if t.variant == "look_locker"]
    assert ll
    report = run_cohort(truth.root, tmp_path / "out",
                        options=CohortOptions(ref_masks=str(truth.root / "derivatives" / "refmasks")),
                        participant_label=[truth.runs[k].subject for k in ll])
    assert report.exit_code == 0
    rows = _summary_rows(tmp_path / "out")
    for key in ll:
        assert float(rows[key]["ref_m0t_rel_se"]) > 0.10
        assert "reference-region fit unreliable" in rows[key]["warnings"] and "--priors" in rows[key]["warnings"]


def test_reference_series_near_the_noise_floor_is_flagged_with_priors(tmp_path):
    """With fabber's priors the standard errors stay small, but a Look-Locker CSF series at
    grey-matter SNR 10 sits in the magnitude noise floor: its lift flags the biased M0a
    (measured: lift 0.19, M0a +13 %), while the saturation-recovery subject's series
    (lift 0.06, M0a +0.4 %) passes."""
    from aslcal.calibration.satrecov import NOISE_FLOOR_LIMIT

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=6, seed=2, shape=(32, 32, 12), broken=0, snr=10)
    fitted = {k: t for k, t in truth.runs.items() if t.variant in ("look_locker", "satrecov")}
    assert {t.variant for t in fitted.values()} == {"look_locker", "satrecov"}
    report = run_cohort(truth.root, tmp_path / "out",
                        options=CohortOptions(ref_masks=str(truth.root / "derivatives" / "refmasks"), priors=True),
                        participant_label=[t.subject for t in fitted.values()])
    assert report.exit_code == 0
    rows = _summary_rows(tmp_path / "out")
    for key, t in fitted.items():
        row, bias = rows[key], float(rows[key]["M0a"]) / t.m0a_te - 1
        if t.variant == "look_locker":
            assert bias > 0.05 and float(row["ref_noise_floor_lift"]) > NOISE_FLOOR_LIMIT, key
            assert "noise floor" in row["warnings"], key
        else:
            assert abs(bias) < 0.02 and 0 < float(row["ref_noise_floor_lift"]) < NOISE_FLOOR_LIMIT, key
            assert row["warnings"] == "n/a", key


def test_a_run_that_fails_before_any_subject_leaves_no_options_record(cohort, tmp_path, monkeypatch):
    """E.g. an unreachable scheduler: the next run, with other options, is not refused."""
    from aslcal.cohort import runner

    def broken(*args, **kwargs):
        raise InputError("cannot connect")

    monkeypatch.setattr(runner, "run_subjects", broken)
    out = tmp_path / "o"
    with pytest.raises(InputError, match="cannot connect"):
        run_cohort(cohort.root, out, options=_options(cohort))
    assert not (out / "derivatives" / "aslcal" / "logs" / "run_options.json").exists()
    monkeypatch.undo()
    good = sorted(t.subject for t in cohort.good.values() if t.variant == "separate")[:1]
    assert run_cohort(cohort.root, out, participant_label=good).exit_code == 0  # voxelwise now: accepted


def test_a_repeated_signal_within_a_second_is_the_same_request(monkeypatch):
    """timeout(1) and schedulers signal the process and then its group: that is one stop,
    not an abandon; a signal a second later abandons."""
    from aslcal.cli import cohort as cli_cohort

    clock = [100.0]
    monkeypatch.setattr(cli_cohort.time, "monotonic", lambda: clock[0])
    sig = cli_cohort._Signals()
    sig._handle(signal.SIGINT, None)
    assert sig.stop.is_set()
    clock[0] += 0.2
    sig._handle(signal.SIGINT, None)  # the same request: no exception
    clock[0] += 1.0
    with pytest.raises(KeyboardInterrupt):
        sig._handle(signal.SIGTERM, None)


def test_labelling_efficiency_from_the_sidecar_scales_cbf(tmp_path):
    """CBF = 6000·ΔM/(M0a·α): a sidecar LabelingEfficiency of 0.7 instead of the PCASL
    default 0.85 multiplies CBF by 0.85/0.7 (same M0a), and the provenance says which α
    was used and where it came from."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    key = sorted(truth.runs)[0]
    run_cohort(truth.root, tmp_path / "default")
    (asl_json,) = truth.root.rglob(f"{key}_asl.json")
    meta = json.loads(asl_json.read_text())
    assert meta["ArterialSpinLabelingType"] == "PCASL" and "LabelingEfficiency" not in meta
    meta["LabelingEfficiency"] = 0.7
    asl_json.write_text(json.dumps(meta))
    run_cohort(truth.root, tmp_path / "given")

    def outputs(out):
        perf = next(out.rglob(f"{key}_desc-aslcal_provenance.json")).parent
        prov = json.loads((perf / f"{key}_desc-aslcal_provenance.json").read_text())
        return prov["calibration"]["cbf"], load_image(next(perf.glob(f"{key}_desc-cbf_cbf.nii*"))).data

    (p_default, cbf_default), (p_given, cbf_given) = outputs(tmp_path / "default"), outputs(tmp_path / "given")
    assert (p_default["alpha"], p_default["alpha_source"]) == (0.85, "ArterialSpinLabelingType default")
    assert (p_given["alpha"], p_given["alpha_source"]) == (0.7, "LabelingEfficiency")
    inside = cbf_default != 0
    assert inside.sum() > 100
    np.testing.assert_allclose(cbf_given[inside], cbf_default[inside] * (0.85 / 0.7), rtol=1e-6)


def test_a_writer_that_cannot_record_its_failure_stops_the_run(tmp_path, monkeypatch):
    """Disk full: a subject's outputs fail to write, and so does its failure record.  The
    run must stop with that OSError (the CLI's one-line exit 2), not finish as if the
    subject had never existed."""
    import errno

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DerivativesWriter, "write_subject", full)
    monkeypatch.setattr(FailureLog, "record", full)
    with pytest.raises(OSError, match="No space left"):
        run_cohort(truth.root, tmp_path / "out")


def test_resume_fails_alone_a_subject_whose_leftovers_cannot_be_removed(tmp_path, monkeypatch):
    """A partial subject with a file this run may not delete (another user's, an immutable
    one) stopped the whole --resume before any work (exit 2).  Now that subject fails at
    stage 'resume', naming the file, and the others are done."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=1, broken=0)
    opts = CohortOptions(ref_masks=str(truth.root / "derivatives" / "refmasks"))
    first = run_cohort(truth.root, tmp_path / "out", options=opts, participant_label=["01", "02"])
    assert sorted(first.done) == ["sub-01", "sub-02"]
    writer = DerivativesWriter(tmp_path / "out")
    writer.subject_paths("sub-01")["cbf"].unlink()  # sub-01 is now partial
    original = DerivativesWriter.remove_partial
    stuck = writer.subject_paths("sub-01")["m0"]

    def refuse(self, key):
        if key == "sub-01":
            raise PermissionError(1, "Operation not permitted", str(stuck))
        return original(self, key)

    monkeypatch.setattr(DerivativesWriter, "remove_partial", refuse)
    report = run_cohort(truth.root, tmp_path / "out", options=opts, resume=True)
    (failure,) = report.failed
    assert failure["key"] == "sub-01" and failure["stage"] == "resume" and str(stuck) in failure["message"]
    assert report.skipped == ["sub-02"] and report.done == ["sub-03"] and report.exit_code == 1
    logged = FailureLog(report.failure_log).load()
    assert [(r.key, r.stage) for r in logged] == [("sub-01", "resume")]
    rows = (tmp_path / "out" / "derivatives" / "aslcal" / "summary.tsv").read_text()
    assert "sub-01" in rows and "failed" in rows


def test_resume_redoes_subjects_whose_inputs_changed(tmp_path):
    """--resume skips complete subjects, unless an input changed since: an edited sidecar
    field of the same length (LabelingEfficiency 0.8 -> 0.5: CBF x 0.8/0.5), a sidecar
    added where inheritance applies it, an image replaced (even by one of the same size).
    Unchanged subjects stay byte-identical and are skipped."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=9, shape=(32, 32, 12), broken=0)
    keys = sorted(truth.runs)
    for key in keys[:2]:
        (js,) = truth.root.rglob(f"{key}_asl.json")
        meta = json.loads(js.read_text())
        meta["LabelingEfficiency"] = 0.8
        js.write_text(json.dumps(meta))
    out = tmp_path / "out"
    assert run_cohort(truth.root, out).exit_code == 0

    def cbf(key):
        return load_image(next(out.rglob(f"{key}_desc-cbf_cbf.nii*"))).data

    before = {k: cbf(k) for k in keys}
    untouched = {p: p.read_bytes() for p in out.rglob(f"{keys[2]}_*")}
    (js,) = truth.root.rglob(f"{keys[0]}_asl.json")
    js.write_text(js.read_text().replace('"LabelingEfficiency": 0.8', '"LabelingEfficiency": 0.5'))
    (aslcontext,) = truth.root.rglob(f"{keys[1]}_aslcontext.tsv")
    aslcontext.write_text(aslcontext.read_text() + "\n")  # same content, one byte more: a change
    report = run_cohort(truth.root, out, resume=True)
    assert report.exit_code == 0
    assert sorted(report.redo) == keys[:2] and report.skipped == [keys[2]]
    inside = before[keys[0]] != 0
    np.testing.assert_allclose(cbf(keys[0])[inside], before[keys[0]][inside] * (0.8 / 0.5), rtol=1e-6)
    np.testing.assert_array_equal(cbf(keys[1]), before[keys[1]])
    assert {p: p.read_bytes() for p in out.rglob(f"{keys[2]}_*")} == untouched
    # nothing changed since: everything skipped
    again = run_cohort(truth.root, out, resume=True)
    assert again.redo == [] and sorted(again.skipped) == keys

    # a sidecar added where BIDS inheritance applies it to one subject (alpha 0.4 there)
    subject_dir = truth.root / f"sub-{truth.runs[keys[2]].subject}"
    (subject_dir / f"sub-{truth.runs[keys[2]].subject}_asl.json").write_text('{"LabelingEfficiency": 0.4}')
    before2 = cbf(keys[2])
    third = run_cohort(truth.root, out, resume=True)
    assert third.redo == [keys[2]]
    inside = before2 != 0
    own = next(p for p in truth.root.rglob(f"{keys[2]}_asl.json") if p.parent.name == "perf")
    labelling = json.loads(own.read_text())["ArterialSpinLabelingType"]
    default_alpha = {"PCASL": 0.85, "CASL": 0.85, "PASL": 0.98}[labelling]  # white paper
    np.testing.assert_allclose(cbf(keys[2])[inside], before2[inside] * (default_alpha / 0.4), rtol=1e-6)

    # an image replaced by one of the same size (uncompressed: every same-grid .nii is)
    (asl,) = truth.root.rglob(f"{keys[1]}_asl.nii.gz")
    img = load_image(asl)
    from aslcal.io import save_image

    plain = asl.with_name(asl.name.removesuffix(".gz"))
    asl.unlink()
    save_image(plain, np.asarray(img.data, dtype=np.float32), img.affine)
    fourth = run_cohort(truth.root, out, resume=True)
    assert fourth.redo == [keys[1]]
    size = plain.stat().st_size
    save_image(plain, np.asarray(img.data, dtype=np.float32) * 2, img.affine, overwrite=True)
    assert plain.stat().st_size == size
    fifth = run_cohort(truth.root, out, resume=True)
    assert fifth.redo == [keys[1]]  # same size, other content
    assert run_cohort(truth.root, out, resume=True).redo == []  # and recorded as such


def test_an_output_folder_of_another_dataset_is_refused(tmp_path):
    """Sources are bids:raw:<path> against the folder's one raw dataset: resuming into it
    from another dataset is refused before any subject is touched."""
    first = make_bids_cohort(tmp_path / "a", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    other = make_bids_cohort(tmp_path / "b", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    out = tmp_path / "out"
    assert run_cohort(first.root, out).exit_code == 0
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(InputError, match="another dataset"):
        run_cohort(other.root, out, resume=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing


def test_failure_records_follow_the_latest_attempt(tmp_path):
    """A subject that failed, then is fixed and rerun (without --resume, by participant
    label) has no failure record left; a subject that failed in a shard and fails
    differently in a later unsharded --resume shows the new failure in summary.tsv."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=9, shape=(32, 32, 12), broken=0)
    keys = sorted(truth.runs)
    out = tmp_path / "out"
    logs = out / "derivatives" / "aslcal" / "logs"
    (js,) = truth.root.rglob(f"{keys[0]}_asl.json")
    good = js.read_text()
    meta = json.loads(good)
    js.write_text(json.dumps({**meta, "RepetitionTimePreparation": 0}))
    assert run_cohort(truth.root, out).exit_code == 1
    js.write_text(good)
    subject = truth.runs[keys[0]].subject
    assert run_cohort(truth.root, out, participant_label=subject).exit_code == 0
    assert all(r.key != keys[0] for p in logs.glob("failures*.jsonl") for r in FailureLog(p).load())
    assert _summary_rows(out)[keys[0]]["status"] == "ok"

    out2 = tmp_path / "out2"
    js.write_text(json.dumps({**meta, "RepetitionTimePreparation": 0}))
    owner = next(s for s in ("1/2", "2/2") if keys[0] in shard(keys, s))
    run_cohort(truth.root, out2, shard_spec=owner)
    js.write_text(json.dumps({**meta, "EchoTime": 11}))
    assert run_cohort(truth.root, out2, resume=True).exit_code == 1
    row = _summary_rows(out2)[keys[0]]
    assert row["status"] == "failed" and "EchoTime" in row["message"], row
    records = [r for p in (out2 / "derivatives" / "aslcal" / "logs").glob("failures*.jsonl")
               for r in FailureLog(p).load() if r.key == keys[0]]
    assert len(records) == 1 and "EchoTime" in records[0].message


def test_a_nan_voxel_does_not_hide_the_mean_cbf(tmp_path):
    """One NaN in the ASL data: the subject is ok, cbf_mean_brain is the mean over the
    other brain voxels (computed here from the CBF map), the count and a warning say so."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=1, seed=9, shape=(32, 32, 12), broken=0)
    (key,) = truth.runs
    (asl,) = truth.root.rglob(f"{key}_asl.nii.gz")
    img = load_image(asl)
    data = np.array(img.data, dtype=np.float32)
    brain_voxel = np.unravel_index(np.argmax(data[..., 0]), data.shape[:3])
    data[brain_voxel + (1,)] = np.nan
    from aslcal.io import save_image

    save_image(asl, data, img.affine, overwrite=True)
    assert run_cohort(truth.root, tmp_path / "out").exit_code == 0
    row = _summary_rows(tmp_path / "out")[key]
    cbf = load_image(next((tmp_path / "out").rglob(f"{key}_desc-cbf_cbf.nii*"))).data
    brain = load_image(next((tmp_path / "out").rglob(f"{key}_desc-brain_mask.nii*"))).data > 0
    assert brain[brain_voxel] and not np.isfinite(cbf[brain_voxel])
    vals = cbf[brain]
    assert float(row["cbf_mean_brain"]) == pytest.approx(float(np.mean(vals[np.isfinite(vals)], dtype=np.float64)), rel=1e-5)
    assert row["n_brain_nonfinite_cbf"] == "1" and "non-finite CBF" in row["warnings"]


def test_two_reference_masks_of_one_run_fail_that_subject(tmp_path):
    from aslcal.cohort.subject import ref_mask_path

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    masks = truth.root / "derivatives" / "refmasks"
    key = sorted(truth.runs)[0]
    (mask,) = masks.rglob(f"{key}_desc-ref_mask.nii*")
    assert mask.name.endswith(".nii.gz")
    shutil.copy(mask, mask.with_name(mask.name.removesuffix(".gz")))
    (run,) = [r for r in discover(truth.root) if r.key == key]
    with pytest.raises(InputError, match="two reference masks"):
        ref_mask_path(masks, run)
    report = run_cohort(truth.root, tmp_path / "out", options=CohortOptions(ref_masks=str(masks)))
    assert report.exit_code == 1 and [f["key"] for f in report.failed] == [key]


def test_m0_series_with_too_few_distinct_times_fail_with_the_field(tmp_path):
    """A saturation-recovery M0 with 2 distinct TRs (3 parameters: M0, T1, A) and a
    Look-Locker M0 with one InversionTime for all readouts fail up front, naming the
    m0scan sidecar and the field, instead of failing voxel by voxel."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=6, seed=2, shape=(24, 24, 8), broken=0, ref_masks=False)
    sr = next(k for k, t in truth.runs.items() if t.variant == "satrecov")
    ll = next(k for k, t in truth.runs.items() if t.variant == "look_locker")
    for key, field_name in ((sr, "RepetitionTimePreparation"), (ll, "InversionTime")):
        (js,) = truth.root.rglob(f"{key}_m0scan.json")
        meta = json.loads(js.read_text())
        values = meta[field_name]
        assert isinstance(values, list) and len(set(values)) >= 3
        meta[field_name] = [values[0] if i % 2 else values[1] for i in range(len(values))] if key == sr else values[0]
        js.write_text(json.dumps(meta))
    report = run_cohort(truth.root, tmp_path / "out")
    failed = {f["key"]: f for f in report.failed}
    assert sorted(failed) == sorted([sr, ll])
    for key, field_name in ((sr, "RepetitionTimePreparation"), (ll, "InversionTime")):
        assert failed[key]["details"]["field"] == field_name
        assert failed[key]["details"]["file"].endswith(f"{key}_m0scan.json")


def test_a_nan_in_the_m0_series_does_not_pull_the_t1_summary_to_zero(tmp_path):
    """A voxel whose Look-Locker data hold a NaN is not fitted (T1 written as 0): the T1
    summary is the median over the other brain voxels, from the written T1 map."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=6, seed=2, shape=(24, 24, 8), broken=0, ref_masks=False)
    key = next(k for k, t in truth.runs.items() if t.variant == "look_locker")
    (m0scan,) = truth.root.rglob(f"{key}_m0scan.nii*")
    img = load_image(m0scan)
    data = np.array(img.data, dtype=np.float32)
    voxel = np.unravel_index(np.argmax(data[..., -1]), data.shape[:3])
    data[voxel + (3,)] = np.nan
    from aslcal.io import save_image

    save_image(m0scan, data, img.affine, overwrite=True)
    assert run_cohort(truth.root, tmp_path / "out", participant_label=truth.runs[key].subject).exit_code == 0
    t1 = load_image(next((tmp_path / "out").rglob(f"{key}_desc-T1_*.nii*"))).data
    brain = load_image(next((tmp_path / "out").rglob(f"{key}_desc-brain_mask.nii*"))).data > 0
    assert brain[voxel] and t1[voxel] == 0
    others = brain.copy()
    others[voxel] = False
    assert float(_summary_rows(tmp_path / "out")[key]["T1_median_brain"]) == pytest.approx(float(np.median(t1[others])), rel=1e-6)


def test_linked_reference_masks_outside_the_dataset_are_named_by_their_links(tmp_path):
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=9, shape=(32, 32, 12), broken=0)
    masks = tmp_path / "masks"
    shutil.move(truth.root / "derivatives" / "refmasks", masks)
    key = sorted(truth.runs)[0]
    (mask,) = masks.rglob(f"{key}_desc-ref_mask.nii*")
    store = masks / ".git" / "annex" / "objects" / "k" / "mask.nii.gz"
    store.parent.mkdir(parents=True)
    mask.rename(store)
    mask.symlink_to(os.path.relpath(store, mask.parent))
    assert run_cohort(truth.root, tmp_path / "out", options=CohortOptions(ref_masks=str(masks))).exit_code == 0
    (sidecar,) = (tmp_path / "out").rglob(f"{key}_desc-ref_mask.json")
    assert json.loads(sidecar.read_text())["Sources"] == [mask.absolute().as_uri()]


def _one_subject_with_acq(tmp_path):
    """A one-subject cohort whose ASL files carry acq-pcasl and whose m0scan (without the
    entity) names the ASL image in IntendedFor: its M0 is found by IntendedFor."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=2, seed=1, broken=0, n_pairs=1, shape=(32, 32, 12))
    root = truth.root
    perf, masks = root / "sub-01" / "perf", root / "derivatives" / "refmasks" / "sub-01" / "perf"
    for suffix in ("asl.nii.gz", "asl.json", "aslcontext.tsv"):
        (perf / f"sub-01_{suffix}").rename(perf / f"sub-01_acq-pcasl_{suffix}")
    (masks / "sub-01_desc-ref_mask.nii.gz").rename(masks / "sub-01_acq-pcasl_desc-ref_mask.nii.gz")
    meta = json.loads((perf / "sub-01_m0scan.json").read_text())
    meta["IntendedFor"] = "bids::sub-01/perf/sub-01_acq-pcasl_asl.nii.gz"
    (perf / "sub-01_m0scan.json").write_text(json.dumps(meta))
    return root, perf, CohortOptions(ref_masks=str(root / "derivatives" / "refmasks"))


def test_resume_redoes_a_run_whose_m0scan_pairing_changed(tmp_path):
    """The M0 found by IntendedFor, then a second m0scan naming the same ASL image: a new
    run fails that subject (which one is meant is unknown), and so must a resume (it kept
    the old M0a, comparing only the files read then)."""
    root, perf, opts = _one_subject_with_acq(tmp_path)
    first = run_cohort(root, tmp_path / "out", options=opts, workers=1)
    assert sorted(first.done) == ["sub-01_acq-pcasl", "sub-02"]
    for ext in (".nii.gz", ".json"):
        shutil.copy(perf / f"sub-01_m0scan{ext}", perf / f"sub-01_acq-aa_m0scan{ext}")
    again = run_cohort(root, tmp_path / "out", options=opts, workers=1, resume=True)
    assert again.redo == ["sub-01_acq-pcasl"] and again.skipped == ["sub-02"]
    (failed,) = again.failed
    assert failed["key"] == "sub-01_acq-pcasl" and "IntendedFor" in failed["message"]


@pytest.mark.parametrize("name", ["aslcontext.tsv", "asl.json"])
def test_resume_with_two_files_applying_at_one_level_fails_that_subject_only(tmp_path, name):
    """A second file applying at one level (a subject-wide copy beside the run's own) made
    --resume raise out of run_cohort before any subject was considered; now that subject
    is redone and fails naming both files, and the others are resumed as usual."""
    root, perf, opts = _one_subject_with_acq(tmp_path)
    first = run_cohort(root, tmp_path / "out", options=opts, workers=1)
    assert first.exit_code == 0
    shutil.copy(perf / f"sub-01_acq-pcasl_{name}", perf / f"sub-01_{name}")
    again = run_cohort(root, tmp_path / "out", options=opts, workers=1, resume=True)
    assert again.redo == ["sub-01_acq-pcasl"] and again.skipped == ["sub-02"] and again.exit_code == 1
    (failed,) = again.failed
    assert f"sub-01_{name}" in failed["message"] and f"sub-01_acq-pcasl_{name}" in failed["message"]


def test_resume_removes_a_killed_run_s_run_level_temporary_files(cohort, reference_run, tmp_path):
    """A SIGKILL while summary.tsv/summary.json (or a log) was being replaced leaves its
    hidden temporary file in the derivative root: the next (unsharded) run removes it."""
    out = tmp_path / "out"
    shutil.copytree(reference_run[0], out)
    root = out / "derivatives" / "aslcal"
    stray = [root / ".summary.tmp-deadbeef.json", root / "logs" / ".failures.tmp-0badf00d.jsonl"]
    for path in stray:
        path.write_text("half")
    refs = str(cohort.root / "derivatives" / "refmasks")
    good = sorted(t.subject for t in cohort.good.values())
    report = run_cohort(cohort.root, out, options=CohortOptions(ref_masks=refs), resume=True, participant_label=good)
    assert not report.failed
    assert not any(p.exists() for p in stray)


def test_failure_messages_do_not_depend_on_how_the_root_was_named(tmp_path, monkeypatch):
    """The BIDS root given relative or absolute (or run by Dask workers, which get it
    absolute): the same failure messages, so summary.tsv and the failure log are the
    same bytes (a relative root made them differ from a --dask run's)."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=4, broken=2, shape=(12, 12, 8), ref_masks=False)
    monkeypatch.chdir(tmp_path)
    run_cohort(Path("bids"), Path("rel"), workers=1)
    run_cohort(truth.root, tmp_path / "abs", workers=1)
    for name in ("summary.tsv", "logs/failures.jsonl"):
        rel = (tmp_path / "rel" / "derivatives" / "aslcal" / name).read_bytes()
        assert rel == (tmp_path / "abs" / "derivatives" / "aslcal" / name).read_bytes(), name
        assert str(truth.root).encode() in rel


def test_resume_with_anat_keeps_a_complete_estimate_subject(tmp_path):
    """--resume --anat with nothing changed redoes nothing: an M0Estimate run reads no
    anatomy, so the T1w the lookup finds for it is no new input (it was redone every time)."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=1, broken=0, anat=True, shape=(16, 16, 8), ref_masks=False)
    (key,) = [k for k, t in truth.runs.items() if t.variant == "estimate"]
    label = truth.runs[key].subject
    opts = CohortOptions(anat=str(truth.root / "derivatives" / "anat"))
    first = run_cohort(truth.root, tmp_path / "out", options=opts, participant_label=[label], workers=1)
    assert first.done == [key]
    again = run_cohort(truth.root, tmp_path / "out", options=opts, participant_label=[label], workers=1, resume=True)
    assert again.skipped == [key] and not again.redo and not again.done
