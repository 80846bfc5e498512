"""Brain mask from the calibration image, replacing BET (issue 5, item 5).

asl_calib runs BET on the calibration image when no ``--bmask`` is given.  A long-TR
(proton-density-like) calibration image shows the brain, the CSF around it, a dark
skull and a bright scalp; :func:`brain_mask_from_calib` keeps the brain and the CSF
around it (the definition of the brain mask: brain tissue + CSF ≥ half a voxel) and
drops the scalp:

1. **Image**: a series is averaged over its last axis; non-finite voxels count as 0.
2. **Threshold**: the head (foreground) is separated from the background noise by
   Otsu's threshold on the intensity histogram (clipped to the 0.5-99.5th percentiles
   so that a few extreme voxels do not stretch it, to the extremes when those
   percentiles are equal).  The tissue level ``L`` is the median
   of the foreground; voxels above ``fraction * L`` (default half: a voxel half brain,
   half skull) and above the Otsu threshold are candidates.  Like BET's fractional
   intensity threshold, this adapts to the scale of the image.
3. **Scalp removal**: the candidates are eroded with a ball of radius ``erode_mm``
   (thicker than the thin bridges through the skull that partial volume makes between
   scalp and brain), the largest connected component (6-connected) is kept — the
   brain — and dilated back with the same ball, within the candidates.  Along an axis
   where the image has fewer voxels than the ball's width + 2 (a slab of a few slices:
   up to 6 with the default 7 mm ball and 3.4-5 mm slices) the ball is flattened to its
   central plane.
4. **Clean-up**: holes filled in each axial slice (third array axis) and in 3-D, a
   closing with a ball of radius ``close_mm`` (border-safe: the image edge does not
   erode the mask), holes filled again.

It runs on the device of the image: ``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage``
for CuPy (the histogram and the median too); only scalars come back to the host.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..backend import array_namespace, as_numeric_array, is_cupy_array, ndimage_for
from ..errors import InputError
from .morphology import binary_dilation, binary_erosion
from .ventricles import _count, _ellipsoid, _number, _voxel_size

__all__ = ["BrainMask", "brain_mask_from_calib"]

#: Bins of the intensity histogram of the Otsu threshold.
_BINS = 256

_CROSS_2D = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

#: Radii of the erosion and closing balls: in mm, and in voxels when no voxel size is given.
_DEFAULT_ERODE_MM = 7.0
_DEFAULT_CLOSE_MM = 3.5
_DEFAULT_ERODE_VOXELS = 2.0
_DEFAULT_CLOSE_VOXELS = 1.0


@dataclass(eq=False)
class BrainMask:
    """Result of :func:`brain_mask_from_calib`.

    Attributes
    ----------
    mask : bool array of shape (x, y, z)
        The brain mask, on the device of the image.
    threshold : float, signal units
        Intensity threshold used (``max(otsu, fraction * tissue_level)``).
    otsu : float, signal units
        Otsu threshold between background and head.
    tissue_level : float, signal units
        Median intensity of the head (voxels above ``otsu``).
    n_components : int
        Connected components of the eroded candidates (the largest is the brain).
    n_voxels : int
        Voxels in ``mask``.
    volume_ml : float or None, ml
        Volume of ``mask`` (None without a voxel size).
    n_nonfinite : int
        Non-finite voxels of the (mean) image, counted as 0.
    settings : dict
        The options used, for provenance.
    """

    mask: Any = field(repr=False)
    threshold: float
    otsu: float
    tissue_level: float
    n_components: int
    n_voxels: int
    volume_ml: float | None
    n_nonfinite: int
    settings: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (everything but the mask)."""
        out = {k: v for k, v in asdict(self).items() if k != "mask"}
        out["units"] = {"threshold": "signal units", "otsu": "signal units",
                        "tissue_level": "signal units", "volume_ml": "ml",
                        "erode": self.settings["radius_unit"], "close": self.settings["radius_unit"]}
        out["method"] = ("threshold max(otsu, fraction * median of head) -> erode -> largest "
                         "component -> dilate within threshold -> fill holes -> close -> fill holes")
        return out


