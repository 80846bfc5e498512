"""A phantom BIDS ASL cohort: many subjects, varied acquisitions, some deliberately broken.

:func:`make_bids_cohort` writes a BIDS dataset (``dataset_description.json``,
``participants.tsv`` and ``sub-*/[ses-*/]perf/``) of noise-free phantom subjects made
with :func:`aslcal.testing.make_phantom` and the phantom generators, and returns the
truth of every run (its M0a, acquisition, and for a broken run which file and field
are wrong and a fragment of the expected error message).

Good subjects cycle through five M0 variants:

``separate``
    ``M0Type`` "Separate": a one-volume long-TR m0scan.
``included``
    ``M0Type`` "Included": two m0scan volumes first in the ASL series, with a
    per-volume ``RepetitionTimePreparation`` array (M0 TR != ASL TR).
``estimate``
    ``M0Type`` "Estimate": ``M0Estimate`` = the M0a at the echo time (``m0a_te``; BIDS: the M0 of blood).
``satrecov``
    ``M0Type`` "Separate": an m0scan of several volumes, one saturation-recovery time
    each, ``RepetitionTimePreparation`` an array of those times.
``look_locker``
    ``M0Type`` "Separate": a dual-flip-angle Look-Locker m0scan (``LookLocker`` true,
    ``FlipAngle`` per volume: 35 degrees, then 11.7 degrees as the last phase;
    ``InversionTime`` per volume: the readout times after the saturation).


Broken subjects cycle through ``tr_zero`` (``RepetitionTimePreparation`` 0 in the ASL
JSON), ``aslcontext_length`` (one ``volume_type`` line too many) and ``absent_bs``
(``M0Type`` "Absent" with ``BackgroundSuppression`` true).

Receive coil: by default (``flat_coil=True``) every image is acquired through a flat
receive field (a body coil: the phantom's ``sensitivity`` replaced by ones), because a
BIDS dataset cannot carry a coil-sensitivity map and a reference-region M0a would
otherwise be off by the mean sensitivity in the reference region.  The transmit field
(``fa_scale``, seen by the Look-Locker series) is kept; the Look-Locker fit corrects it.
``flat_coil=False`` gives the phantom's own receive map (the former behaviour).

Reference masks: with ``ref_masks=True`` (default) every run (good and broken) also has
its pure lateral-ventricle mask (``ventricle_pv >= 0.99``, uint8, the run's affine) in a
derivative dataset, laid out as the ``aslcal cohort`` runner's own outputs::

    derivatives/refmasks/dataset_description.json
    derivatives/refmasks/sub-XX/[ses-Y/]perf/<key>_desc-ref_mask.nii.gz

(:func:`aslcal.io.bids.discover` only looks at ``sub-*/`` under the root, so the
``derivatives`` folder is never taken for raw data.)

Perfusion convention: each ASL series is ``n_pairs`` of (control, label) with
``control - label = cbf * s * M0a * alpha / 6000 * exp(-TE / T2b)`` (:func:`perfusion_image`
times the blood T2 decay at the echo; s = 1 with the flat coil), ``cbf = cbf_gm * pv_gm + cbf_wm * pv_wm``; the
control image is the long-TR signal at the ASL TR and TE.

Noise: images are noise-free unless ``snr`` is given; then every ASL and m0scan volume
gets its own Rician noise (a magnitude image, ``|S + n1 + i n2|``, n1, n2 ~ N(0, sigma^2))
with ``sigma = M0_gm * mean_GM(s) / snr`` -- the definition of
:mod:`aslcal.testing.phantoms`: ``snr`` is the SNR of a fully relaxed grey-matter voxel.
Noise matters for benchmarks: a noise-free, piecewise-constant phantom compresses tens of
times better than a real image, so its gzip reading and writing cost far less.

Every image is written with :func:`aslcal.io.save_image` and every JSON with
:func:`aslcal.io.write_json` (atomic); the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import save_image, write_json, write_text
from .phantoms import (
    _add_noise,
    _gm_mean,
    _noise_sigma,
    look_locker_series,
    longtr_calibration,
    make_phantom,
    perfusion_image,
    satrecov_series,
)

__all__ = [
    "GOOD_VARIANTS",
    "BROKEN_VARIANTS",
    "ANAT_DIR",
    "REF_MASK_DIR",
    "CohortTruth",
    "RunTruth",
    "make_bids_cohort",
]

GOOD_VARIANTS = ("separate", "included", "estimate", "satrecov", "look_locker")
BROKEN_VARIANTS = ("tr_zero", "aslcontext_length", "absent_bs")

# Field of view of make_phantom's default grid (64 x 3.4, 64 x 3.4, 24 x 5 mm): the
# cohort's smaller grids keep it, so the whole head stays in view.
_FOV_MM = (217.6, 217.6, 120.0)
# Fast phantom settings: a 3.4 mm structural without oversampling (~0.1 s a subject).
_FAST_PHANTOM = {"struct_voxel_size": (3.4, 3.4, 3.4), "struct_oversample": 1}

_SATRECOV_TRS = (0.5, 1.0, 2.0, 4.0, 8.0)  # s
# A dual-flip-angle Look-Locker series (high flip angle, then a low one as the last
# phase, as QUASAR / asl_calib --lfa): the low phase lets the fit estimate the transmit
# field g, without which a single-flip-angle T1 (and M0a) is biased by g != 1.
_LL = {"ti1": 0.1, "dt": 0.3, "n_ti": 10, "fa": 35.0, "lfa": 11.7}  # s, s, -, degrees, degrees

#: Folder of the reference-mask derivative dataset, relative to the dataset root.
REF_MASK_DIR = "derivatives/refmasks"
#: Where ``anat=True`` writes the brain-extracted T1w images (relative to the root).
ANAT_DIR = "derivatives/anat"
# Partial-volume threshold of the written reference masks (pure lateral ventricle).
_REF_PV = 0.99


@dataclass(frozen=True)
class RunTruth:
    """The truth of one written ASL run.

    Attributes
    ----------
    key : str
        The run's file-name prefix, as :attr:`aslcal.io.bids.AslRun.key`.
    subject, session : str, str or None
        Labels without ``sub-``/``ses-``.
    variant : str
        One of :data:`GOOD_VARIANTS` or :data:`BROKEN_VARIANTS`.
    m0a : float, signal units
        True arterial-blood M0 of the phantom.
    m0a_te : float, signal units
        ``m0a * exp(-TE / T2b)``: the M0a that calibration reports (calibration.md
        section 4 puts the blood T2 decay at the sequence TE into M0a), and the
        ``M0Estimate`` written for the "estimate" variant.
    field_strength : float, tesla
    shape : tuple of int
        ASL grid.
    voxel_size : tuple of float, mm
    te_ms : float, milliseconds
        Echo time of every image (T2 decay with each tissue's T2, not T2*).
    alpha : float
        Labelling efficiency used for the perfusion signal: every (control, label)
        pair has ``control - label = cbf * s * m0a_te * alpha / 6000`` (s = 1 with
        ``flat_coil``).  Every run has a real echo time (8, 11 or 14 ms; BIDS requires
        EchoTime > 0), the recovery series' too.
    cbf_gm, cbf_wm : float, ml/100g/min
        Perfusion of pure grey and white matter of the phantom (``cbf = cbf_gm *
        pv_gm + cbf_wm * pv_wm``).
    labeling_type : str
    m0_type : str
        ``M0Type`` written.
    m0_trs : tuple of float, seconds
        ``RepetitionTimePreparation`` of each M0 volume (empty for "estimate").
    phantom_seed : int
        ``make_phantom(seed=...)`` of this subject.
    flat_coil : bool
        Whether the images were made with a flat receive field (s = 1) instead of
        the phantom's ``sensitivity`` map.
    ref_mask : str or None
        The reference mask (``ventricle_pv >= 0.99``, uint8) relative to the dataset
        root, ``derivatives/refmasks/sub-XX/[ses-Y/]perf/<key>_desc-ref_mask.nii.gz``;
        None when not written (``ref_masks=False``).
    n_ref_voxels : int
        Number of voxels in that mask (counted even when it is not written).
    broken : bool
    broken_file : str or None
        For a broken run: the wrong file, relative to the dataset root.
    broken_field : str or None
        The wrong field (a JSON key, or ``volume_type`` for the aslcontext).
    error_fragment : str or None
        A piece of the :class:`~aslcal.errors.InputError` message ``read_run`` gives
        (with or without ``allow_control_m0``).
    noise_sigma : float or None, signal units
        Standard deviation of the Rician noise of every volume (None: noise-free).
    """

    key: str
    subject: str
    session: str | None
    variant: str
    m0a: float
    m0a_te: float
    field_strength: float
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    te_ms: float
    alpha: float
    cbf_gm: float
    cbf_wm: float
    labeling_type: str
    m0_type: str
    m0_trs: tuple[float, ...]
    phantom_seed: int
    flat_coil: bool
    ref_mask: str | None
    n_ref_voxels: int
    broken: bool = False
    broken_file: str | None = None
    broken_field: str | None = None
    error_fragment: str | None = None
    noise_sigma: float | None = None


@dataclass(frozen=True)
class CohortTruth:
    """What :func:`make_bids_cohort` wrote.

    Attributes
    ----------
    root : pathlib.Path
    seed : int
    runs : dict of str to RunTruth
        By run key, in the order :func:`aslcal.io.bids.discover` returns them.
    """

    root: Path
    seed: int
    runs: dict[str, RunTruth] = field(repr=False)

    @property
    def good(self) -> dict[str, RunTruth]:
        """dict of str to RunTruth: the runs that must calibrate."""
        return {k: r for k, r in self.runs.items() if not r.broken}

    @property
    def broken(self) -> dict[str, RunTruth]:
        """dict of str to RunTruth: the runs that must be reported as input errors."""
        return {k: r for k, r in self.runs.items() if r.broken}


def _plan(n_subjects: int, broken: int, rng: np.random.Generator) -> list[str]:
    broken_at = set(rng.choice(n_subjects, size=broken, replace=False).tolist()) if broken else set()
    plan, g, b = [], 0, 0
    for i in range(n_subjects):
        if i in broken_at:
            plan.append(BROKEN_VARIANTS[b % len(BROKEN_VARIANTS)])
            b += 1
        else:
            plan.append(GOOD_VARIANTS[g % len(GOOD_VARIANTS)])
            g += 1
    return plan


def make_bids_cohort(
    root: str | os.PathLike[str],
    n_subjects: int = 20,
    *,
    seed: int = 0,
    shape: tuple[int, int, int] = (32, 32, 12),
    broken: int = 3,
    phantom_options: dict[str, Any] | None = None,
    flat_coil: bool = True,
    ref_masks: bool = True,
    anat: bool = False,
    slicedt: float = 0.0,
    m0_echo_time: float | None = None,
    snr: float | None = None,
    image_dtype: str = "float32",
    kinetics: str = "calibration",
    n_pairs: int | None = None,
) -> CohortTruth:
    """Write a phantom BIDS ASL cohort and return its truth.

    Parameters
    ----------
    root : str or os.PathLike
        Dataset folder; created if missing.  Existing files of the same names are
        replaced.
    n_subjects : int, optional
        Number of subjects (``sub-01`` ...).  Default 20.  With at least 5 + ``broken``
        subjects every good variant appears.
    seed : int, optional
        Seed of everything (subject parameters, phantoms).  Same seed, same bytes.
    shape : tuple of 3 int, optional
        Base ASL grid; each subject varies it by up to +-2 voxels in x/y and +-1 in z
        (voxel size scaled to keep make_phantom's default field of view).
    broken : int, optional
        Number of deliberately broken subjects (placed at random from ``seed``),
        cycling through :data:`BROKEN_VARIANTS`.  Default 3.
    anat : bool, optional
        Also write each run's brain-extracted T1w and its ASL -> T1w FLIRT matrix to
        ``root/derivatives/anat/sub-XX/[ses-Y/]anat/`` (``<sub>[_ses]_desc-brain_T1w.nii.gz``,
        ``<sub>[_ses]_from-asl_to-T1w_mode-image_xfm.mat``) for the automatic reference
        mask.  Default False.  Give ``phantom_options`` a 1.7 mm structural
        (``struct_voxel_size``) for masks worth the name.
    slicedt : float, seconds, optional
        Acquire the saturation-recovery and Look-Locker M0 series with a 2-D multi-slice
        readout: slice z is read ``slicedt * z`` after the volume's recovery time, and
        the m0scan sidecar carries ``SliceTiming`` (ascending along k).  Default 0 (3-D
        readouts, no ``SliceTiming``).
    m0_echo_time : float, seconds, optional
        Acquire the long-TR m0scan of the "separate" subjects at this echo time instead
        of the ASL one (its sidecar says so); the truth ``m0a_te`` stays at the ASL echo.
    snr : float, optional
        Add Rician noise of this grey-matter SNR to every ASL and m0scan volume (module
        docstring); default None: noise-free.  The truth stays that of the noise-free
        phantom.
    kinetics : {"calibration", "whitepaper"}, optional
        How control − label relates to the perfusion.  ``calibration`` (default):
        ``cbf * s * m0a_te * alpha / 6000``, a perfusion image as ``aslcal calib -i``
        takes it.  ``whitepaper``: the single-PLD signal of the white paper, that times
        ``2 * T1b * exp(-PLD/T1b) * (1 - exp(-tau/T1b))`` for (P)CASL (PLD = tau = 1.8 s)
        and ``2 * TI1 * exp(-TI/T1b)`` for PASL (TI 1.8 s; ``BolusCutOffFlag`` true,
        ``BolusCutOffDelayTime`` TI1 = 0.7 s), T1b the blood T1 of the subject's field;
        with ``slicedt`` the ASL volumes are 2-D as well (slice z at PLD + ``slicedt * z``,
        ``SliceTiming`` in the ASL sidecar).
    image_dtype : {"float32", "int16"}, optional
        On-disk type of the ASL and m0scan images.  ``int16`` (as scanners write them)
        rounds every value to an integer: with signals of ~1000 that is far below the
        noise of ``snr``, but noise-free runs are then no longer exact to 1e-6.
    n_pairs : int, optional
        Control/label pairs of every ASL series; default None: 2 or 3 at random per
        subject (small files).  A 2-D pCASL protocol of the white paper acquires ~30
        (4 minutes at TR 4 s): its series cost 10-15 times more to read.
    phantom_options : dict, optional
        Extra keyword arguments for :func:`aslcal.testing.make_phantom`; the default
        uses a 3.4 mm structural grid without oversampling (fast, ~0.1 s a subject).
    flat_coil : bool, optional
        Acquire every image through a flat receive field (a body coil: the
        phantom's ``sensitivity`` replaced by ones), so that a reference-region M0a
        needs no coil-sensitivity map.  Default True.  False: the phantom's own
        receive map (0.7..1.3; a ventricle reference region then reads off by its
        mean sensitivity there, a few per cent either way depending on the subject).
        The transmit field ``fa_scale`` is kept either way.
    ref_masks : bool, optional
        Write every run's reference mask (pure lateral ventricle, ``ventricle_pv >=
        0.99``, uint8 in the ASL grid) to ``derivatives/refmasks/sub-XX/[ses-Y/]perf/
        <key>_desc-ref_mask.nii.gz`` with the derivative's
        ``dataset_description.json``.  Default True.

    Returns
    -------
    CohortTruth

    Raises
    ------
    InputError
        Bad arguments; or, with ``ref_masks``, a subject's grid so coarse that no voxel is
        pure ventricle (its reference mask would be empty and the "good" subject would
        fail): the subjects written before it stay.

    Notes
    -----
    Every 4th subject has a session folder (``ses-1``) and every 6th a ``run-1``
    entity, so that discovery sees both layouts.  Images are float32 (or ``image_dtype``)
    and noise-free unless ``snr`` is given.
    Field strengths cycle 3 T mostly, with some 1.5 T and 7 T subjects (the phantom
    uses the same field's tissue table).
    """
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, int | np.integer) or n_subjects < 1:
        raise InputError(f"n_subjects={n_subjects!r}: expected an integer >= 1")
    if isinstance(broken, bool) or not isinstance(broken, int | np.integer) or not 0 <= broken <= n_subjects:
        raise InputError(f"broken={broken!r}: expected an integer in 0..n_subjects")
    if len(tuple(shape)) != 3 or any(int(s) < 8 for s in shape):
        raise InputError(f"shape={shape!r}: expected 3 integers >= 8")
    if m0_echo_time is not None and (isinstance(m0_echo_time, bool) or not isinstance(m0_echo_time, int | float)
                                     or not 0 <= m0_echo_time < 0.2):
        raise InputError(f"m0_echo_time={m0_echo_time!r}: expected seconds in [0, 0.2)")
    if image_dtype not in ("float32", "int16"):
        raise InputError(f"image_dtype={image_dtype!r}: expected 'float32' or 'int16'")
    if snr is not None and (isinstance(snr, bool) or not isinstance(snr, int | float)
                            or not math.isfinite(snr) or snr <= 0):
        raise InputError(f"snr={snr!r}: expected a positive number (or None: noise-free)")
    if isinstance(slicedt, bool) or not isinstance(slicedt, int | float) or not 0 <= slicedt < 1:
        raise InputError(f"slicedt={slicedt!r}: expected a number of seconds in [0, 1)")
    if kinetics not in ("calibration", "whitepaper"):
        raise InputError(f"kinetics={kinetics!r}: expected 'calibration' or 'whitepaper'")
    if n_pairs is not None and (isinstance(n_pairs, bool) or not isinstance(n_pairs, int | np.integer)
                                or n_pairs < 1):
        raise InputError(f"n_pairs={n_pairs!r}: expected an integer >= 1 (or None: 2-3 at random)")
    for name, value in (("flat_coil", flat_coil), ("ref_masks", ref_masks)):
        if not isinstance(value, bool | np.bool_):
            raise InputError(f"{name}={value!r}: expected True or False")
    base = tuple(int(s) for s in shape)
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((int(seed), 6))
    plan = _plan(int(n_subjects), int(broken), rng)
    opts = dict(_FAST_PHANTOM if phantom_options is None else phantom_options)

    write_json(out / "dataset_description.json", {
        "Name": f"aslcal phantom ASL cohort (seed {int(seed)})",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "aslcal.testing.make_bids_cohort"}],
    })
    width = max(2, len(str(n_subjects)))
    subjects = [f"{i + 1:0{width}d}" for i in range(n_subjects)]
    write_text(out / "participants.tsv",
               "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    for wanted, folder, what in ((ref_masks, REF_MASK_DIR, "reference masks"), (anat, ANAT_DIR, "structurals")):
        if wanted:
            (out / folder).mkdir(parents=True, exist_ok=True)
            write_json(out / folder / "dataset_description.json", {
                "Name": f"aslcal phantom ASL cohort {what} (seed {int(seed)})",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "aslcal.testing.make_bids_cohort"}],
            })
    if anat:
        # transforms are not BIDS files (yet): sMRIPrep ignores them the same way
        write_text(out / ANAT_DIR / ".bidsignore", "*_xfm.*\n")

    runs: dict[str, RunTruth] = {}
    for i, (label, variant) in enumerate(zip(subjects, plan, strict=True)):
        sub_rng = np.random.default_rng((int(seed), 7, i))
        truth = _write_subject(out, label, i, variant, base, sub_rng, opts, int(seed),
                               flat_coil=bool(flat_coil), ref_masks=bool(ref_masks), anat=bool(anat),
                               slicedt=float(slicedt), m0_echo_time=m0_echo_time,
                               snr=None if snr is None else float(snr), image_dtype=image_dtype,
                               kinetics=kinetics, cfg_pairs=None if n_pairs is None else int(n_pairs))
        runs[truth.key] = truth
    return CohortTruth(root=out, seed=int(seed), runs=runs)


def _write_subject(out: Path, label: str, i: int, variant: str, base: tuple,
                   rng: np.random.Generator, opts: dict, seed: int, *,
                   flat_coil: bool, ref_masks: bool, anat: bool = False, slicedt: float = 0.0,
                   m0_echo_time: float | None = None, snr: float | None = None,
                   image_dtype: str = "float32", kinetics: str = "calibration",
                   cfg_pairs: int | None = None) -> RunTruth:
    session = "1" if i % 4 == 3 else None
    entities = [f"sub-{label}"] + ([f"ses-{session}"] if session else []) + (
        ["run-1"] if i % 6 == 5 else []
    )
    key = "_".join(entities)
    rel = Path(f"sub-{label}") / (f"ses-{session}" if session else "") / "perf"
    perf = out / rel
    perf.mkdir(parents=True, exist_ok=True)

    grid = (
        base[0] + 2 * int(rng.integers(-1, 2)),
        base[1] + 2 * int(rng.integers(-1, 2)),
        base[2] + int(rng.integers(-1, 2)),
    )
    voxel = tuple(round(f / n, 4) for f, n in zip(_FOV_MM, grid, strict=True))
    fs = float(rng.choice([3.0, 3.0, 3.0, 1.5, 7.0]))
    m0a = round(float(rng.uniform(900.0, 1500.0)), 3)
    # A real echo (BIDS: EchoTime > 0); every generator applies its T2 decay.
    te_s = round(float(rng.choice([0.008, 0.011, 0.014])), 6)
    te_ms = te_s * 1000.0
    lab = "PASL" if rng.random() < 0.25 else "PCASL"
    alpha = 0.98 if lab == "PASL" else 0.85
    asl_tr = round(float(rng.uniform(3.5, 4.5)), 3)
    drawn_pairs = int(rng.integers(2, 4))  # drawn whatever n_pairs is: the same seed, the same subjects
    n_pairs = drawn_pairs if cfg_pairs is None else cfg_pairs
    phantom_seed = seed * 100_003 + i
    ph = make_phantom(shape=grid, voxel_size=voxel, seed=phantom_seed, field_strength=fs,
                      m0a=m0a, **opts)
    ref = ph.ventricle_pv >= _REF_PV  # the pure lateral ventricles: the reference mask
    if ref_masks and not ref.any():
        raise InputError(
            f"shape={base!r}: the grid of {key}, {grid[0]}x{grid[1]}x{grid[2]} voxels of "
            f"{voxel[0]:g}x{voxel[1]:g}x{voxel[2]:g} mm, holds no voxel of pure ventricle (partial "
            f"volume >= {_REF_PV}) for its reference mask; use a finer grid (e.g. the default "
            "(32, 32, 12)) or ref_masks=False")
    if flat_coil:
        # A body-coil receive field: every generator takes s from ph.sensitivity.
        ph = dataclasses.replace(ph, sensitivity=np.ones_like(ph.sensitivity))

    control, _ = longtr_calibration(ph, tr=asl_tr, te=te_ms)
    perf_img, _ = perfusion_image(ph, alpha=alpha)
    # The labelled blood water decays with the blood T2 until the echo (the calibration
    # puts the same factor into M0a: calibration.md section 4, step 5).
    t2b_factor = math.exp(-te_ms / float(ph.tissues["blood"].t2)) if te_ms > 0 else 1.0
    perf_img = (perf_img * t2b_factor).astype(perf_img.dtype)
    pld = 1.8
    tau = 1.8  # (P)CASL labelling duration
    ti1 = 0.7  # PASL bolus duration (QUIPSS II / Q2TIPS)
    if kinetics == "whitepaper":
        # The label made over tau (PASL: a bolus TI1 wide at once) decays with the blood T1
        # until slice z is read, PLD + slicedt * z after the labelling ends.
        t1b = float(ph.tissues["blood"].t1)
        delay = pld + slicedt * np.arange(perf_img.shape[2])
        if lab == "PASL":
            weight = 2.0 * ti1 * np.exp(-delay / t1b)
        else:
            weight = 2.0 * t1b * np.exp(-delay / t1b) * -math.expm1(-tau / t1b)
        perf_img = (perf_img * weight[None, None, :]).astype(perf_img.dtype)
    label_img = control - perf_img
    volumes = [control, label_img] * n_pairs
    types = ["control", "label"] * n_pairs
    trs: list[float] = [asl_tr] * len(volumes)

    meta: dict[str, Any] = {
        "ArterialSpinLabelingType": lab,
        "MagneticFieldStrength": fs,
        "MRAcquisitionType": "3D",
        "EchoTime": te_s,
        "BackgroundSuppression": False,
        "TotalAcquiredPairs": n_pairs,
        "PostLabelingDelay": pld,
    }
    if lab == "PASL":
        meta["BolusCutOffFlag"] = kinetics == "whitepaper"
        if kinetics == "whitepaper":
            meta["BolusCutOffDelayTime"] = ti1
            meta["BolusCutOffTechnique"] = "Q2TIPS"
    else:
        meta["LabelingDuration"] = tau
    if kinetics == "whitepaper" and slicedt > 0:
        meta["MRAcquisitionType"] = "2D"
        meta["SliceTiming"] = [round(slicedt * z, 9) for z in range(int(perf_img.shape[2]))]

    m0_type = "Separate"
    m0_trs: tuple[float, ...] = ()
    m0scan: tuple[np.ndarray, dict] | None = None
    m0_tr = 6.0
    if variant in ("separate", "tr_zero", "aslcontext_length"):
        m0_te_s = te_s if m0_echo_time is None or variant != "separate" else round(float(m0_echo_time), 6)
        data, _ = longtr_calibration(ph, tr=m0_tr, te=m0_te_s * 1000.0)
        m0scan = (data, {"RepetitionTimePreparation": m0_tr, "EchoTime": m0_te_s})
        m0_trs = (m0_tr,)
    elif variant == "included":
        m0_type = "Included"
        m0, _ = longtr_calibration(ph, tr=m0_tr, te=te_ms)
        volumes = [m0, m0] + volumes
        types = ["m0scan", "m0scan"] + types
        trs = [m0_tr, m0_tr] + trs
        m0_trs = (m0_tr, m0_tr)
    elif variant == "estimate":
        m0_type = "Estimate"
        meta["M0Estimate"] = round(m0a * t2b_factor, 6)
    elif variant == "satrecov":
        data, _ = satrecov_series(ph, _SATRECOV_TRS, slicedt=slicedt, te=te_ms)
        m0scan = (data, {"RepetitionTimePreparation": list(_SATRECOV_TRS), "EchoTime": te_s})
        m0_trs = _SATRECOV_TRS
    elif variant == "look_locker":
        data, ll = look_locker_series(ph, **_LL, slicedt=slicedt, te=te_ms)
        n_vol = data.shape[-1]
        tr_ll = round(_LL["ti1"] + _LL["dt"] * _LL["n_ti"] + 1.0, 6)
        m0scan = (data, {
            "RepetitionTimePreparation": tr_ll,
            "EchoTime": te_s,
            "LookLocker": True,
            "FlipAngle": [_LL["lfa"] if p else _LL["fa"] for p in ll["phase_per_volume"]],
            "InversionTime": [round(float(t), 9) for t in ll["ti_per_volume"]],
        })
        m0_trs = (tr_ll,) * n_vol
    elif variant == "absent_bs":
        m0_type = "Absent"
        meta["BackgroundSuppression"] = True
    else:  # pragma: no cover - _plan only yields known variants
        raise InputError(f"unknown variant {variant!r}")
    meta["M0Type"] = m0_type
    meta["RepetitionTimePreparation"] = trs if len(set(trs)) > 1 else trs[0]

    broken_file = broken_field = fragment = None
    asl_json = perf / f"{key}_asl.json"
    tsv = perf / f"{key}_aslcontext.tsv"
    if variant == "tr_zero":
        meta["RepetitionTimePreparation"] = 0
        broken_file, broken_field, fragment = asl_json, "RepetitionTimePreparation", "= 0"
    elif variant == "aslcontext_length":
        types = types + ["control"]
        broken_file, broken_field, fragment = tsv, "volume_type", f"has {len(types)} entries"
    elif variant == "absent_bs":
        broken_file, broken_field, fragment = asl_json, "M0Type", "'Absent'"

    series = np.stack(volumes, axis=-1)
    sigma = None
    if snr is not None:
        # sigma as aslcal.testing.phantoms defines it (flat coil: s = 1)
        sens = np.ones_like(ph.sensitivity) if flat_coil else ph.sensitivity
        sigma = _noise_sigma(snr, None, ph.m0_tissue["gm"] * _gm_mean(ph, sens))
        noise_rng = np.random.default_rng((seed, 8, i))
        series = _add_noise(series, sigma, "rician", noise_rng).astype(series.dtype)
        if m0scan is not None:
            m0scan = (_add_noise(m0scan[0], sigma, "rician", noise_rng).astype(m0scan[0].dtype), m0scan[1])
    save_image(perf / f"{key}_asl.nii.gz", series, ph.affine, dtype=image_dtype)
    write_json(asl_json, meta)
    write_text(tsv, "volume_type\n" + "".join(f"{t}\n" for t in types))
    if m0scan is not None:
        data, m0meta = m0scan
        m0meta = {**m0meta, "IntendedFor": f"bids::{perf.relative_to(out).as_posix()}/{key}_asl.nii.gz"}
        m0meta["MRAcquisitionType"] = "3D"
        if slicedt > 0 and variant in ("satrecov", "look_locker"):
            m0meta["MRAcquisitionType"] = "2D"
            m0meta["SliceTiming"] = [round(slicedt * z, 9) for z in range(int(data.shape[2]))]
        save_image(perf / f"{key}_m0scan.nii.gz", data, ph.affine, dtype=image_dtype)
        write_json(perf / f"{key}_m0scan.json", m0meta)

    ref_rel = None
    if ref_masks:
        mask_dir = out / REF_MASK_DIR / rel
        mask_dir.mkdir(parents=True, exist_ok=True)
        mask_path = mask_dir / f"{key}_desc-ref_mask.nii.gz"
        save_image(mask_path, ref.astype(np.uint8), ph.affine, dtype=np.uint8)
        write_json(mask_dir / f"{key}_desc-ref_mask.json", {
            "Type": "ROI", "Description": f"Pure lateral ventricles (partial volume >= {_REF_PV})"})
        ref_rel = mask_path.relative_to(out).as_posix()

    if anat:
        # The structural session of this run: the brain-extracted T1w and the ASL -> T1w
        # FLIRT matrix (the head moved between the sessions), named as aslcal cohort --anat
        # looks them up.
        st = ph.structural
        anat_dir = out / ANAT_DIR / f"sub-{label}" / (f"ses-{session}" if session else "") / "anat"
        anat_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"sub-{label}" + (f"_ses-{session}" if session else "")
        save_image(anat_dir / f"{prefix}_desc-brain_T1w.nii.gz", st.t1w_brain, st.affine)
        write_json(anat_dir / f"{prefix}_desc-brain_T1w.json", {"SkullStripped": True})
        write_text(anat_dir / f"{prefix}_from-asl_to-T1w_mode-image_xfm.mat",
                   "".join("  ".join(f"{v:.10f}" for v in row) + "\n" for row in st.asl2struct))

    return RunTruth(
        key=key, subject=label, session=session, variant=variant, m0a=m0a,
        m0a_te=m0a * t2b_factor,
        field_strength=fs, shape=grid, voxel_size=voxel, te_ms=te_ms, alpha=alpha,
        cbf_gm=float(ph.cbf_gm), cbf_wm=float(ph.cbf_wm),
        labeling_type=lab, m0_type=m0_type, m0_trs=tuple(m0_trs),
        phantom_seed=phantom_seed, flat_coil=flat_coil, ref_mask=ref_rel,
        n_ref_voxels=int(np.count_nonzero(ref)), broken=broken_file is not None,
        broken_file=None if broken_file is None else broken_file.relative_to(out).as_posix(),
        broken_field=broken_field, error_fragment=fragment, noise_sigma=sigma,
    )
