"""Bounded Levenberg–Marquardt fit of one voxel, written once over scalars.

:func:`make_fit_voxel` returns ``fit_voxel(v, y, ti, low, tshift, fpar, ipar, work,
out_p, out_se, out_rss, out_iter, out_status)`` for one dtype, decorated with the given
``jit`` (``numba.njit`` for the CPU driver in :mod:`lm_cpu`, ``cuda.jit(device=True)``
for the CUDA kernel in :mod:`lm_cuda`, identity for plain Python).  The two drivers only
differ in how they allocate ``work`` (a scratch vector of :data:`N_WORK` values) and
which voxels each thread visits.

Layouts (chosen for coalesced reads on the GPU: consecutive threads = consecutive voxels)
-------------------------------------------------------------------------------------------
y        : (n_obs, n_vox)  observations, one column per voxel
ti       : (n_obs,)        recovery time of each volume (s)
low      : (n_obs,)        int32, 1 for the low-flip-angle phase
tshift   : (n_vox,)        slice-timing shift added to every TI of the voxel (s)
fpar     : (N_FPAR,)       float parameters, see the F_* offsets
ipar     : (N_IPAR,)       int32 parameters, see the I_* offsets
out_p    : (4, n_vox)      m0t, t1t, a, g
out_se   : (4, n_vox)      standard errors (0 for fixed parameters, NaN when undefined)
out_rss  : (n_vox,)        residual sum of squares (data term)
out_iter : (n_vox,)        int32 LM iterations
out_status: (n_vox,)       int32 status code (STATUS_* below)

Method
------
1. Initial guess: for fixed T1 (and g) the model is linear in M0 and M0·A, so a coarse
   log-spaced T1 grid with the linear part solved in closed form, refined by a parabola
   through the best three grid points, gives a near-global start.
2. Levenberg–Marquardt with Marquardt scaling (damping λ·diag(JᵀJ)), box bounds by
   projection with an active set (a parameter at a bound whose gradient points outward is
   held for that step), fixed parameters excluded.
3. Optional Gaussian priors (MAP): first a fit without priors gives σ̂² = RSS/(n − p);
   then the objective RSS + σ̂² Σ (θ−μ)²/v is minimised from that solution.
4. Standard errors: sqrt(diag(σ̂² (JᵀJ + σ̂² P)⁻¹)) over the free parameters.
"""

from __future__ import annotations

import math

import numpy as np

from aslcal.physics.satrecov import make_satrecov_model

