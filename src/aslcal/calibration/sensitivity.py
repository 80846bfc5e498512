"""Coil-sensitivity map from a flat-coil reference image (calibration.md §6).

    s = mean_t(cact or calib) / mean_t(cref)    inside the brain mask, 1 outside

Voxels where the ratio is not finite or <= 0 are set to 1 and counted.  FSL ignores
``--cact`` (a bug) and refuses ``--cref`` in satrecov mode; here both work: the map is
used by :func:`~aslcal.calibration.m0_refregion`, :func:`~aslcal.calibration.m0_refregion_satrecov`
and :func:`~aslcal.calibration.apply_calibration` through their ``sensitivity`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..backend import array_namespace
from ..errors import InputError
from ._common import as_array, as_mask, count, safe_divide, spatial_image

__all__ = ["Sensitivity", "coil_sensitivity"]


@dataclass
class Sensitivity:
    """Result of :func:`coil_sensitivity`.

    Attributes
    ----------
    map : array of shape ``spatial``
        Relative receive sensitivity s (dimensionless) on the input's device; 1 outside
        the brain mask and where the ratio was unusable.
    n_invalid : int
        Brain voxels set to 1 because the ratio was not finite or <= 0.
    n_brain : int
        Voxels in the brain mask.
    source : str
        ``calib`` or ``cact``: the image of the actual coil.
    """

    map: Any
    n_invalid: int
    n_brain: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (everything but the map)."""
        return {
            "n_invalid": self.n_invalid,
            "n_brain": self.n_brain,
            "source": self.source,
            "formula": f"s = mean_t({self.source}) / mean_t(cref) inside the brain mask, 1 outside",
        }


def coil_sensitivity(calib: Any, cref: Any, brain_mask: Any, *, cact: Any = None) -> Sensitivity:
    """Relative coil sensitivity from an image of a flat-sensitivity (body) coil.

    Parameters
    ----------
    calib : array of shape ``spatial`` or ``spatial + (n,)``, signal units, or None
        The calibration image, acquired with the actual (receive-array) coil; a series is
        averaged over its last axis.  May be None when ``cact`` is given.
    cref : array of shape ``spatial`` or ``spatial + (n,)``, signal units
        The same acquisition with a coil of flat sensitivity (e.g. the body coil).
    brain_mask : array of shape ``spatial``
        Non-zero = brain; s is computed there and is 1 elsewhere.
    cact : array of shape ``spatial`` or ``spatial + (n,)``, signal units, optional
        The image of the actual coil if it is not the calibration image; then it is used
        instead of ``calib``.

    Returns
    -------
    Sensitivity
        The map (input's device; float dtype of the inputs) and the count of voxels set
        to 1.

    Raises
    ------
    InputError
        Missing images, shapes that do not match the brain mask, or an empty brain mask.
    """
    if calib is None and cact is None:
        raise InputError("calib: required (the image of the actual coil), or give cact")
    act_name = "cact" if cact is not None else "calib"
    act_a = as_array(act_name, cact if cact is not None else calib)
    cref_a = as_array("cref", cref)
    mask_a = as_array("brain_mask", brain_mask)
    others = [as_array("calib", calib)] if (cact is not None and calib is not None) else []
    xp = array_namespace(act_a, cref_a, mask_a, *others)
    mask = as_mask("brain_mask", mask_a, xp)
    spatial = tuple(int(s) for s in mask.shape)
    for other in others:  # calib is not used with cact, but must still fit the grid
        spatial_image("calib", other, spatial, "brain_mask", xp)
    act = spatial_image(act_name, act_a, spatial, "brain_mask", xp)
    ref = spatial_image("cref", cref_a, spatial, "brain_mask", xp)
    n_brain = count(xp, mask)
    if n_brain == 0:
        raise InputError("brain_mask: the mask is empty (no non-zero voxel): check the brain extraction or supply a mask")
    ratio = safe_divide(xp, act, ref)  # NaN where cref is not finite and > 0
    good = mask & xp.isfinite(ratio) & (ratio > 0)
    n_invalid = n_brain - count(xp, good)
    s = xp.where(good, ratio, xp.ones_like(ratio))
    return Sensitivity(map=s, n_invalid=n_invalid, n_brain=n_brain, source=act_name)
