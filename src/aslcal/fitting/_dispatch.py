"""Launch the LM kernel on a backend (the only place that touches kernel objects)."""

from __future__ import annotations

import time
from typing import Any

from .design import FitDesign


def run_fit(backend: str, y, design: FitDesign, tshift, fpar, ipar, outs: tuple, timings: dict[str, float]) -> None:
    """Fit every column of ``y`` in place into ``outs`` (params, se, rss, n_iter, status)."""
    import numpy as np

    ti = design.ti.astype(fpar.dtype)
    low = design.low
    if backend == "numba":
        import numba

        from ..kernels.lm_cpu import get_numba_fitter

        t0 = time.perf_counter()
        kernel = get_numba_fitter(y.dtype.name)
        timings["compile"] = time.perf_counter() - t0
        n_chunks = max(1, min(y.shape[1], 8 * numba.get_num_threads()))
        t0 = time.perf_counter()
        kernel(y, ti, low, tshift, fpar, ipar, *outs, n_chunks)
        timings["fit"] = time.perf_counter() - t0
    elif backend == "numpy":
        from ..kernels.lm_cpu import fit_python

        t0 = time.perf_counter()
        fit_python(y, ti, low, tshift, fpar, ipar, *outs)
        timings["fit"] = time.perf_counter() - t0
    elif backend == "cuda":
        _run_cuda(y, ti, low, tshift, fpar, ipar, outs, timings)
    else:  # pragma: no cover - resolve_backend guarantees a known name
        raise AssertionError(backend)


def _run_cuda(y, ti, low, tshift, fpar, ipar, outs, timings) -> None:
    from numba import cuda

    from ..backend import is_cupy_array
    from ..kernels.lm_cuda import THREADS_PER_BLOCK, get_cuda_fitter

    t0 = time.perf_counter()
    kernel = get_cuda_fitter(y.dtype.name)
    timings["compile"] = time.perf_counter() - t0
    n_vox = y.shape[1]
    blocks = (n_vox + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    if is_cupy_array(y):
        import cupy

        small = [cupy.asarray(a) for a in (ti, low, fpar, ipar)]
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        kernel[blocks, THREADS_PER_BLOCK](y, small[0], small[1], tshift, small[2], small[3], *outs)
        stop.record()
        stop.synchronize()
        timings["fit"] = cupy.cuda.get_elapsed_time(start, stop) / 1e3
        return
    # host arrays: explicit transfers (timed separately), results copied back in place
    t0 = time.perf_counter()
    d_in = [cuda.to_device(a) for a in (y, ti, low, tshift, fpar, ipar)]
    d_out = [cuda.to_device(o) for o in outs]
    cuda.synchronize()
    timings["h2d"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kernel[blocks, THREADS_PER_BLOCK](*d_in, *d_out)
    cuda.synchronize()
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for host, dev in zip(outs, d_out):
        dev.copy_to_host(host)
    timings["d2h"] = time.perf_counter() - t0
