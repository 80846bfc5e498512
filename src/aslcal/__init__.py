"""aslcal: calibration of arterial spin labelling (ASL) MRI.

Importing aslcal is cheap: numba, numba-cuda and CuPy are imported only when a kernel
is first needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import config_context, get_config, set_config
from .errors import AslcalError, BackendUnavailableError, InputError

__version__ = "0.1.0"

# Public names resolved lazily (PEP 562) so that `import aslcal` stays light.
_LAZY = {
    "fit_satrecov": "aslcal.fitting",
    "SatrecovFit": "aslcal.fitting",
    "m0_refregion": "aslcal.calibration",
    "m0_refregion_satrecov": "aslcal.calibration",
    "m0_voxelwise": "aslcal.calibration",
    "coil_sensitivity": "aslcal.calibration",
    "apply_calibration": "aslcal.calibration",
    "quantify_whitepaper": "aslcal.calibration",
    "load_image": "aslcal.io",
    "save_image": "aslcal.io",
    "resolve_backend": "aslcal.backend",
}

__all__ = [
    "__version__",
    "AslcalError",
    "BackendUnavailableError",
    "InputError",
    "config_context",
    "get_config",
    "set_config",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aslcal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
