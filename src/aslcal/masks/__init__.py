"""Masks in calibration space: segmentation, ventricle isolation, resampling of
structural-space maps, the reference mask, and a brain mask from the calibration image.

Runs on NumPy or CuPy, on the device of the input map.

Public API
----------
resample_to_grid
    Average a source-space map over each voxel of a reference grid (supersampling).
resample_with_flirt
    The same, with the transform given as asl_calib's ``-t`` FLIRT matrix (ASL -> structural).
default_supersample
    The default number of sub-samples per reference voxel along each axis.
segment_tissues, check_brain_extracted
    CSF/GM/WM partial volumes of a brain-extracted T1w image (EM + MRF, bias tolerant).
lateral_ventricles, ventricles_from_atlas
    The lateral-ventricle CSF without an atlas (depth, components), or from a user atlas.
reference_mask_from_structural
    The automatic reference mask: segment a brain-extracted T1w, keep the ventricles, resample.
reference_mask_from_pv
    Resample a structural-space reference PV map into calibration space and threshold it.
brain_mask_from_calib
    A brain mask from the calibration image (replaces BET).
mask_from_image
    A user's mask image as a boolean mask (every finite voxel > 0), with a warning when it
    is not a 0/1 mask.
"""

from __future__ import annotations

from .brainmask import BrainMask, brain_mask_from_calib
from .refmask import (
    DEFAULT_PVE_THRESHOLD, ReferenceMask, mask_from_image, reference_mask_from_pv, reference_mask_from_structural,
)
from .resample import default_supersample, resample_to_grid, resample_with_flirt
from .segment import Segmentation, check_brain_extracted, segment_tissues
from .ventricles import VentricleMask, lateral_ventricles, ventricles_from_atlas

__all__ = [
    "DEFAULT_PVE_THRESHOLD",
    "BrainMask",
    "ReferenceMask",
    "Segmentation",
    "VentricleMask",
    "brain_mask_from_calib",
    "mask_from_image",
    "check_brain_extracted",
    "lateral_ventricles",
    "reference_mask_from_pv",
    "reference_mask_from_structural",
    "segment_tissues",
    "ventricles_from_atlas",
    "default_supersample",
    "resample_to_grid",
    "resample_with_flirt",
]
