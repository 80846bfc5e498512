"""The array backend: the only place that knows NumPy from CuPy and which kernels exist.

* :func:`array_namespace` / :func:`is_cupy_array` / :func:`to_device` / :func:`to_host`
  move between NumPy and CuPy through array-api-compat.  CuPy is never imported to ask
  "is this a CuPy array?" (we look in ``sys.modules``), so ``import aslcal`` works and
  stays fast on machines without a GPU.
* A registry of kernel backends (``numpy``, ``numba``, ``cuda``), each with
  ``is_available()`` and a human-readable reason when it is not.
* :func:`resolve_backend` turns ``"auto"`` or an explicit name into a concrete backend,
  raising :class:`~aslcal.errors.BackendUnavailableError` for an unavailable explicit
  choice (never a silent fallback).
"""

from __future__ import annotations

from ._arrays import array_namespace, as_numeric_array, is_cupy_array, ndimage_for, special_for, to_device, to_host
from ._registry import (
    AUTO_CUDA_MIN_VOXELS,
    BACKEND_NAMES,
    Backend,
    available_backends,
    get_backend,
    resolve_backend,
    resolve_dtype,
)

__all__ = [
    "AUTO_CUDA_MIN_VOXELS",
    "BACKEND_NAMES",
    "Backend",
    "array_namespace",
    "as_numeric_array",
    "ndimage_for",
    "special_for",
    "available_backends",
    "get_backend",
    "is_cupy_array",
    "resolve_backend",
    "resolve_dtype",
    "to_device",
    "to_host",
]