def _quantile(xp, values: Any, q: float | tuple[float, ...]) -> float | list[float]:
    """``xp.quantile(values, q)`` (linear), the same number; on the host from one sort
    (a tuple of ``q``: a list of quantiles, from the same sort).

    NumPy's quantile partitions around four ranks at once, which on a calibration image
    costs 3-5 times a (SIMD) sort of it, whether its values are all distinct (noisy) or
    few (a noise-free phantom; a single-rank partition was 20 times slower there).  The
    two neighbouring order statistics are read from the sorted copy and interpolated by
    NumPy's own quantile of the pair at the fractional rank, so the result is identical
    (tested against np.quantile).
    """
    if isinstance(q, tuple):
        if is_cupy_array(values) or values.size == 0:
            return [float(xp.quantile(values, v)) for v in q]
        ordered = np.sort(values, axis=None)
        return [_sorted_quantile(ordered, v) for v in q]
    if is_cupy_array(values) or values.size == 0:
        return float(xp.quantile(values, q))
    return _sorted_quantile(np.sort(values, axis=None), q)


def _sorted_quantile(ordered: np.ndarray, q: float) -> float:
    n = int(ordered.size)
    virtual = (n - 1) * q
    k = int(math.floor(virtual))
    if k >= n - 1:  # NumPy takes the maximum for both neighbours
        return float(ordered[-1])
    return float(np.quantile(ordered[k:k + 2], virtual - k))


def _median(xp, values: Any) -> float:
    """``xp.median(values)``, the same number; on the host by one single-rank partition
    (NumPy's median partitions around two ranks for an even count: 3-5 times slower)."""
    if is_cupy_array(values) or values.size == 0:
        return float(xp.median(values))
    n = int(values.size)
    half = n // 2
    part = np.partition(values, half)
    if n % 2:
        return float(np.mean(part[half:half + 1]))
    # the mean of the two middle values, computed as NumPy's median computes it
    return float(np.mean(np.array([np.max(part[:half]), part[half]], dtype=values.dtype)))


