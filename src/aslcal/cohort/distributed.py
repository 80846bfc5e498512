"""Run a cohort on a Dask cluster: a batch of subjects is the unit of work.

Each task runs the in-process pipeline (:func:`aslcal.cohort.pipeline.run_subjects`)
on one batch inside a Dask worker: it reads, fits (one launch per design), calibrates
and writes the batch's subjects itself, so only file names and small reports cross the
network, never images.  Every subject is written atomically with its completion marker
by the worker that did it; failures are appended to the run's failure log (one JSON
line per write, safe from several processes on one file system).

``scheduler="local"`` starts a :class:`dask.distributed.LocalCluster` with ``workers``
single-threaded worker processes, or, when CuPy sees GPUs and ``dask_cuda`` is
installed, a ``dask_cuda.LocalCUDACluster`` with one worker per GPU.  Any other value is
the address of an existing scheduler (``tcp://host:8786``); its workers must see the
same file system paths.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError
from ..io.bids import AslRun
from ..io.derivatives import DerivativesWriter
from .pipeline import BatchOutcome, run_subjects
from .state import FailureLog
from .subject import CohortOptions

__all__ = ["run_dask"]

#: Reader/writer threads inside one Dask task.
TASK_THREADS = 2


def _batch_task(runs: list[AslRun], out_root: str, pipeline: str, version: str, options: CohortOptions,
                log_path: str, bids_root: str | None, threads: int) -> dict[str, Any]:
    """Runs on a Dask worker: the pipeline over one batch; returns the outcome as JSON."""
    writer = DerivativesWriter(out_root, pipeline=pipeline, version=version)
    outcome = run_subjects(
        runs, writer, options, failure_log=FailureLog(log_path), workers=threads,
        batch_size=max(1, len(runs)), bids_root=bids_root,
    )
    return outcome.to_json()


def _gpu_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return 0


def _local_cluster(workers: int):
    from dask.distributed import LocalCluster

    if _gpu_count() > 0:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            return LocalCUDACluster(dashboard_address=":0"), "dask_cuda.LocalCUDACluster"
    # A random dashboard port: two runs on one machine (shards) must not collide.
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0")
    return cluster, f"dask LocalCluster ({workers} workers)"


def run_dask(
    runs: Sequence[AslRun],
    writer: DerivativesWriter,
    options: CohortOptions,
    *,
    failure_log: FailureLog,
    scheduler: str,
    workers: int = 2,
    batch_size: int = 32,
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
    """
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise BackendUnavailableError(
            "--dask needs dask.distributed: pip install \"aslcal[dask]\""
        ) from None
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
    if scheduler == "local":
        cluster, described = _local_cluster(workers)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"--dask-scheduler {scheduler!r}: cannot connect ({exc})") from None
        described = f"dask scheduler {scheduler}"
    out = BatchOutcome()
    try:
        batches = [list(runs[i:i + batch_size]) for i in range(0, len(runs), batch_size)]
        args = (str(writer.out_root), writer.pipeline, writer.version, options, str(failure_log.path),
                None if bids_root is None else str(bids_root), TASK_THREADS)
        futures = [client.submit(_batch_task, batch, *args, pure=False, key=f"aslcal-batch-{i}")
                   for i, batch in enumerate(batches)]
        cancelled = False
        for future in as_completed(futures):
            if stop.is_set() and not cancelled:
                # First signal: let running batches finish, drop the queued ones.
                client.cancel([f for f in futures if f.status == "pending"])
                cancelled = True
            if future.cancelled() or future.status == "cancelled":
                continue
            result = future.result()
            out.done.extend(result["done"])
            out.failed.extend(result["failed"])
            out.launches.extend(result["launches"])
            out.summaries.update(result.get("summaries", {}))
            if on_subject is not None:
                for key in result["done"]:
                    on_subject(key, True)
                for rec in result["failed"]:
                    on_subject(rec["key"], False)
        out.interrupted = cancelled and len(out.done) + len(out.failed) < len(runs)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        for name, lg in quiet.items():
            lg.setLevel(levels[name])
    out.seconds = time.perf_counter() - t0
    return out, described
