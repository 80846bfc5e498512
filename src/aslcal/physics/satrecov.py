"""Saturation-recovery and Look-Locker signal models, written once over scalars.

This module holds the physics of calibration.md §7.1 as plain Python over scalars with
``math`` only.  :func:`make_satrecov_model` returns the functions for one floating
point type; ``kernels/`` compiles the *same* functions with ``numba.njit`` (CPU) and
``numba.cuda.jit(device=True)`` (GPU).  Constants are frozen into the closure with the
requested type, so a float32 build never promotes to float64 (a bare ``1.0`` literal
would).  No numba or CuPy is imported here.

Parameters of the model (per voxel)
-----------------------------------
m0 : fully relaxed magnetisation on the scale of the high-flip-angle readout (signal units)
t1 : tissue T1 (seconds)
a  : saturation efficiency (1 = perfect saturation)
g  : flip-angle correction factor (effective angle = g * nominal angle)

Observation descriptors
-----------------------
ti  : recovery time of this volume (s), already shifted for slice timing
ti1 : first readout time of this volume's Look-Locker phase (s), same shift
dt  : Look-Locker readout spacing Δt (s)
fa, lfa : nominal high and low flip angles (radians)
low : 1 if the volume belongs to the low-flip-angle phase, else 0
mode: :data:`MODE_SR`, :data:`MODE_LL` (exact readout train) or :data:`MODE_LL_FABBER`
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

__all__ = [
    "LFA_OFFSET",
    "MODE_LL",
    "MODE_LL_FABBER",
    "MODE_SR",
    "MODES",
    "PARAM_NAMES",
    "make_satrecov_model",
]

#: Plain saturation recovery: S = M0 (1 - A exp(-TI/T1)).
MODE_SR = 0
#: Look-Locker readout train, exact closed form (calibration.md §7.1).
MODE_LL = 1
#: fabber's per-phase Look-Locker form (parity with FSL only; biased with several angles).
MODE_LL_FABBER = 2
MODES = {"sr": MODE_SR, "ll": MODE_LL, "fabber": MODE_LL_FABBER}

#: Order of the parameters in every packed array.
PARAM_NAMES = ("m0t", "t1t", "a", "g")

#: fabber's empirical offset of the low-flip-angle correction: θ_low = (g + 0.023)·LFA.
LFA_OFFSET = 0.023


def _identity(fn):
    return fn


def make_satrecov_model(dtype=np.float64, jit=_identity) -> SimpleNamespace:
    """Build the scalar signal model for one floating-point type.

    Every model of this module has the same per-observation shape.  With
    F = exp(-τ·rate) and τ = TI − TI0:

        K      = P0 + P1·F
        S      = m0·q·K
        dS/dm0 = q·K
        dS/dt1 = m0·q·(Q0 + F·(Q1 + Q2·τ))
        dS/da  = m0·q·R1·F
        dS/dg  = m0·(dq·K + q·(U0 + F·(U1 + U2·τ)))

    where the coefficients depend on the parameters and the phase (high or low flip
    angle) but not on TI.  :func:`phase_coefficients` computes them once per phase (all
    the trigonometry and logarithms); :func:`obs_signal_grad` is then one exponential
    per observation.  That split is what makes a 90-volume Look-Locker fit cheap.

    Parameters
    ----------
    dtype : numpy float dtype
        Type of every constant used inside the functions.
    jit : callable
        Decorator applied to every function (identity for plain Python, ``numba.njit``
        for the CPU, ``numba.cuda.jit(device=True)`` for CUDA).

    Returns
    -------
    SimpleNamespace
        ``phase_coefficients(mode, t1, a, g, ti1, dt, fa, lfa, low)`` → 13-tuple
        ``(ti0, rate, q, dq, P0, P1, Q0, Q1, Q2, R1, U0, U1, U2)``;
        ``obs_signal_grad(m0, c, ti)`` → ``(S, dS/dm0, dS/dt1, dS/da, dS/dg)`` for the
        coefficient tuple ``c``; ``obs_signal_grad_decay(m0, c, tau, fdec)``, the same
        given τ and F (readouts evenly spaced by Δ: F advances by the factor
        exp(−Δ·rate), so a train needs no exponential per readout);
        ``obs_basis(c, ti)`` → ``(u, w)``, the two columns of the
        model's linear part (S = M0·u + M0·A·w) for coefficients computed with A = 0; and
        ``signal_grad(mode, m0, t1, a, g, ti, ti1, dt, fa,
        lfa, low)``, the two composed for a single observation.
    """
    f = np.dtype(dtype).type
    ZERO = f(0.0)
    ONE = f(1.0)
    OFFSET = f(LFA_OFFSET)

    @jit
    def phase_coefficients(mode, t1, a, g, ti1, dt, fa, lfa, low):
        r1 = ONE / t1
        r1sq = r1 * r1
        if mode == 0:
            # Plain saturation recovery, S = M0 (1 - A e^{-TI/T1}); g does not enter.
            return (ZERO, r1, ONE, ZERO, ONE, -a, ZERO, ZERO, -a * r1sq, -ONE, ZERO, ZERO, ZERO)
        # Look-Locker: effective readout angle θ and the scale q of this phase.
        th_h = g * fa
        if low != 0:
            th = (g + OFFSET) * lfa
            dth = lfa
            s_h = math.sin(th_h)
            s_l = math.sin(th)
            q = s_l / s_h
            dq = (math.cos(th) * lfa * s_h - s_l * math.cos(th_h) * fa) / (s_h * s_h)
        else:
            th = th_h
            dth = fa
            q = ONE
            dq = ZERO
        c = math.cos(th)
        dc_dg = -math.sin(th) * dth
        e = math.exp(-dt * r1)
        den = ONE - c * e
        r = (ONE - e) / den  # steady state, fraction of M0
        dr_dt1 = (c - ONE) / (den * den) * e * dt * r1sq
        dr_dc = (ONE - e) * e / (den * den)
        rate = r1 - math.log(c) / dt  # 1 / T1app
        if mode == 1:
            # Exact train: K = r + (1 - A e^{-TI1/T1} - r) e^{-(TI-TI1)/T1app}
            b = math.exp(-ti1 * r1)
            off = ONE - a * b - r
            return (
                ti1, rate, q, dq, r, off,
                dr_dt1, -dr_dt1 - a * b * ti1 * r1sq, off * r1sq,
                -b,
                dc_dg * dr_dc, -dc_dg * dr_dc, dc_dg * off / (c * dt),
            )
        # fabber's form: K = r (1 - A e^{-TI/T1app})
        return (
            ZERO, rate, q, dq, r, -r * a,
            dr_dt1, -a * dr_dt1, -r * a * r1sq,
            -r,
            dc_dg * dr_dc, -a * dc_dg * dr_dc, -dc_dg * r * a / (c * dt),
        )

    @jit
    def obs_signal_grad_decay(m0, c, tau, fdec):
        """:func:`obs_signal_grad` given τ = TI − TI0 and its decay F = exp(−τ·rate)."""
        q = c[2]
        k = c[4] + c[5] * fdec
        mq = m0 * q
        return (
            mq * k,
            q * k,
            mq * (c[6] + fdec * (c[7] + c[8] * tau)),
            mq * c[9] * fdec,
            m0 * (c[3] * k + q * (c[10] + fdec * (c[11] + c[12] * tau))),
        )

    @jit
    def obs_signal_grad(m0, c, ti):
        tau = ti - c[0]
        return obs_signal_grad_decay(m0, c, tau, math.exp(-tau * c[1]))

    @jit
    def obs_basis(c, ti):
        """For coefficients computed with A = 0: (u, w) with S = M0·u + (M0·A)·w."""
        fdec = math.exp(-(ti - c[0]) * c[1])
        return c[2] * (c[4] + c[5] * fdec), c[2] * c[9] * fdec

    @jit
    def signal_grad(mode, m0, t1, a, g, ti, ti1, dt, fa, lfa, low):
        return obs_signal_grad(m0, phase_coefficients(mode, t1, a, g, ti1, dt, fa, lfa, low), ti)

    return SimpleNamespace(
        phase_coefficients=phase_coefficients,
        obs_signal_grad=obs_signal_grad,
        obs_signal_grad_decay=obs_signal_grad_decay,
        obs_basis=obs_basis,
        signal_grad=signal_grad,
        dtype=np.dtype(dtype),
    )
