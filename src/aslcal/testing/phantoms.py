"""Deterministic brain phantom and ASL calibration signal generators.

:func:`make_phantom` builds a realistic-looking head from a seed: scalp, skull, a
CSF layer, a folded cortex (grey-matter ribbon around sulci and the
interhemispheric fissure), white matter, deep grey matter and two C-shaped lateral
ventricles.  The anatomy is analytic (:mod:`aslcal.testing._anatomy`); it is
rasterised once on a fine grid aligned with the structural image, and every other
map is derived from that one label volume:

* **Structural grid** (default 1.7 mm isotropic, RAS storage, ``det > 0``): the
  head sits in a slightly different pose than in the ASL session (a few degrees of
  rotation and a few mm of shift about the brain centre, drawn from the seed).
  Labels are evaluated on a grid ``struct_oversample`` times finer in each axis;
  the structural partial-volume maps are the fraction of each label in each
  structural voxel, the structural ``labels`` the majority label.
* **ASL grid** (default 64 x 64 x 24 of 3.4 x 3.4 x 5 mm, LAS storage,
  ``det < 0``): each ASL voxel is supersampled by a regular grid of points spaced
  no more than one fine-grid step apart; every point is mapped ASL voxel ->
  ASL-session world -> (head pose) -> structural-session world -> fine-grid index
  and takes the label of the nearest fine voxel.  The partial-volume fraction of a
  tissue is the fraction of points with its label.  The ASL PV maps are therefore
  exactly the fine label field seen through the ASL->structural transform that
  :attr:`StructuralPhantom.asl2struct` records (as an FSL FLIRT matrix).

The head frame is the world frame of the ASL session (RAS, millimetres).

Signal generators (each returns ``(data, truth)``; see their docstrings):
:func:`longtr_calibration`, :func:`body_coil_reference`, :func:`satrecov_series`,
:func:`look_locker_series`, :func:`perfusion_image`; :func:`write_dataset` writes a
complete demo data set.  The signal of a voxel is the partial-volume-weighted sum
over the tissues ``gm, wm, csf, nonbrain`` of each tissue's signal, times the
receive-coil sensitivity.

Noise
-----
``snr=None`` (and ``sigma=None``) gives noise-free data.  Otherwise the noise
standard deviation is

    sigma = S_ref / snr,   S_ref = M0_gm * mean_GM(s)

where ``M0_gm = pc_gm * M0a`` is the fully relaxed grey-matter magnetisation and
``mean_GM(s) = sum(pv_gm * s) / sum(pv_gm)`` is the GM-partial-volume-weighted mean
of the receive sensitivity of the coil used for that image (1 for the body-coil
reference).  That is: ``snr`` is the SNR of a fully relaxed grey-matter voxel.
The same sigma definition holds for every M0-like series (long-TR, saturation
recovery, Look-Locker at any flip angle), so a Look-Locker series at ``snr=50``
has the same noise level as a long-TR image at ``snr=50``.  The one exception is
:func:`perfusion_image`, where ``S_ref`` is the noise-free mean grey-matter
*perfusion* signal (``cbf_gm * M0a * alpha / 6000 * mean_GM(s)``).  ``sigma=``
gives the standard deviation directly (signal units) instead.  ``noise="gaussian"``
adds N(0, sigma^2); ``noise="rician"`` returns ``|S + n1 + i n2|`` with n1, n2 ~
N(0, sigma^2) (magnitude images; never negative).  The random generator is
``numpy.random.default_rng((seed, k))`` with ``seed`` the phantom's seed (or the
``seed=`` argument) and ``k`` a fixed number per generator; no global state.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from ..physics.tissues import TissueParams, tissue_table
from ._anatomy import LABELS, N_LABELS, Anatomy, labels_at, make_anatomy

__all__ = [
    "LABELS",
    "TISSUES",
    "DEFAULT_LOOK_LOCKER",
    "DEFAULT_SATRECOV_TIS",
    "Phantom",
    "StructuralPhantom",
    "make_phantom",
    "flirt_matrix",
    "flirt_scaling",
    "longtr_calibration",
    "body_coil_reference",
    "satrecov_series",
    "look_locker_series",
    "perfusion_image",
    "write_dataset",
]

#: Tissues that carry signal, in the order of the partial-volume maps.
TISSUES: tuple[str, ...] = ("gm", "wm", "csf", "nonbrain")

#: Look-Locker settings used by :func:`write_dataset` (the validation set of
#: calibration.md section 7.1: dt 0.3 s, TI1 0.1 s, FA 35 deg, LFA 11.7 deg, 3 + 1 phases).
DEFAULT_LOOK_LOCKER: Mapping[str, Any] = {
    "ti1": 0.1,
    "dt": 0.3,
    "n_ti": 12,
    "fa": 35.0,
    "lfa": 11.7,
    "nphases": 3,
    "repeats": 1,
}

#: Saturation-recovery TIs (s) used by :func:`write_dataset`.
DEFAULT_SATRECOV_TIS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.5)

#: Default non-brain (scalp: fat and muscle) relaxation parameters; pc is undefined.
NONBRAIN = TissueParams(t1=0.6, t2=60.0, t2star=30.0, pc=None)

# Fixed keys that separate the random streams of the phantom's components and of
# each generator's noise: adding a component never changes the others.
_STREAM = {
    "anatomy": 1,
    "pose": 2,
    "sensitivity": 3,
    "fa_scale": 4,
    "struct_noise": 5,
    "struct_bias": 6,
    "longtr_calibration": 101,
    "body_coil_reference": 102,
    "satrecov_series": 103,
    "look_locker_series": 104,
    "perfusion_image": 105,
}

# T1-weighted (MPRAGE-like) intensities per label, arbitrary units:
# background, csf, gm, wm, ventricle, nonbrain (scalp fat/muscle), bone.
_T1W_INTENSITY = np.array([0.0, 250.0, 620.0, 950.0, 250.0, 820.0, 40.0])


# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StructuralPhantom:
    """The high-resolution T1-weighted image of the phantom and its segmentation.

    Attributes
    ----------
    shape : tuple of int
        Grid shape (x, y, z).
    voxel_size : tuple of float, mm
    affine : ndarray of shape (4, 4)
        Voxel index -> world (RAS, mm) of the structural session.  RAS storage
        (``det > 0``: FSL flips x in its scaled-voxel coordinates).
    t1w : ndarray of shape (x, y, z), float32
        T1-weighted-looking image with scalp and skull: WM > GM > CSF, bright scalp,
        dark skull, a mild smooth bias field and Rician noise (sigma 1 % of WM).
    t1w_brain : ndarray of shape (x, y, z), float32
        ``t1w`` inside ``brain_mask``, 0 elsewhere (as from a brain extraction).
    pv : dict of str to ndarray of shape (x, y, z), float32
        Fractions of ``gm``, ``wm``, ``csf`` (ventricles included) and ``nonbrain``
        (scalp) in each structural voxel (sum <= 1; the rest is skull or air).
    labels : ndarray of shape (x, y, z), uint8
        Majority label of each voxel, values of :data:`LABELS`.
    brain_mask : ndarray of shape (x, y, z), bool
        ``pv["gm"] + pv["wm"] + pv["csf"] >= 0.5`` (brain and the CSF around it).
    asl2struct : ndarray of shape (4, 4)
        The ASL -> structural transform as an FSL FLIRT matrix (source = the ASL
        image, reference = this image); see :func:`flirt_matrix`.
    world_asl_to_struct : ndarray of shape (4, 4)
        The rigid head motion between the sessions: ASL-session world (mm) ->
        structural-session world (mm) of the same anatomical point.
    """

    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    t1w: np.ndarray = field(repr=False)
    t1w_brain: np.ndarray = field(repr=False)
    pv: dict[str, np.ndarray] = field(repr=False)
    labels: np.ndarray = field(repr=False)
    brain_mask: np.ndarray = field(repr=False)
    asl2struct: np.ndarray = field(repr=False)
    world_asl_to_struct: np.ndarray = field(repr=False)


@dataclass(frozen=True, eq=False)
class Phantom:
    """A deterministic brain phantom on the ASL grid (see :func:`make_phantom`).

    Attributes
    ----------
    seed : int
    field_strength : float, tesla
    shape : tuple of int
        ASL grid shape (x, y, z).
    voxel_size : tuple of float, mm
    affine : ndarray of shape (4, 4)
        ASL voxel index -> world (RAS, mm); LAS storage (``det < 0``), grid centre
        at the world origin.
    pv : dict of str to ndarray of shape (x, y, z), float64
        Partial-volume fractions of ``gm``, ``wm``, ``csf`` (ventricles included)
        and ``nonbrain`` (scalp), each in [0, 1], sum <= 1 (the rest is skull or
        air, which give no signal).
    brain_mask : ndarray of shape (x, y, z), bool
        ``pv["gm"] + pv["wm"] + pv["csf"] >= 0.5``.
    head_mask : ndarray of shape (x, y, z), bool
        ``sum of all four pv maps >= 0.5`` (every voxel that gives signal).
    ventricle_pv : ndarray of shape (x, y, z), float64
        Fraction of lateral-ventricle CSF (part of ``pv["csf"]``).
    ventricle_mask : ndarray of shape (x, y, z), bool
        ``ventricle_pv >= 0.9`` (the reference region of calibration.md section 8).
    sulcal_csf_mask : ndarray of shape (x, y, z), bool
        ``pv["csf"] - ventricle_pv >= 0.5``: CSF that is not ventricle (sulci,
        fissure, the layer between brain and skull).
    tissues : dict of str to TissueParams
        ``csf``, ``gm``, ``wm``, ``blood`` from the tissue table at
        ``field_strength``, plus ``nonbrain`` (T1 s, T2 ms, T2* ms; pc None).
    m0_tissue : dict of str to float, signal units
        Equilibrium magnetisation of each tissue in :data:`TISSUES`:
        ``pc * m0a`` for gm/wm/csf, its own value for nonbrain.
    m0a : float, signal units
        True equilibrium magnetisation of arterial blood.
    sensitivity : ndarray of shape (x, y, z), float64
        Smooth receive-coil sensitivity, in (0.7, 1.3), ~1 at the brain centre.
    fa_scale : ndarray of shape (x, y, z), float64
        Smooth transmit field g (true flip angle = g * nominal), in (0.85, 1.15),
        highest at the centre.
    cbf : ndarray of shape (x, y, z), float64, ml/100g/min
        ``cbf_gm * pv["gm"] + cbf_wm * pv["wm"]`` (0 outside the brain).
    cbf_gm, cbf_wm : float, ml/100g/min
        Perfusion of pure grey and white matter.
    structural : StructuralPhantom
    anatomy : object
        The analytic geometry (private type; for provenance and re-rasterising).
    """

    seed: int
    field_strength: float
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    affine: np.ndarray
    pv: dict[str, np.ndarray] = field(repr=False)
    brain_mask: np.ndarray = field(repr=False)
    head_mask: np.ndarray = field(repr=False)
    ventricle_pv: np.ndarray = field(repr=False)
    ventricle_mask: np.ndarray = field(repr=False)
    sulcal_csf_mask: np.ndarray = field(repr=False)
    tissues: dict[str, TissueParams]
    m0_tissue: dict[str, float]
    m0a: float
    sensitivity: np.ndarray = field(repr=False)
    fa_scale: np.ndarray = field(repr=False)
    cbf: np.ndarray = field(repr=False)
    cbf_gm: float
    cbf_wm: float
    structural: StructuralPhantom = field(repr=False)
    anatomy: Anatomy = field(repr=False)


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _triple(name: str, value: Any, *, integer: bool) -> tuple:
    try:
        items = tuple(value)
    except TypeError:
        raise InputError(f"{name}={value!r}: expected 3 numbers (x, y, z)") from None
    if len(items) != 3:
        raise InputError(f"{name}={value!r}: expected 3 numbers (x, y, z), got {len(items)}")
    out = []
    for v in items:
        if integer:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name}={value!r}: expected 3 positive integers")
            out.append(int(v))
        else:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise InputError(f"{name}={value!r}: expected 3 positive numbers (mm)") from None
            if not (math.isfinite(f) and f > 0):
                raise InputError(f"{name}={value!r}: expected 3 positive numbers (mm)")
            out.append(f)
    return tuple(out)


def _positive(name: str, value: Any, unit: str, *, allow_zero: bool = False) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: expected a number ({unit})") from None
    ok = math.isfinite(f) and (f >= 0 if allow_zero else f > 0)
    if not ok:
        what = "a non-negative" if allow_zero else "a positive"
        raise InputError(f"{name}={value!r}: expected {what} finite number ({unit})")
    return f


def _count(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def _seed(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{name}={value!r}: expected a non-negative integer")
    return int(value)


def _dtype(value: Any) -> np.dtype:
    try:
        dt = np.dtype(value)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"dtype={value!r}: expected float32 or float64")
    return dt


def _noise_kind(value: Any) -> str:
    if value not in ("rician", "gaussian"):
        raise InputError(f"noise={value!r}: expected 'rician' or 'gaussian'")
    return value


def _check_phantom(ph: Any) -> None:
    if not isinstance(ph, Phantom):
        raise InputError(f"ph: expected a Phantom from make_phantom(), got {type(ph).__name__}")


def _map_or_scalar(name: str, value: Any, shape: tuple, unit: str) -> float | np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        if not math.isfinite(float(arr)):
            raise InputError(f"{name}={value!r}: expected a finite number ({unit}) or a map")
        return float(arr)
    if arr.shape != tuple(shape):
        raise InputError(
            f"{name}: map of shape {arr.shape} does not match the phantom grid {tuple(shape)}"
        )
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: map contains NaN or Inf; expected finite values ({unit})")
    return arr


# --------------------------------------------------------------------------------------
# Geometry: affines, FLIRT matrices, pose
# --------------------------------------------------------------------------------------


def _grid_affine(shape, voxel_size, *, flip_x: bool, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Axis-aligned affine with the grid centre at ``centre`` (LAS if flip_x else RAS)."""
    aff = np.eye(4)
    signs = (-1.0 if flip_x else 1.0, 1.0, 1.0)
    for ax in range(3):
        aff[ax, ax] = signs[ax] * voxel_size[ax]
        aff[ax, 3] = centre[ax] - aff[ax, ax] * (shape[ax] - 1) / 2.0
    return aff


