"""The CUDA fit kernel compiles to PTX without a GPU, and float32 stays float32.

A bare ``1.0`` literal in the physics would promote float32 arithmetic to float64,
which is ~64x slower on consumer GPUs and 2x on an H100; PTX shows it as ``.f64``
instructions.  Compiling to PTX needs NVVM (from the test extra's CUDA wheels) but no
driver.  numba-cuda asks the current device for its compute capability when it compiles
a *nested* device function; with no GPU we answer that question with the target's.
"""

from __future__ import annotations

import re
import types

import pytest

CC = (9, 0)  # H100/H200


@pytest.fixture
def no_gpu_device(monkeypatch):
    import numba.cuda.dispatcher as dispatcher

    monkeypatch.setattr(
        dispatcher, "get_current_device", lambda: types.SimpleNamespace(compute_capability=CC)
    )


def _ptx(dtype_name: str) -> str:
    from numba import cuda

    from aslcal.kernels.lm_cuda import kernel_pyfunc, kernel_signature

    ptx, _ = cuda.compile_ptx(kernel_pyfunc(dtype_name), kernel_signature(dtype_name), cc=CC)
    return ptx


def test_float32_kernel_has_no_float64_instructions(no_gpu_device):
    ptx = _ptx("float32")
    assert ".entry" in ptx
    # float32 arithmetic is present (the kernel really was compiled) ...
    assert re.search(r"\b(fma|mul|add|div)\.[a-z.]*f32\b", ptx)
    # ... and no instruction of ours operates on or converts to/from double precision.
    # The one allowed idiom is libdevice's own sinf/cosf Payne-Hanek range reduction
    # (int64 -> f64, times pi*2^-64 = 0d3BF921FB54442D19, -> f32), which runs only for
    # |angle| > ~1e5 rad: remove exactly those triplets, then nothing .f64 may remain.
    reduction = re.compile(
        r"cvt\.rn\.f64\.s64\s+(%fd\d+), %rd\d+;\s*"
        r"mul\.f64\s+(%fd\d+), \1, 0d3BF921FB54442D19;\s*"
        r"cvt\.rn\.f32\.f64\s+%f\d+, \2;"
    )
    body, n_reductions = reduction.subn("", ptx)
    body = re.sub(r"\.reg \.f64\s+%fd<\d+>;", "", body)
    f64 = sorted({m.group(0) for m in re.finditer(r"[a-z][a-z0-9.]*\.f64\b", body)})
    assert not f64, f"float64 instructions in the float32 kernel: {f64[:10]}"
    assert n_reductions > 0  # the trig calls really went through float32 libdevice


def test_float64_kernel_compiles(no_gpu_device):
    ptx = _ptx("float64")
    assert ".f64" in ptx  # the float64 build really computes in double precision
