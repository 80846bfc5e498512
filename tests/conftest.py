"""Shared fixtures: the kernel backends available in this run.

* A normal run fits with ``numba`` (and ``numpy``, the plain-Python build of the same
  kernel, on small problems); on a machine with a GPU the ``cuda`` backend is added and
  marked ``gpu``.
* The CUDA-simulator run (``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim``) fits with
  ``cuda`` only: the same test bodies then exercise the CUDA kernel's indexing and bounds
  logic on the CPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _real_gpu() -> bool:
    if CUDASIM:
        return False
    from aslcal.backend import available_backends

    return available_backends()["cuda"][0]


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip, with the reason, where there is no real CUDA GPU (``pytest
    -m gpu`` on a machine without one), instead of failing on a missing CuPy or driver."""
    if _real_gpu():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU with CuPy (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _backend_params(include_python: bool):
    if CUDASIM:
        return [pytest.param("cuda", id="cuda-sim")]
    params = [pytest.param("numba", id="numba")]
    if include_python:
        params.append(pytest.param("numpy", id="python"))
    if _real_gpu():
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.gpu))
    return params


@pytest.fixture(params=_backend_params(include_python=True))
def backend(request) -> str:
    """Every kernel backend of this run (small problems only: includes plain Python)."""
    return request.param


@pytest.fixture(params=_backend_params(include_python=False))
def fast_backend(request) -> str:
    """Compiled kernel backends of this run (numba; cuda on a GPU or under the simulator)."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261121)
