"""Reference-region M0a from a saturation-recovery / Look-Locker series (calibration.md §7.4).

1. Reference-region fit of the sensitivity-corrected series inside the reference mask
   (fabber's priors, T1 prior mean = T1r, when ``priors=True``).
2. Per reference voxel, the fully relaxed magnetisation M0 (see *Scale of M0t* below);
   M0_ref = its mean over the mask (voxels with a finite, non-zero value; the others are
   excluded and counted).  No TR correction: the fit's M0 is fully relaxed.
3. The tail of §4: T2 correction to TE = 0, cgain, pc, blood T2 at the sequence TE.
4. Optionally a whole-brain fit (T1 prior mean 1.3 s) for the T1t, M0t, A, g maps.

Scale of M0t
------------
With a Look-Locker readout the fit's M0t is on the scale of the high-flip-angle
readout: a voxel of equilibrium magnetisation M0 reports ``M0t = M0 · sin(g·FA) · s``
(s the receive sensitivity, g the flip-angle correction; g = 1 without a low-flip-angle
phase).  ``m0_scale="readout"`` (default) keeps M0t as it is: the FSL asl_calib / oxasl
behaviour and calibration.md's decision, right when the ASL data were read out with the
same Look-Locker flip angle as the calibration series (e.g. QUASAR, whose control images
are the calibration series), so that sin(g·FA) cancels in the perfusion / M0 ratio.
``m0_scale="relaxed"`` divides every reference voxel's M0t by sin(g·FA) before averaging,
with g the voxel's fitted correction, so M0a is the equilibrium magnetisation of blood:
use it when the ASL data have their own readout (e.g. pCASL with a 90° excitation and a
separate Look-Locker M0 series); it is then on the scale of a long-TR M0a.  Plain
saturation recovery (no ``fa``) needs no correction.

Reliability of the reference fit
--------------------------------
M0_ref is the mean of per-voxel fits, and the mean of noisy nonlinear fits is biased:
where each voxel's M0t is poorly determined (a Look-Locker series of CSF, T1 ~4.3 s,
whose readouts end at ~3 s) the fits scatter, some stop at the T1 bound, and M0a comes
out high.  Measured on the phantom (Rician noise, grey-matter SNR; median relative
standard error of the reference voxels' M0t -> M0a error):

* Look-Locker, 3 + 1 phases of 12 readouts (to 3.4 s), SNR 100: 21 % -> +12 %
  without priors, 6 % -> +0.3 % with fabber's priors;
* the same at SNR 50: 53 % -> +33 %, and 8 % -> +0.1 % with priors;
* Look-Locker, 1 + 1 phases of 10 readouts (to 2.8 s), SNR 50 (the phantom cohort of
  :mod:`aslcal.testing.bids`, 9 subjects): 105-139 % -> +40 % on average, and 10 % ->
  -0.2 % with priors;
* saturation recovery, TR 0.5-8 s, SNR 50 (the same cohort): 4-5 % -> +0.9 %, and 3 %
  -> +0.1 % with priors.

(FSL always fits with its priors, T1 prior mean = T1r: ``priors=True``.)  So the median
relative standard error is recorded (``RefRegionM0.m0t_rel_se``) and, above
:data:`RELIABLE_REL_SE` (10 % without priors, 25 % with), logged as a warning
(:func:`reliability_warning`).

Priors keep the standard errors small even where the data cannot carry the fit: near the
magnitude noise floor.  A magnitude image of signal S and noise σ averages to the Rician
mean E|S + n| > S, so the low-signal readouts (the early TIs, and all of CSF under a
Look-Locker readout) are lifted and M0a comes out high.  The *noise-floor lift* is the
mean of E|S + n| − S over the reference series divided by its mean signal, evaluated
on the fitted curve (median parameters of the averaged voxels, slice delay 0, which
overstates it for later slices) with σ̂ = sqrt(median RSS / (n − p)) (RSS of the fit:
with priors, of its data term).  Measured on 2000 voxels of Rician-noise data
simulated readout by readout (SNR = M0/σ of the reference tissue; lift -> M0a error with
fabber's priors):

* Look-Locker 1 + 1 phases of 10 readouts (0.1-2.8 s, 35°/11.7°), CSF: SNR 100 1.5 % ->
  0.0 %; SNR 50 4.7 % -> -0.8 %; SNR 20 15 % -> +1.5 %; SNR 10 23 % -> +25 %; SNR 5
  27 % -> +100 %; the same for WM: SNR 20 3.8 % -> +2.8 %, SNR 10 11 % -> +6.9 %, SNR 5
  23 % -> +30 %;
* saturation recovery, TR 0.5-8 s, CSF: SNR 10 4.2 % -> -0.8 %; SNR 5 11 % -> +2.3 %;
  SNR 3 19 % -> +10 %; GM SNR 3: 12 % -> +8.8 %, WM SNR 3: 10.4 % -> +8.9 %;
* the phantom's ventricles (138 voxels), Look-Locker 3 + 1 phases of 12 readouts, at
  grey-matter SNR 50 / 20 / 10 / 5: 2 % / 8 % / 15-16 % / 19-20 % -> +0.1 % / +1 % /
  +13 % / +63 %; saturation recovery at SNR 10 / 5 / 3: 5 % / 11 % / 20 % -> 0 % / +1.3 %
  / +11 %.

So the lift does not give the bias (that depends on the design and the tissue), but
below 5 % no case was off by more than 3 % and above 10 % most were off by 2-100 %.  The
lift is recorded (``RefRegionM0.noise_floor_lift``) and, above :data:`NOISE_FLOOR_LIMIT`
(10 %), logged as a warning whether or not priors were used.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import array_namespace
from ..errors import InputError
from ..fitting import FitDesign, SatrecovFit, fabber_priors, fit_satrecov
from ._common import as_array, as_float, as_mask, count, is_array, masked_mean, number, safe_divide, spatial_image
from .refregion import (
    RefRegionM0,
    _check_tissref,
    check_field_strength,
    empty_mask_error,
    finish_m0a,
    no_usable_voxel_error,
    resolve_tissue,
)

__all__ = [
    "M0_SCALES", "NOISE_FLOOR_LIMIT", "RELIABLE_REL_SE", "SatrecovCalibration", "m0_refregion_satrecov",
    "m0a_from_satrecov_maps", "noise_floor_lift", "relaxed_m0t", "reliability_warning", "rician_mean",
]

log = logging.getLogger("aslcal")

#: ``relaxed``: M0t / sin(g·FA), the equilibrium magnetisation; ``readout``: M0t as fitted.
M0_SCALES = ("relaxed", "readout")

#: T1 prior mean of the whole-brain fit (calibration.md §7.3), seconds.
BRAIN_T1_PRIOR = 1.3

#: Median relative standard error of the reference voxels' M0t above which their mean is
#: not trusted, without and with fabber's priors (module docstring, *Reliability*).
RELIABLE_REL_SE = {False: 0.10, True: 0.25}

#: Noise-floor lift of the reference series (module docstring, *Reliability*) above which
#: its M0a is not trusted.
NOISE_FLOOR_LIMIT = 0.10


def rician_mean(signal: Any, sigma: float) -> np.ndarray:
    """Mean magnitude E|S + n| of a signal S under complex Gaussian noise of SD ``sigma``
    per channel (the Rician mean), elementwise; S itself where ``sigma`` is 0.

    E|S + n| = σ·sqrt(π/2)·e^(−x/2)·[(1 + x)·I0(x/2) + x·I1(x/2)], x = S²/(2σ²), written
    with the exponentially scaled Bessel functions so that it stays finite for any S/σ.
    """
    from scipy.special import i0e, i1e

    s = np.abs(np.asarray(signal, dtype=np.float64))
    if not sigma > 0:
        return s
    x = s * s / (2.0 * sigma * sigma)
    return sigma * math.sqrt(math.pi / 2.0) * ((1.0 + x) * i0e(x / 2.0) + x * i1e(x / 2.0))


@functools.lru_cache(maxsize=1)
def _scalar_model():
    from ..physics.satrecov import make_satrecov_model

    return make_satrecov_model()


def _model_curve(design: FitDesign, params: np.ndarray) -> np.ndarray:
    """The signal of every volume of ``design`` for one parameter set ``(m0t, t1t, a, g)``,
    from the single-source model the fitting kernels compile (slice delay 0)."""
    signal = _scalar_model().signal_grad
    m0, t1, a, g = (float(x) for x in params)
    fa = math.radians(design.fa) if design.fa is not None else 0.0
    lfa = math.radians(design.lfa) if design.lfa is not None else 0.0
    return np.array([
        signal(design.mode, m0, t1, a, g, float(ti), design.ti1_low if low else design.ti1_high, design.dt,
               fa, lfa, int(low))[0]
        for ti, low in zip(design.ti, design.low)
    ])


def noise_floor_lift(design: FitDesign, m0t: Any, t1t: Any, a: Any, g: Any, rss: Any, voxels: Any) -> float | None:
    """Mean Rician lift of a fitted series over its mean signal (module docstring, *Reliability*).

    ``m0t``, ``t1t``, ``a``, ``g`` and ``rss`` are the fit's maps (NumPy or CuPy, same
    shape), ``voxels`` a boolean map of the voxels to summarise.  None when the fit has
    no residual degrees of freedom or no voxel has finite values.
    """
    dof = design.n_obs - design.n_free
    if dof <= 0:
        return None
    xp = array_namespace(m0t, voxels)
    sel = voxels & xp.isfinite(rss) & xp.isfinite(t1t) & xp.isfinite(a) & xp.isfinite(g)
    if not bool(xp.any(sel)):
        return None
    params = np.array([float(xp.median(x[sel])) for x in (m0t, t1t, a, g)])
    sigma = math.sqrt(max(float(xp.median(rss[sel])), 0.0) / dof)
    curve = _model_curve(design, params)
    mean = float(np.mean(curve))
    if not mean > 0:
        return None
    return float(np.mean(rician_mean(curve, sigma) - curve) / mean)


def reliability_warning(refregion: RefRegionM0, *, priors: bool) -> str | None:
    """The warning for a reference fit whose M0t are too noisy to average, or whose series
    lies near the magnitude noise floor (module docstring, *Reliability*), or None."""
    problems = []
    rel = refregion.m0t_rel_se
    limit = RELIABLE_REL_SE[bool(priors)]
    if rel is not None and rel > limit:
        advice = ("fit with fabber's priors (priors=True / --priors, FSL's behaviour)" if not priors else
                  "the priors did not stabilise it; check the series (TI range against the reference T1, SNR)")
        problems.append(
            f"the median relative standard error of M0t over the {refregion.n_voxels} reference voxels is "
            f"{100 * rel:.0f} % (limit {100 * limit:.0f} %), and the mean of such scattered fits is biased; {advice}"
        )
    lift = refregion.noise_floor_lift
    if lift is not None and lift > NOISE_FLOOR_LIMIT:
        problems.append(
            f"the reference series lies near the magnitude noise floor: Rician noise of the fit's residual "
            f"size lifts its signal by {100 * lift:.0f} % on average (limit {100 * NOISE_FLOOR_LIMIT:.0f} %), "
            f"so M0a may be biased high (in simulations, with or without priors: +1 to +13 % at lifts of "
            f"10-16 %, +10 to +100 % at 18-27 %); average repeated series before fitting or acquire with more signal"
        )
    if not problems:
        return None
    return "reference-region fit unreliable: " + "; and ".join(problems)


@dataclass
class SatrecovCalibration:
    """Result of :func:`m0_refregion_satrecov`.

    Attributes
    ----------
    refregion : RefRegionM0
        M0a and its factors (``mode="satrecov"``, ``tr_factor`` 1, ``tr``/``taq`` None);
        ``s_ref`` is the mean reference M0 (after the ``m0_scale`` correction).
    ref_fit : SatrecovFit
        The reference-region fit (maps on the input's device; zero outside the mask).
    brain_fit : SatrecovFit or None
        The whole-brain fit, when a brain mask was given.  It fits the series as given
        (not divided by the sensitivity), so its M0t map carries the coil sensitivity
        like a voxelwise M0 map; T1t, A and g do not depend on it.
    m0_scale : str
        ``relaxed`` or ``readout`` (module docstring).
    readout_factor : float or None
        Mean of sin(g·FA) over the reference voxels used (Look-Locker); None for plain
        saturation recovery.  With ``m0_scale="relaxed"`` each voxel's M0t was divided
        by its own sin(g·FA).
    priors : bool
        Whether fabber's priors were used.
    """

    refregion: RefRegionM0
    ref_fit: SatrecovFit
    brain_fit: SatrecovFit | None
    m0_scale: str
    readout_factor: float | None
    priors: bool

    @property
    def m0a(self) -> float:
        """M0 of arterial blood, signal units."""
        return self.refregion.m0a

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (factors, design, fit summaries)."""

        def summary(fit: SatrecovFit | None, t1_prior: float | None) -> dict[str, Any] | None:
            if fit is None:
                return None
            return {
                "backend": fit.backend,
                "dtype": fit.dtype,
                "n_fitted": fit.n_fitted,
                "status_counts": fit.status_counts(),
                "t1_prior_mean_s": t1_prior,
                "timings_s": dict(fit.timings),
            }

        out = self.refregion.as_dict()
        out.update(
            m0_scale=self.m0_scale,
            readout_factor=self.readout_factor,
            priors=self.priors,
            design=self.ref_fit.design.as_dict(),
            ref_fit=summary(self.ref_fit, self.refregion.t1r if self.priors else None),
            brain_fit=summary(self.brain_fit, BRAIN_T1_PRIOR if self.priors else None),
        )
        return out


def m0_refregion_satrecov(
    series: Any,
    tis: Sequence[float] | Any,
    refmask: Any,
    brain_mask: Any = None,
    *,
    repeats: int = 1,
    nphases: int = 1,
    fa: float | None = None,
    lfa: float | None = None,
    dt: float | None = None,
    slicedt: float = 0.0,
    sliceband: int = 1,
    fix_a: bool = False,
    priors: bool = False,
    model: str = "exact",
    bounds: Mapping[str, Sequence[float]] | None = None,
    backend: str | None = None,
    dtype: Any = None,
    tissref: str = "csf",
    te: float = 0.0,
    t1r: Any = None,
    t2r: Any = None,
    t2b: float | None = None,
    pc: float | None = None,
    t2star: bool = False,
    cgain: float = 1.0,
    sensitivity: Any = None,
    m0_scale: str = "readout",
    field_strength: float = 3.0,
    tissue_table: Mapping[str, Any] | None = None,
) -> SatrecovCalibration:
    """M0 of arterial blood from a saturation-recovery or Look-Locker calibration series.

    Parameters
    ----------
    series : array of shape ``spatial + (n_vol,)``, signal units
        NumPy or CuPy; volume order phase (slowest) → TI → repeat (fastest), the
        low-flip-angle phase last (calibration.md §7.2).
    tis : sequence of float, seconds
        The distinct TIs of a phase, or one TI per volume (see :func:`aslcal.fit_satrecov`).
    refmask : array of shape ``spatial``
        Reference region (non-zero = inside).
    brain_mask : array of shape ``spatial``, optional
        If given, also fit the whole brain (``brain_fit``).
    repeats, nphases, fa, lfa, dt, slicedt, sliceband, fix_a, model, bounds, backend, dtype
        The acquisition design and fit options of :func:`aslcal.fit_satrecov` (fa, lfa
        in degrees; dt, slicedt in seconds).
    priors : bool
        fabber's weak Gaussian priors (MAP): T1 prior mean = T1r for the reference fit
        and 1.3 s for the whole-brain fit; A ~ N(1, 0.1), g ~ N(1, 0.01).
    tissref : {"csf", "wm", "gm", "none"}
        Reference tissue (defaults of t1r, t2r, pc).  ``none``: pc must be given, t2r
        when te > 0, and t1r when priors are on.
    te : float, milliseconds
    t1r : float (seconds) or array, optional
        Reference-tissue T1: only the prior mean of the reference fit (no TR correction
        in this mode).  An image gives its mean inside the reference mask.
    t2r : float (milliseconds) or array, optional
    t2b : float, milliseconds, optional
    pc : float, ml/g, optional
    t2star : bool
        T2* defaults for t2r and t2b.
    cgain : float
    sensitivity : array of shape ``spatial``, optional
        Coil-sensitivity map: the series is divided by it (broadcast over volumes)
        before the reference-region fit.
    m0_scale : {"relaxed", "readout"}
        Scale of M0 with a Look-Locker readout (module docstring).  ``readout``
        (default): M0t as fitted (FSL), for ASL data read out with the same flip angle.
        ``relaxed``: M0t / sin(g·FA) per voxel, the equilibrium magnetisation, for ASL
        data with their own readout.
    field_strength : float, tesla
        Selects the tissue table (1.5, 3 or 7).
    tissue_table : mapping of str to TissueParams, optional
        Table to take the defaults from instead.

    Returns
    -------
    SatrecovCalibration
        ``refregion`` (M0a and factors), ``ref_fit``, ``brain_fit`` and provenance.

    Raises
    ------
    InputError
        Shapes that do not match, an empty reference mask or one where no voxel gave a
        usable fit, an inconsistent design (TI count vs volumes, Δt <= 0, ...), an
        unknown tissref or m0_scale, missing values for ``tissref='none'``.
    BackendUnavailableError
        An explicitly requested backend that cannot run here.
    """
    data = as_array("series", series)
    mask_a = as_array("refmask", refmask)
    arrays = [data, mask_a] + [v for v in (brain_mask, sensitivity, t1r, t2r) if is_array(v)]
    xp = array_namespace(*arrays)
    if data.ndim < 2:
        raise InputError(f"series: expected shape (*spatial, n_volumes), got shape {tuple(data.shape)}")
    spatial = tuple(int(s) for s in data.shape[:-1])
    tissref = _check_tissref(tissref)
    if not isinstance(priors, bool):
        raise InputError(f"priors={priors!r}: expected True or False (fabber's priors on or off)")
    if m0_scale not in M0_SCALES:
        raise InputError(f"m0_scale={m0_scale!r}: expected one of {', '.join(M0_SCALES)}")
    te = number("te", te, "ms", allow_min=True)
    cgain = number("cgain", cgain, "ratio")
    fs = check_field_strength(field_strength)
    mask = as_mask("refmask", mask_a, xp, spatial, "series without its last axis")
    bmask = None if brain_mask is None else as_mask("brain_mask", brain_mask, xp, spatial, "series without its last axis")
    n_mask = count(xp, mask)
    if n_mask == 0:
        raise empty_mask_error("refmask")
    tissue = resolve_tissue(
        tissref=tissref, te=te, t1r=t1r, t2r=t2r, t2b=t2b, pc=pc, t2star=t2star,
        field_strength=fs, tissue_table=tissue_table, mask=mask, xp=xp, need_t1r=priors,
    )

    corrected = as_float(data)
    if sensitivity is not None:
        s = spatial_image("sensitivity", as_array("sensitivity", sensitivity), spatial,
                          "series without its last axis", xp, allow_series=False)
        corrected = safe_divide(xp, corrected, s[..., None])
    design = dict(
        repeats=repeats, nphases=nphases, fa=fa, lfa=lfa, dt=dt, slicedt=slicedt,
        sliceband=sliceband, fix_a=fix_a, model=model, bounds=bounds, backend=backend, dtype=dtype,
    )
    ref_fit = fit_satrecov(
        corrected, tis, mask=mask, priors=fabber_priors(tissue["t1r"]) if priors else None, **design
    )
    if not ref_fit.design.identifiable:
        d = ref_fit.design
        free = [n for n, f in zip(("M0t", "T1t", "A", "g"), d.free) if f]
        raise InputError(
            f"the series has {d.n_distinct} distinct recovery times (TIs) for {d.n_free} free parameters "
            f"({', '.join(free)}): the recovery curve cannot be fitted; acquire more TIs"
            + (", or fix the saturation efficiency (fix_a / --fixa)" if d.free[2] else "")
        )

    refregion, readout = m0a_from_satrecov_maps(
        ref_fit.m0t, ref_fit.g, ref_fit.design.fa, mask, m0_scale=m0_scale, tissref=tissref,
        tissue=tissue, te=te, cgain=cgain, t2star=t2star, field_strength=fs,
        sensitivity=sensitivity is not None, n_mask=n_mask, m0t_se=ref_fit.m0t_se,
        design=ref_fit.design, t1t=ref_fit.t1t, a=ref_fit.a, rss=ref_fit.rss,
    )
    warning = reliability_warning(refregion, priors=priors)
    if warning:
        log.warning("%s", warning)
    brain_fit = None
    if bmask is not None:
        brain_fit = fit_satrecov(
            data, tis, mask=bmask, priors=fabber_priors(BRAIN_T1_PRIOR) if priors else None, **design
        )
    return SatrecovCalibration(
        refregion=refregion, ref_fit=ref_fit, brain_fit=brain_fit, m0_scale=m0_scale,
        readout_factor=readout, priors=priors,
    )


def relaxed_m0t(xp, m0t: Any, g: Any, fa: float | None) -> tuple[Any, Any]:
    """``(M0t / sin(g·FA), sin(g·FA))``: a Look-Locker M0t on the equilibrium scale.

    The ``relaxed`` scale of the module docstring, per voxel with its own flip-angle
    correction g; NaN where sin(g·FA) is not > 0 (e.g. outside the fitted voxels, g = 0).
    Plain saturation recovery (``fa`` None) needs no correction: ``(m0t, None)``.
    """
    if fa is None:
        return m0t, None
    sin_map = xp.sin(g * math.radians(fa))
    return safe_divide(xp, m0t, sin_map), sin_map


def m0a_from_satrecov_maps(
    m0t: Any,
    g: Any,
    fa: float | None,
    refmask: Any,
    *,
    m0_scale: str = "readout",
    tissref: str = "csf",
    tissue: Mapping[str, Any] | None = None,
    te: float = 0.0,
    cgain: float = 1.0,
    t2star: bool = False,
    field_strength: float = 3.0,
    tissue_table: Mapping[str, Any] | None = None,
    sensitivity: bool = False,
    n_mask: int | None = None,
    te_blood: float | None = None,
    m0t_se: Any = None,
    design: FitDesign | None = None,
    t1t: Any = None,
    a: Any = None,
    rss: Any = None,
) -> tuple[RefRegionM0, float | None]:
    """M0a from fitted saturation-recovery maps over a reference mask (steps 2-3 above).

    The tail of :func:`m0_refregion_satrecov`, for callers that fitted the series
    themselves (the cohort runner packs the voxels of many subjects into one fit).

    Parameters
    ----------
    m0t, g : array of shape ``spatial``
        Fitted M0t (signal units) and flip-angle correction maps (NumPy or CuPy).
    fa : float or None, degrees
        Look-Locker readout flip angle of the fit's design; None for plain saturation
        recovery (no readout correction).
    refmask : array of shape ``spatial``
        Reference region (non-zero = inside).
    m0_scale : {"relaxed", "readout"}
        See the module docstring.
    tissue : mapping, optional
        Resolved reference-tissue values (from :func:`resolve_tissue`); resolved here
        from ``tissref`` / ``field_strength`` / ``tissue_table`` when None.
    te : float, milliseconds
    cgain : float
    t2star : bool
    field_strength : float, tesla
    tissue_table : mapping, optional
    sensitivity : bool
        Whether the fitted series had been divided by a coil-sensitivity map (provenance).
    n_mask : int, optional
        Voxels in the mask (counted here when None).
    te_blood : float, milliseconds, optional
        Echo time of the ASL data when it differs from ``te`` (the series'): used for
        the blood T2 decay only.
    m0t_se : array of shape ``spatial``, optional
        The fit's standard errors of M0t: their median relative size over the averaged
        voxels goes to ``RefRegionM0.m0t_rel_se`` (module docstring, *Reliability*).
    design : FitDesign, optional
        The fit's design; with it and the fit's ``t1t``, ``a`` and ``rss`` maps (shape
        ``spatial``) the noise-floor lift of the averaged voxels goes to
        ``RefRegionM0.noise_floor_lift`` (module docstring, *Reliability*).
    t1t, a, rss : array of shape ``spatial``, optional

    Returns
    -------
    (RefRegionM0, float or None)
        M0a with its factors, and the mean sin(g·FA) over the reference voxels used
        (None without ``fa``).
    """
    xp = array_namespace(m0t, refmask)
    if m0_scale not in M0_SCALES:
        raise InputError(f"m0_scale={m0_scale!r}: expected one of {', '.join(M0_SCALES)}")
    tissref = _check_tissref(tissref)
    fs = check_field_strength(field_strength)
    mask = as_mask("refmask", as_array("refmask", refmask), xp, tuple(m0t.shape), "m0t")
    if n_mask is None:
        n_mask = count(xp, mask)
    if n_mask == 0:
        raise empty_mask_error("refmask")
    if tissue is None:
        tissue = resolve_tissue(
            tissref=tissref, te=te, t1r=None, t2r=None, t2b=None, pc=None, t2star=t2star,
            field_strength=fs, tissue_table=tissue_table, mask=mask, xp=xp, need_t1r=False,
            te_blood=te_blood,
        )
    readout = None
    if m0_scale == "relaxed":
        values, sin_map = relaxed_m0t(xp, m0t, g, fa)
    else:
        sin_map = None if fa is None else xp.sin(g * math.radians(fa))
        values = m0t
    s_ref, n_used, n_excl, valid = masked_mean(xp, values, mask)
    if n_used == 0:
        raise no_usable_voxel_error("series", n_mask, "the fitted M0t")
    if sin_map is not None:
        readout = masked_mean(xp, sin_map, valid)[0]
    refregion = finish_m0a(
        mode="satrecov", s_ref=s_ref, n_voxels=n_used, n_excluded=n_excl, n_mask=n_mask,
        tr_factor=1.0, tr=None, taq=None, te=te, cgain=cgain, tissref=tissref, t2star=t2star,
        field_strength=fs, sensitivity=sensitivity, tissue=tissue, te_blood=te_blood,
    )
    if m0t_se is not None:
        se = spatial_image("m0t_se", as_array("m0t_se", m0t_se), tuple(int(s) for s in m0t.shape), "m0t", xp,
                           allow_series=False)
        rel = xp.abs(se[valid] / m0t[valid])  # valid: the averaged voxels (finite, non-zero M0t)
        rel = rel[xp.isfinite(rel)]  # NaN: a voxel whose standard error is undefined (singular)
        refregion.m0t_rel_se = float(xp.median(rel)) if int(rel.shape[0]) else None
    if design is not None and t1t is not None and a is not None and rss is not None:
        shape = tuple(int(s) for s in m0t.shape)
        t1t, a, rss, g_map = (spatial_image(name, as_array(name, v), shape, "m0t", xp, allow_series=False)
                              for name, v in (("t1t", t1t), ("a", a), ("rss", rss), ("g", g)))
        refregion.noise_floor_lift = noise_floor_lift(design, m0t, t1t, a, g_map, rss, valid)
    return refregion, readout
