"""Cohort benchmark: ``aslcal cohort`` end to end against the I/O floor of the same run.

The floor (performance.md) is the time to only read every input of every subject and
write the same outputs, with the same libraries (aslcal.io on nibabel, the same gzip
path) and the same worker count, in the same process and run:

* readers: ``workers`` threads; each reads a subject's sidecars, aslcontext and images
  (``read_run``, ``load_asl``, ``load_m0``, the reference mask);
* writers: ``workers`` threads; each writes the subject's outputs with
  :meth:`DerivativesWriter.write_subject`, the very arrays and records the runner wrote
  (loaded beforehand, untimed), so compression and checksums cost the same; then the
  run's ``summary.tsv`` (``dataset_description.json`` is written by the writer's
  constructor, as in the runner).

Three phantom cohorts: noise-free float32; with Rician noise of grey-matter SNR 50 in
every ASL and M0 volume stored as int16, as scanners write them
(``make_bids_cohort(snr=50, image_dtype="int16")``); and the same with ASL series of 30
control/label pairs (a 2-D pCASL protocol of the white paper) instead of the phantom's 2-3.
The noise-free one is the worst case
for the ratio: its piecewise-constant images compress tens of times better than real
ones, so reading and writing them costs little next to the compute; the noisy one has
the gzip cost of real images (and the fits take the iterations noisy data take).

The runner and the floor alternate (floor, runner, floor, runner, ...) so that page-cache
and CPU-frequency drift hit both alike; the medians are compared.  Without
``--benchmark-enable`` a smoke size runs (CI); with it, 50 subjects of a 64x64x24 ASL
grid.  Each row also gives ``fit_median_s``, the wall time of the runner's fit calls,
and ``cpu_bound_ratio``: the runner's CPU time over (cores x the floor's wall time), the
lowest ratio any schedule could reach on this machine.  ``ASLCAL_BENCH_RECORD=path.json``
records the rows with provenance.  Environment variables (comma-separated lists give a
row per value, on the same generated cohorts):

* ``ASLCAL_BENCH_COHORT_BACKEND``: fit backend(s) of the runner, e.g. ``cuda`` or
  ``cuda,numba`` (default: the configuration's, numba without a GPU); the no-fit subset
  has no fit and runs once, with the default;
* ``ASLCAL_BENCH_COHORT_WORKERS``: worker count(s) of both runner and floor (default 2;
  4 was slower for both on the 2-core machine, ratios 1.29x / 1.55x);
* ``ASLCAL_BENCH_COHORT_NOISE``: which phantom cohorts (keys of :data:`NOISE`; default all);
* ``ASLCAL_BENCH_COHORT_ROUNDS``: alternating runner/floor rounds of the full run (default 5).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aslcal.cohort import CohortOptions, run_cohort
from aslcal.io import load_image
from aslcal.io.bids import discover, read_run
from aslcal.io.derivatives import IMAGE_OUTPUTS, DerivativesWriter, entities_from_key, write_summary_tsv
from aslcal.io.nifti import gzip_backends
from aslcal.testing.bids import make_bids_cohort



def _env_list(name: str, default: str) -> list[str]:
    return [v.strip() for v in (os.environ.get(name) or default).split(",") if v.strip()]


#: Worker counts (runner and floor alike), fit backends (None: the configuration's) and
#: rounds of the full run, from the environment (module docstring).
WORKER_COUNTS = [int(v) for v in _env_list("ASLCAL_BENCH_COHORT_WORKERS", "2")]
WORKERS = WORKER_COUNTS[0]
BACKENDS: list[str | None] = _env_list("ASLCAL_BENCH_COHORT_BACKEND", "") or [None]
ROUNDS = int(os.environ.get("ASLCAL_BENCH_COHORT_ROUNDS") or 5)


def _stored_outputs(out_root: Path, keys) -> dict:
    """The runner's outputs of every complete subject, as write_subject arguments."""
    writer = DerivativesWriter(out_root)
    stored = {}
    for key in keys:
        if not writer.is_complete(key, check="size"):
            continue
        paths = writer.subject_paths(key)
        images, records = {}, {}
        for name in IMAGE_OUTPUTS:
            if paths[name].exists():
                img = load_image(paths[name], ndim=3)
                images[name] = (img.data, img.affine)
                records[name] = json.loads(paths[f"{name}_json"].read_text())
        records["summary"] = json.loads(paths["summary"].read_text())
        stored[key] = (images, records, json.loads(paths["provenance"].read_text()))
    return stored


