"""Shared input checks and masked reductions of :mod:`aslcal.calibration` (private).

Every helper works on NumPy or CuPy arrays alike through the namespace ``xp`` the public
function found from its inputs.  Reductions return Python scalars: a reported number
(a mean, a voxel count) is the one thing that crosses from the device to the host here,
never an image.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ..backend import as_numeric_array, is_cupy_array
from ..errors import InputError

__all__ = ["CalibrationWarning"]


class CalibrationWarning(UserWarning):
    """A calibration ran, but on an assumption the user should know about (e.g. α = 1)."""


def as_array(name: str, value: Any) -> Any:
    """``value`` as a numeric NumPy/CuPy array (lists become NumPy); checks the dtype."""
    return as_numeric_array(name, value)


def is_array(value: Any) -> bool:
    """True for NumPy and CuPy arrays (not for Python scalars or lists)."""
    return isinstance(value, np.ndarray) or is_cupy_array(value)




def as_float(arr: Any) -> Any:
    """Floating-point view of ``arr`` (float32/float64 kept; other types become float64)."""
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def spatial_image(name: str, arr: Any, spatial: tuple, ref: str, xp, *, allow_series: bool = True) -> Any:
    """``arr`` as a float image of shape ``spatial``; a series (``spatial + (n,)``) is time-averaged."""
    shape = tuple(int(s) for s in arr.shape)
    if shape == spatial:
        return as_float(arr)
    if allow_series and len(shape) == len(spatial) + 1 and shape[:-1] == spatial:
        if shape[-1] == 0:
            raise InputError(f"{name}: the series of shape {shape} has no volumes")
        return xp.mean(as_float(arr), axis=-1)
    expect = f"{spatial} (the shape of {ref})"
    if allow_series:
        expect += f" or {spatial + ('n',)} (a series, averaged over the last axis)"
    raise InputError(f"{name}: shape {shape} does not match: expected {expect}")


def as_mask(name: str, value: Any, xp, shape: tuple | None = None, ref: str = "") -> Any:
    """A boolean mask (non-zero = inside) from a bool/int/float array, shape-checked."""
    arr = as_array(name, value)
    if shape is not None and tuple(int(s) for s in arr.shape) != shape:
        raise InputError(
            f"{name}: shape {tuple(arr.shape)} does not match {shape} (the shape of {ref})"
        )
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f" and not bool(xp.all(xp.isfinite(arr))):
        raise InputError(f"{name}: the mask contains NaN or Inf; expected 0 (outside) and non-zero (inside)")
    return arr != 0


def count(xp, mask: Any) -> int:
    """Number of True voxels (one scalar to the host)."""
    return int(xp.sum(mask))


def number(name: str, value: Any, unit: str, *, minimum: float = 0.0, allow_min: bool = False) -> float:
    """A finite Python float > ``minimum`` (>= when ``allow_min``); 0-d arrays accepted."""
    if isinstance(value, bool):
        raise InputError(f"{name}={value!r}: expected a number ({unit})")
    if is_array(value) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise InputError(f"{name}={value!r}: expected a number ({unit})")
    v = float(value)
    ok = math.isfinite(v) and (v >= minimum if allow_min else v > minimum)
    if not ok:
        rel = ">=" if allow_min else ">"
        raise InputError(f"{name}={value!r}: expected a finite number {rel} {minimum:g} ({unit})")
    return v


def safe_divide(xp, num: Any, den: Any) -> Any:
    """``num / den`` where ``den`` is finite and > 0, NaN elsewhere (no warnings, any device)."""
    ok = xp.isfinite(den) & (den > 0)
    one = xp.ones_like(den)
    out = num / xp.where(ok, den, one)
    return xp.where(ok, out, xp.full_like(out, math.nan))


def masked_mean(xp, values: Any, mask: Any) -> tuple[float, int, int, Any]:
    """Mean of ``values`` over mask voxels whose value is finite and non-zero.

    Returns ``(mean, n_used, n_excluded, valid)``: ``mean`` is NaN when no voxel is
    usable, ``n_excluded`` counts mask voxels dropped (zero or non-finite), ``valid`` is
    the boolean map of the voxels used.  The sum is accumulated in float64.
    """
    valid = mask & xp.isfinite(values) & (values != 0)
    n_mask = count(xp, mask)
    n_used = count(xp, valid)
    if n_used == 0:
        return math.nan, 0, n_mask, valid
    total = float(xp.sum(xp.where(valid, values, xp.zeros_like(values)), dtype=xp.float64))
    return total / n_used, n_used, n_mask - n_used, valid
