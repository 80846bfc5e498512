"""Cohort bookkeeping: shards, failure log, resume plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from aslcal.cohort import CohortOptions, FailureLog, FailureRecord, RunPlan, parse_shard, plan_run, shard
from aslcal.cohort.state import RUN_OPTIONS_FILE, check_run_options
from aslcal.errors import InputError
from aslcal.io.derivatives import DerivativesWriter


def _keys(rng, n):
    keys = {f"sub-{rng.integers(0, 10**6):06d}" for _ in range(n)}
    keys |= {f"sub-{i:02d}_ses-{j}_run-{r}" for i in range(n // 10) for j in (1, 2) for r in (1, 2)}
    return sorted(keys)


@pytest.mark.parametrize("method", ["hash", "index"])
def test_shards_partition_every_key_once(method):
    rng = np.random.default_rng(1)
    for n_keys in (0, 1, 2, 3, 17, 100, 1000):
        keys = _keys(rng, n_keys)
        for n in (1, 2, 3, 7):
            parts = [shard(keys, f"{i}/{n}", method=method) for i in range(1, n + 1)]
            flat = [k for p in parts for k in p]
            assert sorted(flat) == sorted(set(keys))
            assert len(flat) == len(set(flat))
            assert all(p == sorted(p) for p in parts)
            if method == "index":
                assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_ignores_order_and_duplicates():
    keys = [f"sub-{i:03d}" for i in range(50)]
    shuffled = list(np.random.default_rng(0).permutation(keys)) + keys[:5]
    for spec in ("1/2", "2/2", "3/4"):
        assert shard(keys, spec) == shard([str(k) for k in shuffled], spec)


def test_hash_shard_depends_on_key_alone():
    keys = [f"sub-{i:03d}" for i in range(200)]
    full = shard(keys, "1/3")
    subset = shard(keys[::2], "1/3")
    assert subset == [k for k in full if k in set(keys[::2])]
    sizes = [len(shard(keys, f"{i}/3")) for i in (1, 2, 3)]
    assert min(sizes) > 40  # roughly balanced (expected 66.7 each)


def test_shard_stable_across_processes():
    keys = [f"sub-{i:03d}_ses-{i % 3}" for i in range(300)]
    code = (
        "import json, sys; from aslcal.cohort import shard; keys = json.loads(sys.stdin.read()); "
        "print(json.dumps([shard(keys, '1/2'), shard(keys, '2/4', method='index')]))"
    )
    results = []
    for seed in ("0", "12345"):  # different string-hash salts
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps(keys), env=env,
                             capture_output=True, text=True, check=True, timeout=60)
        results.append(json.loads(out.stdout))
    here = [shard(keys, "1/2"), shard(keys, "2/4", method="index")]
    assert results[0] == results[1] == here


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1/0", "1", "a/b", "-1/2", "1/2/3", "", " /2", 2, None])
def test_bad_shard_specs(spec):
    with pytest.raises(InputError, match="shard"):
        shard(["sub-01"], spec)


def test_parse_shard_and_bad_method():
    assert parse_shard("2/5") == (2, 5)
    assert parse_shard(" 1 / 1 ") == (1, 1)
    with pytest.raises(InputError, match="method"):
        shard(["sub-01"], "1/2", method="random")
    with pytest.raises(InputError, match="one string"):
        shard("sub-01", "1/1")


# --------------------------------------------------------------------- failure log


def test_failure_log_round_trip(tmp_path):
    log = FailureLog(tmp_path / "failures.jsonl")
    assert log.load() == []
    log.record("sub-02", "read", "sub-02_asl.json: RepetitionTimePreparation is 0")
    log.record("sub-01", "fit", "no voxels in the reference mask", voxels=0, file=tmp_path / "x")
    log.record("sub-02", "read", "again")
    records = FailureLog(tmp_path / "failures.jsonl").load()
    assert records[0] == FailureRecord("sub-02", "read", "sub-02_asl.json: RepetitionTimePreparation is 0")
    assert records[1].key == "sub-01" and records[1].details == {"voxels": 0, "file": str(tmp_path / "x")}
    assert [r.message for r in records] == [
        "sub-02_asl.json: RepetitionTimePreparation is 0", "no voxels in the reference mask", "again"]
    assert log.failed_keys() == ["sub-01", "sub-02"]
    assert log.discard(["sub-02"]) == 2
    assert [r.key for r in log.load()] == ["sub-01"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_log_torn_line(tmp_path):
    path = tmp_path / "f.jsonl"
    log = FailureLog(path)
    log.record("sub-01", "fit", "a")
    with open(path, "ab") as handle:
        handle.write(b'{"key": "sub-02", "sta')  # writer killed mid-line
    assert [r.key for r in log.load()] == ["sub-01"]
    log.record("sub-03", "write", "b")
    assert [r.key for r in log.load()] == ["sub-01", "sub-03"]


def test_failure_log_bad_input(tmp_path):
    log = FailureLog(tmp_path / "f.jsonl")
    with pytest.raises(InputError, match="stage"):
        log.record("sub-01", "", "m")
    with pytest.raises(InputError, match="folder"):
        FailureLog(tmp_path / "missing" / "f.jsonl").record("sub-01", "fit", "m")
    (tmp_path / "g.jsonl").write_text('{"key": "sub-01"}\n')
    with pytest.raises(InputError, match="line 1"):
        FailureLog(tmp_path / "g.jsonl").load()
    assert FailureLog.for_shard(tmp_path).path == tmp_path / "failures.jsonl"
    assert FailureLog.for_shard(tmp_path, "2/4").path == tmp_path / "failures_shard-2-of-4.jsonl"


# --------------------------------------------------------------------- plans


def _write(writer, key):
    image = (np.ones((2, 2, 2)), np.eye(4))
    writer.write_subject(key, {"m0": image, "brain_mask": image}, provenance={"k": key})


def test_plan_run(tmp_path):
    writer = DerivativesWriter(tmp_path)
    _write(writer, "sub-01")
    _write(writer, "sub-02_ses-1")
    _write(writer, "sub-03")
    writer.marker_path("sub-02_ses-1").unlink()  # partial: outputs, no marker
    (writer.subject_dir("sub-03") / ".sub-03_desc-cbf_cbf.tmp-00aa11bb.nii.gz").write_bytes(b"")
    keys = ["sub-04", "sub-03", {"sub": "02", "ses": "1"}, "sub-01"]

    with pytest.raises(InputError, match="already have outputs.*sub-03, sub-02_ses-1, sub-01"):
        plan_run(keys, writer, resume=False)

    plan = plan_run(keys, writer, resume=True)
    assert isinstance(plan, RunPlan)
    assert plan.todo == ["sub-04", "sub-03", "sub-02_ses-1"]
    assert plan.skipped == ["sub-01"]
    assert plan.redo == ["sub-03", "sub-02_ses-1"]
    assert plan.removed and writer.subject_files("sub-03") == [] == writer.subject_files("sub-02_ses-1")
    assert writer.is_complete("sub-01")

    again = plan_run(keys, writer, resume=True)  # nothing left to clean
    assert again.todo == plan.todo and again.redo == [] and again.removed == []

    overwriting = DerivativesWriter(tmp_path, overwrite=True)
    full = plan_run(keys, overwriting, resume=False)
    assert full.todo == ["sub-04", "sub-03", "sub-02_ses-1", "sub-01"] and full.skipped == []
    assert writer.is_complete("sub-01")  # planning without resume deletes nothing


def test_plan_run_bad_keys(tmp_path):
    writer = DerivativesWriter(tmp_path)
    with pytest.raises(InputError, match="twice"):
        plan_run(["sub-01", {"sub": "01"}], writer, resume=True)
    with pytest.raises(InputError):
        plan_run(["01"], writer, resume=True)


def test_run_options_record_refuses_other_calibrations(tmp_path):
    """The first run records its calibration options; a later run (resume, another shard)
    with other options is refused with each difference named, the execution options
    (backend, dtype) may change, and a record of a run that wrote no subject is replaced."""
    masks = tmp_path / "masks"
    masks.mkdir()
    first = CohortOptions(ref_masks=str(masks), tissref="csf")
    path = check_run_options(tmp_path, first)
    saved = json.loads(path.read_text())
    assert path.name == RUN_OPTIONS_FILE and saved["tissref"] == "csf" and saved["m0_mode"] == "refregion"
    assert saved["ref_masks"] == str(masks.resolve()) and "backend" not in saved and "dtype" not in saved
    # the same calibration, by another path spelling and on another backend: accepted
    check_run_options(tmp_path, CohortOptions(ref_masks=str(tmp_path / "." / "masks"), backend="numpy",
                                              dtype="float32"))
    with pytest.raises(InputError) as err:
        check_run_options(tmp_path, CohortOptions(tissref="wm", pc=0.82))
    msg = str(err.value)
    assert "tissref (--tissref): 'wm' now, 'csf' before" in msg
    assert "pc (--pc): 0.82 now, None before" in msg
    assert "ref_masks (--ref-masks): None now" in msg and "m0_mode" in msg
    assert json.loads(path.read_text()) == saved  # the record is untouched
    assert "delete that file" in msg
    # a record written before an option existed: the option was at its default then
    older = {k: v for k, v in saved.items() if k != "quantification"}
    path.write_text(json.dumps(older))
    check_run_options(tmp_path, first)
    with pytest.raises(InputError, match="quantification .*'whitepaper' now, 'calibration' before"):
        check_run_options(tmp_path, CohortOptions(ref_masks=str(masks), quantification="whitepaper"))
    path.write_text("{not json")
    with pytest.raises(InputError, match="unreadable record"):
        check_run_options(tmp_path, CohortOptions(tissref="wm"))


def test_folder_lock_refuses_runs_that_would_overlap(tmp_path):
    """Unsharded runs take the folder exclusively, shards share it and hold their own shard:
    an overlapping second run is refused, a disjoint shard is not, and release frees it."""
    from aslcal.cohort.state import folder_lock

    first = folder_lock(tmp_path, "1/2")
    other = folder_lock(tmp_path, "2/2")  # another shard of the job array: fine
    for spec, what in (("1/2", "shard 1/2"), (None, "this dataset")):
        with pytest.raises(InputError, match=f"another aslcal cohort run is working on {what}"):
            folder_lock(tmp_path, spec)
    first()
    other()
    whole = folder_lock(tmp_path, None)
    with pytest.raises(InputError, match="unsharded"):
        folder_lock(tmp_path, "1/2")
    whole()
    folder_lock(tmp_path, "1/2")()


def test_folder_lock_refuses_shards_of_another_split(tmp_path):
    """--shard 1/2 and --shard 1/3 at once would both do some subjects (shard 1/3 holds
    subjects of 1/2 and of 2/2): the second split is refused while the first runs, in
    either order, and allowed once it has ended."""
    from aslcal.cohort.state import folder_lock, shard

    keys = [f"sub-{i:02d}" for i in range(12)]
    assert set(shard(keys, "1/3")) & set(shard(keys, "2/2"))  # the overlap the lock prevents
    halves = [folder_lock(tmp_path, "1/2"), folder_lock(tmp_path, "2/2")]
    for spec in ("1/3", "3/3", "1/1"):
        with pytest.raises(InputError, match="another split"):
            folder_lock(tmp_path, spec)
    for release in halves:
        release()
    third = folder_lock(tmp_path, "1/3")
    with pytest.raises(InputError, match=r"--shard I/3"):
        folder_lock(tmp_path, "2/2")
    third()
    folder_lock(tmp_path, "2/2")()


def test_folder_lock_between_processes(tmp_path):
    """The lock holds across processes (flock), as concurrent job-array tasks are."""
    from aslcal.cohort.state import folder_lock

    release = folder_lock(tmp_path, None)
    code = ("import sys\nfrom aslcal.cohort.state import folder_lock\n"
            "try:\n    folder_lock(sys.argv[1], None)\nexcept Exception as e:\n    print(type(e).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "InputError", out.stderr
    release()
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "", out.stderr


def test_an_input_that_applies_now_marks_the_subject_changed(tmp_path):
    """--resume with --anat: a subject done without an ASL->T1w matrix (images taken as
    aligned), whose matrix has been added since, is redone (it was kept, stale)."""
    from aslcal.cohort.state import changed_inputs

    root = tmp_path / "bids"
    anat = root / "derivatives" / "anat" / "sub-02" / "anat"
    anat.mkdir(parents=True)
    t1w = anat / "sub-02_desc-brain_T1w.nii.gz"
    t1w.write_bytes(b"t1w")
    prov = tmp_path / "prov.json"
    prov.write_text(json.dumps({"inputs": {"files": {"derivatives/anat/sub-02/anat/sub-02_desc-brain_T1w.nii.gz": 3}}}))
    assert changed_inputs(prov, root, None, [t1w]) is None
    mat = anat / "sub-02_from-asl_to-T1w_mode-image_xfm.mat"
    mat.write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    why = changed_inputs(prov, root, None, [t1w, mat], applicable_under=root / "derivatives" / "anat")
    assert why == "derivatives/anat/sub-02/anat/sub-02_from-asl_to-T1w_mode-image_xfm.mat applies to it now"
    # a run that read no anatomy (M0Estimate): the anatomy the lookup finds is not its input
    estimate = tmp_path / "estimate.json"
    estimate.write_text(json.dumps({"inputs": {"files": {}}}))
    assert changed_inputs(estimate, root, None, [t1w, mat], applicable_under=root / "derivatives" / "anat") is None


def test_failure_log_sorts_by_key_keeping_each_key_s_order(tmp_path):
    """Dask workers append in the order they finish; the run sorts the log at its end so
    that it is the same bytes whichever finished first."""
    a = FailureLog(tmp_path / "a.jsonl")
    for key, stage in (("sub-12", "fit"), ("sub-05", "metadata"), ("sub-12", "calibrate")):
        a.record(key, stage, f"{key} {stage}")
    b = FailureLog(tmp_path / "b.jsonl")
    for key, stage in (("sub-05", "metadata"), ("sub-12", "fit"), ("sub-12", "calibrate")):
        b.record(key, stage, f"{key} {stage}")
    a.sort()
    assert [(r.key, r.stage) for r in a.load()] == [("sub-05", "metadata"), ("sub-12", "fit"), ("sub-12", "calibrate")]
    assert a.path.read_bytes() == b.path.read_bytes()
