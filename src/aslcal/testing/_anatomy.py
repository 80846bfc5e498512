"""Analytic head anatomy behind :mod:`aslcal.testing.phantoms` (private).

The anatomy is a *label function*: given points in the head frame (millimetres,
RAS axes, the frame of the ASL acquisition) it returns an integer tissue label for
each point.  Everything is drawn from one :class:`numpy.random.Generator`, so the
same seed gives the same head.

Geometry (all lengths in mm)
----------------------------
* **Brain hull**: an ellipsoid (semi-axes ~67 x 85 x 57, jittered by the seed)
  whose radius along each direction ``u`` is modulated by a smooth low-order
  function (flatter base, random low-order asymmetry).  ``depth`` of a point is
  the distance below that hull measured along the ray from the brain centre.
* **Folding**: a band-limited random field ``f(u)`` on the sphere of directions
  (a sum of 64 random plane waves).  Its nodal lines ``f = 0`` form a labyrinth;
  the sulci are clefts of CSF along them, 0.9-1.8 mm wide (wider at the mouth)
  and ~14-28 mm deep (a second smooth random field, scaled by the local brain
  radius / 70 mm), running radially but bending slowly with depth.  No sulcus
  enters a deep core (an ellipsoid around the ventricles and deep grey matter
  whose size varies smoothly with direction, so the deep white matter has no
  regular outline).  The distance to the nodal line is ``|f| / |grad f|`` (first
  order), tabulated with the other direction fields on a (theta, phi) grid.
* **Interhemispheric fissure**: a CSF cleft 3 mm wide in the mid-sagittal plane,
  ~20 mm deep from the hull.
* **Cortex**: every parenchyma point closer than ``cortex_mm`` to CSF (hull,
  sulcus or fissure) is grey matter; the rest is white matter.
* **Deep grey matter**: thalami, caudate heads and putamina (ellipsoids, mirrored
  left/right).
* **Lateral ventricles**: two C-shaped tubes (mirrored left/right) following an arc
  in the sagittal plane from the frontal horn over the body to the atrium,
  bodies parallel near the midline, frontal horns and atria diverging, tapered
  ends.  They lie inside the sulcus-free core, >= ~6 mm from any sulcus or the
  fissure, surrounded by white matter and deep grey matter.
* **Outside the hull**: a CSF layer (~2.5 mm), skull (bone: label ``bone``, no
  MR signal), scalp (label ``nonbrain``: signal-giving non-brain tissue), air.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LABELS", "N_LABELS", "Anatomy", "make_anatomy", "labels_at"]

#: Integer labels of the label volume.  ``ventricle`` is CSF inside the lateral
#: ventricles; ``bone`` is skull (no signal); ``background`` is air.
LABELS: dict[str, int] = {
    "background": 0,
    "csf": 1,
    "gm": 2,
    "wm": 3,
    "ventricle": 4,
    "nonbrain": 5,
    "bone": 6,
}
N_LABELS = len(LABELS)

_CSF, _GM, _WM, _VEN, _NB, _BONE = (
    LABELS[k] for k in ("csf", "gm", "wm", "ventricle", "nonbrain", "bone")
)

# Lookup-table resolution for the folding fields on the sphere of directions.
_N_THETA = 181
_N_PHI = 360


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Parameters of one analytic head (see the module docstring)."""

    centre: np.ndarray  # (3,) brain centre in the head frame, mm
    axes: np.ndarray  # (3,) semi-axes of the brain hull, mm
    shape_coef: np.ndarray  # (7,) low-order hull modulation
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    cortex_mm: float
    # (n_theta, n_phi, 3) view of a channel-first array: signed angular distance to a
    # nodal line (rad), sulcal depth (mm), scale of the sulcus-free core (1-1.3)
    fold_lut: np.ndarray
    sdepth_max: float  # largest value of the sulcal-depth table, mm
    sulc_hw_fundus: float  # sulcal half-width at the fundus, mm
    sulc_hw_mouth: float  # sulcal half-width at the mouth, mm
    fissure_depth: float
    fissure_hw: float
    vent_scale: float
    vent_centre_yz: tuple[float, float]  # arc centre (y, z) relative to the brain centre
    vent_radius: float
    vent_phi: tuple[float, float]  # arc start/end angle, rad (0 = anterior, pi/2 = superior)
    vent_x: tuple[float, float, float]  # tube axis |x|: extra at the front, body, extra at the back
    vent_half: tuple[float, float]  # half-width (lateral) and half-height (in-plane) at the widest
    deep_gm: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]
    bend: np.ndarray  # (3, 3) linear field that bends the sulci with depth
    rho_max: float  # beyond this normalised radius every point is air
    core_centre: tuple[float, float, float] = (0.0, -12.0, -2.0)  # sulcus-free deep core
    core_axes: tuple[float, float, float] = (34.0, 40.0, 38.0)

    @property
    def outer_mm(self) -> float:
        """Thickness of everything outside the brain hull (CSF + skull + scalp)."""
        return self.csf_mm + self.skull_mm + self.scalp_mm


