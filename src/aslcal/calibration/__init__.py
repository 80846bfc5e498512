"""Calibration of ASL data: M0 of arterial blood and absolute perfusion (calibration.md §§4-6, 7.4, 9).

No file input/output happens here: every function takes NumPy or CuPy arrays and
returns results on the same device, with every correction factor, value and source
used (``as_dict()`` for provenance).

* :func:`m0_refregion`: reference-region M0a from a long-TR calibration image (§4).
* :func:`m0_refregion_satrecov`: reference-region M0a from a saturation-recovery /
  Look-Locker series, with the voxelwise fits (§7.4).
* :func:`m0_voxelwise`: voxelwise M0 map, short-TR and edge corrections (§5).
* :func:`coil_sensitivity`: coil-sensitivity map from a body-coil reference (§6).
* :func:`apply_calibration`: perfusion, variance or aCBV in absolute units (§9).
* :func:`quantify_whitepaper`: CBF from a single-PLD ΔM by the white-paper model (§11).

Units: TE, T2, T2* in milliseconds; TR, TAQ, TI, T1 in seconds; flip angles in degrees.
"""

from ._common import CalibrationWarning
from .apply import ALPHA_DEFAULTS, CalibratedImage, apply_calibration
from .refregion import TISSREFS, RefRegionM0, m0_refregion
from .satrecov import M0_SCALES, SatrecovCalibration, m0_refregion_satrecov
from .sensitivity import Sensitivity, coil_sensitivity
from .voxelwise import SHORT_TR_LIMIT, VoxelwiseM0, edge_correct, m0_voxelwise
from .whitepaper import WhitePaperCBF, kinetic_factor, quantify_whitepaper

__all__ = [
    "ALPHA_DEFAULTS",
    "M0_SCALES",
    "SHORT_TR_LIMIT",
    "TISSREFS",
    "CalibratedImage",
    "CalibrationWarning",
    "RefRegionM0",
    "SatrecovCalibration",
    "Sensitivity",
    "VoxelwiseM0",
    "WhitePaperCBF",
    "apply_calibration",
    "coil_sensitivity",
    "edge_correct",
    "kinetic_factor",
    "m0_refregion",
    "m0_refregion_satrecov",
    "m0_voxelwise",
    "quantify_whitepaper",
]
