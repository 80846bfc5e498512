"""aslcal.testing: deterministic brain phantoms and simulated ASL calibration data.

Used by the test suite, the notebooks, the CLI demo and the benchmarks.  See
:mod:`aslcal.testing.phantoms` and, for a phantom BIDS ASL cohort,
:mod:`aslcal.testing.bids`.
"""

from __future__ import annotations

from .bids import CohortTruth, RunTruth, make_bids_cohort
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
    "CohortTruth",
    "RunTruth",
    "make_bids_cohort",
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
