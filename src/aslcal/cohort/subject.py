"""One subject of a cohort: read and prepare it, then finish it after the packed fit.

The runner (:mod:`aslcal.cohort.pipeline`) calls, for every ASL run:

1. :func:`load_subject` in a reader thread: BIDS metadata (:func:`aslcal.io.bids.read_run`),
   the images (decompressed here, off the main thread), the reference mask, the
   perfusion-weighted image, the brain mask, and — for a saturation-recovery or
   Look-Locker M0 — the masked voxels to fit as :class:`FitJob` s;
2. the packed fit of many subjects' jobs at once (:mod:`aslcal.cohort.packing`);
3. :func:`finish_subject`: M0a (reference region, M0Estimate or voxelwise), the
   calibrated CBF, the summary values and the provenance record, on the device of the
   fit (NumPy or CuPy), returned as host arrays ready for
   :meth:`aslcal.io.DerivativesWriter.write_subject`.

Each step raises :class:`SubjectError` carrying the subject key, the stage that failed
(one of :data:`STAGES`) and, for a BIDS metadata error, the file and field at fault.

Calibration choices for BIDS inputs (documented in the README):

* **M0 of the run**: ``M0Type`` "Estimate" gives M0a directly (``M0Estimate``, the M0 of
  blood in BIDS).  An M0 with one TR is a long-TR calibration image (the mean of its
  volumes).  Several TRs, or ``LookLocker`` true, make a recovery series that is fitted
  voxelwise (recovery times = ``RepetitionTimePreparation`` for saturation recovery,
  ``InversionTime`` for Look-Locker; two distinct ``FlipAngle`` values = a dual-flip-angle
  series, the lower one the last phase).  "Absent" needs ``allow_control_m0`` and no
  background suppression: the mean control image is the M0.
* **Echo times**: the tissue T2 correction uses the M0's ``EchoTime``, the blood T2
  decay of M0a the ASL data's (they may differ with a separate M0 scan).
* **Reference region**: with ``ref_masks`` (a folder laid out like aslcal's own outputs,
  ``sub-X/[ses-Y/]perf/<key>_desc-ref_mask.nii[.gz]``, in ASL space), M0a comes from the
  reference region (calibration.md §4 / §7.4).  Without it, the M0 is voxelwise
  (calibration.md §5).  The mode is one per run of the runner, never mixed silently.
* **Perfusion**: the mean of ``control − label`` (BIDS ``ΔM`` convention), else the mean
  of the ``deltam`` volumes; CBF = 6000·ΔM/(M0a·α) (calibration.md §9, no kinetic model),
  α from ``LabelingEfficiency`` or the labelling type.
* **Look-Locker M0 scale** (``m0_scale="auto"``): ``relaxed`` (M0t / sin(g·FA)) when the
  ASL volumes have their own readout (the ASL sidecar's ``LookLocker`` false), ``readout``
  when the ASL series is itself a Look-Locker acquisition (QUASAR-like).
* **Brain mask**: :func:`aslcal.masks.brain_mask_from_calib` of the M0 image (the
  longest-TR volume of a recovery series; the mean control image for "Estimate").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AslcalError, InputError
from ..io.bids import (
    AslAcquisition, AslRun, BidsFieldError, asl_slice_timing, background_suppression_pulses, bolus_cutoff,
    dataset_path, input_checksum, is_number, read_run,
)
from ..io.nifti import load_image

__all__ = [
    "STAGES",
    "CohortOptions",
    "FitJob",
    "PreparedSubject",
    "SubjectError",
    "SubjectOutputs",
    "finish_subject",
    "load_subject",
    "ref_mask_path",
]

log = logging.getLogger("aslcal")

#: Stages of one subject, in order; a failure record names one of them.
STAGES = ("metadata", "load", "prepare", "fit", "calibrate", "write", "worker")

_M0_SCALES = ("auto", "readout", "relaxed")
#: How the CBF is computed from ΔM (CohortOptions.quantification).
QUANTIFICATIONS = ("calibration", "whitepaper")
_TISSREFS = ("csf", "wm", "gm", "none")


class SubjectError(AslcalError):
    """A subject failed at one stage; the run records it and goes on.

    Attributes
    ----------
    key : str
    stage : str
        One of :data:`STAGES`.
    message : str
    details : dict
        ``file`` and ``field`` for a BIDS metadata error, ``error`` (the exception type).
    """

    def __init__(self, key: str, stage: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{key}: {stage}: {message}")
        self.key = key
        self.stage = stage
        self.message = message
        self.details = dict(details or {})


def _fail(key: str, stage: str, exc: BaseException) -> SubjectError:
    details: dict[str, Any] = {"error": type(exc).__name__}
    for attr in ("file", "field"):
        value = getattr(exc, attr, None)
        if value is not None:
            details[attr] = str(value)
    message = str(exc) if isinstance(exc, AslcalError) else f"{type(exc).__name__}: {exc}"
    return SubjectError(key, stage, message or type(exc).__name__, details)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CohortOptions:
    """Calibration options of a cohort run (the options of ``aslcal calib`` that apply).

    Attributes
    ----------
    ref_masks : str or None
        Folder of reference masks (module docstring).
    anat : str or None
        Folder of brain-extracted T1w images for the automatic reference mask (module
        docstring).  With neither ``ref_masks`` nor ``anat`` the M0 is voxelwise.
    all_csf : bool
        Automatic mask: keep all CSF, not only the lateral ventricles.
    pve_threshold : float
        Automatic mask: threshold on the reference tissue's partial volume (0.9).
    tissref : {"csf", "wm", "gm", "none"}
        Reference tissue (T1, T2, pc defaults from the run's field-strength table).
    t1r, t2r, t2b, pc : float or None
        User values (s, ms, ms, ml/g) overriding the table.
    t2star : bool
        T2* instead of T2 (defaults change).
    cgain : float
        Gain of the ASL data relative to the calibration image.
    taq : float, seconds
        Acquisition time of the long-TR calibration image (TR correction).
    m0_scale : {"auto", "readout", "relaxed"}
        Scale of a Look-Locker M0 (module docstring).
    priors, fix_a : bool
        fabber's priors; fix the saturation efficiency A = 1.
    model : {"exact", "fabber"}
        Look-Locker signal model.
    allow_control_m0 : bool
        ``M0Type`` "Absent": use the mean control image as M0 (no background suppression).
    voxel_pc, voxel_t1t : float
        Generic partition coefficient and tissue T1 of the voxelwise M0 (calibration.md §5).
    edge_correction : bool
        Voxelwise M0 edge correction.
    quantification : {"calibration", "whitepaper"}
        ``calibration``: CBF = 6000·ΔM/(M0a·α), ΔM taken as a perfusion image (as asl_calib
        ``-i/-o``); ``whitepaper``: the single-PLD white-paper model from the run's
        ``PostLabelingDelay`` and ``LabelingDuration`` (PASL: ``BolusCutOffDelayTime``),
        per slice with ``SliceTiming`` (:func:`aslcal.calibration.quantify_whitepaper`).
    tissue_overrides : dict or None
        Tissue-table values overriding the built-in table (``--tissue-table`` file).
    backend, dtype : str or None
        Fitting backend (``numpy``, ``numba``, ``cuda``; None = automatic) and dtype.
    bs_efficiency : float or None
        Inversion efficiency of one background-suppression pulse (e.g. 0.95, as ASLPrep):
        a run with ``BackgroundSuppression`` true and no ``LabelingEfficiency`` gets
        α = (labelling type's default) x ``bs_efficiency`` ** ``BackgroundSuppressionNumberPulses``.
        None (default): no such correction (asl_calib, calibration.md §9).
    """

    ref_masks: str | None = None
    anat: str | None = None
    all_csf: bool = False
    pve_threshold: float = 0.9
    tissref: str = "csf"
    t1r: float | None = None
    t2r: float | None = None
    t2b: float | None = None
    pc: float | None = None
    t2star: bool = False
    cgain: float = 1.0
    taq: float = 0.0
    m0_scale: str = "auto"
    priors: bool = False
    fix_a: bool = False
    model: str = "exact"
    allow_control_m0: bool = False
    voxel_pc: float = 0.9
    voxel_t1t: float = 1.3
    edge_correction: bool = True
    quantification: str = "calibration"
    tissue_overrides: dict | None = None
    backend: str | None = None
    dtype: str | None = None
    bs_efficiency: float | None = None

    def __post_init__(self) -> None:
        if self.tissref not in _TISSREFS:
            raise InputError(f"tissref={self.tissref!r}: expected one of {', '.join(_TISSREFS)}")
        if self.m0_scale not in _M0_SCALES:
            raise InputError(f"m0_scale={self.m0_scale!r}: expected one of {', '.join(_M0_SCALES)}")
        if self.model not in ("exact", "fabber"):
            raise InputError(f"model={self.model!r}: expected 'exact' or 'fabber'")
        if self.quantification not in QUANTIFICATIONS:
            raise InputError(f"quantification={self.quantification!r}: expected one of {', '.join(QUANTIFICATIONS)}")
        for name in ("t1r", "t2r", "t2b", "pc", "cgain", "voxel_pc", "voxel_t1t"):
            value = getattr(self, name)
            optional = name in ("t1r", "t2r", "t2b", "pc")
            if (value is not None or not optional) and not (is_number(value) and value > 0):
                raise InputError(f"{name}={value!r}: expected a positive number")
        if self.bs_efficiency is not None and not (is_number(self.bs_efficiency) and 0 < self.bs_efficiency <= 1):
            raise InputError(f"bs_efficiency={self.bs_efficiency!r}: expected the efficiency of one pulse, in (0, 1]")
        if not (is_number(self.taq) and self.taq >= 0):
            raise InputError(f"taq={self.taq!r}: expected a number of seconds >= 0")
        for name in ("t2star", "priors", "fix_a", "allow_control_m0", "edge_correction", "all_csf"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}={getattr(self, name)!r}: expected True or False")
        if self.ref_masks is not None and self.anat is not None:
            raise InputError("ref_masks and anat: give one source of reference masks, not both")
        if self.anat is not None and (not str(self.anat) or not Path(self.anat).is_dir()):
            raise InputError(f"anat={str(self.anat)!r}: the anatomical folder does not exist")
        if self.anat is not None and self.tissref == "none":
            raise InputError("tissref='none' cannot be segmented: the automatic mask needs csf, wm or gm")
        if self.tissref == "none" and self.ref_masks is not None:
            # no tissue defaults: the values every reference-region M0a needs (T2r only
            # with TE > 0, known per run: checked there)
            missing = [f"{name} (--{name})" for name in ("t1r", "pc") if getattr(self, name) is None]
            if missing:
                raise InputError(f"tissref='none' (--tissref none) has no tissue defaults: give {', '.join(missing)}")
        if not (is_number(self.pve_threshold) and 0 < self.pve_threshold <= 1):
            raise InputError(f"pve_threshold={self.pve_threshold!r}: expected a number in (0, 1]")
        if self.ref_masks is not None and (not str(self.ref_masks) or not Path(self.ref_masks).is_dir()):
            raise InputError(f"ref_masks={str(self.ref_masks)!r}: the reference masks folder does not exist")

    @property
    def m0_mode(self) -> str:
        """``refregion`` with reference masks (given or automatic), else ``voxel``."""
        return "refregion" if self.ref_masks is not None or self.anat is not None else "voxel"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["m0_mode"] = self.m0_mode
        for name in ("ref_masks", "anat"):
            if getattr(self, name) is not None:
                out[name] = os.fspath(getattr(self, name))
        return out


def _image_files(base: Path, stem: str) -> list[Path]:
    """``stem.nii.gz`` and ``stem.nii`` in ``base``, those that exist (``.nii.gz`` first)."""
    return [p for p in (base / f"{stem}.nii.gz", base / f"{stem}.nii") if p.is_file()]


def ref_mask_path(folder: str | os.PathLike, run: AslRun) -> Path | None:
    """The run's reference mask in ``folder`` (``.nii.gz`` or ``.nii``), None if absent;
    both present is an :class:`~aslcal.errors.InputError` (which one is meant is unknown)."""
    base = Path(folder) / f"sub-{run.subject}"
    if run.session:
        base = base / f"ses-{run.session}"
    base = base / "perf"
    found = _image_files(base, f"{run.key}_desc-ref_mask")
    if len(found) > 1:
        raise InputError(f"{found[0]}: two reference masks for {run.key}, {found[0].name} and "
                         f"{found[1].name}; keep one")
    return found[0] if found else None


#: Names of an ASL->T1w transform beside the T1w: ``<stem>`` + one of these.  ``.mat``: a
#: FLIRT matrix (text), or an ITK affine in ITK's binary MATLAB format (ANTs); ``.txt``: an
#: ITK text transform (fMRIPrep's form).  An ITK ``from-asl_to-T1w`` file maps T1w points
#: to ASL points (aslcal.io.transforms), a FLIRT matrix ASL to T1w.
ANAT_XFM_SUFFIXES = ("_from-asl_to-T1w_mode-image_xfm.mat", "_from-asl_to-T1w_mode-image_xfm.txt")


def anat_paths(folder: str | os.PathLike, run: AslRun) -> tuple[Path | None, Path | None]:
    """The run's brain-extracted T1w and its ASL->T1w transform file in ``folder``.

    The T1w: ``sub-X/ses-Y/anat/sub-X_ses-Y_desc-brain_T1w.nii[.gz]``, else
    ``sub-X/anat/sub-X_desc-brain_T1w.nii[.gz]`` (one structural for all sessions).
    The transform (:data:`ANAT_XFM_SUFFIXES`: a FLIRT matrix or an ITK/ANTs affine), the
    most specific first: ``<run key>_from-asl_to-T1w_mode-image_xfm.{mat,txt}`` (the ASL
    run's own, e.g. ``sub-X_ses-Y_run-2_...``), then
    ``sub-X_ses-Y_from-asl_to-T1w_mode-image_xfm.{mat,txt}`` in the session's ``anat/``
    folder, then the subject-level ones.  ``(None, None)`` when there is no image; the
    transform is None when absent (the images are then taken as aligned in world
    coordinates, as BIDS images of one session are).

    Raises
    ------
    InputError
        A ``.mat`` and a ``.txt`` transform of one name: which one is meant is unknown.
    """
    subject = Path(folder) / f"sub-{run.subject}"
    places = []
    if run.session:
        places.append((subject / f"ses-{run.session}" / "anat", f"sub-{run.subject}_ses-{run.session}"))
    places.append((subject / "anat", f"sub-{run.subject}"))
    for i, (base, prefix) in enumerate(places):
        found = _image_files(base, f"{prefix}_desc-brain_T1w")
        if not found:
            continue
        image = found[0]
        # a matrix registers the ASL to this T1w: looked for where the T1w is and, for the
        # subject's one T1w, in the session's folder too (never a matrix made against
        # another T1w); the run's own first, then the folder's
        for mat_base, mat_prefix in places[:i + 1]:
            for stem in dict.fromkeys((run.key, mat_prefix)):
                found = [mat_base / f"{stem}{suffix}" for suffix in ANAT_XFM_SUFFIXES
                         if (mat_base / f"{stem}{suffix}").is_file()]
                if len(found) > 1:
                    raise InputError(f"two ASL->T1w transforms for {run.key}: {found[0]} and {found[1]}; "
                                     "which one is meant is unknown (keep one)")
                if found:
                    return image, found[0]
        return image, None
    return None, None


# --------------------------------------------------------------------------- prepared


@dataclass
class FitJob:
    """Voxels of one subject to fit with one design (packed with other subjects' jobs).

    Attributes
    ----------
    role : {"brain", "ref"}
        ``ref`` only with priors (the reference fit has its own T1 prior).
    group : tuple
        Jobs with equal groups share one fit launch (same design and priors).
    tis, fa, lfa, dt, prior_t1, nphases
        Design: one recovery time per volume (s), Look-Locker flip angles (degrees),
        readout spacing (s), T1 prior mean (s) or None, high-flip-angle phases (each as
        long as the low-flip-angle one).
    mask : ndarray of bool, spatial
        The voxels fitted.
    series : ndarray of shape (n_vox, n_vol), float32
        Their signals (C order of ``mask``).
    ti_shift : ndarray of shape (n_vox,), seconds, or None
        Per-voxel delay added to every recovery time: the slice's acquisition time of a
        2-D multi-slice readout (``SliceTiming``); None for a 3-D readout.
    """

    role: str
    tis: tuple[float, ...]
    fa: float | None
    lfa: float | None
    dt: float | None
    prior_t1: float | None
    mask: np.ndarray = field(repr=False)
    series: np.ndarray = field(repr=False)
    ti_shift: np.ndarray | None = field(default=None, repr=False)
    nphases: int = 1

    @property
    def group(self) -> tuple:
        return (self.tis, self.fa, self.lfa, self.dt, self.prior_t1, self.nphases)

    @property
    def n_vox(self) -> int:
        return int(self.series.shape[0])


@dataclass
class PreparedSubject:
    """A subject after the reader stage (host arrays; no device memory held)."""

    key: str
    acq: AslAcquisition
    affine: np.ndarray = field(repr=False)
    shape: tuple[int, int, int]
    perf: np.ndarray = field(repr=False)
    perf_source: str
    brain: np.ndarray = field(repr=False)
    brain_info: dict
    ref: np.ndarray | None = field(repr=False)
    ref_file: str | None
    m0_kind: str
    m0_image: np.ndarray | None = field(repr=False)
    m0_tr: float | None
    jobs: list[FitJob]
    inputs: dict[str, int]
    ref_info: dict | None = None
    #: :func:`~aslcal.io.bids.input_checksum` of every input, by dataset path
    input_checksums: dict[str, str] = field(default_factory=dict)
    #: CSF/GM/WM voxels in ASL space (segmentation partial volume >= pve_threshold; ``--anat``
    #: with a fitted M0): tissue T1 means
    tissue_masks: dict[str, np.ndarray] | None = field(default=None, repr=False)
    #: white-paper timing (quantification "whitepaper"): labelling, pld, tau, ti1, slice times
    kinetics: dict[str, Any] | None = None
    #: (α, its source) with background-suppression pulses (``--bs-efficiency``), else None
    bs_alpha: tuple[float, str] | None = None
    #: the file (dataset path) that gave ``M0Estimate`` (M0Type "Estimate"), else None
    m0_estimate_file: str | None = None
    #: doubts about the input found while preparing (the subject's ``warnings``)
    warnings: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        arrays = [self.perf, self.brain, self.ref, self.m0_image] + [j.series for j in self.jobs]
        arrays += list((self.tissue_masks or {}).values())
        return int(sum(a.nbytes for a in arrays if a is not None))


@dataclass
class SubjectOutputs:
    """What :func:`finish_subject` returns: the arguments of ``write_subject``."""

    key: str
    images: dict[str, tuple]
    records: dict[str, Any]
    provenance: dict[str, Any]


# --------------------------------------------------------------------------- load


def _without_timings(record: Any) -> Any:
    """``record`` without its ``elapsed_s`` entries: provenance must be byte-identical
    between runs (resume, shards)."""
    if isinstance(record, dict):
        return {k: _without_timings(v) for k, v in record.items() if k != "elapsed_s"}
    if isinstance(record, list):
        return [_without_timings(v) for v in record]
    return record


def _bids_uri(rel: str) -> str:
    """``bids:raw:<path>`` for a path inside the BIDS dataset (as :func:`dataset_path` gives it,
    relative); a path outside it as a ``file://`` URI."""
    path = Path(rel)
    return path.as_uri() if path.is_absolute() else f"bids:raw:{rel}"  # as named: links not followed


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def load_subject(run: AslRun, options: CohortOptions, *, bids_root: Path | None = None) -> PreparedSubject:
    """Reader stage: metadata, images, masks and fit jobs of one run (see module docstring).

    Raises
    ------
    SubjectError
        With stage ``metadata``, ``load`` or ``prepare``.
    """
    key = run.key
    try:
        acq = read_run(run, allow_control_m0=options.allow_control_m0)
    except (AslcalError, OSError, ValueError) as exc:
        raise _fail(key, "metadata", exc) from exc

    try:
        asl = acq.load_asl(dtype="float32")
        m0_img = acq.load_m0(dtype="float32") if acq.m0.kind == "separate" else None
        ref = ref_file = anat = None
        if (options.ref_masks is not None or options.anat is not None) and acq.m0.kind != "estimate":
            ref, ref_file, anat = _load_reference(run, asl, options)
        if m0_img is not None:
            _check_grid(m0_img.data.shape[:3], m0_img.affine, asl, m0_img.path)
    except (AslcalError, OSError, ValueError, MemoryError) as exc:
        raise _fail(key, "load", exc) from exc

    m0_files = (acq.m0.path, *acq.m0.sidecar_files) if acq.m0.kind == "separate" else ()
    paths = [p for p in (run.asl, *acq.sidecar_files, acq.aslcontext, *m0_files, ref_file,
                         anat[2] if anat is not None else None) if p is not None]
    names = [dataset_path(p, bids_root) for p in paths]
    inputs = {name: _file_size(p) for name, p in zip(names, paths)}
    # every input by content (an edited field of the same length, an image replaced by one
    # of the same size are changes a resume must see: state.changed_inputs)
    checksums = {name: input_checksum(p) for name, p in zip(names, paths)}
    try:
        return _prepare(key, acq, asl, m0_img, ref, ref_file, inputs, checksums, options, bids_root, anat)
    except (AslcalError, OSError, ValueError, MemoryError, FloatingPointError) as exc:
        raise _fail(key, "prepare", exc) from exc


def _load_reference(run: AslRun, asl, options: CohortOptions):
    """``(mask, file, anat)``: a given reference mask (checked on the ASL grid), or for
    the automatic mask ``anat = (T1w image, transform or None, its file or None)``, the
    transform ``("flirt", FLIRT matrix)`` or ``("itk", world ASL -> world T1w)``."""
    given = options.ref_masks is not None
    sub = f"sub-{run.subject}/" + (f"ses-{run.session}/" if run.session else "")
    if given:
        folder, path, mat = options.ref_masks, ref_mask_path(options.ref_masks, run), None
        what, expected = "reference mask", f"{sub}perf/{run.key}_desc-ref_mask.nii.gz"
    else:
        folder, (path, mat) = options.anat, anat_paths(options.anat, run)
        what, expected = "brain-extracted T1w", f"{sub}anat/<sub>[_<ses>]_desc-brain_T1w.nii.gz"
    if path is None:
        raise InputError(f"no {what} for {run.key} in {str(folder)!r} (expected {expected})")
    if not given:
        twins = _image_files(path.parent, path.name.removesuffix(".gz").removesuffix(".nii"))
        if len(twins) > 1:
            raise InputError(f"two {what} images for {run.key}: {twins[0]} and {twins[1]}; which one is meant is "
                             "unknown (keep one)")
    img = load_image(path, dtype="float32", ndim=3, name=f"{what} of {run.key}")
    if given:
        _check_grid(img.data.shape, img.affine, asl, path)
        return img.data, path, None
    from ..io.transforms import read_asl_to_structural

    if mat is None and run.session and path.parent.parent.name != f"ses-{run.session}":
        # the subject's one structural for a session's ASL: another session's scanner
        # coordinates, unless the images were registered into one space beforehand
        log.warning("%s: no ASL->T1w transform (%s) for the subject-level T1w %s: the images are taken "
                    "as aligned in world coordinates", run.key,
                    f"{run.key}{ANAT_XFM_SUFFIXES[0]}", path.name)
    return None, path, (img, None if mat is None else read_asl_to_structural(mat), mat)


def _check_grid(shape: tuple, affine: np.ndarray, asl, path: Path) -> None:
    asl_shape = tuple(int(s) for s in asl.data.shape[:3])
    if tuple(int(s) for s in shape[:3]) != asl_shape:
        raise InputError(
            f"{str(path)!r}: grid {tuple(shape[:3])} does not match the ASL image grid {asl_shape}"
        )
    if not np.allclose(affine, asl.affine, atol=1e-3, rtol=0):
        raise InputError(
            f"{str(path)!r}: its affine differs from the ASL image's by up to "
            f"{float(np.max(np.abs(affine - asl.affine))):.4g} mm; expected the ASL grid"
        )


def _volumes(data: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
    series = data if data.ndim == 4 else data[..., None]
    return series[..., list(idx)]


def _prepare(key, acq: AslAcquisition, asl, m0_img, ref, ref_file, inputs, checksums, options: CohortOptions,
             bids_root, anat=None) -> PreparedSubject:
    from ..masks import brain_mask_from_calib

    # α with background suppression (--bs-efficiency): here, so that a missing pulse count
    # fails the run before any fit
    bs_alpha = _background_suppressed_alpha(acq, options) if acq.metadata.get("LabelingEfficiency") is None else None
    data = asl.data if asl.data.ndim == 4 else asl.data[..., None]
    shape = tuple(int(s) for s in data.shape[:3])
    control, label, deltam = (acq.volumes_of(t) for t in ("control", "label", "deltam"))
    if control and label:
        perf = _volumes(data, control).mean(axis=-1, dtype=np.float64) - _volumes(data, label).mean(
            axis=-1, dtype=np.float64)
        perf_source = f"mean(control) - mean(label) ({len(control)} control, {len(label)} label volumes)"
    elif deltam:
        perf = _volumes(data, deltam).mean(axis=-1, dtype=np.float64)
        perf_source = f"mean(deltam) ({len(deltam)} volumes)"
    else:
        raise InputError(
            f"{acq.aslcontext}: column 'volume_type' has neither control and label nor "
            "deltam volumes: no perfusion-weighted image to calibrate"
        )
    perf = perf.astype(np.float32)
    perf_volumes = tuple(control) + tuple(label) if control and label else tuple(deltam)
    kinetics = None
    if options.quantification == "whitepaper":
        kinetics = _whitepaper_kinetics(acq, perf_volumes)
    warnings = _input_warnings(acq, perf_volumes, options) + _vendor_scaling_warnings(acq, bool(deltam) and not (
        control and label))
    for warning in warnings:
        log.warning("%s: %s", key, warning)

    src = acq.m0
    m0_image = m0_tr = None
    jobs: list[FitJob] = []
    series = None
    if src.kind == "estimate":
        m0_kind = "estimate"
    else:
        series = m0_img.data if src.kind == "separate" else _volumes(data, src.volumes)
        if src.is_satrecov:
            m0_kind = "lookLocker" if src.look_locker else "satrecov"
        else:
            m0_kind = "control" if src.kind == "control" else "longtr"
            m0_image = series.mean(axis=-1, dtype=np.float64).astype(np.float32)
            m0_tr = float(src.trs[0])

    # Brain mask: from the M0 image, the longest-TR volume of a recovery series, or the
    # mean control image.
    if m0_image is not None:
        bm_source, bm_image = "M0 image", m0_image
    elif series is not None:
        if src.look_locker:
            bm_source, bm_image = "mean of the Look-Locker series", series.mean(axis=-1)
        else:
            last = int(np.argmax(np.asarray(src.trs)))
            bm_source, bm_image = f"M0 volume with the longest TR ({src.trs[last]} s)", series[..., last]
    elif control:
        bm_source, bm_image = "mean control image", _volumes(data, control).mean(axis=-1)
    else:
        raise InputError(
            f"{acq.run.sidecar}: no M0 image and no control volume to make a brain mask from"
        )
    bm = brain_mask_from_calib(bm_image, voxel_size=asl.voxel_size)
    brain = np.asarray(bm.mask, dtype=bool)
    brain_info = {"source": bm_source, **bm.as_dict()}

    ref_info = None
    tissue_pv = None
    if anat is not None:
        from ..io.transforms import asl_to_structural_world
        from ..masks import reference_mask_from_structural

        t1w, xfm, _ = anat
        world = np.eye(4) if xfm is None else asl_to_structural_world(xfm, asl, t1w)
        auto = reference_mask_from_structural(
            t1w.data, t1w.affine, shape, asl.affine, world, tissref=options.tissref,
            all_csf=options.all_csf, threshold=options.pve_threshold, name=f"T1w {t1w.path.name}",
            tissue_pv=m0_kind in ("satrecov", "lookLocker"),  # a T1 map to summarise per tissue
        )
        tissue_pv = auto.tissue_pv
        ref = auto.mask
        how = {None: "world coordinates (no transform file)", "flirt": "FLIRT ASL->T1w",
               "itk": "ITK/ANTs affine from-asl_to-T1w"}[None if xfm is None else xfm[0]]
        ref_info = {"source": "automatic", "transform": how, **_without_timings(auto.as_dict())}
    ref_bool = None
    if ref is not None and anat is None:
        # a given mask, read as aslcal calib -m reads it (every voxel > 0; 0.5 was the cut
        # here, and a partial-volume mask gave another M0a than calib's, without a word)
        from ..masks import mask_from_image

        ref_bool, warning = mask_from_image(np.asarray(ref), f"reference mask {ref_file}")
        if warning:
            log.warning("%s: %s", key, warning)
            warnings.append(warning)
    elif ref is not None:
        ref_bool = np.asarray(ref, dtype=bool)
    if ref_bool is not None and not ref_bool.any():
        raise InputError(f"reference mask {str(ref_file)!r} has no voxel > 0")

    if m0_kind in ("satrecov", "lookLocker"):
        jobs = _fit_jobs(acq, series, brain, ref_bool, options)

    return PreparedSubject(
        key=key, acq=acq, affine=np.asarray(asl.affine, dtype=np.float64), shape=shape, perf=perf,
        perf_source=perf_source, brain=brain, brain_info=brain_info, ref=ref_bool,
        ref_file=dataset_path(ref_file, bids_root) if ref_file is not None else None, m0_kind=m0_kind,
        m0_image=m0_image, m0_tr=m0_tr, jobs=jobs, inputs=inputs, input_checksums=checksums, ref_info=ref_info,
        tissue_masks=None if tissue_pv is None else {
            t: np.asarray(v) >= options.pve_threshold for t, v in tissue_pv.items()},
        kinetics=kinetics, bs_alpha=bs_alpha,
        m0_estimate_file=(dataset_path(acq.source_of("M0Estimate"), bids_root) if src.kind == "estimate"
                          else None),
        warnings=warnings,
    )


#: Sidecar fields of Philips scale slopes (dcm2niix), compared between the ASL and the m0scan.
_PHILIPS_SLOPES = ("PhilipsRescaleSlope", "PhilipsScaleSlope", "RWVSlope")


def _vendor_scaling_warnings(acq: AslAcquisition, from_deltam: bool) -> list[str]:
    """Known vendor scalings of the ASL data relative to the M0 that aslcal does not undo
    (no automatic correction: whether the converter already did is not in the sidecar)."""
    out = []
    maker = acq.metadata.get("Manufacturer")
    maker = maker.strip().upper() if isinstance(maker, str) else ""
    if from_deltam and (maker == "GE" or maker.startswith("GE ")):
        nex = acq.metadata.get("NumberOfAverages")
        nex_known = is_number(nex) and nex > 0 and math.isfinite(32.0 * nex)
        pairs = acq.metadata.get("TotalAcquiredPairs")
        gain = (f"--cgain {32 * nex:g} (32 x NumberOfAverages {nex:g})" if nex_known else
                f"--cgain 32*NEX (NumberOfAverages is not given; GE's NEX is usually the TotalAcquiredPairs, "
                f"{pairs:g} here: --cgain {32 * pairs:g})" if is_number(pairs) and 0 < pairs < 1e6 else
                "--cgain 32*NEX")
        out.append("Manufacturer GE with deltam volumes: GE product deltam images are commonly scaled by "
                   "32 x NumberOfAverages relative to the M0 (ExploreASL divides by it); aslcal applies no vendor "
                   f"scale: if the converter did not rescale, pass {gain}")
    if "PHILIPS" in maker and acq.m0.kind == "separate":
        m0meta = acq.m0.metadata
        display = acq.metadata.get("UsePhilipsFloatNotDisplayScaling", m0meta.get("UsePhilipsFloatNotDisplayScaling"))
        if display is not None and not isinstance(display, str) and display == 0:
            def number(value) -> bool:
                return is_number(value) and value != 0

            differ = [f"{name} {acq.metadata[name]:g} (ASL) vs {m0meta[name]:g} (M0), ratio "
                      f"{acq.metadata[name] / m0meta[name]:.4g}"
                      for name in _PHILIPS_SLOPES
                      if number(acq.metadata.get(name)) and number(m0meta.get(name))
                      and not math.isclose(acq.metadata[name], m0meta[name], rel_tol=1e-6)]
            if differ:
                out.append("Philips display values (UsePhilipsFloatNotDisplayScaling 0) with different scale slopes: "
                           + "; ".join(differ) + ": the ASL/M0 signal ratio is off by the ratio of the slopes "
                           "(aslcal applies no vendor scale; convert with float scaling, or correct with --cgain)")
    return out


def _input_warnings(acq: AslAcquisition, perf_volumes: tuple[int, ...], options: CohortOptions) -> list[str]:
    """Doubts about a run's input that do not stop it (recorded in its ``warnings``)."""
    out = []
    if acq.m0_type == "Absent" and acq.run.m0scan is not None:
        out.append(f"{acq.source_of('M0Type').name} says M0Type 'Absent' but {acq.run.m0scan.name} exists "
                   "(BIDS: M0Type is then 'Separate'); the mean control image was used as M0, not the m0scan")
    if options.bs_efficiency is not None and acq.background_suppression \
            and acq.metadata.get("LabelingEfficiency") is not None:
        out.append(f"--bs-efficiency not applied: {acq.source_of('LabelingEfficiency').name} gives "
                   "LabelingEfficiency, which is used as alpha as it is")
    pld = acq.post_labeling_delay
    if options.quantification != "whitepaper" and pld is not None:
        distinct = sorted({float(pld[i]) for i in perf_volumes})
        if len(distinct) > 1:
            out.append(f"PostLabelingDelay has {len(distinct)} values {distinct} (s) over the perfusion volumes "
                       f"({acq.source_of('PostLabelingDelay').name}): the PLDs were averaged into one perfusion "
                       "image, whose CBF is that of no single PLD")
    return out


def _whitepaper_kinetics(acq: AslAcquisition, volumes: tuple[int, ...]) -> dict[str, Any]:
    """PLD (PASL: TI), τ or TI1 and slice times of the perfusion volumes, for the white paper.

    Raises a :class:`~aslcal.io.bids.BidsFieldError` naming the sidecar and the field when
    one is missing, or when the volumes have several PLDs (the model is single-PLD).
    """

    js = acq.run.sidecar
    slice_times, slice_axis = asl_slice_timing(acq)

    def single(values, name: str, why: str) -> float:
        if values is None:
            raise BidsFieldError(f"{js}: required field {name!r} is missing ({why}; or use "
                                 "--quantification calibration)", file=js, field=name)
        distinct = sorted({float(values[i]) for i in volumes})
        if len(distinct) != 1:
            where = acq.source_of(name)
            raise BidsFieldError(f"{where}: field {name!r} has several values {distinct} over the perfusion "
                                 "volumes: the white-paper model is single-PLD (multi-PLD CBF needs a "
                                 "kinetic-model fit; --quantification calibration only calibrates the "
                                 "PLD-averaged difference, which is no CBF)", file=where, field=name)
        return distinct[0]

    lab = acq.labeling_type.lower()
    out: dict[str, Any] = {"labelling": lab, "tau": None, "ti1": None,
                           "slice_times": slice_times, "slice_axis": slice_axis}
    out["pld"] = single(acq.post_labeling_delay, "PostLabelingDelay",
                        "the white-paper model needs the " + ("inversion time TI" if lab == "pasl" else "PLD"))
    if lab == "pasl":
        cutoff = bolus_cutoff(acq)
        if cutoff is None:
            flag_js = acq.source_of("BolusCutOffFlag")
            raise BidsFieldError(f"{flag_js}: field 'BolusCutOffFlag' is not true: PASL without a bolus cut-off "
                                 "has no known bolus duration TI1 for the white-paper model (use "
                                 "--quantification calibration)", file=flag_js, field="BolusCutOffFlag")
        technique = acq.metadata.get("BolusCutOffTechnique")
        # BIDS: Q2TIPS, QUIPSS or QUIPSSII.  QUIPSS (I) saturates the imaging slab at TI1,
        # not the labelling slab: the bolus is not TI1 long and the formula does not apply;
        # any other spelling ("QUIPSS I", ...) is refused rather than guessed
        if technique is not None and (not isinstance(technique, str) or technique.strip().upper().replace(
                " ", "").replace("-", "") not in ("QUIPSSII", "QUIPSS2", "Q2TIPS")):
            where = acq.source_of("BolusCutOffTechnique")
            raise BidsFieldError(f"{where}: field 'BolusCutOffTechnique' = {technique!r}: the white-paper PASL "
                                 "model needs a bolus of duration TI1 (QUIPSSII or Q2TIPS); QUIPSS (I) is not "
                                 "supported (use --quantification calibration)", file=where,
                                 field="BolusCutOffTechnique")
        out["ti1"] = cutoff[0]
        if out["ti1"] > out["pld"]:
            where = acq.source_of("BolusCutOffDelayTime")
            raise BidsFieldError(f"{where}: field 'BolusCutOffDelayTime' = {out['ti1']!r} s is after the inversion "
                                 f"time TI = {out['pld']!r} s (PostLabelingDelay): the bolus would be cut off after "
                                 "the readout", file=where, field="BolusCutOffDelayTime")
    else:
        out["tau"] = single(acq.labeling_duration, "LabelingDuration", "the white-paper model needs τ")
        if not out["tau"] > 0:
            where = acq.source_of("LabelingDuration")
            raise BidsFieldError(f"{where}: field 'LabelingDuration' = {out['tau']!r}: the white-paper model "
                                 "needs the labelling duration τ > 0 s (or use --quantification calibration)",
                                 file=where, field="LabelingDuration")
    # the labelling, the delay and the readout happen within each volume's repetition time
    trs = [float(acq.tr[i]) for i in volumes if acq.tr[i] > 0]
    end = out["pld"] + (out["tau"] or 0.0)
    if trs and end >= min(trs):
        where = acq.source_of("PostLabelingDelay")
        what = ("the inversion time TI" if lab == "pasl" else
                f"the labelling duration τ = {out['tau']!r} s plus the PLD")
        raise BidsFieldError(f"{where}: field 'PostLabelingDelay' = {out['pld']!r} s: {what} ends at {end!r} s, not "
                             f"within the repetition time {min(trs)!r} s (RepetitionTimePreparation) of the "
                             "perfusion volumes; milliseconds, or a field of another sequence?", file=where,
                             field="PostLabelingDelay")
    return out


def _design_of(acq: AslAcquisition) -> tuple[tuple[float, ...], float | None, float | None, int]:
    """(tis per volume, fa, lfa, nphases) of the run's recovery series: ``nphases`` high-
    flip-angle phases, as long as the low-flip-angle one (a QUASAR-like 3 + 1)."""
    src = acq.m0
    where = src.sidecar
    if not src.look_locker:
        return tuple(float(t) for t in src.trs), None, None, 1
    if src.tis is None:
        raise InputError(f"{where}: field 'InversionTime' is required for a Look-Locker M0 series")
    if not src.flip_angle:
        raise InputError(f"{where}: field 'FlipAngle' is required for a Look-Locker M0 series")
    where = src.source_of("FlipAngle")

    def flip_angle_error(problem: str) -> BidsFieldError:
        return BidsFieldError(f"{where}: field 'FlipAngle'{problem}", file=where, field="FlipAngle")

    angles = sorted(set(float(a) for a in src.flip_angle))
    if len(angles) == 1:
        return tuple(float(t) for t in src.tis), angles[0], None, 1
    if len(angles) > 2:
        raise flip_angle_error(f" has {len(angles)} distinct values {angles}; expected one (Look-Locker) or "
                               "two (high, then low flip-angle phase)")
    low, high = angles
    n = len(src.flip_angle)
    first_low = src.flip_angle.index(low)
    if any(float(a) != low for a in src.flip_angle[first_low:]):
        raise flip_angle_error(f": the low flip angle ({low}) must be the last phase (after every "
                               "high-flip-angle volume)")
    n_low = n - first_low
    if n_low * 2 > n:
        raise flip_angle_error(f": {n_low} of {n} volumes have the low flip angle ({low}); expected one "
                               "low-flip-angle phase, no longer than the high-flip-angle part")
    if first_low % n_low:
        raise flip_angle_error(f": {first_low} high-flip-angle volumes do not make whole phases of the "
                               f"low-flip-angle phase's {n_low} volumes; expected the high flip angle in phases "
                               "as long as the last, low one")
    return tuple(float(t) for t in src.tis), high, low, first_low // n_low


def _fit_jobs(acq, series: np.ndarray, brain: np.ndarray, ref: np.ndarray | None,
              options: CohortOptions) -> list[FitJob]:
    tis, fa, lfa, nphases = _design_of(acq)
    # enough distinct times for the model (M0, T1 and A; A fixed with --fixa), said up
    # front with the field instead of every voxel failing as underdetermined
    distinct = sorted(set(tis))
    field_name, need = (("InversionTime", 2) if acq.m0.look_locker else
                        ("RepetitionTimePreparation", 2 if options.fix_a else 3))
    if len(distinct) < need:
        where = acq.m0.source_of(field_name)
        why = ("a Look-Locker series needs the readout time of every volume (at least two distinct)"
               if acq.m0.look_locker else
               "a saturation-recovery fit of M0, T1 and A needs at least 3 (2 with --fixa)")
        raise BidsFieldError(f"{where}: field {field_name!r} has {len(distinct)} distinct value(s) {distinct}: {why}",
                             file=where, field=field_name)
    if len(tis) != series.shape[-1]:
        raise InputError(
            f"{acq.m0.sidecar}: {len(tis)} recovery times for {series.shape[-1]} M0 volumes"
        )
    shift_map = _slice_delays(acq.m0, brain.shape)

    def job(role: str, prior_t1: float | None, mask: np.ndarray) -> FitJob:
        return FitJob(role, tis, fa, lfa, None, prior_t1, mask,
                      np.ascontiguousarray(series[mask], dtype=np.float32),
                      None if shift_map is None else np.ascontiguousarray(shift_map[mask]), nphases)

    jobs = []
    if options.priors:
        from ..calibration.satrecov import BRAIN_T1_PRIOR

        jobs.append(job("brain", BRAIN_T1_PRIOR, brain))
        if ref is not None:
            tissue = _resolve_tissue(acq, options, ref, need_t1r=True)
            jobs.append(job("ref", float(tissue["t1r"]), ref))
    else:
        jobs.append(job("brain", None, brain | ref if ref is not None else brain))
    return jobs


def _slice_delays(src, shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-voxel readout delay (s) of a 2-D multi-slice M0 series, or None (3-D readout).

    The BIDS reader checked ``SliceTiming`` against the M0 image's slices, and
    load_subject the M0 grid against the ASL grid.
    """
    if src.slice_timing is None:
        return None
    times = np.asarray(src.slice_timing, dtype=np.float64)
    view = [1, 1, 1]
    view[src.slice_axis] = -1
    return np.broadcast_to(times.reshape(view), shape)


def _tissue_table(acq: AslAcquisition, options: CohortOptions):
    if not options.tissue_overrides:
        return None
    from ..physics.tissues import tissue_table

    return tissue_table(acq.field_strength, overrides=options.tissue_overrides)


def _resolve_tissue(acq, options: CohortOptions, mask, *, xp=np, need_t1r: bool) -> dict:
    """Reference-tissue T1, T2, T2b and pc for this run: user values, else its field's table."""
    from ..calibration.refregion import resolve_tissue

    return resolve_tissue(
        tissref=options.tissref, te=acq.m0.te_ms, t1r=options.t1r, t2r=options.t2r, t2b=options.t2b,
        pc=options.pc, t2star=options.t2star, field_strength=acq.field_strength,
        tissue_table=_tissue_table(acq, options), mask=mask, xp=xp, need_t1r=need_t1r,
        te_blood=acq.te_ms,
    )


# --------------------------------------------------------------------------- finish


def _fit_summary(fit: Mapping[str, Any] | None) -> dict | None:
    if fit is None:
        return None
    # Deterministic content only (no timings): the provenance must not change between
    # an interrupted-and-resumed run and an uninterrupted one.
    out = {k: fit[k] for k in ("backend", "dtype", "n_fitted", "status_counts") if k in fit}
    if "design" in fit:
        out["design"] = fit["design"].as_dict()
    return out


def finish_subject(prep: PreparedSubject, fits: Mapping[str, Mapping[str, Any]], options: CohortOptions) -> SubjectOutputs:
    """Calibration stage: M0a, CBF, maps, summary and provenance of one subject.

    Parameters
    ----------
    prep : PreparedSubject
    fits : mapping of role to fitted maps
        For every job of ``prep``: ``{"m0t", "t1t", "g", "status"}`` 1-D arrays over the
        job's mask voxels (NumPy or CuPy) plus ``backend``, ``dtype``, ``n_fitted``,
        ``status_counts``, ``design`` (from :mod:`aslcal.cohort.packing`).

    Raises
    ------
    SubjectError
        Stage ``calibrate``.
    """
    try:
        return _finish(prep, fits, options)
    except (AslcalError, ValueError, FloatingPointError, ArithmeticError) as exc:
        raise _fail(prep.key, "calibrate", exc) from exc


def _background_suppressed_alpha(acq: AslAcquisition, options: CohortOptions) -> tuple[float, str] | None:
    """(α, its source) with ``options.bs_efficiency`` per background-suppression pulse, or
    None when the run has no background suppression or the option is off."""
    if options.bs_efficiency is None or not acq.background_suppression:
        return None
    from ..calibration.apply import ALPHA_DEFAULTS, labelling_name

    name = "BackgroundSuppressionNumberPulses"
    n = background_suppression_pulses(acq)  # an integer 0..20, or a BidsFieldError
    where = acq.source_of(name)
    if n is None:
        raise BidsFieldError(
            f"{where}: field {name!r} is missing: --bs-efficiency needs the number of background-"
            "suppression pulses (BackgroundSuppression is true)", file=where, field=name)
    base = ALPHA_DEFAULTS[labelling_name(acq.labeling_type)]
    alpha = base * options.bs_efficiency ** n
    return alpha, (f"{acq.labeling_type} default {base:g} x background-suppression efficiency "
                   f"{options.bs_efficiency:g}^{n} ({name} of {where.name})")


#: Whole-brain mean CBF (ml/100g/min) above which a subject's calibration gets a warning:
#: grey matter is 40-100, hyperperfusion rarely doubles it.
CBF_PLAUSIBLE_MAX = 250.0


def _unpack(xp, values, mask_dev, shape, fill=0.0):
    out = xp.full(shape, fill, dtype=values.dtype)
    out[mask_dev] = values
    return out


def _finish(prep: PreparedSubject, fits, options: CohortOptions) -> SubjectOutputs:
    from .. import __version__
    from ..backend import is_cupy_array, to_device, to_host
    from ..calibration import apply_calibration, m0_refregion, m0_voxelwise, quantify_whitepaper
    from ..calibration.satrecov import m0a_from_satrecov_maps, relaxed_m0t, reliability_warning

    acq = prep.acq
    any_fit = next(iter(fits.values()), None)
    on_gpu = any_fit is not None and is_cupy_array(any_fit["m0t"])
    if on_gpu:
        import cupy as xp
    else:
        xp = np

    def dev(a):
        return to_device(a, "gpu") if on_gpu else a

    brain = dev(prep.brain)
    ref = dev(prep.ref) if prep.ref is not None else None
    maps: dict[str, Any] = {}
    fit_prov: dict[str, Any] = {}
    for job in prep.jobs:
        f = fits[job.role]
        mask = dev(job.mask)
        fit_prov[job.role] = _fit_summary(f)
        # the brain fit's maps by their names, the reference fit's (priors) as ref_<name>; the
        # M0t standard errors, A and the residuals only weigh a reference-region M0a
        prefix = "" if job.role == "brain" else "ref_"
        names = (("m0t", "m0t_se", "t1t", "a", "g", "rss") if prefix or options.m0_mode == "refregion"
                 else ("m0t", "t1t", "g"))
        for name in names:
            maps[prefix + name] = _unpack(xp, f[name], mask, prep.shape)
        # converged voxels only in the T1 summaries (a singular one sits on a bound)
        maps[prefix + "t1_ok"] = _unpack(xp, f["status"] == 0, mask, prep.shape, fill=False)

    design = prep.jobs[0] if prep.jobs else None
    m0_scale = options.m0_scale
    if m0_scale == "auto":
        m0_scale = "readout" if acq.look_locker else "relaxed"

    m0a: float | None = None
    m0t_rel_se: float | None = None
    noise_lift: float | None = None
    m0_map = None
    # the M0 this subject used: its M0Estimate, whatever the run's mode
    m0_mode = "estimate" if prep.m0_kind == "estimate" else options.m0_mode
    calib_prov: dict[str, Any] = {"m0_kind": prep.m0_kind, "m0_mode": m0_mode}
    if prep.warnings:  # from the input (logged while preparing)
        calib_prov["warnings"] = list(prep.warnings)

    def warn(text: str) -> None:
        log.warning("%s: %s", prep.key, text)
        calib_prov.setdefault("warnings", []).append(text)

    if prep.jobs and acq.m0.slice_timing is not None:
        calib_prov["slice_timing_s"] = {"axis": "ijk"[acq.m0.slice_axis], "times": list(acq.m0.slice_timing)}
    te = acq.m0.te_ms
    table = _tissue_table(acq, options)
    if prep.m0_kind == "estimate":
        m0a = float(acq.m0.estimate)
        # the file that gave it (inherited from a higher level, perhaps)
        calib_prov["m0a_source"] = f"M0Estimate of {prep.m0_estimate_file or acq.source_of('M0Estimate').name}"
    elif options.m0_mode == "refregion":
        if prep.m0_kind in ("longtr", "control"):
            res = m0_refregion(
                dev(prep.m0_image), ref, tissref=options.tissref, te=te, te_blood=acq.te_ms,
                tr=prep.m0_tr, taq=options.taq,
                t1r=options.t1r, t2r=options.t2r, t2b=options.t2b, pc=options.pc, t2star=options.t2star,
                cgain=options.cgain, field_strength=acq.field_strength, tissue_table=table,
            )
            m0a = float(res.m0a)
            calib_prov["refregion"] = res.as_dict()
        else:
            tissue = _resolve_tissue(acq, options, ref, xp=xp, need_t1r=options.priors)
            src = "ref_" if "ref_m0t" in maps else ""
            res, readout = m0a_from_satrecov_maps(
                maps[src + "m0t"], maps[src + "g"], design.fa, ref, m0_scale=m0_scale, tissref=options.tissref,
                tissue=tissue, te=te, te_blood=acq.te_ms, cgain=options.cgain, t2star=options.t2star,
                field_strength=acq.field_strength, m0t_se=maps[src + "m0t_se"],
                design=fits["ref" if src else "brain"]["design"], t1t=maps[src + "t1t"], a=maps[src + "a"],
                rss=maps[src + "rss"],
            )
            m0a = float(res.m0a)
            m0t_rel_se, noise_lift = res.m0t_rel_se, res.noise_floor_lift
            warning = reliability_warning(res, priors=options.priors)
            if warning:
                warn(warning)
            calib_prov["refregion"] = res.as_dict()
            calib_prov.update(m0_scale=m0_scale, readout_factor=readout, priors=options.priors)
    else:  # voxelwise M0
        if prep.m0_kind in ("longtr", "control"):
            calib_img, tr = dev(prep.m0_image), prep.m0_tr
        else:
            calib_img, tr = maps["m0t"], None
            if m0_scale == "relaxed":
                calib_img = relaxed_m0t(xp, calib_img, maps["g"], design.fa)[0]
            calib_prov.update(m0_scale=m0_scale)
        vox = m0_voxelwise(calib_img, brain, tr=tr, t1t=options.voxel_t1t, pc=options.voxel_pc,
                           cgain=options.cgain, edge_correction=options.edge_correction)
        m0_map = vox.m0
        calib_prov["voxelwise"] = vox.as_dict()

    m0_used = m0_map if m0_map is not None else m0a
    # alpha: the sidecar's LabelingEfficiency, else the labelling type's default (recorded as such)
    alpha_given = acq.metadata.get("LabelingEfficiency") is not None
    alpha_arg = acq.alpha if alpha_given else None
    alpha_used = acq.alpha
    alpha_source = "LabelingEfficiency" if alpha_given else "ArterialSpinLabelingType default"
    if prep.bs_alpha is not None:
        alpha_arg, alpha_source = prep.bs_alpha
        alpha_used = alpha_arg
    if prep.kinetics is not None:
        k = prep.kinetics
        wp = quantify_whitepaper(dev(prep.perf), m0_used, labelling=k["labelling"], pld=k["pld"], tau=k["tau"],
                                 ti1=k["ti1"], alpha=alpha_arg, field_strength=acq.field_strength,
                                 tissue_table=table, slice_times=k["slice_times"], slice_axis=k["slice_axis"])
        cbf = wp.image
        cbf_prov = wp.as_dict()
    else:
        cbf = apply_calibration(dev(prep.perf), m0_used, alpha=alpha_arg, labelling=acq.labeling_type).image
        cbf_prov = {"model": "calibration only (the perfusion image taken as quantified)",
                    "formula": "6000 * perfusion / (M0a * alpha)"}
    if m0_map is None:
        cbf = xp.where(brain, cbf, 0)
    calib_prov["cbf"] = {"alpha": alpha_used, "labeling_type": acq.labeling_type,
                         "alpha_source": alpha_source,
                         "perfusion": prep.perf_source, "units": "ml/100g/min", **cbf_prov}

    # --- images (host) and summary values
    images: dict[str, tuple] = {}
    records: dict[str, Any] = {}
    aff = prep.affine
    if m0_map is not None:
        images["m0"] = (to_host(m0_map), aff)
        steps = ["divided by the partition coefficient"]
        if calib_prov.get("voxelwise", {}).get("short_tr"):  # TR < 5 s only (calibration.md §5)
            steps.append(f"corrected for its short TR ({calib_prov['voxelwise']['tr']:g} s)")
        if options.edge_correction:
            steps.append("edge-corrected")
        records["m0"] = {"Description": f"Voxelwise M0 of arterial blood: the {prep.m0_kind} M0 image "
                                        + ", ".join(steps)}
    elif prep.m0_image is not None:
        images["m0"] = (prep.m0_image, aff)
        records["m0"] = {"Description": f"M0 calibration image ({prep.m0_kind}): mean of the M0 volumes, "
                                        f"TR {prep.m0_tr} s, not TR-corrected"}
    elif "m0t" in maps:
        images["m0"] = (to_host(maps["m0t"]), aff)
        if design is not None and design.fa is not None:
            what = ("Fitted tissue M0t on the readout scale of the Look-Locker series: M0 * sin(g * FA) "
                    "times the coil sensitivity (divide by sin(g * FA), g the facorr map, for the "
                    "equilibrium M0)")
        else:
            what = "Fitted fully relaxed tissue M0t of the saturation-recovery series (times the coil sensitivity)"
        records["m0"] = {"Description": what}
    if "t1t" in maps:
        images["t1"] = (to_host(maps["t1t"]), aff)
    if design is not None and design.lfa is not None:
        images["facorr"] = (to_host(maps["g"]), aff)
    images["cbf"] = (to_host(cbf), aff)
    records["cbf"] = {"M0a": m0a, "LabelingEfficiency": alpha_used, "M0Mode": m0_mode,
                      "Quantification": options.quantification}
    if prep.kinetics is not None:
        records["cbf"]["Description"] = ("Cerebral blood flow, single-PLD white-paper model "
                                         "(Alsop et al. 2015) with the calibrated M0")
    else:
        records["cbf"]["Description"] = (
            "Calibrated perfusion 6000 * dM / (M0a * alpha) of the control-label difference as acquired "
            "(--quantification calibration): no kinetic model, so CBF only where dM was quantified "
            "perfusion already; the white-paper model (--quantification whitepaper) gives single-PLD CBF")
    if prep.ref is not None:
        images["ref_mask"] = (prep.ref, aff)
        if prep.ref_info:
            kept = ("lateral ventricles" if options.tissref == "csf" and not options.all_csf
                    else "all CSF" if options.tissref == "csf" else options.tissref.upper())
            how = f" (automatic: segmentation of the T1w, {kept}, resampled, >= {options.pve_threshold:g})"
        else:
            how = ""
        records["ref_mask"] = {"Description": "Reference-region mask used for M0a" + how}
    images["brain_mask"] = (prep.brain, aff)
    # BIDS derivatives: every map names the raw images it comes from (BIDS URIs into the
    # dataset linked as "raw" in dataset_description.json); the reference mask its file
    sources = [_bids_uri(p) for p in prep.inputs if p.endswith((".nii", ".nii.gz")) and p != prep.ref_file]
    # the grid every map is on: the run's ASL image (BIDS SpatialReference of native-space data)
    asl_image = next((p for p in prep.inputs if p.endswith(("_asl.nii", "_asl.nii.gz"))), None)
    for name in images:
        rec = records.setdefault(name, {})
        if asl_image is not None:
            rec["SpatialReference"] = _bids_uri(asl_image)
        if name == "ref_mask":  # the mask given, or the T1w (and transform) it was made from
            rec["Sources"] = [_bids_uri(p) for p in prep.inputs if p == prep.ref_file or p.endswith(ANAT_XFM_SUFFIXES)]
        else:
            rec["Sources"] = list(sources)

    n_brain = int(prep.brain.sum())
    cbf_brain = cbf[brain]
    finite = xp.isfinite(cbf_brain)
    n_finite = int(xp.count_nonzero(finite))
    if n_brain and not n_finite:
        # nothing to report: a subject without a usable CBF has failed, not succeeded
        raise InputError(f"no brain voxel has a finite CBF (M0a {m0a!r}): non-finite perfusion or M0 data, or an "
                         "M0 so small that the CBF overflows (M0Estimate, vendor scaling)")
    if n_finite < n_brain:  # non-finite input voxels (NaN/Inf in the data): left out of the mean
        warning = (f"{n_brain - n_finite} brain voxels have a non-finite CBF (non-finite input data, or values "
                   "beyond float32); cbf_mean_brain is over the other voxels")
        warn(warning)
    cbf_mean = float(xp.mean(cbf_brain[finite])) if n_finite else None
    if cbf_mean is not None and not 0.0 <= cbf_mean <= CBF_PLAUSIBLE_MAX:
        # a whole-brain mean below 0 or above any physiology: the subject is written (the
        # numbers are what the inputs say) and the warning says what to check
        why = ("control and label swapped in the aslcontext, or a negative scale factor" if cbf_mean < 0 else
               "the M0 too small (M0Estimate, vendor scaling of the ASL against the M0) or the perfusion "
               "volumes mislabelled")
        warning = (f"mean brain CBF {cbf_mean:.4g} ml/100g/min is outside 0-{CBF_PLAUSIBLE_MAX:g}: {why}?")
        warn(warning)
    summary: dict[str, Any] = {
        "M0a": m0a,
        "m0_mode": m0_mode,
        "m0_kind": prep.m0_kind,
        "field_strength": acq.field_strength,
        "n_brain_voxels": n_brain,
        "n_ref_voxels": None if prep.ref is None else int(prep.ref.sum()),
        "cbf_mean_brain": cbf_mean,
        "n_brain_nonfinite_cbf": n_brain - n_finite,
    }
    if m0t_rel_se is not None:
        # reliability of a fitted reference region (aslcal.calibration.satrecov)
        summary["ref_m0t_rel_se"] = m0t_rel_se
    if noise_lift is not None:
        summary["ref_noise_floor_lift"] = noise_lift
    if calib_prov.get("warnings"):  # a subject that is ok but doubtful
        summary["warnings"] = "; ".join(calib_prov["warnings"])
    if "t1t" in maps:
        def t1_stat(fn, sel, which=""):
            # converged fits only: not an unfitted (non-finite) or singular voxel on a bound
            t1 = maps[f"{which}t1t"]
            m = sel & maps[f"{which}t1_ok"]
            return float(fn(t1[m])) if int(xp.count_nonzero(m)) else None

        summary["T1_median_brain"] = t1_stat(xp.median, brain)
        if ref is not None:
            # the fit that made M0a: with priors the reference fit (its own T1 prior)
            summary[f"T1_mean_ref_{options.tissref}"] = t1_stat(xp.mean, ref, "ref_" if "ref_t1t" in maps else "")
        if prep.tissue_masks is not None:
            # per tissue of the --anat segmentation: brain voxels at least pve_threshold pure
            for tissue, tissue_mask in prep.tissue_masks.items():
                sel = dev(tissue_mask) & brain
                summary[f"T1_mean_{tissue}"] = t1_stat(xp.mean, sel)
                summary[f"n_{tissue}_voxels"] = int(xp.count_nonzero(sel))
    records["summary"] = summary

    # write_json makes NumPy values, paths and non-finite floats JSON-safe.
    provenance = {
        "aslcal": __version__,
        "subject": prep.key,
        "inputs": {"files": prep.inputs, "checksums": prep.input_checksums, "m0_type": acq.m0_type, "labeling_type": acq.labeling_type,
                   "field_strength": acq.field_strength, "te_ms": acq.te_ms,
                   "m0_trs": list(acq.m0.trs)},
        "options": options.as_dict(),
        "brain_mask": prep.brain_info,
        "reference_mask": prep.ref_info or ({"source": "given", "file": prep.ref_file} if prep.ref_file else None),
        "calibration": calib_prov,
        "fits": fit_prov,
    }
    return SubjectOutputs(key=prep.key, images=images, records=records, provenance=provenance)
