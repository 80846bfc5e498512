"""Coordinate conventions of spatial transforms (pure geometry, no file I/O).

aslcal describes every spatial transform as a 4x4 matrix that maps **points** in world
coordinates (RAS millimetres, the frame of the NIfTI sform/qform as nibabel reports it),
written ``world_a_to_b``.  FSL FLIRT matrices map *scaled-voxel* coordinates of the
source image to those of the reference image: voxel index times voxel size, with x
flipped first, ``x = (nx - 1 - i) * dx``, when the voxel -> world matrix has a positive
determinant.  Hence

    world_src_to_ref = A_ref @ inv(S_ref) @ mat @ S_src @ inv(A_src)

(:func:`flirt_to_world`); :func:`world_to_flirt` is the inverse.  The file readers live
in :mod:`aslcal.io.transforms`; resampling in :mod:`aslcal.masks.resample`.  Both use
this module, which depends on NumPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["SINGULAR_DET", "flirt_scaling", "flirt_to_world", "world_to_flirt", "host_matrix", "grid_shape"]

#: |det| of a 3x3 linear part below which a transform or voxel matrix is singular.
SINGULAR_DET = 1e-6


def host_matrix(name: str, value: Any) -> np.ndarray:
    """``value`` as a finite float64 4x4 affine with last row 0 0 0 1 and an invertible 3x3."""
    try:
        m = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):  # also a CuPy array (no implicit device -> host copy)
        raise InputError(
            f"{name}: {type(value).__name__} value; expected a 4x4 host (NumPy) matrix of numbers"
        ) from None
    if m.shape != (4, 4):
        raise InputError(f"{name}: matrix of shape {m.shape}; expected shape (4, 4)")
    if not np.isfinite(m).all():
        raise InputError(f"{name}: matrix contains NaN or Inf; expected finite numbers")
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0), rtol=0.0, atol=1e-6):
        raise InputError(
            f"{name}: last row is {m[3].tolist()}; expected [0, 0, 0, 1] (an affine matrix)"
        )
    det = float(np.linalg.det(m[:3, :3]))
    if not abs(det) >= SINGULAR_DET:
        raise InputError(
            f"{name}: singular matrix (det of the 3x3 part {det:.3g}); expected an invertible affine"
        )
    m[3] = (0.0, 0.0, 0.0, 1.0)
    return m


def grid_shape(name: str, value: Any) -> tuple[int, int, int]:
    """A grid shape of 3 (or 4: x, y, z, t) positive integers -> its spatial part."""
    try:
        items = tuple(value)
    except TypeError:
        raise InputError(f"{name}={value!r}: expected a grid shape (x, y, z)") from None
    if len(items) not in (3, 4) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise InputError(
            f"{name}={value!r}: expected 3 positive integers (x, y, z), optionally with a 4th (t)"
        )
    return (int(items[0]), int(items[1]), int(items[2]))


def flirt_scaling(affine: Any, shape: Any) -> np.ndarray:
    """FSL's voxel index -> scaled-voxel matrix of one image.

    Parameters
    ----------
    affine : array_like of shape (4, 4)
        The image's voxel index -> world (RAS, mm) matrix.
    shape : sequence of 3 (or 4) int
        The image's grid shape; only nx matters (for the x flip).

    Returns
    -------
    ndarray of shape (4, 4)
        ``S`` with ``scaled = S @ [i, j, k, 1]`` (mm): ``diag(dx, dy, dz, 1)`` with
        ``d`` the column norms of ``affine[:3, :3]``; when ``det(affine[:3, :3]) > 0``
        x is flipped: ``x_scaled = (nx - 1 - i) * dx``.
    """
    return _scaling(host_matrix("affine", affine), grid_shape("shape", shape)[0])


def _scaling(aff: np.ndarray, nx: int, zooms: Any = None) -> np.ndarray:
    vox = np.linalg.norm(aff[:3, :3], axis=0)
    if zooms is not None:
        z = np.abs(np.asarray([float(v) for v in tuple(zooms)[:3]], dtype=np.float64))
        if z.shape == (3,) and np.all(np.isfinite(z) & (z > 0)):
            vox = z  # the header's pixdim (its sign ignored, as FSL does); else the affine's
    s = np.diag([vox[0], vox[1], vox[2], 1.0])
    if np.linalg.det(aff[:3, :3]) > 0:
        s[0, 0] = -vox[0]
        s[0, 3] = (nx - 1) * vox[0]
    return s


def flirt_to_world(
    mat: Any, src_affine: Any, src_shape: Any, ref_affine: Any, ref_shape: Any, *,
    src_zooms: Any = None, ref_zooms: Any = None,
) -> np.ndarray:
    """Convert a FLIRT matrix to a world point mapping: world(src) -> world(ref), RAS mm.

    Parameters
    ----------
    mat : array_like of shape (4, 4)
        FLIRT matrix: source scaled-voxel mm -> reference scaled-voxel mm (from
        :func:`read_flirt_matrix`).
    src_affine : array_like of shape (4, 4)
        Voxel index -> world (RAS, mm) of the FLIRT *source* (``-in``) image.
    src_shape : sequence of 3 (or 4) int
        Grid shape of the source image.
    ref_affine : array_like of shape (4, 4)
        Voxel index -> world (RAS, mm) of the FLIRT *reference* (``-ref``) image.
    ref_shape : sequence of 3 (or 4) int
        Grid shape of the reference image.
    src_zooms, ref_zooms : sequence of 3 float, mm, optional
        The images' voxel sizes as their headers give them (``pixdim``,
        :attr:`aslcal.io.Image.voxel_size`): FSL scales voxels by these.  Default: the
        column norms of the affines, the same unless the sform's scaling disagrees
        with ``pixdim``.

    Returns
    -------
    ndarray of shape (4, 4)
        ``W = A_ref @ inv(S_ref) @ mat @ S_src @ inv(A_src)``: maps the world
        coordinates (mm) of a point in the source image's frame to the world
        coordinates of the same anatomical point in the reference image's frame.
        For asl_calib's ``-t`` (ASL -> structural), pass the calibration image as
        the source and the structural as the reference: the result is
        ``world_asl_to_struct``.
    """
    m = host_matrix("mat", mat)
    a_src = host_matrix("src_affine", src_affine)
    a_ref = host_matrix("ref_affine", ref_affine)
    s_src = _scaling(a_src, grid_shape("src_shape", src_shape)[0], src_zooms)
    s_ref = _scaling(a_ref, grid_shape("ref_shape", ref_shape)[0], ref_zooms)
    return a_ref @ np.linalg.inv(s_ref) @ m @ s_src @ np.linalg.inv(a_src)


def world_to_flirt(
    world: Any, src_affine: Any, src_shape: Any, ref_affine: Any, ref_shape: Any, *,
    src_zooms: Any = None, ref_zooms: Any = None,
) -> np.ndarray:
    """The FLIRT matrix of a world point mapping (inverse of :func:`flirt_to_world`).

    Parameters
    ----------
    world : array_like of shape (4, 4)
        World(src) -> world(ref) point mapping, RAS mm.
    src_affine, src_shape, ref_affine, ref_shape
        As :func:`flirt_to_world` (source = FLIRT ``-in``, reference = ``-ref``).

    Returns
    -------
    ndarray of shape (4, 4)
        ``mat = S_ref @ inv(A_ref) @ world @ A_src @ inv(S_src)``: source scaled-voxel
        mm -> reference scaled-voxel mm, as ``flirt -omat`` writes it.
    """
    w = host_matrix("world", world)
    a_src = host_matrix("src_affine", src_affine)
    a_ref = host_matrix("ref_affine", ref_affine)
    s_src = _scaling(a_src, grid_shape("src_shape", src_shape)[0], src_zooms)
    s_ref = _scaling(a_ref, grid_shape("ref_shape", ref_shape)[0], ref_zooms)
    return s_ref @ np.linalg.inv(a_ref) @ w @ a_src @ np.linalg.inv(s_src)


# --------------------------------------------------------------------------------------
# ITK / ANTs
# --------------------------------------------------------------------------------------
