"""Absolute perfusion from a calibrated M0 (calibration.md §9).

    CBF      = 6000 · perfusion / (s · M0a · α)              ml/100g/min
    variance = 6000² · variance / (s · M0a · α)²            (ml/100g/min)²
    aCBV     = 100 · perfusion / (s · M0a · α)               ml/100g

6000 = 60 s/min × 100 (ml per 100 g, tissue density ~1 g/ml); s is the coil sensitivity
(1 if none); α the labelling efficiency: 0.85 for pCASL/CASL, 0.98 for PASL, else 1
with a :class:`CalibrationWarning`.  With an M0 map (or a sensitivity map) the division
is voxelwise; voxels where M0 or s is not finite or <= 0 are set to 0 and counted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import array_namespace
from ..errors import InputError
from ._common import CalibrationWarning, as_array, as_float, count, is_array, number

__all__ = ["ALPHA_DEFAULTS", "KINDS", "CalibratedImage", "apply_calibration"]

#: Labelling efficiency by labelling type (calibration.md §9; Alsop et al. 2015).
ALPHA_DEFAULTS = {"pcasl": 0.85, "casl": 0.85, "pasl": 0.98}

#: Output kinds and their scale numerator: image · numerator / (s · M0a · α)^power.
KINDS = {
    "perfusion": (6000.0, 1, "ml/100g/min"),
    "variance": (6000.0**2, 2, "(ml/100g/min)^2"),
    "acbv": (100.0, 1, "ml/100g"),
}


@dataclass
class CalibratedImage:
    """Result of :func:`apply_calibration`.

    Attributes
    ----------
    image : array
        The calibrated image on the input's device (float dtype of the input), in
        ``units``.
    kind : str
        ``perfusion``, ``variance`` or ``acbv``.
    units : str
    m0a : float or None, signal units
        The scalar M0a used; None when an M0 map was given (``m0_map`` True).
    m0_map : bool
    alpha : float
    alpha_source : str
        ``user``, ``labelling`` (default for the labelling type) or ``assumed`` (α = 1,
        labelling unknown: a :class:`CalibrationWarning` was issued).
    labelling : str or None
    sensitivity : bool
        Whether the image was divided by a coil-sensitivity map.
    scale : float
        The constant factor applied: numerator / α^power (times 1/M0a^power for a
        scalar M0a).
    n_zeroed : int
        Voxels (of the spatial grid) set to 0 because M0 or s was not finite or <= 0.
    """

    image: Any
    kind: str
    units: str
    m0a: float | None
    m0_map: bool
    alpha: float
    alpha_source: str
    labelling: str | None
    sensitivity: bool
    scale: float
    n_zeroed: int

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (everything but the image)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "image"}
        num, power, _ = KINDS[self.kind]
        out["formula"] = f"{self.kind} = {num:g} * input / (s * M0a * alpha)^{power}"
        return out


def labelling_name(labelling: Any) -> str:
    """The labelling type in lower case (a key of :data:`ALPHA_DEFAULTS`); InputError otherwise."""
    if not isinstance(labelling, str) or labelling.lower() not in ALPHA_DEFAULTS:
        raise InputError(f"labelling={labelling!r}: expected one of {', '.join(ALPHA_DEFAULTS)}")
    return labelling.lower()


def _alpha(alpha: Any, labelling: Any) -> tuple[float, str, str | None]:
    lab = None if labelling is None else labelling_name(labelling)
    if alpha is not None:
        a = number("alpha", alpha, "labelling efficiency")
        if a > 1:
            raise InputError(f"alpha={alpha!r}: the labelling efficiency must be in (0, 1]")
        return a, "user", lab
    if lab is not None:
        return ALPHA_DEFAULTS[lab], "labelling", lab
    warnings.warn(
        "labelling efficiency unknown (no alpha, no labelling type): alpha = 1 assumed; "
        "give alpha (--alpha), or the labelling type (labelling= / --labelling: pcasl 0.85, pasl 0.98)",
        CalibrationWarning,
        stacklevel=3,
    )
    return 1.0, "assumed", None


def _spatial_map(name: str, value: Any, shape: tuple) -> Any:
    """A map of the perfusion's spatial shape (``shape``, or ``shape[:-1]`` for a series,
    returned with a trailing axis of length 1 so that it lines up with the image's)."""
    arr = as_array(name, value)
    ms = tuple(int(s) for s in arr.shape)
    if ms == shape:
        return as_float(arr)
    if len(shape) >= 2 and ms == shape[:-1]:
        return as_float(arr)[..., None]
    alt = f" or {shape[:-1]}" if len(shape) >= 2 else ""
    raise InputError(f"{name}: map of shape {ms} does not match the perfusion image {shape}{alt}")


