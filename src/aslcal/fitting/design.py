"""Acquisition design of a saturation-recovery / Look-Locker fit: validation and expansion.

Turns the user's description (TI list, repeats, phases, flip angles, Δt, slice timing,
bounds, priors) into per-volume arrays and the packed parameter vectors the kernels read.
No array backend is touched here: everything is small and lives on the host.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..physics.satrecov import LFA_OFFSET, MODE_LL, MODE_LL_FABBER, MODE_SR, PARAM_NAMES

__all__ = ["DEFAULT_BOUNDS", "FitDesign", "fabber_priors", "make_design"]

#: Default parameter bounds (calibration.md §7.1): M0t ≥ 0, 0.05 s ≤ T1t ≤ 10 s, 0 ≤ A ≤ 2, 0.5 ≤ g ≤ 1.5.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "m0t": (0.0, math.inf),
    "t1t": (0.05, 10.0),
    "a": (0.0, 2.0),
    "g": (0.5, 1.5),
}

#: Largest effective flip angle allowed (keeps cos θ > 0 in the Look-Locker relations).
_MAX_ANGLE_DEG = 89.9
#: A recovery time above this many seconds was almost surely given in milliseconds (warned).
TI_LOOKS_LIKE_MS = 30.0


def fabber_priors(t1_mean: float = 1.3) -> dict[str, tuple[float, float]]:
    """fabber's weak priors (calibration.md §7.3): T1 ~ N(t1_mean, 0.1 s²), A ~ N(1, 0.1), g ~ N(1, 0.01).

    Parameters
    ----------
    t1_mean : float, seconds
        Prior mean of T1 (the reference tissue T1 for a reference-region fit, 1.3 s for
        the whole brain).
    """
    return {"t1t": (float(t1_mean), 0.1), "a": (1.0, 0.1), "g": (1.0, 0.01)}


@dataclass(frozen=True)
class FitDesign:
    """A validated acquisition design, expanded to one entry per volume."""

    ti: np.ndarray  #: (n_vol,) recovery time of each volume, seconds
    low: np.ndarray  #: (n_vol,) int32, 1 for the low-flip-angle phase
    mode: int  #: MODE_SR, MODE_LL or MODE_LL_FABBER
    fa: float | None  #: nominal high flip angle, degrees
    lfa: float | None  #: nominal low flip angle, degrees
    dt: float  #: Look-Locker readout spacing, seconds (0 for plain SR)
    ti1_high: float  #: first readout time of the high-flip-angle phases, seconds
    ti1_low: float  #: first readout time of the low-flip-angle phase, seconds
    free: tuple[bool, bool, bool, bool]  #: fitted parameters (m0t, t1t, a, g)
    init: tuple[float, float, float, float]  #: start / fixed values
    lower: tuple[float, float, float, float]
    upper: tuple[float, float, float, float]
    prior_mean: tuple[float, float, float, float]
    prior_var: tuple[float, float, float, float]  #: inf = no prior
    slicedt: float = 0.0
    sliceband: int = 1
    n_distinct: int = 0  #: distinct (TI, phase) observations
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_obs(self) -> int:
        return int(self.ti.shape[0])

    @property
    def n_free(self) -> int:
        return int(sum(self.free))

    @property
    def has_priors(self) -> bool:
        return any(f and math.isfinite(v) for f, v in zip(self.free, self.prior_var))

    @property
    def identifiable(self) -> bool:
        """Enough distinct observations for the free parameters."""
        return self.n_distinct >= self.n_free

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly record of the design (for provenance)."""
        model = {MODE_SR: "saturation-recovery", MODE_LL: "look-locker (exact)", MODE_LL_FABBER: "look-locker (fabber form)"}
        return {
            "model": model[self.mode],
            "n_volumes": self.n_obs,
            "ti_s": self.ti.tolist(),
            "low_flip_angle_volume": self.low.astype(bool).tolist(),
            "fa_deg": self.fa,
            "lfa_deg": self.lfa,
            "lfa_offset": LFA_OFFSET if self.lfa is not None else None,
            "dt_s": self.dt,
            "ti1_high_s": self.ti1_high,
            "ti1_low_s": self.ti1_low,
            "slicedt_s": self.slicedt,
            "sliceband": self.sliceband,
            "fitted": [n for n, f in zip(PARAM_NAMES, self.free) if f],
            "fixed": {n: v for n, f, v in zip(PARAM_NAMES, self.free, self.init) if not f},
            "bounds": {n: [lo, hi] for n, lo, hi in zip(PARAM_NAMES, self.lower, self.upper)},
            "priors": {
                n: {"mean": m, "var": v}
                for n, f, m, v in zip(PARAM_NAMES, self.free, self.prior_mean, self.prior_var)
                if f and math.isfinite(v)
            },
            "notes": list(self.notes),
        }


