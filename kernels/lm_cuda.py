"""CUDA driver of the single-voxel LM fitter: one thread per voxel, all state in registers.

Runs :func:`aslcal.kernels.lm.make_fit_voxel` unchanged, compiled with
``numba.cuda.jit(device=True)``.  This module imports numba.cuda; it is itself imported
only when the CUDA backend is used.  Works on CuPy arrays (``__cuda_array_interface__``),
numba device arrays, and, under the CUDA simulator, NumPy arrays.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import cuda  # module global: the CUDA simulator swaps it in kernels' globals

from .lm import make_fit_voxel

__all__ = ["get_cuda_fitter", "kernel_signature", "THREADS_PER_BLOCK"]

#: Threads per block for the fit kernel.  Registers bound the occupancy (ptxas, sm_90: 172 per
#: thread in float32, 232 in float64, no spills): 2 blocks of 128, 8 of 64 warps per SM in
#: float32; 64-256 are to be measured on a GPU.
THREADS_PER_BLOCK = 128


def _kernel_source(dtype):
    fit_voxel = make_fit_voxel(dtype, jit=cuda.jit(device=True))

    def fit_batch(y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status):
        v = cuda.grid(1)
        if v < y.shape[1]:
            fit_voxel(v, y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status)

    return fit_batch


def kernel_signature(dtype_name: str):
    """The explicit numba signature of the fit kernel for ``dtype_name``."""
    import numba

    f = numba.from_dtype(np.dtype(dtype_name))
    i32 = numba.int32
    return (
        f[:, :], f[:], i32[:], f[:], f[:, :, :], f[:, :, :], f[:], i32[:],
        f[:, :], f[:, :], f[:], i32[:], i32[:],
    )


def kernel_pyfunc(dtype_name: str):
    """The uncompiled kernel function (for :func:`numba.cuda.compile_ptx` checks)."""
    return _kernel_source(np.dtype(dtype_name).type)


@lru_cache(maxsize=None)
def get_cuda_fitter(dtype_name: str):
    """Return the launchable CUDA kernel ``fit_batch[blocks, threads](...)``."""
    return cuda.jit(_kernel_source(np.dtype(dtype_name).type))
