"""numba CPU kernels of the brain mask's binary steps (NumPy path of aslcal.masks).

The brain mask runs once per subject in the cohort runner's reader threads, next to
threads that read, compress and write files.  Its labelling steps (the largest
component of the eroded candidates, and twice the in-plane hole filling) took a third
of its time with ``scipy.ndimage.label``; here each is one compiled pass that
releases the GIL (``nogil``), so it also overlaps with the I/O threads:

* ``largest_component``: the largest 6-connected component (ties: the one whose
  first voxel comes first in C order, as ``scipy.ndimage.label`` numbers them), by a
  flood fill;
* ``fill_holes_inplane``: fill the background components of each slice along the
  last axis (4-connected in the first two axes) that do not reach the slice's edge --
  ``binary_fill_holes`` with the in-plane cross as structure -- by one flood fill over
  the (x, y, z) array, no transposed copy;
* ``histogram``: the uniform-bin histogram of Otsu's threshold in one pass.

The tests compare each with scipy.ndimage on random arrays.  Compiled lazily (first
use) and cached on disk, like the fit kernels.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .lm_cpu import cached_njit

__all__ = ["get_mask_kernels"]


@lru_cache(maxsize=None)
def get_mask_kernels():
    """The compiled kernels, as a namespace with ``largest_component``,
    ``fill_holes_inplane`` and ``histogram``."""
    from types import SimpleNamespace

    jit = cached_njit("masks", nogil=True)

    @jit
    def largest_component(mask, out):
        """Largest 6-connected component of ``mask`` into ``out``; returns the number of components."""
        nx, ny, nz = mask.shape
        n_all = nx * ny * nz
        label = np.zeros(n_all, dtype=np.int32)
        stack = np.empty(n_all, dtype=np.int64)
        flat = mask.ravel()
        syz = ny * nz
        n_comp = 0
        best = 0
        best_size = 0
        for start in range(n_all):
            if not flat[start] or label[start] != 0:
                continue
            n_comp += 1
            label[start] = n_comp
            size = 0
            top = 0
            stack[top] = start
            top += 1
            while top > 0:
                top -= 1
                p = stack[top]
                size += 1
                i = p // syz
                j = (p // nz) % ny
                k = p % nz
                for d in range(6):
                    if d == 0:
                        if i == 0:
                            continue
                        q = p - syz
                    elif d == 1:
                        if i == nx - 1:
                            continue
                        q = p + syz
                    elif d == 2:
                        if j == 0:
                            continue
                        q = p - nz
                    elif d == 3:
                        if j == ny - 1:
                            continue
                        q = p + nz
                    elif d == 4:
                        if k == 0:
                            continue
                        q = p - 1
                    else:
                        if k == nz - 1:
                            continue
                        q = p + 1
                    if flat[q] and label[q] == 0:
                        label[q] = n_comp
                        stack[top] = q
                        top += 1
            if size > best_size:
                best_size = size
                best = n_comp
        out_flat = out.ravel()
        for p in range(n_all):
            out_flat[p] = best != 0 and label[p] == best
        return n_comp

    @jit
    def fill_holes_inplane(mask, out):
        """``mask`` (x, y, z, C-contiguous) with the background of each z-slice that is not
        connected (4-connected, in plane) to the slice's edge set, into ``out`` (same shape).

        One flood fill over the whole array from every background voxel on an x or y face,
        stepping in x and y only; the stack carries each voxel's (i, j) so that no index is
        divided back into coordinates.
        """
        nx, ny, nz = mask.shape
        syz = ny * nz
        n = nx * syz
        m = mask.ravel()
        o = out.ravel()
        outside = np.zeros(n, dtype=np.bool_)
        sp = np.empty(n, dtype=np.int64)
        si = np.empty(n, dtype=np.int32)
        sj = np.empty(n, dtype=np.int32)
        top = 0
        for i in range(nx):
            for j in range(ny):
                if i == 0 or j == 0 or i == nx - 1 or j == ny - 1:
                    base = i * syz + j * nz
                    for k in range(nz):
                        p = base + k
                        if not m[p]:
                            outside[p] = True
                            sp[top] = p
                            si[top] = i
                            sj[top] = j
                            top += 1
        while top > 0:
            top -= 1
            p = sp[top]
            i = si[top]
            j = sj[top]
            for d in range(4):
                if d == 0:
                    if i == 0:
                        continue
                    q, qi, qj = p - syz, i - 1, j
                elif d == 1:
                    if i == nx - 1:
                        continue
                    q, qi, qj = p + syz, i + 1, j
                elif d == 2:
                    if j == 0:
                        continue
                    q, qi, qj = p - nz, i, j - 1
                else:
                    if j == ny - 1:
                        continue
                    q, qi, qj = p + nz, i, j + 1
                if not m[q] and not outside[q]:
                    outside[q] = True
                    sp[top] = q
                    si[top] = qi
                    sj[top] = qj
                    top += 1
        for p in range(n):
            o[p] = not outside[p]

    @jit
    def histogram(values, lo, hi, scale, counts):
        """counts[b] += #{v: b = min(int((clip(v, lo, hi) - lo) * scale), len(counts) - 1)}.

        In the type of ``values`` (pass ``lo``, ``hi``, ``scale`` in it): the bins NumPy's
        ``astype(int)`` of the same float expression gives.
        """
        top = counts.shape[0] - 1
        for n in range(values.shape[0]):
            v = min(max(values[n], lo), hi)
            b = int((v - lo) * scale)
            counts[min(b, top)] += 1

    return SimpleNamespace(largest_component=largest_component, fill_holes_inplane=fill_holes_inplane,
                           histogram=histogram)
