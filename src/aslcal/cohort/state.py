"""Run bookkeeping for a cohort: job-array shards, failure records, resume plans.

Nothing here computes; it decides *which* subjects a run does and remembers which ones
failed.  Subjects are identified by their key (``"sub-01_ses-1_run-1"``, see
:func:`aslcal.io.derivatives.subject_key`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from ..io.atomic import StrPath, json_text, naming_errors, write_json, write_text
from ..io.bids import AslRun, dataset_path, input_checksum, run_sidecars
from ..io.derivatives import DerivativesWriter, subject_key

__all__ = [
    "RUN_OPTIONS_FILE", "FailureLog", "FailureRecord", "RunPlan", "check_run_options", "folder_lock", "parse_shard",
    "plan_run", "shard", "summary_lock",
]

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (1 <= I <= N) into ``(I, N)``; anything else is an :class:`InputError`."""
    match = _SHARD_RE.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise InputError(f"--shard {spec!r}: expected I/N with whole numbers, e.g. 1/4")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= i <= n:
        raise InputError(f"--shard {spec!r}: expected 1 <= I <= N and N >= 1, e.g. 1/4")
    return i, n


def _stable_bucket(key: str, n: int) -> int:
    """0-based bucket of ``key``: SHA-256 of its UTF-8 bytes, first 8 bytes, modulo ``n``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def shard(items: Iterable[str], spec: str, *, method: Literal["hash", "index"] = "hash") -> list[str]:
    """The items of shard ``I`` of ``N`` (``spec = "I/N"``), sorted, duplicates dropped.

    Parameters
    ----------
    items : iterable of str
        Subject keys.
    spec : str
        ``"I/N"`` with 1 <= I <= N.
    method : {"hash", "index"}, optional
        ``"hash"`` (default): a key goes to shard ``sha256(key) mod N + 1``.  A key's
        shard depends on the key alone, never on the other keys nor on the process
        (Python's ``hash`` is salted per process and is not used), so job-array tasks
        agree even if they see slightly different key lists.  Shard sizes are balanced
        only on average.  ``"index"``: the sorted unique keys are dealt round-robin
        (sizes differ by at most 1); every task must see the same key list.

    Returns
    -------
    list of str
        Sorted.  Shards 1..N are disjoint and together hold every item once.
    """
    i, n = parse_shard(spec)
    if isinstance(items, str):
        raise InputError("shard(items, ...): expected a list of keys, got one string")
    unique = sorted(set(items))
    for item in unique:
        if not isinstance(item, str):
            raise InputError(f"shard: keys must be strings, got {item!r}")
    if method == "hash":
        return [k for k in unique if _stable_bucket(k, n) == i - 1]
    if method == "index":
        return [k for j, k in enumerate(unique) if j % n == i - 1]
    raise InputError(f"shard method {method!r}: expected 'hash' or 'index'")


# --------------------------------------------------------------------------- failures


@dataclass(frozen=True)
class FailureRecord:
    """One failed subject: its key, the stage that failed and the message."""

    key: str
    stage: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "stage": self.stage, "message": self.message}
        if self.details:
            out["details"] = dict(self.details)
        return out


class FailureLog:
    """Failed subjects of a run, one JSON object per line (JSON Lines).

    :meth:`record` appends one complete line with a single ``write`` on a file opened
    for appending, then flushes it to disk: a reader sees whole records, and a line cut
    by a killed process (no final newline) is ignored when loading.  Shards of a job
    array should use one file each (:meth:`for_shard`).

    Parameters
    ----------
    path : str or os.PathLike
        The log file (conventionally ``*.jsonl``); its folder must exist.
    """

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)

    @classmethod
    def for_shard(cls, folder: StrPath, spec: str | None = None, *, stem: str = "failures") -> "FailureLog":
        """``folder/failures.jsonl``, or ``folder/failures_shard-I-of-N.jsonl`` for a shard."""
        if spec is None:
            return cls(Path(folder) / f"{stem}.jsonl")
        i, n = parse_shard(spec)
        return cls(Path(folder) / f"{stem}_shard-{i}-of-{n}.jsonl")

    def record(self, key: str, stage: str, message: str, **details: Any) -> FailureRecord:
        """Append a failure; returns the record."""
        for name, value in (("key", key), ("stage", stage), ("message", message)):
            if not isinstance(value, str) or not value:
                raise InputError(f"FailureLog.record: {name} must be a non-empty str, got {value!r}")
        rec = FailureRecord(key, stage, message, dict(details))
        try:
            line = json.dumps(rec.to_json(), sort_keys=False, allow_nan=False, default=str)
        except ValueError as exc:
            raise InputError(f"FailureLog.record: details cannot be written to JSON ({exc})") from None
        if not self.path.parent.is_dir():
            raise InputError(f"failure log {str(self.path)!r}: folder does not exist")
        data = (line + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            # A previous writer killed mid-line left no newline: start on a fresh line.
            if os.fstat(fd).st_size and not self._ends_with_newline():
                data = b"\n" + data
            with naming_errors(self.path):  # a full disk: say which file could not take the record
                os.write(fd, data)
                os.fsync(fd)
        finally:
            os.close(fd)
        return rec

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def load(self) -> list[FailureRecord]:
        """All complete records, in the order written (none if the file does not exist)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = raw.split(b"\n")
        out: list[FailureRecord] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                # A line cut short by a killed writer (the last line, or one a later
                # writer closed with a newline): not a record.
                continue
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("key", "stage", "message")):
                raise InputError(f"failure log {str(self.path)!r}, line {number}: not a failure record")
            out.append(FailureRecord(obj["key"], obj["stage"], obj["message"], obj.get("details") or {}))
        return out

    def failed_keys(self) -> list[str]:
        """Keys with at least one record, sorted."""
        return sorted({r.key for r in self.load()})

    def sort(self) -> None:
        """Rewrite the log in key order (each key's records in the order written), atomically;
        parallel workers append in the order they finish, which varies from run to run."""
        records = self.load()
        ordered = sorted(records, key=lambda r: r.key)  # stable
        if ordered != records:
            self._rewrite(ordered)

    def discard(self, keys: Iterable[str]) -> int:
        """Drop the records of ``keys`` (e.g. subjects about to be redone); atomic rewrite.

        Returns the number of records dropped.
        """
        drop = set(keys)
        records = self.load()
        keep = [r for r in records if r.key not in drop]
        if len(keep) != len(records):
            self._rewrite(keep)
        return len(records) - len(keep)

    def _rewrite(self, records: Sequence[FailureRecord]) -> None:
        """Replace the log with ``records`` (one atomic write)."""
        write_text(self.path, "".join(json.dumps(r.to_json(), default=str) + "\n" for r in records),
                   overwrite=True)