def _random_waves(rng: np.random.Generator, n: int, kappa: float):
    dirs = rng.standard_normal((n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    phase = rng.uniform(0.0, 2.0 * np.pi, n)
    return dirs * kappa, phase


def _sphere_grid():
    theta = np.linspace(0.0, np.pi, _N_THETA)
    phi = -np.pi + 2.0 * np.pi * np.arange(_N_PHI) / _N_PHI
    st = np.sin(theta)[:, None]
    ux = st * np.cos(phi)[None, :]
    uy = st * np.sin(phi)[None, :]
    uz = np.broadcast_to(np.cos(theta)[:, None], ux.shape)
    return np.stack([ux, uy, uz], axis=-1)  # (n_theta, n_phi, 3)


def make_anatomy(
    rng: np.random.Generator,
    *,
    cortex_mm: float = 3.0,
    kappa: float = 34.0,
    sulcal_depth: tuple[float, float] = (21.0, 7.0),
) -> Anatomy:
    """Draw one head from ``rng`` (see the module docstring for the geometry).

    ``kappa`` is the wavenumber of the folding field on the unit sphere (sulcal
    spacing ~ pi * 68 mm / kappa); ``sulcal_depth`` is (mean, half-range) in mm.
    """
    axes = np.array([67.0, 85.0, 57.0]) * (1.0 + rng.uniform(-0.03, 0.03, 3))
    centre = np.array([0.0, 0.0, 0.0]) + rng.uniform(-1.5, 1.5, 3)
    shape_coef = rng.normal(0.0, 0.02, 7)

    u = _sphere_grid()
    # Folding field: nodal lines of a random band-limited field -> sulci.
    k, ph = _random_waves(rng, 64, kappa)
    arg = (u @ k.T + ph).astype(np.float32)  # (nt, np, n); float32 trig is much faster
    f = np.cos(arg).sum(axis=-1, dtype=np.float64)
    grad = -(np.sin(arg).astype(np.float64) @ k)  # (nt, np, 3)
    grad -= (grad * u).sum(axis=-1, keepdims=True) * u  # tangential part
    gnorm = np.linalg.norm(grad, axis=-1)
    sulc = np.clip(f / np.maximum(gnorm, 1e-9), -1.0, 1.0)
    # Sulcal depth: a smooth random field mapped into mean +- half-range (mm), later
    # scaled by the local brain radius / 70 mm.
    k2, ph2 = _random_waves(rng, 12, 4.0)
    v = np.cos(u @ k2.T + ph2).sum(axis=-1) / np.sqrt(12 / 2.0)
    sdepth = sulcal_depth[0] + sulcal_depth[1] * np.tanh(0.8 * v)
    # Irregular boundary of the sulcus-free core (so the deep white matter is not a
    # visible ellipsoid): another smooth field mapped into [1.0, 1.3].
    k3, ph3 = _random_waves(rng, 12, 6.0)
    v3 = np.cos(u @ k3.T + ph3).sum(axis=-1) / np.sqrt(12 / 2.0)
    core_scale = 1.15 + 0.15 * np.tanh(v3)

    vent_scale = float(rng.uniform(0.92, 1.12))
    bend = rng.normal(0.0, 0.12, (3, 3))
    csf_mm = float(rng.uniform(2.2, 3.0))
    skull_mm = float(rng.uniform(5.5, 7.0))
    scalp_mm = float(rng.uniform(5.0, 6.5))
    # |hull modulation| <= sum|c| (each basis term is bounded by 1) + 0.08 (flat base).
    h_bound = float(np.abs(shape_coef).sum()) + 0.08
    rho_max = 1.0 + h_bound + (csf_mm + skull_mm + scalp_mm + 1.0) / float(axes.min())
    return Anatomy(
        centre=centre,
        axes=axes,
        shape_coef=shape_coef,
        csf_mm=csf_mm,
        skull_mm=skull_mm,
        scalp_mm=scalp_mm,
        cortex_mm=float(cortex_mm),
        fold_lut=np.stack([sulc, sdepth, core_scale], axis=0).transpose(1, 2, 0),
        sdepth_max=float(sdepth.max()),
        sulc_hw_fundus=0.45,
        sulc_hw_mouth=0.9,
        fissure_depth=20.0,
        fissure_hw=1.5,
        vent_scale=vent_scale,
        vent_centre_yz=(-6.0, -8.0),
        vent_radius=23.0 * vent_scale,
        vent_phi=(np.deg2rad(35.0), np.deg2rad(235.0)),
        vent_x=(3.5, 9.0, 12.0),
        vent_half=(6.0 * vent_scale, 8.0 * vent_scale),
        deep_gm=(
            ((10.0, -14.0, -2.0), (7.0, 13.0, 8.0)),  # thalamus
            ((16.0, 9.0, 9.0), (5.0, 9.0, 7.0)),  # caudate head
            ((25.0, 2.0, -2.0), (5.0, 12.0, 9.0)),  # putamen
        ),
        bend=bend,
        rho_max=rho_max,
    )


def _hull_modulation(anat: Anatomy, ux, uy, uz):
    c = anat.shape_coef
    h = (
        c[0] * uy
        + c[1] * uz
        + c[2] * uy * uz
        + c[3] * (ux * ux - 1.0 / 3.0)
        + c[4] * (uy * uy - 1.0 / 3.0)
        + c[5] * uz * uz * uz
        + 0.3 * c[6] * ux
    )
    # Flatter base of the brain (continuous with zero slope at the equator).
    h -= 0.08 * np.where(uz < 0.0, uz * uz, 0.0)
    return h


def _lut(tables: np.ndarray, ux, uy, uz) -> list[np.ndarray]:
    """Bilinear interpolation of stacked (theta, phi, n) tables at unit vectors.

    Returns one array per table (n of them).  phi wraps around.
    """
    theta = np.arccos(np.clip(uz, -1.0, 1.0))
    phi = np.arctan2(uy, ux)  # (-pi, pi]
    ti = theta * ((_N_THETA - 1) / np.pi)
    i0 = np.minimum(ti.astype(np.intp), _N_THETA - 2)
    ft = ti - i0
    pj = (phi + np.pi) * (_N_PHI / (2.0 * np.pi))
    j0f = np.floor(pj)
    fp = pj - j0f
    j0 = j0f.astype(np.intp)
    j0[j0 >= _N_PHI] -= _N_PHI
    j1 = j0 + 1
    j1[j1 >= _N_PHI] = 0
    k00 = i0 * _N_PHI + j0
    k01 = i0 * _N_PHI + j1
    k10 = k00 + _N_PHI
    k11 = k01 + _N_PHI
    w11 = ft * fp
    w10 = ft - w11
    w01 = fp - w11
    w00 = 1.0 - ft - w01
    out = []
    for c in range(tables.shape[-1]):
        flat = tables[..., c].reshape(-1)  # tables are stored channel-contiguous
        out.append(
            flat.take(k00) * w00
            + flat.take(k01) * w01
            + flat.take(k10) * w10
            + flat.take(k11) * w11
        )
    return out


def _cleft_distance(lateral, depth, depth_max, hw):
    """Distance to a cleft {lateral < hw, depth < depth_max} (rounded fundus)."""
    dl = np.maximum(lateral - hw, 0.0)
    below = np.maximum(depth - depth_max, 0.0)
    return np.sqrt(dl * dl + below * below)


_CHUNK = 1 << 18  # points per block: small temporaries stay in the allocator's cache


def labels_at(anat: Anatomy, x, y, z) -> np.ndarray:
    """Tissue labels (``LABELS``, int8) at head-frame points ``x, y, z`` (mm).

    The coordinates broadcast against each other; the result has their common
    shape.  Work is done in blocks of ``_CHUNK`` points.
    """
    x, y, z = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (x, y, z)))
    shape = x.shape
    xf, yf, zf = x.reshape(-1), y.reshape(-1), z.reshape(-1)
    out = np.empty(xf.size, dtype=np.int8)
    for start in range(0, xf.size, _CHUNK):
        sl = slice(start, start + _CHUNK)
        out[sl] = _labels_block(anat, xf[sl], yf[sl], zf[sl])
    return out.reshape(shape)


