"""The Dask executor when things go wrong: a batch that raises, a worker that dies, the
first signal (finish what is in flight, submit no more), Ctrl-C of ``--dask local`` sent
to the whole process group (as a terminal does), and a second Ctrl-C (abandon).

In-process clusters (``processes=False``) let a test replace the pipeline a task runs;
for worker processes the replacement goes in a Dask preload (``distributed.worker.preload``,
a file the test writes), which every worker process imports when it starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("dask.distributed")

import dask  # noqa: E402

from aslcal.cohort import FailureLog, run_cohort  # noqa: E402
from aslcal.cohort import distributed as dask_executor  # noqa: E402
from aslcal.io.atomic import _TEMP_MARKER  # noqa: E402
from aslcal.io.derivatives import DerivativesWriter  # noqa: E402
from aslcal.testing.bids import make_bids_cohort  # noqa: E402

N_SUBJECTS = 6


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_bids_cohort(tmp_path_factory.mktemp("bids"), n_subjects=N_SUBJECTS, seed=23, broken=0)


def _temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if _TEMP_MARKER in p.name]


def _markers(out: Path) -> int:
    if not (out / "derivatives").exists():
        return 0
    return len(list((out / "derivatives").rglob("*_desc-aslcal_complete.json")))


def _states(out: Path, keys) -> dict[str, str]:
    writer = DerivativesWriter(out)
    return {k: writer.status(k) for k in keys}


def _summary_rows(out: Path) -> dict[str, dict[str, str]]:
    lines = (out / "derivatives" / "aslcal" / "summary.tsv").read_text().splitlines()
    head = lines[0].split("\t")
    rows = [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:]]
    return {r["participant_id"].removeprefix("sub-"): r for r in rows}


@pytest.fixture
def thread_cluster():
    """An in-process cluster: one worker, two threads (two batches at a time)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as cluster:
        yield cluster


def test_a_failed_batch_is_recorded_and_the_run_goes_on(cohort, tmp_path, monkeypatch, thread_cluster):
    """Three batches of two: one raises MemoryError before any work, one raises after
    writing its subjects (its report is lost), one is fine.  The run completes; the
    first one's subjects are failed at stage "worker" in the report, the failure log and
    summary.tsv; the second one's subjects are complete on disk and counted done."""
    keys = sorted(cohort.runs)
    oom, lost = keys[2], keys[4]
    real = dask_executor.run_subjects

    def flaky(runs, *args, **kwargs):
        names = [r.key for r in runs]
        if oom in names:
            raise MemoryError("simulated: out of memory")
        outcome = real(runs, *args, **kwargs)
        if lost in names:
            raise RuntimeError("simulated: the report was lost")
        return outcome

    monkeypatch.setattr(dask_executor, "run_subjects", flaky)
    out = tmp_path / "out"
    report = run_cohort(cohort.root, out, dask=thread_cluster.scheduler_address, batch_size=2)

    assert not report.interrupted and report.exit_code == 1
    assert sorted(report.done) == [keys[0], keys[1], keys[4], keys[5]]
    assert [r["key"] for r in report.failed] == [keys[2], keys[3]]
    for rec in report.failed:
        assert rec["stage"] == "worker" and rec["message"] == "MemoryError: simulated: out of memory"
    logged = FailureLog(report.failure_log).load()
    assert sorted((r.key, r.stage) for r in logged) == [(keys[2], "worker"), (keys[3], "worker")]
    states = _states(out, keys)
    assert {k: states[k] for k in (keys[2], keys[3])} == {keys[2]: "absent", keys[3]: "absent"}
    assert all(states[k] == "complete" for k in report.done)
    rows = _summary_rows(out)
    for key in keys:
        sub = cohort.runs[key].subject
        assert rows[sub]["status"] == ("failed" if key in (keys[2], keys[3]) else "ok"), key
    assert rows[cohort.runs[keys[2]].subject]["stage"] == "worker"
    assert not _temp_files(out)