# --------------------------------------------------------------------------- plans


@dataclass
class RunPlan:
    """What a run will do.

    Attributes
    ----------
    todo : list of str
        Keys to process, in input order (new subjects and partial ones to redo).
    skipped : list of str
        Complete subjects skipped by ``resume``.
    redo : list of str
        The partial subjects among ``todo`` (their leftovers were removed).
    removed : list of pathlib.Path
        Files of partial subjects deleted while planning.
    changed : list of (str, str)
        Complete subjects whose inputs changed since they were done, with the reason:
        their outputs were removed and they are among ``todo`` and ``redo``.
    failed : list of (str, str)
        Subjects whose earlier outputs could not be removed (a file the run may not
        delete), with the reason: not in ``todo``; the run records them as failed (stage
        ``resume``) and does the others.
    """

    todo: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    redo: list[str] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def changed_inputs(provenance: StrPath, bids_root: StrPath, run: AslRun | None = None,
                   applicable: Sequence[StrPath] = (), applicable_under: StrPath | None = None) -> str | None:
    """Why a complete subject's recorded inputs no longer match the dataset, or None.

    The provenance records every input's size and checksum (the CRC-32 of an image's
    NIfTI bytes, the SHA-256 of a sidecar, aslcontext or transform): a file that is gone,
    has another size or other content is a change.  With ``run`` (the run as discovered
    now), a sidecar that applies to it but was not read then (an ``asl.json`` added at
    the root, say) or a second image beside its ASL or m0scan image is one too.  Paths
    are relative to ``bids_root`` (absolute ones outside it).  ``applicable``: files the
    run would read now besides those (the ``--anat`` T1w and ASL->T1w matrix the lookup
    picks today); one that was not read then is a change too, when the run read any file
    under ``applicable_under`` (the anatomy folder: a run with an ``M0Estimate`` reads
    none).  A provenance without such a record (or unreadable) is no evidence of change.
    """
    try:
        inputs = json.loads(Path(provenance).read_text(encoding="utf-8"))["inputs"]
        sizes, checksums = dict(inputs["files"]), dict(inputs.get("checksums") or {})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    root = Path(bids_root)
    for rel, size in sizes.items():
        path = root / rel  # an absolute rel stays itself
        try:
            now = path.stat().st_size
        except OSError:
            return f"{rel} is gone"
        if now != size:
            return f"{rel} changed ({size} -> {now} bytes)"
        if rel in checksums and input_checksum(path) != checksums[rel]:
            return f"{rel} changed"
    if run is not None:
        # the m0scan read then (a Separate M0) against the one the run pairs with now (by
        # name, else by IntendedFor): another one, or a second one naming it, is a change
        read_m0 = [rel for rel in sizes if rel.endswith(("_m0scan.nii", "_m0scan.nii.gz"))]
        if read_m0:
            now_m0 = None if run.m0scan is None else dataset_path(run.m0scan, root)
            if now_m0 not in read_m0:
                return f"its m0scan is now {now_m0 or 'none'} (it read {read_m0[0]})"
            if run.m0scan_others:
                return (f"{dataset_path(run.m0scan_others[0], root)} names it in IntendedFor too "
                        f"(besides {now_m0})")
        asl_sidecars, m0_sidecars = run_sidecars(run)
        m0_read = bool(read_m0)  # and then it is the run's m0scan now (checked above)
        for path in asl_sidecars + (m0_sidecars if m0_read else []):
            rel = dataset_path(path, root)
            if rel not in sizes:
                return f"{rel} applies to it now (BIDS inheritance)"
        for second in (run.duplicate, run.m0scan_duplicate if m0_read else None):
            if second is not None:
                return f"{dataset_path(second, root)} is a second image beside the one read"
    if applicable and applicable_under is not None:
        under = dataset_path(Path(applicable_under), root).rstrip("/") + "/"
        if not any(rel.startswith(under) for rel in sizes):
            applicable = ()  # this run read no anatomy
    for path in applicable:
        rel = dataset_path(Path(path), root)
        if rel not in sizes:
            return f"{rel} applies to it now"
    return None


