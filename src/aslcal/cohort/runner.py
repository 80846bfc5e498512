"""A whole cohort run: discover, shard, plan (resume), execute, summarise.

:func:`run_cohort` is what ``aslcal cohort`` calls.  Its steps:

1. :func:`aslcal.io.bids.discover` the ASL runs (``participant_label`` filters);
2. keep this job-array shard (:func:`aslcal.cohort.shard`, ``--shard I/N``);
3. :func:`aslcal.cohort.plan_run`: with ``resume``, complete subjects are skipped and
   partial ones cleaned and redone; earlier failure records of the subjects about to be
   redone are dropped;
4. execute: in this process (:func:`aslcal.cohort.pipeline.run_subjects`) or on a Dask
   cluster (:func:`aslcal.cohort.distributed.run_dask`), batches of subjects as the unit;
5. rebuild the run-level ``summary.tsv`` from the summaries this run wrote, every other
   complete subject's summary JSON and every failure log in the folder (so shards and
   resumed runs add up).

Files of the run, besides the subjects' ``perf/`` folders::

    OUT_ROOT/derivatives/aslcal/
        dataset_description.json
        summary.tsv                          one row per subject: status, M0a, T1, CBF
        logs/failures[_shard-I-of-N].jsonl   failed subjects: key, stage, message, file/field
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.atomic import write_text
from ..io.bids import AslRun, dataset_path, discover
from ..io.derivatives import DerivativesWriter, entities_from_key, write_summary_tsv
from .pipeline import DEFAULT_BATCH_SIZE, BatchOutcome, run_subjects
from .state import (
    RUN_OPTIONS_FILE, FailureLog, FailureRecord, changed_inputs, check_run_options, folder_lock, parse_shard, plan_run, shard,
    summary_lock,
)
from .subject import CohortOptions, anat_paths

log = logging.getLogger("aslcal")

__all__ = ["CohortReport", "run_cohort", "rebuild_summary"]

SUMMARY_NAME = "summary.tsv"
LOG_FOLDER = "logs"


@dataclass
class CohortReport:
    """The outcome of :func:`run_cohort`.

    Attributes
    ----------
    n_discovered : int
        ASL runs found (after ``participant_label``).
    selected : list of str
        Keys of this shard.
    skipped : list of str
        Complete subjects skipped by ``resume``.
    redo : list of str
        Partial subjects cleaned and redone.
    done : list of str
        Subjects written in this run.
    failed : list of dict
        Failure records of this run.
    rejected : list of (str, str)
        ``*_asl`` files whose names are not BIDS ASL names (path, reason): no run, no
        output, but the exit code says so.
    interrupted : bool
    seconds : float
    executor : str
        ``local`` or the Dask scheduler address.
    gzip : str
        The gzip paths used, e.g. ``isal read, zlib write``.
    summary_tsv, failure_log : pathlib.Path
    launches : list of dict
        Fit launches (subjects packed per launch).
    """

    n_discovered: int
    selected: list[str]
    skipped: list[str]
    redo: list[str]
    done: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    executor: str = "local"
    gzip: str = "zlib read, zlib write"
    summary_tsv: Path | None = None
    failure_log: Path | None = None
    launches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """130: interrupted (the run is unfinished: rerun with ``--resume``, whatever failed);
        else 1: some subject failed or some file was rejected; 0: every subject done."""
        if self.interrupted:
            return 130
        return 1 if self.failed or self.rejected else 0


def run_cohort(
    bids_root: str | Path,
    out_root: str | Path,
    *,
    options: CohortOptions | None = None,
    participant_label: str | Sequence[str] | None = None,
    workers: int = 2,
    resume: bool = False,
    shard_spec: str | None = None,
    dask: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_bytes: int | None = None,
    on_start: Callable[[int], None] | None = None,
    on_subject: Callable[[str, bool], None] | None = None,
    stop: threading.Event | None = None,
) -> CohortReport:
    """Calibrate every ASL run of a BIDS dataset into ``out_root/derivatives/aslcal``.

    Parameters
    ----------
    bids_root : path
        The BIDS dataset.
    out_root : path
        Folder that contains (or will contain) ``derivatives/``.
    options : CohortOptions, optional
        Calibration options (defaults: voxelwise M0 without reference masks).
    participant_label : str or list of str, optional
        Only these subjects (with or without ``sub-``).
    workers : int
        Reader and writer threads per process; with ``dask="local"`` the number of
        Dask worker processes.
    resume : bool
        Skip complete subjects, redo partial and failed ones.  Without it, existing
        outputs of a selected subject are an error (before any work).
    shard_spec : str, optional
        ``"I/N"``: only the subjects of job-array task I of N.
    dask : str, optional
        ``"local"`` (a LocalCluster, or LocalCUDACluster when GPUs are present) or a
        scheduler address; None runs in this process.
    batch_size : int
        Most subjects per fit launch (adaptive: fewer when the fit thread is free and the
        next subject cannot be taken yet), and subjects per Dask task.
    max_batch_bytes : int, optional
        Memory (bytes of prepared arrays) the batches being gathered and fitted may hold
        together, and again the subjects read ahead; default an eighth of the available memory, at most 2 GiB
        (:func:`aslcal.cohort.pipeline.auto_max_batch_bytes`), shared by the worker
        processes of a local Dask cluster; on an existing cluster each task takes its
        worker's own default unless this is given.
    on_start : callable(n_todo), optional
        Called once with the number of subjects to process (progress bars).
    on_subject : callable(key, ok), optional
        Called when a subject is written (ok) or has failed.
    stop : threading.Event, optional
        Set it to stop after the current batch(es).

    Returns
    -------
    CohortReport

    Raises
    ------
    InputError
        No dataset, no runs, a bad shard, existing outputs without ``resume``, or
        calibration options other than those the output folder was made with
        (:func:`~aslcal.cohort.state.check_run_options`).
    BackendUnavailableError
        ``options.backend`` cannot run on this machine (checked before any work, unless
        the subjects run on an existing Dask cluster, whose workers may differ).
    """
    from ..io.nifti import gzip_backends

    t0 = time.perf_counter()
    options = options or CohortOptions()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers={workers!r}: expected an integer >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if max_batch_bytes is not None and (isinstance(max_batch_bytes, bool) or not isinstance(max_batch_bytes, int)
                                        or max_batch_bytes < 1):
        raise InputError(f"max_batch_bytes={max_batch_bytes!r}: expected a number of bytes >= 1")
    if shard_spec is not None:
        parse_shard(shard_spec)
    if dask in (None, "local"):
        from ..backend import resolve_backend
        from ..config import get_config

        # an explicit backend (the option, else $ASLCAL_BACKEND) that cannot run here:
        # refuse now, before any work
        explicit = options.backend if options.backend is not None else get_config()["backend"]
        if explicit != "auto":
            resolve_backend(explicit)
    # Folders named relative to here are made absolute: the same run from another working
    # directory (a shard, --resume, a Dask worker) must find them and record the same bytes.
    options = dataclasses.replace(options, **{
        name: str(Path(value).resolve()) for name in ("ref_masks", "anat")
        if (value := getattr(options, name)) is not None})
    # Absolute paths (symbolic links kept as given): Dask workers run elsewhere (another
    # working directory, another machine), and the messages recorded in the failure logs
    # and summary.tsv must read the same whichever executor or working directory ran them.
    bids_root, out_root = Path(os.path.abspath(bids_root)), Path(os.path.abspath(out_root))
    if dask is not None:
        from .distributed import require_distributed

        require_distributed()  # before any output exists
    rejected: list[tuple[Path, str]] = []
    runs = discover(bids_root, participant_label=participant_label, rejected=rejected)
    for path, reason in rejected:
        log.warning("%s: not a usable BIDS ASL file (%s): skipped", path, reason)
    by_key = {r.key: r for r in runs}
    keys = [r.key for r in runs]
    selected = shard(keys, shard_spec) if shard_spec else sorted(keys)
    uri = bids_root.resolve().as_uri()
    writer = DerivativesWriter(out_root, source_datasets=[{"URL": uri}], dataset_links={"raw": uri})
    logs = writer.root / LOG_FOLDER
    logs.mkdir(exist_ok=True)
    with _holding(folder_lock(logs, shard_spec)), _options_record(logs, options, writer):
        if shard_spec is None:
            # the folder is this run's alone (exclusive lock): a killed run's temporary
            # files of the run-level records (summary table, logs) go
            _remove_run_level_temps(writer.root, logs)
        def stale(key: str) -> str | None:
            # with --anat, the T1w and transform the lookup picks now (one added since)
            # a lookup that fails now (two transforms, two aslcontext files or sidecars
            # that apply at one level, ...): redone, and the subject fails on its own
            try:
                now = [p for p in anat_paths(options.anat, by_key[key]) if p is not None] if options.anat else []
                return changed_inputs(writer.subject_paths(key)["provenance"], bids_root, by_key[key], now,
                                      applicable_under=options.anat)
            except InputError as exc:
                return str(exc)

        plan = plan_run(selected, writer, resume=resume, stale=stale)
        for key, reason in plan.changed:
            log.warning("%s: its inputs changed since it was done (%s): redone", key, reason)
        _record_rejected(logs, bids_root, rejected)
        failure_log = FailureLog.for_shard(logs, shard_spec)
        if plan.todo or plan.failed:
            # the subjects about to be (re)done have no failure until they fail again: their
            # old records go from every log of the folder (an earlier unsharded run's, another
            # split's), with or without --resume; concurrent shards' logs hold other subjects
            for path in sorted(logs.glob("failures*.jsonl")):
                FailureLog(path).discard(plan.todo + [k for k, _ in plan.failed])
        planned_failures = []
        for key, why in plan.failed:
            log.warning("%s: %s", key, why)
            planned_failures.append(failure_log.record(key, "resume", why).to_json())
        todo: list[AslRun] = [by_key[k] for k in plan.todo]
        if todo and options.quantification == "calibration":
            log.warning("--quantification calibration: each desc-cbf map is 6000 * dM / (M0a * alpha) of the "
                        "control-label difference as acquired, without a kinetic model (asl_calib's -i/-o on "
                        "raw data): 1.5-2.2 times below the white-paper CBF, depending on the protocol (PLD, labelling, field).  Pass "
                        "--quantification whitepaper for single-PLD CBF")

        report = CohortReport(
            n_discovered=len(runs), selected=selected, skipped=plan.skipped, redo=plan.redo,
            gzip=gzip_backends(), failure_log=failure_log.path,
            executor="local" if dask is None else dask, rejected=[(str(p), why) for p, why in rejected],
        )
        if on_start is not None:
            on_start(len(todo))
        if not todo:
            outcome = BatchOutcome()
        elif dask is None:
            outcome = run_subjects(
                todo, writer, options, failure_log=failure_log, workers=workers, batch_size=batch_size,
                max_batch_bytes=max_batch_bytes, bids_root=bids_root, on_subject=on_subject, stop=stop,
            )
        else:
            from .distributed import run_dask

            outcome, report.executor = run_dask(
                todo, writer, options, failure_log=failure_log, scheduler=dask, workers=workers,
                batch_size=batch_size, max_batch_bytes=max_batch_bytes, bids_root=bids_root,
                on_subject=on_subject, stop=stop,
            )
        report.done = sorted(outcome.done)
        report.failed = sorted(outcome.failed + planned_failures, key=lambda r: r["key"])
        failure_log.sort()  # the same bytes whichever worker finished first
        report.interrupted = outcome.interrupted
        report.launches = outcome.launches
        # summary.tsv covers the whole dataset: a run on some participants keeps the others' rows
        every_key = keys if participant_label is None else [r.key for r in discover(bids_root, rejected=[])]
        with summary_lock(logs):  # concurrent shards: the last to write read last
            report.summary_tsv = rebuild_summary(writer, every_key, known=outcome.summaries)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _holding(release: Callable[[], None]):
    """Run the block, then ``release`` (the folder lock), however the block ends."""
    try:
        yield
    finally:
        release()


@contextlib.contextmanager
def _options_record(logs: Path, options: CohortOptions, writer: DerivativesWriter):
    """Check (or make) the run-options record for the block.  A run that fails before
    writing any subject does not bind the folder to its options (e.g. an unreachable
    scheduler): the record it made goes with it."""
    existed = (logs / RUN_OPTIONS_FILE).exists()
    record = check_run_options(logs, options)
    try:
        yield
    except BaseException:
        if not existed and not any(writer.root.glob("sub-*")):
            record.unlink(missing_ok=True)
        raise


#: The *_asl files of the dataset that are no runs, with the reason (rewritten by every run).
REJECTED_FILE = "rejected.tsv"


def _remove_run_level_temps(*folders: Path) -> None:
    from ..io.atomic import _TEMP_MARKER

    for folder in folders:
        for path in folder.iterdir():
            if path.name.startswith(".") and _TEMP_MARKER in path.name and path.is_file():
                path.unlink(missing_ok=True)


def _record_rejected(logs: Path, bids_root: Path, rejected: Sequence[tuple[Path, str]]) -> None:
    """``logs/rejected.tsv`` (path in the dataset, reason) of the files discovery could not
    use, so that a finished run still says what it left out; removed when there are none."""
    path = logs / REJECTED_FILE
    if not rejected:
        path.unlink(missing_ok=True)
        return

    rows = sorted((dataset_path(p, bids_root), " ".join(why.split())) for p, why in rejected)
    write_text(path, "path\treason\n" + "".join(f"{p}\t{why}\n" for p, why in rows), overwrite=True)


def _latest_failures(log_folder: Path) -> dict[str, FailureRecord]:
    latest: dict[str, FailureRecord] = {}
    for path in sorted(log_folder.glob("failures*.jsonl")):
        for rec in FailureLog(path).load():
            latest[rec.key] = rec
    return latest


def rebuild_summary(writer: DerivativesWriter, keys: Sequence[str],
                    known: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``summary.tsv``: a row per complete or failed subject among ``keys``.

    Complete subjects (marker present and sizes matching) contribute their summary JSON;
    failed ones (any failure log of the folder) their stage and message.  Subjects never
    run (other shards still running, an interrupted run) have no row yet.  ``known``
    gives the summary values (as their JSON holds them) of subjects this process has
    just written and marked complete: they are used as they are, not read back.
    """
    failures = _latest_failures(writer.root / LOG_FOLDER)
    known = known or {}
    rows = []
    for key in keys:
        ent = entities_from_key(key)
        base = {"participant_id": ent["sub"], "session": ent.get("ses"), "run": ent.get("run")}
        extra = {k: ent[k] for k in ("acq", "rec", "dir") if k in ent}
        values = known.get(key)
        if values is None and writer.is_complete(key, check="size"):
            try:
                values = json.loads(writer.subject_paths(key)["summary"].read_text(encoding="utf-8"))
            except (OSError, ValueError):
                values = {}
        if values is not None:
            rows.append({**base, **extra, "status": "ok", **{k: v for k, v in values.items()
                                                           if not isinstance(v, dict | list)}})
        elif key in failures:
            rec = failures[key]
            rows.append({**base, **extra, "status": "failed", "stage": rec.stage, "message": rec.message})
    return write_summary_tsv(rows, writer.root / SUMMARY_NAME)
