"""aslcal.testing: deterministic brain phantoms and simulated ASL calibration data.

Used by the test suite, the notebooks, the CLI demo and the benchmarks.  See
:mod:`aslcal.testing.phantoms`.
"""

from __future__ import annotations

from .phantoms import (
    DEFAULT_LOOK_LOCKER,
    DEFAULT_SATRECOV_TIS,
    LABELS,
    TISSUES,
    Phantom,
    StructuralPhantom,
    body_coil_reference,
    flirt_matrix,
    flirt_scaling,
    longtr_calibration,
    look_locker_series,
    make_phantom,
    perfusion_image,
    satrecov_series,
    write_dataset,
)

__all__ = [
    "DEFAULT_LOOK_LOCKER",
    "DEFAULT_SATRECOV_TIS",
    "LABELS",
    "TISSUES",
    "Phantom",
    "StructuralPhantom",
    "body_coil_reference",
    "flirt_matrix",
    "flirt_scaling",
    "longtr_calibration",
    "look_locker_series",
    "make_phantom",
    "perfusion_image",
    "satrecov_series",
    "write_dataset",
]
