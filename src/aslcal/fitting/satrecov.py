"""Voxelwise saturation-recovery / Look-Locker fit: the public entry point.

Packs the masked voxels into an (n_obs, n_vox) block (coalesced GPU reads), runs the
single-source LM kernel on the chosen backend in one launch, and unpacks image-shaped
maps.  NumPy in → NumPy out; CuPy in → CuPy out, with no host round trip.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import array_namespace, is_cupy_array, resolve_backend, resolve_dtype
from ..errors import InputError
from ..physics.satrecov import PARAM_NAMES
from ..kernels import lm
from ..kernels.lm import STATUS_NAMES, STATUS_OUT_OF_MASK, STATUS_UNDERDETERMINED
from .design import FitDesign, make_design

__all__ = ["SatrecovFit", "fit_satrecov", "STATUS_NAMES", "status_counts"]

log = logging.getLogger("aslcal")

#: Default relative step tolerance per dtype (float32 steps below ~1e-5 are rounding noise).
DEFAULT_TOL = {"float32": 1e-5, "float64": 1e-8}
DEFAULT_MAX_ITER = 100
#: Default statistical stop: the fit also ends when the Gauss–Newton step to the optimum is
#: below this many standard errors (kernels/lm.py, Method 2); 0 converges to ``tol`` only.
DEFAULT_STAT_TOL = 1e-3
#: Points of the log-spaced T1 grid that seeds every voxel (refined by a parabola).
DEFAULT_N_GRID = 10


@dataclass
class SatrecovFit:
    """Result of :func:`fit_satrecov`: image-shaped maps on the input's device.

    Attributes
    ----------
    m0t : array, signal units
        Fully relaxed magnetisation (on the high-flip-angle readout scale for Look-Locker).
    t1t : array, seconds
    a : array
        Saturation efficiency (1 = perfect).
    g : array
        Flip-angle correction factor (1 where not fitted).
    m0t_se, t1t_se, a_se, g_se : array
        Standard errors from (JᵀJ + σ̂²P)⁻¹σ̂²; 0 for fixed parameters, NaN where undefined.
    rss : array
        Residual sum of squares of the data.
    n_iter : array of int32
    status : array of int32
        See :data:`STATUS_NAMES`.
    """

    m0t: Any
    t1t: Any
    a: Any
    g: Any
    m0t_se: Any
    t1t_se: Any
    a_se: Any
    g_se: Any
    rss: Any
    n_iter: Any
    status: Any
    backend: str
    dtype: str
    design: FitDesign
    n_fitted: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        """The parameter maps by name (m0t, t1t, a, g)."""
        return {n: getattr(self, n) for n in PARAM_NAMES}

    @property
    def std_errors(self) -> dict[str, Any]:
        """The standard-error maps by parameter name."""
        return {n: getattr(self, n + "_se") for n in PARAM_NAMES}

    def status_counts(self) -> dict[str, int]:
        """Number of voxels per status (a small host copy of a histogram)."""
        return status_counts(self.status)

    @property
    def fits_per_second(self) -> float:
        """Voxel fits per second of kernel time."""
        t = self.timings.get("fit", 0.0)
        return self.n_fitted / t if t > 0 else math.nan


def status_counts(status: Any) -> dict[str, int]:
    """Number of voxels per status name in a status array (NumPy or CuPy; a small host copy)."""
    xp = array_namespace(status)
    counts = xp.bincount(xp.reshape(status, (-1,)), minlength=len(STATUS_NAMES))
    counts = counts.get() if is_cupy_array(counts) else np.asarray(counts)
    return {STATUS_NAMES[k]: int(c) for k, c in enumerate(counts) if c and k in STATUS_NAMES}


def _pack_params(design: FitDesign, dtype: np.dtype, tol: float, max_iter: int, n_grid: int,
                 stat_tol: float = DEFAULT_STAT_TOL):
    fpar = np.zeros(lm.N_FPAR, dtype=np.float64)
    fpar[lm.F_TI1_HIGH] = design.ti1_high
    fpar[lm.F_TI1_LOW] = design.ti1_low
    fpar[lm.F_DT] = design.dt
    fpar[lm.F_FA] = math.radians(design.fa) if design.fa is not None else 0.0
    fpar[lm.F_LFA] = math.radians(design.lfa) if design.lfa is not None else 0.0
    fpar[lm.F_TOL] = tol
    fpar[lm.F_STAT_TOL] = stat_tol
    lo_t1, hi_t1 = design.lower[1], design.upper[1]
    fpar[lm.F_GRID_LO] = max(lo_t1, 0.1) if max(lo_t1, 0.1) < hi_t1 else lo_t1
    fpar[lm.F_GRID_HI] = min(hi_t1, 8.0) if min(hi_t1, 8.0) > fpar[lm.F_GRID_LO] else hi_t1
    fpar[lm.F_LB : lm.F_LB + 4] = design.lower
    fpar[lm.F_UB : lm.F_UB + 4] = design.upper
    fpar[lm.F_INIT : lm.F_INIT + 4] = design.init
    fpar[lm.F_MU : lm.F_MU + 4] = design.prior_mean
    fpar[lm.F_PREC : lm.F_PREC + 4] = [
        (1.0 / v if (f and math.isfinite(v)) else 0.0) for f, v in zip(design.free, design.prior_var)
    ]
    ipar = np.zeros(lm.N_IPAR, dtype=np.int32)
    ipar[lm.I_MODE] = design.mode
    ipar[lm.I_MAX_ITER] = max_iter
    ipar[lm.I_N_GRID] = n_grid
    ipar[lm.I_USE_PRIORS] = 1 if design.has_priors else 0
    ipar[lm.I_FREE : lm.I_FREE + 4] = [1 if f else 0 for f in design.free]
    n_high = int(np.count_nonzero(design.low == 0))
    # the kernels read the high-flip-angle volumes first, the low-flip-angle phase last
    assert not np.any(design.low[:n_high]) and np.all(design.low[n_high:]), "LFA phase must be last"
    ipar[lm.I_N_HIGH] = n_high
    ti = np.asarray(design.ti, dtype=np.float64)
    for phase, seg in enumerate((ti[:n_high], ti[n_high:])):
        even = lm.even_spacing(seg)  # Look-Locker trains: one exponential per train
        if even is not None:
            fpar[lm.F_STEP + phase], ipar[lm.I_EVEN + phase] = even
    with np.errstate(over="ignore"):
        return fpar.astype(dtype), ipar


def _slice_shifts(design: FitDesign, idx: tuple, spatial_ndim: int, xp, dtype) -> tuple[Any, np.ndarray]:
    """Per-voxel index into the distinct slice-timing shifts, and the shifts (host, seconds)."""
    n = idx[0].shape[0]
    if design.slicedt == 0.0:
        return xp.zeros(n, dtype=xp.int32), np.zeros(1, dtype=dtype)
    if spatial_ndim < 3:
        raise InputError(
            f"slicedt={design.slicedt:g} needs 3-D images (slice axis = third axis); data have {spatial_ndim} spatial axes"
        )
    z = idx[2]
    if design.sliceband > 1:
        z = z % design.sliceband
    n_shift = design.sliceband if design.sliceband > 1 else int(z.max()) + 1 if n else 1
    return z.astype(xp.int32), (np.arange(n_shift) * design.slicedt).astype(dtype)


def _voxel_shifts(ti_shift, spatial, mask, mask_b, design: FitDesign, xp, dtype) -> tuple[Any, np.ndarray]:
    """``ti_shift`` as (per-voxel index, distinct shifts): see :func:`fit_satrecov`.

    The voxels' delays stay on the data's device; only the distinct values (the shift
    table the start grid is built from, like :func:`_slice_shifts`'s) go to the host.
    """
    from ..backend import to_host

    if design.slicedt != 0.0:
        raise InputError("ti_shift and slicedt: give the slice timing one way, not both")
    if is_cupy_array(ti_shift) and not is_cupy_array(mask_b):
        raise InputError("ti_shift is a CuPy (GPU) array but data are on the host; pass both on one device")
    shift = xp.asarray(ti_shift, dtype=xp.float64)
    if tuple(shift.shape) != spatial:
        raise InputError(f"ti_shift shape {tuple(shift.shape)} does not match the data's spatial shape {spatial}")
    values = xp.reshape(shift, (-1,)) if mask is None else shift[mask_b]
    if not bool(xp.all(xp.isfinite(values))):
        raise InputError("ti_shift: every fitted voxel needs a finite delay (seconds)")
    shifts, index = xp.unique_inverse(values)
    shifts = np.asarray(to_host(shifts), dtype=np.float64)
    return xp.astype(xp.reshape(index, (-1,)), xp.int32), (shifts if shifts.size else np.zeros(1)).astype(dtype)


def fit_satrecov(
    data: Any,
    tis: Sequence[float] | np.ndarray,
    *,
    mask: Any = None,
    repeats: int = 1,
    nphases: int = 1,
    fa: float | None = None,
    lfa: float | None = None,
    dt: float | None = None,
    slicedt: float = 0.0,
    sliceband: int = 1,
    ti_shift: Any = None,
    fix_a: bool = False,
    priors: bool | str | Mapping[str, Sequence[float]] | None = None,
    bounds: Mapping[str, Sequence[float]] | None = None,
    model: str = "exact",
    backend: str | None = None,
    dtype: Any = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float | None = None,
    n_grid: int = DEFAULT_N_GRID,
    stat_tol: float = DEFAULT_STAT_TOL,
) -> SatrecovFit:
    """Fit saturation-recovery or Look-Locker T1/M0 (and flip-angle correction) voxelwise.

    Parameters
    ----------
    data : array of shape (*spatial, n_vol), signal units
        NumPy or CuPy.  Volume order: phase (slowest) → TI → repeat (fastest); the
        low-flip-angle phase, if any, last.
    tis : sequence of float, seconds
        Either the distinct TIs of one phase (then ``len(tis) * repeats * (nphases + [1
        if lfa]) == n_vol``) or one TI per volume (any order, variable repeats).  With
        several phases the volumes split into ``nphases`` (+ 1) phases of one size, the
        low-flip-angle one last; every Look-Locker train starts at the smallest TI of its
        flip angle.  Where a per-volume list shows its phases (a new train where the TI
        drops), unequal sizes or high-flip-angle trains starting at different times are
        an :class:`InputError`.
    mask : bool array of shape ``spatial``, optional
        Voxels to fit (all when None).  Only these are packed and fitted.
    repeats : int
        Volumes per TI within a phase.
    nphases : int
        High-flip-angle phases (Look-Locker); the LFA phase is extra.
    fa, lfa : float, degrees, optional
        Look-Locker readout flip angle, and the low flip angle of a last extra phase
        (enables fitting the flip-angle correction g).  Without ``fa`` the model is plain
        saturation recovery.
    dt : float, seconds, optional
        Look-Locker readout spacing Δt (default: spacing of the first two distinct TIs).
    slicedt : float, seconds
        Extra delay per slice (2-D multi-slice readout): TI(z) = TI + slicedt·z, or
        slicedt·(z mod sliceband) when ``sliceband > 1``.
    sliceband : int
        Slices per band for multiband readouts.
    ti_shift : array of shape ``spatial``, seconds, optional
        Per-voxel delay added to every TI of that voxel: any slice timing (e.g. BIDS
        ``SliceTiming`` mapped onto the voxels), or the slice shifts of packed voxels from
        several images.  Not together with ``slicedt``.  Voxels sharing a value share the
        start-grid tables, so a few hundred distinct values cost nothing.
    fix_a : bool
        Fix the saturation efficiency A = 1.
    priors : True, "fabber" or mapping, optional
        Gaussian priors (MAP).  True/"fabber": T1 ~ N(1.3, 0.1), A ~ N(1, 0.1),
        g ~ N(1, 0.01); or ``{"t1t": (mean, var), ...}``.
    bounds : mapping, optional
        Override of the default box bounds ``{"m0t": (0, inf), "t1t": (0.05, 10), "a": (0,
        2), "g": (0.5, 1.5)}``.
    model : {"exact", "fabber"}
        Look-Locker form: the exact readout train (default) or fabber's per-phase form.
    backend : {"auto", "numpy", "numba", "cuda"}, optional
        Default: the configuration (``auto``).  ``auto`` keeps CuPy data on the GPU and
        sends large host problems to a GPU if one is present, else uses numba.
    dtype : {"auto", "float32", "float64"}, optional
        Computation type (auto: float32 on CUDA, float64 on the CPU).
    max_iter : int
        Levenberg–Marquardt iterations per voxel (per stage when priors are used).
    tol : float, optional
        Relative step tolerance (default 1e-8 in float64, 1e-5 in float32).
    n_grid : int
        Points of the T1 grid used for the initial guess (>= 3).
    stat_tol : float, optional
        Statistical stop (default 1e-3): a voxel's fit also ends when the undamped
        Gauss–Newton step to its optimum is below ``stat_tol`` standard errors (δᵀJᵀJδ ≤
        stat_tol²·σ̂²), unless a free parameter is held on a bound.  Noisy data converge
        only linearly, so this halves the iterations while every parameter stays within
        a few ``stat_tol`` standard errors of the fully converged value (the remaining
        step times the linear rate); noise-free data still converge to ``tol``.  0 turns
        it off.

    Returns
    -------
    SatrecovFit
        Maps of shape ``spatial`` on the input's device, plus backend, dtype, design and
        timings.  Voxels outside the mask have status "out of mask" and zeros.

    Raises
    ------
    InputError
        Inconsistent design (TI count vs volumes, Δt ≤ 0, uneven Look-Locker spacing,
        flip angles outside (0, 90) degrees, lfa without fa, inverted bounds), or a mask
        whose shape does not match the data.
    BackendUnavailableError
        An explicitly requested backend that cannot run here.
    """
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        data = np.asarray(data)
    if data.ndim < 2:
        raise InputError(f"data: expected shape (*spatial, n_volumes) with >= 2 axes, got shape {tuple(data.shape)}")
    if data.dtype.kind not in "biuf":
        raise InputError(f"data: dtype {data.dtype} is not supported; expected real numbers (a magnitude image)")
    spatial = tuple(int(s) for s in data.shape[:-1])
    n_vol = int(data.shape[-1])
    for name, val in (("max_iter", max_iter), ("n_grid", n_grid)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < (3 if name == "n_grid" else 1):
            raise InputError(f"{name}={val!r}: expected an integer >= {3 if name == 'n_grid' else 1}")
    if isinstance(stat_tol, bool) or not isinstance(stat_tol, (int, float, np.floating)) or not 0 <= stat_tol < 1:
        raise InputError(f"stat_tol={stat_tol!r}: expected a number in [0, 1) (standard errors; 0: off)")
    design = make_design(
        n_vol, tis, repeats=repeats, nphases=nphases, fa=fa, lfa=lfa, dt=dt, slicedt=slicedt,
        sliceband=sliceband, fix_a=fix_a, priors=priors, bounds=bounds, model=model,
    )
    xp = array_namespace(data)
    if mask is None:
        mask_b = xp.ones(spatial, dtype=bool)
    else:
        if not hasattr(mask, "shape"):
            mask = np.asarray(mask)
        if is_cupy_array(data) and not is_cupy_array(mask):
            import cupy

            mask = cupy.asarray(mask)
        elif not is_cupy_array(data) and is_cupy_array(mask):
            raise InputError("mask is a CuPy (GPU) array but data are on the host; pass both on one device")
        if tuple(mask.shape) != spatial:
            raise InputError(f"mask shape {tuple(mask.shape)} does not match the data's spatial shape {spatial}")
        mask_b = mask.astype(bool)
    idx = xp.nonzero(mask_b)
    n_vox = int(idx[0].shape[0])
    be = resolve_backend(backend, data, n_items=n_vox)
    dt_ = resolve_dtype(dtype, be)
    if tol is None:
        tol = DEFAULT_TOL[dt_.name]
    if isinstance(tol, bool) or not (isinstance(tol, (int, float, np.floating)) and 0 < tol < 1):
        raise InputError(f"tol={tol!r}: expected a number in (0, 1)")

    # -- pack: (n_obs, n_vox), one column per voxel ------------------------------------
    t0 = time.perf_counter()
    # One transposing copy (with the dtype cast); without a mask no gather at all.
    picked = xp.reshape(data, (n_vox, n_vol)) if mask is None else data[mask_b]
    y = xp.ascontiguousarray(xp.astype(picked, dt_, copy=False).T)
    if ti_shift is None:
        sidx, shifts = _slice_shifts(design, idx, len(spatial), xp, dt_)
    else:
        sidx, shifts = _voxel_shifts(ti_shift, spatial, mask, mask_b, design, xp, dt_)
    fpar, ipar = _pack_params(design, dt_, float(tol), int(max_iter), int(n_grid), float(stat_tol))
    if design.has_priors and n_vol <= design.n_free:
        log.warning(
            "priors ignored: they are weighted by σ̂² = RSS/(n - p) of a fit without them, undefined "
            "with %d volumes for %d free parameters", n_vol, design.n_free,
        )
    timings["pack"] = time.perf_counter() - t0

    params = xp.zeros((4, n_vox), dtype=dt_)
    se = xp.zeros((4, n_vox), dtype=dt_)
    rss = xp.zeros(n_vox, dtype=dt_)
    n_iter = xp.zeros(n_vox, dtype=xp.int32)
    status = xp.zeros(n_vox, dtype=xp.int32)
    outs = (params, se, rss, n_iter, status)
    if n_vox and not design.identifiable:
        log.warning(
            "%d distinct observations for %d free parameters: every voxel is marked underdetermined",
            design.n_distinct, design.n_free,
        )
        se[...] = xp.nan
        rss[...] = xp.nan
        status[...] = STATUS_UNDERDETERMINED
    elif n_vox:
        from . import _dispatch

        _dispatch.run_fit(be.name, y, design, sidx, shifts, fpar, ipar, outs, timings)

    # -- unpack to image-shaped maps ------------------------------------------------------
    t0 = time.perf_counter()

    def unpack(col, fill, dtype_=dt_):
        if mask is None:  # every voxel fitted: no scatter
            return xp.reshape(xp.astype(col, dtype_, copy=True), spatial)
        out = xp.full(spatial, fill, dtype=dtype_)
        out[mask_b] = col
        return out

    maps = {}
    for k, name in enumerate(PARAM_NAMES):
        maps[name] = unpack(params[k], 0.0)
        maps[name + "_se"] = unpack(se[k], 0.0)
    if not design.free[3]:
        maps["g"][mask_b] = design.init[3]
    maps["rss"] = unpack(rss, 0.0)
    maps["n_iter"] = unpack(n_iter, 0, xp.int32)
    maps["status"] = unpack(status, STATUS_OUT_OF_MASK, xp.int32)
    timings["unpack"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    result = SatrecovFit(
        **maps, backend=be.name, dtype=dt_.name, design=design, n_fitted=n_vox, timings=timings
    )
    log.info(
        "fit_satrecov: %d voxels x %d volumes on %s/%s in %.3f s (fit %.3f s)",
        n_vox, n_vol, be.name, dt_.name, timings["total"], timings.get("fit", 0.0),
    )
    return result
