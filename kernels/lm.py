"""Bounded Levenberg–Marquardt fit of one voxel, written once over scalars.

:func:`make_fit_voxel` returns ``fit_voxel(v, y, ti, sidx, shifts, gu, gw, fpar, ipar,
out_p, out_se, out_rss, out_iter, out_status)`` for one dtype, decorated with the given
``jit`` (``numba.njit`` for the CPU driver in :mod:`lm_cpu`, ``cuda.jit(device=True)``
for the CUDA kernel in :mod:`lm_cuda`, identity for plain Python).  The drivers only
differ in which voxels each thread visits.  All per-voxel state (parameters, the 4x4
normal matrix, the gradient, the Cholesky factor) lives in scalar locals, i.e. in
registers: no scratch memory and no dynamic indexing.

Layouts (chosen for coalesced reads on the GPU: consecutive threads = consecutive voxels)
-------------------------------------------------------------------------------------------
y        : (n_obs, n_vox)  observations, one column per voxel
ti       : (n_obs,)        recovery time of each volume (s)
sidx     : (n_vox,)        int32 index of the voxel's slice-timing shift in ``shifts``
shifts   : (n_shift,)      distinct slice-timing shifts added to every TI (s)
gu, gw   : (n_shift, n_grid, n_obs)  the start grid's basis columns (see below), filled
                           once per fit by :func:`make_grid_tables`
fpar     : (N_FPAR,)       float parameters, see the F_* offsets
ipar     : (N_IPAR,)       int32 parameters, see the I_* offsets; the first
                           ipar[I_N_HIGH] observations are high-flip-angle volumes,
                           the rest the low-flip-angle phase
out_p    : (4, n_vox)      m0t, t1t, a, g
out_se   : (4, n_vox)      standard errors (0 for fixed parameters, NaN when undefined)
out_rss  : (n_vox,)        residual sum of squares (data term)
out_iter : (n_vox,)        int32 LM iterations
out_status: (n_vox,)       int32 status code (STATUS_* below)

Method
------
1. Initial guess: for fixed T1 (and g) the model is linear in M0 and M0·A,
   S = M0·u + M0·A·w, so a coarse log-spaced T1 grid with the linear part solved in
   closed form, refined by a parabola through the best three grid points, gives a
   near-global start.  u and w do not depend on the voxel (only on its slice shift), so
   they are tabulated once per fit and the per-voxel grid costs dot products only.
2. Levenberg–Marquardt with Marquardt scaling (damping λ·diag(JᵀJ)), box bounds by
   projection with an active set (a parameter at a bound whose gradient points outward is
   held for that step), fixed parameters excluded.  It stops when every relative step is
   below ``tol``, or (``F_STAT_TOL`` = s > 0) when the undamped Gauss–Newton step δ to the
   optimum of the local model is below s standard errors: δᵀ(JᵀJ)δ = gᵀ(JᵀJ)⁻¹g ≤
   s²·σ̂², σ̂² = RSS/(n − p).  Noisy data converge linearly (the residual's curvature), so
   the second test saves half the iterations at a cost of < s·SE in every parameter;
   noise-free data (σ̂ → 0) still converge to ``tol``.
3. Optional Gaussian priors (MAP): first a fit without priors gives σ̂² = RSS/(n − p);
   then the objective RSS + σ̂² Σ (θ−μ)²/v is minimised from that solution.
4. Standard errors: sqrt(diag(σ̂² (JᵀJ + σ̂² P)⁻¹)) over the free parameters.
"""

from __future__ import annotations

import math

import numpy as np

from aslcal.physics.satrecov import make_satrecov_model

__all__ = [
    "make_grid_tables", "t1_grid",
    "N_PARAMS", "N_FPAR", "N_IPAR", "STATUS_NAMES",
    "STATUS_CONVERGED", "STATUS_MAX_ITER", "STATUS_SINGULAR", "STATUS_NONFINITE",
    "STATUS_OUT_OF_MASK", "STATUS_UNDERDETERMINED", "make_fit_voxel", "even_spacing",
]

N_PARAMS = 4

STATUS_CONVERGED = 0
STATUS_MAX_ITER = 1
STATUS_SINGULAR = 2
STATUS_NONFINITE = 3
STATUS_OUT_OF_MASK = 4
STATUS_UNDERDETERMINED = 5
STATUS_NAMES = {
    STATUS_CONVERGED: "converged",
    STATUS_MAX_ITER: "max-iterations",
    STATUS_SINGULAR: "singular",
    STATUS_NONFINITE: "non-finite input",
    STATUS_OUT_OF_MASK: "out of mask",
    STATUS_UNDERDETERMINED: "underdetermined",
}