def _labels_block(anat: Anatomy, x, y, z) -> np.ndarray:
    ax, ay, az = anat.axes
    c0, c1, c2 = (float(v) for v in anat.centre)
    lab = np.zeros(x.shape, dtype=np.int8)
    qx = (x - c0) * (1.0 / ax)
    qy = (y - c1) * (1.0 / ay)
    qz = (z - c2) * (1.0 / az)
    rho2 = qx * qx + qy * qy + qz * qz
    # Cheap cull: nothing but air beyond rho_max (bound of the modulated hull + shells).
    keep = np.flatnonzero(rho2 < anat.rho_max**2)
    if keep.size == 0:
        return lab
    px, py, pz = x[keep] - c0, y[keep] - c1, z[keep] - c2
    qx, qy, qz = px * (1.0 / ax), py * (1.0 / ay), pz * (1.0 / az)
    rho = np.sqrt(rho2[keep])
    rho_safe = np.maximum(rho, 1e-12)
    ux, uy, uz = qx / rho_safe, qy / rho_safe, qz / rho_safe
    scale = np.sqrt((ax * ux) ** 2 + (ay * uy) ** 2 + (az * uz) ** 2)  # mm per unit rho
    r = rho * scale
    depth = scale * (1.0 + _hull_modulation(anat, ux, uy, uz)) - r

    sub = np.zeros(keep.shape, dtype=np.int8)
    sub[depth > -anat.outer_mm] = _NB
    sub[depth > -(anat.csf_mm + anat.skull_mm)] = _BONE
    sub[depth > -anat.csf_mm] = _CSF

    inside = np.flatnonzero(depth >= 0.0)
    if inside.size:
        sub[inside] = _brain_labels(
            anat,
            depth[inside],
            r[inside],
            px[inside],
            py[inside],
            pz[inside],
            ux[inside],
            uy[inside],
            uz[inside],
        )
    lab[keep] = sub
    return lab


