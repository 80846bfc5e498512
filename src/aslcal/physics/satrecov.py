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
        ``signal_grad(mode, m0, t1, a, g, ti, ti1, dt, fa, lfa, low)`` returning the
        tuple ``(S, dS/dm0, dS/dt1, dS/da, dS/dg)``.
    """
    f = np.dtype(dtype).type
    ZERO = f(0.0)
    ONE = f(1.0)
    OFFSET = f(LFA_OFFSET)

    @jit
    def signal_grad(mode, m0, t1, a, g, ti, ti1, dt, fa, lfa, low):
        r1 = ONE / t1
        inv_t1sq = r1 * r1
        if mode == 0:
            # Plain saturation recovery; g does not enter.
            e = math.exp(-ti * r1)
            k = ONE - a * e
            return m0 * k, k, -m0 * a * e * ti * inv_t1sq, -m0 * e, ZERO
        # Look-Locker: effective readout angle and the scale q of this phase.
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
        sn = math.sin(th)
        e = math.exp(-dt * r1)
        den = ONE - c * e
        r = (ONE - e) / den
        dr_dt1 = (c - ONE) / (den * den) * e * dt * inv_t1sq
        dr_dc = (ONE - e) * e / (den * den)
        rate = r1 - math.log(c) / dt  # 1 / T1app
        if mode == 1:
            # Exact train: S = M0 q [ r + (1 - A e^{-TI1/T1} - r) e^{-(TI-TI1)/T1app} ]
            tau = ti - ti1
            fdec = math.exp(-tau * rate)
            b = math.exp(-ti1 * r1)
            off = ONE - a * b - r
            k = r + off * fdec
            dk_dt1 = dr_dt1 * (ONE - fdec) + off * fdec * tau * inv_t1sq - a * fdec * b * ti1 * inv_t1sq
            dk_da = -b * fdec
            dk_dc = dr_dc * (ONE - fdec) + off * fdec * tau / (c * dt)
        else:
            # fabber: S = M0 r q (1 - A e^{-TI/T1app})
            gdec = math.exp(-ti * rate)
            h = ONE - a * gdec
            k = r * h
            dk_dt1 = dr_dt1 * h - r * a * gdec * ti * inv_t1sq
            dk_da = -r * gdec
            dk_dc = dr_dc * h - r * a * gdec * ti / (c * dt)
        dk_dg = -dk_dc * sn * dth
        return m0 * q * k, q * k, m0 * q * dk_dt1, m0 * q * dk_da, m0 * (dq * k + q * dk_dg)

    return SimpleNamespace(signal_grad=signal_grad, dtype=np.dtype(dtype))