def flirt_scaling(affine: Any, shape: Any) -> np.ndarray:
    """FSL's voxel index -> "scaled-voxel" coordinate matrix of one image.

    Parameters
    ----------
    affine : array_like of shape (4, 4)
        The image's voxel -> world (qform/sform) matrix, mm.
    shape : sequence of int
        The image's grid shape (at least 3 entries; only x is used).

    Returns
    -------
    ndarray of shape (4, 4)
        ``S`` with scaled = S @ [i, j, k, 1]: ``diag(dx, dy, dz, 1)`` where
        ``d = |column| of affine[:3, :3]``; when ``det(affine[:3, :3]) > 0``
        ("neurological" storage) FSL first flips x, so that
        ``x_scaled = (nx - 1 - i) * dx``.
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise InputError(f"affine: expected a finite 4x4 matrix, got shape {aff.shape}")
    nx = int(tuple(shape)[0])
    vox = np.linalg.norm(aff[:3, :3], axis=0)
    s = np.diag([vox[0], vox[1], vox[2], 1.0])
    if np.linalg.det(aff[:3, :3]) > 0:
        s[0, 0] = -vox[0]
        s[0, 3] = (nx - 1) * vox[0]
    return s


def flirt_matrix(
    src_affine: Any,
    src_shape: Any,
    ref_affine: Any,
    ref_shape: Any,
    world_src_to_ref: Any = None,
) -> np.ndarray:
    """FSL FLIRT matrix that maps a source image onto a reference image.

    FLIRT matrices act on "scaled-voxel" coordinates (see :func:`flirt_scaling`):
    voxel index times voxel size, with x flipped first for images whose affine has
    a positive determinant.  The matrix is

        mat = S_ref @ inv(A_ref) @ W @ A_src @ inv(S_src)

    with ``A`` the voxel -> world affines, ``S`` the scaling matrices and ``W`` the
    world transform.

    Parameters
    ----------
    src_affine, ref_affine : array_like of shape (4, 4)
        Voxel -> world matrices (mm) of the source and reference images.
    src_shape, ref_shape : sequence of int
        Grid shapes (x, y, z, ...); only nx matters (for the x flip).
    world_src_to_ref : array_like of shape (4, 4), optional
        Maps the world coordinates (mm) of an anatomical point in the source
        image's session to its world coordinates in the reference image's session
        (for example the head motion between two acquisitions).  Default identity
        (both images share one world frame).

    Returns
    -------
    ndarray of shape (4, 4)
        The FLIRT matrix (source scaled-voxel mm -> reference scaled-voxel mm), as
        ``flirt -omat`` / ``asl_reg`` write it.
    """
    w = np.eye(4) if world_src_to_ref is None else np.asarray(world_src_to_ref, dtype=np.float64)
    if w.shape != (4, 4) or not np.isfinite(w).all():
        raise InputError(f"world_src_to_ref: expected a finite 4x4 matrix, got shape {w.shape}")
    a_src = np.asarray(src_affine, dtype=np.float64)
    a_ref = np.asarray(ref_affine, dtype=np.float64)
    s_src = flirt_scaling(a_src, src_shape)
    s_ref = flirt_scaling(a_ref, ref_shape)
    return s_ref @ np.linalg.inv(a_ref) @ w @ a_src @ np.linalg.inv(s_src)


def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_pose(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """Small rigid motion about ``centre``: 1.5-4 deg per axis, 1-4 mm per axis."""
    angles = rng.uniform(1.5, 4.0, 3) * rng.choice([-1.0, 1.0], 3)
    shift = rng.uniform(1.0, 4.0, 3) * rng.choice([-1.0, 1.0], 3)
    m = np.eye(4)
    m[:3, :3] = _rotation(angles)
    m[:3, 3] = centre + shift - m[:3, :3] @ centre
    return m


def _check_pose(value: Any) -> np.ndarray | str:
    if isinstance(value, str):
        if value not in ("random", "identity"):
            raise InputError(
                f"struct_pose={value!r}: expected 'random', 'identity' or a 4x4 matrix"
            )
        return value
    m = np.asarray(value, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise InputError(f"struct_pose: expected a finite 4x4 rigid matrix, got shape {m.shape}")
    r = m[:3, :3]
    if not (np.allclose(r @ r.T, np.eye(3), atol=1e-6) and np.linalg.det(r) > 0
            and np.allclose(m[3], [0, 0, 0, 1])):
        raise InputError("struct_pose: expected a rigid transform (rotation + shift)")
    return m


# --------------------------------------------------------------------------------------
# Rasterisation
# --------------------------------------------------------------------------------------


# Label counts are accumulated bit-packed: label L adds 1 << (_PACK_BITS * L) to a
# uint64, so one gather and one add count all labels at once (7 fields of 9 bits).
_PACK_BITS = 9
_PACK_MAX = (1 << _PACK_BITS) - 1
_PACK_LUT = np.array([1 << (_PACK_BITS * lab) for lab in range(N_LABELS)], dtype=np.uint64)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """(…) uint64 packed counts -> (N_LABELS, …) int64 counts."""
    shifts = (np.arange(N_LABELS, dtype=np.uint64) * np.uint64(_PACK_BITS)).reshape(
        (N_LABELS,) + (1,) * packed.ndim
    )
    return ((packed[None] >> shifts) & np.uint64(_PACK_MAX)).astype(np.int64)


def _rasterise(anat: Anatomy, index_to_head: np.ndarray, shape, os_: int):
    """Labels on the fine grid (``os_`` times finer than ``shape``) and per-voxel counts.

    Returns ``fine`` (int8, shape * os_) and ``counts`` (N_LABELS, *shape) of the
    os_**3 fine labels in each voxel.
    """
    nx, ny, nz = shape
    fx, fy, fz = nx * os_, ny * os_, nz * os_
    fine = np.empty((fx, fy, fz), dtype=np.int8)
    packed = np.empty((nx, ny, nz), dtype=np.uint64)
    i = np.arange(fx, dtype=np.float64)[:, None, None]
    j = np.arange(fy, dtype=np.float64)[None, :, None]
    m = index_to_head
    planes = os_ * max(1, (1 << 19) // (fx * fy * os_))
    for k0 in range(0, fz, planes):
        k = np.arange(k0, min(fz, k0 + planes), dtype=np.float64)[None, None, :]
        xs = m[0, 0] * i + m[0, 1] * j + m[0, 2] * k + m[0, 3]
        ys = m[1, 0] * i + m[1, 1] * j + m[1, 2] * k + m[1, 3]
        zs = m[2, 0] * i + m[2, 1] * j + m[2, 2] * k + m[2, 3]
        lab = labels_at(anat, xs, ys, zs)
        kp = lab.shape[2]
        fine[:, :, k0 : k0 + kp] = lab
        e = _PACK_LUT[lab].reshape(fx, fy, kp // os_, os_).sum(axis=3, dtype=np.uint64)
        e = e.reshape(fx, ny, os_, kp // os_).sum(axis=2, dtype=np.uint64)
        e = e.reshape(nx, os_, ny, kp // os_).sum(axis=1, dtype=np.uint64)
        packed[:, :, k0 // os_ : (k0 + kp) // os_] = e
    return fine, _unpack(packed)


def _supersample_counts(
    fine: np.ndarray, asl_to_fine: np.ndarray, shape, n_sub, candidates: np.ndarray
) -> np.ndarray:
    """Label counts (N_LABELS, n_vox) over the n_sub supersampling points of each voxel.

    Only the flat voxel indices in ``candidates`` are sampled; every other voxel is
    counted as background (air).  Points outside the fine grid are background.
    """
    nvox = int(np.prod(shape))
    fx, fy, fz = fine.shape
    padded = np.zeros((fx + 2, fy + 2, fz + 2), dtype=np.int8)  # border of air
    padded[1:-1, 1:-1, 1:-1] = fine
    flat = padded.reshape(-1)
    ii, jj, kk = (a.astype(np.float64) for a in np.unravel_index(candidates, shape))
    m = asl_to_fine
    base = [m[r, 0] * ii + m[r, 1] * jj + m[r, 2] * kk + m[r, 3] + 1.0 for r in range(3)]
    offsets = [((np.arange(n) + 0.5) / n - 0.5) for n in n_sub]
    counts = np.zeros((N_LABELS, candidates.size), dtype=np.int64)
    acc = np.zeros(candidates.size, dtype=np.uint64)
    n_acc = 0
    upper = (fx + 1, fy + 1, fz + 1)
    for dx in offsets[0]:
        for dy in offsets[1]:
            for dz in offsets[2]:
                d = m[:3, :3] @ np.array([dx, dy, dz])
                idx = np.zeros(candidates.size, dtype=np.intp)
                for ax, stride in ((0, (fy + 2) * (fz + 2)), (1, fz + 2), (2, 1)):
                    v = np.rint(base[ax] + d[ax])
                    np.clip(v, 0, upper[ax], out=v)
                    idx += v.astype(np.intp) * stride
                acc += _PACK_LUT[flat[idx]]
                n_acc += 1
                if n_acc == _PACK_MAX:
                    counts += _unpack(acc)
                    acc[:] = 0
                    n_acc = 0
    counts += _unpack(acc)
    out = np.zeros((N_LABELS, nvox), dtype=np.int64)
    out[LABELS["background"]] = int(np.prod(n_sub))
    out[:, candidates] = counts
    return out


def _world_points(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    i, j, k = (a.astype(np.float64) for a in np.indices(shape))
    return tuple(
        affine[r, 0] * i + affine[r, 1] * j + affine[r, 2] * k + affine[r, 3] for r in range(3)
    )


def _sensitivity(rng: np.random.Generator, anat: Anatomy, x, y, z) -> np.ndarray:
    """Receive field of a ring of coil elements, ~1 at the brain centre, in (0.7, 1.3)."""
    c = anat.centre
    reach = anat.axes + anat.outer_mm + 35.0
    n = 8
    ang = 2.0 * np.pi * (np.arange(n) + rng.uniform(-0.2, 0.2, n)) / n
    cz = rng.uniform(-0.2, 0.5, n) * reach[2]
    coils = np.stack(
        [c[0] + reach[0] * np.cos(ang), c[1] + reach[1] * np.sin(ang), c[2] + cz], axis=1
    )
    weights = rng.uniform(0.8, 1.2, n)
    width = 80.0

    def field_at(px, py, pz):
        f = 0.0
        for (qx, qy, qz), w in zip(coils, weights):
            f = f + w * np.exp(-((px - qx) ** 2 + (py - qy) ** 2 + (pz - qz) ** 2) / (2 * width**2))
        return f

    raw = field_at(x, y, z) / field_at(*c)
    return 1.0 + 0.3 * np.tanh((raw - 1.0) / 0.3)


def _fa_scale(rng: np.random.Generator, anat: Anatomy, x, y, z) -> np.ndarray:
    """Transmit field: centre-bright, smooth, with a small random tilt, in (0.85, 1.15)."""
    c = anat.centre
    reach = anat.axes + anat.outer_mm
    rx, ry, rz = (x - c[0]) / reach[0], (y - c[1]) / reach[1], (z - c[2]) / reach[2]
    tilt = rng.normal(0.0, 1.0, 3)
    tilt *= rng.uniform(0.02, 0.05) / np.linalg.norm(tilt)
    raw = 1.07 - 0.2 * (rx * rx + ry * ry + rz * rz) + tilt[0] * rx + tilt[1] * ry + tilt[2] * rz
    raw = raw + rng.uniform(-0.02, 0.02)
    return 1.0 + 0.15 * np.tanh((raw - 1.0) / 0.15)


def make_phantom(
    *,
    shape: tuple[int, int, int] = (64, 64, 24),
    voxel_size: tuple[float, float, float] = (3.4, 3.4, 5.0),
    seed: int = 0,
    struct_voxel_size: tuple[float, float, float] = (1.7, 1.7, 1.7),
    struct_fov: tuple[float, float, float] = (184.0, 224.0, 176.0),
    struct_oversample: int = 2,
    struct_pose: Any = "random",
    field_strength: float = 3.0,
    m0a: float = 1200.0,
    m0_nonbrain: float | None = None,
    nonbrain: TissueParams | None = None,
    cbf_gm: float = 60.0,
    cbf_wm: float = 20.0,
    cortex_mm: float = 3.0,
) -> Phantom:
    """Build a deterministic brain phantom (see the module docstring for the method).

    Parameters
    ----------
    shape : tuple of 3 int, optional
        ASL grid (x, y, z).  Default (64, 64, 24).
    voxel_size : tuple of 3 float, mm, optional
        ASL voxel size.  Default (3.4, 3.4, 5.0).  The grid is centred on the
        world origin; the brain centre is within 1.5 mm of it.
    seed : int, optional
        Seed of everything random (anatomy, pose, coil fields, and the default noise
        seed of the generators).  Each component draws from its own stream
        ``default_rng((seed, k))``.
    struct_voxel_size : tuple of 3 float, mm, optional
        Structural voxel size.  Default 1.7 mm isotropic.
    struct_fov : tuple of 3 float, mm, optional
        Structural field of view, centred on the world origin; the grid has
        ``round(fov / voxel)`` voxels.  The default holds the whole head, scalp
        included, in any pose the seed draws.  Anything outside it is air, for the
        ASL maps too (they are sampled from the structural label field).
    struct_oversample : int, optional
        The label function is evaluated on a grid this many times finer than the
        structural grid in each axis (1..4; default 2: 0.85 mm).
    struct_pose : "random", "identity" or array of shape (4, 4), optional
        Head motion between the ASL and the structural session (ASL-session world
        -> structural-session world, mm).  "random": 1.5-4 deg about each axis and
        1-4 mm along each axis, about the brain centre, from the seed.
    field_strength : float, tesla, optional
        Selects the tissue table (:func:`aslcal.physics.tissues.tissue_table`).
    m0a : float, signal units, optional
        True arterial-blood M0.  Tissue M0 = pc * m0a.  Default 1200.
    m0_nonbrain : float, signal units, optional
        M0 of the scalp.  Default 0.75 * m0a.
    nonbrain : TissueParams, optional
        Relaxation of the scalp; default T1 0.6 s, T2 60 ms, T2* 30 ms.
    cbf_gm, cbf_wm : float, ml/100g/min, optional
        True perfusion of pure grey and white matter.  Default 60 and 20.
    cortex_mm : float, mm, optional
        Cortical thickness (distance from CSF within which parenchyma is GM).

    Returns
    -------
    Phantom

    Notes
    -----
    The default phantom takes 1-2 s on one CPU core, mostly to evaluate the label
    function at ~12 million fine-grid points.  ``struct_oversample=1`` or a coarser
    ``struct_voxel_size`` make it several times faster (0.3 s for a 2.5 mm
    structural without oversampling).
    """
    shape = _triple("shape", shape, integer=True)
    voxel_size = _triple("voxel_size", voxel_size, integer=False)
    seed = _seed("seed", seed)
    svox = _triple("struct_voxel_size", struct_voxel_size, integer=False)
    sfov = _triple("struct_fov", struct_fov, integer=False)
    os_ = _count("struct_oversample", struct_oversample)
    if os_ > 4:
        raise InputError(f"struct_oversample={struct_oversample!r}: expected an integer in 1..4")
    pose = _check_pose(struct_pose)
    m0a = _positive("m0a", m0a, "signal units")
    if m0_nonbrain is None:
        m0_nb = 0.75 * m0a
    else:
        m0_nb = _positive("m0_nonbrain", m0_nonbrain, "signal units")
    nb = NONBRAIN if nonbrain is None else nonbrain
    if not isinstance(nb, TissueParams):
        raise InputError(f"nonbrain={nonbrain!r}: expected a TissueParams")
    cbf_gm = _positive("cbf_gm", cbf_gm, "ml/100g/min", allow_zero=True)
    cbf_wm = _positive("cbf_wm", cbf_wm, "ml/100g/min", allow_zero=True)
    cortex_mm = _positive("cortex_mm", cortex_mm, "mm")
    table = tissue_table(field_strength)
    missing = [t for t in ("gm", "wm", "csf") if t not in table]
    if missing:
        raise InputError(f"field_strength={field_strength}: tissue table lacks {missing}")

    def rng_for(name: str) -> np.random.Generator:
        return np.random.default_rng((seed, _STREAM[name]))

    anat = make_anatomy(rng_for("anatomy"), cortex_mm=cortex_mm)

    # --- geometry --------------------------------------------------------------------
    asl_affine = _grid_affine(shape, voxel_size, flip_x=True)
    sshape = tuple(max(1, int(round(f / v))) for f, v in zip(sfov, svox))
    struct_affine = _grid_affine(sshape, svox, flip_x=False)
    if isinstance(pose, str):
        w = _random_pose(rng_for("pose"), anat.centre) if pose == "random" else np.eye(4)
    else:
        w = pose
    # fine index f -> structural index v = (f + 0.5) / os - 0.5
    sub = np.diag([1.0 / os_] * 3 + [1.0])
    sub[:3, 3] = 0.5 / os_ - 0.5
    fine_to_struct_world = struct_affine @ sub

    # --- rasterise the label function on the fine structural grid ----------------------
    fine, counts = _rasterise(anat, np.linalg.inv(w) @ fine_to_struct_world, sshape, os_)

    # --- structural maps -----------------------------------------------------------------
    frac = counts.astype(np.float32) * np.float32(1.0 / os_**3)
    spv = {
        "gm": frac[LABELS["gm"]],
        "wm": frac[LABELS["wm"]],
        "csf": frac[LABELS["csf"]] + frac[LABELS["ventricle"]],
        "nonbrain": frac[LABELS["nonbrain"]],
    }
    slabels = np.argmax(counts, axis=0).astype(np.uint8)
    sbrain = (spv["gm"] + spv["wm"] + spv["csf"]) >= 0.5
    clean_t1w = np.tensordot(_T1W_INTENSITY.astype(np.float32), frac, axes=1)
    # Mild linear bias field (head frame), evaluated separably on the index axes.
    tilt = rng_for("struct_bias").normal(0.0, 0.06, 3) / np.array([90.0, 110.0, 90.0])
    m = np.linalg.inv(w) @ struct_affine
    coef = tilt @ m[:3, :3]  # bias = 1 + tilt . (head - centre), linear in the index
    const = 1.0 + tilt @ (m[:3, 3] - anat.centre)
    bias = (
        const
        + coef[0] * np.arange(sshape[0])[:, None, None]
        + coef[1] * np.arange(sshape[1])[None, :, None]
        + coef[2] * np.arange(sshape[2])[None, None, :]
    )
    nrng = rng_for("struct_noise")
    sig = np.float32(0.01 * _T1W_INTENSITY[LABELS["wm"]])
    t1w_b = (clean_t1w * bias.astype(np.float32))
    t1w = np.hypot(
        t1w_b + sig * nrng.standard_normal(sshape, dtype=np.float32),
        sig * nrng.standard_normal(sshape, dtype=np.float32),
    ).astype(np.float32)
    t1w_brain = np.where(sbrain, t1w, np.float32(0.0))

    # --- ASL partial-volume maps by supersampling through the pose -------------------
    asl_to_fine = np.linalg.inv(fine_to_struct_world) @ w @ asl_affine
    fine_vox = min(svox) / os_
    n_sub = tuple(max(1, math.ceil(v / fine_vox - 1e-9)) for v in voxel_size)
    # Only voxels whose footprint can reach the head (rho < rho_max, plus half a voxel
    # diagonal and one fine-voxel diagonal for the nearest-neighbour lookup) are sampled.
    x, y, z = _world_points(asl_affine, shape)
    c, ax3 = anat.centre, anat.axes
    rho = np.sqrt(
        ((x - c[0]) / ax3[0]) ** 2 + ((y - c[1]) / ax3[1]) ** 2 + ((z - c[2]) / ax3[2]) ** 2
    )
    margin = 0.5 * float(np.linalg.norm(voxel_size)) + math.sqrt(3.0) * fine_vox
    margin /= float(ax3.min())
    candidates = np.flatnonzero(rho.reshape(-1) < anat.rho_max + margin)
    acounts = _supersample_counts(fine, asl_to_fine, shape, n_sub, candidates)
    npts = float(np.prod(n_sub))
    pv = {
        "gm": acounts[LABELS["gm"]].reshape(shape) / npts,
        "wm": acounts[LABELS["wm"]].reshape(shape) / npts,
        "csf": (acounts[LABELS["csf"]] + acounts[LABELS["ventricle"]]).reshape(shape) / npts,
        "nonbrain": acounts[LABELS["nonbrain"]].reshape(shape) / npts,
    }
    ventricle_pv = acounts[LABELS["ventricle"]].reshape(shape) / npts
    brain_frac = pv["gm"] + pv["wm"] + pv["csf"]

    # --- coil fields, tissue parameters, truth -----------------------------------------
    sens = _sensitivity(rng_for("sensitivity"), anat, x, y, z)
    g = _fa_scale(rng_for("fa_scale"), anat, x, y, z)
    tissues = dict(table)
    tissues["nonbrain"] = nb
    m0_tissue = {t: float(table[t].pc) * m0a for t in ("gm", "wm", "csf")}
    m0_tissue["nonbrain"] = m0_nb

    structural = StructuralPhantom(
        shape=sshape,
        voxel_size=svox,
        affine=struct_affine,
        t1w=t1w,
        t1w_brain=t1w_brain,
        pv=spv,
        labels=slabels,
        brain_mask=sbrain,
        asl2struct=flirt_matrix(asl_affine, shape, struct_affine, sshape, world_src_to_ref=w),
        world_asl_to_struct=w,
    )
    return Phantom(
        seed=seed,
        field_strength=float(field_strength),
        shape=shape,
        voxel_size=voxel_size,
        affine=asl_affine,
        pv=pv,
        brain_mask=brain_frac >= 0.5,
        head_mask=(brain_frac + pv["nonbrain"]) >= 0.5,
        ventricle_pv=ventricle_pv,
        ventricle_mask=ventricle_pv >= 0.9,
        sulcal_csf_mask=(pv["csf"] - ventricle_pv) >= 0.5,
        tissues=tissues,
        m0_tissue=m0_tissue,
        m0a=m0a,
        sensitivity=sens,
        fa_scale=g,
        cbf=cbf_gm * pv["gm"] + cbf_wm * pv["wm"],
        cbf_gm=cbf_gm,
        cbf_wm=cbf_wm,
        structural=structural,
        anatomy=anat,
    )


# --------------------------------------------------------------------------------------
# Signal generators
# --------------------------------------------------------------------------------------


def _gm_mean(ph: Phantom, values: np.ndarray | float) -> float:
    """GM-partial-volume-weighted mean of ``values`` (sum(pv_gm * v) / sum(pv_gm))."""
    w = ph.pv["gm"]
    total = float(w.sum())
    if total <= 0:
        raise InputError("phantom has no grey matter: the SNR reference signal is undefined")
    return float((w * values).sum() / total)


def _noise_sigma(snr: Any, sigma: Any, reference: float) -> float | None:
    if snr is not None and sigma is not None:
        raise InputError(f"snr={snr!r} and sigma={sigma!r}: give at most one of them")
    if sigma is not None:
        return _positive("sigma", sigma, "signal units", allow_zero=True)
    if snr is None:
        return None
    return reference / _positive("snr", snr, "ratio")


def _add_noise(clean: np.ndarray, sigma: float, noise: str, rng: np.random.Generator) -> np.ndarray:
    """``clean`` (float64) with Gaussian noise, or as a Rician magnitude ``|clean + n1 + i n2|``
    (n1, n2 ~ N(0, sigma^2)); the real part's draws come first."""
    real = clean + sigma * rng.standard_normal(clean.shape)
    if noise == "gaussian":
        return real
    return np.hypot(real, sigma * rng.standard_normal(clean.shape))


