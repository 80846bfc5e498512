"""Bring a structural-space map into calibration space by averaging over each voxel.

A partial-volume or probability map (or a binary mask as 0/1) lives on a fine
structural grid; the reference region of the calibration is defined on the coarse
calibration grid.  asl_calib's rule is that a calibration voxel's value is the
*average* of the structural map over the voxel's footprint, not the value at its
centre (calibration.md section 8).  :func:`resample_to_grid` computes that average by
supersampling:

1. each reference (calibration) voxel is divided into ``n_x * n_y * n_z`` equal
   sub-boxes and a point is put at the centre of each, i.e. at voxel-index offsets
   ``(m + 0.5) / n - 0.5`` for ``m = 0 .. n - 1`` along each axis;
2. every point is mapped reference voxel index -> reference world (``ref_affine``)
   -> source world (``world_ref_to_src``) -> source voxel index (``inv(src_affine)``);
3. the source map is sampled there with ``map_coordinates`` (linear by default);
   points inside the source image's footprint (voxel index -0.5 .. n - 0.5, as ITK and
   FSL count an image's extent) take the nearest edge value beyond the outer voxel
   centres, points beyond the footprint take ``cval``;
4. the samples of each voxel are averaged.

The default ``n`` along a reference axis is the length of one reference voxel step
along it, measured in source voxels, rounded up (for grids with parallel axes: the
ratio of the voxel sizes, ``ceil(ref_voxel / src_voxel)``): the points are then no
more than one source voxel apart, so every source voxel under the footprint
contributes.

Memory: the reference grid is processed in chunks of whole slices (last axis) and one
sub-sample offset at a time, so at most a few arrays of the chunk's size exist at once,
whatever the supersampling.  The sum over offsets is taken in a fixed order, so the
result does not depend on the chunking.

Runs on the device of ``src_map``: ``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage``
for CuPy (the affines are small host matrices; nothing is copied to the host).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import array_namespace, ndimage_for
from ..errors import InputError
from ..geometry import flirt_to_world, grid_shape, host_matrix

__all__ = ["resample_to_grid", "resample_with_flirt", "default_supersample"]

#: Reference voxels per chunk when ``chunk_slices`` is None (about 9 float64 values per
#: voxel of the chunk are alive at once -- centres, sample points, sum, samples: ~72 MiB).
CHUNK_VOXELS = 1 << 20




def _index_map(src_affine: np.ndarray, ref_affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Reference voxel index -> source voxel index (4x4)."""
    return np.linalg.inv(src_affine) @ world @ ref_affine


def default_supersample(src_affine: Any, ref_affine: Any, world_ref_to_src: Any = None) -> tuple[int, int, int]:
    """Default number of sub-samples per reference voxel along each reference axis.

    Parameters
    ----------
    src_affine, ref_affine : array_like of shape (4, 4)
        Voxel index -> world (RAS, mm) of the source (fine) and reference (coarse) grids.
    world_ref_to_src : array_like of shape (4, 4), optional
        Reference world -> source world point mapping (mm).  Default identity.

    Returns
    -------
    tuple of 3 int
        ``ceil(|M[:3, a]|)`` for each reference axis a, at least 1, where M maps
        reference voxel index -> source voxel index: the length of a reference voxel
        edge in source voxels (``ceil(ref_voxel / src_voxel)`` when the axes are
        parallel).
    """
    a_src = host_matrix("src_affine", src_affine)
    a_ref = host_matrix("ref_affine", ref_affine)
    w = np.eye(4) if world_ref_to_src is None else host_matrix("world_ref_to_src", world_ref_to_src)
    m = _index_map(a_src, a_ref, w)
    lengths = np.linalg.norm(m[:3, :3], axis=0)
    # 1e-9: a ratio that is an integer up to rounding (3.4 / 1.7) must not round up.
    return tuple(max(1, math.ceil(float(v) - 1e-9)) for v in lengths)