def io_floor(bids_root: Path, out_root: Path, stored: dict, ref_dir: Path, workers: int = WORKERS,
             participant_label=None) -> float:
    """Seconds to read every input and write the same outputs (module docstring)."""
    from aslcal.cohort.subject import ref_mask_path

    t0 = time.perf_counter()
    runs = discover(bids_root, participant_label=participant_label)
    writer = DerivativesWriter(out_root)

    def read(run):
        try:
            acq = read_run(run)
        except Exception:  # noqa: BLE001 - a broken subject costs its metadata read only
            return run.key, None
        acq.load_asl()
        if acq.m0.kind == "separate":
            acq.load_m0()
        mask = ref_mask_path(ref_dir, run)
        if mask is not None:
            load_image(mask)
        return run.key, acq

    with ThreadPoolExecutor(workers) as readers, ThreadPoolExecutor(workers) as writers:
        writes = []
        for key, acq in readers.map(read, runs):
            if key in stored:
                images, records, prov = stored[key]
                writes.append(writers.submit(writer.write_subject, key, images, records, prov))
        for w in writes:
            w.result()
    # The run-level table the runner writes too (from memory here; the runner re-reads
    # each subject's summary so that shards add up).
    rows = [{"participant_id": entities_from_key(k)["sub"], "status": "ok", **{
        n: v for n, v in stored[k][1]["summary"].items() if not isinstance(v, dict | list)}} for k in sorted(stored)]
    write_summary_tsv(rows, writer.root / "summary.tsv")
    return time.perf_counter() - t0


#: Subsets of the phantom cohort: every subject, or only those whose M0 needs no fit.
SUBSETS = {"all": None, "no-fit": ("separate", "included", "estimate")}


#: Phantom cohorts: noise-free float32, and int16 images with the grey-matter SNR of real
#: ASL M0 images, with the phantom's short ASL series (2-3 control/label pairs) or the 30
#: pairs of a 2-D pCASL protocol of the white paper: (snr, on-disk type, pairs or None).
NOISE = {
    "noise-free": (None, "float32", None),
    "snr50-int16": (50.0, "int16", None),
    "snr50-int16-30pairs": (50.0, "int16", 30),
}
_unknown = set(_env_list("ASLCAL_BENCH_COHORT_NOISE", ",".join(NOISE))) - set(NOISE)
if _unknown:
    raise ValueError(f"ASLCAL_BENCH_COHORT_NOISE: unknown cohort(s) {sorted(_unknown)}; expected some of {list(NOISE)}")


def make_cohort(tmp: Path, n_subjects: int, shape, snr: float | None = None, image_dtype: str = "float32",
                n_pairs: int | None = None):
    bids = tmp / "bids"
    t = time.perf_counter()
    truth = make_bids_cohort(bids, n_subjects=n_subjects, seed=5, shape=shape, broken=3, snr=snr,
                             image_dtype=image_dtype, n_pairs=n_pairs)
    return bids, truth, time.perf_counter() - t


