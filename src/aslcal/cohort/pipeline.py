"""The pipeline inside one worker: read ahead, pack the fits, write behind.

::

    reader threads ──(bounded window)──▶ main thread ──▶ fit thread ──▶ writer threads
    load_subject: read, decompress,      takes subjects    one fit launch   write_subject:
    brain mask, perfusion, fit jobs      in input order,   per design,      atomic files,
                                         batches the fits  calibration      completion marker

* **Readers** (``workers`` threads) run :func:`~aslcal.cohort.subject.load_subject`; gzip
  decompression (zlib or ISA-L), NumPy and SciPy release the GIL, so they overlap.  A
  read starts only when a reader is free for it; at most ``batch_size + workers``
  subjects are read ahead, no more once the subjects waiting hold ``max_batch_bytes`` of
  arrays, and a batch is cut early when its prepared arrays pass ``max_batch_bytes``
  (memory-aware).
* **The main thread** takes subjects in input order.  Subjects with nothing to fit are
  calibrated (:func:`~aslcal.cohort.subject.finish_subject`) and handed to the writers at
  once; the others join the batch.  Whenever it cannot take the next subject (not read
  yet, the writers behind, or the batch full) and the fit thread is free, it hands the
  batch to the fit thread: the fit never waits for a full batch, and batches grow by
  themselves while a fit runs (adaptive batching; which subjects share a launch varies
  from run to run, their results do not, since every voxel is fitted on its own).
* **The fit thread** fits a batch with :func:`~aslcal.cohort.packing.fit_packed` (numba's
  threads release the GIL; on the GPU the device works) and calibrates its subjects,
  while reading and writing go on: the fit overlaps the I/O instead of holding it up.
  Its numba kernels use the cores the readers and writers leave:
  :func:`fit_threads` = numba's threads less ``workers``, at least 1 (on 2 cores with 2
  readers and 2 writers, 1 thread: 7 % less wall time than 2 for a 50-subject cohort,
  every one of 8 alternating pairs; the fitted values do not depend on it).
* **Writers** (``workers`` threads) run :meth:`DerivativesWriter.write_subject`; at most
  ``2 * workers`` finished subjects wait for a writer before the main thread stops taking
  subjects (besides the outputs of a batch just fitted, all ready at once).

Memory: the subjects read ahead hold at most ``max_batch_bytes`` of prepared arrays, plus
the ``workers`` reads under way when the cap was reached (one subject each); the batch
being gathered and the batch being fitted hold at most ``max_batch_bytes`` together; one
subject always proceeds, whatever its size.

A subject that fails at any stage is recorded in the failure log (key, stage, message,
file/field) and the run goes on.  ``stop`` (a :class:`threading.Event`, set by the first
SIGINT/SIGTERM) stops the pipeline: the batch in hand (the subjects the main thread has
taken) is fitted and written, the subjects read ahead but not taken are dropped (reads not
started are cancelled), and the function returns with ``interrupted=True``.  A :class:`KeyboardInterrupt` (second
signal) abandons the batch: queued writes are cancelled, running ones finish (each is
atomic) and the exception propagates; nothing half-written is left marked complete.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.atomic import json_text
from ..io.bids import AslRun
from ..io.derivatives import DerivativesWriter
from .packing import fit_packed
from .state import FailureLog
from .subject import CohortOptions, PreparedSubject, SubjectError, _fail, finish_subject, load_subject

__all__ = ["BatchOutcome", "auto_max_batch_bytes", "available_memory", "fit_threads", "run_subjects"]

#: Default subjects per fit launch.
DEFAULT_BATCH_SIZE = 32
#: Most bytes of prepared arrays a batch (and the read-ahead) holds by default.
DEFAULT_MAX_BATCH_BYTES = 2 << 30
#: Least the automatic cap goes down to (one subject always proceeds whatever the cap).
MIN_MAX_BATCH_BYTES = 64 << 20


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def auto_max_batch_bytes(processes: int = 1) -> int:
    """The default cap: an eighth of the available memory per process (the batches being
    gathered and fitted together, and the read-ahead, each hold up to the cap; the fit
    needs its copies, and a fitted batch's outputs wait for the writers),
    between 64 MiB and 2 GiB; 2 GiB when the available memory is unknown."""
    avail = available_memory()
    if avail is None:
        return DEFAULT_MAX_BATCH_BYTES
    return int(min(DEFAULT_MAX_BATCH_BYTES, max(MIN_MAX_BATCH_BYTES, avail // (8 * max(1, processes)))))


def fit_threads(workers: int, available: int | None = None) -> int:
    """numba threads of the fit thread: ``available`` (default: numba's threads of the
    calling thread, ``NUMBA_NUM_THREADS``, all cores unless set) less ``workers``, at
    least 1: the readers (decompression, preparation) and the writers (compression, the
    kernel's work of writing and flushing) keep cores busy while a batch is fitted, and
    a fit thread more than the cores left only waits for its slowest one."""
    if available is None:
        import numba

        available = numba.get_num_threads()
    return max(1, int(available) - int(workers))


@dataclass
class BatchOutcome:
    """What :func:`run_subjects` did.

    Attributes
    ----------
    done : list of str
        Subjects written and marked complete.
    failed : list of dict
        Failure records (``key``, ``stage``, ``message``, ``details``).
    interrupted : bool
        Stopped early by ``stop``; subjects not started are neither done nor failed.
    launches : list of dict
        One per fit launch: ``n_jobs``, ``n_vox``, ``n_obs``, backend, timings.
    seconds : float
        Wall time.
    summaries : dict of str to dict
        The summary values of every subject in ``done``, as its summary JSON holds them
        (JSON-safe: non-finite floats are None), so that the run's ``summary.tsv`` need
        not read back what was just written.
    """

    done: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    launches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"done": list(self.done), "failed": list(self.failed), "interrupted": self.interrupted,
                "launches": list(self.launches), "seconds": self.seconds, "summaries": dict(self.summaries)}


def run_subjects(
    runs: Sequence[AslRun],
    writer: DerivativesWriter,
    options: CohortOptions,
    *,
    failure_log: FailureLog,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_bytes: int | None = None,
    bids_root: str | Path | None = None,
    on_subject: Callable[[str, bool], None] | None = None,
    stop: threading.Event | None = None,
) -> BatchOutcome:
    """Process ``runs`` with the read-ahead / packed-fit / write-behind pipeline.

    Parameters
    ----------
    runs : sequence of AslRun
        In the order to process (subjects to skip must already be removed).
    writer : DerivativesWriter
    options : CohortOptions
    failure_log : FailureLog
        Where failures are appended (one JSON line each, flushed).
    workers : int
        Reader threads and writer threads (each).
    batch_size : int
        Most subjects per fit launch (fewer when the next subject is not read yet).
    max_batch_bytes : int, optional
        A batch is cut early when its prepared arrays exceed this, and no subject is read
        ahead while those waiting hold this much; default :func:`auto_max_batch_bytes`.
    bids_root : path, optional
        For relative input paths in the provenance.
    on_subject : callable(key, ok), optional
        Called (from any thread, under a lock) when a subject is written or has failed.
    stop : threading.Event, optional
        Set it to stop after the current batch.

    Returns
    -------
    BatchOutcome
    """
    if workers < 1 or batch_size < 1:
        raise ValueError("workers and batch_size must be >= 1")
    if max_batch_bytes is None:
        max_batch_bytes = auto_max_batch_bytes()
    t0 = time.perf_counter()
    root = Path(bids_root) if bids_root is not None else None
    stop = stop or threading.Event()
    out = BatchOutcome()
    lock = threading.Lock()

    def report(key: str, ok: bool) -> None:
        if on_subject is not None:
            on_subject(key, ok)

    def record(err: SubjectError) -> None:
        rec = failure_log.record(err.key, err.stage, err.message, **err.details)
        with lock:
            out.failed.append(rec.to_json())
            report(err.key, False)

    def write(key: str, outputs) -> str:
        try:
            writer.write_subject(key, outputs.images, outputs.records, outputs.provenance)
        except Exception as exc:  # noqa: BLE001 - one subject's failure must not stop the run
            record(_fail(key, "write", exc))
            return key
        # The values of the summary JSON just written (same conversions), for summary.tsv.
        summary = json.loads(json_text(outputs.records["summary"]))
        with lock:
            out.summaries[key] = summary
            out.done.append(key)
            report(key, True)
        return key

    readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aslcal-read")
    writers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aslcal-write")
    # One fit thread: a batch is fitted (numba's threads or the GPU) and calibrated there
    # while this thread goes on handing subjects to the writers.
    # numba's thread count is per calling thread: set once in the fit thread.
    import numba

    fitter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aslcal-fit",
                                initializer=numba.set_num_threads, initargs=(fit_threads(workers),))
    pending_writes: set[Future] = set()
    # Finished subjects waiting for a writer (at most 2 * workers are queued in the pool).
    backlog: collections.deque[tuple[str, Any]] = collections.deque()
    window: collections.deque[tuple[AslRun, Future]] = collections.deque()
    queue = list(runs)
    next_run = 0
    # Set when the run is abandoned (second signal, an error): a fit still running in the
    # fit thread then calibrates, records and reports nothing.
    abandon = threading.Event()
    fit_future: Future | None = None
    fitting_bytes = 0  # prepared arrays of the batch in the fit thread
    try:

        def ahead_bytes() -> int:
            # Memory held by subjects read but not yet taken by the main thread.
            return sum(f.result().nbytes for _, f in window
                       if f.done() and not f.cancelled() and f.exception() is None)

        def reading() -> list[Future]:
            return [f for _, f in window if not f.done()]

        def fill() -> None:
            # A read is submitted only when a reader is free for it: reads queued in the
            # pool would all complete and hold their arrays whatever the cap says.
            nonlocal next_run
            while (not stop.is_set() and next_run < len(queue) and len(window) < batch_size + workers
                   and len(reading()) < workers
                   and (len(window) < workers or ahead_bytes() < max_batch_bytes)):
                run = queue[next_run]
                next_run += 1
                window.append((run, readers.submit(load_subject, run, options, bids_root=root)))

        def reap() -> None:
            # Collect finished writes and a finished fit; hand waiting subjects to free writers.
            nonlocal fit_future, fitting_bytes
            for f in [f for f in pending_writes if f.done()]:
                pending_writes.discard(f)
                f.result()  # a writer that could not even record its failure (disk full) stops the run
            if fit_future is not None and fit_future.done():
                done_fit, fit_future, fitting_bytes = fit_future, None, 0
                backlog.extend(done_fit.result())
            while backlog and len(pending_writes) < 2 * workers:
                key, outputs = backlog.popleft()
                pending_writes.add(writers.submit(write, key, outputs))

        def start_fit() -> None:
            # Hand the batch in hand to the fit thread if it is free.
            nonlocal fit_future, batch, batch_bytes, fitting_bytes
            if fit_future is None and batch:
                fit_future = fitter.submit(
                    lambda b=batch: list(_fit_and_finish(b, options, out, record, abandon=abandon)))
                batch, batch_bytes, fitting_bytes = [], 0, batch_bytes

        fill()
        batch: list[PreparedSubject] = []
        batch_bytes = 0
        dropped = False
        while True:
            reap()
            fill()
            if stop.is_set() and window:
                # First signal: finish the batch in hand; the subjects read ahead but not
                # taken yet are dropped (queued reads cancelled, finished ones discarded):
                # a resumed run does them.
                for _, pending in window:
                    pending.cancel()
                window.clear()
                dropped = True
            if len(batch) >= batch_size or batch_bytes >= max_batch_bytes:
                start_fit()
            head = window[0][1] if window else None
            ready = head is not None and head.done()  # once: a read ending meanwhile is waited for below
            # Memory: the batch being gathered and the one being fitted hold at most the cap
            # together (a subject always proceeds when neither holds anything).
            if (ready and len(backlog) < 2 * workers
                    and len(batch) < batch_size and batch_bytes + fitting_bytes < max_batch_bytes):
                run, future = window.popleft()
                try:
                    prepared = future.result()
                except SubjectError as err:
                    record(err)
                    prepared = None
                except Exception as exc:  # noqa: BLE001
                    record(_fail(run.key, "load", exc))
                    prepared = None
                fill()
                if prepared is None:
                    continue
                if not prepared.jobs:
                    backlog.extend(_fit_and_finish([prepared], options, out, record))  # calibrate now
                else:
                    batch.append(prepared)
                    batch_bytes += prepared.nbytes
                continue
            # Nothing can be taken now (the next read is not done, the writers are behind,
            # or the batch is full): fit what is held rather than wait idle.  While a fit
            # runs, subjects pile up and the next batch is larger by itself (adaptive
            # batching).
            start_fit()
            waits = set(pending_writes)
            if fit_future is not None:
                waits.add(fit_future)
            if head is not None and not ready:
                waits.add(head)  # done meanwhile or not: wait returns at once then
            waits.update(reading())  # a reader that frees up reads the next subject
            if not waits:
                break  # nothing left to read, fit or write (the batch and backlog are empty then)
            wait(waits, return_when=FIRST_COMPLETED)
        out.interrupted = stop.is_set() and (dropped or next_run < len(queue))
    except BaseException:
        abandon.set()
        raise
    finally:
        for _, future in window:
            future.cancel()
        readers.shutdown(wait=not abandon.is_set(), cancel_futures=True)
        fitter.shutdown(wait=not abandon.is_set(), cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=abandon.is_set())
        out.seconds = time.perf_counter() - t0
    return out


def _fit_and_finish(batch: list[PreparedSubject], options: CohortOptions, out: BatchOutcome, record, *,
                    abandon: threading.Event | None = None):
    """Yield ``(key, SubjectOutputs)`` for the subjects of a batch that calibrate; once
    ``abandon`` is set, nothing more is calibrated or recorded."""
    def abandoned() -> bool:
        return abandon is not None and abandon.is_set()

    def note(err: SubjectError) -> None:
        if not abandoned():
            record(err)

    jobs = [job for prep in batch for job in prep.jobs]
    fits_by_subject: dict[str, dict[str, Any]] = {prep.key: {} for prep in batch}
    failed: set[str] = set()
    if jobs:
        try:
            results, launches = fit_packed(jobs, options)
            out.launches.extend(launches)
            it = iter(results)
            for prep in batch:
                for job in prep.jobs:
                    fits_by_subject[prep.key][job.role] = next(it)
        except Exception:  # noqa: BLE001 - find the subject at fault: fit one by one
            for prep in batch:
                if not prep.jobs:
                    continue
                try:
                    results, launches = fit_packed(prep.jobs, options)
                    out.launches.extend(launches)
                    fits_by_subject[prep.key] = {job.role: r for job, r in zip(prep.jobs, results, strict=True)}
                except Exception as exc:  # noqa: BLE001
                    note(_fail(prep.key, "fit", exc))
                    failed.add(prep.key)
                if abandoned():
                    return
    for prep in batch:
        if abandoned():
            return
        if prep.key in failed:
            continue
        try:
            outputs = finish_subject(prep, fits_by_subject[prep.key], options)
        except SubjectError as err:
            note(err)
            continue
        except Exception as exc:  # noqa: BLE001
            note(_fail(prep.key, "calibrate", exc))
            continue
        yield prep.key, outputs
