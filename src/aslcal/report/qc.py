"""QC figure: the reference-region and brain masks outlined on the calibration image.

:func:`qc_figure` writes one PNG: a few axial slices of the (mean) calibration image in
grey, the reference mask outlined in one colour and the brain mask in another, and a
legend with the voxel count of each mask.

matplotlib is an optional dependency (``pip install 'aslcal[report]'``).  It is imported
when the figure is drawn, never when :mod:`aslcal.report` is imported; the figure is
drawn on an Agg canvas (no display, no pyplot, no global backend switch).  Without
matplotlib :func:`qc_figure` raises :class:`ReportUnavailableError`, both an
:class:`~aslcal.errors.AslcalError` and an :class:`ImportError`, whose message says
what to install: a caller that treats the figure as optional catches it and goes on.

This is an I/O boundary: CuPy inputs are copied to the host here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import to_host
from ..errors import AslcalError, InputError
from ..io import atomic_output

__all__ = ["REF_COLOUR", "BRAIN_COLOUR", "ReportUnavailableError", "qc_figure"]

#: Outline colours: the reference region, the brain mask.
REF_COLOUR = "#ff3b30"
BRAIN_COLOUR = "#00c7ff"

_INSTALL_HINT = "install it with: pip install 'aslcal[report]' (or pip install matplotlib)"


class ReportUnavailableError(AslcalError, ImportError):
    """A report needs an optional package that is not installed (the message says which)."""


def _matplotlib():
    """(Figure, FigureCanvasAgg, Line2D), imported on use."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise ReportUnavailableError(f"the QC figure needs matplotlib ({exc}); {_INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg, Line2D


def _image(calib: Any) -> np.ndarray:
    if calib is None:
        raise InputError("calib: required, got None")
    try:
        img = to_host(calib)
    except (TypeError, ValueError):
        raise InputError(f"calib: expected an image (array of numbers), got {type(calib).__name__}") from None
    if img.dtype.kind not in "biuf":
        raise InputError(f"calib: expected an array of real numbers, got dtype {img.dtype}")
    if img.ndim == 4:
        if img.shape[3] == 0:
            raise InputError(f"calib: the series of shape {img.shape} has no volumes")
        img = img.astype(np.float64).mean(axis=3)
    elif img.ndim != 3:
        raise InputError(f"calib: expected a 3-D image (x, y, z) or a series (x, y, z, n), got shape {img.shape}")
    img = img.astype(np.float64)
    img[~np.isfinite(img)] = 0.0
    return img


def _mask(name: str, value: Any, shape: tuple) -> np.ndarray | None:
    if value is None:
        return None
    value = getattr(value, "mask", value)  # a BrainMask / VentricleMask result
    arr = to_host(value)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: expected a mask (array of 0/1 or bool), got dtype {arr.dtype}")
    if arr.shape != shape:
        raise InputError(f"{name}: shape {arr.shape} does not match {shape} (the shape of calib)")
    return np.asarray(arr != 0) if arr.dtype.kind != "f" else np.nan_to_num(arr) != 0


def _spread(mask: np.ndarray, n: int) -> list[int]:
    """``n`` slice indices spread evenly through the axial extent of ``mask`` (non-empty)."""
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = int(zs[0]), int(zs[-1])
    picks = np.linspace(lo, hi, n + 2)[1:-1] if hi - lo + 1 > n else np.arange(lo, hi + 1)
    return [int(round(z)) for z in picks]


def _default_slices(img: np.ndarray, brain: np.ndarray | None, ref: np.ndarray | None, n: int) -> list[int]:
    """``n`` axial slices: half through the reference mask, the rest through the brain.

    Without a (non-empty) reference mask all ``n`` go through the brain mask; without a
    brain mask through the slices with signal.
    """
    support = brain if brain is not None and brain.any() else img > 0
    if not support.any():
        support = np.ones(img.shape, dtype=bool)
    picks: set[int] = set()
    if ref is not None and ref.any():
        picks.update(_spread(ref, (n + 1) // 2))
    # the brain slices farthest from those already picked first
    spare = [z for z in _spread(support, n) if z not in picks]
    while spare and len(picks) < n:
        far = max(spare, key=lambda z: min((abs(z - p) for p in picks), default=0))
        picks.add(far)
        spare.remove(far)
    return sorted(picks)


def qc_figure(
    path: str | os.PathLike,
    calib: Any,
    *,
    refmask: Any = None,
    brain_mask: Any = None,
    slices: Any = None,
    n_slices: int = 6,
    title: str | None = None,
    dpi: int = 100,
    overwrite: bool = True,
) -> Path:
    """Write a PNG of the masks outlined on axial slices of the calibration image.

    Parameters
    ----------
    path : str or os.PathLike
        Destination PNG.  Its folder must exist.  Written atomically: on any error
        nothing is left behind (and an existing file is untouched).
    calib : array of shape (x, y, z) or (x, y, z, n), signal units
        Calibration image (NumPy or CuPy; copied to the host); a series is averaged
        over its last axis.  Shown in grey from 0 to its 99.5th percentile.
    refmask : array of shape (x, y, z), optional
        Reference-region mask (non-zero = inside), outlined in :data:`REF_COLOUR`.
        A result object with a ``mask`` attribute is accepted too.
    brain_mask : array of shape (x, y, z), optional
        Brain mask, outlined in :data:`BRAIN_COLOUR`.
    slices : sequence of int, optional
        Axial slices (indices along the third array axis) to show.  Default:
        ``n_slices`` slices, half spread evenly through the reference mask and the rest
        through the brain mask (without masks: through the slices with signal).
    n_slices : int, optional
        Number of slices chosen when ``slices`` is None.  Default 6.
    title : str, optional
        Figure title.
    dpi : int, optional
        Resolution of the PNG.  Default 100.
    overwrite : bool, optional
        Whether an existing ``path`` may be replaced.  Default True.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ReportUnavailableError
        matplotlib is not installed (also an ``ImportError``; the message says what to
        install).
    InputError
        Bad image, masks, slices or destination (missing folder, existing file with
        ``overwrite=False``).
    """
    img = _image(calib)
    shape = img.shape
    ref = _mask("refmask", refmask, shape)
    brain = _mask("brain_mask", brain_mask, shape)
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise InputError(f"n_slices={n_slices!r}: expected a positive integer")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or not 10 <= dpi <= 1000:
        raise InputError(f"dpi={dpi!r}: expected an integer in 10..1000")
    if slices is None:
        zs = _default_slices(img, brain, ref, int(n_slices))
    else:
        try:
            zs = [int(z) for z in slices]
        except (TypeError, ValueError):
            raise InputError(f"slices={slices!r}: expected a sequence of slice indices") from None
        bad = [z for z in zs if not 0 <= z < shape[2]]
        if not zs or bad:
            raise InputError(f"slices={slices!r}: expected indices in 0..{shape[2] - 1} (axis 2 of calib)")
    Figure, FigureCanvasAgg, Line2D = _matplotlib()

    finite = img[img > 0]
    vmax = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    nrows = math.ceil(len(zs) / 4)
    ncols = math.ceil(len(zs) / nrows)
    aspect = shape[1] / shape[0]
    # at least 7.5 in wide: the title and the legend (one row) need it with 1-2 panels
    fig = Figure(figsize=(max(3.0 * ncols, 7.5), 3.0 * nrows * aspect + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    outlines = [(m, c) for m, c in ((ref, REF_COLOUR), (brain, BRAIN_COLOUR)) if m is not None]
    for ax, z in zip(axes.ravel(), zs):
        ax.imshow(img[:, :, z].T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
        for m, colour in outlines:
            sl = m[:, :, z]
            if sl.any() and not sl.all():  # a contour needs both levels in the slice
                ax.contour(sl.T.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.0)
        ax.set_title(f"z = {z}", fontsize=9)
        ax.set_axis_off()
    for ax in axes.ravel()[len(zs):]:
        ax.set_axis_off()
    handles = []
    if ref is not None:
        handles.append(Line2D([], [], color=REF_COLOUR, label=f"reference mask ({int(ref.sum())} voxels)"))
    if brain is not None:
        handles.append(Line2D([], [], color=BRAIN_COLOUR, label=f"brain mask ({int(brain.sum())} voxels)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9, frameon=False)
    if title:
        fig.suptitle(str(title), fontsize=11)
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=int(dpi))
    return Path(path)
