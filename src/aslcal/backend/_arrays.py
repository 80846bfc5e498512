"""NumPy/CuPy array helpers built on array-api-compat."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, InputError

__all__ = ["array_namespace", "as_numeric_array", "is_cupy_array", "ndimage_for", "special_for", "to_device", "to_host"]


def is_cupy_array(x: Any) -> bool:
    """True if ``x`` is a CuPy array.  Never imports CuPy (looks in ``sys.modules``)."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def array_namespace(*arrays: Any):
    """Return the array-API-compatible namespace of ``arrays`` (NumPy or CuPy).

    Python scalars and ``None`` are ignored.  Mixing NumPy and CuPy arrays is an
    :class:`~aslcal.errors.InputError` (aslcal never copies silently between devices).
    """
    import array_api_compat

    arrs = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool, complex))]
    if not arrs:
        return array_api_compat.array_namespace(np.empty(0))
    kinds = {is_cupy_array(a) for a in arrs}
    if len(kinds) > 1:
        raise InputError(
            "arrays live on different devices (some NumPy, some CuPy): move them to one "
            "device first with aslcal.backend.to_device or to_host"
        )
    arrs = [np.asarray(a) if not is_cupy_array(a) and not isinstance(a, np.ndarray) else a for a in arrs]
    return array_api_compat.array_namespace(*arrs)


def to_device(x: Any, device: str = "gpu"):
    """Copy ``x`` to the GPU (``"gpu"``, CuPy array) or host (``"cpu"``, NumPy array)."""
    if device == "cpu":
        return to_host(x)
    if device != "gpu":
        raise InputError(f"device={device!r}: expected 'gpu' or 'cpu'")
    if is_cupy_array(x):
        return x
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise BackendUnavailableError(
            f"CuPy is not installed ({exc}); install the GPU extra: pip install 'aslcal[cuda]'"
        ) from None
    return cupy.asarray(x)


def to_host(x: Any) -> np.ndarray:
    """Return ``x`` as a NumPy array, copying from the GPU if needed (an I/O boundary)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def ndimage_for(arr: Any):
    """``scipy.ndimage`` for NumPy arrays, ``cupyx.scipy.ndimage`` for CuPy arrays."""
    if is_cupy_array(arr):
        import cupyx.scipy.ndimage as ndi
    else:
        import scipy.ndimage as ndi
    return ndi


def special_for(arr: Any):
    """``scipy.special`` for NumPy arrays, ``cupyx.scipy.special`` for CuPy arrays."""
    if is_cupy_array(arr):
        import cupyx.scipy.special as sp
    else:
        import scipy.special as sp
    return sp


def as_numeric_array(name: str, value: Any, *, ndim: int | None = None) -> Any:
    """``value`` as a real-valued NumPy or CuPy array (sequences become NumPy).

    Raises :class:`~aslcal.errors.InputError` naming ``name`` for None, non-numeric data, or
    (with ``ndim``) the wrong number of axes.
    """
    if value is None:
        raise InputError(f"{name}: required, got None")
    if isinstance(value, np.ndarray) or is_cupy_array(value):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            raise InputError(f"{name}: expected an image (array of numbers), got {type(value).__name__}") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected an array of real numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-D image, got shape {tuple(arr.shape)}")
    return arr
