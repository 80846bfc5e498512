"""``aslcal calib``: asl_calib-compatible M0 calibration, and ``aslcal voxelwise``.

Every asl_calib option keeps its meaning and units (TE in ms; TR, TAQ, TIs in s; flip
angles in degrees).  Inputs are checked and every output path is validated before any
computation; outputs are written together at the end (:class:`aslcal.io.OutputSet`), so
a failed run leaves no partial file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._common import (
    check_same_grid,
    cleanup_outdir,
    earlier_aslcal_run,
    float_list,
    float_or_image,
    fsl_image_names,
    image_or_value,
    load,
    mask_of,
    outdir_outputs,
    prepare_outdir,
    provenance,
    remove_stale_outputs,
)

log = logging.getLogger("aslcal")

#: Maps of the whole-brain satrecov fit written to --outdir: (result attribute, file stem).
FIT_MAPS = (("t1t", "T1t"), ("m0t", "M0t"), ("a", "A"), ("g", "facorr"))


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "calib", parents=[common], help="M0 of arterial blood (asl_calib compatible) and calibrated CBF",
        description=(
            "Estimate the equilibrium magnetisation of arterial blood (M0a) from a calibration "
            "image in a reference region (longtr) or from a saturation-recovery / Look-Locker "
            "series (satrecov), and optionally calibrate a perfusion image in ml/100g/min.  "
            "Options and units as FSL asl_calib: TE, T2, T2* in milliseconds; TR, TAQ, TIs, T1 "
            "in seconds; flip angles in degrees.  Prints 'M0: <value>'."
        ),
    )
    g = p.add_argument_group("inputs")
    g.add_argument("-c", dest="calib", metavar="CALIB",
                   help="calibration image (required unless --m0a); 4-D series in satrecov mode")
    g.add_argument("--m0a", type=float, metavar="VALUE",
                   help="a known M0a (e.g. from an earlier run, as oxford_asl's --M0): no calibration image; "
                        "calibrates -i into -o")
    g.add_argument("-m", dest="mask", metavar="MASK", help="reference-region mask, in calibration space")
    g.add_argument("-s", dest="struc", metavar="STRUC", help="brain-extracted structural (automatic reference mask)")
    g.add_argument("-t", dest="trans", metavar="TRANS",
                   help="ASL->structural transform: FLIRT matrix, or ITK/ANTs affine (fMRIPrep from-<asl>_to-T1w)")
    g.add_argument("--refpve", metavar="PVE", help="partial-volume map of the reference tissue (structural space)")
    g.add_argument("--tissue-maps", metavar="PATH",
                   help="existing segmentation: FAST *_pve_0/1/2 (file, folder or prefix) or BIDS *_label-CSF/GM/WM_probseg")
    g.add_argument("--csfmaskingoff", action="store_true", help="keep all CSF, not only the lateral ventricles")
    g.add_argument("--ventricle-atlas", metavar="MASK", help="ventricle mask in standard space (with --str2std), as FSL")
    g.add_argument("--str2std", metavar="MAT", help="structural->standard FLIRT matrix, for --ventricle-atlas")
    g.add_argument("--pve-threshold", type=float, default=0.9,
                   help="keep calibration voxels with at least this reference-tissue fraction (default 0.9)")
    g.add_argument("--bmask", metavar="MASK",
                   help="brain mask in calibration space (default: made from the calibration image)")
    g.add_argument("-i", dest="infile", metavar="PERF", help="perfusion image to calibrate (with -o)")
    g.add_argument("--mode", choices=("longtr", "satrecov"), default="longtr", help="calibration mode (default longtr)")
    g.add_argument("--tissref", choices=("csf", "wm", "gm", "none"), default="csf", help="reference tissue (default csf)")
    t = p.add_argument_group("sequence and tissue (defaults from the tissue table)")
    t.add_argument("--te", type=float, default=0.0, help="echo time, ms (default 0)")
    t.add_argument("--tr", type=float, default=3.2, help="repetition time of the calibration image, s (default 3.2)")
    t.add_argument("--taq", type=float, default=0.0, help="acquisition time (longtr TR correction), s (default 0)")
    t.add_argument("--t1r", type=float_or_image, metavar="T1R", help="T1 of the reference tissue, s (number or image)")
    t.add_argument("--t2r", type=float_or_image, metavar="T2R", help="T2 (or T2*) of the reference tissue, ms (number or image)")
    t.add_argument("--t2b", type=float, help="T2 (or T2*) of blood, ms")
    t.add_argument("--t2star", action="store_true", help="correct with T2* instead of T2 (changes the defaults)")
    t.add_argument("--pc", type=float, help="partition coefficient of the reference tissue, ml/g")
    t.add_argument("--cgain", "--cagin", dest="cgain", type=float, default=1.0,
                   help="relative gain of the ASL data vs the calibration image (default 1)")
    t.add_argument("--alpha", type=float, help="labelling efficiency for -o (default from --labelling, else 1)")
    t.add_argument("--labelling", choices=("pcasl", "casl", "pasl"), help="labelling type: sets alpha (0.85/0.85/0.98)")
    t.add_argument("--field-strength", type=float, default=3.0, help="tissue table: 1.5, 3 or 7 tesla (default 3)")
    t.add_argument("--tissue-table", metavar="FILE", help="JSON file overriding tissue-table values")
    c = p.add_argument_group("coil sensitivity")
    c.add_argument("--cref", metavar="IMG", help="calibration-like image from a flat-sensitivity (body) coil")
    c.add_argument("--cact", metavar="IMG", help="image from the actual coil, if not the calibration image")
    c.add_argument("--isen", metavar="IMG", help="ready sensitivity map")
    c.add_argument("--osen", metavar="FILE", help="save the sensitivity map used")
    s = p.add_argument_group("satrecov mode")
    s.add_argument("--tis", type=float_list, help="TIs, s, comma separated (distinct TIs of one phase, or one per volume)")
    s.add_argument("--fa", type=float, help="Look-Locker readout flip angle, degrees")
    s.add_argument("--lfa", type=float, help="low flip angle of a last extra phase, degrees (fits the flip-angle correction)")
    s.add_argument("--nphases", type=int, default=1, help="high-flip-angle phases (default 1)")
    s.add_argument("--repeats", type=int, default=1, help="volumes per TI within a phase (default 1)")
    s.add_argument("--dt", type=float, help="Look-Locker readout spacing, s (default: spacing of the first two TIs)")
    s.add_argument("--fixa", action="store_true", help="fix the saturation efficiency A = 1")
    s.add_argument("--priors", action="store_true", help="fabber's weak priors on T1, A and g (MAP)")
    s.add_argument("--m0-scale", choices=("readout", "relaxed"), default="readout",
                   help="Look-Locker M0 scale: readout (asl_calib; ASL data share the readout, default) or "
                        "relaxed (divide by sin(g*FA); ASL data with their own readout)")
    s.add_argument("--backend", choices=("auto", "numpy", "numba", "cuda"), default=None,
                   help="fitting backend (default: $ASLCAL_BACKEND, else auto)")
    s.add_argument("--dtype", choices=("float32", "float64"), help="fitting precision (default: the backend's)")
    o = p.add_argument_group("outputs")
    o.add_argument("-o", "--of", dest="outfile", metavar="OUT",
                   help="calibrated perfusion image, ml/100g/min (with -i; --of as in asl_calib)")
    o.add_argument("--Mo", dest="mo", metavar="FILE", help="write M0a to this text file")
    o.add_argument("--om", metavar="FILE", help="save the reference mask used")
    o.add_argument("--outdir", metavar="DIR", help="write every map and a provenance JSON here")
    o.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (and remove an earlier run's files in --outdir that this "
                        "run does not write)")
    p.set_defaults(func=run)


def _finite(arr):
    """A copy with NaN/Inf set to 0 (for files; the status map tells why)."""
    from ..backend import array_namespace

    xp = array_namespace(arr)
    return xp.where(xp.isfinite(arr), arr, 0)


#: Options that only the satrecov mode uses (dest: (flag, default)), and the longtr ones.
_SATRECOV_ONLY = {
    "nphases": ("--nphases", 1), "repeats": ("--repeats", 1), "dt": ("--dt", None), "fixa": ("--fixa", False),
    "priors": ("--priors", False), "m0_scale": ("--m0-scale", "readout"), "backend": ("--backend", None),
    "dtype": ("--dtype", None),
}
_LONGTR_ONLY = {"tr": ("--tr", 3.2), "taq": ("--taq", 0.0)}


#: Options naming files this command reads (recorded in the provenance), and with the
#: tissue parameters that may be images, every option that can name an input file.
_FILE_INPUTS = ("calib", "mask", "bmask", "infile", "cref", "cact", "isen", "tissue_table", "struc", "trans", "refpve",
                "tissue_maps", "ventricle_atlas", "str2std")
_INPUT_OPTIONS = (*_FILE_INPUTS, "t1r", "t2r")

#: What --m0a replaces: the calibration image and everything that describes or masks it.
_CALIBRATION_INPUTS = {
    "calib": "-c", "mask": "-m", "struc": "-s", "trans": "-t", "refpve": "--refpve", "tissue_maps": "--tissue-maps",
    "ventricle_atlas": "--ventricle-atlas", "str2std": "--str2std", "bmask": "--bmask", "cref": "--cref",
    "cact": "--cact", "tis": "--tis", "fa": "--fa", "lfa": "--lfa", "om": "--om",
}


def _check_known_m0a(args) -> None:
    """``--m0a VALUE``: calibrate -i with a known M0a; nothing else to estimate."""
    import math

    if not (math.isfinite(args.m0a) and args.m0a > 0):
        raise InputError(f"--m0a {args.m0a:g}: M0a must be a positive number (scanner signal units)")
    clash = [flag for dest, flag in _CALIBRATION_INPUTS.items() if getattr(args, dest)]
    if clash:
        raise InputError(
            f"--m0a gives M0a, so there is nothing to calibrate it from: do not combine it with {', '.join(clash)}"
        )
    if args.mode != "longtr":
        raise InputError("--m0a gives M0a: --mode satrecov has nothing to fit")
    if args.infile is None or args.outfile is None:
        raise InputError("--m0a needs -i PERF and -o OUT: the perfusion image to calibrate and where to write it")
    if args.osen and not args.isen:
        raise InputError("--osen saves the coil sensitivity map, but none is used: give --isen")
    unused = [flag for dest, (flag, default) in {
        **_SATRECOV_ONLY, **_LONGTR_ONLY, "te": ("--te", 0.0), "t1r": ("--t1r", None), "t2r": ("--t2r", None),
        "t2b": ("--t2b", None), "t2star": ("--t2star", False), "pc": ("--pc", None), "cgain": ("--cgain", 1.0),
        "tissref": ("--tissref", "csf"), "field_strength": ("--field-strength", 3.0),
        "tissue_table": ("--tissue-table", None), "pve_threshold": ("--pve-threshold", 0.9),
        "csfmaskingoff": ("--csfmaskingoff", False),
    }.items() if getattr(args, dest) != default]
    if unused:
        log.warning("%s: no effect with --m0a (M0a is given; ignored)", ", ".join(unused))


def _check_options(args) -> None:
    if args.outfile is not None and Path(args.outfile).is_dir():
        raise InputError(
            f"-o {args.outfile}: is a folder; -o names the calibrated perfusion image (asl_calib's --of), "
            "--outdir DIR the folder of every map"
        )
    if args.m0a is not None:
        _check_known_m0a(args)
        return
    if args.calib is None:
        raise InputError("-c CALIB is required: the calibration image (or --m0a VALUE, a known M0a)")
    if args.mask is None:
        if args.tissref == "none":
            raise InputError(
                "--tissref none has no tissue to find: the automatic reference mask needs --tissref csf, wm "
                "or gm; with --tissref none give the reference mask (-m)"
            )
        if not (args.struc or args.refpve or args.tissue_maps):
            raise InputError(
                "no reference mask and no way to make one: give -m MASK (calibration space), or a "
                "brain-extracted structural -s with the ASL->structural transform -t (or --refpve / "
                "--tissue-maps with -t)"
            )
        if args.trans is None:
            raise InputError(
                "-t TRANS (the ASL->structural transform) is needed to bring structural-space maps "
                "into calibration space; or give the reference mask directly with -m"
            )
    elif args.struc or args.refpve or args.tissue_maps or args.ventricle_atlas:
        log.info("-m given: the reference mask is used as is (-s/--refpve/--tissue-maps/--ventricle-atlas ignored)")
    if (args.ventricle_atlas is None) != (args.str2std is None):
        raise InputError("--ventricle-atlas and --str2std go together (atlas in standard space + structural->standard matrix)")
    if (args.infile is None) != (args.outfile is None):
        raise InputError("-i PERF and -o OUT go together: -o is the calibrated version of -i")
    if args.mode == "longtr" and (args.tis or args.fa or args.lfa):
        raise InputError("--tis/--fa/--lfa describe a satrecov series: add --mode satrecov")
    if args.mode == "satrecov" and not args.tis:
        raise InputError("--mode satrecov needs --tis (the recovery times, s)")
    # Options of the other mode are accepted (asl_calib scripts pass them regardless of
    # the mode) but said to be ignored, so that nobody believes they took effect.
    other = _SATRECOV_ONLY if args.mode == "longtr" else _LONGTR_ONLY
    unused = [flag for dest, (flag, default) in other.items() if getattr(args, dest) != default]
    if unused:
        log.warning("%s: no effect in --mode %s (ignored)", ", ".join(unused), args.mode)
    if args.isen and (args.cref or args.cact):
        raise InputError("--isen gives the sensitivity map; do not combine it with --cref/--cact")
    if args.cact and not args.cref:
        raise InputError("--cact needs --cref (sensitivity = cact / cref)")
    if args.mode == "satrecov" and args.cref and not args.cact:
        # asl_calib defaults --cact to the calibration image in longtr mode only: a
        # saturation-recovery series has another contrast than the body-coil image
        raise InputError(
            "--cref in satrecov mode needs --cact, the actual-coil image acquired like --cref "
            "(e.g. a long-TR M0): the saturation-recovery series has another contrast, so its "
            "ratio to --cref is not the coil sensitivity"
        )
    if args.osen and not (args.cref or args.isen):
        raise InputError("--osen saves the coil sensitivity map, but none is used: give --cref (or --isen)")


def _outputs(args, outdir: Path | None) -> list[Path]:
    paths = [Path(p) for p in (args.outfile, args.mo, args.om, args.osen) if p]
    if outdir is not None and args.m0a is not None:
        paths += [outdir / n for n in ("M0.txt", "perfusion_calib.nii.gz", "provenance.json")]
        if args.isen:
            paths.append(outdir / "sensitivity.nii.gz")
    elif outdir is not None:
        names = ["M0.txt", "refmask.nii.gz", "brainmask.nii.gz", "provenance.json", "qc.png"]
        # brainmask.nii.gz is written when a brain mask exists (given, or made from the calibration image)
        if args.mask is None:
            names.append("refmask_pv.nii.gz")
        if args.cref or args.isen:
            names.append("sensitivity.nii.gz")
        if args.mode == "satrecov":
            names += ["ref_T1t.nii.gz", "ref_M0t.nii.gz", "ref_status.nii.gz"]
            # the whole-brain fit always runs (brain mask given or made from the calibration image)
            for _, stem in FIT_MAPS:
                names += [f"{stem}.nii.gz", f"{stem}_se.nii.gz"]
            names += ["status.nii.gz", "rss.nii.gz"]
        if args.infile:
            names.append("perfusion_calib.nii.gz")
        paths += [outdir / n for n in names]
    return paths


def run(args) -> int:
    from ..io import OutputSet

    t_start = time.perf_counter()
    fsl_image_names(args, inputs=("calib", "mask", "struc", "refpve", "ventricle_atlas", "bmask", "infile", "t1r",
                                  "t2r", "cref", "cact", "isen"),
                    outputs=("outfile", "om", "osen"))
    _check_options(args)
    out = OutputSet(overwrite=args.overwrite)
    created = args.outdir is not None and not Path(args.outdir).exists()
    outdir = prepare_outdir(args.outdir)
    earlier = earlier_aslcal_run(outdir, "calib") if args.overwrite else set()
    try:
        out.check(*_outputs(args, outdir))
        with out:
            result = (_calibrate if args.m0a is None else _apply_known_m0a)(args, out, outdir)
            written = out.destinations
    except BaseException:
        cleanup_outdir(outdir, created)
        raise
    if earlier:
        remove_stale_outputs(outdir, sorted(earlier), written, inputs=[getattr(args, k) for k in _INPUT_OPTIONS])
    print(f"M0: {result['m0a']:.10g}")
    log.info("done in %.2f s", time.perf_counter() - t_start)
    return 0


def _calibrate(args, out, outdir: Path | None) -> dict:
    from ..calibration import apply_calibration, coil_sensitivity, m0_refregion, m0_refregion_satrecov
    from ..io import save_image, write_json
    from ..physics.tissues import load_tissue_file, tissue_table

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # In float64 unless --dtype float32: a float32 copy would limit a float64 fit to ~1e-7.
    calib = load(args.calib, "calibration image (-c)", ndim=(4,) if args.mode == "satrecov" else (3, 4),
                 dtype="float32" if args.mode == "satrecov" and args.dtype == "float32" else "float64")
    ref = (calib, "calibration image (-c)")
    t1r = image_or_value(args.t1r, "T1 image (--t1r)", ref)
    t2r = image_or_value(args.t2r, "T2 image (--t2r)", ref)
    timings["load"] = time.perf_counter() - t0
    auto = None
    if args.mask is not None:
        refmask = mask_of(load(args.mask, "reference mask (-m)", ndim=3, reference=ref), "reference mask (-m)")
    else:
        t_mask = time.perf_counter()
        auto = automatic_reference_mask(args, calib)
        refmask = auto.mask
        timings["reference_mask"] = time.perf_counter() - t_mask
        log.info("reference mask: %d calibration voxels with %s fraction >= %g (%s)", auto.n_voxels,
                 args.tissref, auto.threshold, "; ".join(auto.steps))
    bmask, bmask_source = _brain_mask(args, calib, ref)
    perf = load(args.infile, "perfusion image (-i)", reference=ref) if args.infile else None
    table = None
    if args.tissue_table:
        table = tissue_table(args.field_strength, overrides=load_tissue_file(args.tissue_table))

    sens = None
    if args.isen:
        sens = load(args.isen, "sensitivity map (--isen)", ndim=3, reference=ref).data
    elif args.cref:
        cref = load(args.cref, "body-coil reference (--cref)", reference=ref)
        cact = load(args.cact, "actual-coil image (--cact)", reference=ref) if args.cact else None
        sen = coil_sensitivity(calib.data, cref.data, bmask, cact=None if cact is None else cact.data)
        if sen.n_invalid:
            log.warning("coil sensitivity: %d voxels had a non-finite or <= 0 ratio and were set to 1", sen.n_invalid)
        sens = sen.map

    tissue = dict(tissref=args.tissref, te=args.te, t1r=t1r, t2r=t2r, t2b=args.t2b, pc=args.pc,
                  t2star=args.t2star, cgain=args.cgain, sensitivity=sens, field_strength=args.field_strength,
                  tissue_table=table)
    t0 = time.perf_counter()
    fit_record = None
    if args.mode == "longtr":
        if calib.data.ndim == 4:
            log.info("calibration image has %d volumes: using their mean", calib.data.shape[3])
        res = m0_refregion(calib.data, refmask, tr=args.tr, taq=args.taq, **tissue)
        record = res.as_dict()
        m0a = res.m0a
    else:
        res = m0_refregion_satrecov(
            calib.data, args.tis, refmask, bmask if outdir is not None else None, repeats=args.repeats, nphases=args.nphases, fa=args.fa,
            lfa=args.lfa, dt=args.dt, fix_a=args.fixa, priors=args.priors, m0_scale=args.m0_scale,
            backend=args.backend, dtype=args.dtype, **tissue,
        )
        record = res.as_dict()
        m0a = res.m0a
        fit_record = res
    timings["calibration"] = time.perf_counter() - t0
    r = record.get("refregion", record)
    log.info("reference region: %d voxels used, %d excluded (zero or non-finite)", r["n_voxels"], r["n_excluded"])

    calibrated = None
    if perf is not None:
        calibrated = apply_calibration(perf.data, m0a, alpha=args.alpha, labelling=args.labelling, sensitivity=sens)

    # -- outputs (staged; renamed together when everything is written) --------------------
    hdr = dict(affine=calib.affine, header=calib.header)
    if bmask is None and outdir is not None:
        bmask, bmask_source = _brain_mask(args, calib, ref, optional=True)
    _write_m0a_and_calibrated(out, outdir, args, m0a, calibrated, perf, sens, hdr)
    if args.om:
        save_image(out.path(args.om), refmask, **hdr, description="aslcal reference mask")
    if outdir is not None:
        save_image(out.path(outdir / "refmask.nii.gz"), refmask, **hdr, description="aslcal reference mask")
        if bmask is not None:
            save_image(out.path(outdir / "brainmask.nii.gz"), bmask, **hdr, description="aslcal brain mask")
        if auto is not None:
            save_image(out.path(outdir / "refmask_pv.nii.gz"), auto.pv, **hdr,
                       description=f"aslcal {args.tissref} fraction in calibration space")
        _qc(out, outdir / "qc.png", calib.data, refmask, bmask, args)
        if fit_record is not None:
            rf = fit_record.ref_fit
            save_image(out.path(outdir / "ref_T1t.nii.gz"), rf.t1t, **hdr, description="aslcal reference T1t s")
            save_image(out.path(outdir / "ref_M0t.nii.gz"), rf.m0t, **hdr, description="aslcal reference M0t")
            save_image(out.path(outdir / "ref_status.nii.gz"), rf.status, **hdr, dtype=np.int16,
                       description="aslcal reference fit status")
            bf = fit_record.brain_fit
            if bf is not None:
                # Files hold finite numbers only: where a standard error or RSS is undefined
                # (non-finite input, singular fit) the library's NaN flag becomes 0 and the
                # status map says why.
                for attr, stem in FIT_MAPS:
                    save_image(out.path(outdir / f"{stem}.nii.gz"), getattr(bf, attr), **hdr, description=f"aslcal {stem}")
                    save_image(out.path(outdir / f"{stem}_se.nii.gz"), _finite(getattr(bf, attr + "_se")), **hdr,
                               description=f"aslcal {stem} standard error (0: undefined, see status)")
                save_image(out.path(outdir / "status.nii.gz"), bf.status, **hdr, dtype=np.int16,
                           description="aslcal fit status")
                save_image(out.path(outdir / "rss.nii.gz"), _finite(bf.rss), **hdr, description="aslcal fit RSS")
        inputs = {k: getattr(args, k) for k in _FILE_INPUTS}
        write_json(out.path(outdir / "provenance.json"), provenance(
            args, "calib", outputs=outdir_outputs(out, outdir), inputs={k: v for k, v in inputs.items() if v},
            m0a=m0a, calibration=record,
            reference_mask=auto.as_dict() if auto is not None else {"source": "-m", "n_voxels": int(refmask.sum())},
            brain_mask=bmask_source,
            calibrated=None if calibrated is None else calibrated.as_dict(), timings_s=timings,
        ))
    return {"m0a": m0a, "record": record, "timings": timings}


def _write_m0a_and_calibrated(out, outdir: Path | None, args, m0a: float, calibrated, perf, sens, sens_geometry):
    """The outputs every calib run shares: --Mo, --osen, -o, and in --outdir M0.txt, the
    sensitivity map and the calibrated perfusion (``sens_geometry``: the sensitivity
    map's affine and header)."""
    from ..io import save_image, write_scalar

    cbf = "aslcal CBF ml/100g/min"
    if args.mo:
        write_scalar(out.path(args.mo), m0a)
    if args.osen and sens is not None:
        save_image(out.path(args.osen), sens, **sens_geometry, description="aslcal coil sensitivity")
    if calibrated is not None:
        save_image(out.path(args.outfile), calibrated.image, perf.affine, header=perf.header, description=cbf)
    if outdir is not None:
        write_scalar(out.path(outdir / "M0.txt"), m0a)
        if sens is not None:
            save_image(out.path(outdir / "sensitivity.nii.gz"), sens, **sens_geometry,
                       description="aslcal coil sensitivity")
        if calibrated is not None:
            save_image(out.path(outdir / "perfusion_calib.nii.gz"), calibrated.image, perf.affine,
                       header=perf.header, description=cbf)


def _apply_known_m0a(args, out, outdir: Path | None) -> dict:
    """``--m0a VALUE``: CBF = 6000 · perfusion / (s · M0a · α) with the given M0a."""
    from ..calibration import apply_calibration
    from ..io import write_json

    t0 = time.perf_counter()
    perf = load(args.infile, "perfusion image (-i)", dtype="float64")
    ref = (perf, "perfusion image (-i)")
    sens = load(args.isen, "sensitivity map (--isen)", ndim=3, reference=ref).data if args.isen else None
    calibrated = apply_calibration(perf.data, args.m0a, alpha=args.alpha, labelling=args.labelling, sensitivity=sens)
    _write_m0a_and_calibrated(out, outdir, args, args.m0a, calibrated, perf, sens,
                              dict(affine=perf.affine, header=perf.header))
    timings = {"calibration": time.perf_counter() - t0}
    if outdir is not None:
        inputs = {k: getattr(args, k) for k in ("infile", "isen") if getattr(args, k)}
        write_json(out.path(outdir / "provenance.json"), provenance(
            args, "calib", outputs=outdir_outputs(out, outdir), inputs=inputs, m0a=args.m0a,
            calibration={"source": "--m0a (given)"},
            calibrated=calibrated.as_dict(), timings_s=timings,
        ))
    return {"m0a": args.m0a, "record": None, "timings": timings}


def _brain_mask(args, calib, ref, *, optional: bool = False):
    """``--bmask``, or one made from the calibration image where a brain mask is used.

    Needed for the body-coil sensitivity and for the satrecov whole-brain maps of
    ``--outdir`` (then a failure is an error, before any computation); otherwise only for
    the QC outputs (``optional=True``, called when everything else has succeeded), where a
    failure is a warning.
    """
    if args.bmask:
        return mask_of(load(args.bmask, "brain mask (--bmask)", ndim=3, reference=ref), "brain mask"), "--bmask"
    required = bool(args.cref) or (args.mode == "satrecov" and args.outdir is not None)
    if not required and not (optional and args.outdir is not None):
        return None, None
    from ..masks import brain_mask_from_calib

    try:
        bm = brain_mask_from_calib(calib.data, voxel_size=calib.voxel_size)
    except InputError as exc:
        if required:
            raise
        log.warning("no brain mask for the QC outputs: %s", exc)
        return None, None
    log.info("brain mask from the calibration image: %d voxels (%.0f ml)", bm.n_voxels, bm.volume_ml)
    return bm.mask, bm.as_dict()


def _qc(out, path: Path, calib, refmask, bmask, args) -> None:
    """The QC figure; without matplotlib a staged placeholder would be wrong, so say so and skip."""
    from ..report import ReportUnavailableError, qc_figure

    try:
        qc_figure(out.path(path), calib, refmask=refmask, brain_mask=bmask,
                  title=f"aslcal calib: reference mask ({args.tissref}) and brain mask")
    except ReportUnavailableError as exc:
        out.discard(path)
        log.warning("QC figure skipped: %s", exc)


def automatic_reference_mask(args, calib):
    """The reference mask made from structural-space maps (calibration.md §8), without FSL.

    Tissue map: ``--refpve`` (the reference tissue's PV map), else ``--tissue-maps`` (FAST or
    BIDS probseg), else a segmentation of the brain-extracted ``-s``.  For CSF, the lateral
    ventricles are kept (atlas-free, or ``--ventricle-atlas`` + ``--str2std``) unless
    ``--csfmaskingoff``.  Then the map is averaged over each calibration voxel through
    ``-t`` and thresholded at ``--pve-threshold``.
    """
    from ..geometry import flirt_to_world
    from ..io import asl_to_structural_world, read_asl_to_structural, read_flirt_matrix
    from ..masks import lateral_ventricles, reference_mask_from_pv, ventricles_from_atlas

    steps: list[str] = []
    details: dict = {"tissref": args.tissref}
    # the transform first: a malformed or singular file fails before any long computation
    trans = read_asl_to_structural(args.trans)
    struct = load(args.struc, "structural image (-s)", ndim=3) if args.struc else None
    brain_struct = None
    if args.refpve:
        from ..io.tissuemaps import load_tissue_map

        # fractions in [0, 1] checked as for --tissue-maps (a percentage map is refused)
        pv_img = load_tissue_map(args.refpve, f"{args.tissref} (--refpve)")
        pv = pv_img.data
        steps.append(f"{args.tissref} map from --refpve")
        grid = pv_img
    elif args.tissue_maps:
        from ..io.tissuemaps import find_tissue_maps, load_tissue_map

        maps = find_tissue_maps(args.tissue_maps, require=(args.tissref,))
        imgs = {t: load_tissue_map(p, t) for t, p in maps.items()}
        grid = imgs[args.tissref]
        for t, img in imgs.items():  # summed voxel by voxel below: one grid
            check_same_grid(img, grid, f"{t} partial-volume map", f"{args.tissref} partial-volume map")
        pv = grid.data
        if all(t in imgs for t in ("csf", "gm", "wm")):
            brain_struct = (imgs["csf"].data + imgs["gm"].data + imgs["wm"].data) >= 0.5
        steps.append(f"{args.tissref} map from {maps[args.tissref].name}")
    else:
        from ..masks import check_brain_extracted, segment_tissues

        check_brain_extracted(struct.data, voxel_size=struct.voxel_size, name=f"structural image (-s) {struct.path}")
        seg = segment_tissues(struct.data, voxel_size=struct.voxel_size)
        pv = seg.pv[args.tissref]
        grid = struct
        details["segmentation"] = seg.as_dict()
        steps.append("segmentation of -s (CSF/GM/WM partial volumes)")
    if struct is not None:
        brain_struct = struct.data > 0
        if grid is not struct:
            check_same_grid(struct, grid, "structural image (-s)", "tissue map")
    if args.tissref == "csf" and not args.csfmaskingoff:
        if args.ventricle_atlas:
            atlas = load(args.ventricle_atlas, "ventricle atlas (--ventricle-atlas)", ndim=3)
            mat = read_flirt_matrix(args.str2std)
            str2std = flirt_to_world(mat, grid.affine, grid.shape[:3], atlas.affine, atlas.shape[:3],
                                     src_zooms=grid.voxel_size, ref_zooms=atlas.voxel_size)
            vm = ventricles_from_atlas(atlas.data > 0.5, atlas.affine, grid.shape[:3], grid.affine, str2std, csf_pv=pv)
            steps.append("lateral ventricles from --ventricle-atlas (eroded once)")
        else:
            if brain_struct is None:
                raise InputError(
                    "isolating the lateral ventricles needs the brain: give the brain-extracted structural -s "
                    "(or all three --tissue-maps), or keep all CSF with --csfmaskingoff"
                )
            vm = lateral_ventricles(pv, brain_struct, voxel_size=grid.voxel_size, affine=grid.affine)
            steps.append(f"lateral ventricles kept ({vm.n_components_kept} components, eroded once)")
        pv = vm.pv
        details["ventricles"] = vm.as_dict()
    world = asl_to_structural_world(trans, calib, grid)
    steps.append("ITK affine -t (inverted: calibration -> structural)" if trans[0] == "itk" else "FLIRT matrix -t")
    steps.append("averaged over each calibration voxel")
    return reference_mask_from_pv(pv, grid.affine, calib.shape[:3], calib.affine, world,
                                  threshold=args.pve_threshold, steps=steps, details=details)
