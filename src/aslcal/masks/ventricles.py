"""Lateral-ventricle CSF without an atlas, and the atlas route for FSL parity (calibration.md §8).

asl_calib isolates the lateral ventricles with the Harvard-Oxford atlas registered to
the subject.  :func:`lateral_ventricles` does it from the CSF partial-volume map alone,
in the space of that map (normally the structural image: isolate at high resolution,
then resample the kept CSF map to calibration space):

1. **CSF**: voxels of the brain mask with ``csf_pv >= threshold``.
2. **Depth**: the distance of every brain voxel from the brain surface, in mm
   (Euclidean distance transform of the brain mask with ``sampling = voxel_size``).
   The CSF layer around the brain and the mouths of the sulci are shallow; CSF
   deeper than ``min_depth_mm`` is kept (sulcal CSF is then cut into separate,
   thin pieces).
3. **Opening** of the deep CSF with a ball of radius ``open_mm`` (mm; skipped when the
   ball is a single voxel): removes sheets thinner than about two radii — the deep
   fundi of the sulci, the interhemispheric fissure, thin bridges.
4. **Connected components** of what is left (``connectivity`` 6, 18 or 26).  Each is
   measured in the brain's own frame: the brain's centre of mass and its semi-extent
   along each axis (``sqrt(5 * variance)`` of the brain-mask coordinates, the
   semi-axis of an ellipsoid with that variance).  A component is kept when

   * its volume is at least ``min_volume_ml`` (``"small"`` otherwise);
   * its centroid is not more than ``max_inferior`` (normalised units along the
     superior axis) below the brain centre (``"inferior"`` otherwise: fourth
     ventricle, basal cisterns).  The superior axis comes from ``affine`` when given,
     else the third array axis is taken as inferior -> superior;
   * its centroid lies within ``max_offset`` of the brain centre in normalised
     units, ``sqrt(sum(((c - com) / semi)**2))`` (``"peripheral"`` otherwise);
   * it is thick: the largest ball inside it has a radius of at least
     ``min_radius_mm`` (``"thin"`` otherwise).  The radius is estimated as the largest
     distance (mm) from a voxel of the component to the nearest non-CSF voxel, minus
     half the smallest voxel dimension;

   and then, among the components that pass, the lateral ventricles being the
   largest and thickest deep CSF spaces, one is dropped when its volume is below
   ``min_fraction`` of the largest (``"small"``) or its radius below
   ``min_radius_fraction`` of the thickest (``"thin"``: the third ventricle, a
   cavum septi, the sheet of the interhemispheric fissure on a grid too coarse for
   the opening).

   Both hemispheres are allowed: the two lateral ventricles are two components (or
   one, joined at the midline).
5. The kept components are grown back by one opening step, within the deep CSF
   (recovering the tapered horns the opening shaved off).
6. **Erosion** once with a 3x3x3 box (FSL erodes its ventricle mask: ``fslmaths -ero``),
   unless ``erode=False``.

The result carries ``pv = csf_pv * mask``: the CSF fraction inside the kept ventricles,
ready to be averaged over each calibration voxel and thresholded (≥ 0.9 by default).
``all_csf=True`` is asl_calib's ``--csfmaskingoff``: every CSF voxel, no selection, no
erosion.

:func:`ventricles_from_atlas` is the user-atlas route (``--ventricle-atlas MASK_IN_STD
--str2std MAT``): a binary ventricle mask in standard space is mapped into the
structural grid through a world -> world transform and eroded once, as asl_calib does.

Everything runs on the device of the input: ``scipy.ndimage`` for NumPy,
``cupyx.scipy.ndimage`` for CuPy.  Only scalars and per-component statistics (a few
numbers per component) come back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import array_namespace, as_numeric_array, is_cupy_array, ndimage_for
from ..errors import InputError

__all__ = ["VentricleMask", "lateral_ventricles", "ventricles_from_atlas"]

#: The one-line advice of calibration.md §8 when no reference region is found.
EMPTY_ADVICE = (
    "check the brain extraction and the segmentation of the structural image, "
    "or supply a reference mask (-m/--mask)"
)


@dataclass(eq=False)
class VentricleMask:
    """Result of :func:`lateral_ventricles` / :func:`ventricles_from_atlas`.

    Attributes
    ----------
    mask : bool array of shape (x, y, z)
        The ventricle mask (eroded once unless ``erode=False``), on the input's device.
    pv : float array of shape (x, y, z)
        ``csf_pv * mask``: CSF fraction inside the kept region, 0 elsewhere (the map
        to resample into calibration space).  For :func:`ventricles_from_atlas`
        without ``csf_pv``: the mask as 0/1 floats.
    n_components_kept : int
        Connected components kept (before the erosion).
    rejected : dict of str to int
        Components rejected, by reason: ``small``, ``peripheral``, ``inferior``.
    n_voxels : int
        Voxels in ``mask``.
    volume_ml : float, ml
        Volume of ``mask``.
    method : str
        ``"components"``, ``"all_csf"`` or ``"atlas"``.
    settings : dict
        The options used (thresholds in their units), for provenance.
    components : list of dict
        One record per component considered: ``volume_ml``, ``radius_mm`` (largest
        inscribed ball, estimated), ``offset`` (normalised
        distance of the centroid from the brain centre), ``superior`` (normalised
        superior offset of the centroid), ``kept`` (bool) and ``reason`` (None or the
        rejection reason).
    """

    mask: Any = field(repr=False)
    pv: Any = field(repr=False)
    n_components_kept: int
    rejected: dict[str, int]
    n_voxels: int
    volume_ml: float
    method: str
    settings: dict[str, Any]
    components: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (everything but the maps)."""
        return {
            "method": self.method,
            "n_components_kept": self.n_components_kept,
            "rejected": dict(self.rejected),
            "n_voxels": self.n_voxels,
            "volume_ml": self.volume_ml,
            "settings": dict(self.settings),
            "components": [dict(c) for c in self.components],
            "units": {"volume_ml": "ml", "min_depth_mm": "mm", "open_mm": "mm", "min_volume_ml": "ml",
                      "min_radius_mm": "mm", "radius_mm": "mm"},
        }


