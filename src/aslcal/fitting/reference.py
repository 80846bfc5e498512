"""Reference (oracle) fitter: SciPy ``least_squares`` in float64, one voxel at a time.

Slow and obvious on purpose.  It shares nothing with the kernels but the validated
design (:class:`~aslcal.fitting.design.FitDesign`): the signal equations are written
again here in vectorised NumPy straight from calibration.md §7.1, the Jacobian is left
to SciPy's finite differences, the start comes from a dense brute-force T1 grid, and the
bounded problem is solved by SciPy's trust-region-reflective method.  Tests compare the
fast kernels against it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..physics.satrecov import LFA_OFFSET, MODE_LL, MODE_SR
from .design import FitDesign

__all__ = ["reference_signal", "fit_reference"]


def reference_signal(p: np.ndarray, design: FitDesign, tshift: float = 0.0) -> np.ndarray:
    """Model signal for parameters ``p = (m0t, t1t, a, g)`` at every volume of ``design``."""
    m0, t1, a, g = (float(x) for x in p)
    ti = design.ti + tshift
    if design.mode == MODE_SR:
        return m0 * (1.0 - a * np.exp(-ti / t1))
    fa, lfa = math.radians(design.fa), math.radians(design.lfa or 0.0)
    low = design.low.astype(bool)
    theta_h = g * fa
    theta = np.where(low, (g + LFA_OFFSET) * lfa, theta_h)
    q = np.where(low, np.sin(theta) / math.sin(theta_h), 1.0)
    ti1 = np.where(low, design.ti1_low, design.ti1_high) + tshift
    e = math.exp(-design.dt / t1)
    t1app = 1.0 / (1.0 / t1 - np.log(np.cos(theta)) / design.dt)
    r = (1.0 - e) / (1.0 - np.cos(theta) * e)
    if design.mode == MODE_LL:
        return m0 * q * (r + (1.0 - a * np.exp(-ti1 / t1) - r) * np.exp(-(ti - ti1) / t1app))
    return m0 * r * q * (1.0 - a * np.exp(-ti / t1app))


def _grid_basis(design: FitDesign, tshift: float):
    """For a dense T1 grid: the model columns u (M0 term) and w (M0·A term)."""
    t1s = np.geomspace(max(design.lower[1], 0.05), min(design.upper[1], 10.0), 200)
    g0 = design.init[3]
    u = np.stack([reference_signal((1.0, t1, 0.0, g0), design, tshift) for t1 in t1s])
    w = np.stack([reference_signal((1.0, t1, 1.0, g0), design, tshift) for t1 in t1s]) - u
    return t1s, u, w


def _start(y: np.ndarray, design: FitDesign, basis) -> np.ndarray:
    """Brute-force T1 grid; for each T1 solve the linear (M0, M0·A) problem exactly,
    within the bounds of M0 and A (candidates: the unbounded solution where it is inside
    them, and the best M0 with A on either bound; the lowest residual wins)."""
    t1s, u, w = basis
    m0_lo, m0_hi = design.lower[0], design.upper[0]

    def with_a(a):
        """Best bounded M0 for A fixed at ``a`` (per grid T1): (m0, residual sum of squares)."""
        z = u + a * w
        m0 = np.clip((z @ y) / np.einsum("ij,ij->i", z, z), m0_lo, m0_hi)
        return m0, np.sum((y - m0[:, None] * z) ** 2, axis=1)

    if not design.free[2]:
        m0, rss = with_a(design.init[2])
        a = np.full_like(m0, design.init[2])
    else:
        cands = []
        for a_b in (design.lower[2], design.upper[2]):
            if np.isfinite(a_b):
                m0_b, rss_b = with_a(a_b)
                cands.append((m0_b, np.full_like(m0_b, a_b), rss_b))
        suu, sww, suw = (np.einsum("ij,ij->i", p, q) for p, q in ((u, u), (w, w), (u, w)))
        suy, swy = u @ y, w @ y
        with np.errstate(divide="ignore", invalid="ignore"):
            det = suu * sww - suw**2
            m0_f = (sww * suy - suw * swy) / det
            a_f = (suu * swy - suw * suy) / det / m0_f
        inside = (m0_f > 0) & (m0_f >= m0_lo) & (m0_f <= m0_hi) & (a_f >= design.lower[2]) & (a_f <= design.upper[2])
        rss_f = np.where(inside, np.sum((y - m0_f[:, None] * (u + np.where(inside, a_f, 0.0)[:, None] * w)) ** 2, axis=1), np.inf)
        cands.append((m0_f, a_f, rss_f))
        best = np.argmin(np.stack([c[2] for c in cands]), axis=0)
        m0, a, rss = (np.choose(best, [c[i] for c in cands]) for i in range(3))
    k = int(np.nanargmin(rss))
    p0 = np.array([m0[k], t1s[k], a[k], design.init[3]])
    return np.clip(p0, design.lower, design.upper)


def fit_reference(
    y: np.ndarray, design: FitDesign, *, tshift: np.ndarray | float = 0.0, xtol: float = 1e-13
) -> dict[str, Any]:
    """Fit every row of ``y`` (shape (n_vox, n_obs)) with SciPy, in float64.

    Priors follow the same two-stage definition as the kernels: a fit without priors
    gives σ̂² = RSS/(n − p); then RSS + σ̂² Σ (θ−μ)²/v is minimised from that solution.

    Returns a dict of arrays: ``params`` (n_vox, 4), ``se`` (n_vox, 4), ``rss`` (n_vox,).
    """
    from scipy.optimize import least_squares

    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    n_vox, n_obs = y.shape
    tshift = np.broadcast_to(np.asarray(tshift, dtype=np.float64), (n_vox,))
    free = np.array(design.free)
    lower = np.array(design.lower)[free]
    upper = np.array(design.upper)[free]
    fixed = np.array(design.init, dtype=np.float64)
    mu = np.array(design.prior_mean)[free]
    var = np.array(design.prior_var)[free]
    has_prior = np.isfinite(var)
    n_free = int(free.sum())
    out_p = np.zeros((n_vox, 4))
    out_se = np.full((n_vox, 4), np.nan)
    out_rss = np.zeros(n_vox)

    def full(x):
        p = fixed.copy()
        p[free] = x
        return p

    bases: dict[float, Any] = {}
    for i in range(n_vox):
        yi, ts = y[i], float(tshift[i])
        if ts not in bases:
            bases[ts] = _grid_basis(design, ts)
        x0 = _start(yi, design, bases[ts])[free]
        x0 = np.clip(x0, lower, upper)

        def resid(x, s2=0.0):
            r = yi - reference_signal(full(x), design, ts)
            if s2 > 0:
                r = np.concatenate([r, np.sqrt(s2 / var[has_prior]) * (x[has_prior] - mu[has_prior])])
            return r

        opts = dict(bounds=(lower, upper), method="trf", jac="3-point", x_scale="jac", xtol=xtol, ftol=1e-15, gtol=1e-15, max_nfev=2000)
        sol = least_squares(resid, x0, **opts)
        rss = float(np.sum(resid(sol.x) ** 2))
        s2 = rss / (n_obs - n_free) if n_obs > n_free else math.nan
        if design.has_priors and n_obs > n_free:
            sol = least_squares(lambda x: resid(x, s2), sol.x, **opts)
            rss = float(np.sum(resid(sol.x) ** 2))
        jac = sol.jac[:n_obs]
        h = jac.T @ jac
        if design.has_priors:
            h = h + np.diag(np.where(has_prior, s2 / np.where(has_prior, var, 1.0), 0.0))
        try:
            cov = s2 * np.linalg.inv(h)
            se = np.sqrt(np.diag(cov))
        except np.linalg.LinAlgError:
            se = np.full(n_free, np.nan)
        out_p[i] = full(sol.x)
        out_se[i, free] = se
        out_se[i, ~free] = 0.0
        out_rss[i] = rss
    return {"params": out_p, "se": out_se, "rss": out_rss}