def _finish(
    ph: Phantom,
    name: str,
    clean: np.ndarray,
    sigma: float | None,
    noise: str,
    seed: Any,
    dtype: np.dtype,
) -> tuple[np.ndarray, dict]:
    """Add noise to ``clean`` (float64) and cast; return (data, common truth entries)."""
    entropy = (ph.seed if seed is None else _seed("seed", seed), _STREAM[name])
    if sigma is None or sigma == 0.0:
        data = clean
    else:
        data = _add_noise(clean, sigma, noise, np.random.default_rng(entropy))
    common = {
        "generator": name,
        "clean": clean,
        "sigma": sigma,
        "noise": noise if sigma else None,
        "noise_seed": list(entropy),
    }
    return data.astype(dtype, copy=False), common


def _tissue_truth(ph: Phantom) -> dict:
    return {
        "m0a": ph.m0a,
        "m0_tissue": dict(ph.m0_tissue),
        "t1": {t: float(ph.tissues[t].t1) for t in TISSUES},
    }


def _slice_offsets(ph: Phantom, slicedt: Any, sliceband: Any) -> tuple[float, int, np.ndarray]:
    """Per-slice readout delay (1, 1, nz) in s: slicedt * (z mod sliceband or z)."""
    sdt = _positive("slicedt", slicedt, "s", allow_zero=True)
    band = _count("sliceband", sliceband)
    z = np.arange(ph.shape[2], dtype=np.float64)
    idx = np.mod(z, band) if band > 1 else z
    return sdt, band, (sdt * idx).reshape(1, 1, -1)


