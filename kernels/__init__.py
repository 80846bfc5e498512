"""Numba kernels (CPU and CUDA) compiled from the scalar physics in aslcal.physics."""
