"""Batched bounded least-squares fits of saturation-recovery / Look-Locker curves."""

from .design import DEFAULT_BOUNDS, FitDesign, fabber_priors, make_design
from .satrecov import STATUS_NAMES, SatrecovFit, fit_satrecov

__all__ = ["DEFAULT_BOUNDS", "FitDesign", "STATUS_NAMES", "SatrecovFit", "fabber_priors", "fit_satrecov", "make_design"]