def test_stop_finishes_the_batches_in_flight_and_submits_no_more(cohort, tmp_path, monkeypatch, thread_cluster):
    """``stop`` set when the first batch completes: the batch still running finishes, no
    batch starts after that, the outcome is interrupted, every subject is complete or
    absent and no temporary file is left."""
    keys = sorted(cohort.runs)
    real = dask_executor.run_subjects
    started: list[tuple[float, list[str]]] = []
    lock = threading.Lock()

    def slow_second(runs, *args, **kwargs):
        with lock:
            started.append((time.monotonic(), [r.key for r in runs]))
        if runs[0].key == keys[1]:
            time.sleep(1.0)  # still running when the first batch reports
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(dask_executor, "run_subjects", slow_second)
    stop = threading.Event()
    stopped_at: list[float] = []

    def on_subject(key: str, ok: bool) -> None:
        if not stop.is_set():
            stopped_at.append(time.monotonic())
            stop.set()

    out = tmp_path / "out"
    report = run_cohort(cohort.root, out, dask=thread_cluster.scheduler_address, batch_size=1,
                        on_subject=on_subject, stop=stop)

    assert report.interrupted and report.exit_code == 130 and report.failed == []
    ran = sorted(k for _, names in started for k in names)
    assert sorted(report.done) == ran  # every batch started was finished
    assert keys[1] in report.done  # in flight when stop was set
    assert len(ran) < len(keys)
    assert all(t < stopped_at[0] for t, _ in started), "a batch started after stop was set"
    states = _states(out, keys)
    assert {k for k, s in states.items() if s == "complete"} == set(report.done)
    assert {k for k, s in states.items() if s != "complete"} == set(keys) - set(report.done)
    assert set(states.values()) == {"complete", "absent"}
    assert _markers(out) == len(report.done)
    assert not _temp_files(out)


def _preload(tmp_path: Path, body: str) -> Path:
    """A Dask worker preload file: ``body`` runs once in each worker process."""
    path = tmp_path / "aslcal_test_preload.py"
    path.write_text(
        "import os, sys, time\n"
        "_mod = sys.modules.setdefault('_aslcal_test_preload_state', type(sys)('_aslcal_test_preload_state'))\n"
        "if not getattr(_mod, 'done', False):\n"
        "    _mod.done = True\n"
        + "".join(f"    {line}\n" for line in body.strip().splitlines())
    )
    return path


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_batch_and_a_rerun_task_is_idempotent(cohort, tmp_path):
    """Worker processes that die (os._exit) in a task: a batch whose every attempt kills
    its worker fails at stage "worker" (KilledWorker) without ending the run; a batch
    whose first attempt dies after writing its subjects is rerun by the scheduler on a
    fresh worker, which takes the subjects already complete as done."""
    keys = sorted(cohort.runs)
    deadly, once = keys[0], keys[2]
    flag = tmp_path / "died-once"
    preload = _preload(tmp_path, f"""
import aslcal.cohort.distributed as _d
_real = _d.run_subjects
def _dying(runs, *args, **kwargs):
    names = [r.key for r in runs]
    if {deadly!r} in names:
        os._exit(3)
    outcome = _real(runs, *args, **kwargs)
    if {once!r} in names and not os.path.exists({str(flag)!r}):
        open({str(flag)!r}, "w").close()
        os._exit(3)
    return outcome
_d.run_subjects = _dying
""")
    out = tmp_path / "out"
    with dask.config.set({"distributed.worker.preload": [str(preload)],
                          "distributed.scheduler.allowed-failures": 1}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster:
            report = run_cohort(cohort.root, out, dask=cluster.scheduler_address, batch_size=2)
    assert flag.exists(), "the preload did not run in the workers"
    assert sorted(report.done) == keys[2:]
    assert [r["key"] for r in report.failed] == keys[:2]
    assert all(r["stage"] == "worker" and r["message"].startswith("KilledWorker") for r in report.failed)
    assert sorted(r.key for r in FailureLog(report.failure_log).load()) == keys[:2]
    states = _states(out, keys)
    assert [states[k] for k in keys] == ["absent"] * 2 + ["complete"] * (len(keys) - 2)
    assert not _temp_files(out)


def _start_local_run(cohort, out: Path, log: Path, preload: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([str(preload)]))
    cmd = [sys.executable, "-m", "aslcal", "cohort", str(cohort.root), str(out), "--no-progress",
           "--dask", "local", "--workers", "2", "--batch-size", "1", *extra]
    with open(log, "wb") as handle:
        # A session of its own: os.killpg reaches it and its worker processes, as Ctrl-C
        # in a terminal reaches the foreground process group.
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=handle, env=env, start_new_session=True)


