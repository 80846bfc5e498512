"""The reference-region mask in calibration space (calibration.md §8), without FSL.

Chains the pieces: a tissue partial-volume map in structural space (given, read from a
segmentation, or segmented here) → for CSF, the lateral ventricles only (or a user atlas,
or all CSF) → averaged over each calibration voxel through the ASL→structural transform →
thresholded (≥ 0.9 by default).  No file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


import numpy as np

from ..backend import array_namespace
from ..errors import InputError
from .resample import resample_to_grid
from .ventricles import check_fractions

__all__ = ["ReferenceMask", "DEFAULT_PVE_THRESHOLD", "reference_mask_from_pv", "mask_from_image"]

#: FSL's threshold on the reference tissue's partial volume in calibration space.
DEFAULT_PVE_THRESHOLD = 0.9


@dataclass
class ReferenceMask:
    """A reference-region mask in calibration space and how it was made."""

    mask: Any  #: bool array, calibration grid
    pv: Any  #: the reference tissue's partial volume averaged over each calibration voxel
    threshold: float
    n_voxels: int
    steps: list[str] = field(default_factory=list)  #: how the structural-space map was obtained
    details: dict[str, Any] = field(default_factory=dict)
    #: CSF/GM/WM partial volumes averaged over each calibration voxel (when asked for)
    tissue_pv: dict[str, Any] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "n_voxels": self.n_voxels, "steps": list(self.steps), **self.details}


def mask_from_image(data: Any, name: str) -> tuple[Any, str | None]:
    """A mask image given by the user as a boolean mask: every finite voxel > 0 (FSL's
    ``-bin``), and a warning when the image holds more than one non-zero value (an
    intensity or partial-volume image given as a mask), else None.

    ``aslcal calib -m``/``--bmask`` and the cohort's reference masks read masks alike, so
    that one mask gives one M0a whichever tool reads it.
    """
    xp = array_namespace(data)
    with np.errstate(invalid="ignore"):
        mask = xp.isfinite(data) & (data > 0)
    values = xp.unique(data[mask])
    if int(values.size) > 1:
        return mask, (f"{name} holds {int(values.size)} different values, not a 0/1 mask (an intensity or "
                      "partial-volume image?): every voxel > 0 is used")
    return mask, None


def reference_mask_from_pv(
    ref_pv: Any,
    struct_affine: Any,
    calib_shape: tuple[int, ...],
    calib_affine: Any,
    world_calib_to_struct: Any,
    *,
    threshold: float = DEFAULT_PVE_THRESHOLD,
    steps: list[str] | None = None,
    details: dict[str, Any] | None = None,
) -> ReferenceMask:
    """Resample a structural-space partial-volume map into calibration space and threshold it.

    Parameters
    ----------
    ref_pv : array of shape (X, Y, Z)
        The reference tissue's partial volume in structural space (NumPy or CuPy).
    struct_affine, calib_affine : (4, 4) arrays
        Voxel-to-world matrices (mm) of the structural and calibration grids.
    calib_shape : tuple of int
        Spatial shape of the calibration image.
    world_calib_to_struct : (4, 4) array
        Calibration-session world (mm) → structural-session world (mm), e.g. from
        :func:`aslcal.io.flirt_to_world` of asl_calib's ``-t`` matrix.
    threshold : float
        Keep calibration voxels whose averaged partial volume is at least this.

    Raises
    ------
    InputError
        An empty result (the message of calibration.md §8), or a threshold outside (0, 1].
    """
    if not (0.0 < float(threshold) <= 1.0):
        raise InputError(f"pve threshold={threshold!r}: expected a value in (0, 1]")
    xp = array_namespace(ref_pv)
    check_fractions("ref_pv", ref_pv if hasattr(ref_pv, "shape") else np.asarray(ref_pv), xp)
    pv = resample_to_grid(ref_pv, struct_affine, tuple(int(s) for s in calib_shape[:3]), calib_affine,
                          world_calib_to_struct)
    mask = pv >= threshold
    n = int(xp.count_nonzero(mask))
    if n == 0:
        best = float(xp.max(pv)) if pv.size else 0.0
        raise InputError(
            f"the reference mask is empty: no calibration voxel has a reference-tissue partial volume "
            f">= {threshold:g} (largest {best:.2f}); check the brain extraction and the transform, "
            "or supply a reference mask (-m in aslcal calib, --ref-masks in aslcal cohort)"
        )
    return ReferenceMask(mask=mask, pv=pv, threshold=float(threshold), n_voxels=n,
                         steps=list(steps or []), details=dict(details or {}))


def reference_mask_from_structural(
    t1w_brain: Any,
    struct_affine: Any,
    calib_shape: tuple[int, ...],
    calib_affine: Any,
    world_calib_to_struct: Any,
    *,
    tissref: str = "csf",
    all_csf: bool = False,
    threshold: float = DEFAULT_PVE_THRESHOLD,
    name: str = "structural image",
    tissue_pv: bool = False,
) -> ReferenceMask:
    """The automatic reference mask from a brain-extracted T1-weighted image (calibration.md §8).

    Segments the image into CSF/GM/WM partial volumes
    (:func:`aslcal.masks.segment_tissues`, after
    :func:`~aslcal.masks.check_brain_extracted`), keeps the lateral ventricles of the CSF
    (:func:`~aslcal.masks.lateral_ventricles`; all CSF with ``all_csf``), averages the map
    over each calibration voxel through ``world_calib_to_struct`` and thresholds it
    (:func:`reference_mask_from_pv`).  This is ``aslcal calib -s STRUC -t TRANS`` without
    a user tissue map or atlas, and what ``aslcal cohort --anat`` runs per subject.

    Parameters
    ----------
    t1w_brain : array of shape (X, Y, Z)
        Brain-extracted T1-weighted image (0 outside the brain), NumPy or CuPy.
    struct_affine : (4, 4) array
        Its voxel-to-world matrix (mm); the voxel size is taken from it.
    calib_shape, calib_affine, world_calib_to_struct, threshold
        As :func:`reference_mask_from_pv`.
    tissref : {"csf", "wm", "gm"}
        Reference tissue.
    all_csf : bool
        Keep all CSF instead of the lateral ventricles (asl_calib ``--csfmaskingoff``).
    name : str
        How the image is named in error messages.
    tissue_pv : bool
        Also return the CSF, GM and WM partial volumes of the segmentation in calibration
        space (``ReferenceMask.tissue_pv``), e.g. for tissue means of fitted maps.
    """
    import numpy as np

    from .segment import check_brain_extracted, segment_tissues
    from .ventricles import lateral_ventricles

    if tissref not in ("csf", "wm", "gm"):
        raise InputError(f"tissref={tissref!r}: the automatic mask needs csf, wm or gm")
    aff = np.asarray(struct_affine, dtype=np.float64)
    voxel_size = tuple(float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    check_brain_extracted(t1w_brain, voxel_size=voxel_size, name=name)
    seg = segment_tissues(t1w_brain, voxel_size=voxel_size)
    pv = seg.pv[tissref]
    steps = [f"segmentation of the {name} (CSF/GM/WM partial volumes)"]
    details: dict[str, Any] = {"tissref": tissref, "segmentation": seg.as_dict()}
    if tissref == "csf" and not all_csf:
        vm = lateral_ventricles(pv, t1w_brain > 0, voxel_size=voxel_size, affine=aff)
        pv = vm.pv
        steps.append(f"lateral ventricles kept ({vm.n_components_kept} components, eroded once)")
        details["ventricles"] = vm.as_dict()
    steps.append("averaged over each calibration voxel")
    ref = reference_mask_from_pv(pv, aff, calib_shape, calib_affine, world_calib_to_struct,
                                 threshold=threshold, steps=steps, details=details)
    if tissue_pv:
        grid = tuple(int(s) for s in calib_shape[:3])
        # the reference tissue's map, when used whole (no ventricle selection), is resampled already
        ref.tissue_pv = {t: ref.pv if seg.pv[t] is pv else
                         resample_to_grid(seg.pv[t], aff, grid, calib_affine, world_calib_to_struct)
                         for t in ("csf", "gm", "wm")}
    return ref
