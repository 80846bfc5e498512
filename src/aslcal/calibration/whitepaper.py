"""White-paper CBF from a single-PLD ΔM (calibration.md §11; Alsop et al., MRM 2015;73:102).

    (p)CASL:            CBF = 6000 · ΔM · exp(PLD/T1b) / (2 · α · T1b · M0a · (1 − exp(−τ/T1b)))
    PASL (QUIPSS II):   CBF = 6000 · ΔM · exp(TI/T1b)  / (2 · α · TI1 · M0a)

ΔM is control − label; M0a the M0 of arterial blood as the calibration functions return
it (the reference-region M0a, or a voxelwise M0 map, M0_tissue / λ: the white paper's
λ / M0_tissue).  That is :func:`~aslcal.calibration.apply_calibration` (§9) of the ΔM
times the kinetic factor

    K = exp(PLD/T1b) / (2 · T1b · (1 − exp(−τ/T1b)))      (p)CASL, 1/s
    K = exp(TI/T1b) / (2 · TI1)                           PASL

which turns the label into a flow: the label is made during τ (PASL: a bolus of temporal
width TI1 at once), decays with the blood T1 until the readout, and the tissue T1 is taken
as the blood's (the white paper's assumptions: all label arrived before the readout, no
outflow).  The factor 2 counts control − label (twice the inversion).  With a 2-D readout
each slice is read later than the first: its PLD (TI) is PLD + its slice time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import array_namespace
from ..errors import InputError
from ._common import as_array, as_float, number
from .apply import CalibratedImage, apply_calibration, labelling_name

__all__ = ["WhitePaperCBF", "kinetic_factor", "quantify_whitepaper"]


def kinetic_factor(labelling: str, *, pld: float, t1b: float, tau: float | None = None,
                   ti1: float | None = None) -> float:
    """The white-paper factor K (1/s) of the module docstring for one PLD (PASL: TI)."""
    lab = labelling_name(labelling)
    pld = _seconds("pld", pld, allow_min=True)
    t1b = _seconds("t1b", t1b)
    if lab == "pasl":
        if ti1 is None:
            raise InputError("PASL needs ti1 (the bolus duration TI1 of QUIPSS II / Q2TIPS, s): "
                             "without a bolus cut-off the label duration is unknown")
        ti1 = _seconds("ti1", ti1)
        if ti1 > pld:
            raise InputError(f"ti1={ti1:g} s > TI={pld:g} s: the bolus is cut off after the readout")
        return math.exp(pld / t1b) / (2.0 * ti1)
    if tau is None:
        raise InputError(f"{lab.upper()} needs tau (the labelling duration, s)")
    tau = _seconds("tau", tau)
    return math.exp(pld / t1b) / (2.0 * t1b * -math.expm1(-tau / t1b))


#: The last slice of a 2-D readout is read within a TR: later slice times are milliseconds.
_MAX_SLICE_TIME = 10.0
#: No delay, duration or blood T1 of an ASL acquisition reaches this (seconds): a larger
#: value is one given in milliseconds (BIDS and ExploreASL's own files differ here), and
#: exp(PLD/T1b) of it overflows or is absurd.
_MAX_SECONDS = 30.0


def _seconds(name: str, value: Any, *, allow_min: bool = False) -> float:
    v = number(name, value, "s", allow_min=allow_min)
    if v > _MAX_SECONDS:
        raise InputError(f"{name}={v:g} s looks like milliseconds: times are in seconds (e.g. 1.8, not 1800)")
    return v


@dataclass
class WhitePaperCBF:
    """Result of :func:`quantify_whitepaper`.

    Attributes
    ----------
    calibrated : CalibratedImage
        The CBF (``.image``, ml/100g/min) and the calibration factors of §9.
    labelling : str
    pld : float, s
        PLD ((p)CASL) or TI (PASL) of the first slice.
    tau, ti1 : float or None, s
        Labelling duration ((p)CASL) or bolus duration TI1 (PASL).
    t1b : float, s
    t1b_source : str
        ``user`` or ``table <field strength> T``.
    slice_times : tuple of float or None, s
        Added to the PLD per slice (2-D readout).
    factors : tuple of float, 1/s
        K of each slice (one value without slice times).
    """

    calibrated: CalibratedImage
    labelling: str
    pld: float
    tau: float | None
    ti1: float | None
    t1b: float
    t1b_source: str
    slice_times: tuple[float, ...] | None
    factors: tuple[float, ...]

    @property
    def image(self) -> Any:
        """The CBF map, ml/100g/min."""
        return self.calibrated.image

    def as_dict(self) -> dict[str, Any]:
        out = {
            "model": "white paper (Alsop et al. 2015), single PLD",
            "labelling": self.labelling, "pld_s": self.pld, "tau_s": self.tau, "ti1_s": self.ti1,
            "t1b_s": self.t1b, "t1b_source": self.t1b_source,
            "slice_times_s": None if self.slice_times is None else list(self.slice_times),
            "kinetic_factors_per_s": list(self.factors),
            "formula": ("6000 * dM * exp(PLD/T1b) / (2 * alpha * TI1 * M0a)" if self.labelling == "pasl" else
                        "6000 * dM * exp(PLD/T1b) / (2 * alpha * T1b * M0a * (1 - exp(-tau/T1b)))"),
        }
        out["calibration"] = self.calibrated.as_dict()
        return out


def quantify_whitepaper(
    delta_m: Any,
    m0a: Any,
    *,
    labelling: str,
    pld: float,
    tau: float | None = None,
    ti1: float | None = None,
    alpha: float | None = None,
    t1b: float | None = None,
    field_strength: float = 3.0,
    tissue_table: Mapping[str, Any] | None = None,
    sensitivity: Any = None,
    slice_times: Sequence[float] | None = None,
    slice_axis: int = 2,
) -> WhitePaperCBF:
    """CBF (ml/100g/min) from a single-PLD ΔM by the white-paper model (module docstring).

    Parameters
    ----------
    delta_m : array, signal units
        Mean control − label (NumPy or CuPy); spatial, with an optional trailing axis.
    m0a : float or array
        M0 of arterial blood: a number (reference region) or a map (voxelwise M0).
    labelling : {"pcasl", "casl", "pasl"}
    pld : float, s
        Post-labelling delay ((p)CASL) or inversion time TI (PASL) of the first slice.
    tau : float, s
        Labelling duration ((p)CASL).
    ti1 : float, s
        Bolus duration TI1 (PASL with QUIPSS II / Q2TIPS bolus cut-off).
    alpha : float, optional
        Labelling efficiency; default 0.85 (p)CASL, 0.98 PASL.
    t1b : float, s, optional
        T1 of arterial blood; default the tissue table's at ``field_strength``.
    field_strength : float, tesla
    tissue_table : mapping of str to TissueParams, optional
        Table to take the blood T1 from instead.
    sensitivity : array, optional
        Coil-sensitivity map (as :func:`apply_calibration`).
    slice_times : sequence of float, s, optional
        Readout time of each slice after the first (2-D readouts): slice z has PLD + slice_times[z].
    slice_axis : int
        The axis of ``delta_m`` the slice times run along (default 2, the third).

    Returns
    -------
    WhitePaperCBF

    Raises
    ------
    InputError
        An unknown labelling, a missing tau (CASL) or TI1 (PASL), TI1 > TI, values that
        are not positive finite numbers, slice times that do not match the slice axis,
        and the errors of :func:`apply_calibration`.
    """
    lab = labelling_name(labelling)
    pld = _seconds("pld", pld, allow_min=True)
    if t1b is None:
        from ..physics.tissues import tissue_table as _table

        if tissue_table is not None:
            blood = tissue_table.get("blood") if isinstance(tissue_table, Mapping) else None
            if blood is None or not hasattr(blood, "t1"):
                raise InputError(
                    "tissue_table: expected a mapping of tissue name to TissueParams (from "
                    "aslcal.physics.tissues.tissue_table) with a 'blood' entry; got "
                    + (type(tissue_table).__name__ if not isinstance(tissue_table, Mapping) else
                       f"entries {sorted(tissue_table)}" if blood is None else f"blood={blood!r}")
                )
            t1b_v = _seconds("tissue_table['blood'].t1", blood.t1)
            try:  # a table of overrides that leaves blood alone: the built-in value
                builtin = float(_table(field_strength)["blood"].t1)
            except InputError:
                builtin = None
            t1b_src = f"table {float(field_strength):g} T" if builtin == t1b_v else "user tissue table"
        else:
            t1b_v, t1b_src = float(_table(field_strength)["blood"].t1), f"table {float(field_strength):g} T"
    else:
        t1b_v, t1b_src = _seconds("t1b", t1b), "user"
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, int | np.integer):
        raise InputError(f"slice_axis={slice_axis!r}: expected an integer axis of delta_m")
    if slice_times is not None and (isinstance(slice_times, str) or not isinstance(slice_times, Iterable)):
        raise InputError(f"slice_times={slice_times!r}: expected one time (s) per slice, e.g. [0.0, 0.04, ...]")
    dm = as_float(as_array("delta_m", delta_m))
    xp = array_namespace(dm)
    times = None
    if slice_times is None:
        factors = (kinetic_factor(lab, pld=pld, t1b=t1b_v, tau=tau, ti1=ti1),)
        scaled = dm * factors[0]
    else:
        times = tuple(number(f"slice_times[{i}]", t, "s", allow_min=True) for i, t in enumerate(slice_times))
        if times and max(times) > _MAX_SLICE_TIME:
            raise InputError(
                f"slice_times up to {max(times):g} s look like milliseconds: times are in seconds "
                "(a slice is read within a TR)"
            )
        if not (-dm.ndim <= slice_axis < dm.ndim) or dm.shape[slice_axis] != len(times):
            raise InputError(f"slice_times: {len(times)} values but delta_m has shape {tuple(dm.shape)} "
                             f"(slice axis {slice_axis})")
        factors = tuple(kinetic_factor(lab, pld=pld + t, t1b=t1b_v, tau=tau, ti1=ti1) for t in times)
        shape = [1] * dm.ndim
        shape[slice_axis] = len(times)
        scaled = dm * xp.asarray(factors, dtype=dm.dtype).reshape(shape)
    cal = apply_calibration(scaled, m0a, alpha=alpha, labelling=lab, sensitivity=sensitivity)
    return WhitePaperCBF(
        calibrated=cal, labelling=lab, pld=pld, tau=None if lab == "pasl" else float(tau),
        ti1=None if lab != "pasl" else float(ti1), t1b=t1b_v, t1b_source=t1b_src, slice_times=times,
        factors=factors,
    )
