"""Voxelwise M0 map with the short-TR correction and edge correction (calibration.md §5).

    M0(x) = C(x) · cgain · [1/(1 − exp(−TR/T1t)) if TR < 5 s] / pc

Edge correction (default on): voxels at the brain edge are partial-volumed with
non-brain and give too low an M0.  Exactly as §5:

1. 3×3×3 median filter of the M0 map (the whole image: it is masked only afterwards);
2. mask with the brain mask;
3. erode by one voxel (3×3×3): a voxel keeps its value only if all 26 neighbours are
   non-zero (FSL ``fslmaths -ero``; outside the array counts as zero); an image of one
   or two slices is eroded in-plane (3×3×1), since no voxel of it has 26 neighbours;
4. fill every brain voxel that is now zero with the mean of the non-zero values in its
   5×5 in-plane neighbourhood, all such voxels at once per pass, repeating while passes
   fill something; where in-plane passes cannot progress (a slice left empty), a 3-D
   5×5×5 pass, then in-plane again; until the brain mask is filled.

The filters run on the device of the data: ``scipy.ndimage`` for NumPy,
``cupyx.scipy.ndimage`` for CuPy.  A fill pass is two box filters (the sum of the
non-zero values and their count, as means over the window) and a division — no loop
over voxels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from ..backend import array_namespace, ndimage_for
from ..errors import InputError
from ._common import CalibrationWarning, as_array, as_float, as_mask, count, is_array, number, safe_divide, spatial_image

__all__ = ["SHORT_TR_LIMIT", "VoxelwiseM0", "edge_correct", "m0_voxelwise"]

#: The short-TR factor is applied only when TR is below this (seconds; white-paper practice).
SHORT_TR_LIMIT = 5.0

#: A box-filter mean of the 0/1 indicator is k/size for k non-zero neighbours (k >= 1);
#: anything below half of 1/size is rounding noise of the running sums, i.e. k = 0.
_HALF = 0.5


@dataclass
class VoxelwiseM0:
    """Result of :func:`m0_voxelwise`.

    Attributes
    ----------
    m0 : array of shape ``spatial``, signal units
        M0 map on the input's device (float dtype of the input); 0 outside the brain mask.
    tr : float or None, seconds
    t1t : float, seconds
    pc : float, ml/g
    cgain : float
    tr_factor : float
        1 − exp(−TR/T1t) when the short-TR correction was applied (TR < 5 s), else 1;
        the map was divided by it.
    short_tr : bool
        Whether the short-TR correction was applied.
    edge_correction : bool
    sensitivity : bool
        Whether C was divided by a coil-sensitivity map.
    n_brain : int
        Voxels in the brain mask.
    n_nonfinite : int
        Brain voxels whose calibration value (or sensitivity) was not finite (or s <= 0):
        set to 0 before the edge correction (and filled by it when it is on).
    n_filled : int
        Brain voxels set by the fill step of the edge correction.
    fill_passes : dict of str to int
        Fill passes run: ``inplane`` (5×5×1) and ``3d`` (5×5×5).
    """

    m0: Any
    tr: float | None
    t1t: float
    pc: float
    cgain: float
    tr_factor: float
    short_tr: bool
    edge_correction: bool
    sensitivity: bool
    n_brain: int
    n_nonfinite: int
    n_filled: int
    fill_passes: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (everything but the map)."""
        out = {k: v for k, v in asdict(self).items() if k != "m0"}
        out["units"] = {"tr": "s", "t1t": "s", "m0": "signal units"}
        out["formula"] = "M0 = C * cgain / (pc * tr_factor), tr_factor = 1 - exp(-TR/T1t) if TR < 5 s else 1"
        return out