def _as_float_list(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError):
        raise InputError(f"{name}={values!r}: expected a list of numbers (seconds)") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"{name}: expected a non-empty 1-D list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}={arr.tolist()}: every value must be finite")
    return arr


def _check_angle(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected a flip angle in degrees") from None
    if not (0.0 < v < 90.0):
        raise InputError(f"{name}={v:g}: flip angle must be in (0, 90) degrees")
    return v


def _check_phase_trains(ti_vol: np.ndarray, n_phases: int, has_lfa: bool) -> None:
    """One TI per volume under Look-Locker: where the list shows its phases, check them.

    The design splits the volumes into ``n_phases`` equal phases (the low-flip-angle one
    last) and starts every high-flip-angle train at the smallest TI of those phases.  In
    the documented order (phase slowest, TIs rising within a phase) a phase starts where
    the TI drops; when the list splits into exactly ``n_phases`` such runs, each must have
    the same size, and the high-flip-angle ones the same first readout, else the fit would
    model volumes with the wrong flip angle or train silently.  Lists in another order
    are taken as they come.
    """
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ti_vol) < -1e-9) + 1))
    if starts.size != n_phases or n_phases < 2:
        return
    sizes = np.diff(np.concatenate((starts, [ti_vol.size])))
    if np.any(sizes != sizes[0]):
        raise InputError(
            f"tis gives one TI per volume, and its readout trains (a new one where the TI drops) have "
            f"{sizes.tolist()} volumes: the {n_phases} phases{' (the last the low-flip-angle one)' if has_lfa else ''} "
            f"must have one size, since the volumes are split into equal phases; fit phases of one size "
            f"(e.g. leave out the extra repeats)"
        )
    high = starts[: n_phases - 1] if has_lfa else starts
    first = np.round(ti_vol[high], 9)
    if np.any(first != first[0]):
        raise InputError(
            f"tis gives one TI per volume, and its high-flip-angle readout trains start at different times "
            f"{first.tolist()} s: every train is modelled as starting at the first readout after its own "
            f"saturation, at one time for all high-flip-angle phases"
        )


