"""CPU drivers of the single-voxel LM fitter: numba (parallel over voxels) and plain Python.

Both run :func:`aslcal.kernels.lm.make_fit_voxel` unchanged; only the loop over voxels
and the scratch allocation live here.  Compilation is lazy (first call) and cached on
disk by numba (``cache=True``), so later processes load machine code instead of
recompiling.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .lm import make_fit_voxel, make_grid_tables

__all__ = ["get_numba_fitter", "get_grid_tables", "fit_python"]


def cached_njit(tag: str, **options):
    """``numba.njit(cache=True)`` that also hits the cache for factory-built functions.

    numba keys its on-disk cache on the bytecode *and the pickled closure*.  Our kernels
    are closures over other dispatchers, and a dispatcher pickles with a random UUID, so
    the key would change in every process and nothing would ever be reused.  Giving each
    dispatcher a deterministic UUID (function name + ``tag``, e.g. the dtype) before it
    is first pickled makes the key stable.  ``_set_uuid`` is numba's own hook for
    unpickling; if a numba version lacks it, caching silently degrades to recompiling.
    """
    import numba

    def decorate(fn):
        disp = numba.njit(cache=True, **options)(fn)
        try:
            disp._set_uuid(f"aslcal:{fn.__module__}.{fn.__qualname__}:{tag}")
        except (AttributeError, AssertionError):  # pragma: no cover - other numba versions
            pass
        return disp

    return decorate


@lru_cache(maxsize=None)
def get_numba_fitter(dtype_name: str):
    """Return the compiled batch fitter ``fit_batch(y, ti, sidx, shifts, gu, gw, fpar, ipar, *outs, n_chunks)``.

    ``n_chunks`` contiguous voxel ranges are spread over the numba threads (a few per
    thread balances voxels that need more iterations).
    """
    import numba

    # fastmath={"contract"} only: a*b + c may become one fused multiply-add (one rounding
    # instead of two), as the CUDA compiler does by default; no other fast-math liberty
    # (NaN and Inf checks stay exact).  15-17 % faster fits, parameters within 1e-14.
    fit_voxel = make_fit_voxel(
        np.dtype(dtype_name).type, jit=cached_njit(f"{dtype_name}:fma", nogil=True, fastmath={"contract"})
    )

    @cached_njit(dtype_name, parallel=True, nogil=True)
    def fit_batch(y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status, n_chunks):
        n_vox = y.shape[1]
        for c in numba.prange(n_chunks):
            for v in range(c * n_vox // n_chunks, (c + 1) * n_vox // n_chunks):
                fit_voxel(v, y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status)

    return fit_batch


@lru_cache(maxsize=None)
def get_grid_tables(dtype_name: str, compiled: bool = True):
    """Return ``fill(ti, shifts, fpar, ipar, gu, gw)`` (numba-compiled, or plain Python)."""
    if not compiled:
        return make_grid_tables(np.dtype(dtype_name).type)
    return make_grid_tables(np.dtype(dtype_name).type, jit=cached_njit(dtype_name, nogil=True))


@lru_cache(maxsize=None)
def _python_fit_voxel(dtype_name: str):
    return make_fit_voxel(np.dtype(dtype_name).type)


def fit_python(y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status) -> None:
    """Run the same fitter as plain Python (the ``numpy`` backend: slow, for reference)."""
    fit_voxel = _python_fit_voxel(y.dtype.name)
    with np.errstate(all="ignore"):
        for v in range(y.shape[1]):
            fit_voxel(v, y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status)
