"""Tissue segmentation of a brain-extracted T1-weighted image (FSL FAST's approach, no FSL).

:func:`segment_tissues` splits the voxels of a brain-extracted T1-weighted image into
cerebrospinal fluid (CSF), grey matter (GM) and white matter (WM) and returns
partial-volume (PV) maps, hard labels, the class statistics and the estimated bias
field.  It runs on NumPy or CuPy arrays alike: the namespace is taken from the input,
filters come from ``scipy.ndimage`` / ``cupyx.scipy.ndimage`` and the normal CDF from
``scipy.special`` / ``cupyx.scipy.special``.  Only scalars (class means, voxel counts,
small fitted coefficients) cross from the device to the host.

Model
-----
The intensity ``y`` of a brain voxel (after the bias field is divided out) comes from
one of six components:

* the **pure tissues** CSF, GM, WM: Gaussians ``N(mu_k, sigma_k^2)`` with
  ``mu_csf < mu_gm < mu_wm`` (T1 weighting);
* two **mixels** (partial-volume classes, as in FAST): a voxel holding tissues ``a``
  and ``b`` = (CSF, GM) or (GM, WM) with a fraction ``f`` of ``b`` uniform on (0, 1),
  ``y ~ N(f mu_b + (1 - f) mu_a, s^2)`` (``s`` the mean of the two sigmas), whose
  density is ``[Phi((y - mu_a)/s) - Phi((y - mu_b)/s)] / (mu_b - mu_a)``;
* an **edge** component, only in the outer voxel layer of the brain mask: CSF mixed
  with dark non-brain (skull, background), uniform between 0 and ``mu_csf``.

Partial volume is the reason for the mixels: in a 1-2 mm image of a folded cortex a
third or more of the brain voxels are mixtures, and three Gaussians alone would
widen and drag towards each other.

Algorithm
---------
1. **Initialisation.**  Intensity quantiles (10, 45, 80 %) refined by 1-D k-means give
   three intensity intervals.  A class starts at the mode of the (smoothed)
   histogram in its interval -- partial volume drags a class's mean towards its
   neighbours, not its peak -- or, without a peak of its own, at the mean of the most
   homogeneous quarter of its voxels (lowest 3x3x3 local variance).  All three start
   with the narrowest width of those homogeneous voxels: started wide, the middle
   class (GM) swallows the partial-volume voxels and EM never gives them back.
2. **EM on the intensity histogram.**  Without the spatial prior the E- and M-steps
   depend on the intensity alone, so they run on a 1024-bin histogram (bin counts,
   sums and sums of squares: the M-step moments are exact) -- hundreds of iterations
   cost less than one pass over the voxels.
3. **Bias field** (FAST's idea, parametric).  Rounds of a short EM (50 iterations,
   warm-started) and a field update: the per-voxel posteriors give the expected
   intensity ``sum_k pv_k mu_k``; the residual log-ratio ``log y - log(expected)`` is
   fitted by weighted least squares with a polynomial of the voxel coordinates (total
   degree ``bias_order``), normalised to a geometric mean of 1 over the brain and
   divided out.  Only pure GM and WM voxels whose neighbours share their tissue carry
   weight: near a tissue boundary (and in CSF) the assignment depends on the
   intensity itself, which would leak anatomy into the field.  When the field changes
   by less than ``10 tol``, the EM starts afresh (step 1) on the corrected image and
   runs to convergence.
4. **Spatial regularisation (MRF).**  With the parameters fixed, ``mrf_iter``
   mean-field sweeps of a Potts prior over the 6-neighbourhood: the log-prior of a
   component in a voxel gains ``mrf_beta`` times the sum over the six neighbours of
   their current fraction of its tissue (the mean of the two tissues for a mixel; the
   CSF half for the edge component), neighbours weighted by inverse distance.  The
   sums are whole-image array shifts (no voxel loops).  The prior is kept out of the
   parameter estimation: fed back into the M-step it lets the middle class (GM),
   neighbour of everything in a thin cortex, swallow the others.
5. **Partial volumes.**  ``pv_k`` is the posterior expectation of the fraction of
   tissue ``k``: 1 for pure ``k``; ``f_b = clip((y - mu_a)/(mu_b - mu_a), 0, 1)`` and
   ``f_a = 1 - f_b`` for a mixel; CSF for the edge component.  The maps sum to 1 in
   the brain.  ``labels`` is their argmax (1 CSF, 2 GM, 3 WM: FAST's ``_seg``).

Checks
------
* Without a ``brain_mask`` the structural must be brain-extracted
  (:func:`check_brain_extracted`): a head with scalp and skull would be "segmented"
  into scalp and skull classes.
* The image must hold three separable classes: fewer than three distinct intensities,
  a class with less than 0.5 % of the brain, or two adjacent pure classes less than
  ``2.5`` pooled standard deviations apart (EM splitting one class in two) stop with
  an :class:`~aslcal.errors.InputError`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import array_namespace, as_numeric_array, ndimage_for, special_for, to_host
from ..errors import InputError

__all__ = [
    "TISSUES",
    "TISSUE_LABELS",
    "Segmentation",
    "segment_tissues",
    "check_brain_extracted",
]

#: The tissues of a segmentation, in order of increasing T1w intensity.
TISSUES: tuple[str, ...] = ("csf", "gm", "wm")

#: Label values of :attr:`Segmentation.labels` (FSL FAST's ``_seg`` convention).
TISSUE_LABELS: dict[str, int] = {"csf": 1, "gm": 2, "wm": 3}

# Components: 0-2 pure CSF, GM, WM; then the mixels (lower, upper tissue); then "edge".
_N_PURE = 3
_MIXELS: tuple[tuple[int, int], ...] = ((0, 1), (1, 2))
_EDGE = _N_PURE + len(_MIXELS)
_N_COMP = _EDGE + 1

_MIN_VOXELS = 1000
_MIN_CLASS_FRACTION = 0.005  # a class with less than 0.5 % of the brain is no class
_MIN_SEPARATION = 2.5  # adjacent pure-class means, in pooled standard deviations
_INIT_SAMPLE = 200_000  # voxels drawn (seeded) for the initial quantiles and k-means
_PURE_PRIOR_INIT = 0.6  # initial share of the pure components (the rest: mixels)
_N_BINS = 1024
_BIAS_EM_ITER = 50  # EM iterations (warm-started) before each bias update
_MAX_BIAS_UPDATES = 20

# Brain-extraction check (see check_brain_extracted).
_BORDER_NONZERO_MAX = 0.5  # fraction of non-zero voxels on the faces of the FOV
_SHELL_FRACTION_MAX = 0.15  # fraction of the outer rim that is an enclosed dark shell
_RIM_MM = 12.0
_FOREGROUND_FRACTION = 0.1  # foreground: above this fraction of the robust maximum


@dataclass(eq=False)
class Segmentation:
    """Result of :func:`segment_tissues`.

    Attributes
    ----------
    pv : dict of str to array of shape (x, y, z), float32
        Partial-volume fractions of ``"csf"``, ``"gm"`` and ``"wm"``, each in [0, 1],
        summing to 1 inside :attr:`mask` and 0 outside.  Same device as the input.
    labels : array of shape (x, y, z), uint8
        Argmax of ``pv``: 1 CSF, 2 GM, 3 WM (:data:`TISSUE_LABELS`); 0 outside the mask.
    mask : array of shape (x, y, z), bool
        The voxels segmented (the brain mask used).
    means : dict of str to float, input intensity units
        Pure-class mean intensity of each tissue (bias-corrected).
    stds : dict of str to float, input intensity units
        Pure-class standard deviation of each tissue.
    fractions : dict of str to float
        Share of each tissue in the mask (mean of its PV map over the mask).
    bias_field : array of shape (x, y, z), float32, or None
        Estimated multiplicative bias field inside the mask (geometric mean 1 over the
        mask; 1 outside it); ``t1w_brain / bias_field`` is the corrected image.  None
        when ``bias_correction=False``.
    n_iter : int
        EM iterations run (on the histogram; bias rounds and the final EM together).
    n_bias_updates : int
        Times the bias field was re-estimated.
    converged : bool
        Whether the EM and the bias field settled (changes below ``tol``) within the
        iteration limits.
    mrf_beta : float
        The MRF weight used.
    n_voxels : int
        Voxels in the mask.
    elapsed_s : float, seconds
        Wall time of the segmentation (device work is synchronised by scalar reads).
    """

    pv: dict[str, Any] = field(repr=False)
    labels: Any = field(repr=False)
    mask: Any = field(repr=False)
    means: dict[str, float]
    stds: dict[str, float]
    fractions: dict[str, float]
    bias_field: Any = field(repr=False)
    n_iter: int
    n_bias_updates: int
    converged: bool
    mrf_beta: float
    n_voxels: int
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record (every scalar; no maps)."""
        return {
            "method": "Gaussian mixture CSF/GM/WM with CSF-GM and GM-WM partial-volume "
            "classes (EM), polynomial bias field, mean-field Potts MRF over the "
            "6-neighbourhood (FAST-like)",
            "means": dict(self.means),
            "stds": dict(self.stds),
            "fractions": dict(self.fractions),
            "n_iter": self.n_iter,
            "n_bias_updates": self.n_bias_updates,
            "converged": self.converged,
            "mrf_beta": self.mrf_beta,
            "n_voxels": self.n_voxels,
            "bias_corrected": self.bias_field is not None,
            "labels": dict(TISSUE_LABELS),
            "elapsed_s": self.elapsed_s,
            "units": {"means": "input intensity", "stds": "input intensity", "elapsed_s": "s"},
        }


