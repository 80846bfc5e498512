"""``aslcal voxelwise``: a voxelwise M0 map (short-TR and edge corrections) and calibrated CBF."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import InputError
from ._common import (
    cleanup_outdir, earlier_aslcal_run, fsl_image_names, load, mask_of, outdir_outputs, prepare_outdir, provenance,
    remove_stale_outputs,
)

log = logging.getLogger("aslcal")


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "voxelwise", parents=[common], help="voxelwise M0 map and calibrated CBF",
        description=(
            "Voxelwise calibration: M0(x) = C(x) * cgain * [1/(1 - exp(-TR/T1t)) if TR < 5 s] / pc, "
            "with edge correction (median filter, erosion, fill from the neighbourhood) inside the "
            "brain mask; optionally calibrate a perfusion image voxel by voxel.  TR and T1t in "
            "seconds."
        ),
    )
    p.add_argument("-c", dest="calib", metavar="CALIB", help="calibration image (required; 4-D: mean over volumes)")
    p.add_argument("--bmask", metavar="MASK", help="brain mask in calibration space (required)")
    p.add_argument("--tr", type=float, help="repetition time of the calibration image, s (no short-TR factor if absent or >= 5 s)")
    p.add_argument("--t1t", type=float, default=1.3, help="tissue T1 for the short-TR factor, s (default 1.3)")
    p.add_argument("--pc", type=float, default=0.9, help="tissue partition coefficient, ml/g (default 0.9)")
    p.add_argument("--cgain", type=float, default=1.0, help="relative gain of the ASL data (default 1)")
    p.add_argument("--no-edgecorr", dest="edgecorr", action="store_false", help="skip the edge correction")
    p.add_argument("-i", dest="infile", metavar="PERF", help="perfusion image to calibrate (with -o)")
    p.add_argument("-o", dest="outfile", metavar="OUT", help="calibrated perfusion, ml/100g/min")
    p.add_argument("--alpha", type=float, help="labelling efficiency (default from --labelling, else 1)")
    p.add_argument("--labelling", choices=("pcasl", "casl", "pasl"), help="labelling type: sets alpha")
    p.add_argument("--m0map", metavar="FILE", help="write the M0 map here")
    p.add_argument("--outdir", metavar="DIR", help="write the M0 map, CBF and a provenance JSON here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (and remove an earlier run's files in --outdir that this "
                        "run does not write)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibration import apply_calibration, m0_voxelwise
    from ..io import OutputSet, save_image, write_json

    fsl_image_names(args, inputs=("calib", "bmask", "infile"), outputs=("outfile", "m0map"))
    if args.calib is None:
        raise InputError("-c CALIB is required: the calibration image")
    if args.bmask is None:
        raise InputError("--bmask MASK is required: the voxelwise M0 is defined inside the brain mask")
    if (args.infile is None) != (args.outfile is None):
        raise InputError("-i PERF and -o OUT go together: -o is the calibrated version of -i")
    if not (args.outfile or args.m0map or args.outdir):
        raise InputError("nothing to write: give --m0map FILE, -i PERF with -o OUT, or --outdir DIR")
    created = args.outdir is not None and not Path(args.outdir).exists()
    outdir = prepare_outdir(args.outdir)
    earlier = earlier_aslcal_run(outdir, "voxelwise") if args.overwrite else set()
    out = OutputSet(overwrite=args.overwrite)
    try:
        planned = [Path(p) for p in (args.outfile, args.m0map) if p]
        if outdir is not None:
            planned += [outdir / "M0map.nii.gz", outdir / "provenance.json"]
            planned += [outdir / "perfusion_calib.nii.gz"] if args.infile else []
        out.check(*planned)
        t0 = time.perf_counter()
        calib = load(args.calib, "calibration image (-c)", ndim=(3, 4))
        ref = (calib, "calibration image (-c)")
        bmask = mask_of(load(args.bmask, "brain mask (--bmask)", ndim=3, reference=ref), "brain mask (--bmask)")
        perf = load(args.infile, "perfusion image (-i)", reference=ref) if args.infile else None
        vw = m0_voxelwise(calib.data, bmask, tr=args.tr, t1t=args.t1t, pc=args.pc, cgain=args.cgain,
                          edge_correction=args.edgecorr)
        cal = None
        if perf is not None:
            cal = apply_calibration(perf.data, vw.m0, alpha=args.alpha, labelling=args.labelling)
            # outside the brain mask M0 is 0 by definition, and so is CBF: only brain voxels are news
            n_brain_zeroed = cal.n_zeroed - int(bmask.size - bmask.sum())
            if n_brain_zeroed > 0:
                log.warning("%d brain-mask voxels with M0 <= 0 or non-finite were set to 0", n_brain_zeroed)
        elapsed = time.perf_counter() - t0
        with out:
            hdr = dict(affine=calib.affine, header=calib.header)
            if args.m0map:
                save_image(out.path(args.m0map), vw.m0, **hdr, description="aslcal voxelwise M0")
            if cal is not None:
                save_image(out.path(args.outfile), cal.image, perf.affine, header=perf.header,
                           description="aslcal CBF ml/100g/min")
            if outdir is not None:
                save_image(out.path(outdir / "M0map.nii.gz"), vw.m0, **hdr, description="aslcal voxelwise M0")
                if cal is not None:
                    save_image(out.path(outdir / "perfusion_calib.nii.gz"), cal.image, perf.affine,
                               header=perf.header, description="aslcal CBF ml/100g/min")
                write_json(out.path(outdir / "provenance.json"), provenance(
                    args, "voxelwise", outputs=outdir_outputs(out, outdir), voxelwise=vw.as_dict(),
                    calibrated=None if cal is None else cal.as_dict(), timings_s={"total": elapsed},
                ))
            written = out.destinations
    except BaseException:
        cleanup_outdir(outdir, created)
        raise
    if earlier:
        remove_stale_outputs(outdir, sorted(earlier), written, inputs=[args.calib, args.bmask, args.infile])
    log.info("voxelwise M0: %d brain voxels, %d filled by the edge correction", vw.n_brain, vw.n_filled)
    return 0
