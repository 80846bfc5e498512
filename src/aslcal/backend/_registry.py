"""Registry of kernel backends and the ``auto`` resolution rule."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from ..config import get_config
from ..errors import BackendUnavailableError, InputError
from ._arrays import is_cupy_array

__all__ = [
    "AUTO_CUDA_MIN_VOXELS",
    "BACKEND_NAMES",
    "Backend",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "resolve_dtype",
]

log = logging.getLogger("aslcal")

BACKEND_NAMES = ("numpy", "numba", "cuda")
#: ``auto`` sends host data to the GPU only from this many voxels on: below it a GPU is
#: underfilled and the host<->device copies cost more than the CPU fit.
AUTO_CUDA_MIN_VOXELS = 100_000


def cudasim_enabled() -> bool:
    """True when the numba CUDA simulator is switched on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _check_numpy() -> tuple[bool, str]:
    return True, "NumPy is always available (scalar kernels run as plain Python: slow, for reference)"


def _check_numba() -> tuple[bool, str]:
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed: pip install numba"
    return True, "numba CPU kernels (parallel over voxels)"


@lru_cache(maxsize=1)
def _check_cuda() -> tuple[bool, str]:
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed: pip install 'aslcal[cuda]'"
    try:
        cuda_spec = importlib.util.find_spec("numba.cuda")
    except (ImportError, ValueError):
        cuda_spec = None
    if cuda_spec is None:
        return False, "numba-cuda is not installed: pip install 'aslcal[cuda]'"
    if cudasim_enabled():
        return True, "numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): CUDA kernels run on the CPU, slowly"
    try:
        from numba import cuda

        ok = bool(cuda.is_available())
    except Exception as exc:  # driver probing may raise anything; we report it
        return False, f"CUDA driver could not be probed: {exc}"
    if not ok:
        return False, "no CUDA GPU or driver found (numba.cuda.is_available() is False)"
    try:
        name = cuda.get_current_device().name
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # pragma: no cover - only on a GPU
        name = "CUDA GPU"
    return True, f"numba CUDA kernels on {name}"


@dataclass(frozen=True)
class Backend:
    """A kernel backend: its name, and how to tell whether it can run here."""

    name: str
    description: str
    _check: Callable[[], tuple[bool, str]]

    def is_available(self) -> bool:
        """Whether this backend can run on this machine."""
        return self._check()[0]

    @property
    def reason(self) -> str:
        """Why the backend is (un)available, in words."""
        return self._check()[1]

    @property
    def device(self) -> str:
        """``"gpu"`` for CUDA, else ``"cpu"``."""
        return "gpu" if self.name == "cuda" else "cpu"


_REGISTRY = {
    "numpy": Backend("numpy", "NumPy arrays; kernels run as plain Python", _check_numpy),
    "numba": Backend("numba", "numba-compiled CPU kernels", _check_numba),
    "cuda": Backend("cuda", "numba.cuda kernels on GPU (CuPy) arrays", _check_cuda),
}


def get_backend(name: str) -> Backend:
    """Return the registered :class:`Backend` called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"backend={name!r}: expected one of auto, {', '.join(BACKEND_NAMES)}") from None


def available_backends() -> dict[str, tuple[bool, str]]:
    """Map every backend name to ``(available, reason)``."""
    return {name: b._check() for name, b in _REGISTRY.items()}


def resolve_backend(backend: str | None = None, data: Any = None, *, n_items: int | None = None) -> Backend:
    """Turn ``"auto"`` or an explicit backend name into a usable :class:`Backend`.

    Parameters
    ----------
    backend : {"auto", "numpy", "numba", "cuda"} or None
        None means the current configuration (:func:`aslcal.get_config`).
    data : array, optional
        The input array; a CuPy array forces the CUDA backend (data stay on the GPU).
    n_items : int, optional
        Problem size (e.g. voxels to fit); ``auto`` moves host data to a real GPU only
        from :data:`AUTO_CUDA_MIN_VOXELS` on.

    Raises
    ------
    BackendUnavailableError
        An explicit backend that cannot run here, with the reason.
    InputError
        An unknown name, or a CPU backend asked to work on GPU data.
    """
    name = backend if backend is not None else get_config()["backend"]
    on_gpu = is_cupy_array(data)
    if name == "auto":
        if on_gpu:
            chosen = "cuda"
        elif (
            _check_cuda()[0]
            and not cudasim_enabled()
            and n_items is not None
            and n_items >= AUTO_CUDA_MIN_VOXELS
        ):
            chosen = "cuda"
        elif _check_numba()[0]:
            chosen = "numba"
        else:
            chosen = "numpy"
        b = _REGISTRY[chosen]
        ok, reason = b._check()
        if not ok:
            raise BackendUnavailableError(f"data are on the GPU but backend 'cuda' is unavailable: {reason}")
        log.info("backend auto -> %s (%s)", chosen, reason)
        return b
    b = get_backend(name)
    ok, reason = b._check()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    if on_gpu and b.device == "cpu":
        raise InputError(
            f"backend={name!r} runs on the CPU but the data are a CuPy (GPU) array; use "
            "backend='cuda' or move the data with aslcal.backend.to_host first"
        )
    return b


def resolve_dtype(dtype: Any, backend: Backend) -> np.dtype:
    """Resolve ``dtype`` (``"auto"``, None = configuration, or a float dtype) for ``backend``.

    ``auto`` is float32 on the CUDA backend and float64 on the CPU backends.
    """
    if dtype is None:
        dtype = get_config()["dtype"]
    if isinstance(dtype, str) and dtype == "auto":
        return np.dtype(np.float32 if backend.name == "cuda" else np.float64)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype={dtype!r}: expected 'auto', 'float32' or 'float64'") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"dtype={dtype!r}: expected 'auto', 'float32' or 'float64'")
    return dt