def apply_calibration(
    perfusion: Any,
    m0a: Any,
    *,
    alpha: float | None = None,
    labelling: str | None = None,
    sensitivity: Any = None,
    kind: str = "perfusion",
) -> CalibratedImage:
    """Calibrate a perfusion (or variance, or aCBV) image in absolute units.

    Parameters
    ----------
    perfusion : array, signal units
        The uncalibrated image (NumPy or CuPy): perfusion, its variance (``kind=
        "variance"``) or arterial blood volume (``kind="acbv"``).  Any shape; a trailing
        axis (several TIs or repeats) is allowed when the maps have the shape without it.
    m0a : float or array, signal units
        M0 of arterial blood: a number (reference region) or an M0 map of the image's
        (spatial) shape (voxelwise).  Map voxels not finite or <= 0 give 0 and are counted.
    alpha : float, optional
        Labelling efficiency in (0, 1].  Takes precedence over ``labelling``.
    labelling : {"pcasl", "casl", "pasl"}, optional
        Labelling type: α defaults to 0.85 (pCASL, CASL) or 0.98 (PASL).  With neither
        alpha nor labelling, α = 1 and a :class:`CalibrationWarning` is issued.
    sensitivity : array, optional
        Coil-sensitivity map s of the image's (spatial) shape; the image is divided by it
        (by s² for a variance).  Voxels where s is not finite or <= 0 give 0 and are counted.
    kind : {"perfusion", "variance", "acbv"}
        ``perfusion``: 6000·p/(s·M0a·α) in ml/100g/min; ``variance``:
        6000²·v/(s·M0a·α)²; ``acbv``: 100·p/(s·M0a·α) in ml/100g.

    Returns
    -------
    CalibratedImage
        The image (input's device and float dtype) and every factor and count.

    Raises
    ------
    InputError
        An unknown kind or labelling type, α outside (0, 1], a scalar M0a that is not a
        positive finite number, or maps whose shape does not match the image.
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    num, power, units = KINDS[kind]
    img = as_array("perfusion", perfusion)
    m0_is_map = is_array(m0a) and m0a.ndim > 0
    xp = array_namespace(*([img] + [v for v in (m0a, sensitivity) if is_array(v) and v.ndim > 0]))
    a, a_src, lab = _alpha(alpha, labelling)
    shape = tuple(int(s) for s in img.shape)
    out = as_float(img)
    m0_value = None
    den = None
    if m0_is_map:
        den = _spatial_map("m0a", m0a, shape)
    else:
        m0_value = number("m0a", m0a, "signal units")
    try:
        scale = num / (a * (1.0 if m0_value is None else m0_value)) ** power
    except (OverflowError, ZeroDivisionError):
        scale = math.inf if (a * (m0_value or 1.0)) < 1.0 else 0.0
    if sensitivity is not None:
        s = _spatial_map("sensitivity", sensitivity, shape)
        den = s if den is None else den * s
    beyond_type = den is None and not math.isinf(scale) and scale > float(np.finfo(out.dtype).max)
    if math.isinf(scale) or scale == 0.0 or beyond_type:
        raise InputError(f"m0a={m0a!r}, alpha={a:g}: the calibration factor {scale!r} is not usable"
                         + (f" (beyond {np.dtype(out.dtype).name}: M0a in signal units, not a fraction?)"
                            if beyond_type else ""))
    n_zeroed = 0
    if den is None:
        # voxels whose CBF exceeds the image's type become inf (reported by the callers);
        # the error state is per thread (see below)
        with np.errstate(over="ignore"):
            out = out * scale
    else:
        ok = xp.isfinite(den) & (den > 0)
        # reciprocals that overflow: excluded below.  np.errstate, not warnings.catch_warnings:
        # the error state is per thread, the warning filters are global (a cohort run
        # calibrates on two threads at once); CuPy does not warn.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            inv = xp.where(ok, 1.0 / xp.where(ok, den, xp.ones_like(den)), xp.zeros_like(den))
            if power == 2:
                inv = inv * inv
            inv = (inv * scale).astype(out.dtype)
        # a map value so small that its factor overflows the image's type counts as unusable
        ok = ok & xp.isfinite(inv)
        n_zeroed = int(den.size) - count(xp, ok)
        # unusable voxels are 0 whatever the image holds there (NaN and Inf included)
        out = xp.where(ok, out, xp.zeros_like(out)) * xp.where(ok, inv, xp.zeros_like(inv))
    return CalibratedImage(
        image=out, kind=kind, units=units, m0a=m0_value, m0_map=m0_is_map, alpha=a,
        alpha_source=a_src, labelling=lab, sensitivity=sensitivity is not None, scale=scale,
        n_zeroed=n_zeroed,
    )
