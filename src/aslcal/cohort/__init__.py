"""Many subjects: a BIDS cohort at the speed of the disk, resumable, local or on Dask.

Public API
----------
run_cohort, CohortReport
    Discover, shard, plan (resume), execute, summarise a whole cohort (``aslcal cohort``).
CohortOptions
    The calibration options of a cohort run.
run_subjects, BatchOutcome
    The pipeline of one worker: read-ahead threads, a fit thread (one launch per batch and design), writer threads.
load_subject, finish_subject, SubjectError, STAGES
    One subject's stages (reader stage; calibration after the packed fit).
fit_packed
    The fit jobs of many subjects, one launch per design.
run_dask
    The same pipeline with a batch of subjects per Dask task.
shard, parse_shard
    Deterministic ``I/N`` split of subject keys for job arrays.
FailureLog, FailureRecord
    Failed subjects (key, stage, message) in a JSON Lines file.
RunPlan, plan_run
    Which subjects a run does: skip complete ones, clean and redo partial ones.
"""

from __future__ import annotations

from .packing import fit_packed
from .pipeline import BatchOutcome, run_subjects
from .runner import CohortReport, rebuild_summary, run_cohort
from .state import FailureLog, FailureRecord, RunPlan, parse_shard, plan_run, shard
from .subject import STAGES, CohortOptions, SubjectError, finish_subject, load_subject


def run_dask(*args, **kwargs):
    """See :func:`aslcal.cohort.distributed.run_dask` (imports dask only when called)."""
    from .distributed import run_dask as _run_dask

    return _run_dask(*args, **kwargs)


__all__ = [
    "STAGES", "BatchOutcome", "CohortOptions", "CohortReport", "FailureLog", "FailureRecord", "RunPlan",
    "SubjectError", "finish_subject", "fit_packed", "load_subject", "parse_shard", "plan_run",
    "rebuild_summary", "run_cohort", "run_dask", "run_subjects", "shard",
]