def run_benchmark(tmp: Path, bids: Path, truth, subset: str, rounds: int, noise: str = "noise-free",
                  backend: str | None = None, workers: int = WORKERS) -> dict:
    ref_dir = bids / "derivatives" / "refmasks"
    # backend="cuda" fits on the GPU (benchmarks/GPU.md).
    options = CohortOptions(ref_masks=str(ref_dir), backend=backend)
    variants = SUBSETS[subset]
    labels = None if variants is None else sorted(
        t.subject for t in truth.runs.values() if t.variant in variants)
    n_subjects = len(truth.runs) if labels is None else len(labels)
    n_good = sum(1 for t in truth.good.values() if labels is None or t.subject in labels)
    # Warm-up on two subjects of every variant (numba loads its cached kernels, imports
    # happen): untimed.
    warm = sorted({t.variant: t.subject for t in truth.good.values()}.values())
    run_cohort(bids, tmp / "warm", options=options, participant_label=warm, workers=workers)
    shutil.rmtree(tmp / "warm")
    runner_s, floor_s, cpu_runner, cpu_floor, fit_s, report = [], [], [], [], [], None
    stored = None
    for i in range(rounds):
        for which in ("runner", "floor"):
            out = tmp / f"{which}-{i}"
            c, t = time.process_time(), time.perf_counter()
            if which == "runner":
                report = run_cohort(bids, out, options=options, workers=workers, participant_label=labels)
                runner_s.append(time.perf_counter() - t)
                cpu_runner.append(time.process_time() - c)
                fit_s.append(sum(x["timings_s"].get("fit", 0.0) for x in report.launches))
                if stored is None:
                    stored = _stored_outputs(out, [r.key for r in discover(bids, participant_label=labels)])
            else:
                io_floor(bids, out, stored, ref_dir, workers=workers, participant_label=labels)
                floor_s.append(time.perf_counter() - t)
                cpu_floor.append(time.process_time() - c)
            shutil.rmtree(out)
    n_vox = sum(int(x["n_vox"]) for x in report.launches)
    run_med, floor_med = statistics.median(runner_s), statistics.median(floor_s)
    shape = next(iter(truth.runs.values())).shape
    return {
        "problem": f"cohort {subset} {n_subjects} subj ~{shape[0]}x{shape[1]}x{shape[2]} {noise}",
        "subset": subset,
        "noise": noise,
        "snr": NOISE[noise][0],
        "image_dtype": NOISE[noise][1],
        "asl_pairs": NOISE[noise][2] or "2-3",
        "n_subjects": n_subjects,
        "n_good": n_good,
        "workers": workers,
        "backend": report.launches[0]["backend"] if report.launches else None,
        "gzip": gzip_backends(),
        "fit_launches": len(report.launches),
        "fitted_voxels": n_vox,
        "runner_s": runner_s,
        "floor_s": floor_s,
        "runner_cpu_s": cpu_runner,
        "floor_cpu_s": cpu_floor,
        "fit_s": fit_s,
        # Wall time of the fit calls inside the runner (their numba threads share the
        # cores with the reader and writer threads meanwhile).
        "fit_median_s": statistics.median(fit_s),
        "runner_median_s": run_med,
        "floor_median_s": floor_med,
        "ratio_to_floor": run_med / floor_med,
        # No schedule can beat this on CPU: the runner's CPU time spread over every core
        # for the floor's wall time (what the floor leaves idle is all there is to hide in).
        "cpu_bound_ratio": max(1.0, statistics.median(cpu_runner) / ((os.cpu_count() or 1) * floor_med)),
        "subjects_per_s": n_subjects / run_med,
        "done": len(report.done),
        "failed": len(report.failed),
        # why subjects failed (the run's failure log is deleted with its folder): the 3
        # deliberately broken ones, and on a new machine perhaps a reason worth reading
        "failures": sorted({f"{f['stage']}: {f['message']}"[:300] for f in report.failed})[:8],
    }


@pytest.fixture(scope="module", params=_env_list("ASLCAL_BENCH_COHORT_NOISE", ",".join(NOISE)))
def phantom_cohort(request, tmp_path_factory, full_run):
    n, shape = (50, (64, 64, 24)) if full_run else (8, (32, 32, 12))
    tmp = tmp_path_factory.mktemp("cohort-bench")
    snr, image_dtype, n_pairs = NOISE[request.param]
    bids, truth, _ = make_cohort(tmp, n, shape, snr=snr, image_dtype=image_dtype, n_pairs=n_pairs)
    yield tmp, bids, truth, request.param
    shutil.rmtree(tmp, ignore_errors=True)


#: (subset, backend, workers) of every row: the no-fit subset has no fit, so no backend.
CASES = [(subset, backend, workers) for subset in SUBSETS for workers in WORKER_COUNTS
         for backend in (BACKENDS if SUBSETS[subset] is None else [None])]


@pytest.mark.parametrize("subset,backend,workers", CASES,
                         ids=[f"{s}-{b or 'default'}-w{w}" for s, b, w in CASES])
def test_bench_cohort_vs_io_floor(phantom_cohort, subset, backend, workers, full_run, cohort_rows):
    tmp, bids, truth, noise = phantom_cohort
    row = run_benchmark(tmp, bids, truth, subset, rounds=ROUNDS if full_run else 1, noise=noise,
                        backend=backend, workers=workers)
    cohort_rows.append(row)
    assert row["done"] == row["n_good"] and row["failed"] == row["n_subjects"] - row["n_good"], row["failures"]
    assert row["ratio_to_floor"] > 0