def _steady_generator(ph, *, tr, te, t2star, sens, name, snr, noise, sigma, seed, dtype, write):
    _check_phantom(ph)
    tr = _positive("tr", tr, "s")
    te = _positive("te", te, "ms", allow_zero=True)
    noise = _noise_kind(noise)
    dt = _dtype(dtype)
    key = "t2star" if t2star else "t2"
    t2 = {t: float(getattr(ph.tissues[t], key)) for t in TISSUES}
    m0 = sum(ph.pv[t] * ph.m0_tissue[t] for t in TISSUES)
    clean = sum(
        ph.pv[t]
        * ph.m0_tissue[t]
        * (1.0 - math.exp(-tr / ph.tissues[t].t1))
        * math.exp(-te / t2[t])
        for t in TISSUES
    ) * sens
    sd = _noise_sigma(snr, sigma, ph.m0_tissue["gm"] * _gm_mean(ph, sens))
    data, common = _finish(ph, name, clean, sd, noise, seed, dt)
    truth = {
        **common,
        "snr": snr,
        "tr": tr,
        "te": te,
        "t2star": bool(t2star),
        "t2": t2,
        **_tissue_truth(ph),
        "m0": m0,
        "sensitivity": sens,
    }
    if write is not None:
        _write_generated(ph, write, data, truth)
    return data, truth


