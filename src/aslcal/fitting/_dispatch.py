"""Launch the LM kernel on a backend (the only place that touches kernel objects)."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings

import numpy as np

from .design import FitDesign

#: One numba parallel launch at a time in a process.  numba's ``workqueue`` threading
#: layer (what numba falls back to when neither TBB nor OpenMP can be loaded, e.g. a
#: container without libgomp) aborts the whole process when two threads launch at once:
#: a Dask worker with several threads, or a user's own thread pool, would be killed.  With
#: any layer, two launches at once would only share the same cores.
_NUMBA_LAUNCH = threading.Lock()


def _grid_tables(ti: np.ndarray, shifts: np.ndarray, fpar: np.ndarray, ipar: np.ndarray, compiled: bool):
    """Start-grid basis tables (n_shift, n_grid, n_obs), built on the host (they are tiny)."""
    from ..kernels.lm import I_N_GRID
    from ..kernels.lm_cpu import get_grid_tables

    shape = (shifts.shape[0], int(ipar[I_N_GRID]), ti.shape[0])
    gu = np.empty(shape, dtype=fpar.dtype)
    gw = np.empty(shape, dtype=fpar.dtype)
    with np.errstate(all="ignore"):
        get_grid_tables(fpar.dtype.name, compiled)(ti, shifts, fpar, ipar, gu, gw)
    return gu, gw


def run_fit(
    backend: str, y, design: FitDesign, sidx, shifts: np.ndarray, fpar: np.ndarray, ipar: np.ndarray,
    outs: tuple, timings: dict[str, float],
) -> None:
    """Fit every column of ``y`` in place into ``outs`` (params, se, rss, n_iter, status).

    ``sidx`` (n_vox,) indexes the voxel's slice-timing shift in ``shifts`` (host array).
    """
    ti = design.ti.astype(fpar.dtype)
    t0 = time.perf_counter()
    gu, gw = _grid_tables(ti, shifts, fpar, ipar, compiled=backend != "numpy")
    timings["grid_tables"] = time.perf_counter() - t0
    if backend == "numba":
        import numba

        from ..kernels.lm_cpu import get_numba_fitter

        kernel = get_numba_fitter(y.dtype.name)
        n_chunks = max(1, min(y.shape[1], 8 * numba.get_num_threads()))
        args = (y, ti, sidx, shifts, gu, gw, fpar, ipar, *outs, n_chunks)
        t0 = time.perf_counter()
        kernel.compile(tuple(numba.typeof(a) for a in args))  # no-op when already compiled
        timings["compile"] = time.perf_counter() - t0
        with _NUMBA_LAUNCH:
            t0 = time.perf_counter()
            kernel(*args)
            timings["fit"] = time.perf_counter() - t0
    elif backend == "numpy":
        from ..kernels.lm_cpu import fit_python

        t0 = time.perf_counter()
        fit_python(y, ti, sidx, shifts, gu, gw, fpar, ipar, *outs)
        timings["fit"] = time.perf_counter() - t0
    elif backend == "cuda":
        _run_cuda(y, (ti, sidx, shifts, gu, gw, fpar, ipar), outs, timings)
    else:  # pragma: no cover - resolve_backend guarantees a known name
        raise AssertionError(backend)


@contextlib.contextmanager
def _small_grids_allowed():
    """numba-cuda warns (NumbaPerformanceWarning) when a grid has fewer blocks than the
    GPU has multiprocessors x 2: a small fit is not an error, and under warnings-as-errors
    (the test suite) the warning would be one.  Matched by its text: its class moved
    between numba and numba-cuda versions."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU under-utilization")
        yield


def _compile_first(kernel, launch_one, synchronize, timings: dict[str, float]) -> None:
    """Before the first launch for these argument types (numba-cuda compiles then): a
    launch of one thread (voxel 0, redone by the real launch), timed as ``compile``, so
    that compiling is not timed as fitting."""
    if not getattr(kernel, "overloads", True):  # numba-cuda: its compiled specialisations
        t0 = time.perf_counter()
        launch_one()
        synchronize()
        timings["compile"] = time.perf_counter() - t0


def _run_cuda(y, small: tuple, outs: tuple, timings: dict[str, float]) -> None:
    from numba import cuda

    from ..backend import is_cupy_array
    from ..kernels.lm_cuda import THREADS_PER_BLOCK, get_cuda_fitter

    kernel = get_cuda_fitter(y.dtype.name)
    n_vox = y.shape[1]
    blocks = (n_vox + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    if is_cupy_array(y):
        import cupy

        ti, sidx, shifts, gu, gw, fpar, ipar = (cupy.asarray(a) for a in small)
        args = (y, ti, sidx, shifts, gu, gw, fpar, ipar, *outs)
        # the kernel on CuPy's current stream, so that CuPy's later work sees its results
        current = cupy.cuda.get_current_stream()
        stream = (cuda.external_stream(current.ptr),) if current.ptr else ()
        with _small_grids_allowed():
            _compile_first(kernel, lambda: kernel[(1, 1, *stream)](*args), current.synchronize, timings)
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            kernel[(blocks, THREADS_PER_BLOCK, *stream)](*args)
            stop.record()
        stop.synchronize()
        timings["fit"] = cupy.cuda.get_elapsed_time(start, stop) / 1e3
        return
    # host arrays: explicit transfers (timed separately), results copied back in place
    t0 = time.perf_counter()
    d_in = [cuda.to_device(np.ascontiguousarray(a)) for a in (y, *small)]
    # every output of every voxel is written by the kernel: no need to copy the zeros over
    d_out = [cuda.device_array(o.shape, dtype=o.dtype) for o in outs]
    cuda.synchronize()
    timings["h2d"] = time.perf_counter() - t0
    with _small_grids_allowed():
        _compile_first(kernel, lambda: kernel[1, 1](*d_in, *d_out), cuda.synchronize, timings)
        t0 = time.perf_counter()
        kernel[blocks, THREADS_PER_BLOCK](*d_in, *d_out)
        cuda.synchronize()
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for host, dev in zip(outs, d_out):
        dev.copy_to_host(host)
    timings["d2h"] = time.perf_counter() - t0