def _supersample(value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    items = (value,) * 3 if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    if len(items) != 3 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise InputError(
            f"supersample={value!r}: expected None, an integer >= 1, or 3 integers >= 1 (x, y, z)"
        )
    return tuple(int(v) for v in items)


def _offsets(n: int) -> np.ndarray:
    """Centres of n equal sub-intervals of a voxel, in voxel-index units about its centre."""
    return (np.arange(n, dtype=np.float64) + 0.5) / n - 0.5


def resample_to_grid(
    src_map: Any,
    src_affine: Any,
    ref_shape: Any,
    ref_affine: Any,
    world_ref_to_src: Any = None,
    *,
    supersample: Any = None,
    order: int = 1,
    cval: float = 0.0,
    chunk_slices: int | None = None,
):
    """Average a source-space map over each voxel of a reference grid (supersampling).

    Parameters
    ----------
    src_map : ndarray or cupy.ndarray of shape (sx, sy, sz)
        The map to resample, e.g. a partial-volume map, a probability map or a
        binary mask (bool or 0/1), on the source (structural) grid.
    src_affine : array_like of shape (4, 4)
        Source voxel index -> source world (RAS, mm).
    ref_shape : sequence of 3 (or 4) int
        Reference (calibration) grid shape; a 4th (time) entry is ignored.
    ref_affine : array_like of shape (4, 4)
        Reference voxel index -> reference world (RAS, mm).
    world_ref_to_src : array_like of shape (4, 4), optional
        Point mapping reference world -> source world, mm: where an anatomical
        point at reference-world x lies in the source image's world.  Default
        identity (both images share one world frame, e.g. the same session).  From
        a FLIRT matrix ASL -> structural use :func:`resample_with_flirt` (or
        :func:`aslcal.io.flirt_to_world`); from an ITK file see
        :func:`aslcal.io.read_itk_affine`.
    supersample : int or tuple of 3 int, optional
        Sub-samples per reference voxel along each reference axis (an int applies to
        all three).  Default :func:`default_supersample`.
    order : {0, 1}, optional
        Interpolation order of the source map at each sub-sample: 1 (default,
        trilinear) or 0 (nearest).  Higher spline orders are not offered: they
        overshoot [0, 1] at the edges of a fraction map.
    cval : float, optional
        Value of the source map beyond its footprint (voxel index below -0.5 or above
        n - 0.5 along an axis).  Default 0.
    chunk_slices : int, optional
        Reference slices (last axis) processed at once.  Default: as many as fit in
        :data:`CHUNK_VOXELS` reference voxels (at least one).  The result does not
        depend on it.

    Returns
    -------
    ndarray or cupy.ndarray of shape ref_shape[:3]
        The average of the sub-samples of each reference voxel, on the device of
        ``src_map``; float32 for a float32 map, float64 otherwise.  NaN in the source
        map spreads to the reference voxels whose sub-samples touch it.

    Raises
    ------
    InputError
        ``src_map`` not 3-D numeric; a shape not 3 positive integers; an affine or
        ``world_ref_to_src`` not a finite invertible 4x4 affine (or a CuPy array);
        ``supersample`` not integers >= 1; ``order`` not 0 or 1; ``cval`` not finite;
        ``chunk_slices`` not an integer >= 1.
    """
    xp = array_namespace(src_map)
    if not hasattr(src_map, "ndim"):
        src_map = xp.asarray(src_map)
    if src_map.ndim != 3:
        raise InputError(
            f"src_map: array of shape {tuple(src_map.shape)}; expected a 3-D map (x, y, z)"
        )
    kind = np.dtype(src_map.dtype).kind
    if kind not in "biuf":
        raise InputError(f"src_map: dtype {src_map.dtype}; expected a real (or bool) map")
    a_src = host_matrix("src_affine", src_affine)
    a_ref = host_matrix("ref_affine", ref_affine)
    shape = grid_shape("ref_shape", ref_shape)
    w = np.eye(4) if world_ref_to_src is None else host_matrix("world_ref_to_src", world_ref_to_src)
    n_sub = _supersample(supersample) or default_supersample(a_src, a_ref, w)
    if isinstance(order, bool) or order not in (0, 1):
        raise InputError(f"order={order!r}: expected 0 (nearest) or 1 (linear)")
    try:
        cval_f = float(cval)
    except (TypeError, ValueError):
        raise InputError(f"cval={cval!r}: expected a finite number") from None
    if not math.isfinite(cval_f):
        raise InputError(f"cval={cval!r}: expected a finite number")
    nx, ny, nz = shape
    if chunk_slices is None:
        chunk = max(1, CHUNK_VOXELS // (nx * ny))
    elif isinstance(chunk_slices, bool) or not isinstance(chunk_slices, (int, np.integer)) or chunk_slices < 1:
        raise InputError(f"chunk_slices={chunk_slices!r}: expected None or an integer >= 1")
    else:
        chunk = int(chunk_slices)

    out_dtype = xp.float32 if src_map.dtype == xp.float32 else xp.float64
    if kind in "bui" or kind == "f" and src_map.dtype != out_dtype:
        src = xp.astype(src_map, out_dtype)
    else:
        src = src_map
    ndi = ndimage_for(src)
    m = _index_map(a_src, a_ref, w)
    lin, trans = m[:3, :3], m[:3, 3]
    # Sub-sample displacements in source-index units, in one fixed order.
    offsets = [
        lin @ np.array([ox, oy, oz])
        for ox in _offsets(n_sub[0])
        for oy in _offsets(n_sub[1])
        for oz in _offsets(n_sub[2])
    ]
    n_points = float(len(offsets))

    ii = xp.reshape(xp.arange(nx, dtype=xp.float64), (nx, 1, 1))
    jj = xp.reshape(xp.arange(ny, dtype=xp.float64), (1, ny, 1))
    out = xp.empty((nx, ny, nz), dtype=out_dtype)
    for k0 in range(0, nz, chunk):
        k1 = min(nz, k0 + chunk)
        kk = xp.reshape(xp.arange(k0, k1, dtype=xp.float64), (1, 1, k1 - k0))
        nk = k1 - k0
        # Source-index coordinates of the chunk's voxel centres, (3, nx * ny * nk): flat,
        # C-contiguous coordinates suit both map_coordinates implementations.
        base = xp.stack(
            [
                xp.reshape(
                    xp.broadcast_to(
                        float(lin[r, 0]) * ii + float(lin[r, 1]) * jj + float(lin[r, 2]) * kk
                        + float(trans[r]),
                        (nx, ny, nk),
                    ),
                    (-1,),
                )
                for r in range(3)
            ]
        )
        acc = xp.zeros((nx * ny * nk,), dtype=xp.float64)
        coords = xp.empty_like(base)
        for d in offsets:
            inside = None
            for r in range(3):
                coords[r, ...] = base[r, ...] + float(d[r])
                within = (coords[r] >= -0.5) & (coords[r] <= src.shape[r] - 0.5)
                inside = within if inside is None else inside & within
            # "nearest" inside the footprint: the outer half of an edge voxel is the image
            # too ("constant" would give cval beyond the outer voxel centres)
            samples = ndi.map_coordinates(src, coords, order=order, mode="nearest", output=xp.float64)
            acc += xp.where(inside, samples, cval_f)
        out[:, :, k0:k1] = xp.reshape(xp.astype(acc / n_points, out_dtype), (nx, ny, nk))
    return out


def resample_with_flirt(
    src_map: Any,
    src_affine: Any,
    ref_shape: Any,
    ref_affine: Any,
    flirt_mat: Any,
    *,
    supersample: Any = None,
    order: int = 1,
    cval: float = 0.0,
    chunk_slices: int | None = None,
    src_zooms: Any = None,
    ref_zooms: Any = None,
):
    """Average a structural-space map over each calibration voxel, given asl_calib's ``-t``.

    Parameters
    ----------
    src_map : ndarray or cupy.ndarray of shape (sx, sy, sz)
        Map on the structural grid (e.g. a CSF partial-volume map).
    src_affine : array_like of shape (4, 4)
        Structural voxel index -> world (RAS, mm).
    ref_shape : sequence of 3 (or 4) int
        Calibration (ASL) grid shape.
    ref_affine : array_like of shape (4, 4)
        Calibration voxel index -> world (RAS, mm).
    flirt_mat : array_like of shape (4, 4)
        FLIRT matrix ASL -> structural, as asl_calib's ``-t`` / ``asl_reg`` write it:
        FLIRT source (``-in``) = the calibration/ASL image (the reference grid here),
        FLIRT reference (``-ref``) = the structural (the source grid here).
    supersample, order, cval, chunk_slices
        As :func:`resample_to_grid`.
    src_zooms, ref_zooms : sequence of 3 float, mm, optional
        Voxel sizes of the structural and calibration images from their headers'
        ``pixdim`` (:attr:`aslcal.io.Image.voxel_size`), as FSL uses them; without them,
        the column norms of the affines (the same for every header nibabel writes).

    Returns
    -------
    ndarray or cupy.ndarray of shape ref_shape[:3]
        As :func:`resample_to_grid` with
        ``world_ref_to_src = flirt_to_world(flirt_mat, ref_affine, ref_shape,
        src_affine, src_map.shape, src_zooms=ref_zooms, ref_zooms=src_zooms)`` (ASL world
        -> structural world; FLIRT's source is the calibration image).
    """
    if not hasattr(src_map, "shape"):
        src_map = np.asarray(src_map)
    if len(src_map.shape) != 3:
        raise InputError(
            f"src_map: array of shape {tuple(src_map.shape)}; expected a 3-D map (x, y, z)"
        )
    world = flirt_to_world(flirt_mat, ref_affine, ref_shape, src_affine, tuple(src_map.shape),
                           src_zooms=ref_zooms, ref_zooms=src_zooms)
    return resample_to_grid(
        src_map,
        src_affine,
        ref_shape,
        ref_affine,
        world,
        supersample=supersample,
        order=order,
        cval=cval,
        chunk_slices=chunk_slices,
    )
