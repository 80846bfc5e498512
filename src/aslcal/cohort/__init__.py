"""Many subjects: run bookkeeping (shards, failure records, resume plans).

Public API
----------
shard, parse_shard
    Deterministic ``I/N`` split of subject keys for job arrays.
FailureLog, FailureRecord
    Failed subjects (key, stage, message) in a JSON Lines file.
RunPlan, plan_run
    Which subjects a run does: skip complete ones, clean and redo partial ones.
"""

from __future__ import annotations

from .state import FailureLog, FailureRecord, RunPlan, parse_shard, plan_run, shard

__all__ = ["FailureLog", "FailureRecord", "RunPlan", "parse_shard", "plan_run", "shard"]