# --------------------------------------------------------------------------------------
# Private helpers (shared with aslcal.masks.brainmask)
# --------------------------------------------------------------------------------------






def _as_mask(name: str, value: Any, xp, shape: tuple, ref: str) -> Any:
    arr = as_numeric_array(name, value)
    if tuple(int(s) for s in arr.shape) != shape:
        raise InputError(f"{name}: shape {tuple(arr.shape)} does not match {shape} (the shape of {ref})")
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "f" and not bool(xp.all(xp.isfinite(arr))):
        raise InputError(f"{name}: the mask contains NaN or Inf; expected 0 (outside) and non-zero (inside)")
    return arr != 0


def _voxel_size(value: Any, ndim: int = 3) -> tuple[float, ...]:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"voxel_size={value!r}: expected {ndim} positive numbers (mm)") from None
    if len(items) != ndim or not all(math.isfinite(v) and v > 0 for v in items):
        raise InputError(f"voxel_size={value!r}: expected {ndim} positive finite numbers (mm)")
    return items


def _affine(name: str, value: Any) -> np.ndarray:
    m = np.asarray(value, dtype=np.float64) if value is not None else None
    if m is None or m.shape != (4, 4) or not np.isfinite(m).all():
        raise InputError(f"{name}: expected a finite 4x4 matrix, got {None if m is None else m.shape}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12 or not np.allclose(m[3], (0, 0, 0, 1)):
        raise InputError(f"{name}: the 4x4 matrix is singular or not affine (last row must be 0 0 0 1)")
    return m


def _number(name: str, value: Any, unit: str, *, low: float = 0.0, inclusive: bool = True,
            high: float = math.inf) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected a number ({unit})") from None
    ok = math.isfinite(f) and (f >= low if inclusive else f > low) and f <= high
    if not ok:
        bound = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise InputError(f"{name}={value!r}: expected a finite number {bound} ({unit})")
    return f


def _ellipsoid(radius_mm: float, voxel_size: tuple[float, ...]) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on a grid of ``voxel_size`` (host array, odd shape)."""
    half = [int(math.floor(radius_mm / v + 1e-9)) for v in voxel_size]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * v for h, v in zip(half, voxel_size)], indexing="ij")
    r2 = sum(g * g for g in grids)
    return r2 <= radius_mm * radius_mm * (1 + 1e-9)


def _connectivity(value: Any, ndim: int = 3) -> np.ndarray:
    table = {6: 1, 18: 2, 26: 3}
    if value not in table:
        raise InputError(f"connectivity={value!r}: expected 6, 18 or 26 (neighbours of a voxel)")
    import scipy.ndimage as sndi

    return sndi.generate_binary_structure(ndim, table[value])


def _structure(xp, struct: np.ndarray):
    """A host structuring element on the device of ``xp``."""
    return xp.asarray(struct)


def _host(values: Any) -> list:
    """Small per-component statistics as a host list (the only non-scalar transfer)."""
    if is_cupy_array(values):
        values = values.get()
    return np.asarray(values).tolist()


#: Partial-volume maps may overshoot [0, 1] by this much (interpolation); more is an error.
FRACTION_TOL = 0.01


def check_fractions(name: str, pv: Any, xp) -> None:
    """Refuse a partial-volume map whose (finite) values leave [-tol, 1 + tol]: a
    percentage or a probability-times-something map would be clipped into nonsense."""
    if not int(pv.size):
        return
    finite = pv[xp.isfinite(pv)]
    if not int(finite.size):
        return
    lo, hi = float(xp.min(finite)), float(xp.max(finite))
    if lo < -FRACTION_TOL or hi > 1.0 + FRACTION_TOL:
        hint = "; a percentage map? divide it by 100" if hi <= 100.0 + FRACTION_TOL and lo >= -FRACTION_TOL else ""
        raise InputError(f"{name}: values range from {lo:.4g} to {hi:.4g}; expected partial-volume "
                         f"fractions in [0, 1]{hint}")


def _count(xp, mask: Any) -> int:
    return int(xp.count_nonzero(mask))


def _superior_axis(affine: np.ndarray | None, ndim: int = 3) -> tuple[int, float]:
    """(array axis, sign) that points most nearly to world superior (+z of RAS)."""
    if affine is None:
        return ndim - 1, 1.0
    col = affine[2, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    ax = int(np.argmax(np.abs(col)))
    return ax, float(np.sign(col[ax]) or 1.0)


def _empty_error(what: str) -> InputError:
    return InputError(f"empty reference region: {what}; {EMPTY_ADVICE}")


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def lateral_ventricles(
    csf_pv: Any,
    brain_mask: Any,
    voxel_size: Any = None,
    *,
    affine: Any = None,
    threshold: float = 0.5,
    min_depth_mm: float = 10.0,
    open_mm: float = 2.5,
    connectivity: int = 26,
    min_volume_ml: float = 0.3,
    min_fraction: float = 0.05,
    min_radius_mm: float = 2.5,
    min_radius_fraction: float = 0.6,
    max_offset: float = 0.5,
    max_inferior: float = 0.3,
    erode: bool = True,
    all_csf: bool = False,
) -> VentricleMask:
    """Keep the lateral-ventricle CSF of a CSF partial-volume map (module docstring).

    Parameters
    ----------
    csf_pv : float array of shape (x, y, z), fraction in [0, 1]
        CSF partial-volume (or probability) map, NumPy or CuPy; best in structural
        space (e.g. FAST ``*_pve_0``, ``*_label-CSF_probseg``).
    brain_mask : array of shape (x, y, z)
        Brain mask of the same grid (non-zero = brain), on the same device.
    voxel_size : sequence of 3 float, mm, optional
        Voxel size of the grid.  Taken from ``affine`` when omitted; one of the two
        is required.
    affine : array of shape (4, 4), optional
        Voxel -> world (RAS, mm) matrix of the grid: gives the voxel size and which
        array axis points superior.  Without it the third axis is taken as
        inferior -> superior.
    threshold : float, fraction, optional
        A voxel is CSF when ``csf_pv >= threshold``.  Default 0.5.
    min_depth_mm : float, mm, optional
        CSF closer than this to the brain surface is not considered.  Default 10.
    open_mm : float, mm, optional
        Radius of the ball of the opening that removes thin sheets (sulcal fundi,
        fissure) before the components are formed; 0 turns it off (so does a radius
        below the voxel size).  Default 2.5.
    connectivity : {6, 18, 26}, optional
        Neighbourhood of the connected components.  Default 26.
    min_volume_ml : float, ml, optional
        Smallest component kept.  Default 0.3.
    min_fraction : float, optional
        Smallest component kept, relative to the largest candidate.  Default 0.05.
    min_radius_mm : float, mm, optional
        Smallest radius of the largest ball inside a kept component (see the module
        docstring for the estimate).  Default 2.5.
    min_radius_fraction : float, optional
        Smallest radius of a kept component relative to the thickest candidate.
        Default 0.6.
    max_offset : float, optional
        Largest normalised distance of a kept component's centroid from the brain
        centre (1 = the brain's semi-extent).  Default 0.5.
    max_inferior : float, optional
        Components whose centroid lies more than this (normalised units) below the
        brain centre are rejected.  Default 0.3.
    erode : bool, optional
        Erode the kept mask once with a 3x3x3 box (FSL parity).  Default True.
    all_csf : bool, optional
        ``--csfmaskingoff``: keep every CSF voxel of the brain mask, no selection and
        no erosion.  Default False.

    Returns
    -------
    VentricleMask

    Raises
    ------
    InputError
        Bad arguments (shapes, NaN in ``csf_pv``, options out of range), or nothing
        is left (no CSF, no component passes, or the erosion removes everything):
        the message tells the user to check the brain extraction and segmentation or
        to supply a mask.
    """
    pv = as_numeric_array("csf_pv", csf_pv)
    xp = array_namespace(pv, as_numeric_array("brain_mask", brain_mask))
    if pv.ndim != 3:
        raise InputError(f"csf_pv: expected a 3-D map (x, y, z), got shape {tuple(pv.shape)}")
    shape = tuple(int(s) for s in pv.shape)
    brain = _as_mask("brain_mask", brain_mask, xp, shape, "csf_pv")
    pv = pv if pv.dtype.kind == "f" else xp.astype(pv, xp.float64)
    if not bool(xp.all(xp.isfinite(pv))):
        raise InputError("csf_pv: the map contains NaN or Inf; expected CSF fractions in [0, 1]")
    check_fractions("csf_pv", pv, xp)
    aff = None if affine is None else _affine("affine", affine)
    if voxel_size is None:
        if aff is None:
            raise InputError("voxel_size: required (mm) when no affine is given")
        vox = tuple(float(v) for v in np.linalg.norm(aff[:3, :3], axis=0))
    else:
        vox = _voxel_size(voxel_size)
    threshold = _number("threshold", threshold, "fraction", low=0.0, inclusive=False, high=1.0)
    min_depth_mm = _number("min_depth_mm", min_depth_mm, "mm")
    open_mm = _number("open_mm", open_mm, "mm")
    conn = _connectivity(connectivity)
    min_volume_ml = _number("min_volume_ml", min_volume_ml, "ml")
    min_fraction = _number("min_fraction", min_fraction, "fraction of the largest component", high=1.0)
    min_radius_mm = _number("min_radius_mm", min_radius_mm, "mm")
    min_radius_fraction = _number("min_radius_fraction", min_radius_fraction, "fraction of the thickest", high=1.0)
    max_offset = _number("max_offset", max_offset, "normalised distance", low=0.0, inclusive=False)
    max_inferior = _number("max_inferior", max_inferior, "normalised distance")
    voxel_ml = math.prod(vox) / 1000.0
    settings: dict[str, Any] = {
        "threshold": threshold, "min_depth_mm": min_depth_mm, "open_mm": open_mm,
        "connectivity": int(connectivity), "min_volume_ml": min_volume_ml,
        "min_fraction": min_fraction, "min_radius_mm": min_radius_mm,
        "min_radius_fraction": min_radius_fraction, "max_offset": max_offset, "max_inferior": max_inferior,
        "erode": bool(erode), "all_csf": bool(all_csf), "voxel_size_mm": list(vox),
    }
    ndi = ndimage_for(pv)
    zero = xp.zeros_like(pv)

    n_brain = _count(xp, brain)
    if n_brain == 0:
        raise _empty_error("brain_mask is empty")
    csf = brain & (pv >= threshold)
    n_csf = _count(xp, csf)
    if n_csf == 0:
        raise _empty_error(f"no voxel of the brain mask has csf_pv >= {threshold:g}")

    if all_csf:
        _, n_comp = ndi.label(csf, structure=_structure(xp, conn))
        return VentricleMask(
            mask=csf, pv=xp.where(brain, pv, zero), n_components_kept=int(n_comp), rejected={},
            n_voxels=n_csf, volume_ml=n_csf * voxel_ml, method="all_csf", settings=settings,
        )

    # 2. depth below the brain surface (mm); voxels outside the array count as outside
    padded = xp.zeros(tuple(s + 2 for s in shape), dtype=bool)
    padded[1:-1, 1:-1, 1:-1] = brain
    depth = ndi.distance_transform_edt(padded, sampling=vox)[1:-1, 1:-1, 1:-1]
    padded[1:-1, 1:-1, 1:-1] = csf
    inner = ndi.distance_transform_edt(padded, sampling=vox)[1:-1, 1:-1, 1:-1]
    del padded
    deep = csf & (depth >= min_depth_mm)
    if _count(xp, deep) == 0:
        raise _empty_error(
            f"{n_csf} CSF voxels (csf_pv >= {threshold:g}) but none deeper than {min_depth_mm:g} mm "
            "below the brain surface"
        )

    # 3. opening: remove thin sheets
    ball = _ellipsoid(open_mm, vox) if open_mm > 0 else np.ones((1, 1, 1), dtype=bool)
    use_open = ball.size > 1
    if use_open:
        core = ndi.binary_opening(deep, structure=_structure(xp, ball))
    else:
        core = deep

    # 4. components in the brain's frame
    labels, n_comp = ndi.label(core, structure=_structure(xp, conn))
    n_comp = int(n_comp)
    if n_comp == 0:
        raise _empty_error(
            f"the deep CSF ({_count(xp, deep)} voxels) is all thinner than the opening ball "
            f"(open_mm={open_mm:g})"
        )
    coords = [xp.reshape(xp.astype(xp.arange(s), xp.float64), tuple(s if a == ax else 1 for a in range(3)))
              for ax, s in enumerate(shape)]
    brain_f = xp.astype(brain, xp.float64)
    com, semi = [], []
    for c in coords:
        m1 = float(xp.sum(brain_f * c)) / n_brain
        m2 = float(xp.sum(brain_f * (c - m1) ** 2)) / n_brain
        com.append(m1)
        semi.append(max(math.sqrt(5.0 * m2), 0.5))
    flat = xp.reshape(labels, (-1,))
    sizes = _host(xp.bincount(flat, minlength=n_comp + 1))[1:]
    cents = []
    for c in coords:
        w = xp.reshape(xp.broadcast_to(c, shape), (-1,))
        sums = _host(xp.bincount(flat, weights=w, minlength=n_comp + 1))[1:]
        cents.append([s / max(n, 1) for s, n in zip(sums, sizes)])
    radii = [r - 0.5 * min(vox) for r in _host(ndi.maximum(inner, labels, xp.arange(1, n_comp + 1)))]
    sup_ax, sup_sign = _superior_axis(aff)
    rejected = {"small": 0, "thin": 0, "inferior": 0, "peripheral": 0}
    records: list[dict[str, Any]] = []
    for i in range(n_comp):  # absolute criteria
        vol = sizes[i] * voxel_ml
        norm = [(cents[a][i] - com[a]) / semi[a] for a in range(3)]
        offset = math.sqrt(sum(v * v for v in norm))
        superior = sup_sign * norm[sup_ax]
        if vol < min_volume_ml:
            reason = "small"
        elif superior < -max_inferior:
            reason = "inferior"
        elif offset > max_offset:
            reason = "peripheral"
        elif radii[i] < min_radius_mm:
            reason = "thin"
        else:
            reason = None
        records.append({"volume_ml": round(vol, 4), "radius_mm": round(radii[i], 3), "offset": round(offset, 4),
                        "superior": round(superior, 4), "kept": reason is None, "reason": reason})
    candidates = [i for i in range(n_comp) if records[i]["reason"] is None]
    if candidates:  # relative criteria: the lateral ventricles are the largest, thickest deep CSF
        big = max(sizes[i] for i in candidates)
        thick = max(radii[i] for i in candidates)
        for i in candidates:
            if sizes[i] < min_fraction * big:
                records[i].update(kept=False, reason="small")
            elif radii[i] < min_radius_fraction * thick:
                records[i].update(kept=False, reason="thin")
    keep_ids = [i + 1 for i in range(n_comp) if records[i]["kept"]]
    for rec in records:
        if rec["reason"] is not None:
            rejected[rec["reason"]] += 1
    if not keep_ids:
        raise _empty_error(
            f"none of the {n_comp} deep CSF components looks like a lateral ventricle "
            f"(rejected: {', '.join(f'{k} {v}' for k, v in rejected.items() if v)})"
        )
    lut = np.zeros(n_comp + 1, dtype=bool)
    lut[keep_ids] = True
    kept = xp.asarray(lut)[labels]

    # 5. grow back what the opening shaved off, within the deep CSF
    if use_open:
        kept = ndi.binary_dilation(kept, structure=_structure(xp, ball)) & deep

    # 6. FSL erodes its ventricle mask once (3x3x3 box; outside the array counts as 0)
    if erode:
        mask = ndi.binary_erosion(kept, structure=xp.ones((3, 3, 3), dtype=bool), border_value=0)
    else:
        mask = kept
    n_vox = _count(xp, mask)
    if n_vox == 0:
        raise _empty_error(
            f"the {len(keep_ids)} ventricle component(s) vanish when eroded once (too thin at this "
            "resolution: segment a higher-resolution structural image or pass erode=False)"
        )
    return VentricleMask(
        mask=mask, pv=xp.where(mask, pv, zero), n_components_kept=len(keep_ids), rejected=rejected,
        n_voxels=n_vox, volume_ml=n_vox * voxel_ml, method="components", settings=settings,
        components=records,
    )


def ventricles_from_atlas(
    atlas_mask_std: Any,
    std_affine: Any,
    struct_shape: Any,
    struct_affine: Any,
    str2std_world: Any,
    *,
    csf_pv: Any = None,
    order: int = 0,
    erode: bool = True,
) -> VentricleMask:
    """Map a ventricle mask in standard space into the structural grid (user-atlas route).

    For every structural voxel ``v``: ``std index = inv(std_affine) @ str2std_world @
    struct_affine @ v``; the atlas is sampled there (nearest neighbour or trilinear,
    then ``>= 0.5``; outside the atlas counts as 0), and the mask is eroded once with
    a 3x3x3 box, as asl_calib does with its Harvard-Oxford ventricle mask.

    Parameters
    ----------
    atlas_mask_std : array of shape (X, Y, Z)
        Ventricle mask in standard space: binary (values of 1 or more = ventricle,
        e.g. 0/1 or 0/255), or a probability map with values in [0, 1], thresholded at
        0.5 after sampling (values are clipped to [0, 1] first).  NumPy or CuPy.
    std_affine : array of shape (4, 4), mm
        Voxel -> world matrix of the atlas.
    struct_shape : sequence of 3 int
        Shape of the structural grid.
    struct_affine : array of shape (4, 4), mm
        Voxel -> world matrix of the structural image.
    str2std_world : array of shape (4, 4)
        World (mm) of the structural image -> world (mm) of the standard space.
    csf_pv : float array of shape ``struct_shape``, optional
        CSF fraction map on the structural grid (same device as the atlas): the
        result's ``pv`` is ``csf_pv * mask`` (asl_calib masks the CSF PVE with the
        ventricle mask).  Without it ``pv`` is the mask as 0/1.
    order : {0, 1}, optional
        0: nearest neighbour (default); 1: trilinear.
    erode : bool, optional
        Erode the mapped mask once (3x3x3).  Default True.

    Returns
    -------
    VentricleMask
        ``method="atlas"``; ``n_components_kept`` counts the 26-connected components
        of the mapped mask before the erosion.

    Raises
    ------
    InputError
        Bad matrices (not 4x4, singular), shapes, ``order``; or the mapped mask is
        empty (the transform misses the atlas, or the erosion removes everything).
    """
    atlas = as_numeric_array("atlas_mask_std", atlas_mask_std)
    xp = array_namespace(atlas, csf_pv)
    if atlas.ndim != 3:
        raise InputError(f"atlas_mask_std: expected a 3-D mask, got shape {tuple(atlas.shape)}")
    try:
        shape = tuple(int(s) for s in struct_shape)
    except (TypeError, ValueError):
        raise InputError(f"struct_shape={struct_shape!r}: expected 3 positive integers") from None
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"struct_shape={struct_shape!r}: expected 3 positive integers")
    a_std = _affine("std_affine", std_affine)
    a_str = _affine("struct_affine", struct_affine)
    w = _affine("str2std_world", str2std_world)
    if order not in (0, 1):
        raise InputError(f"order={order!r}: expected 0 (nearest neighbour) or 1 (trilinear)")
    pv = None
    if csf_pv is not None:
        pv = as_numeric_array("csf_pv", csf_pv)
        if tuple(int(s) for s in pv.shape) != shape:
            raise InputError(f"csf_pv: shape {tuple(pv.shape)} does not match struct_shape {shape}")
        pv = pv if pv.dtype.kind == "f" else xp.astype(pv, xp.float64)
    ndi = ndimage_for(atlas)
    m = np.linalg.inv(a_std) @ w @ a_str  # structural index -> atlas index
    # A binary mask (any value >= 1: 1, 255, ...) becomes 0/1; a probability map (0-1)
    # keeps its values, and the 0.5 threshold applies after sampling (as documented).
    src = xp.clip(xp.astype(atlas, xp.float32), 0.0, 1.0)
    src = xp.where(xp.isfinite(src), src, xp.zeros_like(src))
    sampled = ndi.affine_transform(
        src, xp.asarray(m), output_shape=shape, order=order, mode="constant", cval=0.0
    )
    mapped = sampled >= 0.5
    n_mapped = _count(xp, mapped)
    if n_mapped == 0:
        raise _empty_error(
            "the ventricle atlas maps to no voxel of the structural grid (check --str2std and the "
            "atlas's space)"
        )
    _, n_comp = ndi.label(mapped, structure=xp.ones((3, 3, 3), dtype=bool))
    mask = ndi.binary_erosion(mapped, structure=xp.ones((3, 3, 3), dtype=bool), border_value=0) if erode else mapped
    n_vox = _count(xp, mask)
    if n_vox == 0:
        raise _empty_error("the mapped ventricle atlas vanishes when eroded once")
    vox = tuple(float(v) for v in np.linalg.norm(a_str[:3, :3], axis=0))
    out_pv = xp.where(mask, pv, xp.zeros_like(pv)) if pv is not None else xp.astype(mask, xp.float32)
    return VentricleMask(
        mask=mask, pv=out_pv, n_components_kept=int(n_comp), rejected={}, n_voxels=n_vox,
        volume_ml=n_vox * math.prod(vox) / 1000.0, method="atlas",
        settings={"order": int(order), "erode": bool(erode), "n_mapped": n_mapped,
                  "voxel_size_mm": list(vox)},
    )