# --------------------------------------------------------------------------- helpers








def _voxel_size(value: Any) -> tuple[float, float, float]:
    if value is None:
        return (1.0, 1.0, 1.0)
    try:
        vs = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"voxel_size={value!r}: expected 3 positive numbers (mm)") from None
    if len(vs) != 3 or not all(math.isfinite(v) and v > 0 for v in vs):
        raise InputError(f"voxel_size={value!r}: expected 3 positive numbers (mm)")
    return vs  # type: ignore[return-value]


def _int_option(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    ok = ok and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise InputError(f"{name}={value!r}: expected an integer {rng}")
    return int(value)


def _count(xp, mask) -> int:
    return int(xp.sum(mask.astype(xp.int64)))


def _fsum(xp, x) -> float:
    return float(xp.sum(x, dtype=xp.float64))


def _quantiles(sorted_vals, qs) -> list[float]:
    """Linear-interpolated quantiles of a sorted 1-D array (scalars read one by one)."""
    n = int(sorted_vals.shape[0])
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        w = pos - lo
        out.append(float(sorted_vals[lo]) * (1.0 - w) + float(sorted_vals[hi]) * w)
    return out


def _shifted(ndim: int, ax: int, n: int):
    lo = [slice(None)] * ndim
    hi = [slice(None)] * ndim
    lo[ax] = slice(0, n - 1)
    hi[ax] = slice(1, n)
    return tuple(lo), tuple(hi)


def _neighbour_sum(xp, a, weights):
    """Weighted sum over the 6-neighbourhood of each voxel of ``a`` (..., x, y, z).

    Voxels beyond the edge of the array count as 0 (array shifts, no loops over voxels).
    """
    out = xp.zeros_like(a)
    for ax, w in zip((-3, -2, -1), weights):
        n = a.shape[ax]
        if n < 2:
            continue
        lo, hi = _shifted(a.ndim, a.ndim + ax, n)
        out[hi] += w * a[lo]
        out[lo] += w * a[hi]
    return out


# ------------------------------------------------------------- brain-extraction check


def _extraction_evidence(img, xp, voxel_size) -> dict[str, float]:
    """Measures of "this is a whole head, not a brain" (see check_brain_extracted)."""
    ndi = ndimage_for(img)
    img = img.astype(xp.float32)
    img = xp.where(xp.isfinite(img), img, 0.0)
    pos = img[img > 0]
    n_pos = int(pos.shape[0])
    if n_pos == 0:
        return {"border_nonzero": 0.0, "dark_shell": 0.0, "high": 0.0}
    high = _quantiles(xp.sort(pos[:: max(1, n_pos // _INIT_SAMPLE)]), [0.99])[0]

    faces = (img[0], img[-1], img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1])
    n_face = sum(int(f.size) for f in faces)
    nz_face = sum(_count(xp, xp.abs(f) > 1e-3 * high) for f in faces)
    border_nonzero = nz_face / max(n_face, 1)

    # Enclosed dark shell: the bright foreground, its holes (background components that
    # do not reach the edge of the FOV: a skull under a scalp, or ventricles in a
    # brain), and how much of the outer rim of the filled foreground those holes are.
    fg = img > _FOREGROUND_FRACTION * high
    bg_lab, n_lab = ndi.label(~fg)
    reaches_edge = xp.zeros((int(n_lab) + 1,), dtype=bool)
    for f in (bg_lab[0], bg_lab[-1], bg_lab[:, 0], bg_lab[:, -1], bg_lab[:, :, 0], bg_lab[:, :, -1]):
        reaches_edge[f.reshape(-1)] = True
    reaches_edge[0] = False  # label 0 is the foreground itself
    filled = ~reaches_edge[bg_lab]
    holes = filled & ~fg
    depth = max(1, int(math.ceil(_RIM_MM / min(voxel_size))))
    rim = filled & ~ndi.binary_erosion(filled, iterations=depth, border_value=0)
    n_rim = _count(xp, rim)
    dark_shell = _count(xp, holes & rim) / n_rim if n_rim else 0.0
    return {"border_nonzero": border_nonzero, "dark_shell": dark_shell, "high": high}


def check_brain_extracted(
    t1w: Any, *, voxel_size: Any = None, name: str = "t1w_brain"
) -> dict[str, float]:
    """Raise if a structural image still has its scalp and skull.

    Two independent cues; either rejects the image:

    * **Background left**: more than 50 % of the voxels on the six faces of the field
      of view are non-zero (above 0.1 % of the robust maximum).  A brain extraction
      sets everything outside the brain to 0; a raw magnitude image has noise there.
    * **Enclosed dark shell**: the bright foreground (above 10 % of the robust
      maximum) encloses dark holes that make up more than 15 % of the outer 12 mm of
      the filled foreground -- a skull under a scalp.  A brain's own dark holes
      (ventricles) lie deep, not in the rim, and the rim of a brain-extracted image is
      cortex and CSF.  This cue catches heads whose background was set to zero.

    Parameters
    ----------
    t1w : array of shape (x, y, z)
        The structural image (NumPy or CuPy).
    voxel_size : tuple of 3 float, mm, optional
        Voxel size, for the 12 mm rim; default 1 mm isotropic.
    name : str, optional
        The argument name used in the error message.

    Returns
    -------
    dict
        The measures behind the decision: ``border_nonzero`` and ``dark_shell``
        (fractions) and ``high`` (the robust maximum, 99th percentile of the positive
        voxels, input units).

    Raises
    ------
    InputError
        The image does not look brain-extracted (the message gives the cue and its
        value), or it is not a 3-D array of real numbers.
    """
    img = as_numeric_array(name, t1w, ndim=3)
    xp = array_namespace(img)
    ev = _extraction_evidence(img, xp, _voxel_size(voxel_size))
    reasons = []
    if ev["border_nonzero"] > _BORDER_NONZERO_MAX:
        reasons.append(
            f"{100 * ev['border_nonzero']:.0f} % of the voxels on the edge of the field of "
            f"view are non-zero, at most {100 * _BORDER_NONZERO_MAX:.0f} % expected: "
            "background noise is left"
        )
    if ev["dark_shell"] > _SHELL_FRACTION_MAX:
        reasons.append(
            f"an enclosed dark shell fills {100 * ev['dark_shell']:.0f} % of the outer "
            f"{_RIM_MM:.0f} mm of the head, at most {100 * _SHELL_FRACTION_MAX:.0f} % "
            "expected: a skull under a scalp"
        )
    if reasons:
        raise InputError(
            f"{name}: the structural image does not look brain-extracted ("
            + "; ".join(reasons)
            + "); run a brain extraction (e.g. BET, SynthStrip) or give --refpve"
        )
    return ev


# ------------------------------------------------------------------- initialisation


def _kmeans_1d(xp, vals, centres, n_iter=30):
    """Lloyd's algorithm in 1-D from sorted ``centres``; returns the 3 centres."""
    c = list(centres)
    for _ in range(n_iter):
        b1, b2 = 0.5 * (c[0] + c[1]), 0.5 * (c[1] + c[2])
        groups = (vals < b1, (vals >= b1) & (vals < b2), vals >= b2)
        new = []
        for g, old in zip(groups, c):
            n = _count(xp, g)
            new.append(_fsum(xp, xp.where(g, vals, 0.0)) / n if n else old)
        done = max(abs(a - b) for a, b in zip(new, c)) < 1e-7
        c = new
        if done:
            break
    return c


def _homogeneous_moments(xp, img, mask, centres):
    """Mean and std of each class over its most homogeneous interior voxels.

    The classes are the intensity intervals between the midpoints of ``centres``; in
    each, the quarter of the voxels with the lowest local variance (3x3x3; voxels whose
    whole neighbourhood is in the mask) gives the moments.  ``None`` for a class with
    too few such voxels.
    """
    ndi = ndimage_for(img)
    v = xp.where(mask, img, 0.0).astype(xp.float32)
    cnt = ndi.uniform_filter(mask.astype(xp.float32), size=3, mode="constant")
    m1 = ndi.uniform_filter(v, size=3, mode="constant")
    m2 = ndi.uniform_filter(v * v, size=3, mode="constant")
    interior = mask & (cnt > 1.0 - 1e-3)
    var = (m2 - m1 * m1)[interior]
    vals = v[interior]
    cuts = (-math.inf, 0.5 * (centres[0] + centres[1]), 0.5 * (centres[1] + centres[2]), math.inf)
    means: list = [None] * _N_PURE
    sds: list = [None] * _N_PURE
    for k in range(_N_PURE):
        sel = (vals >= cuts[k]) & (vals < cuts[k + 1])
        n_sel = _count(xp, sel)
        if n_sel < 400:
            continue
        vk, ck = vals[sel], var[sel]
        cut = _quantiles(xp.sort(ck[:: max(1, n_sel // _INIT_SAMPLE)]), [0.25])[0]
        pick = vk[ck <= cut]
        n = int(pick.shape[0])
        if n < 100:
            continue
        mk = _fsum(xp, pick) / n
        means[k] = mk
        sds[k] = math.sqrt(max(_fsum(xp, (pick - mk) ** 2) / n, 0.0))
    return means, sds


def _histogram_modes(xp, ndi, y, centres):
    """The mode of a smoothed intensity histogram within each class interval.

    ``None`` for an interval whose highest point lies at its edge next to another
    class (no peak of its own: e.g. CSF in many real T1w images).
    """
    lo = float(xp.min(y))
    hi = float(xp.max(y))
    if not hi > lo:
        return [None] * _N_PURE
    n_bins = 512
    width = (hi - lo) / n_bins
    idx = xp.clip(((y - lo) * (1.0 / width)).astype(xp.int64), 0, n_bins - 1)
    hist = ndi.gaussian_filter1d(xp.bincount(idx, minlength=n_bins).astype(xp.float64), 2.0)
    cuts = [0, None, None, n_bins]
    for i, c in ((1, 0.5 * (centres[0] + centres[1])), (2, 0.5 * (centres[1] + centres[2]))):
        cuts[i] = min(max(int((c - lo) / width), 1), n_bins - 1)
    if not cuts[0] < cuts[1] < cuts[2] < cuts[3]:
        return [None] * _N_PURE
    modes: list = []
    for k in range(_N_PURE):
        a, b = cuts[k], cuts[k + 1]
        j = a + int(xp.argmax(hist[a:b]))
        margin = max(1, (b - a) // 20)
        at_inner_edge = (k > 0 and j < a + margin) or (k < _N_PURE - 1 and j >= b - margin)
        modes.append(None if at_inner_edge else lo + (j + 0.5) * width)
    return modes


# ------------------------------------------------------------------------- the model


def _component_terms(xp, sp, y, mu, sd, log_pi, on_edge):
    """Log-likelihood + log-prior of each component at intensities ``y`` (list of arrays).

    Order: pure CSF, GM, WM; the mixels; the edge component (only where ``on_edge``;
    ``log_pi[_EDGE]`` is its share there).
    """
    out = []
    for k in range(_N_PURE):
        z = (y - mu[k]) * (1.0 / sd[k])
        out.append(-0.5 * z * z + (log_pi[k] - math.log(sd[k]) - 0.5 * math.log(2 * math.pi)))
    for m, (a, b) in enumerate(_MIXELS):
        if not mu[b] > mu[a]:
            raise InputError(
                "t1w_brain: segmentation failed to separate three tissue classes: the class "
                f"means met during the EM ({', '.join(f'{t.upper()} {v:.4g}' for t, v in zip(TISSUES, mu))}, "
                "relative to the 99th percentile); expected a T1-weighted brain image with CSF < GM < WM"
            )
        s = 0.5 * (sd[a] + sd[b])
        # Clipping z keeps ndtr out of its slow far tails; beyond 8 sigma it is 0 or 1.
        za = xp.clip((y - mu[a]) * (1.0 / s), -8.0, 8.0)
        zb = xp.clip((y - mu[b]) * (1.0 / s), -8.0, 8.0)
        dens = xp.maximum(sp.ndtr(za) - sp.ndtr(zb), 1e-30)
        out.append(xp.log(dens) + (log_pi[_N_PURE + m] - math.log(mu[b] - mu[a])))
    top = max(mu[0], 1e-6)
    za = xp.clip(y * (1.0 / sd[0]), -8.0, 8.0)
    zb = xp.clip((y - top) * (1.0 / sd[0]), -8.0, 8.0)
    dens = xp.maximum(sp.ndtr(za) - sp.ndtr(zb), 1e-30)
    edge = xp.log(dens) + (log_pi[_EDGE] - math.log(top))
    out.append(xp.where(on_edge, edge, -1e30))
    return out


def _softmax(xp, terms):
    mx = terms[0]
    for t in terms[1:]:
        mx = xp.maximum(mx, t)
    ex = [xp.exp(t - mx) for t in terms]
    tot = ex[0]
    for e in ex[1:]:
        tot = tot + e
    inv = 1.0 / tot
    return [e * inv for e in ex]


def _mixel_fraction(xp, y, mu, a, b):
    """Fraction of the upper tissue ``b`` in a mix of ``a`` and ``b`` of intensity ``y``."""
    return xp.clip((y - mu[a]) * (1.0 / (mu[b] - mu[a])), 0.0, 1.0)


def _tissue_fractions(xp, y, post, mu):
    """PV maps (list of 3 arrays) from the component posteriors ``post``."""
    pv = [post[k] for k in range(_N_PURE)]
    for m, (a, b) in enumerate(_MIXELS):
        q = post[_N_PURE + m]
        qb = q * _mixel_fraction(xp, y, mu, a, b)
        pv[b] = pv[b] + qb
        pv[a] = pv[a] + (q - qb)
    pv[0] = pv[0] + post[_EDGE]
    return pv


def _e_step(xp, sp, y, mu, sd, pi, on_edge, *, nb=None, beta=0.0):
    """Component posteriors and PV maps of the voxels; with the MRF term if ``nb``."""
    terms = _component_terms(xp, sp, y, mu, sd, [math.log(p) for p in pi], on_edge)
    if nb is not None and beta > 0:
        for k in range(_N_PURE):
            terms[k] = terms[k] + beta * nb[k]
        for m, (a, b) in enumerate(_MIXELS):
            terms[_N_PURE + m] = terms[_N_PURE + m] + (0.5 * beta) * (nb[a] + nb[b])
        terms[_EDGE] = terms[_EDGE] + (0.5 * beta) * nb[0]
    post = _softmax(xp, terms)
    del terms
    return post, _tissue_fractions(xp, y, post, mu)


def _histograms(xp, y, on_edge):
    """Count, sum and sum of squares of ``y`` per bin, apart for edge and other voxels."""
    lo = float(xp.min(y))
    hi = float(xp.max(y))
    width = (hi - lo) / _N_BINS if hi > lo else 1.0
    idx = xp.clip(((y - lo) * (1.0 / width)).astype(xp.int64), 0, _N_BINS - 1)
    y64 = y.astype(xp.float64)
    out = []
    for sel in (~on_edge, on_edge):
        i = idx[sel]
        v = y64[sel]
        cnt = xp.bincount(i, minlength=_N_BINS).astype(xp.float64)
        s1 = xp.bincount(i, weights=v, minlength=_N_BINS)
        s2 = xp.bincount(i, weights=v * v, minlength=_N_BINS)
        centre = xp.where(cnt > 0, s1 / xp.where(cnt > 0, cnt, 1.0), 0.0)
        out.append((cnt, s1, s2, centre))
    return out


def _histogram_em(xp, sp, hists, mu, sd, pi, n_edge, *, max_iter, tol, sd_floor):
    """EM of the mixture on the binned intensities; returns (mu, sd, pi, n_iter, converged)."""
    (c_in, s1_in, s2_in, y_in), (c_ed, s1_ed, s2_ed, y_ed) = hists
    not_edge = xp.zeros(y_in.shape, dtype=bool)
    is_edge = xp.ones(y_ed.shape, dtype=bool)
    # count, sum and sum of squares per bin as columns: one matrix product per iteration
    # gives every component's moments, and one copy brings them to the host (on a GPU a
    # float() per moment would be ~20 synchronisations an iteration)
    m_in = xp.stack([c_in, s1_in, s2_in], axis=1)
    m_ed = xp.stack([c_ed, s1_ed, s2_ed], axis=1)
    for it in range(1, max_iter + 1):
        log_pi = [math.log(p) for p in pi]
        p_in = _softmax(xp, _component_terms(xp, sp, y_in, mu, sd, log_pi, not_edge))
        p_ed = _softmax(xp, _component_terms(xp, sp, y_ed, mu, sd, log_pi, is_edge))
        # Responsibility-weighted counts and moments per component (exact within bins).
        moments = to_host(xp.stack(p_in) @ m_in + xp.stack(p_ed) @ m_ed)  # (_N_COMP, 3)
        w0 = [float(moments[j, 0]) for j in range(_N_COMP)]
        new_mu, new_sd = [], []
        for k in range(_N_PURE):
            if w0[k] < 1e-9:
                new_mu.append(mu[k])
                new_sd.append(sd[k])
                continue
            w1 = float(moments[k, 1])
            w2 = float(moments[k, 2])
            m_k = w1 / w0[k]
            new_mu.append(m_k)
            new_sd.append(max(math.sqrt(max(w2 / w0[k] - m_k * m_k, 0.0)), sd_floor))
        inner = max(sum(w0[:_EDGE]), 1e-12)
        new_pi = [max(v / inner, 1e-6) for v in w0[:_EDGE]]
        new_pi.append(min(max(w0[_EDGE] / max(n_edge, 1), 1e-6), 1.0 - 1e-6))
        if not (new_mu[0] < new_mu[1] < new_mu[2]):
            order = sorted(range(_N_PURE), key=lambda i: new_mu[i])
            new_mu = [new_mu[i] for i in order]
            new_sd = [new_sd[i] for i in order]
            new_pi = [new_pi[i] for i in order] + new_pi[_N_PURE:]
        contrast = max(new_mu[2] - new_mu[0], 1e-12)
        change = max(
            max(abs(a - b) for a, b in zip(new_mu, mu)) / contrast,
            max(abs(a - b) for a, b in zip(new_sd, sd)) / contrast,
            max(abs(a - b) for a, b in zip(new_pi, pi)),
        )
        mu, sd, pi = new_mu, new_sd, new_pi
        if change < tol:
            return mu, sd, pi, it, True
    return mu, sd, pi, max_iter, False


def _poly_basis(xp, coords, order):
    """Monomials of total degree 1..order of the 3 coordinates: array (n, n_terms)."""
    x, y, z = coords
    terms = []
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                if i + j + k:
                    terms.append((x**i) * (y**j) * (z**k))
    return xp.stack(terms, axis=1)


def _fit_log_bias(xp, basis, resid, weights):
    """Weighted least squares of ``resid`` on [1, basis]; the fitted field, mean 0."""
    w = weights.astype(xp.float64)
    xb = basis.astype(xp.float64)
    r = resid.astype(xp.float64)
    sw = xp.sum(w)
    xm = xp.sum(xb * w[:, None], axis=0) / sw
    rm = xp.sum(r * w) / sw
    xc = xb - xm[None, :]
    xw = xc * w[:, None]
    a = xw.T @ xc
    rhs = xw.T @ (r - rm)
    n_terms = int(a.shape[0])
    ridge = 1e-8 * (xp.sum(xp.diagonal(a)) / n_terms) * xp.eye(n_terms, dtype=xp.float64)
    coef = xp.linalg.solve(a + ridge, rhs)
    fitted = xc @ coef
    # Geometric mean 1 over the brain: the class means carry the overall scale.
    return (fitted - xp.mean(fitted)).astype(xp.float32)


# ----------------------------------------------------------------------- public entry


def segment_tissues(
    t1w_brain: Any,
    brain_mask: Any = None,
    *,
    voxel_size: Any = None,
    n_iter: int = 2000,
    tol: float = 1e-4,
    mrf_beta: float = 0.5,
    mrf_iter: int = 5,
    bias_correction: bool = True,
    bias_order: int = 2,
    seed: int = 0,
) -> Segmentation:
    """Segment a brain-extracted T1-weighted image into CSF, GM and WM partial volumes.

    The model and algorithm (Gaussian mixture with partial-volume classes, polynomial
    bias field, mean-field Potts MRF: FSL FAST's approach) are described in the module
    docstring of :mod:`aslcal.masks.segment`.

    Parameters
    ----------
    t1w_brain : array of shape (x, y, z), intensity units
        Brain-extracted T1-weighted image (NumPy or CuPy), 0 outside the brain; CSF
        darker than GM, GM darker than WM.
    brain_mask : array of shape (x, y, z), optional
        Voxels to segment (non-zero = inside), on the same device as ``t1w_brain``.
        Default: the voxels of ``t1w_brain`` above 0, after checking that the image is
        brain-extracted (:func:`check_brain_extracted`); with a mask the check is
        skipped, since the mask says where the brain is.
    voxel_size : tuple of 3 float, mm, optional
        Voxel size: the MRF weighs neighbours by inverse distance, and the
        brain-extraction check measures a 12 mm rim.  Default 1 mm isotropic.
    n_iter : int, optional
        Most iterations of the final EM (on the intensity histogram: cheap).  Each bias
        round adds up to 50 more.  Default 2000.
    tol : float, optional
        Convergence of the EM: largest change in one iteration of a class mean or width
        (relative to the CSF-WM contrast) or of a class proportion.  The bias field has
        settled when its log changes by less than ``10 * tol`` between two updates (20
        updates at most).  Default 1e-4.
    mrf_beta : float, optional
        Weight of the spatial prior, nats per neighbour of the same tissue; 0 turns the
        MRF off.  Default 0.5.
    mrf_iter : int, optional
        Mean-field sweeps of the MRF.  Default 5.
    bias_correction : bool, optional
        Estimate and divide out a smooth multiplicative bias field.  Default True.
    bias_order : int, optional
        Total degree of the polynomial of the log bias field, 1 to 4.  Default 2.
    seed : int, optional
        Seed of the voxel sample the initial quantiles and k-means use (for masks of
        more than 200 000 voxels; the result barely depends on it).  Default 0.

    Returns
    -------
    Segmentation
        PV maps, labels, class statistics and bias field; arrays on the input's device.

    Raises
    ------
    InputError
        Not a 3-D image of real numbers; NaN or Inf in the brain; a mask of another
        shape; fewer than 1000 brain voxels; without a mask, an image that does not
        look brain-extracted; or intensities that do not separate into three classes
        (fewer than three distinct values, a class with less than 0.5 % of the brain,
        or two classes less than 2.5 pooled standard deviations apart).
    """
    t0 = time.perf_counter()
    img = as_numeric_array("t1w_brain", t1w_brain, ndim=3)
    if brain_mask is not None:
        mask_arr = as_numeric_array("brain_mask", brain_mask, ndim=3)
        xp = array_namespace(img, mask_arr)
        if tuple(mask_arr.shape) != tuple(img.shape):
            raise InputError(
                f"brain_mask: shape {tuple(mask_arr.shape)} does not match the shape "
                f"{tuple(img.shape)} of t1w_brain"
            )
    else:
        mask_arr = None
        xp = array_namespace(img)
    vs = _voxel_size(voxel_size)
    n_iter = _int_option("n_iter", n_iter, 1)
    mrf_iter = _int_option("mrf_iter", mrf_iter, 0)
    bias_order = _int_option("bias_order", bias_order, 1, 4)
    seed = _int_option("seed", seed, 0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
        raise InputError(f"tol={tol!r}: expected a positive number")
    if isinstance(mrf_beta, bool) or not isinstance(mrf_beta, (int, float)) or not (
        math.isfinite(mrf_beta) and mrf_beta >= 0
    ):
        raise InputError(f"mrf_beta={mrf_beta!r}: expected a non-negative number")
    mrf_beta, tol = float(mrf_beta), float(tol)

    img = img.astype(xp.float32)
    if mask_arr is None:
        if not bool(xp.all(xp.isfinite(img))):
            raise InputError(
                "t1w_brain: the image contains NaN or Inf; expected finite intensities "
                "(0 outside the brain)"
            )
        check_brain_extracted(img, voxel_size=vs, name="t1w_brain")
        mask = img > 0
    else:
        mask = mask_arr if mask_arr.dtype.kind == "b" else mask_arr != 0
        if not bool(xp.all(xp.isfinite(xp.where(mask, img, 0.0)))):
            raise InputError("t1w_brain: NaN or Inf inside brain_mask; expected finite intensities")
    n_vox = _count(xp, mask)
    if n_vox < _MIN_VOXELS:
        raise InputError(
            f"t1w_brain: the brain (mask) holds {n_vox} voxels; expected at least "
            f"{_MIN_VOXELS} to estimate three tissue classes"
        )

    # Crop to the bounding box of the mask: the work scales with the box, not the FOV.
    box = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = xp.nonzero(xp.any(mask, axis=other))[0]
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    box = tuple(box)
    mask_c = mask[box]
    shape_c = tuple(int(s) for s in mask_c.shape)
    flat_idx = xp.nonzero(mask_c.reshape(-1))[0]
    y_raw = img[box].reshape(-1)[flat_idx]

    # A (seeded) sample for the quantiles, k-means and the distinct-value count.
    if n_vox > _INIT_SAMPLE:
        pick = np.random.default_rng(seed).choice(n_vox, size=_INIT_SAMPLE, replace=False)
        sample = xp.sort(y_raw[xp.asarray(np.sort(pick))])
    else:
        sample = xp.sort(y_raw)
    n_distinct = 1 + _count(xp, sample[1:] > sample[:-1])
    if n_distinct < 3:
        raise InputError(
            f"t1w_brain: segmentation failed to separate three tissue classes: the brain "
            f"holds only {n_distinct} distinct intensit{'y' if n_distinct == 1 else 'ies'} "
            "(CSF, GM and WM need at least three); expected a T1-weighted brain image"
        )
    q_lo, q_hi = _quantiles(sample, [0.01, 0.99])
    # A few extreme voxels (a vessel, fat, a reconstruction spike) would stretch the
    # intensity histograms until the tissues share a handful of bins: intensities are
    # clamped to the 1-99 % range widened by its own width on both sides (classified as
    # the darkest or brightest tissue, as FAST does with hyperintensities).
    spread = q_hi - q_lo
    if spread > 0:
        y_raw = xp.clip(y_raw, q_lo - spread, q_hi + spread)
        sample = xp.clip(sample, q_lo - spread, q_hi + spread)
    scale = q_hi if q_hi > 0 else max(abs(q_lo), 1.0)
    y0 = y_raw * (1.0 / scale)
    sample = sample * (1.0 / scale)

    # Initialisation: quantiles -> 1-D k-means -> moments of homogeneous voxels per class.
    init = _quantiles(sample, [0.1, 0.45, 0.8])
    if not init[0] < init[1] < init[2]:
        lo_v, hi_v = float(sample[0]), float(sample[-1])
        init = [lo_v + (hi_v - lo_v) * f for f in (0.1, 0.5, 0.9)]
    mu = _kmeans_1d(xp, sample, init)
    if not (mu[0] < mu[1] < mu[2]):
        raise InputError(
            "t1w_brain: segmentation failed to separate three tissue classes: the "
            "intensities do not fall into three groups (k-means centres "
            + ", ".join(f"{m * scale:.4g}" for m in mu)
            + "); expected a T1-weighted brain image with CSF < GM < WM"
        )
    b1, b2 = 0.5 * (mu[0] + mu[1]), 0.5 * (mu[1] + mu[2])
    groups = (sample < b1, (sample >= b1) & (sample < b2), sample >= b2)
    sd = []
    for g, m in zip(groups, mu):
        n = max(_count(xp, g), 1)
        sd.append(math.sqrt(_fsum(xp, xp.where(g, (sample - m) ** 2, 0.0)) / n))
    sd_floor = 1e-3 * (mu[2] - mu[0])

    ndi = ndimage_for(mask_c)
    sp = special_for(y0)
    on_edge = (mask_c & ~ndi.binary_erosion(mask_c, border_value=0)).reshape(-1)[flat_idx]
    n_edge = _count(xp, on_edge)
    weights = tuple(min(vs) / v for v in vs)

    def scatter(vectors):
        """Per-voxel vectors -> (len(vectors), *shape_c) grid, 0 outside the mask."""
        g = xp.zeros((len(vectors),) + shape_c, dtype=xp.float32)
        gf = g.reshape(len(vectors), -1)
        for i, v in enumerate(vectors):
            gf[i][flat_idx] = v
        return g

    def start(y, mu, sd):
        """EM starting point from the intensity intervals around ``mu``.

        Means: the histogram mode in each interval (partial volume shifts a class's
        mean towards its neighbours, not its peak), else the mean of its most
        homogeneous voxels.  Widths: all three start at the narrowest width of the
        homogeneous voxels (the pure classes grow in EM if they must; starting wide
        lets the middle class swallow the partial-volume voxels for good).
        Proportions from the interval shares, 60 % pure and 40 % mixels.
        """
        mu_h, sd_h = _homogeneous_moments(xp, scatter([y])[0], mask_c, mu)
        modes = _histogram_modes(xp, ndi, y, mu)
        cand = [md if md is not None else (mh if mh is not None else m) for md, mh, m in zip(modes, mu_h, mu)]
        if cand[0] < cand[1] < cand[2]:
            mu = cand
        widths = [v for v in sd_h if v is not None] or list(sd)
        sd = [max(min(widths), sd_floor)] * _N_PURE
        c1, c2 = 0.5 * (mu[0] + mu[1]), 0.5 * (mu[1] + mu[2])
        n1, n2 = _count(xp, y < c1), _count(xp, y < c2)
        shares = (n1 / n_vox, (n2 - n1) / n_vox, (n_vox - n2) / n_vox)
        pi = [max(_PURE_PRIOR_INIT * v, 1e-6) for v in shares]
        pi += [(1.0 - _PURE_PRIOR_INIT) / len(_MIXELS)] * len(_MIXELS) + [0.5]
        return mu, sd, pi

    def neighbour_fractions(pv):
        nb = _neighbour_sum(xp, scatter(pv), weights).reshape(_N_PURE, -1)
        return nb[:, flat_idx]

    # EM on the histogram, alternating with the bias field.
    log_bias = xp.zeros_like(y0)
    y = y0
    if bias_correction:
        nyz = shape_c[1] * shape_c[2]
        ijk = (flat_idx // nyz, (flat_idx // shape_c[2]) % shape_c[1], flat_idx % shape_c[2])
        coords = [
            (c.astype(xp.float32) - 0.5 * (n - 1)) * (2.0 / max(n - 1, 1))
            for c, n in zip(ijk, shape_c)
        ]
        basis = _poly_basis(xp, coords, bias_order)
        del ijk, coords
    total_iter = 0
    n_bias = 0
    bias_settled = True
    mu, sd, pi = start(y, mu, sd)
    if bias_correction:
        # Rounds of a short warm-started EM and a bias update, until the field settles.
        bias_settled = False
        for _ in range(_MAX_BIAS_UPDATES):
            mu, sd, pi, used, _ok = _histogram_em(
                xp, sp, _histograms(xp, y, on_edge), mu, sd, pi, n_edge,
                max_iter=_BIAS_EM_ITER, tol=tol, sd_floor=sd_floor,
            )
            total_iter += used
            post, pv = _e_step(xp, sp, y, mu, sd, pi, on_edge)
            expected = pv[0] * mu[0] + pv[1] * mu[1] + pv[2] * mu[2]
            ok = y0 > 0
            resid = xp.where(ok, xp.log(xp.where(ok, y0, 1.0)) - xp.log(xp.maximum(expected, 1e-6)), 0.0)
            same = neighbour_fractions(pv)
            norm = 1.0 / (2.0 * sum(weights))
            wts = xp.zeros_like(y0)
            for k in (1, 2):  # GM and WM: CSF is too partial-volume prone to steer the field
                f = same[k] * norm
                wts = wts + post[k] * f * f * ((mu[k] / sd[k]) ** 2)
            wts = xp.where(ok, wts, 0.0)
            del post, pv, expected, same
            new_log_bias = _fit_log_bias(xp, basis, resid, wts)
            change = float(xp.max(xp.abs(new_log_bias - log_bias)))
            log_bias = new_log_bias
            y = y0 * xp.exp(-log_bias)
            n_bias += 1
            if change < 10.0 * tol:
                bias_settled = True
                break
        # Start afresh on the corrected intensities: a strong field widens the classes
        # of the first rounds, and a wide middle class is a trap the EM does not leave.
        mu, sd, pi = start(y, mu, sd)
    mu, sd, pi, used, em_ok = _histogram_em(
        xp, sp, _histograms(xp, y, on_edge), mu, sd, pi, n_edge,
        max_iter=n_iter, tol=tol, sd_floor=sd_floor,
    )
    total_iter += used
    converged = em_ok and bias_settled

    # Per-voxel posteriors, then the MRF sweeps with the parameters fixed.
    post, pv = _e_step(xp, sp, y, mu, sd, pi, on_edge)
    if mrf_beta > 0:
        for _ in range(mrf_iter):
            post, pv = _e_step(xp, sp, y, mu, sd, pi, on_edge, nb=neighbour_fractions(pv), beta=mrf_beta)
    del post

    # Three separable classes?
    pv_means = [_fsum(xp, pv[k]) / n_vox for k in range(_N_PURE)]
    means_txt = ", ".join(f"{t.upper()} {m * scale:.4g}" for t, m in zip(TISSUES, mu))
    for k, name in enumerate(TISSUES):
        if pv_means[k] < _MIN_CLASS_FRACTION:
            raise InputError(
                f"t1w_brain: segmentation failed to separate three tissue classes: "
                f"{name.upper()} holds {100 * pv_means[k]:.2f} % of the brain, at least "
                f"{100 * _MIN_CLASS_FRACTION:.1f} % expected (class means {means_txt}); "
                "expected a T1-weighted brain image with CSF < GM < WM"
            )
    for a, b in _MIXELS:
        sep = (mu[b] - mu[a]) / math.sqrt(0.5 * (sd[a] ** 2 + sd[b] ** 2))
        if sep < _MIN_SEPARATION:
            raise InputError(
                f"t1w_brain: segmentation failed to separate three tissue classes: the "
                f"{TISSUES[a].upper()} and {TISSUES[b].upper()} means are {sep:.2f} pooled "
                f"standard deviations apart, at least {_MIN_SEPARATION} expected (class means "
                f"{means_txt}); expected a T1-weighted brain image with CSF < GM < WM"
            )

    # Outputs on the full grid.
    shape = tuple(int(s) for s in img.shape)
    pv_c = scatter([xp.clip(p, 0.0, 1.0) for p in pv])
    tot = xp.sum(pv_c, axis=0)
    pv_c = pv_c * xp.where(mask_c, 1.0 / xp.where(mask_c, tot, 1.0), 0.0)[None]
    pv_out = {}
    for k, name in enumerate(TISSUES):
        full = xp.zeros(shape, dtype=xp.float32)
        full[box] = pv_c[k]
        pv_out[name] = full
    labels = xp.zeros(shape, dtype=xp.uint8)
    labels[box] = xp.where(mask_c, (xp.argmax(pv_c, axis=0) + 1).astype(xp.uint8), 0).astype(xp.uint8)
    del pv_c
    bias_field = None
    if bias_correction:
        bias_field = xp.ones(shape, dtype=xp.float32)
        sub = xp.ones(shape_c, dtype=xp.float32)
        sub.reshape(-1)[flat_idx] = xp.exp(log_bias)
        bias_field[box] = sub
    return Segmentation(
        pv=pv_out,
        labels=labels,
        mask=mask,
        means={t: mu[k] * scale for k, t in enumerate(TISSUES)},
        stds={t: sd[k] * scale for k, t in enumerate(TISSUES)},
        fractions={t: pv_means[k] for k, t in enumerate(TISSUES)},
        bias_field=bias_field,
        n_iter=total_iter,
        n_bias_updates=n_bias,
        converged=converged,
        mrf_beta=mrf_beta,
        n_voxels=n_vox,
        elapsed_s=time.perf_counter() - t0,
    )