def _otsu(xp, values: Any, lo: float, hi: float) -> float:
    """Otsu's threshold of ``values`` (1-D, device) over [lo, hi] with :data:`_BINS` bins."""
    # Uniform bins by direct indexing: bin floor((v - lo) * bins / (hi - lo)) in the
    # image's float type, the top edge in the last bin.
    if is_cupy_array(values):
        index = xp.astype((xp.clip(values, lo, hi) - lo) * (_BINS / (hi - lo)), xp.int64)
        index = xp.minimum(index, _BINS - 1)
        counts = xp.astype(xp.bincount(xp.reshape(index, (-1,)), minlength=_BINS), xp.float64)
    else:  # one compiled pass (a tenth of np.histogram's time)
        from ..kernels.masks_cpu import get_mask_kernels

        f = values.dtype.type
        counts = np.zeros(_BINS, dtype=np.int64)
        get_mask_kernels().histogram(values, f(lo), f(hi), f(_BINS / (hi - lo)), counts)
        counts = counts.astype(np.float64)
    # Edges in the image's float type, as np.histogram makes them.
    edges = xp.astype(xp.linspace(lo, hi, _BINS + 1, dtype=values.dtype), xp.float64)
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = xp.cumsum(counts)
    total = w0[-1]
    m0 = xp.cumsum(counts * centres)
    w1 = total - w0
    mu0 = m0 / xp.where(w0 > 0, w0, 1.0)
    mu1 = (m0[-1] - m0) / xp.where(w1 > 0, w1, 1.0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(xp.argmax(between[:-1]))
    return float(edges[k + 1])


class _Steps:
    """Erosion and dilation (shifted slices, NumPy or CuPy); subclasses label and fill."""

    @staticmethod
    def erode(mask, structure, border: bool):
        return binary_erosion(mask, structure, border_value=border)

    @staticmethod
    def dilate(mask, structure):
        return binary_dilation(mask, structure)


class _HostSteps(_Steps):
    """The labelling steps on NumPy arrays: compiled kernels that release the GIL
    (aslcal.kernels.masks_cpu), so that a cohort's I/O threads keep running."""

    def __init__(self) -> None:
        from ..kernels.masks_cpu import get_mask_kernels

        self.k = get_mask_kernels()

    def largest_component(self, mask):
        out = np.empty(mask.shape, dtype=bool)
        n = self.k.largest_component(np.ascontiguousarray(mask, dtype=bool), out)
        return out, int(n)

    def fill_holes(self, mask):
        mask = np.ascontiguousarray(mask, dtype=bool)
        out = np.empty_like(mask)
        self.k.fill_holes_inplane(mask, out)
        return out


class _DeviceSteps(_Steps):
    """The labelling steps on CuPy arrays: cupyx.scipy.ndimage."""

    def __init__(self, ndi, xp) -> None:
        self.ndi, self.xp = ndi, xp

    def largest_component(self, mask):
        xp = self.xp
        labels, n = self.ndi.label(mask)
        n = int(n)
        if n == 0:
            return xp.zeros(mask.shape, dtype=xp.bool), 0
        sizes = xp.bincount(xp.reshape(labels, (-1,)), minlength=n + 1)
        sizes[0] = 0
        return labels == int(xp.argmax(sizes)), n

    def fill_holes(self, mask):
        return _fill_holes(self.ndi, self.xp, mask)


def _crop_box(xp, cand: Any, margin: list[int]) -> tuple[slice, ...]:
    """The bounding box of ``cand`` widened by ``margin`` voxels per axis (within the grid).

    With ``margin`` = 2·r + 1 for a closing ball of half-size r (voxels) every step of the
    mask gives inside the box what it gives on the whole grid: the erosion and the
    dilation within the candidates see only background outside the box; the closing's
    dilation stays within r of the mask, and its erosion (outside = foreground) reads
    at most r further; hole filling finds the outside through the background ring the
    margin leaves in every slice.
    """
    box = []
    for axis, m in enumerate(margin):
        other = tuple(a for a in range(cand.ndim) if a != axis)
        hit = xp.nonzero(xp.any(cand, axis=other))[0]
        n = int(cand.shape[axis])
        lo, hi = (int(hit[0]), int(hit[-1])) if int(hit.shape[0]) else (0, n - 1)
        box.append(slice(max(lo - m, 0), min(hi + m + 1, n)))
    return tuple(box)


def _fill_holes(ndi, xp, mask: Any) -> Any:
    """Fill holes in each axial slice (no connectivity along axis 2), and so in 3-D.

    A 3-D hole (a background component, 6-connected, touching no face of the array)
    holds the in-plane components of its voxels, and none of them touches a face
    either, so the in-plane fill fills it too: one pass does both.
    """
    inplane = np.zeros((3, 3, 3), dtype=bool)
    inplane[:, :, 1] = _CROSS_2D
    return _fill(ndi, xp, mask, inplane)


def _fill(ndi, xp, mask: Any, structure: np.ndarray) -> Any:
    """``binary_fill_holes(mask, structure)`` by one labelling of the background.

    ``binary_fill_holes`` grows the outside (border value 1) into the background through
    ``structure``; the background components (connected through ``structure``) that
    touch a face of the array it can reach — a face across which ``structure`` has an
    offset — are the outside, the others are holes.  One ``label`` pass replaces the
    iterated dilation (same set, about twice as fast).
    """
    labels, n = ndi.label(~mask, structure=xp.asarray(structure))
    n = int(n)
    if n == 0:
        return mask
    outside = xp.zeros(n + 1, dtype=bool)
    centre = tuple(s // 2 for s in structure.shape)
    for axis in range(labels.ndim):
        offsets = np.moveaxis(structure, axis, 0)
        reaches = bool(np.delete(offsets, centre[axis], axis=0).any())
        if not reaches:
            continue
        for index in (0, int(labels.shape[axis]) - 1):
            face = xp.take(labels, index, axis=axis)
            outside[face] = True
    outside[0] = True  # label 0: the mask itself
    return mask | ~outside[labels]


def brain_mask_from_calib(
    calib: Any,
    *,
    voxel_size: Any = None,
    fraction: float = 0.5,
    erode_mm: float | None = None,
    close_mm: float | None = None,
) -> BrainMask:
    """Brain mask (brain + surrounding CSF, no scalp) from a calibration image.

    See the module docstring for the method.

    Parameters
    ----------
    calib : array of shape (x, y, z) or (x, y, z, n), signal units
        Calibration image (NumPy or CuPy); a series is averaged over its last axis.
    voxel_size : sequence of 3 float, mm, optional
        Voxel size: the balls of the morphology are balls in mm.  Without it the
        voxels are taken as isotropic and the radii default to 2 voxels (erosion) and
        1 voxel (closing), ``erode_mm`` and ``close_mm`` then being in voxels.
    fraction : float, optional
        Threshold as a fraction of the median head intensity (BET's ``-f``
        analogue).  Default 0.5.
    erode_mm : float, mm, optional
        Radius of the erosion that cuts the scalp from the brain.  Default 7 mm
        (2 voxels without ``voxel_size``).  Must exceed the width of the bright
        bridges through the skull; must stay below the brain's half-thickness.
    close_mm : float, mm, optional
        Radius of the closing of the final mask.  Default 3.5 mm (1 voxel without
        ``voxel_size``); 0 turns it off.

    Returns
    -------
    BrainMask

    Raises
    ------
    InputError
        ``calib`` is not 3-D or 4-D, is constant (no contrast to threshold), or
        nothing is left after the erosion (``erode_mm`` too large for this image).
    """
    img = as_numeric_array("calib", calib)
    xp = array_namespace(img)
    if img.ndim == 4:
        if int(img.shape[3]) == 0:
            raise InputError(f"calib: the series of shape {tuple(img.shape)} has no volumes")
        img = xp.mean(xp.astype(img, xp.float64) if img.dtype.kind != "f" else img, axis=3)
    elif img.ndim != 3:
        raise InputError(
            f"calib: expected a 3-D image (x, y, z) or a series (x, y, z, n), got shape {tuple(img.shape)}"
        )
    img = img if img.dtype.kind == "f" else xp.astype(img, xp.float64)
    if voxel_size is None:  # isotropic voxels; radii in voxels
        vox, unit, defaults = (1.0, 1.0, 1.0), "voxels", (_DEFAULT_ERODE_VOXELS, _DEFAULT_CLOSE_VOXELS)
    else:
        vox, unit, defaults = _voxel_size(voxel_size), "mm", (_DEFAULT_ERODE_MM, _DEFAULT_CLOSE_MM)
    erode_r = defaults[0] if erode_mm is None else _number("erode_mm", erode_mm, unit, low=0.0, inclusive=False)
    close_r = defaults[1] if close_mm is None else _number("close_mm", close_mm, unit)
    fraction = _number("fraction", fraction, "fraction of the head intensity", low=0.0, inclusive=False, high=1.0)
    ndi = ndimage_for(img)

    finite = xp.isfinite(img)
    n_nonfinite = int(img.size) - _count(xp, finite)
    img = xp.where(finite, img, xp.zeros_like(img))
    flat = img.ravel(order="K")  # no copy whatever the memory order
    if n_nonfinite == int(img.size):
        raise InputError("calib: every voxel is NaN or Inf; expected a calibration image with brain signal")
    lo, hi = _quantile(xp, flat, (0.005, 0.995))
    if not hi > lo:  # fewer than 0.5 % of the voxels outside one value: the extremes
        lo, hi = float(xp.min(flat)), float(xp.max(flat))
    if not hi > lo:
        raise InputError(
            f"calib: the image is constant (every voxel is {lo:g}); expected a calibration image "
            "with brain signal above the background"
        )
    otsu = _otsu(xp, flat, lo, hi)
    head = flat[flat > otsu]
    tissue = _median(xp, head)
    threshold = max(otsu, fraction * tissue)
    cand = img > threshold

    settings = {"fraction": fraction, "erode": erode_r, "close": close_r,
                "voxel_size_mm": None if voxel_size is None else list(vox), "radius_unit": unit}
    ball = _ellipsoid(erode_r, vox)
    # A slab not more than 2 voxels thicker than the ball (a few slices of a 2-D
    # acquisition) keeps nothing, or only a sliver, through a 3-D erosion (outside the
    # field of view counts as background): along such an axis the ball is flattened to
    # its central plane.
    for ax in range(3):
        if int(img.shape[ax]) < ball.shape[ax] + 2 and ball.shape[ax] > 1:
            c = ball.shape[ax] // 2
            ball = np.take(ball, [c], axis=ax)
            settings.setdefault("flat_axes", []).append(ax)
    close_ball = _ellipsoid(close_r, vox) if close_r > 0 else np.ones((1, 1, 1), dtype=bool)
    # Work inside the candidates' bounding box, widened so that every step gives what
    # it gives on the whole grid (see _crop_box); the rest of the grid is background.
    box = _crop_box(xp, cand, [2 * (n // 2) + 1 for n in close_ball.shape])
    steps = _HostSteps() if not is_cupy_array(cand) else _DeviceSteps(ndi, xp)
    cand_box = cand[box]
    brain, n_comp = steps.largest_component(steps.erode(cand_box, ball, False))
    if n_comp == 0:
        raise InputError(
            f"calib: no brain left after eroding the thresholded image ({_count(xp, cand)} voxels above "
            f"{threshold:g}) with a ball of radius {erode_r:g} {settings['radius_unit']}: the image has "
            "no brain-sized bright region; check the calibration image or supply a brain mask (--bmask)"
        )
    mask = steps.fill_holes(steps.dilate(brain, ball) & cand_box)
    if close_ball.size > 1:
        mask = steps.fill_holes(steps.erode(steps.dilate(mask, close_ball), close_ball, True))
    full = xp.zeros(cand.shape, dtype=xp.bool)
    full[box] = mask
    mask = full
    n_vox = _count(xp, mask)
    return BrainMask(
        mask=mask, threshold=threshold, otsu=otsu, tissue_level=tissue, n_components=n_comp,
        n_voxels=n_vox, volume_ml=None if voxel_size is None else n_vox * math.prod(vox) / 1000.0,
        n_nonfinite=n_nonfinite, settings=settings,
    )