def longtr_calibration(
    ph: Phantom,
    *,
    tr: float = 3.2,
    te: float = 0.0,
    t2star: bool = False,
    snr: float | None = None,
    noise: str = "rician",
    sigma: float | None = None,
    seed: int | None = None,
    dtype: Any = np.float32,
    write: str | os.PathLike | None = None,
) -> tuple[np.ndarray, dict]:
    """Long-TR (proton-density-like) calibration image through the receive coil.

        S = s * sum_t pv_t * M0_t * (1 - exp(-TR/T1_t)) * exp(-TE/T2_t)

    over t in gm, wm, csf, nonbrain (T2* instead of T2 with ``t2star=True``).

    Parameters
    ----------
    ph : Phantom
    tr : float, seconds, optional
        Repetition time.  Default 3.2.
    te : float, milliseconds, optional
        Echo time.  Default 0.
    t2star : bool, optional
        Use each tissue's T2* instead of T2.
    snr, sigma : float, optional
        Noise level (see the module docstring); both None: noise-free.
    noise : {"rician", "gaussian"}, optional
    seed : int, optional
        Noise seed; default the phantom's seed.
    dtype : float32 or float64, optional
        Dtype of ``data``.  Truth maps are always float64.
    write : path, optional
        Also write ``data`` to this NIfTI file (``.nii`` or ``.nii.gz``) and the
        scalar truth to a JSON sidecar next to it (same name, ``.json``).

    Returns
    -------
    data : ndarray of shape (x, y, z)
    truth : dict
        ``generator``, ``clean`` (noise-free data, float64), ``sigma`` (None when
        noise-free), ``noise``, ``noise_seed``, ``snr``, ``tr``, ``te``,
        ``t2star``, ``t2`` (dict tissue -> ms used), ``m0a``, ``m0_tissue``,
        ``t1`` (dict tissue -> s), ``m0`` (map: sum_t pv_t * M0_t, no coil, fully
        relaxed) and ``sensitivity`` (the map used).
    """
    return _steady_generator(
        ph, tr=tr, te=te, t2star=t2star, sens=ph.sensitivity, name="longtr_calibration",
        snr=snr, noise=noise, sigma=sigma, seed=seed, dtype=dtype, write=write,
    )