def _wait_for_marker(proc: subprocess.Popen, out: Path, log: Path) -> None:
    deadline = time.monotonic() + 60
    while _markers(out) < 1:
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc)
            raise AssertionError(f"no subject was completed: {log.read_text()}")
        time.sleep(0.01)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_exit(proc: subprocess.Popen, log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise AssertionError(f"still running {timeout} s after SIGINT (hang): {log.read_text()}") from None
    return code, time.monotonic() - t0


def _group_gone(proc: subprocess.Popen, timeout: float = 15) -> bool:
    """No process of the run's group is left (the worker processes are gone too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    _kill_group(proc)
    return False


@pytest.mark.slow
def test_ctrl_c_of_a_local_cluster_finishes_the_batches_in_flight(cohort, tmp_path):
    """SIGINT to the process group of ``aslcal cohort --dask local`` once a subject is
    complete: the worker processes ignore it, the batches in flight finish, the run
    exits 130 (no hang), nothing is partial, and ``--resume`` finishes the cohort."""
    preload = _preload(tmp_path, """
from aslcal.io.derivatives import DerivativesWriter
_real = DerivativesWriter.write_subject
def _slow(self, *args, **kwargs):
    time.sleep(0.5)
    return _real(self, *args, **kwargs)
DerivativesWriter.write_subject = _slow
""")
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = _start_local_run(cohort, out, log, preload)
    _wait_for_marker(proc, out, log)
    os.killpg(proc.pid, signal.SIGINT)
    code, _ = _wait_exit(proc, log, 60)
    text = log.read_text()
    assert code == 130, text
    assert "--resume" in text and "KeyboardInterrupt" not in text, text
    assert _group_gone(proc), "worker processes left behind"
    states = _states(out, cohort.runs)
    assert set(states.values()) == {"complete", "absent"}, states  # stopped early, nothing partial
    assert not _temp_files(out)
    rerun = subprocess.run([sys.executable, "-m", "aslcal", "cohort", str(cohort.root), str(out), "--no-progress",
                            "--dask", "local", "--workers", "2", "--resume"],
                           capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert set(_states(out, cohort.runs).values()) == {"complete"}


@pytest.mark.slow
def test_second_ctrl_c_abandons_quickly_and_leaves_nothing_partial(cohort, tmp_path):
    """Two SIGINTs to the process group while every batch in flight has its files staged
    (the rename onto the destinations is held back): the run exits 130 within seconds,
    the workers are gone, no subject is marked complete that is not, and the staged
    temporary files of the abandoned subjects are removed."""
    preload = _preload(tmp_path, """
from aslcal.io.atomic import OutputSet
_real = OutputSet.commit
def _slow(self):
    time.sleep(3.0)
    return _real(self)
OutputSet.commit = _slow
""")
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = _start_local_run(cohort, out, log, preload)
    _wait_for_marker(proc, out, log)
    time.sleep(0.5)  # the next batches are staging their files
    staged = len(_temp_files(out))
    assert staged, "no batch had staged files when abandoned; the test proves less than it says"
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.2)  # a second signal within 1 s would be the same request
    os.killpg(proc.pid, signal.SIGINT)
    code, seconds = _wait_exit(proc, log, 60)
    text = log.read_text()
    assert code == 130, text
    assert seconds < 15, f"abandoning took {seconds:.1f} s"
    assert _group_gone(proc), "worker processes left behind"
    print(f"{staged} temporary files staged when abandoned; exit after {seconds:.1f} s")
    writer = DerivativesWriter(out)
    states = _states(out, cohort.runs)
    assert "absent" in states.values()
    for key, state in states.items():
        assert state in ("complete", "absent"), (key, state)
        if state == "complete":
            assert writer.is_complete(key, check="sha256"), key
    assert not _temp_files(out)


def test_gpus_without_dask_cuda_warn(monkeypatch, caplog):
    """A GPU machine without dask_cuda falls back to CPU worker processes, and says so."""
    import sys

    from aslcal.cohort import distributed as dist

    monkeypatch.setattr(dist, "_gpu_count", lambda: 2)
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails
    with caplog.at_level(logging.WARNING, logger="aslcal"):
        cluster, described = dist._local_cluster(1)
    cluster.close()
    assert described.startswith("dask LocalCluster")
    assert any("dask_cuda is not installed" in r.message and "aslcal[dask-cuda]" in r.message for r in caplog.records)


def test_memory_cap_reaches_the_tasks(tmp_path, monkeypatch):
    """run_cohort(max_batch_bytes=) with Dask: every task's pipeline gets the cap."""
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=3, seed=8, shape=(32, 32, 12), broken=0)
    seen = []
    real = dask_executor.run_subjects

    def spy(*args, **kwargs):
        seen.append(kwargs.get("max_batch_bytes"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dask_executor, "run_subjects", spy)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        report = run_cohort(truth.root, tmp_path / "out", dask=cluster.scheduler_address, batch_size=1,
                            max_batch_bytes=12345)
    assert report.exit_code == 0 and sorted(report.done) == sorted(truth.runs)
    assert seen == [12345] * len(truth.runs)


def test_cpu_backend_on_a_gpu_machine_keeps_the_cpu_workers(monkeypatch):
    """--backend numba on a machine with GPUs: the CPU worker processes asked for, not
    dask_cuda's one worker per GPU."""
    import sys
    import types

    from aslcal.cohort import distributed as dist

    monkeypatch.setattr(dist, "_gpu_count", lambda: 2)
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: (_ for _ in ()).throw(AssertionError("a GPU cluster for a CPU backend"))
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    cluster, described = dist._local_cluster(2, "numba")
    try:
        assert described == "dask LocalCluster (2 workers)" and len(cluster.workers) == 2
    finally:
        cluster.close()


def _numba_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


def test_local_workers_share_numba_s_threads(monkeypatch):
    """Each process of a CPU LocalCluster fits with its share of numba's threads here
    (each used to take them all: N processes x all cores when their fits coincide)."""
    from aslcal.cohort import distributed as dist

    assert [dist.local_worker_threads(w, available=n) for w, n in ((2, 16), (3, 16), (4, 2), (1, 2))] == [8, 5, 1, 2]
    monkeypatch.setattr(dist, "local_worker_threads", lambda workers: 1)  # a share any machine has
    cluster, _ = dist._local_cluster(2, "numba")
    try:
        with distributed.Client(cluster) as client:
            assert set(client.run(_numba_threads).values()) == {1}
    finally:
        cluster.close()


def test_missing_dask_is_refused_before_any_output(tmp_path, monkeypatch):
    """--dask without dask.distributed installed: refused before the output folder exists."""
    import sys

    from aslcal.cohort import run_cohort
    from aslcal.errors import BackendUnavailableError

    truth = make_bids_cohort(tmp_path / "bids", n_subjects=1, seed=1, broken=0, shape=(12, 12, 8), ref_masks=False)
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails
    with pytest.raises(BackendUnavailableError, match=r"aslcal\[dask\]"):
        run_cohort(truth.root, tmp_path / "out", dask="local")
    assert not (tmp_path / "out").exists()