def plan_run(
    keys: Sequence[str | Mapping[str, Any]],
    writer: DerivativesWriter,
    *,
    resume: bool,
    check: Literal["sha256", "size"] = "sha256",
    stale: Callable[[str], str | None] | None = None,
) -> RunPlan:
    """Decide which subjects to process; remove partial leftovers when resuming.

    Parameters
    ----------
    keys : sequence of str or entity mappings
        The subjects of this run (already filtered and sharded).
    writer : DerivativesWriter
        Where the outputs go.
    resume : bool
        True: complete subjects (:meth:`DerivativesWriter.is_complete`) are skipped,
        partial ones are cleaned (:meth:`DerivativesWriter.remove_partial`) and redone,
        absent ones are done.  False: every subject is done; if the writer does not
        overwrite, subjects that already have files are an error raised here, before
        any computation (the message lists them).
    check : {"sha256", "size"}, optional
        How completeness is verified (see :meth:`DerivativesWriter.is_complete`).
    stale : callable, optional
        ``stale(key)``: why a complete subject's inputs changed since it was done
        (e.g. :func:`changed_inputs`), or None.  A changed subject's outputs are removed
        and it is redone (``changed``).

    Raises
    ------
    InputError
        A bad or duplicated key; or existing outputs with ``resume=False`` and
        ``writer.overwrite=False``.
    """
    canonical = [subject_key(k) for k in keys]
    seen: set[str] = set()
    for key in canonical:
        if key in seen:
            raise InputError(f"subject {key} is listed twice")
        seen.add(key)
    plan = RunPlan()
    if not resume:
        if not writer.overwrite:
            present = [k for k in canonical if writer.subject_files(k)]
            if present:
                shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
                raise InputError(
                    f"{len(present)} subject(s) already have outputs in {str(writer.root)!r} "
                    f"({shown}); use --resume (resume=True) to finish them, or another output folder"
                )
        plan.todo = list(canonical)
        return plan
    for key in canonical:
        state = writer.status(key, check=check)
        reason = stale(key) if (state == "complete" and stale is not None) else None
        if state == "complete" and reason is None:
            plan.skipped.append(key)
            continue
        try:
            if reason is not None:
                plan.removed.extend(writer.remove_subject(key))
            elif state == "partial":
                plan.removed.extend(writer.remove_partial(key))
        except OSError as exc:
            # this subject's old files stay (a file this run may not delete: permissions,
            # an immutable file, a read-only export): it fails alone, the others go on
            what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            plan.failed.append((key, f"cannot remove its earlier outputs before redoing it ({what})"))
            continue
        if reason is not None:
            plan.changed.append((key, reason))
        if reason is not None or state == "partial":
            plan.redo.append(key)
        plan.todo.append(key)
    return plan