def body_coil_reference(
    ph: Phantom,
    *,
    tr: float = 3.2,
    te: float = 0.0,
    t2star: bool = False,
    snr: float | None = None,
    noise: str = "rician",
    sigma: float | None = None,
    seed: int | None = None,
    dtype: Any = np.float32,
    write: str | os.PathLike | None = None,
) -> tuple[np.ndarray, dict]:
    """The :func:`longtr_calibration` acquisition with a flat (body) coil, s = 1.

    The ``--cref`` image of calibration.md section 6: ``longtr / cref`` inside the
    brain is the receive sensitivity.  Parameters and truth keys as
    :func:`longtr_calibration` (``sensitivity`` is all ones; the SNR reference is
    ``M0_gm``).
    """
    return _steady_generator(
        ph, tr=tr, te=te, t2star=t2star, sens=np.ones(ph.shape), name="body_coil_reference",
        snr=snr, noise=noise, sigma=sigma, seed=seed, dtype=dtype, write=write,
    )


def _tis_array(tis: Any) -> np.ndarray:
    try:
        arr = np.asarray(tis, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"tis={tis!r}: expected a sequence of times (s)") from None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InputError(f"tis={tis!r}: expected one or more finite times >= 0 (s)")
    return arr


def _t2_decay(ph: Phantom, te: Any) -> tuple[float, dict[str, float]]:
    """The checked echo time (ms) and each tissue's T2 decay exp(-TE/T2) at it."""
    te = _positive("te", te, "ms", allow_zero=True)
    return te, {t: math.exp(-te / float(ph.tissues[t].t2)) for t in TISSUES}


def satrecov_series(
    ph: Phantom,
    tis: Any,
    *,
    repeats: int = 1,
    a: Any = 1.0,
    slicedt: float = 0.0,
    sliceband: int = 1,
    te: float = 0.0,
    snr: float | None = None,
    noise: str = "rician",
    sigma: float | None = None,
    seed: int | None = None,
    dtype: Any = np.float32,
    write: str | os.PathLike | None = None,
) -> tuple[np.ndarray, dict]:
    """Saturation-recovery series, one saturation per TI (no Look-Locker readout).

        S(TI) = s * sum_t pv_t * M0_t * (1 - A * exp(-TI'/T1_t)) * exp(-TE/T2_t),

    TI' = TI + slicedt * (z mod sliceband if sliceband > 1 else z).

    Parameters
    ----------
    ph : Phantom
    tis : sequence of float, seconds
        Recovery times, one per distinct acquisition.
    repeats : int, optional
        Repeats of each TI.  Volume order: TI (slowest) -> repeat (fastest).
    a : float or ndarray of shape (x, y, z), optional
        Saturation efficiency A (1 = perfect).
    slicedt : float, seconds, optional
        Extra delay per slice (2-D multi-slice readout).  Default 0.
    sliceband : int, optional
        Slices per band for the per-slice delay (multiband).  Default 1.
    te : float, milliseconds, optional
        Echo time: each tissue decays by exp(-TE/T2_t).  Default 0.
    snr, sigma, noise, seed, dtype, write
        As :func:`longtr_calibration`.

    Returns
    -------
    data : ndarray of shape (x, y, z, len(tis) * repeats)
    truth : dict
        Common keys (``generator``, ``clean``, ``sigma``, ``noise``, ``noise_seed``,
        ``snr``, ``m0a``, ``m0_tissue``, ``t1``, ``sensitivity``) and ``tis``
        (list), ``repeats``, ``a``, ``slicedt``, ``sliceband``,
        ``ti_per_volume`` (ndarray, nominal TI of each volume), ``m0`` (map,
        sum_t pv_t M0_t) and ``m0t`` (dict tissue -> map M0_t * s: the fully
        relaxed signal a fit of a pure voxel returns, times exp(-TE/T2_t)).
    """
    _check_phantom(ph)
    te, decay = _t2_decay(ph, te)
    tis_arr = _tis_array(tis)
    repeats = _count("repeats", repeats)
    a_val = _map_or_scalar("a", a, ph.shape, "saturation efficiency")
    sdt, band, delay = _slice_offsets(ph, slicedt, sliceband)
    noise = _noise_kind(noise)
    dt = _dtype(dtype)
    sens = ph.sensitivity
    a_map = np.asarray(a_val, dtype=np.float64)[..., None] if np.ndim(a_val) else a_val
    ti = tis_arr.reshape(1, 1, 1, -1) + delay[..., None]  # (1, 1, nz, n_ti)
    clean = np.zeros(ph.shape + (tis_arr.size,))
    for t in TISSUES:
        rec = 1.0 - a_map * np.exp(-ti / ph.tissues[t].t1)
        clean += (ph.pv[t] * ph.m0_tissue[t] * decay[t] * sens)[..., None] * rec
    clean = np.repeat(clean, repeats, axis=-1)
    sd = _noise_sigma(snr, sigma, ph.m0_tissue["gm"] * _gm_mean(ph, sens))
    data, common = _finish(ph, "satrecov_series", clean, sd, noise, seed, dt)
    truth = {
        **common,
        "snr": snr,
        "tis": tis_arr.tolist(),
        "repeats": repeats,
        "a": a_val,
        "slicedt": sdt,
        "sliceband": band,
        "ti_per_volume": np.repeat(tis_arr, repeats),
        "te": te,
        **_tissue_truth(ph),
        "m0": sum(ph.pv[t] * ph.m0_tissue[t] for t in TISSUES),
        "m0t": {t: ph.m0_tissue[t] * decay[t] * sens for t in TISSUES},
        "sensitivity": sens,
    }
    if write is not None:
        _write_generated(ph, write, data, truth)
    return data, truth