__all__ = [
    "N_PARAMS", "N_WORK", "N_FPAR", "N_IPAR", "STATUS_NAMES",
    "STATUS_CONVERGED", "STATUS_MAX_ITER", "STATUS_SINGULAR", "STATUS_NONFINITE",
    "STATUS_OUT_OF_MASK", "STATUS_UNDERDETERMINED", "make_fit_voxel",
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
F_PREC = 24  # 4 prior precisions 1/v (0 = no prior)
N_FPAR = 28
# ipar offsets
I_MODE, I_MAX_ITER, I_N_GRID, I_USE_PRIORS = range(4)
I_FREE = 4  # 4 flags: 1 = fitted, 0 = fixed
N_IPAR = 8

# work offsets
W_P = 0  # current parameters
W_PT = 4  # trial parameters
W_H = 8  # 4x4 JᵀJ (+ prior) at the current point
W_G = 24  # Jᵀr (+ prior) at the current point
W_HT = 28  # 4x4 at the trial point
W_GT = 44  # 4-vector at the trial point
W_L = 48  # 4x4 Cholesky factor
W_D = 64  # step / solve vector
W_ACT = 68  # active flags of this step
N_WORK = 72


def make_fit_voxel(dtype=np.float64, jit=lambda fn: fn):
    """Return the single-voxel fitter for ``dtype`` built with decorator ``jit``."""
    model = make_satrecov_model(dtype, jit)
    phase_coefficients = model.phase_coefficients
    obs_signal_grad = model.obs_signal_grad
    f = np.dtype(dtype).type
    ZERO = f(0.0)
    ONE = f(1.0)
    HALF = f(0.5)
    TEN = f(10.0)
    TENTH = f(0.1)
    LAM0 = f(1e-3)
    LAM_MIN = f(1e-12)
    LAM_MAX = f(1e12)
    EPS = f(np.finfo(dtype).eps)
    NAN = f(np.nan)
    INF = f(np.inf)

    @jit
    def evaluate(v, y, ti, low, tshift, fpar, ipar, p_off, work, h_off, g_off, s2):
        """Fill JᵀJ (+ priors) and Jᵀr at work[p_off:]; return (rss, cost)."""
        mode = ipar[I_MODE]
        ts = tshift[v]
        ti1h = fpar[F_TI1_HIGH] + ts
        ti1l = fpar[F_TI1_LOW] + ts
        dt = fpar[F_DT]
        fa = fpar[F_FA]
        lfa = fpar[F_LFA]
        m0 = work[p_off]
        t1 = work[p_off + 1]
        a = work[p_off + 2]
        g = work[p_off + 3]
        f0 = ipar[I_FREE] != 0
        f1 = ipar[I_FREE + 1] != 0
        f2 = ipar[I_FREE + 2] != 0
        f3 = ipar[I_FREE + 3] != 0
        # accumulate in scalars (registers), not in the scratch vector
        h00 = h10 = h11 = h20 = h21 = h22 = h30 = h31 = h32 = h33 = ZERO
        g0 = g1 = g2 = g3 = ZERO
        rss = ZERO
        ch = phase_coefficients(mode, t1, a, g, ti1h, dt, fa, lfa, 0)
        cl = phase_coefficients(mode, t1, a, g, ti1l, dt, fa, lfa, 1) if lfa > ZERO else ch
        for j in range(y.shape[0]):
            s, d0, d1, d2, d3 = obs_signal_grad(m0, cl if low[j] != 0 else ch, ti[j] + ts)
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
        work[g_off] = g0
        work[g_off + 1] = g1
        work[g_off + 2] = g2
        work[g_off + 3] = g3
        work[h_off] = h00
        work[h_off + 1] = work[h_off + 4] = h10
        work[h_off + 5] = h11
        work[h_off + 2] = work[h_off + 8] = h20
        work[h_off + 6] = work[h_off + 9] = h21
        work[h_off + 10] = h22
        work[h_off + 3] = work[h_off + 12] = h30
        work[h_off + 7] = work[h_off + 13] = h31
        work[h_off + 11] = work[h_off + 14] = h32
        work[h_off + 15] = h33
        cost = rss
        if s2 > ZERO:
            for k in range(4):
                pk = fpar[F_PREC + k]
                if ipar[I_FREE + k] != 0 and pk > ZERO:
                    dev = work[p_off + k] - fpar[F_MU + k]
                    w = s2 * pk
                    cost += w * dev * dev
                    work[h_off + 5 * k] += w
                    work[g_off + k] -= w * dev
        return rss, cost

    @jit
    def cholesky_solve(work, m_off, lam, rhs_off, act_off):
        """Solve (M + lam·diag(M)) d = rhs over active params into work[W_D:].

        M is read from work[m_off:], the factor is built in work[W_L:]; inactive
        parameters get d = 0.  Returns False if the matrix is not positive definite.
        """
        for k in range(4):
            for m in range(4):
                if work[act_off + k] != ZERO and work[act_off + m] != ZERO:
                    val = work[m_off + 4 * k + m]
                    if k == m:
                        val = val * (ONE + lam)
                    work[W_L + 4 * k + m] = val
                else:
                    work[W_L + 4 * k + m] = ONE if k == m else ZERO
        for k in range(4):
            diag = work[W_L + 5 * k]
            for m in range(k):
                diag -= work[W_L + 4 * k + m] * work[W_L + 4 * k + m]
            ref = work[m_off + 5 * k] if work[act_off + k] != ZERO else ONE
            if not (diag > f(64.0) * EPS * ref) or not (diag > ZERO):
                return False
            lkk = math.sqrt(diag)
            work[W_L + 5 * k] = lkk
            for i in range(k + 1, 4):
                val = work[W_L + 4 * i + k]
                for m in range(k):
                    val -= work[W_L + 4 * i + m] * work[W_L + 4 * k + m]
                work[W_L + 4 * i + k] = val / lkk
        for k in range(4):
            val = work[rhs_off + k] if work[act_off + k] != ZERO else ZERO
            for m in range(k):
                val -= work[W_L + 4 * k + m] * work[W_D + m]
            work[W_D + k] = val / work[W_L + 5 * k]
        for k in range(3, -1, -1):
            val = work[W_D + k]
            for m in range(k + 1, 4):
                val -= work[W_L + 4 * m + k] * work[W_D + m]
            work[W_D + k] = val / work[W_L + 5 * k]
        return True

    @jit
    def initial_guess(v, y, ti, low, tshift, fpar, ipar, work):
        """Coarse T1 grid with the linear part (M0, M0·A) in closed form."""
        mode = ipar[I_MODE]
        n_grid = ipar[I_N_GRID]
        ts = tshift[v]
        ti1h = fpar[F_TI1_HIGH] + ts
        ti1l = fpar[F_TI1_LOW] + ts
        dt = fpar[F_DT]
        fa = fpar[F_FA]
        lfa = fpar[F_LFA]
        g = fpar[F_INIT + 3]
        fix_a = ipar[I_FREE + 2] == 0
        a_fix = fpar[F_INIT + 2]
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
            t1 = math.exp(log_lo + step * f(kk))
            ch = phase_coefficients(mode, t1, ZERO, g, ti1h, dt, fa, lfa, 0)
            cl = phase_coefficients(mode, t1, ZERO, g, ti1l, dt, fa, lfa, 1) if lfa > ZERO else ch
            suu = ZERO
            suw = ZERO
            sww = ZERO
            suy = ZERO
            swy = ZERO
            for j in range(y.shape[0]):
                u, _d0, _d1, w, _d3 = obs_signal_grad(ONE, cl if low[j] != 0 else ch, ti[j] + ts)
                yj = y[j, v]
                if fix_a:
                    u = u + a_fix * w
                suu += u * u
                suw += u * w
                sww += w * w
                suy += u * yj
                swy += w * yj
            if fix_a:
                m0 = suy / suu if suu > ZERO else ZERO
                b = m0 * a_fix
                rss = syy - m0 * suy
            else:
                det = suu * sww - suw * suw
                if det > EPS * suu * sww:
                    m0 = (sww * suy - suw * swy) / det
                    b = (suu * swy - suw * suy) / det
                else:
                    m0 = suy / suu if suu > ZERO else ZERO
                    b = ZERO
                rss = syy - m0 * suy - b * swy
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
            curv = r_best_prev - f(2.0) * best + r_best_next
            if curv > ZERO:
                shift = HALF * (r_best_prev - r_best_next) / curv
        t1 = math.exp(log_lo + step * (f(best_k) + shift))
        m0 = best_m0
        a = a_fix if fix_a else (best_b / m0 if m0 > ZERO else ONE)
        work[W_P] = m0
        work[W_P + 1] = t1
        work[W_P + 2] = a
        work[W_P + 3] = g
        for k in range(4):
            if ipar[I_FREE + k] == 0:
                if k > 0:
                    work[W_P + k] = fpar[F_INIT + k]
            work[W_P + k] = min(max(work[W_P + k], fpar[F_LB + k]), fpar[F_UB + k])

    @jit
    def minimise(v, y, ti, low, tshift, fpar, ipar, work, s2, max_iter):
        """LM from work[W_P:]; returns (status, iterations, rss, cost)."""
        tol = fpar[F_TOL]
        rss, cost = evaluate(v, y, ti, low, tshift, fpar, ipar, W_P, work, W_H, W_G, s2)
        if not math.isfinite(cost):
            return STATUS_SINGULAR, 0, rss, cost
        lam = LAM0
        it = 0
        status = STATUS_MAX_ITER
        while it < max_iter:
            it += 1
            for k in range(4):
                act = ONE if ipar[I_FREE + k] != 0 else ZERO
                pk = work[W_P + k]
                gk = work[W_G + k]
                if (pk <= fpar[F_LB + k] and gk < ZERO) or (pk >= fpar[F_UB + k] and gk > ZERO):
                    act = ZERO
                if not (work[W_H + 5 * k] > ZERO):
                    act = ZERO
                work[W_ACT + k] = act
            if not cholesky_solve(work, W_H, lam, W_G, W_ACT):
                lam *= TEN
                if lam > LAM_MAX:
                    status = STATUS_CONVERGED
                    break
                continue
            small = True
            for k in range(4):
                pk = work[W_P + k]
                nk = min(max(pk + work[W_D + k], fpar[F_LB + k]), fpar[F_UB + k])
                work[W_PT + k] = nk
                if abs(nk - pk) > tol * (abs(pk) + tol):
                    small = False
            if small:
                status = STATUS_CONVERGED
                break
            rss_t, cost_t = evaluate(v, y, ti, low, tshift, fpar, ipar, W_PT, work, W_HT, W_GT, s2)
            if cost_t <= cost:
                for k in range(4):
                    work[W_P + k] = work[W_PT + k]
                    work[W_G + k] = work[W_GT + k]
                for k in range(16):
                    work[W_H + k] = work[W_HT + k]
                rss = rss_t
                cost = cost_t
                lam = max(lam * TENTH, LAM_MIN)
            else:
                lam *= TEN
                if lam > LAM_MAX:
                    status = STATUS_CONVERGED
                    break
        return status, it, rss, cost

    @jit
    def fit_voxel(v, y, ti, low, tshift, fpar, ipar, work, out_p, out_se, out_rss, out_iter, out_status):
        n_obs = y.shape[0]
        finite = True
        for j in range(n_obs):
            if not math.isfinite(y[j, v]):
                finite = False
        if not finite or not math.isfinite(tshift[v]):
            for k in range(4):
                out_p[k, v] = ZERO
                out_se[k, v] = NAN
            out_rss[v] = NAN
            out_iter[v] = 0
            out_status[v] = STATUS_NONFINITE
            return
        n_free = 0
        for k in range(4):
            n_free += ipar[I_FREE + k]
        initial_guess(v, y, ti, low, tshift, fpar, ipar, work)
        max_iter = ipar[I_MAX_ITER]
        status, it, rss, cost = minimise(v, y, ti, low, tshift, fpar, ipar, work, ZERO, max_iter)
        dof = n_obs - n_free
        s2 = rss / f(dof) if dof > 0 else NAN
        if ipar[I_USE_PRIORS] != 0 and dof > 0:
            s2p = s2 if s2 > ZERO else ZERO
            status, it2, rss, cost = minimise(v, y, ti, low, tshift, fpar, ipar, work, s2p, max_iter)
            it += it2
        # standard errors from the undamped (JᵀJ + σ̂² P) at the solution
        for k in range(4):
            work[W_ACT + k] = ONE if ipar[I_FREE + k] != 0 else ZERO
        singular = not (dof > 0)
        if not singular:
            for k in range(4):
                if work[W_ACT + k] != ZERO and not (work[W_H + 5 * k] > ZERO):
                    singular = True
        for k in range(4):
            out_se[k, v] = ZERO if ipar[I_FREE + k] == 0 else NAN
        if not singular:
            for k in range(4):
                work[W_G + k] = ZERO
            if cholesky_solve(work, W_H, ZERO, W_G, W_ACT):
                for k in range(4):
                    if ipar[I_FREE + k] != 0:
                        for m in range(4):
                            work[W_GT + m] = ONE if m == k else ZERO
                        cholesky_solve(work, W_H, ZERO, W_GT, W_ACT)
                        var = s2 * work[W_D + k]
                        out_se[k, v] = math.sqrt(var) if var >= ZERO else NAN
            else:
                singular = True
        for k in range(4):
            out_p[k, v] = work[W_P + k]
        out_rss[v] = rss
        out_iter[v] = it
        if singular and status == STATUS_CONVERGED:
            status = STATUS_SINGULAR
        out_status[v] = status

    return fit_voxel