# --------------------------------------------------------------------------- run options

#: The calibration options of the first run into an output folder (in its ``logs/``).
RUN_OPTIONS_FILE = "run_options.json"
#: Options that choose how subjects are computed, not what: a run may change them.
_EXECUTION_OPTIONS = ("backend", "dtype")
#: The command-line flag of each option, for messages.
_FLAGS = {
    "ref_masks": "--ref-masks", "anat": "--anat", "all_csf": "--csfmaskingoff", "pve_threshold": "--pve-threshold",
    "tissref": "--tissref", "t1r": "--t1r", "t2r": "--t2r", "t2b": "--t2b", "pc": "--pc", "t2star": "--t2star",
    "cgain": "--cgain", "taq": "--taq", "m0_scale": "--m0-scale", "priors": "--priors", "fix_a": "--fixa",
    "allow_control_m0": "--allow-control-m0", "voxel_pc": "--voxel-pc", "voxel_t1t": "--voxel-t1t",
    "edge_correction": "--no-edgecorr", "tissue_overrides": "--tissue-table", "m0_mode": "--ref-masks/--anat",
    "quantification": "--quantification", "bs_efficiency": "--bs-efficiency",
}


def _calibration_record(options: Any) -> dict[str, Any]:
    record = {k: v for k, v in options.as_dict().items() if k not in _EXECUTION_OPTIONS}
    for name in ("ref_masks", "anat"):
        if record.get(name) is not None:
            record[name] = str(Path(record[name]).resolve())
    return json.loads(json_text(record))  # as it reads back


def check_run_options(folder: StrPath, options: Any) -> Path:
    """Record the calibration options of the first run into ``folder``; refuse others later.

    Every subject of one output folder must be calibrated the same way: a ``--resume``
    or a job-array shard with other options would mix methods in one ``summary.tsv``
    without a trace.  The first run writes ``folder/run_options.json`` (exclusive
    creation, so concurrent shards agree on one record); every later run compares its
    options with it.  The fitting backend and dtype may change between runs.

    Parameters
    ----------
    folder : path
        The run's log folder (it must exist).
    options : CohortOptions

    Returns
    -------
    pathlib.Path
        The record.

    Raises
    ------
    InputError
        The options differ from the record (the message lists each difference), or the
        record is unreadable.
    """
    path = Path(folder) / RUN_OPTIONS_FILE
    record = _calibration_record(options)
    if not path.exists():
        try:
            write_json(path, record, overwrite=False)
            return path
        except InputError:
            if not path.exists():  # not a concurrent first run: a real write error
                raise
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{str(path)!r}: unreadable record of the calibration options ({exc}); "
                         "restore it or use another output folder") from None
    if not isinstance(saved, dict):
        raise InputError(f"{str(path)!r}: expected a JSON object of calibration options")
    # An option added since the record was written was at its default then.
    defaults = _calibration_record(type(options)())
    diffs = [
        f"{name} ({_FLAGS.get(name, name)}): {record.get(name)!r} now, {saved.get(name, defaults.get(name))!r} before"
        for name in sorted(set(record) | set(saved)) if record.get(name) != saved.get(name, defaults.get(name))
    ]
    if diffs:
        raise InputError(
            f"this output folder was calibrated with other options ({str(path)!r}): " + "; ".join(diffs)
            + ".  One folder holds one calibration: rerun with the same options, or use another output "
            "folder (if the folder holds no subject yet, delete that file)"
        )
    return path


