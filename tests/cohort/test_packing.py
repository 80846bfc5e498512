"""Packed fits (aslcal.cohort.packing) and failure isolation in run_subjects.

* Packing: one launch per design, and a voxel's fit does not depend on the voxels it
  was packed with (each job is refitted alone with :func:`aslcal.fit_satrecov`).
* run_subjects: a subject whose fit or write fails is recorded with that stage, the
  others are written and complete, nothing of the failed subject is left behind;
  a stop set before the start processes nothing.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import aslcal
import aslcal.cohort.pipeline as pipeline
import aslcal.io.derivatives as derivatives
from aslcal.backend import to_host
from aslcal.cohort import CohortOptions, FailureLog, fit_packed, load_subject, run_subjects
from aslcal.fitting import fabber_priors
from aslcal.io import DerivativesWriter
from aslcal.io.atomic import _TEMP_MARKER
from aslcal.io.bids import discover
from aslcal.physics.tissues import tissue_table
from aslcal.testing.bids import GOOD_VARIANTS, make_bids_cohort

# Ten good subjects: every variant twice (two saturation-recovery and two Look-Locker
# subjects: two designs).  Seed 2: recovery series at 1.5, 3 and 7 T.
N_SUBJECTS = 10
SEED = 2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids-packing")
    return make_bids_cohort(root, n_subjects=N_SUBJECTS, seed=SEED, shape=(32, 32, 12), broken=0)


@pytest.fixture(scope="module")
def runs(cohort):
    found = discover(cohort.root)
    assert [r.key for r in found] == list(cohort.runs)
    return found


def _options(cohort, **kw) -> CohortOptions:
    return CohortOptions(ref_masks=str(cohort.root / "derivatives" / "refmasks"), **kw)


def _fit_variants(cohort) -> list[str]:
    return [k for k, t in cohort.runs.items() if t.variant in ("satrecov", "look_locker")]


def test_cohort_has_two_designs(cohort):
    variants = [t.variant for t in cohort.runs.values()]
    assert sorted(set(variants)) == sorted(GOOD_VARIANTS)
    assert variants.count("satrecov") == 2 and variants.count("look_locker") == 2


# --------------------------------------------------------------------------- packing


def _priors_groups(cohort) -> int:
    """Launches expected with priors: one brain launch per design, one reference launch
    per (design, CSF T1 of the subject's field strength)."""
    keys = _fit_variants(cohort)
    brain = {cohort.runs[k].variant for k in keys}
    ref = {(cohort.runs[k].variant, tissue_table(cohort.runs[k].field_strength)["csf"].t1) for k in keys}
    return len(brain) + len(ref)


@pytest.mark.parametrize("priors", [False, True], ids=["no-priors", "priors"])
def test_one_launch_per_design_and_packing_does_not_change_a_voxel(cohort, runs, fast_backend, priors):
    opts = _options(cohort, dtype="float64", backend=fast_backend, priors=priors)
    preps = [load_subject(run, opts, bids_root=cohort.root) for run in runs]
    jobs = [job for prep in preps for job in prep.jobs]
    with_jobs = {prep.key for prep in preps if prep.jobs}
    assert with_jobs == set(_fit_variants(cohort))
    assert len(jobs) == (8 if priors else 4)

    results, launches = fit_packed(jobs, opts)

    expected_launches = _priors_groups(cohort) if priors else 2
    assert len(launches) == expected_launches
    assert sum(launch["n_vox"] for launch in launches) == sum(job.n_vox for job in jobs)
    assert sum(launch["n_jobs"] for launch in launches) == len(jobs)
    if not priors:
        # Two subjects per design, 5 saturation-recovery times / 20 Look-Locker volumes.
        assert sorted(launch["n_jobs"] for launch in launches) == [2, 2]
        n_obs = {cohort.runs[p.key].variant: p.jobs[0].series.shape[1] for p in preps if p.jobs}
        assert sorted(launch["n_obs"] for launch in launches) == sorted(set(n_obs.values()))
    assert len(results) == len(jobs)

    for job, res in zip(jobs, results, strict=True):
        assert res["n_fitted"] == job.n_vox
        assert res["dtype"] == "float64"
        alone = aslcal.fit_satrecov(
            job.series, list(job.tis), fa=job.fa, lfa=job.lfa, dt=job.dt, model=opts.model,
            fix_a=opts.fix_a, priors=fabber_priors(job.prior_t1) if job.prior_t1 is not None else None,
            backend=fast_backend, dtype="float64",
        )
        assert alone.m0t.shape == (job.n_vox,)
        for name in ("m0t", "t1t", "g"):
            got = np.asarray(to_host(res[name]), dtype=np.float64)
            assert got.shape == (job.n_vox,)
            np.testing.assert_allclose(got, to_host(getattr(alone, name)), rtol=1e-10, atol=0,
                                       err_msg=f"{job.role} {name}")
        np.testing.assert_array_equal(to_host(res["status"]), to_host(alone.status))
        # The fit converged to something sensible (not a row of zeros that matches trivially).
        assert np.median(to_host(res["t1t"])) > 0.3


def test_packing_keeps_each_job_in_place(cohort, runs):
    """Reversing the job order reverses the results: results follow their jobs."""
    opts = _options(cohort, dtype="float64", backend="numba")
    jobs = [job for run in runs for job in load_subject(run, opts, bids_root=cohort.root).jobs]
    forward, _ = fit_packed(jobs, opts)
    backward, launches = fit_packed(jobs[::-1], opts)
    assert len(launches) == 2
    for a, b in zip(forward, backward[::-1], strict=True):
        np.testing.assert_allclose(a["m0t"], b["m0t"], rtol=1e-10)
        np.testing.assert_allclose(a["t1t"], b["t1t"], rtol=1e-10)


# --------------------------------------------------------------------------- run_subjects


def _summary(writer: DerivativesWriter, key: str) -> dict:
    return json.loads(writer.subject_paths(key)["summary"].read_text())


def _files_of(out: Path, cohort, key: str) -> list[Path]:
    truth = cohort.runs[key]
    folder = out / "derivatives" / "aslcal" / f"sub-{truth.subject}"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _victim(cohort, variant: str) -> str:
    return next(k for k, t in cohort.runs.items() if t.variant == variant)


def test_fit_failure_of_one_subject_falls_back_to_per_subject_fits(cohort, runs, tmp_path, monkeypatch):
    opts = _options(cohort)
    victim = _victim(cohort, "satrecov")
    victim_run = next(r for r in runs if r.key == victim)
    (victim_job,) = load_subject(victim_run, opts, bids_root=cohort.root).jobs
    others = {r.key: load_subject(r, opts, bids_root=cohort.root) for r in runs if r.key != victim}
    assert all(j.n_vox != victim_job.n_vox for p in others.values() for j in p.jobs)

    real = pipeline.fit_packed
    calls: list[list[int]] = []

    def flaky(jobs, options):
        calls.append([j.n_vox for j in jobs])
        if any(j.n_vox == victim_job.n_vox for j in jobs):
            raise ValueError("injected fit failure")
        return real(jobs, options)

    monkeypatch.setattr(pipeline, "fit_packed", flaky)
    out = tmp_path / "out"
    writer = DerivativesWriter(out)
    log = FailureLog(tmp_path / "failures.jsonl")
    outcome = run_subjects(runs, writer, opts, failure_log=log, workers=2, batch_size=len(runs),
                           bids_root=cohort.root)

    # Batches form as subjects become ready (adaptive batching), so which jobs share the
    # victim's packed call varies; the fallback does not: the batch's one packed call
    # fails, then every subject of that batch is fitted alone (one job each here).
    with_victim = [i for i, c in enumerate(calls) if victim_job.n_vox in c]
    first = with_victim[0]
    batch = calls[first]
    fallback = calls[first + 1:first + 1 + len(batch)]
    assert all(len(c) == 1 for c in fallback)
    assert sorted(c[0] for c in fallback) == sorted(batch)
    assert len(with_victim) == 2 and with_victim[1] in range(first + 1, first + 1 + len(batch))
    # Every job of every other subject was fitted once; the victim's fit never launched.
    fitted = sorted(n for i, c in enumerate(calls) if i not in with_victim for n in c)
    assert fitted == sorted(j.n_vox for p in others.values() for j in p.jobs)
    assert sum(launch["n_vox"] for launch in outcome.launches) == sum(fitted)

    assert [r["key"] for r in outcome.failed] == [victim]
    rec = outcome.failed[0]
    assert rec["stage"] == "fit"
    assert rec["details"]["error"] == "ValueError" and "injected fit failure" in rec["message"]
    assert [(r.key, r.stage) for r in log.load()] == [(victim, "fit")]
    assert sorted(outcome.done) == sorted(others)
    assert not outcome.interrupted
    for key in others:
        assert writer.is_complete(key), key
        # The per-subject fits give the right answer, not just files.
        assert _summary(writer, key)["M0a"] == pytest.approx(cohort.runs[key].m0a_te, rel=1e-5), key
    assert writer.status(victim) == "absent"
    assert _files_of(out, cohort, victim) == []


def test_write_failure_of_one_subject_leaves_nothing_and_others_complete(cohort, runs, tmp_path, monkeypatch):
    opts = _options(cohort)
    victim = _victim(cohort, "look_locker")
    real_write = derivatives.OutputSet.write_bytes
    victim_saved: list[str] = []
    lock = threading.Lock()

    def failing_write(self, dest, payload):
        name = Path(dest).name
        if f"{victim}_desc-" in name and name.endswith(".nii.gz"):
            with lock:
                victim_saved.append(name)
            if f"{victim}_desc-cbf_cbf" in name:  # half the file, then the disk is full
                self.path(dest).write_bytes(payload[: len(payload) // 2])
                raise OSError("injected: no space left on device")
        return real_write(self, dest, payload)

    monkeypatch.setattr(derivatives.OutputSet, "write_bytes", failing_write)
    out = tmp_path / "out"
    writer = DerivativesWriter(out)
    outcome = run_subjects(runs, writer, opts, failure_log=FailureLog(tmp_path / "failures.jsonl"),
                           workers=2, batch_size=4, bids_root=cohort.root)

    # The victim's M0, T1 and flip-angle maps were staged before the failing CBF map.
    assert len(victim_saved) >= 4, victim_saved
    assert [r["key"] for r in outcome.failed] == [victim]
    rec = outcome.failed[0]
    assert rec["stage"] == "write"
    assert rec["details"]["error"] == "OSError" and "no space left" in rec["message"]
    others = [k for k in cohort.runs if k != victim]
    assert sorted(outcome.done) == sorted(others)
    for key in others:
        assert writer.is_complete(key), key
    assert writer.status(victim) == "absent"
    assert _files_of(out, cohort, victim) == []
    assert not [p for p in out.rglob("*") if _TEMP_MARKER in p.name]


def test_write_failure_via_writer_subclass(cohort, runs, tmp_path):
    """A writer whose write_subject raises for one key (before writing anything)."""
    victim = _victim(cohort, "estimate")

    class Failing(DerivativesWriter):
        def write_subject(self, entities, images, records=None, provenance=None):
            if entities == victim:
                raise RuntimeError("injected writer failure")
            return super().write_subject(entities, images, records, provenance)

    out = tmp_path / "out"
    writer = Failing(out)
    outcome = run_subjects(runs, writer, _options(cohort), failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=1, batch_size=3, bids_root=cohort.root)
    assert [(r["key"], r["stage"]) for r in outcome.failed] == [(victim, "write")]
    assert sorted(outcome.done) == sorted(k for k in cohort.runs if k != victim)
    assert all(writer.is_complete(k) for k in outcome.done)
    assert _files_of(out, cohort, victim) == []


def test_stop_set_before_start_processes_nothing(cohort, runs, tmp_path, monkeypatch):
    loaded: list[str] = []
    real_load = pipeline.load_subject

    def counting_load(run, *args, **kwargs):
        loaded.append(run.key)
        return real_load(run, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_subject", counting_load)
    stop = threading.Event()
    stop.set()
    out = tmp_path / "out"
    writer = DerivativesWriter(out)
    log = FailureLog(tmp_path / "failures.jsonl")
    seen: list[tuple[str, bool]] = []
    outcome = run_subjects(runs, writer, _options(cohort), failure_log=log, stop=stop,
                           on_subject=lambda k, ok: seen.append((k, ok)), bids_root=cohort.root)
    assert outcome.interrupted is True
    assert outcome.done == [] and outcome.failed == [] and outcome.launches == []
    assert loaded == [] and seen == []
    assert all(writer.status(k) == "absent" for k in cohort.runs)
    assert not log.path.exists() or log.load() == []
    assert not [p for p in (out / "derivatives" / "aslcal").rglob("*") if p.is_file() and "sub-" in p.as_posix()]


def test_stop_set_during_the_run_finishes_what_was_started(cohort, runs, tmp_path):
    """Stop after the first subject is written: interrupted, and every subject is
    either complete or untouched (never partial)."""
    stop = threading.Event()
    out = tmp_path / "out"
    writer = DerivativesWriter(out)

    def on_subject(key, ok):
        stop.set()

    outcome = run_subjects(runs, writer, _options(cohort), failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=1, batch_size=1, stop=stop, on_subject=on_subject,
                           bids_root=cohort.root)
    assert outcome.interrupted is True
    assert outcome.failed == []
    assert 1 <= len(outcome.done) < len(runs)
    states = {k: writer.status(k) for k in cohort.runs}
    assert {k for k, s in states.items() if s == "complete"} == set(outcome.done)
    assert set(states.values()) == {"complete", "absent"}
    # Subjects are taken in input order: the done ones are a prefix of the runs (a
    # subject being fitted may be written after a later one that needed no fit).
    assert sorted(outcome.done) == sorted(r.key for r in runs[: len(outcome.done)])


def test_ready_subjects_are_fitted_and_written_without_waiting_for_a_slow_read(cohort, runs, tmp_path, monkeypatch):
    """Adaptive batching: a slow read does not hold back the subjects already read.

    The last subject's read blocks until every other subject is written (or 60 s pass).
    A pipeline that waited for a full batch (batch_size = every subject) before fitting
    would only get there by the timeout.
    """
    opts = _options(cohort)
    slow = runs[-1].key
    others_written = threading.Event()
    written: list[str] = []
    real_load = pipeline.load_subject

    def load(run, options, **kw):
        if run.key == slow:
            assert others_written.wait(60), "the other subjects waited for the slow read"
        return real_load(run, options, **kw)

    def on_subject(key, ok):
        written.append(key)
        if len(written) == len(runs) - 1:
            others_written.set()

    monkeypatch.setattr(pipeline, "load_subject", load)
    outcome = run_subjects(runs, DerivativesWriter(tmp_path / "out"), opts, failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=2, batch_size=len(runs), bids_root=cohort.root, on_subject=on_subject)
    assert not outcome.failed and sorted(outcome.done) == sorted(r.key for r in runs)
    assert written[-1] == slow


def test_subjects_without_a_fit_are_written_while_a_fit_runs(cohort, runs, tmp_path, monkeypatch):
    """The fit overlaps the I/O: with a fitted subject first in line, its fit blocks until
    a subject with nothing to fit, later in the input order, has been written (or 60 s
    pass).  A pipeline that fitted on the thread that hands subjects to the writers would
    write nothing meanwhile and only get there by the timeout."""
    opts = _options(cohort)
    fitted = {k for k in _fit_variants(cohort)}
    order = sorted(runs, key=lambda r: r.key not in fitted)  # a fitted subject first
    assert order[0].key in fitted and order[-1].key not in fitted
    plain_written = threading.Event()
    real_fit = pipeline.fit_packed
    fit_threads: list[str] = []

    def fit(jobs, options):
        fit_threads.append(threading.current_thread().name)
        assert plain_written.wait(60), "no subject was written while the fit ran"
        return real_fit(jobs, options)

    def on_subject(key, ok):
        if key not in fitted:
            plain_written.set()

    monkeypatch.setattr(pipeline, "fit_packed", fit)
    writer = DerivativesWriter(tmp_path / "out")
    outcome = run_subjects(order, writer, opts, failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=2, batch_size=len(runs), bids_root=cohort.root, on_subject=on_subject)
    assert not outcome.failed and sorted(outcome.done) == sorted(r.key for r in runs)
    assert fit_threads and all(name != threading.main_thread().name for name in fit_threads)
    for key in fitted:
        assert _summary(writer, key)["M0a"] == pytest.approx(cohort.runs[key].m0a_te, rel=1e-5), key


def test_a_read_ending_while_a_fit_is_handed_over_is_not_lost(cohort, runs, tmp_path, monkeypatch):
    """The next subject's read ends just while the batch is handed to the fit thread (the
    fit pool's submit is slowed so that it does).  The main thread must still wait for
    that read and take the subject: it once decided "not read" before the hand-over and
    "read" after it, waited only on the fit, and took nothing until the fit ended (here
    the fit waits for a later subject to be written: 60 s)."""
    opts = _options(cohort)
    fitted = {k for k in _fit_variants(cohort)}
    first = next(r for r in runs if r.key in fitted)  # a fitted subject, then the plain ones
    order = [first] + [r for r in runs if r.key not in fitted] + [r for r in runs if r.key in fitted and r is not first]
    second = order[1].key
    assert second not in fitted
    handed_over = threading.Event()
    plain_written = threading.Event()
    real_load, real_fit = pipeline.load_subject, pipeline.fit_packed

    def load(run, options, **kw):
        prepared = real_load(run, options, **kw)
        if run.key == second:
            assert handed_over.wait(60)
        return prepared

    def fit(jobs, options):
        assert plain_written.wait(60), "the subject read during the hand-over was not taken"
        return real_fit(jobs, options)

    class Pool(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            future = super().submit(fn, *args, **kwargs)
            if self._thread_name_prefix.startswith("aslcal-fit"):
                handed_over.set()
                time.sleep(0.2)  # the read of `second` ends inside the hand-over
            return future

    monkeypatch.setattr(pipeline, "load_subject", load)
    monkeypatch.setattr(pipeline, "fit_packed", fit)
    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", Pool)
    outcome = run_subjects(order, DerivativesWriter(tmp_path / "out"), opts, failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=2, batch_size=len(runs), bids_root=cohort.root,
                           on_subject=lambda key, ok: key in fitted or plain_written.set())
    assert not outcome.failed and sorted(outcome.done) == sorted(r.key for r in runs)


def test_an_abandoned_run_leaves_its_running_fit_without_effect(cohort, runs, tmp_path, monkeypatch):
    """A KeyboardInterrupt (the second signal) abandons the run while a fit is running in
    the fit thread: run_subjects raises at once, and the fit, when it ends, calibrates,
    records and reports nothing (it used to calibrate its subjects and could append
    failure records to the log of a run already given up)."""
    opts = _options(cohort)
    fitted = {k for k in _fit_variants(cohort)}
    first = next(r for r in runs if r.key in fitted)
    order = [first] + [r for r in runs if r.key not in fitted]
    release = threading.Event()
    finished: list[str] = []
    seen: list[str] = []
    real_fit, real_finish = pipeline.fit_packed, pipeline.finish_subject

    def fit(jobs, options):
        assert release.wait(60)
        return real_fit(jobs, options)

    def finish(prep, fits, options):
        finished.append(prep.key)
        return real_finish(prep, fits, options)

    def on_subject(key, ok):
        seen.append(key)
        raise KeyboardInterrupt  # as a second Ctrl-C would, while the first fit runs

    monkeypatch.setattr(pipeline, "fit_packed", fit)
    monkeypatch.setattr(pipeline, "finish_subject", finish)
    log = FailureLog(tmp_path / "f.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_subjects(order, DerivativesWriter(tmp_path / "out"), opts, failure_log=log, workers=1,
                     batch_size=len(runs), bids_root=cohort.root, on_subject=on_subject)
    fit_threads = [t for t in threading.enumerate() if t.name.startswith("aslcal-fit")]
    release.set()
    for t in fit_threads:
        t.join(60)
    assert first.key not in finished and first.key not in seen
    assert not log.path.exists() or log.load() == []


def test_subjects_read_by_the_time_the_fit_starts_share_one_launch_per_design(cohort, runs, tmp_path, monkeypatch):
    """Packing: when every subject has been read, the batch holds them all (one call)."""
    opts = _options(cohort)
    first = runs[0].key
    n_loaded = 0
    lock = threading.Lock()
    all_others_read = threading.Event()
    real_load, real_fit = pipeline.load_subject, pipeline.fit_packed
    calls: list[int] = []

    def load(run, options, **kw):
        nonlocal n_loaded
        if run.key == first:  # hold the head of the queue until the rest is read
            assert all_others_read.wait(60)
        prepared = real_load(run, options, **kw)
        with lock:
            n_loaded += 1
            if n_loaded == len(runs) - 1:
                all_others_read.set()
        return prepared

    def fit(jobs, options):
        calls.append(len(jobs))
        return real_fit(jobs, options)

    monkeypatch.setattr(pipeline, "load_subject", load)
    monkeypatch.setattr(pipeline, "fit_packed", fit)
    outcome = run_subjects(runs, DerivativesWriter(tmp_path / "out"), opts, failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=2, batch_size=len(runs), bids_root=cohort.root)
    assert sorted(outcome.done) == sorted(r.key for r in runs)
    n_jobs = sum(len(load_subject(r, opts, bids_root=cohort.root).jobs) for r in runs)
    assert calls == [n_jobs]
    assert len(outcome.launches) == 2  # the two designs of this cohort


def test_stop_drops_the_subjects_read_ahead(cohort, runs, tmp_path, monkeypatch):
    """The first signal finishes the batch in hand, not the whole read-ahead window: with
    every subject read ahead (batch_size > subjects), a stop set when the first subject is
    written leaves the later ones undone and says interrupted (it used to process them all
    and report a complete run).

    The reads after the first two wait for the stop (at most 60 s), so that they are still
    in the read-ahead window when it comes, however slow the machine: without the gate, a
    loaded machine could take every subject into the batch in hand before the first write
    ended, and then there is nothing left to drop."""
    stop = threading.Event()
    first = {r.key for r in runs[:2]}
    load = pipeline.load_subject

    def gated_load(run, *args, **kwargs):
        if run.key not in first:
            stop.wait(60)
        return load(run, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_subject", gated_load)
    writer = DerivativesWriter(tmp_path / "out")
    outcome = run_subjects(runs, writer, _options(cohort), failure_log=FailureLog(tmp_path / "f.jsonl"),
                           workers=2, batch_size=64, stop=stop, on_subject=lambda k, ok: stop.set(),
                           bids_root=cohort.root)
    assert outcome.interrupted is True and outcome.failed == []
    assert 1 <= len(outcome.done) < len(runs)
    states = {k: writer.status(k) for k in cohort.runs}
    assert {k for k, s in states.items() if s == "complete"} == set(outcome.done)
    assert set(states.values()) == {"complete", "absent"}


def test_auto_memory_cap(monkeypatch):
    gib = 2**30
    for avail, processes, expected in ((8 * gib, 1, gib), (64 * gib, 1, 2 * gib), (8 * gib, 4, gib // 4),
                                       (100 * 2**20, 1, 64 * 2**20), (None, 1, 2 * gib)):
        monkeypatch.setattr(pipeline, "available_memory", lambda avail=avail: avail)
        assert pipeline.auto_max_batch_bytes(processes) == expected, (avail, processes)


def test_reads_wait_for_a_free_reader_under_the_cap(cohort, runs, tmp_path, monkeypatch):
    """With a cap smaller than one subject, the subjects read but not yet handed on
    (to the fit, or calibrated at once) never exceed the readers, plus the batch being
    gathered and the one being fitted: a read starts only when a reader is free for it and
    the cap allows.  Reads used to be queued all at once (batch_size + workers of them),
    and every one of them completed and held its arrays, cap or not."""
    lock = threading.Lock()
    count = {"started": 0, "handed": 0, "most": 0}
    load, fit_and_finish = pipeline.load_subject, pipeline._fit_and_finish

    def counted_load(*args, **kwargs):
        with lock:
            count["started"] += 1
            count["most"] = max(count["most"], count["started"] - count["handed"])
        return load(*args, **kwargs)

    def counted_fit(batch, *args, **kwargs):
        with lock:
            count["handed"] += len(batch)
        yield from fit_and_finish(batch, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_subject", counted_load)
    monkeypatch.setattr(pipeline, "_fit_and_finish", counted_fit)
    workers = 2
    outcome = run_subjects(runs, DerivativesWriter(tmp_path / "out"), _options(cohort),
                           failure_log=FailureLog(tmp_path / "f.jsonl"), workers=workers, batch_size=64,
                           max_batch_bytes=1, bids_root=cohort.root)
    assert sorted(outcome.done) == sorted(r.key for r in runs)
    assert count["started"] == len(runs) == count["handed"]
    assert count["most"] <= workers + 2, count


def test_memory_cap_cuts_batches(cohort, runs, tmp_path):
    """A cap smaller than one subject: every fitted subject gets a launch of its own, and
    the results are the same as with the default cap."""
    fitted = [r for r in runs if cohort.runs[r.key].variant in ("satrecov", "look_locker")]
    assert len(fitted) >= 2
    outs = {}
    for cap in (None, 1):
        writer = DerivativesWriter(tmp_path / f"out-{cap}")
        outcome = run_subjects(fitted, writer, _options(cohort), failure_log=FailureLog(tmp_path / f"f{cap}.jsonl"),
                               workers=2, batch_size=32, max_batch_bytes=cap, bids_root=cohort.root)
        assert sorted(outcome.done) == sorted(r.key for r in fitted)
        outs[cap] = outcome
    assert len(outs[1].launches) >= len(fitted)
    assert outs[1].summaries == outs[None].summaries


def test_fit_threads_leave_the_readers_and_writers_their_cores():
    assert [pipeline.fit_threads(w, available=n) for w, n in ((2, 2), (2, 16), (8, 16), (1, 1), (4, 2))] == [
        1, 14, 8, 1, 1]


def test_the_fit_thread_fits_with_the_cores_left(cohort, runs, tmp_path, monkeypatch):
    """The fit thread's numba kernels run with fit_threads(workers) threads (numba's
    count is per thread: the caller's is left as it was), and the results do not depend
    on it."""
    import numba

    fitted = [r for r in runs if cohort.runs[r.key].variant in ("satrecov", "look_locker")]
    seen = []
    fit = pipeline.fit_packed

    def spy(jobs, options):
        seen.append(numba.get_num_threads())
        return fit(jobs, options)

    monkeypatch.setattr(pipeline, "fit_packed", spy)
    before = numba.get_num_threads()
    outs = {}
    for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        monkeypatch.setattr(pipeline, "fit_threads", lambda workers, n=n: n)
        seen.clear()
        outs[n] = run_subjects(fitted, DerivativesWriter(tmp_path / f"out{n}"), _options(cohort),
                               failure_log=FailureLog(tmp_path / f"f{n}.jsonl"), workers=2, bids_root=cohort.root)
        assert seen and set(seen) == {n}
    assert numba.get_num_threads() == before
    assert sorted(outs[1].done) == sorted(r.key for r in fitted)
    assert all(o.summaries == outs[1].summaries for o in outs.values())