# fpar offsets
F_TI1_HIGH, F_TI1_LOW, F_DT, F_FA, F_LFA, F_TOL, F_GRID_LO, F_GRID_HI = range(8)
F_LB = 8  # 4 lower bounds
F_UB = 12  # 4 upper bounds
F_INIT = 16  # 4 values: start / fixed value of each parameter (m0t unused)
F_MU = 20  # 4 prior means
F_PREC = 24  # 4 prior precisions 1/v (0 = no prior, and 0 for fixed parameters)
F_STEP = 28  # 2 values (high, low segment): readout spacing of its trains (s), see I_EVEN
F_STAT_TOL = 30  # statistical stop: the Gauss-Newton step in standard errors (0: off), see Method
N_FPAR = 31
#: An evenly spaced phase recomputes its decay with an exponential every this many
#: readouts (between them F is advanced by one multiplication): the rounding of the
#: product stays below ~16 ulp.
EVEN_REANCHOR = 16
# ipar offsets
I_MODE, I_MAX_ITER, I_N_GRID, I_USE_PRIORS = range(4)
I_FREE = 4  # 4 flags: 1 = fitted, 0 = fixed
I_N_HIGH = 8  # observations [0, n_high) use the high flip angle, [n_high, n_obs) the low one
I_EVEN = 9  # 2 values (high, low segment): trains of this many readouts spaced by F_STEP (0: not)
N_IPAR = 11


def even_spacing(ti: np.ndarray) -> tuple[float, int] | None:
    """``(Δ, L)`` if ``ti`` (one flip-angle segment, s) is a run of readout trains of L
    volumes each, ti[t·L + k] = ti[t·L] + k·Δ to 1e-12 s·max(1, |ti|); else None.

    Look-Locker phases are such trains (several high-flip-angle phases repeat the train);
    repeated TIs or irregular saturation-recovery times are not.
    """
    ti = np.asarray(ti, dtype=np.float64)
    if ti.size < 2:
        return None
    tol = 1e-12 * max(1.0, float(np.max(np.abs(ti))))
    d = np.diff(ti)
    step = float(d[0])
    if abs(step) <= tol:
        return None
    off = np.flatnonzero(np.abs(d - step) > tol)
    length = int(off[0]) + 1 if off.size else int(ti.size)
    if length < 2 or ti.size % length:
        return None
    trains = ti.reshape(-1, length)
    if np.max(np.abs(trains - (trains[:, :1] + step * np.arange(length)))) > tol:
        return None
    return step, length


def t1_grid(fpar, ipar) -> np.ndarray:
    """The start grid's T1 values (s), as the kernels compute them."""
    n = int(ipar[I_N_GRID])
    lo, hi = float(fpar[F_GRID_LO]), float(fpar[F_GRID_HI])
    return np.exp(np.log(lo) + (np.log(hi) - np.log(lo)) / (n - 1) * np.arange(n))


def make_grid_tables(dtype=np.float64, jit=lambda fn: fn):
    """Return ``fill(ti, shifts, fpar, ipar, gu, gw)`` filling the start-grid basis tables.

    ``gu[s, k, j]`` and ``gw[s, k, j]`` are u and w of observation j for the k-th grid T1
    and slice shift s (A = 0, g at its start value), from the same model functions the
    fit uses.
    """
    model = make_satrecov_model(dtype, jit)
    phase_coefficients = model.phase_coefficients
    obs_basis = model.obs_basis
    f = np.dtype(dtype).type
    ZERO = f(0.0)

    @jit
    def fill(ti, shifts, fpar, ipar, gu, gw):
        mode = ipar[I_MODE]
        n_grid = ipar[I_N_GRID]
        n_high = ipar[I_N_HIGH]
        dt = fpar[F_DT]
        fa = fpar[F_FA]
        lfa = fpar[F_LFA]
        g = fpar[F_INIT + 3]
        log_lo = math.log(fpar[F_GRID_LO])
        step = (math.log(fpar[F_GRID_HI]) - log_lo) / f(n_grid - 1)
        for s in range(shifts.shape[0]):
            ts = shifts[s]
            for k in range(n_grid):
                t1 = math.exp(log_lo + step * f(k))
                ch = phase_coefficients(mode, t1, ZERO, g, fpar[F_TI1_HIGH] + ts, dt, fa, lfa, 0)
                cl = phase_coefficients(mode, t1, ZERO, g, fpar[F_TI1_LOW] + ts, dt, fa, lfa, 1) if lfa > ZERO else ch
                for j in range(ti.shape[0]):
                    u, w = obs_basis(cl if j >= n_high else ch, ti[j] + ts)
                    gu[s, k, j] = u
                    gw[s, k, j] = w

    return fill


