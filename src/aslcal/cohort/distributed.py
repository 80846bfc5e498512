"""Run a cohort on a Dask cluster: a batch of subjects is the unit of work.

Each task runs the in-process pipeline (:func:`aslcal.cohort.pipeline.run_subjects`)
on one batch inside a Dask worker: it reads, fits (one launch per design), calibrates
and writes the batch's subjects itself, so only file names and small reports cross the
network, never images.  Every subject is written atomically with its completion marker
by the worker that did it; failures are appended to the run's failure log (one JSON
line per write, safe from several processes on one file system).  A task is
idempotent: subjects an earlier attempt of it completed are taken as done, partial ones
are cleaned and redone, so the scheduler may rerun a task whose worker died.

``scheduler="local"`` starts a :class:`dask.distributed.LocalCluster` with ``workers``
single-threaded worker processes (sharing numba's threads: :func:`local_worker_threads`
each), or, when CuPy sees GPUs and ``dask_cuda`` is
installed, a ``dask_cuda.LocalCUDACluster`` with one worker per GPU.  Local worker
processes ignore SIGINT: a Ctrl-C in the terminal reaches the whole process group, and
it is this process that decides what to do (below).  Any other value is the address of
an existing scheduler (``tcp://host:8786``); its workers must see the same file system
paths, and they are neither started nor stopped here.

Batches are submitted as workers free up: at most as many are in flight as the cluster
has worker threads, so that what is in flight is what is running.

* A task that raises (an exception in the pipeline, a worker that died, a result that
  cannot be deserialised) does not end the run: every subject of its batch that is not
  complete on disk and was not recorded as failed by the worker is recorded in the
  failure log with stage ``worker`` (the exception's type and message), its leftovers
  are removed, and the other batches go on.
* ``stop`` set (first SIGINT/SIGTERM): no batch is submitted any more, the batches in
  flight finish, and the outcome is ``interrupted`` if some batch was never submitted.
  ``stop`` is polled, not only looked at when a batch completes.
* :class:`KeyboardInterrupt` (second signal): the batches in flight are cancelled and
  a local cluster is closed at once (its workers are killed); the exception propagates.
  Completion markers are written last, so nothing unfinished is marked complete; the
  leftovers of the abandoned subjects of a local cluster are removed (best effort), and
  ``--resume`` cleans whatever remains.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError
from ..io.bids import AslRun
from ..io.derivatives import DerivativesWriter
from .pipeline import BatchOutcome, auto_max_batch_bytes, run_subjects
from .state import FailureLog, plan_run
from .subject import CohortOptions

__all__ = ["run_dask"]

#: Reader/writer threads inside one Dask task.
TASK_THREADS = 2
#: Seconds between looks at ``stop`` while batches run.
POLL_SECONDS = 0.2
#: Most seconds to wait for the client and a local cluster to close (a local worker
#: running a task is killed after about 5 s).
CLOSE_WAIT_SECONDS = 30.0
#: After a second signal, seconds a local worker process is given to stop before it is
#: terminated.
KILL_SECONDS = 0.5
#: Stage of the failure records of subjects whose Dask task failed as a whole.
WORKER_STAGE = "worker"


def _batch_task(runs: list[AslRun], out_root: str, pipeline: str, version: str, options: CohortOptions,
                log_path: str, bids_root: str | None, threads: int,
                max_batch_bytes: int | None = None) -> dict[str, Any]:
    """Runs on a Dask worker: the pipeline over one batch; returns the outcome as JSON.

    Idempotent: a subject complete on disk (written by an earlier attempt of this task,
    whose worker died before reporting) is reported done without being redone, and a
    partial one is cleaned first, so a rescheduled task does not fail on its own files.
    """
    writer = DerivativesWriter(out_root, pipeline=pipeline, version=version)
    plan = plan_run([run.key for run in runs], writer, resume=True, check="size")  # what a resume does
    pending = set(plan.todo)
    todo = [run for run in runs if run.key in pending]
    outcome = run_subjects(
        todo, writer, options, failure_log=FailureLog(log_path), workers=threads,
        batch_size=max(1, len(todo)), max_batch_bytes=max_batch_bytes, bids_root=bids_root,
    ) if todo else BatchOutcome()
    out = outcome.to_json()
    # Their summaries are read back from disk by the run's summary.tsv.
    out["done"] = plan.skipped + list(out["done"])
    return out


# --------------------------------------------------------------------------- SIGINT in workers


def _ignore_sigint(driver_pid: int) -> None:
    """Ignore SIGINT in a local worker process (its main thread).

    Never in ``driver_pid``, the process that runs the cohort: its SIGINT handler is the
    user's stop (an in-process worker, ``processes=False``, shares it).
    """
    if os.getpid() == driver_pid or threading.current_thread() is not threading.main_thread():
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # pragma: no cover - not the main thread after all
        pass


_PLUGIN_CLASS: type | None = None


def _sigint_plugin(driver_pid: int | None = None):
    """A worker plugin that makes the local worker processes ignore SIGINT.

    A terminal's Ctrl-C reaches the whole process group: without it, each worker process
    dies of KeyboardInterrupt with its batch.  The plugin travels to a new worker process
    pickled in its start arguments, and unpickling it (:func:`_unpickle_sigint_plugin`)
    ignores SIGINT in that process's main thread before the worker's event loop starts
    (so asyncio installs no SIGINT handler of its own); its ``setup`` ignores SIGINT again
    once the worker runs (plugins registered with a running cluster).  The class is made
    here so that this module imports without dask.
    """
    global _PLUGIN_CLASS
    if _PLUGIN_CLASS is None:
        from distributed.diagnostics.plugin import WorkerPlugin

        class IgnoreSigint(WorkerPlugin):
            name = "aslcal-ignore-sigint"

            def __init__(self, driver_pid: int) -> None:
                self.driver_pid = driver_pid

            def setup(self, worker) -> None:
                _ignore_sigint(self.driver_pid)

            def __reduce__(self):
                return (_unpickle_sigint_plugin, (self.driver_pid,))

        _PLUGIN_CLASS = IgnoreSigint
    return _PLUGIN_CLASS(os.getpid() if driver_pid is None else driver_pid)


def _unpickle_sigint_plugin(driver_pid: int):
    _ignore_sigint(driver_pid)
    return _sigint_plugin(driver_pid)


# --------------------------------------------------------------------------- clusters


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return 0


def local_worker_threads(workers: int, available: int | None = None) -> int:
    """numba threads of each of the ``workers`` processes of a CPU LocalCluster: their
    share of ``available`` (default: numba's threads here), at least 1."""
    if available is None:
        import numba

        available = numba.get_num_threads()
    return max(1, int(available) // max(1, int(workers)))


def _local_cluster(workers: int, backend: str | None = None):
    from dask.distributed import LocalCluster

    # one worker per GPU only when the fits may go to the GPUs: an explicit CPU backend
    # on a GPU machine keeps the CPU worker count asked for
    if backend not in ("numba", "numpy") and _gpu_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            logging.getLogger("aslcal").warning(
                "GPUs present but dask_cuda is not installed: %d CPU worker processes will share them "
                "(pip install \"aslcal[dask-cuda]\" for one worker per GPU)", workers)
        else:
            # dask_cuda sets the workers' plugins itself: the SIGINT plugin is registered
            # with the client once the cluster runs (run_dask).
            return LocalCUDACluster(dashboard_address=":0"), "dask_cuda.LocalCUDACluster"
    # A random dashboard port: two runs on one machine (shards) must not collide.  The
    # worker processes share this process's numba threads (NUMBA_NUM_THREADS, all cores
    # unless set): each would otherwise fit with all of them, and the fits of several
    # workers at once would oversubscribe the cores.
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0", plugins={_sigint_plugin()},
                           env={"NUMBA_NUM_THREADS": str(local_worker_threads(workers))})
    return cluster, f"dask LocalCluster ({workers} workers)"


def _load_quietly(failure_log: FailureLog) -> list:
    try:
        return failure_log.load()
    except Exception:  # noqa: BLE001 - an unreadable log: every failure gets its own record
        return []


def _worker_threads(client) -> int:
    try:
        return max(1, sum(int(n) for n in client.nthreads().values()))
    except Exception:  # noqa: BLE001 - a scheduler that does not answer now: one at a time
        return 1


async def _close_nannies(nannies: list) -> None:
    """Close a local cluster's workers (the nannies and their processes) within about 1 s."""
    import asyncio

    await asyncio.gather(*(n.close(timeout=KILL_SECONDS) for n in nannies if hasattr(n, "close")),
                         return_exceptions=True)


def _shutdown(client, cluster, *, abandon: bool, futures: list, runs: list[AslRun],
              writer: DerivativesWriter) -> None:
    """Close the client and a local cluster (after a second signal: cancel ``futures`` first).

    The closing runs in a helper thread that this thread waits for: a KeyboardInterrupt
    raised while distributed waits would cancel the close halfway and leave the cluster
    "closing" (its exit handler then waits 10 s more).  A signal that comes meanwhile is
    re-raised once the cluster is closed.  After an abandon, once the local workers are
    gone, the leftovers of the abandoned ``runs`` are removed (best effort; the
    completion marker is written last, so a complete subject is whole; an existing
    cluster's workers may still be writing, and ``--resume`` cleans what they leave).
    """
    errors: list[BaseException] = []
    closed = threading.Event()

    def close() -> None:
        try:
            if client is not None:
                if abandon and futures:
                    client.cancel(futures, force=True)
                client.close()
            if cluster is not None:
                if abandon:
                    # Not the default grace of about 4 s for running tasks: kill them now.
                    cluster.sync(_close_nannies, list(getattr(cluster, "workers", {}).values()))
                cluster.close()
            closed.set()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            errors.append(exc)

    closer = threading.Thread(target=close, name="aslcal-dask-close", daemon=True)
    closer.start()
    interrupted = False
    deadline = time.monotonic() + CLOSE_WAIT_SECONDS
    while closer.is_alive() and time.monotonic() < deadline:
        try:
            closer.join(POLL_SECONDS)
        except KeyboardInterrupt:
            interrupted = True
    if abandon and cluster is not None and closed.is_set():
        for run in runs:
            try:
                writer.remove_partial(run.key)
            except Exception:  # noqa: BLE001
                pass
    if interrupted and not abandon:
        raise KeyboardInterrupt
    if errors and not abandon:
        raise errors[0]


# --------------------------------------------------------------------------- run


def require_distributed():
    """The ``dask.distributed`` module, or :class:`BackendUnavailableError` naming the extra."""
    try:
        import dask.distributed
    except ImportError:
        raise BackendUnavailableError("--dask needs dask.distributed: pip install \"aslcal[dask]\"") from None
    return dask.distributed


def run_dask(
    runs: Sequence[AslRun],
    writer: DerivativesWriter,
    options: CohortOptions,
    *,
    failure_log: FailureLog,
    scheduler: str,
    workers: int = 2,
    batch_size: int = 32,
    max_batch_bytes: int | None = None,
    bids_root: str | Path | None = None,
    on_subject: Callable[[str, bool], None] | None = None,
    stop: threading.Event | None = None,
) -> tuple[BatchOutcome, str]:
    """Process ``runs`` in batches on a Dask cluster (module docstring).

    Returns
    -------
    (BatchOutcome, str)
        The merged outcome and a description of the cluster used.

    Raises
    ------
    BackendUnavailableError
        dask.distributed is not installed (``pip install "aslcal[dask]"``).
    InputError
        The scheduler cannot be reached.
    KeyboardInterrupt
        Abandoned (second signal): what was in flight is cancelled.
    """
    Client = require_distributed().Client
    t0 = time.perf_counter()
    stop = stop or threading.Event()
    # The cluster's own start/stop chatter (and a benign comm-closed traceback when
    # local workers shut down) is not the user's business; real errors surface as
    # exceptions of the futures.
    quiet = {name: logging.getLogger(name) for name in ("distributed", "distributed.batched", "tornado")}
    levels = {name: lg.level for name, lg in quiet.items()}
    for name, lg in quiet.items():
        lg.setLevel(logging.CRITICAL if name != "distributed" else logging.ERROR)
    cluster = None
    client = None
    out = BatchOutcome()
    batches = [list(runs[i:i + batch_size]) for i in range(0, len(runs), batch_size)]
    in_flight: dict[Any, int] = {}  # future -> batch index
    abandoned = False
    try:
        if scheduler == "local":
            try:
                from ..config import get_config

                cluster, described = _local_cluster(
                    workers, options.backend if options.backend is not None else get_config()["backend"])
            except Exception:
                if not stop.is_set():
                    raise
                # A SIGINT while the workers started (before they could ignore it) killed
                # one: the user asked to stop, and no batch was in hand.
                out.interrupted = bool(batches)
                out.seconds = time.perf_counter() - t0
                return out, "dask local cluster (interrupted while starting)"
            client = Client(cluster)
            if described.startswith("dask_cuda"):
                client.register_plugin(_sigint_plugin())
        else:
            try:
                client = Client(scheduler, timeout="30s")
            except (OSError, TimeoutError) as exc:
                raise InputError(f"--dask-scheduler {scheduler!r}: cannot connect ({exc})") from None
            described = f"dask scheduler {scheduler}"
        if max_batch_bytes is None and scheduler == "local":
            # the local worker processes share this machine's memory
            max_batch_bytes = auto_max_batch_bytes(processes=_worker_threads(client))
        args = (str(writer.out_root), writer.pipeline, writer.version, options, str(failure_log.path),
                None if bids_root is None else str(bids_root), TASK_THREADS, max_batch_bytes)
        # Unique keys: runs that share a scheduler (shards) must not share tasks.
        token = uuid.uuid4().hex[:12]
        n_logged = len(_load_quietly(failure_log))  # records before this run: not this run's failures
        woke = threading.Event()
        next_batch = 0
        slots = _worker_threads(client)
        slots_at = time.monotonic()

        def wake(_future) -> None:
            woke.set()

        def merge(result: dict[str, Any]) -> None:
            out.done.extend(result["done"])
            out.failed.extend(result["failed"])
            out.launches.extend(result["launches"])
            out.summaries.update(result.get("summaries", {}))
            if on_subject is not None:
                for key in result["done"]:
                    on_subject(key, True)
                for rec in result["failed"]:
                    on_subject(rec["key"], False)

        def batch_failed(batch: list[AslRun], exc: BaseException) -> None:
            # The worker's own failure records of this run stand; the rest of the batch
            # is complete on disk (its report was lost) or failed with the task.
            logged = {rec.key: rec for rec in _load_quietly(failure_log)[n_logged:]}
            text = str(exc).strip()
            message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            for run in batch:
                key = run.key
                if writer.is_complete(key, check="size"):
                    out.done.append(key)
                    ok = True
                elif key in logged:
                    writer.remove_partial(key)
                    out.failed.append(logged[key].to_json())
                    ok = False
                else:
                    writer.remove_partial(key)
                    rec = failure_log.record(key, WORKER_STAGE, message, exception=type(exc).__name__)
                    out.failed.append(rec.to_json())
                    ok = False
                if on_subject is not None:
                    on_subject(key, ok)

        while True:
            if not stop.is_set() and next_batch < len(batches) and time.monotonic() - slots_at > 1.0:
                slots, slots_at = _worker_threads(client), time.monotonic()  # clusters may grow
            while not stop.is_set() and next_batch < len(batches) and len(in_flight) < slots:
                i, next_batch = next_batch, next_batch + 1
                try:
                    future = client.submit(_batch_task, batches[i], *args, pure=False,
                                           key=f"aslcal-batch-{token}-{i}")
                except Exception as exc:  # noqa: BLE001 - e.g. options that cannot be pickled
                    batch_failed(batches[i], exc)
                    continue
                in_flight[future] = i
                future.add_done_callback(wake)
            if not in_flight:
                break
            woke.clear()
            finished = [f for f in in_flight if f.done()]
            if not finished:
                woke.wait(POLL_SECONDS)  # a batch done, or time to look at stop again
                continue
            for future in finished:
                i = in_flight.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - one batch's failure must not stop the run
                    batch_failed(batches[i], exc)
                else:
                    merge(result)
                future.release()
        out.interrupted = stop.is_set() and next_batch < len(batches)
    except BaseException:
        abandoned = True
        raise
    finally:
        try:
            _shutdown(client, cluster, abandon=abandoned, futures=list(in_flight),
                      runs=[run for i in in_flight.values() for run in batches[i]], writer=writer)
        finally:
            for name, lg in quiet.items():
                lg.setLevel(levels[name])
    out.seconds = time.perf_counter() - t0
    return out, described
