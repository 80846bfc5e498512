"""Shift-based binary morphology (aslcal.masks.morphology) against scipy.ndimage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from aslcal.masks.morphology import binary_dilation, binary_erosion
from aslcal.masks.ventricles import _ellipsoid


def _cases(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(int(s) for s in rng.integers(1, 14, 3))
        mask = rng.random(shape) < rng.random()
        radius = float(rng.uniform(0.5, 4.5))
        voxel = tuple(float(v) for v in rng.uniform(0.7, 2.6, 3))
        yield mask, _ellipsoid(radius, voxel)


@pytest.mark.parametrize("seed", range(3))
def test_erosion_equals_scipy(seed):
    for mask, ball in _cases(seed, 60):
        for border in (False, True):
            np.testing.assert_array_equal(binary_erosion(mask, ball, border_value=border),
                                          ndi.binary_erosion(mask, structure=ball, border_value=border))


@pytest.mark.parametrize("seed", range(3))
def test_dilation_equals_scipy(seed):
    for mask, ball in _cases(seed, 60):
        np.testing.assert_array_equal(binary_dilation(mask, ball), ndi.binary_dilation(mask, structure=ball))


def test_other_symmetric_elements_and_2d():
    rng = np.random.default_rng(7)
    mask = rng.random((30, 25)) < 0.6
    for st in (np.ones((3, 5), bool), ndi.generate_binary_structure(2, 1), np.ones((1, 1), bool)):
        np.testing.assert_array_equal(binary_erosion(mask, st), ndi.binary_erosion(mask, structure=st))
        np.testing.assert_array_equal(binary_dilation(mask, st), ndi.binary_dilation(mask, structure=st))


def test_rejects_asymmetric_even_or_empty_elements():
    mask = np.ones((5, 5, 5), bool)
    with pytest.raises(ValueError, match="point-symmetric"):
        binary_erosion(mask, np.array([[[0, 1, 1]]], bool))
    with pytest.raises(ValueError, match="odd"):
        binary_dilation(mask, np.ones((2, 3, 3), bool))
    with pytest.raises(ValueError, match="no offsets"):
        binary_dilation(mask, np.zeros((3, 3, 3), bool))