def make_fit_voxel(dtype=np.float64, jit=lambda fn: fn):
    """Return the single-voxel fitter for ``dtype`` built with decorator ``jit``."""
    model = make_satrecov_model(dtype, jit)
    phase_coefficients = model.phase_coefficients
    obs_signal_grad_decay = model.obs_signal_grad_decay
    f = np.dtype(dtype).type
    ZERO = f(0.0)
    ONE = f(1.0)
    TWO = f(2.0)
    HALF = f(0.5)
    TEN = f(10.0)
    TENTH = f(0.1)
    LAM0 = f(1e-3)
    LAM_MIN = f(1e-12)
    LAM_MAX = f(1e12)
    PIVOT = f(64.0 * np.finfo(dtype).eps)
    EPS = f(np.finfo(dtype).eps)
    NAN = f(np.nan)
    INF = f(np.inf)

    @jit
    def prior_term(p, mu, prec, s2):
        """Gaussian prior σ̂²·prec·(p − μ)²: its (cost, Hessian diagonal, gradient) terms."""
        w = s2 * prec
        dev = p - mu
        return w * dev * dev, w, -w * dev

    @jit
    def evaluate(v, y, ti, ts, fpar, ipar, p0, p1, p2, p3, s2):
        """Return (rss, cost, h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, g0, g1, g2, g3).

        h = JᵀJ (+ σ̂²P) over the free parameters (rows of fixed ones are 0), g = Jᵀr
        (− σ̂²P(θ−μ)), cost = rss + σ̂² Σ P(θ−μ)².
        """
        mode = ipar[I_MODE]
        dt = fpar[F_DT]
        fa = fpar[F_FA]
        lfa = fpar[F_LFA]
        f0 = ipar[I_FREE] != 0
        f1 = ipar[I_FREE + 1] != 0
        f2 = ipar[I_FREE + 2] != 0
        f3 = ipar[I_FREE + 3] != 0
        ch = phase_coefficients(mode, p1, p2, p3, fpar[F_TI1_HIGH] + ts, dt, fa, lfa, 0)
        cl = phase_coefficients(mode, p1, p2, p3, fpar[F_TI1_LOW] + ts, dt, fa, lfa, 1) if lfa > ZERO else ch
        h00 = h10 = h11 = h20 = h21 = h22 = h30 = h31 = h32 = h33 = ZERO
        g0 = g1 = g2 = g3 = ZERO
        rss = ZERO
        n_high = ipar[I_N_HIGH]
        for phase in range(2):
            c = cl if phase == 1 else ch
            j0 = 0 if phase == 0 else n_high
            j1 = n_high if phase == 0 else y.shape[0]
            train = ipar[I_EVEN + phase]
            even = train != 0
            ratio = math.exp(-fpar[F_STEP + phase] * c[1]) if even else ZERO
            fdec = ZERO
            kt = 0  # position in the current readout train
            ka = 0  # readouts since the last exponential
            for j in range(j0, j1):
                tau = ti[j] + ts - c[0]
                if even and kt != 0 and ka != EVEN_REANCHOR:
                    fdec = fdec * ratio  # evenly spaced readouts: F advances by a factor
                    ka += 1
                else:
                    fdec = math.exp(-tau * c[1])
                    ka = 1
                kt += 1
                if kt == train:
                    kt = 0
                s, d0, d1, d2, d3 = obs_signal_grad_decay(p0, c, tau, fdec)
                r = y[j, v] - s
                rss += r * r
                if not f0:
                    d0 = ZERO
                if not f1:
                    d1 = ZERO
                if not f2:
                    d2 = ZERO
                if not f3:
                    d3 = ZERO
                g0 += d0 * r
                g1 += d1 * r
                g2 += d2 * r
                g3 += d3 * r
                h00 += d0 * d0
                h10 += d1 * d0
                h11 += d1 * d1
                h20 += d2 * d0
                h21 += d2 * d1
                h22 += d2 * d2
                h30 += d3 * d0
                h31 += d3 * d1
                h32 += d3 * d2
                h33 += d3 * d3
        cost = rss
        if s2 > ZERO:
            # Gaussian priors (precision 0 where there is none or the parameter is fixed)
            dc, dh, dg = prior_term(p0, fpar[F_MU], fpar[F_PREC], s2)
            cost += dc
            h00 += dh
            g0 += dg
            dc, dh, dg = prior_term(p1, fpar[F_MU + 1], fpar[F_PREC + 1], s2)
            cost += dc
            h11 += dh
            g1 += dg
            dc, dh, dg = prior_term(p2, fpar[F_MU + 2], fpar[F_PREC + 2], s2)
            cost += dc
            h22 += dh
            g2 += dg
            dc, dh, dg = prior_term(p3, fpar[F_MU + 3], fpar[F_PREC + 3], s2)
            cost += dc
            h33 += dh
            g3 += dg
        return rss, cost, h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, g0, g1, g2, g3

    @jit
    def chol4(h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, lam, a0, a1, a2, a3):
        """Cholesky factor L of (H + lam·diag(H)) over the active parameters.

        Inactive parameters (a_k == 0) get a unit row and column.  Returns (ok, l00, l10,
        l11, l20, l21, l22, l30, l31, l32, l33) with ok = 0 if the matrix is not
        numerically positive definite.
        """
        sc = ONE + lam
        m00 = h00 * sc if a0 else ONE
        m11 = h11 * sc if a1 else ONE
        m22 = h22 * sc if a2 else ONE
        m33 = h33 * sc if a3 else ONE
        m10 = h10 if (a1 and a0) else ZERO
        m20 = h20 if (a2 and a0) else ZERO
        m21 = h21 if (a2 and a1) else ZERO
        m30 = h30 if (a3 and a0) else ZERO
        m31 = h31 if (a3 and a1) else ZERO
        m32 = h32 if (a3 and a2) else ZERO
        fail = (ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO)
        if not m00 > PIVOT * (h00 if a0 else ONE):
            return fail
        l00 = math.sqrt(m00)
        l10 = m10 / l00
        l20 = m20 / l00
        l30 = m30 / l00
        d = m11 - l10 * l10
        if not d > PIVOT * (h11 if a1 else ONE):
            return fail
        l11 = math.sqrt(d)
        l21 = (m21 - l20 * l10) / l11
        l31 = (m31 - l30 * l10) / l11
        d = m22 - l20 * l20 - l21 * l21
        if not d > PIVOT * (h22 if a2 else ONE):
            return fail
        l22 = math.sqrt(d)
        l32 = (m32 - l30 * l20 - l31 * l21) / l22
        d = m33 - l30 * l30 - l31 * l31 - l32 * l32
        if not d > PIVOT * (h33 if a3 else ONE):
            return fail
        l33 = math.sqrt(d)
        return ONE, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33

    @jit
    def solve4(h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, r0, r1, r2, r3, lam, a0, a1, a2, a3):
        """Solve (H + lam·diag(H)) x = r over the active parameters by Cholesky.

        Inactive parameters (a_k == 0) get x_k = 0.  Returns (ok, x0, x1, x2, x3) with
        ok = 0 if the matrix is not numerically positive definite.
        """
        if not r0 == r0:  # NaN guard (keeps NaN out of the factor)
            return ZERO, ZERO, ZERO, ZERO, ZERO
        ok, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33 = chol4(
            h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, lam, a0, a1, a2, a3
        )
        if ok == ZERO:
            return ZERO, ZERO, ZERO, ZERO, ZERO
        z0 = (r0 if a0 else ZERO) / l00
        z1 = ((r1 if a1 else ZERO) - l10 * z0) / l11
        z2 = ((r2 if a2 else ZERO) - l20 * z0 - l21 * z1) / l22
        z3 = ((r3 if a3 else ZERO) - l30 * z0 - l31 * z1 - l32 * z2) / l33
        x3 = z3 / l33
        x2 = (z2 - l32 * x3) / l22
        x1 = (z1 - l21 * x2 - l31 * x3) / l11
        x0 = (z0 - l10 * x1 - l20 * x2 - l30 * x3) / l00
        return ONE, x0, x1, x2, x3

    @jit
    def inverse_diagonal(h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, a0, a1, a2, a3):
        """diag(H⁻¹) over the active parameters from one Cholesky factor (H⁻¹ = L⁻ᵀL⁻¹).

        Returns (ok, v0, v1, v2, v3); inactive parameters give 1 (unused).
        """
        ok, l00, l10, l11, l20, l21, l22, l30, l31, l32, l33 = chol4(
            h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, ZERO, a0, a1, a2, a3
        )
        if ok == ZERO:
            return ZERO, ZERO, ZERO, ZERO, ZERO
        # M = L⁻¹ (lower triangular); (H⁻¹)_kk = Σ_i≥k M_ik²
        m00 = ONE / l00
        m11 = ONE / l11
        m22 = ONE / l22
        m33 = ONE / l33
        m10 = -l10 * m00 * m11
        m21 = -l21 * m11 * m22
        m20 = -(l20 * m00 + l21 * m10) * m22
        m32 = -l32 * m22 * m33
        m31 = -(l31 * m11 + l32 * m21) * m33
        m30 = -(l30 * m00 + l31 * m10 + l32 * m20) * m33
        return (
            ONE,
            m00 * m00 + m10 * m10 + m20 * m20 + m30 * m30,
            m11 * m11 + m21 * m21 + m31 * m31,
            m22 * m22 + m32 * m32,
            m33 * m33,
        )

    @jit
    def is_active(free, p, g, lb, ub, hkk):
        """A free parameter moves this step unless it sits on a bound its gradient pushes against."""
        if free == 0 or not hkk > ZERO:
            return False
        if p <= lb and g < ZERO:
            return False
        if p >= ub and g > ZERO:
            return False
        return True

    @jit
    def clip(x, lb, ub):
        return min(max(x, lb), ub)

    @jit
    def small_step(old, new, tol):
        return abs(new - old) <= tol * (abs(old) + tol)

    @jit
    def initial_guess(v, y, si, gu, gw, fpar, ipar):
        """Coarse T1 grid with the linear part (M0, M0·A) in closed form; returns (m0, t1, a, g)."""
        n_grid = ipar[I_N_GRID]
        g = fpar[F_INIT + 3]
        fix_a = ipar[I_FREE + 2] == 0
        a_fix = fpar[F_INIT + 2]
        m0_lo = max(fpar[F_LB], ZERO)
        m0_hi = fpar[F_UB]
        a_lo = fpar[F_LB + 2]
        a_hi = fpar[F_UB + 2]
        log_lo = math.log(fpar[F_GRID_LO])
        step = (math.log(fpar[F_GRID_HI]) - log_lo) / f(n_grid - 1)
        syy = ZERO
        for j in range(y.shape[0]):
            syy += y[j, v] * y[j, v]
        best = INF
        best_k = 0
        best_m0 = ZERO
        best_b = ZERO
        r_prev = INF
        r_best_prev = INF
        r_best_next = INF
        for kk in range(n_grid):
            suu = ZERO
            suw = ZERO
            sww = ZERO
            suy = ZERO
            swy = ZERO
            for j in range(y.shape[0]):
                u = gu[si, kk, j]
                w = gw[si, kk, j]
                yj = y[j, v]
                if fix_a:
                    u = u + a_fix * w
                suu += u * u
                suw += u * w
                sww += w * w
                suy += u * yj
                swy += w * yj
            # The linear part within the bounds (M0 in [lb, ub], A in [lb, ub]): a start
            # chosen by the unbounded solution and clipped afterwards can land where T1
            # no longer matters (A or M0 = 0) and stay there.
            if fix_a:
                m0 = clip(suy / suu if suu > ZERO else ZERO, m0_lo, m0_hi)
                b = m0 * a_fix
                rss = syy - TWO * m0 * suy + m0 * m0 * suu
            else:
                det = suu * sww - suw * suw
                feasible = False
                rss = INF
                if det > EPS * suu * sww:
                    m0 = (sww * suy - suw * swy) / det
                    b = (suu * swy - suw * suy) / det
                    feasible = m0 > ZERO and m0 >= m0_lo and m0 <= m0_hi and b >= a_lo * m0 and b <= a_hi * m0
                    rss = syy - m0 * suy - b * swy
                if not feasible:
                    # the optimum of the bounded problem has A on a bound (or M0 = 0)
                    m0 = ZERO
                    b = ZERO
                    rss = INF
                    for side in range(2):
                        ab = a_lo if side == 0 else a_hi
                        if math.isfinite(ab):
                            sy = suy + ab * swy
                            ss = suu + TWO * ab * suw + ab * ab * sww
                            mm = clip(sy / ss if ss > ZERO else ZERO, m0_lo, m0_hi)
                            r = syy - TWO * mm * sy + mm * mm * ss
                            if r < rss:
                                rss = r
                                m0 = mm
                                b = mm * ab
            if kk == best_k + 1:
                r_best_next = rss
            if rss < best:
                best = rss
                best_k = kk
                best_m0 = m0
                best_b = b
                r_best_prev = r_prev
                r_best_next = INF
            r_prev = rss
        # parabola through (k-1, k, k+1) in log T1
        shift = ZERO
        if r_best_prev < INF and r_best_next < INF:
            curv = r_best_prev - TWO * best + r_best_next
            if curv > ZERO:
                shift = HALF * (r_best_prev - r_best_next) / curv
        t1 = math.exp(log_lo + step * (f(best_k) + shift))
        m0 = best_m0
        a = a_fix if fix_a else (best_b / m0 if m0 > ZERO else ONE)
        if ipar[I_FREE + 1] == 0:
            t1 = fpar[F_INIT + 1]
        return (
            clip(m0, fpar[F_LB], fpar[F_UB]),
            clip(t1, fpar[F_LB + 1], fpar[F_UB + 1]),
            clip(a, fpar[F_LB + 2], fpar[F_UB + 2]),
            clip(g, fpar[F_LB + 3], fpar[F_UB + 3]),
        )

    @jit
    def fit_voxel(v, y, ti, sidx, shifts, gu, gw, fpar, ipar, out_p, out_se, out_rss, out_iter, out_status):
        n_obs = y.shape[0]
        si = sidx[v]
        ts = shifts[si]
        finite = math.isfinite(ts)
        for j in range(n_obs):
            if not math.isfinite(y[j, v]):
                finite = False
        if not finite:
            for k in range(4):
                out_p[k, v] = ZERO
                out_se[k, v] = NAN if ipar[I_FREE + k] != 0 else ZERO
            out_rss[v] = NAN
            out_iter[v] = 0
            out_status[v] = STATUS_NONFINITE
            return
        fr0 = ipar[I_FREE]
        fr1 = ipar[I_FREE + 1]
        fr2 = ipar[I_FREE + 2]
        fr3 = ipar[I_FREE + 3]
        lb0 = fpar[F_LB]
        lb1 = fpar[F_LB + 1]
        lb2 = fpar[F_LB + 2]
        lb3 = fpar[F_LB + 3]
        ub0 = fpar[F_UB]
        ub1 = fpar[F_UB + 1]
        ub2 = fpar[F_UB + 2]
        ub3 = fpar[F_UB + 3]
        tol = fpar[F_TOL]
        max_iter = ipar[I_MAX_ITER]
        dof = n_obs - (fr0 + fr1 + fr2 + fr3)
        # statistical stop (Method 2); needs σ̂², i.e. dof > 0
        stat2 = fpar[F_STAT_TOL] * fpar[F_STAT_TOL] if dof > 0 else ZERO
        p0, p1, p2, p3 = initial_guess(v, y, si, gu, gw, fpar, ipar)
        s2 = ZERO  # prior weight σ̂² of the current stage (0: no priors)
        n_stages = 2 if (ipar[I_USE_PRIORS] != 0 and dof > 0) else 1
        it = 0
        status = STATUS_MAX_ITER
        rss = ZERO
        for stage in range(n_stages):
            rss, cost, h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, g0, g1, g2, g3 = evaluate(
                v, y, ti, ts, fpar, ipar, p0, p1, p2, p3, s2
            )
            lam = LAM0
            status = STATUS_MAX_ITER
            if not math.isfinite(cost):
                status = STATUS_SINGULAR
                break
            n = 0
            while n < max_iter:
                n += 1
                a0 = is_active(fr0, p0, g0, lb0, ub0, h00)
                a1 = is_active(fr1, p1, g1, lb1, ub1, h11)
                a2 = is_active(fr2, p2, g2, lb2, ub2, h22)
                a3 = is_active(fr3, p3, g3, lb3, ub3, h33)
                ok, d0, d1, d2, d3 = solve4(
                    h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, g0, g1, g2, g3, lam, a0, a1, a2, a3,
                )
                if ok == ZERO:
                    lam *= TEN
                    if lam > LAM_MAX:
                        status = STATUS_CONVERGED
                        break
                    continue
                q0 = clip(p0 + d0, lb0, ub0)
                q1 = clip(p1 + d1, lb1, ub1)
                q2 = clip(p2 + d2, lb2, ub2)
                q3 = clip(p3 + d3, lb3, ub3)
                if (small_step(p0, q0, tol) and small_step(p1, q1, tol)
                        and small_step(p2, q2, tol) and small_step(p3, q3, tol)):
                    status = STATUS_CONVERGED
                    break
                if stat2 > ZERO and a0 == (fr0 != 0) and a1 == (fr1 != 0) and a2 == (fr2 != 0) and a3 == (fr3 != 0):
                    # statistical stop (Method 2), only while no free parameter is held on a
                    # bound (the local step says nothing of an optimum off the bound): the
                    # damped step's decrement first (cheap), then the undamped one, which a
                    # large λ cannot make look small
                    thr = stat2 * rss / f(dof)
                    if (q0 - p0) * g0 + (q1 - p1) * g1 + (q2 - p2) * g2 + (q3 - p3) * g3 <= thr:
                        okn, n0, n1, n2, n3 = solve4(
                            h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, g0, g1, g2, g3, ZERO,
                            a0, a1, a2, a3,
                        )
                        if okn != ZERO and n0 * g0 + n1 * g1 + n2 * g2 + n3 * g3 <= thr:
                            status = STATUS_CONVERGED
                            break
                rt, ct, t00, t10, t11, t20, t21, t22, t30, t31, t32, t33, u0, u1, u2, u3 = evaluate(
                    v, y, ti, ts, fpar, ipar, q0, q1, q2, q3, s2
                )
                if ct <= cost:
                    p0, p1, p2, p3 = q0, q1, q2, q3
                    rss, cost = rt, ct
                    h00, h10, h11, h20, h21, h22, h30, h31, h32, h33 = t00, t10, t11, t20, t21, t22, t30, t31, t32, t33
                    g0, g1, g2, g3 = u0, u1, u2, u3
                    lam = max(lam * TENTH, LAM_MIN)
                else:
                    lam *= TEN
                    if lam > LAM_MAX:
                        status = STATUS_CONVERGED
                        break
            it += n
            if stage == 0 and n_stages == 2:
                s2 = rss / f(dof)
                if not s2 > ZERO:
                    break
        # standard errors: sqrt(diag(σ̂² (JᵀJ + σ̂²P)⁻¹)) over the free parameters at the solution
        out_p[0, v] = p0
        out_p[1, v] = p1
        out_p[2, v] = p2
        out_p[3, v] = p3
        out_rss[v] = rss
        out_iter[v] = it
        singular = status == STATUS_SINGULAR
        # dof <= 0: as many observations as free parameters, an exact fit whose standard
        # errors are undefined (no σ̂²): NaN, with the fit's own status
        exact = dof <= 0
        se0 = se1 = se2 = se3 = ZERO
        if not singular:
            var_s2 = s2 if s2 > ZERO else (rss / f(dof) if not exact else ZERO)
            ok, v0, v1, v2, v3 = inverse_diagonal(
                h00, h10, h11, h20, h21, h22, h30, h31, h32, h33, fr0 != 0, fr1 != 0, fr2 != 0, fr3 != 0,
            )
            if ok == ZERO:
                singular = True
            se0 = (math.sqrt(var_s2 * v0) if v0 >= ZERO else NAN) if fr0 else ZERO
            se1 = (math.sqrt(var_s2 * v1) if v1 >= ZERO else NAN) if fr1 else ZERO
            se2 = (math.sqrt(var_s2 * v2) if v2 >= ZERO else NAN) if fr2 else ZERO
            se3 = (math.sqrt(var_s2 * v3) if v3 >= ZERO else NAN) if fr3 else ZERO
        if singular or exact:
            out_se[0, v] = NAN if fr0 else ZERO
            out_se[1, v] = NAN if fr1 else ZERO
            out_se[2, v] = NAN if fr2 else ZERO
            out_se[3, v] = NAN if fr3 else ZERO
            if singular and (status == STATUS_CONVERGED or status == STATUS_MAX_ITER):
                status = STATUS_SINGULAR
        else:
            out_se[0, v] = se0
            out_se[1, v] = se1
            out_se[2, v] = se2
            out_se[3, v] = se3
        out_status[v] = status

    return fit_voxel