def look_locker_series(
    ph: Phantom,
    *,
    ti1: float,
    dt: float,
    n_ti: int,
    fa: float,
    lfa: float | None = None,
    nphases: int = 1,
    repeats: int = 1,
    a: Any = 1.0,
    lfa_offset: float = 0.023,
    slicedt: float = 0.0,
    sliceband: int = 1,
    te: float = 0.0,
    snr: float | None = None,
    noise: str = "rician",
    sigma: float | None = None,
    seed: int | None = None,
    dtype: Any = np.float32,
    write: str | os.PathLike | None = None,
) -> tuple[np.ndarray, dict]:
    """Look-Locker saturation-recovery series, simulated readout by readout.

    Each phase is an independent experiment, simulated per voxel and per tissue
    (fractions of that tissue's M0): saturation at t = 0 leaves
    ``Mz = 1 - A``; Mz relaxes, ``Mz <- 1 + (Mz - 1) * exp(-t/T1)``, to the first
    readout at ``TI1'``; at each readout the signal is ``M0 * Mz * sin(theta)``,
    then ``Mz <- Mz * cos(theta)`` and Mz relaxes for ``dt``; ``n_ti`` readouts.
    The voxel signal is ``s * sum_t pv_t * (tissue signal) * exp(-TE/T2_t)``.  True angles:
    ``theta = g * FA`` in the high-flip-angle phases and
    ``theta = (g + lfa_offset) * LFA`` in the low-flip-angle phase, with g the
    phantom's ``fa_scale`` map (calibration.md section 7.1: the relation the fit
    assumes).  ``TI1' = ti1 + slicedt * (z mod sliceband if sliceband > 1 else z)``.

    Parameters
    ----------
    ph : Phantom
    ti1 : float, seconds
        Time of the first readout after the saturation.
    dt : float, seconds
        Spacing of the readouts (> 0).
    n_ti : int
        Readouts per phase.
    fa : float, degrees
        Nominal flip angle of the high-flip-angle phases (0 < fa < 90).
    lfa : float, degrees, optional
        Nominal flip angle of an extra low-flip-angle phase (the last phase).
    nphases : int, optional
        Number of high-flip-angle phases.  Default 1.
    repeats : int, optional
        Repeats of each TI within a phase.
    a : float or ndarray of shape (x, y, z), optional
        Saturation efficiency A.
    lfa_offset : float, optional
        Additive offset of the flip-angle correction in the LFA phase (fabber's
        empirical 0.023).
    slicedt, sliceband
        Per-slice readout delay, as :func:`satrecov_series`.
    te : float, milliseconds, optional
        Echo time of every readout: each tissue decays by exp(-TE/T2_t).  Default 0.
    snr, sigma, noise, seed, dtype, write
        As :func:`longtr_calibration` (the SNR reference is the fully relaxed GM
        signal, without any sin(theta) factor).

    Returns
    -------
    data : ndarray of shape (x, y, z, n_ti * repeats * (nphases + [1 if lfa]))
        Volume order: phase (slowest) -> TI -> repeat (fastest).
    truth : dict
        Common keys (``generator``, ``clean``, ``sigma``, ``noise``, ``noise_seed``,
        ``snr``, ``m0a``, ``m0_tissue``, ``t1`` (dict tissue -> s),
        ``sensitivity``) and ``m0t`` (dict tissue -> map
        ``M0_t * sin(g * FA) * s * exp(-TE/T2_t)``: the scale the fit reports), ``g`` (the
        fa_scale map), ``a``, ``tis`` (list: the n_ti nominal readout times of a
        phase), ``ti1``, ``dt``, ``n_ti``, ``fa``, ``lfa``, ``nphases``,
        ``repeats``, ``lfa_offset``, ``slicedt``, ``sliceband``,
        ``theta_high`` / ``theta_low`` (maps, radians; ``theta_low`` None without
        LFA), ``ti_per_volume``, ``phase_per_volume`` (0-based; the LFA phase is
        ``nphases``) and ``fa_per_volume`` (nominal degrees).
    """
    _check_phantom(ph)
    te, decay = _t2_decay(ph, te)
    ti1 = _positive("ti1", ti1, "s", allow_zero=True)
    spacing = _positive("dt", dt, "s")
    n_ti = _count("n_ti", n_ti)
    fa = _positive("fa", fa, "degrees")
    if fa >= 90.0:
        raise InputError(f"fa={fa!r}: expected a flip angle in (0, 90) degrees")
    if lfa is not None:
        lfa = _positive("lfa", lfa, "degrees")
        if lfa >= 90.0:
            raise InputError(f"lfa={lfa!r}: expected a flip angle in (0, 90) degrees")
    nphases = _count("nphases", nphases)
    repeats = _count("repeats", repeats)
    a_val = _map_or_scalar("a", a, ph.shape, "saturation efficiency")
    lfa_offset = float(lfa_offset)
    if not math.isfinite(lfa_offset):
        raise InputError(f"lfa_offset={lfa_offset!r}: expected a finite number")
    sdt, band, delay = _slice_offsets(ph, slicedt, sliceband)
    noise = _noise_kind(noise)
    out_dtype = _dtype(dtype)

    g = ph.fa_scale
    sens = ph.sensitivity
    theta_high = g * math.radians(fa)
    theta_low = (g + lfa_offset) * math.radians(lfa) if lfa is not None else None
    first = ti1 + delay  # (1, 1, nz)

    def phase_signal(theta: np.ndarray) -> np.ndarray:
        sin_t, cos_t = np.sin(theta), np.cos(theta)
        out = np.zeros(ph.shape + (n_ti,))
        for t in TISSUES:
            t1 = ph.tissues[t].t1
            amp = ph.pv[t] * ph.m0_tissue[t] * decay[t] * sens * sin_t
            mz = 1.0 - a_val + np.zeros(ph.shape)  # fraction of M0 after the saturation
            mz = 1.0 + (mz - 1.0) * np.exp(-first / t1)
            relax = math.exp(-spacing / t1)
            for k in range(n_ti):
                out[..., k] += amp * mz
                mz = mz * cos_t
                mz = 1.0 + (mz - 1.0) * relax
        return out

    high = phase_signal(theta_high)
    phases = [high] * nphases
    if theta_low is not None:
        phases.append(phase_signal(theta_low))
    clean = np.repeat(np.concatenate(phases, axis=-1), repeats, axis=-1)
    sd = _noise_sigma(snr, sigma, ph.m0_tissue["gm"] * _gm_mean(ph, sens))
    data, common = _finish(ph, "look_locker_series", clean, sd, noise, seed, out_dtype)
    tis = np.round(ti1 + spacing * np.arange(n_ti), 12)  # nominal readout times (clean repr)
    n_phase_total = nphases + (1 if lfa is not None else 0)
    truth = {
        **common,
        "snr": snr,
        **_tissue_truth(ph),
        "m0t": {t: ph.m0_tissue[t] * decay[t] * np.sin(theta_high) * sens for t in TISSUES},
        "te": te,
        "g": g,
        "a": a_val,
        "tis": tis.tolist(),
        "ti1": ti1,
        "dt": spacing,
        "n_ti": n_ti,
        "fa": fa,
        "lfa": lfa,
        "nphases": nphases,
        "repeats": repeats,
        "lfa_offset": lfa_offset,
        "slicedt": sdt,
        "sliceband": band,
        "theta_high": theta_high,
        "theta_low": theta_low,
        "ti_per_volume": np.tile(np.repeat(tis, repeats), n_phase_total),
        "phase_per_volume": np.repeat(np.arange(n_phase_total), n_ti * repeats),
        "fa_per_volume": np.repeat(
            np.array([fa] * nphases + ([lfa] if lfa is not None else [])), n_ti * repeats
        ),
        "sensitivity": sens,
    }
    if write is not None:
        _write_generated(ph, write, data, truth)
    return data, truth


def perfusion_image(
    ph: Phantom,
    *,
    alpha: float = 0.85,
    snr: float | None = None,
    noise: str = "gaussian",
    sigma: float | None = None,
    seed: int | None = None,
    dtype: Any = np.float32,
    write: str | os.PathLike | None = None,
) -> tuple[np.ndarray, dict]:
    """Perfusion-weighted (label - control difference) image from the true CBF.

        perf = CBF * s * M0a * alpha / 6000

    the inverse of calibration.md section 9, ``CBF = 6000 * perf / (s * M0a * alpha)``.

    Parameters
    ----------
    ph : Phantom
    alpha : float, optional
        Labelling efficiency.  Default 0.85 (pCASL).
    snr, sigma : float, optional
        Noise level.  Here the SNR reference is the noise-free mean GM *perfusion*
        signal, ``cbf_gm * M0a * alpha / 6000 * mean_GM(s)`` with ``cbf_gm`` the
        perfusion of pure GM.
    noise : {"gaussian", "rician"}, optional
        Default "gaussian" (a difference image can be negative).
    seed, dtype, write
        As :func:`longtr_calibration`.

    Returns
    -------
    data : ndarray of shape (x, y, z)
    truth : dict
        Common keys and ``alpha``, ``cbf`` (map, ml/100g/min), ``cbf_gm``,
        ``cbf_wm``, ``m0a``, ``sensitivity``.
    """
    _check_phantom(ph)
    alpha = _positive("alpha", alpha, "labelling efficiency")
    noise = _noise_kind(noise)
    dt = _dtype(dtype)
    sens = ph.sensitivity
    clean = ph.cbf * sens * ph.m0a * alpha / 6000.0
    cbf_gm = ph.cbf_gm
    ref = cbf_gm * ph.m0a * alpha / 6000.0 * _gm_mean(ph, sens)
    sd = _noise_sigma(snr, sigma, ref)
    data, common = _finish(ph, "perfusion_image", clean, sd, noise, seed, dt)
    truth = {
        **common,
        "snr": snr,
        "alpha": alpha,
        "cbf": ph.cbf,
        "cbf_gm": cbf_gm,
        "cbf_wm": ph.cbf_wm,
        "m0a": ph.m0a,
        "sensitivity": sens,
    }
    if write is not None:
        _write_generated(ph, write, data, truth)
    return data, truth


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------

_UNITS = {
    "tr": "s",
    "ti": "s",
    "tis": "s",
    "ti1": "s",
    "dt": "s",
    "slicedt": "s",
    "t1": "s",
    "te": "ms",
    "t2": "ms",
    "t2star": "ms",
    "fa": "degrees",
    "lfa": "degrees",
    "theta": "radians",
    "cbf": "ml/100g/min",
    "m0": "signal units",
    "sigma": "signal units",
    "voxel_size": "mm",
    "affine": "voxel index -> world RAS mm",
}


def _sidecar_path(path: Path) -> Path:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    raise InputError(f"write={str(path)!r}: expected a file name ending in .nii or .nii.gz")