def edge_correct(m0: Any, brain_mask: Any) -> tuple[Any, int, dict[str, int]]:
    """Edge correction of an M0 map (calibration.md §5; module docstring).

    Parameters
    ----------
    m0 : float array of shape (x, y, z), signal units
        NumPy or CuPy; finite values (zero = missing).
    brain_mask : bool array of shape (x, y, z)
        On the same device as ``m0``.

    Returns
    -------
    corrected : array of shape (x, y, z)
        Defined inside the brain mask, 0 outside.
    n_filled : int
        Brain voxels set by the fill.
    passes : dict
        ``{"inplane": n, "3d": n}`` fill passes run.

    Raises
    ------
    InputError
        The map is not 3-D, or the fill cannot reach some brain voxels (no non-zero value
        within reach: e.g. an all-zero calibration image or a brain-mask island far from
        the rest).
    """
    m0 = as_float(as_array("m0", m0))
    xp = array_namespace(m0, as_array("brain_mask", brain_mask))
    if m0.ndim != 3:
        raise InputError(f"edge correction needs a 3-D map (x, y, z); got shape {tuple(m0.shape)}")
    brain_mask = as_mask("brain_mask", brain_mask, xp, tuple(int(s) for s in m0.shape), "m0")
    if not bool(xp.all(xp.isfinite(m0))):
        raise InputError("m0: the map contains NaN or Inf; set them to 0 (missing) before the edge correction")
    ndi = ndimage_for(m0)
    zero = xp.zeros_like(m0)
    out = ndi.median_filter(m0, size=3)
    out = xp.where(brain_mask, out, zero)
    support = out != 0
    # a slab of one or two slices has no voxel with all 26 neighbours inside the image:
    # there the erosion is in-plane (8 neighbours), else nothing would be kept
    box = (3, 3, 3) if int(m0.shape[2]) >= 3 else (3, 3, 1)
    kept = ndi.binary_erosion(support, structure=xp.ones(box, dtype=bool), border_value=0)
    out = xp.where(kept, out, zero)

    todo = brain_mask & (out == 0)
    n_todo = count(xp, todo)
    n_filled = 0
    passes = {"inplane": 0, "3d": 0}
    windows = {"inplane": (5, 5, 1), "3d": (5, 5, 5)}
    while n_todo:  # every pass fills at least one voxel, or raises: the loop ends
        progressed = False
        for kind in ("inplane", "3d"):
            size = windows[kind]
            nonzero = out != 0
            ind = xp.astype(nonzero, m0.dtype)
            cnt = ndi.uniform_filter(ind, size=size, mode="constant", cval=0.0)
            tot = ndi.uniform_filter(out, size=size, mode="constant", cval=0.0)
            fill = todo & (cnt > _HALF / math.prod(size))
            passes[kind] += 1
            n_new = count(xp, fill)
            if n_new:
                out = xp.where(fill, tot / xp.where(fill, cnt, xp.ones_like(cnt)), out)
                todo = todo & ~fill
                n_todo -= n_new
                n_filled += n_new
                progressed = True
                break  # back to in-plane passes after any progress
        if not progressed:
            raise InputError(
                f"edge correction cannot fill {n_todo} brain-mask voxels: no non-zero M0 value "
                "within reach of them (an all-zero calibration image inside the brain, or "
                "brain-mask islands far from the rest); check the brain mask or turn the edge "
                "correction off"
            )
    return out, n_filled, passes