def make_design(
    n_vol: int,
    tis: Any,
    *,
    repeats: int = 1,
    nphases: int = 1,
    fa: float | None = None,
    lfa: float | None = None,
    dt: float | None = None,
    slicedt: float = 0.0,
    sliceband: int = 1,
    fix_a: bool = False,
    priors: Any = None,
    bounds: Mapping[str, Sequence[float]] | None = None,
    model: str = "exact",
) -> FitDesign:
    """Validate the acquisition description and expand it to one entry per volume.

    See :func:`aslcal.fit_satrecov` for the meaning of every argument.  Volume order is
    phase (slowest) → TI → repeat (fastest); the low-flip-angle phase is the last one.
    """
    for name, val in (("repeats", repeats), ("nphases", nphases), ("sliceband", sliceband)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise InputError(f"{name}={val!r}: expected an integer >= 1")
    if model not in ("exact", "fabber"):
        raise InputError(f"model={model!r}: expected 'exact' or 'fabber'")
    if lfa is not None and fa is None:
        raise InputError(f"lfa={lfa!r} given without fa: the low flip angle needs the high flip angle (fa)")
    fa_v = _check_angle("fa", fa) if fa is not None else None
    lfa_v = _check_angle("lfa", lfa) if lfa is not None else None
    try:
        slicedt = float(slicedt)
    except (TypeError, ValueError):
        raise InputError(f"slicedt={slicedt!r}: expected a number of seconds") from None
    if not math.isfinite(slicedt):
        raise InputError(f"slicedt={slicedt!r}: must be finite")

    tis_arr = _as_float_list("tis", tis)
    if np.any(tis_arr < 0):
        raise InputError(f"tis={tis_arr.tolist()}: recovery times must be >= 0 s")
    if float(np.max(tis_arr)) > TI_LOOKS_LIKE_MS:
        warnings.warn(
            f"tis: a recovery time of {float(np.max(tis_arr)):g} s looks like milliseconds (TIs are in seconds)",
            UserWarning, stacklevel=3,
        )
    n_phase_total = nphases + (1 if lfa_v is not None else 0)
    expected = tis_arr.size * repeats * n_phase_total
    if expected == n_vol:
        ti_vol = np.tile(np.repeat(tis_arr, repeats), n_phase_total)
    elif tis_arr.size == n_vol:
        ti_vol = tis_arr.copy()
        if n_vol % n_phase_total:
            raise InputError(
                f"tis gives one TI per volume ({n_vol}) but {n_vol} volumes do not split into "
                f"{n_phase_total} equal phases (nphases={nphases}{' + 1 low-flip-angle phase' if lfa_v else ''})"
            )
    else:
        raise InputError(
            f"tis has {tis_arr.size} values but the data have {n_vol} volumes: expected "
            f"{tis_arr.size} TIs x {repeats} repeats x {n_phase_total} phases = {expected} volumes, "
            f"or one TI per volume ({n_vol} values)"
        )
    low = np.zeros(n_vol, dtype=np.int32)
    if lfa_v is not None:
        low[n_vol - n_vol // n_phase_total :] = 1

    notes: list[str] = []
    if fa_v is None:
        mode = MODE_SR
        dt_v = 0.0
        ti1_high = ti1_low = float(ti_vol.min())
        if dt is not None:
            notes.append("dt ignored: plain saturation recovery (no fa)")
    else:
        mode = MODE_LL if model == "exact" else MODE_LL_FABBER
        if tis_arr.size == n_vol and expected != n_vol:
            _check_phase_trains(ti_vol, n_phase_total, lfa_v is not None)
        # rounded as n_distinct is: one TI computed two ways (0.1 + 2*0.3 and 0.7) is one TI
        distinct = np.unique(np.round(ti_vol[low == 0], 9))
        if dt is None:
            if distinct.size < 2:
                raise InputError(
                    f"Look-Locker readout spacing cannot be inferred from a single TI ({distinct.tolist()}): give dt"
                )
            dt_v = float(distinct[1] - distinct[0])
        else:
            try:
                dt_v = float(dt)
            except (TypeError, ValueError):
                raise InputError(f"dt={dt!r}: expected a number of seconds") from None
        if not (dt_v > 0) or not math.isfinite(dt_v):
            raise InputError(f"dt={dt_v:g}: the Look-Locker readout spacing must be > 0 s")
        ti1_high = float(ti_vol[low == 0].min())
        ti1_low = float(ti_vol[low == 1].min()) if lfa_v is not None else ti1_high
        for which, sel, t0 in (("high", low == 0, ti1_high), ("low", low == 1, ti1_low)):
            if not np.any(sel):
                continue
            k = (ti_vol[sel] - t0) / dt_v
            if np.max(np.abs(k - np.round(k))) > 1e-6 * max(1.0, float(np.max(k))):
                raise InputError(
                    f"Look-Locker TIs of the {which}-flip-angle phase are not on a grid TI1 + k*dt "
                    f"(TI1={t0:g} s, dt={dt_v:g} s): {np.unique(ti_vol[sel]).tolist()}"
                )
        if dt is None:
            steps = np.diff(distinct)
            if np.max(np.abs(steps - dt_v)) > 1e-6 * dt_v:
                raise InputError(
                    f"Look-Locker TIs must be equally spaced within a phase; got spacings {steps.tolist()} s "
                    "(give dt explicitly if readouts were skipped)"
                )

    lower = dict(DEFAULT_BOUNDS)
    if bounds is not None:
        if not isinstance(bounds, Mapping):
            raise InputError(f"bounds={bounds!r}: expected a mapping like {{'t1t': (0.05, 10.0)}}")
        for name, pair in bounds.items():
            if name not in DEFAULT_BOUNDS:
                raise InputError(f"bounds: unknown parameter {name!r}: expected one of {', '.join(PARAM_NAMES)}")
            try:
                lo, hi = (float(pair[0]), float(pair[1]))
            except (TypeError, ValueError, IndexError):
                raise InputError(f"bounds[{name!r}]={pair!r}: expected (lower, upper)") from None
            if math.isnan(lo) or math.isnan(hi) or not lo < hi:
                raise InputError(f"bounds[{name!r}]=({lo:g}, {hi:g}): lower must be < upper")
            lower[name] = (lo, hi)
    if lower["t1t"][0] <= 0:
        raise InputError(f"bounds['t1t'] lower={lower['t1t'][0]:g}: T1 must stay > 0 s")
    if lower["m0t"][0] < 0:
        raise InputError(f"bounds['m0t'] lower={lower['m0t'][0]:g}: M0 cannot be negative")
    g_lo, g_hi = lower["g"]
    if fa_v is not None:
        cap = _MAX_ANGLE_DEG / fa_v
        if lfa_v is not None:
            cap = min(cap, _MAX_ANGLE_DEG / lfa_v - LFA_OFFSET)
        if cap < g_hi:
            g_hi = cap
            notes.append(f"upper bound of g lowered to {cap:.4g} to keep the effective flip angle below {_MAX_ANGLE_DEG} deg")
        if g_lo <= 0 or g_lo >= g_hi:
            raise InputError(f"bounds['g']=({g_lo:g}, {g_hi:g}): need 0 < lower < upper")
    lo_t = tuple(float(lower[n][0]) for n in PARAM_NAMES[:3]) + (float(g_lo),)
    hi_t = tuple(float(lower[n][1]) for n in PARAM_NAMES[:3]) + (float(g_hi),)

    fit_g = lfa_v is not None
    free = (True, True, not fix_a, fit_g)
    a_init = 1.0 if lo_t[2] <= 1.0 <= hi_t[2] else float(np.clip(1.0, lo_t[2], hi_t[2]))
    if fix_a and not (lo_t[2] <= 1.0 <= hi_t[2]):
        raise InputError(f"fix_a=True fixes A = 1, outside bounds['a']=({lo_t[2]:g}, {hi_t[2]:g})")
    if fa_v is not None and not fit_g and g_hi < 1.0 <= lower["g"][1]:
        raise InputError(
            f"fa={fa_v:g} deg: without a low-flip-angle phase (lfa) the flip angle is taken as nominal (g = 1), "
            f"and the Look-Locker model needs it below {_MAX_ANGLE_DEG} deg"
        )
    if fa_v is not None and not fit_g and not (g_lo <= 1.0 <= g_hi):
        raise InputError(
            f"bounds['g']=({g_lo:g}, {g_hi:g}) exclude g = 1: without a low-flip-angle phase (lfa) g is "
            "not fitted but fixed at 1 (the nominal flip angle)"
        )
    g_init = float(np.clip(1.0, g_lo, g_hi))
    t1_init = float(np.clip(1.3, lo_t[1], hi_t[1]))
    init = (0.0, t1_init, a_init, g_init)

    mean = [0.0, 0.0, 0.0, 0.0]
    var = [math.inf] * 4
    if priors is not None and priors is not False:
        pri = fabber_priors() if priors is True or priors == "fabber" else priors
        if not isinstance(pri, Mapping):
            raise InputError(f"priors={priors!r}: expected True, 'fabber' or a mapping like {{'t1t': (1.3, 0.1)}}")
        for name, pair in pri.items():
            if name not in PARAM_NAMES:
                raise InputError(f"priors: unknown parameter {name!r}: expected one of {', '.join(PARAM_NAMES)}")
            try:
                mu, v = float(pair[0]), float(pair[1])
            except (TypeError, ValueError, IndexError):
                raise InputError(f"priors[{name!r}]={pair!r}: expected (mean, variance)") from None
            if not (v > 0) or not math.isfinite(mu):
                raise InputError(f"priors[{name!r}]=({mu:g}, {v:g}): need a finite mean and a variance > 0")
            k = PARAM_NAMES.index(name)
            mean[k], var[k] = mu, v

    keys = np.round(ti_vol, 9) + 1e3 * low
    n_distinct = int(np.unique(keys).size)
    return FitDesign(
        ti=ti_vol,
        low=low,
        mode=mode,
        fa=fa_v,
        lfa=lfa_v,
        dt=dt_v,
        ti1_high=ti1_high,
        ti1_low=ti1_low,
        free=free,
        init=init,
        lower=lo_t,
        upper=hi_t,
        prior_mean=tuple(mean),
        prior_var=tuple(var),
        slicedt=slicedt,
        sliceband=int(sliceband),
        n_distinct=n_distinct,
        notes=tuple(notes),
    )
