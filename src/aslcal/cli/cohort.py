"""``aslcal cohort BIDS_ROOT OUT_ROOT``: calibrate every ASL run of a BIDS dataset.

Exit status: 0 every selected subject is done (or was complete), 1 some subject failed
(see ``derivatives/aslcal/logs/failures*.jsonl`` and ``summary.tsv``), 2 the run itself
could not start (bad options, no dataset, outputs present without ``--resume``), 130
interrupted (whether or not a subject failed: the run is unfinished, rerun it with
``--resume``).  The first SIGINT/SIGTERM finishes the batch in hand and stops; a second
(at least a second later) abandons it (every file is atomic; an unfinished subject has no completion marker and
``--resume`` redoes it).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from ..errors import InputError

log = logging.getLogger("aslcal")

#: Seconds after the first signal during which another one is the same request.
SECOND_SIGNAL_AFTER = 1.0


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "cohort", parents=[common], help="calibrate every ASL run of a BIDS dataset",
        description=(
            "Calibrate every ASL run of a BIDS dataset into OUT_ROOT/derivatives/aslcal: M0 "
            "(reference region with --ref-masks, or with automatic masks from --anat T1w images, else "
            "voxelwise; M0Estimate; saturation-recovery "
            "and Look-Locker M0 series fitted voxelwise), T1 and flip-angle-correction maps, "
            "calibrated CBF, masks, a provenance JSON per subject and summary.tsv.  A failing "
            "subject is recorded and the run goes on."
        ),
    )
    p.add_argument("bids_root", metavar="BIDS_ROOT", help="the BIDS dataset")
    p.add_argument("out_root", metavar="OUT_ROOT", help="output folder (derivatives/aslcal is made inside)")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL", help="only these subjects (01 or sub-01)")
    g = p.add_argument_group("calibration")
    g.add_argument("--ref-masks", metavar="DIR",
                   help="reference masks in ASL space: DIR/sub-X/[ses-Y/]perf/<run>_desc-ref_mask.nii[.gz] "
                        "(reference-region M0a); not with --anat; without either the M0 is voxelwise")
    g.add_argument("--anat", metavar="DIR",
                   help="automatic reference masks from brain-extracted T1w images: "
                        "DIR/sub-X/[ses-Y/]anat/sub-X[_ses-Y]_desc-brain_T1w.nii[.gz] (+ optional "
                        "..._from-asl_to-T1w_mode-image_xfm.mat FLIRT matrix or ANTs affine, or "
                        "..._xfm.txt ITK affine)")
    g.add_argument("--csfmaskingoff", action="store_true", help="automatic mask: keep all CSF, not only the ventricles")
    g.add_argument("--pve-threshold", type=float, default=0.9,
                   help="automatic mask: threshold on the reference tissue's partial volume (default 0.9)")
    g.add_argument("--tissref", choices=("csf", "wm", "gm", "none"), default="csf", help="reference tissue (default csf)")
    g.add_argument("--t1r", type=float, help="T1 of the reference tissue, s")
    g.add_argument("--t2r", type=float, help="T2 (or T2*) of the reference tissue, ms")
    g.add_argument("--t2b", type=float, help="T2 (or T2*) of blood, ms")
    g.add_argument("--t2star", action="store_true", help="correct with T2* instead of T2")
    g.add_argument("--pc", type=float, help="partition coefficient of the reference tissue, ml/g")
    g.add_argument("--cgain", type=float, default=1.0, help="gain of the ASL data relative to the M0 image (default 1)")
    g.add_argument("--taq", type=float, default=0.0, help="acquisition time of a long-TR M0 image, s (default 0)")
    g.add_argument("--tissue-table", metavar="FILE", help="JSON file overriding tissue-table values")
    g.add_argument("--m0-scale", choices=("auto", "readout", "relaxed"), default="auto",
                   help="Look-Locker M0 scale: auto = relaxed unless the ASL series is itself Look-Locker")
    g.add_argument("--priors", action="store_true", help="fabber's weak priors on T1, A and g (MAP)")
    g.add_argument("--fixa", action="store_true", help="fix the saturation efficiency A = 1")
    g.add_argument("--allow-control-m0", action="store_true",
                   help="M0Type Absent: use the mean control image as M0 (only without background suppression)")
    g.add_argument("--bs-efficiency", type=float, metavar="E",
                   help="inversion efficiency of one background-suppression pulse (e.g. 0.95): runs with "
                        "BackgroundSuppression and no LabelingEfficiency get alpha x E^BackgroundSuppressionNumberPulses "
                        "(default: no such correction, as asl_calib)")
    g.add_argument("--voxel-pc", type=float, default=0.9, help="partition coefficient of the voxelwise M0 (default 0.9)")
    g.add_argument("--voxel-t1t", type=float, default=1.3, help="tissue T1 of the voxelwise short-TR factor, s (default 1.3)")
    g.add_argument("--no-edgecorr", dest="edgecorr", action="store_false", help="voxelwise M0 without edge correction")
    g.add_argument("--quantification", choices=("calibration", "whitepaper"), default="calibration",
                   help="CBF from ΔM: 'calibration' = 6000·ΔM/(M0a·α), ΔM taken as quantified perfusion "
                        "(asl_calib -i/-o; default; on raw control-label data no kinetic model: 1.5-2.2 "
                        "times below the white-paper CBF, by protocol, and said so in the log and the sidecars); "
                        "'whitepaper' = the single-PLD white-paper model from PostLabelingDelay, "
                        "LabelingDuration (PASL: BolusCutOffDelayTime) and SliceTiming")
    x = p.add_argument_group("execution")
    x.add_argument("--backend", choices=("auto", "numpy", "numba", "cuda"), default=None,
                   help="fitting backend (default: $ASLCAL_BACKEND, else auto)")
    x.add_argument("--dtype", choices=("float32", "float64"), help="fitting precision (default: the backend's)")
    x.add_argument("--workers", type=int, default=2,
                   help="reader and writer threads (default 2); with --dask local: worker processes")
    x.add_argument("--batch-size", type=int, default=32, help="most subjects per fit launch (fewer when the fit thread is free and the next subject is not ready), and subjects per Dask task (default 32)")
    x.add_argument("--max-memory", type=float, metavar="GIB",
                   help="memory for the subjects held at once (the batches being gathered and fitted, and again "
                        "for those read ahead), GiB; default an eighth of the available memory, at most 2")
    x.add_argument("--resume", action="store_true", help="skip complete subjects, redo partial and failed ones")
    x.add_argument("--shard", metavar="I/N", help="only job-array task I of N (deterministic split by subject)")
    d = x.add_mutually_exclusive_group()
    d.add_argument("--dask", choices=("local",), help="run on a local Dask cluster (one worker per GPU if any)")
    d.add_argument("--dask-scheduler", metavar="ADDRESS", help="run on an existing Dask cluster")
    x.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run)


class _Signals:
    """First SIGINT/SIGTERM: stop after the current batch; second: abandon it.

    A signal within :data:`SECOND_SIGNAL_AFTER` seconds of the first is the same request
    (``timeout`` and job schedulers signal the process and then its group; a terminal may
    deliver one Ctrl-C twice), not the second.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._old: dict[int, object] = {}
        self._first = 0.0

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set():
            if time.monotonic() - self._first < SECOND_SIGNAL_AFTER:
                return
            raise KeyboardInterrupt
        self._first = time.monotonic()
        self.stop.set()
        print(f"\naslcal: {signal.Signals(signum).name}: finishing the current batch, then stopping "
              "(again to abandon it)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _options(args):
    from ..cohort import CohortOptions
    from ..physics.tissues import load_tissue_file

    return CohortOptions(
        ref_masks=args.ref_masks, anat=args.anat, all_csf=args.csfmaskingoff,
        pve_threshold=args.pve_threshold, tissref=args.tissref, t1r=args.t1r, t2r=args.t2r, t2b=args.t2b,
        pc=args.pc, t2star=args.t2star, cgain=args.cgain, taq=args.taq, m0_scale=args.m0_scale,
        priors=args.priors, fix_a=args.fixa, allow_control_m0=args.allow_control_m0,
        voxel_pc=args.voxel_pc, voxel_t1t=args.voxel_t1t, edge_correction=args.edgecorr,
        quantification=args.quantification,
        tissue_overrides=load_tissue_file(args.tissue_table) if args.tissue_table else None,
        backend=args.backend, dtype=args.dtype,  # "auto" given: automatic whatever $ASLCAL_BACKEND says
        bs_efficiency=args.bs_efficiency,
    )


def run(args) -> int:
    from ..cohort import run_cohort

    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: expected an integer >= 1")
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.max_memory is not None and not (args.max_memory > 0 and args.max_memory < float("inf")):
        raise InputError(f"--max-memory {args.max_memory}: expected a positive number of GiB")
    options = _options(args)
    dask = "local" if args.dask else args.dask_scheduler
    bar = {"tqdm": None, "failed": 0}
    lock = threading.Lock()

    def on_start(n: int) -> None:
        if args.progress and not args.quiet and n:
            from tqdm import tqdm

            bar["tqdm"] = tqdm(total=n, unit="subject", desc="aslcal cohort", file=sys.stderr,
                               dynamic_ncols=True, smoothing=0.1)

    def on_subject(key: str, ok: bool) -> None:
        with lock:
            if not ok:
                bar["failed"] += 1
            if bar["tqdm"] is not None:
                bar["tqdm"].set_postfix(failed=bar["failed"], refresh=False)
                bar["tqdm"].update(1)

    # One line per fit launch is noise under a progress bar; the final summary counts them.
    fit_log = logging.getLogger("aslcal")
    level = fit_log.level
    if not args.debug:
        fit_log.setLevel(max(logging.WARNING, fit_log.getEffectiveLevel()))
    max_bytes = None if args.max_memory is None else max(1, int(args.max_memory * 2**30))
    # The handlers stay while the report prints: a signal then is still a clean stop / 130.
    with _Signals() as sig:
        try:
            report = run_cohort(
                args.bids_root, args.out_root, options=options, participant_label=args.participant_label,
                workers=args.workers, resume=args.resume, shard_spec=args.shard, dask=dask,
                batch_size=args.batch_size, max_batch_bytes=max_bytes, on_start=on_start,
                on_subject=on_subject, stop=sig.stop,
            )
        finally:
            if bar["tqdm"] is not None:
                bar["tqdm"].close()
            fit_log.setLevel(level)
        _print_report(args, report)
    return report.exit_code


def _print_report(args, report) -> None:
    n_done, n_failed = len(report.done), len(report.failed)
    rate = n_done / report.seconds if report.seconds > 0 else 0.0
    n_vox = sum(int(launch["n_vox"]) for launch in report.launches)
    lines = [
        f"{report.n_discovered} ASL runs found"
        + (f" ({len(report.rejected)} ASL files skipped (not usable as BIDS runs), see the warnings)" if report.rejected else "")
        + f", {len(report.selected)} selected"
        + (f" (shard {args.shard})" if args.shard else "")
        + (f", {len(report.skipped)} already complete" if report.skipped else "")
        + (f", {len(report.redo)} partial redone" if report.redo else ""),
        f"{n_done} done, {n_failed} failed in {report.seconds:.1f} s ({rate:.2f} subjects/s); "
        f"{len(report.launches)} fit launches, {n_vox} voxels; executor {report.executor}; gzip {report.gzip}",
    ]
    for rec in report.failed:
        where = "".join(f" [{k} {rec['details'][k]}]" for k in ("file", "field") if rec.get("details", {}).get(k))
        lines.append(f"FAILED {rec['key']} at {rec['stage']}: {rec['message']}{where}")
    if report.interrupted:
        lines.append("interrupted: rerun with --resume to finish")
    lines.append(f"summary: {report.summary_tsv}")
    if n_failed:
        lines.append(f"failures: {report.failure_log}")
    for line in lines:
        if args.quiet and not line.startswith(("FAILED", "interrupted", "summary:")):
            continue  # -q: failures, interruption and where the results are
        print(line if line.startswith(("FAILED", "interrupted")) else f"aslcal: {line}",
              file=sys.stderr if line.startswith(("FAILED", "interrupted")) else sys.stdout)