def m0_voxelwise(
    calib: Any,
    brain_mask: Any,
    *,
    tr: float | None = None,
    t1t: float = 1.3,
    pc: float = 0.9,
    cgain: float = 1.0,
    edge_correction: bool = True,
    sensitivity: Any = None,
) -> VoxelwiseM0:
    """Voxelwise M0 map from a calibration image (calibration.md §5).

    ``M0(x) = C(x) · cgain · [1/(1 − exp(−TR/T1t)) if TR < 5 s] / pc`` inside the brain
    mask (0 outside), then the edge correction (module docstring).

    Parameters
    ----------
    calib : array of shape ``spatial`` or ``spatial + (n,)``, signal units
        The calibration image C (NumPy or CuPy); a series is averaged over its last axis.
    brain_mask : array of shape ``spatial``
        Non-zero = brain.
    tr : float, seconds, optional
        Repetition time of the calibration image.  None or >= 5 s: no short-TR factor.
    t1t : float, seconds
        Generic tissue T1 of the short-TR factor.  Default 1.3.
    pc : float, ml/g
        Generic partition coefficient.  Default 0.9.
    cgain : float
        Gain of the ASL data relative to the calibration image.
    edge_correction : bool
        Median filter, erosion and fill (3-D images only).  Default True.
    sensitivity : array of shape ``spatial``, optional
        Coil-sensitivity map: C is divided by it.  (With a voxelwise M0 the sensitivity
        cancels in perfusion / M0: give it here *and* to :func:`apply_calibration`, or
        to neither.)

    Returns
    -------
    VoxelwiseM0
        The map (input's device and float dtype) and every factor and count.

    Raises
    ------
    InputError
        Shapes that do not match, values that are not positive finite numbers, an
        edge correction on a non-3-D image or one that cannot fill the brain mask.
    """
    calib_a = as_array("calib", calib)
    mask_a = as_array("brain_mask", brain_mask)
    xp = array_namespace(*([calib_a, mask_a] + ([sensitivity] if is_array(sensitivity) else [])))
    if tr is not None:
        tr = number("tr", tr, "s")
        if tr > 100.0:
            warnings.warn(f"tr={tr:g} s looks like milliseconds (TR is in seconds)", CalibrationWarning, stacklevel=2)
    t1t = number("t1t", t1t, "s")
    if t1t > 30.0:
        warnings.warn(f"t1t={t1t:g} s looks like milliseconds (T1 is in seconds)", CalibrationWarning, stacklevel=2)
    pc = number("pc", pc, "ml/g")
    cgain = number("cgain", cgain, "ratio")
    if not isinstance(edge_correction, bool):
        raise InputError(f"edge_correction={edge_correction!r}: expected True or False")
    mask = as_mask("brain_mask", mask_a, xp)
    spatial = tuple(int(s) for s in mask.shape)
    c = spatial_image("calib", calib_a, spatial, "brain_mask", xp)
    if sensitivity is not None:
        s = spatial_image("sensitivity", as_array("sensitivity", sensitivity), spatial, "brain_mask", xp,
                          allow_series=False)
        c = safe_divide(xp, c, s)
    if edge_correction and len(spatial) != 3:
        raise InputError(
            f"edge_correction=True needs 3-D images (x, y, z); brain_mask has shape {spatial} "
            "(pass edge_correction=False)"
        )
    n_brain = count(xp, mask)
    if n_brain == 0:
        raise InputError("brain_mask: the mask is empty (no non-zero voxel): check the brain extraction or supply a mask")

    short = tr is not None and tr < SHORT_TR_LIMIT
    tr_factor = -math.expm1(-tr / t1t) if short else 1.0
    if not tr_factor > 0:
        raise InputError(f"tr/t1t = {tr / t1t:g}: no recovery, the short-TR correction is undefined")
    scale = cgain / (pc * tr_factor)

    finite = xp.isfinite(c)
    n_nonfinite = count(xp, mask & ~finite)
    zero = xp.zeros_like(c)
    n_filled, passes = 0, {"inplane": 0, "3d": 0}
    if edge_correction:
        # The median filter sees the whole M0 image, masked only afterwards (§5; FSL's
        # ``fslmaths M0 -fmedian -mas mask -ero``): zeros outside the brain in its window
        # would pull edge medians to 0 and erode more than one voxel's rim.
        m0, n_filled, passes = edge_correct(xp.where(finite, c * scale, zero), mask)
    else:
        m0 = xp.where(mask & finite, c * scale, zero)
    return VoxelwiseM0(
        m0=m0, tr=tr, t1t=t1t, pc=pc, cgain=cgain, tr_factor=tr_factor, short_tr=short,
        edge_correction=edge_correction, sensitivity=sensitivity is not None, n_brain=n_brain,
        n_nonfinite=n_nonfinite, n_filled=n_filled, fill_passes=passes,
    )
