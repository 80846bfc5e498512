"""Masks in calibration space: resampling of structural-space maps (and, to come,
segmentation, ventricle isolation, brain masks).

Runs on NumPy or CuPy, on the device of the input map.

Public API
----------
resample_to_grid
    Average a source-space map over each voxel of a reference grid (supersampling).
resample_with_flirt
    The same, with the transform given as asl_calib's ``-t`` FLIRT matrix (ASL -> structural).
default_supersample
    The default number of sub-samples per reference voxel along each axis.
"""

from __future__ import annotations

from .resample import default_supersample, resample_to_grid, resample_with_flirt

__all__ = [
    "default_supersample",
    "resample_to_grid",
    "resample_with_flirt",
]
