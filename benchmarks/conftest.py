"""Benchmark plumbing: a results table printed at the end of the session.

Every benchmark adds a row (problem size, backend, warm median, first-call time,
voxel-fits/s, ratio to the baseline measured in the same run).  With
``ASLCAL_BENCH_RECORD=path.json`` the rows are also written, with hardware and library
versions, for ``benchmarks/results/`` (after every benchmark that adds one, and at the end).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform

import pytest

ROWS: list[dict] = []
COHORT_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def bench_rows() -> list[dict]:
    return ROWS


@pytest.fixture(scope="session")
def cohort_rows() -> list[dict]:
    return COHORT_ROWS


@pytest.fixture(scope="session")
def full_run(pytestconfig) -> bool:
    """True with ``--benchmark-enable``: the full size sweep; else one small smoke size."""
    return bool(pytestconfig.getoption("benchmark_enable", default=False))


def pytest_generate_tests(metafunc):
    """``n_vox``: one smoke size normally; 1e3..1e7 with --benchmark-enable (1e7: GPU only)."""
    if "n_vox" in metafunc.fixturenames:
        full = bool(metafunc.config.getoption("benchmark_enable", default=False))
        sizes = [1_000, 10_000, 100_000, 1_000_000, 10_000_000] if full else [10_000]
        metafunc.parametrize("n_vox", sizes, ids=[f"{n:.0e}".replace("+0", "") for n in sizes])


def provenance() -> dict:
    from aslcal.cli.info import report

    rep = report()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "numba_threads": _numba_threads(),
        "python": rep["python"],
        "packages": rep["packages"],
        "gpus": rep["gpus"],
        "platform": rep["platform"],
    }


def _numba_threads() -> int | None:
    try:
        import numba

        return numba.get_num_threads()
    except Exception:  # pragma: no cover
        return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS and not COHORT_ROWS:
        return
    tr = terminalreporter
    tr.section("aslcal benchmarks")
    if ROWS:
        head = f"{'problem':<28}{'n_vox':>10}{'n_obs':>6} {'backend':<14}{'warm s':>10}{'first s':>9}{'fits/s':>13}{'x baseline':>11}"
        tr.write_line(head)
    for r in ROWS:
        ratio = r.get("ratio_to_baseline")
        tr.write_line(
            f"{r['problem']:<28}{r['n_vox']:>10}{r['n_obs']:>6} {r['backend']:<14}{r['warm_s']:>10.4f}"
            f"{r.get('first_call_s', float('nan')):>9.3f}{r['fits_per_s']:>13.4g}"
            f"{(f'{ratio:.0f}x' if ratio else '-'):>11}"
        )
    if COHORT_ROWS:
        tr.write_line(f"{'cohort':<56}{'backend':<8}{'wk':>3}{'runner s':>10}{'floor s':>10}"
                      f"{'x floor':>9}{'cpu bound':>10}{'fit s':>8}{'subj/s':>9}{'voxels':>10}{'launches':>9}  gzip")
    for r in COHORT_ROWS:
        tr.write_line(
            f"{r['problem']:<56}{str(r['backend']):<8}{r['workers']:>3}{r['runner_median_s']:>10.3f}"
            f"{r['floor_median_s']:>10.3f}{r['ratio_to_floor']:>9.3f}{r['cpu_bound_ratio']:>10.3f}"
            f"{r['fit_median_s']:>8.3f}"
            f"{r['subjects_per_s']:>9.2f}{r['fitted_voxels']:>10}{r['fit_launches']:>9}  {r['gzip']}"
        )
    path = save_record()
    if path:
        tr.write_line(f"recorded to {path}")


def save_record() -> str | None:
    """Write every row so far to ``$ASLCAL_BENCH_RECORD`` (if set); return its path."""
    from aslcal.io.atomic import write_json

    path = os.environ.get("ASLCAL_BENCH_RECORD")
    if path:
        write_json(path, {"provenance": provenance(), "rows": ROWS, "cohort": COHORT_ROWS})
    return path


@pytest.fixture(autouse=True)
def _record_as_you_go():
    """Rewrite the record after every benchmark that added a row, so that a run stopped
    by a time limit (a lent GPU's, say) still leaves the rows it measured."""
    n = len(ROWS) + len(COHORT_ROWS)
    yield
    if len(ROWS) + len(COHORT_ROWS) != n:
        save_record()