def _scalar_part(value: Any) -> tuple[bool, Any]:
    """(keep, value) with image-sized arrays (ndim >= 2) removed, recursively."""
    if isinstance(value, np.ndarray):
        return (value.ndim <= 1, value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            keep, vv = _scalar_part(v)
            if keep:
                out[k] = vv
        return (bool(out) or not value, out)
    return (True, value)


def _tissue_json(ph: Phantom) -> dict:
    return {
        name: {"t1": p.t1, "t2": p.t2, "t2star": p.t2star, "pc": p.pc}
        for name, p in ph.tissues.items()
    }


def _sidecar(ph: Phantom, truth: Mapping[str, Any]) -> dict:
    out: dict[str, Any] = {}
    maps = []
    for key, value in truth.items():
        if key == "clean":
            continue
        keep, part = _scalar_part(value)
        if keep:
            out[key] = part
        else:
            maps.append(key)
    out["maps_not_in_sidecar"] = maps
    out["tissues"] = _tissue_json(ph)
    out["phantom"] = {
        "seed": ph.seed,
        "shape": list(ph.shape),
        "voxel_size": list(ph.voxel_size),
        "field_strength": ph.field_strength,
    }
    out["units"] = dict(_UNITS)
    return out


def _save(
    path: Path, data: np.ndarray, affine: np.ndarray, description: str, overwrite: bool
) -> Path:
    from ..io import save_image  # lazy: aslcal.testing must not need nibabel to import

    if data.dtype == np.bool_:
        dtype: Any = np.uint8
    elif data.dtype.kind in "iu":
        dtype = data.dtype
    else:
        dtype = data.dtype if data.dtype == np.float64 else np.float32
    return save_image(path, data, affine, description=description, overwrite=overwrite, dtype=dtype)


def _write_generated(
    ph: Phantom, path: Any, data: np.ndarray, truth: Mapping[str, Any], *, overwrite: bool = True
) -> tuple[Path, Path]:
    from ..io import write_json

    dest = Path(path)
    side = _sidecar_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    desc = f"aslcal phantom {truth['generator']} seed {ph.seed}"
    img = _save(dest, data, ph.affine, desc, overwrite)
    js = write_json(side, _sidecar(ph, truth), overwrite=overwrite)
    return img, js


def _flirt_text(mat: np.ndarray) -> str:
    return "".join("  ".join(f"{v:.10f}" for v in row) + "  \n" for row in mat)


def write_dataset(
    ph: Phantom,
    outdir: str | os.PathLike,
    *,
    snr: float | None = None,
    perfusion_snr: float | None = None,
    noise: str = "rician",
    seed: int | None = None,
    overwrite: bool = True,
) -> dict[str, Path]:
    """Write a complete demo data set of the phantom (NIfTI + JSON sidecars).

    Files (``outdir`` is created if needed):

    ==========================  =====================================================
    ``calib.nii.gz``            :func:`longtr_calibration` (TR 3.2 s, TE 0)
    ``cref.nii.gz``             :func:`body_coil_reference` (same acquisition)
    ``satrecov.nii.gz``         :func:`satrecov_series` at :data:`DEFAULT_SATRECOV_TIS`
    ``calib_ll.nii.gz``         :func:`look_locker_series` with :data:`DEFAULT_LOOK_LOCKER`
    ``perfusion.nii.gz``        :func:`perfusion_image` (alpha 0.85)
    ``struct.nii.gz``           structural T1w (and ``struct_brain``,
                                ``struct_brain_mask``, ``struct_labels``,
                                ``struct_pv_{gm,wm,csf}``)
    ``asl2struct.mat``          FLIRT matrix ASL -> structural
    ``truth/*.nii.gz``          ``pv_{gm,wm,csf,nonbrain}``, ``brain_mask``,
                                ``ventricle_pv``, ``ventricle_mask``,
                                ``sulcal_csf_mask``, ``sensitivity``, ``fa_scale``,
                                ``cbf``
    ``phantom.json``            scalar truth (M0a, tissue table, geometry, pose)
    ==========================  =====================================================

    Each generated image has a sidecar ``<name>.json`` with its acquisition
    parameters and scalar truth.  Every file is written atomically.

    Parameters
    ----------
    ph : Phantom
    outdir : path
    snr : float, optional
        SNR of the M0-like images (module docstring); None: noise-free.
    perfusion_snr : float, optional
        SNR of the perfusion image (GM perfusion signal / sigma); None: noise-free.
    noise : {"rician", "gaussian"}, optional
        Noise of the M0-like images (the perfusion image is always Gaussian).
    seed : int, optional
        Noise seed (default: the phantom's).
    overwrite : bool, optional
        Whether existing files may be replaced.

    Returns
    -------
    dict of str to pathlib.Path
        Every file written, by a short name (``"calib"``, ``"calib_json"``, ...).
    """
    from ..io import write_json, write_text

    _check_phantom(ph)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(exist_ok=True)
    files: dict[str, Path] = {}
    common = {"noise": noise, "seed": seed}

    def gen(key: str, func, *args, **kwargs) -> None:
        data, truth = func(ph, *args, **kwargs)
        img, js = _write_generated(ph, out / f"{key}.nii.gz", data, truth, overwrite=overwrite)
        files[key], files[f"{key}_json"] = img, js

    gen("calib", longtr_calibration, snr=snr, **common)
    gen("cref", body_coil_reference, snr=snr, **common)
    gen("satrecov", satrecov_series, DEFAULT_SATRECOV_TIS, snr=snr, **common)
    gen("calib_ll", look_locker_series, **DEFAULT_LOOK_LOCKER, snr=snr, **common)
    gen("perfusion", perfusion_image, snr=perfusion_snr, noise="gaussian", seed=seed)

    st = ph.structural
    desc = f"aslcal phantom seed {ph.seed}"
    struct_maps = {
        "struct": st.t1w,
        "struct_brain": st.t1w_brain,
        "struct_brain_mask": st.brain_mask,
        "struct_labels": st.labels,
        "struct_pv_gm": st.pv["gm"],
        "struct_pv_wm": st.pv["wm"],
        "struct_pv_csf": st.pv["csf"],
    }
    for key, arr in struct_maps.items():
        files[key] = _save(out / f"{key}.nii.gz", arr, st.affine, desc, overwrite)
    files["asl2struct"] = write_text(
        out / "asl2struct.mat", _flirt_text(st.asl2struct), overwrite=overwrite
    )

    truth_maps = {
        "pv_gm": ph.pv["gm"],
        "pv_wm": ph.pv["wm"],
        "pv_csf": ph.pv["csf"],
        "pv_nonbrain": ph.pv["nonbrain"],
        "brain_mask": ph.brain_mask,
        "ventricle_pv": ph.ventricle_pv,
        "ventricle_mask": ph.ventricle_mask,
        "sulcal_csf_mask": ph.sulcal_csf_mask,
        "sensitivity": ph.sensitivity,
        "fa_scale": ph.fa_scale,
        "cbf": ph.cbf,
    }
    for key, arr in truth_maps.items():
        dest = out / "truth" / f"{key}.nii.gz"
        files[f"truth_{key}"] = _save(dest, arr, ph.affine, desc, overwrite)

    an = ph.anatomy
    record = {
        "seed": ph.seed,
        "field_strength": ph.field_strength,
        "m0a": ph.m0a,
        "m0_tissue": ph.m0_tissue,
        "tissues": _tissue_json(ph),
        "cbf_gm": ph.cbf_gm,
        "cbf_wm": ph.cbf_wm,
        "asl": {"shape": list(ph.shape), "voxel_size": list(ph.voxel_size), "affine": ph.affine},
        "structural": {
            "shape": list(st.shape),
            "voxel_size": list(st.voxel_size),
            "affine": st.affine,
            "asl2struct_flirt": st.asl2struct,
            "world_asl_to_struct": st.world_asl_to_struct,
        },
        "labels": dict(LABELS),
        "anatomy": {
            "brain_centre_mm": an.centre,
            "brain_semi_axes_mm": an.axes,
            "csf_layer_mm": an.csf_mm,
            "skull_mm": an.skull_mm,
            "scalp_mm": an.scalp_mm,
            "cortex_mm": an.cortex_mm,
        },
        "definitions": {
            "brain_mask": "pv_gm + pv_wm + pv_csf >= 0.5",
            "ventricle_mask": "ventricle_pv >= 0.9",
            "sulcal_csf_mask": "pv_csf - ventricle_pv >= 0.5",
            "sigma": "M0_gm * mean_GM(sensitivity) / snr (perfusion: GM perfusion signal / snr)",
            "m0_tissue": "pc * m0a (nonbrain: its own value)",
            "cbf": "cbf_gm * pv_gm + cbf_wm * pv_wm",
        },
        "units": dict(_UNITS),
    }
    files["phantom_json"] = write_json(out / "phantom.json", record, overwrite=overwrite)
    return files
