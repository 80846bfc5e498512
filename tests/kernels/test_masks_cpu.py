"""numba kernels of the brain mask (aslcal.kernels.masks_cpu) against scipy.ndimage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from aslcal.kernels.masks_cpu import get_mask_kernels

INPLANE = np.zeros((3, 3, 3), dtype=bool)
INPLANE[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def _masks(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(int(s) for s in rng.integers(1, 16, 3))
        field = ndi.gaussian_filter(rng.normal(size=shape), float(rng.uniform(0.5, 2.0)))
        yield field > np.quantile(field, rng.uniform(0.1, 0.9))
    yield np.zeros((4, 5, 6), bool)
    yield np.ones((4, 5, 6), bool)


@pytest.mark.parametrize("seed", range(3))
def test_largest_component_equals_scipy_label(seed):
    k = get_mask_kernels()
    for mask in _masks(seed, 80):
        labels, n = ndi.label(mask)
        if n:
            sizes = np.bincount(labels.reshape(-1))
            sizes[0] = 0
            expected = labels == np.argmax(sizes)  # ties: the lowest label, first in C order
        else:
            expected = np.zeros(mask.shape, bool)
        out = np.empty(mask.shape, bool)
        assert k.largest_component(np.ascontiguousarray(mask), out) == n
        np.testing.assert_array_equal(out, expected)


def test_largest_component_tie_goes_to_the_first_in_c_order():
    mask = np.zeros((3, 7, 3), bool)
    mask[0, 0:2, 0] = True  # two voxels, first in C order
    mask[2, 5:7, 2] = True  # two voxels
    out = np.empty(mask.shape, bool)
    get_mask_kernels().largest_component(mask, out)
    assert out[0, 0, 0] and not out[2, 5, 2]


@pytest.mark.parametrize("seed", range(3))
def test_fill_holes_inplane_equals_binary_fill_holes(seed):
    k = get_mask_kernels()
    for mask in _masks(seed, 80):
        for m in (mask, mask & ~ndi.binary_erosion(mask, iterations=2), ~mask):
            m = np.ascontiguousarray(m)
            out = np.empty_like(m)
            k.fill_holes_inplane(m, out)
            np.testing.assert_array_equal(out, ndi.binary_fill_holes(m, structure=INPLANE))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histogram_equals_numpy_binning(dtype):
    rng = np.random.default_rng(5)
    values = (rng.gamma(2.0, 300.0, 50_000)).astype(dtype)
    lo, hi = float(values.min()), float(np.quantile(values, 0.995))
    counts = np.zeros(256, dtype=np.int64)
    f = np.dtype(dtype).type
    get_mask_kernels().histogram(values, f(lo), f(hi), f(256 / (hi - lo)), counts)
    index = np.minimum(((np.clip(values, lo, hi) - lo) * (256 / (hi - lo))).astype(np.int64), 255)
    np.testing.assert_array_equal(counts, np.bincount(index, minlength=256))
    # and np.histogram agrees away from 1-ulp bin-edge ties (none in this sample)
    np.testing.assert_array_equal(counts, np.histogram(np.clip(values, lo, hi), bins=256, range=(lo, hi))[0])