def _brain_labels(anat: Anatomy, d, ri, ix, iy, iz, jx, jy, jz) -> np.ndarray:
    """Labels of points inside the brain hull (depth ``d`` >= 0)."""
    # Sulci along the nodal lines of the folding field.  Only points that a sulcus
    # (or its cortex) can reach are looked up: a point deeper than the deepest
    # possible fundus plus the cortical thickness is never sulcal CSF and never
    # within cortex_mm of one (exactly the same labels, less work).
    in_csf = np.zeros(d.shape, dtype=bool)
    dist = d.copy()
    reach = anat.sdepth_max * (ri + d) * (1.0 / 70.0) + anat.cortex_mm + 1e-6
    sh = np.flatnonzero(d < reach)
    if sh.size:
        ds, rs = d[sh], ri[sh]
        sx_, sy_, sz_ = jx[sh], jy[sh], jz[sh]
        # The clefts bend with depth: the lookup direction drifts along a smooth
        # linear field.
        bend = anat.bend
        w = ds * (1.0 / 20.0)
        bx = sx_ + w * (bend[0, 0] * sx_ + bend[0, 1] * sy_ + bend[0, 2] * sz_)
        by = sy_ + w * (bend[1, 0] * sx_ + bend[1, 1] * sy_ + bend[1, 2] * sz_)
        bz = sz_ + w * (bend[2, 0] * sx_ + bend[2, 1] * sy_ + bend[2, 2] * sz_)
        bn = np.sqrt(bx * bx + by * by + bz * bz)
        sd, dmax, core_scale = _lut(anat.fold_lut, bx / bn, by / bn, bz / bn)
        # Sulcal depth scales with the local brain radius (shallower where the brain
        # is thin) and no sulcus enters the deep core around the ventricles.
        dmax = dmax * (rs + ds) * (1.0 / 70.0)
        cx, cy, cz = anat.core_centre
        kx, ky, kz = anat.core_axes
        core = ((ix[sh] - cx) / kx) ** 2 + ((iy[sh] - cy) / ky) ** 2 + ((iz[sh] - cz) / kz) ** 2
        dmax = np.where(core < core_scale**2, 0.0, dmax)
        lat = np.abs(sd) * rs
        frac = np.clip(1.0 - ds / np.maximum(dmax, 1e-9), 0.0, 1.0)
        hw = anat.sulc_hw_fundus + (anat.sulc_hw_mouth - anat.sulc_hw_fundus) * frac
        in_csf[sh] = (ds < dmax) & (lat < hw)
        dist[sh] = np.minimum(ds, _cleft_distance(lat, ds, dmax, hw))
    # Interhemispheric fissure.
    latf = np.abs(ix)
    in_csf |= (d < anat.fissure_depth) & (latf < anat.fissure_hw)
    dist = np.minimum(dist, _cleft_distance(latf, d, anat.fissure_depth, anat.fissure_hw))

    lab = np.where(in_csf, _CSF, np.where(dist < anat.cortex_mm, _GM, _WM)).astype(np.int8)

    # Deep structures only near the centre (cheap bounding box).
    near = np.flatnonzero((latf < 40.0) & (np.abs(iy) < 55.0) & (np.abs(iz) < 45.0))
    if near.size == 0:
        return lab
    nx, ny, nz = latf[near], iy[near], iz[near]
    sub = lab[near]
    for (cx, cy, cz), (sx, sy, sz) in anat.deep_gm:
        e = ((nx - cx) / sx) ** 2 + ((ny - cy) / sy) ** 2 + ((nz - cz) / sz) ** 2
        sub[(e <= 1.0) & (sub == _WM)] = _GM
    # Lateral ventricles: C-shaped tubes in the sagittal plane, mirrored in x.
    vy = ny - anat.vent_centre_yz[0]
    vz = nz - anat.vent_centre_yz[1]
    rv = np.sqrt(vy * vy + vz * vz)
    phi0, phi1 = anat.vent_phi
    t = np.mod(np.arctan2(vz, vy) - phi0, 2.0 * np.pi) / (phi1 - phi0)
    tc = np.minimum(t, 1.0)
    prof = np.sqrt(np.clip(1.0 - np.abs(2.0 * tc - 1.0) ** 4, 0.0, 1.0))
    prof = prof * (1.0 + 0.25 * np.exp(-(((tc - 0.75) / 0.12) ** 2)))  # wider atrium
    # Bodies run parallel near the midline; frontal horns and atria diverge.
    x0 = (
        anat.vent_x[1]
        + anat.vent_x[0] * (np.maximum(0.3 - tc, 0.0) / 0.3) ** 2
        + anat.vent_x[2] * (np.maximum(tc - 0.3, 0.0) / 0.7) ** 2
    )
    a = np.maximum(anat.vent_half[0] * prof, 1e-6)
    b = np.maximum(anat.vent_half[1] * prof, 1e-6)
    e = ((nx - x0) / a) ** 2 + ((rv - anat.vent_radius) / b) ** 2
    sub[(t <= 1.0) & (e <= 1.0) & (sub != _CSF)] = _VEN
    lab[near] = sub
    return lab