# --------------------------------------------------------------------------- concurrent runs

#: Lock file of an output folder (in its ``logs/``).
LOCK_FILE = "run.lock"


def folder_lock(folder: StrPath, shard_spec: str | None):
    """Hold the output folder against concurrent runs that would do the same subjects.

    A run of the whole dataset takes the folder exclusively; a shard takes it shared
    (shards of one job array run side by side) and its own shard exclusively.  So two
    unsharded runs, or a shard twice, or an unsharded run beside shards, are refused up
    front instead of both doing (and failing on) the same subjects.  The locks are
    ``flock`` locks on files in ``folder``: they end with the process, however it ends.
    Where ``flock`` is missing (not POSIX) nothing is locked.

    Returns
    -------
    callable
        Releases the locks.

    Raises
    ------
    InputError
        Another run holds a conflicting lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return lambda: None
    folder = Path(folder)
    handles = []

    def release() -> None:
        for handle in handles:
            try:
                fcntl.flock(handle, fcntl.LOCK_UN)
            finally:
                handle.close()
        handles.clear()

    wanted = [(folder / LOCK_FILE, fcntl.LOCK_EX if shard_spec is None else fcntl.LOCK_SH)]
    if shard_spec is not None:
        i, n = parse_shard(shard_spec)
        # shards of one split share their count's lock; a split into another count
        # would redo subjects of this one (a shard checks the other counts' locks below)
        wanted.append((folder / f"run_shards-of-{n}.lock", fcntl.LOCK_SH))
        wanted.append((folder / f"run_shard-{i}-of-{n}.lock", fcntl.LOCK_EX))
    for path, mode in wanted:
        handle = open(path, "a+b")  # noqa: SIM115 - held until release()
        handles.append(handle)
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except OSError:
            release()
            what = f"shard {shard_spec}" if shard_spec is not None and mode == fcntl.LOCK_EX else (
                "this dataset" if shard_spec is None else "this dataset unsharded")
            raise InputError(
                f"another aslcal cohort run is working on {what} in {str(folder.parent)!r}: wait for it to "
                "end (or stop it), then rerun with --resume"
            ) from None
    if shard_spec is not None:
        for other in sorted(folder.glob("run_shards-of-*.lock")):
            if other.name == f"run_shards-of-{n}.lock":
                continue
            with open(other, "a+b") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    release()
                    count = other.name.removeprefix("run_shards-of-").removesuffix(".lock")
                    raise InputError(
                        f"shards of another split (--shard I/{count}) are working in {str(folder.parent)!r}: "
                        f"a split into {n} would redo their subjects; use --shard I/{count}, or wait for "
                        "them to end, then rerun with --resume"
                    ) from None
                fcntl.flock(probe, fcntl.LOCK_UN)
    return release


#: The lock file the run-level ``summary.tsv`` is rebuilt under.
SUMMARY_LOCK_FILE = "summary.lock"


@contextlib.contextmanager
def summary_lock(folder: StrPath):
    """Hold ``folder/summary.lock`` exclusively (waiting for it) for the block.

    Shards of one job array end at different times, and each rebuilds ``summary.tsv``
    from every subject's state: read, then write.  Without a lock, a shard that read the
    state before another shard's last subjects were done could write its older table
    after the other's full one, and the last writer's rows would stand.  Under the lock,
    whichever rebuild writes last also read last.  A ``flock``: it ends with the process;
    where ``flock`` is missing (not POSIX) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(Path(folder) / SUMMARY_LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
