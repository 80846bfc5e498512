"""Binary erosion and dilation by small symmetric structuring elements, as array shifts.

``scipy.ndimage.binary_erosion`` / ``binary_dilation`` visit every voxel and, for each,
the offsets of the structuring element one by one; for the balls of the brain mask
(tens of offsets on a 100k-voxel image) that costs 1.5-4 ms a call, most of the brain
mask's time.  Here the image is padded by the element's half-size with the border
value and flattened, so that every offset of the element is one *flat* offset of the
padded array: the erosion is the AND, the dilation the OR, of one contiguous shifted
slice per offset (a vectorised pass over contiguous memory each).  For any voxel of
the original grid the shifted positions stay inside the padding, so the result equals
SciPy's exactly (tests compare them on random images and elements); it is several
times faster on NumPy and runs unchanged on CuPy.

Only point-symmetric elements of odd shape are accepted (balls, boxes, crosses): for
them erosion and dilation do not depend on which way an offset is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import array_namespace

__all__ = ["binary_dilation", "binary_erosion"]


def _check_structure(structure: np.ndarray, ndim: int) -> np.ndarray:
    s = np.asarray(structure, dtype=bool)
    if s.ndim != ndim or any(n % 2 == 0 for n in s.shape):
        raise ValueError(f"structure of shape {s.shape}: expected {ndim} odd sizes")
    if not np.array_equal(s, s[(slice(None, None, -1),) * ndim]):
        raise ValueError("structure must be point-symmetric (equal to itself reversed on every axis)")
    if not s.any():
        raise ValueError("structure has no offsets")
    return s


def _layout(shape: tuple[int, ...], s: np.ndarray) -> tuple[tuple[int, ...], tuple[slice, ...], list[int], int, int]:
    """Padded shape, the original grid within it, the flat offsets, and the flat range
    [start, stop) from the first to the last original voxel."""
    half = [n // 2 for n in s.shape]
    padded = tuple(int(n) + 2 * h for n, h in zip(shape, half, strict=True))
    inner = tuple(slice(h, h + int(n)) for h, n in zip(half, shape, strict=True))
    strides = np.cumprod((1,) + padded[:0:-1])[::-1]  # C-order element strides
    offsets = [int(o) for o in (np.argwhere(s) - np.asarray(half)) @ strides]
    start = int(np.dot(half, strides))
    stop = int(np.dot([h + int(n) - 1 for h, n in zip(half, shape, strict=True)], strides)) + 1
    return padded, inner, offsets, start, stop


def _shifted(mask: Any, structure: np.ndarray, border: bool, erode: bool) -> Any:
    xp = array_namespace(mask)
    s = _check_structure(structure, mask.ndim)
    shape, inner, offsets, start, stop = _layout(tuple(mask.shape), s)
    padded = xp.full(shape, border, dtype=xp.bool)  # (xp.pad is 10x slower at this size)
    padded[inner] = mask
    flat = xp.reshape(padded, (-1,))
    out = xp.empty(shape, dtype=xp.bool)
    acc = xp.reshape(out, (-1,))[start:stop]
    acc[...] = flat[start + offsets[0]:stop + offsets[0]]
    for off in offsets[1:]:
        if erode:
            acc &= flat[start + off:stop + off]
        else:
            acc |= flat[start + off:stop + off]
    return out[inner]


def binary_erosion(mask: Any, structure: np.ndarray, *, border_value: bool = False) -> Any:
    """Erosion of a boolean array by a point-symmetric ``structure`` (host array).

    Equal to ``scipy.ndimage.binary_erosion(mask, structure, border_value=...)``: a voxel
    stays True when every voxel under the element centred on it is True, voxels outside
    the array counting as ``border_value``.  On the device of ``mask``.
    """
    return _shifted(mask, structure, bool(border_value), erode=True)


def binary_dilation(mask: Any, structure: np.ndarray) -> Any:
    """Dilation of a boolean array by a point-symmetric ``structure`` (host array).

    Equal to ``scipy.ndimage.binary_dilation(mask, structure)``: a voxel becomes True
    when any voxel under the element centred on it is True.  On the device of ``mask``.
    """
    return _shifted(mask, structure, False, erode=False)
