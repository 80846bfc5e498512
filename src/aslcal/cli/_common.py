"""Helpers shared by the calibration commands: inputs, geometry checks, outputs, provenance."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError

log = logging.getLogger("aslcal")

#: Voxel-to-world matrices that differ by less than this (mm) describe the same grid.
AFFINE_TOL_MM = 1e-3


def float_or_image(text: str) -> float | str:
    """argparse type: a number, or a path to an image (checked when loaded)."""
    try:
        return float(text)
    except ValueError:
        return text


def float_list(text: str) -> list[float]:
    """argparse type: comma- or space-separated numbers, e.g. ``0.1,0.4,0.7``."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


#: Image extensions, as FSL's tools complete them.
IMAGE_EXTENSIONS = (".nii.gz", ".nii")


def _has_image_extension(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def fsl_image_names(args: argparse.Namespace, inputs=(), outputs=()) -> None:
    """Complete image names the way FSL's tools do, in place on ``args``.

    An input given without an extension (``-c calib``) is ``calib.nii.gz``, else
    ``calib.nii``, whichever exists (an existing file of the exact name wins, a folder
    of that name does not); an output
    without ``.nii``/``.nii.gz`` gets ``.nii.gz`` (FSL's default output type).  Values
    that are numbers (``--t1r 4.3``) are left alone.
    """
    for dest in inputs:
        value = getattr(args, dest, None)
        if not isinstance(value, str) or not value or _has_image_extension(value) or Path(value).is_file():
            continue
        for ext in IMAGE_EXTENSIONS:
            if Path(value + ext).is_file():
                setattr(args, dest, value + ext)
                break
    for dest in outputs:
        value = getattr(args, dest, None)
        if (isinstance(value, str) and value and not _has_image_extension(value) and not value.endswith(("/", "."))
                and not Path(value).is_dir()):  # a folder stays a folder (and is refused as an image)
            setattr(args, dest, value + ".nii.gz")


def load(path: str | None, name: str, *, ndim=None, reference=None, dtype: str = "float32"):
    """Load an image (or return None); check its grid against ``reference`` (an Image)."""
    if path is None:
        return None
    from ..io import load_image

    img = load_image(path, ndim=ndim, name=name, dtype=dtype)
    if reference is not None:
        check_same_grid(img, reference[0], name, reference[1])
    return img


def check_same_grid(img, ref, name: str, ref_name: str) -> None:
    """The spatial shape and voxel-to-world matrix of ``img`` must match ``ref``'s."""
    if tuple(img.shape[:3]) != tuple(ref.shape[:3]):
        raise InputError(
            f"{name} {img.path}: spatial shape {tuple(img.shape[:3])} does not match the {ref_name} "
            f"{tuple(ref.shape[:3])}; resample it to the {ref_name}'s grid first"
        )
    diff = float(np.max(np.abs(img.affine - ref.affine)))
    if diff > AFFINE_TOL_MM:
        raise InputError(
            f"{name} {img.path}: voxel-to-world matrix differs from the {ref_name}'s by up to {diff:.4g} mm; "
            "the images are not on the same grid"
        )


def mask_of(img, name: str) -> np.ndarray:
    """A boolean mask from an image (> 0); non-finite values are not in the mask."""
    from ..masks import mask_from_image

    data = img.data
    if data.ndim == 4:
        raise InputError(f"{name} {img.path}: expected a 3-D mask, got a 4-D image")
    mask, warning = mask_from_image(data, f"{name} {img.path}")
    if warning:
        log.warning("%s", warning)
    return mask


def image_or_value(value: float | str | None, name: str, reference) -> Any:
    """A float as is, or the data of the image at path ``value`` (on the reference grid)."""
    if value is None or isinstance(value, float):
        return value
    img = load(value, name, ndim=3, reference=reference)
    return img.data


def prepare_outdir(outdir: str | None) -> Path | None:
    """Create ``--outdir`` if needed (its parent must exist)."""
    if outdir is None:
        return None
    path = Path(outdir)
    if path.exists() and not path.is_dir():
        raise InputError(f"--outdir {path}: exists and is not a folder")
    if not path.exists():
        if not path.parent.exists():
            raise InputError(f"--outdir {path}: parent folder {path.parent} does not exist")
        try:
            path.mkdir()
        except OSError as exc:
            raise InputError(f"--outdir {path}: cannot create it ({exc.strerror})") from None
    return path


def earlier_aslcal_run(outdir: Path | None, command: str) -> set[str]:
    """The ``--outdir`` files an earlier ``aslcal <command>`` run recorded writing there (its
    provenance's ``outputs``, read before this run replaces it); empty when there is none."""
    if outdir is None:
        return set()
    try:
        record = json.loads((outdir / "provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not (isinstance(record, dict) and "aslcal" in record and record.get("command") == command):
        return set()
    names = record.get("outputs")
    return {n for n in names if isinstance(n, str) and "/" not in n} if isinstance(names, list) else set()


def outdir_outputs(out: Any, outdir: Path) -> list[str]:
    """Names of the files staged in ``outdir`` so far, and the provenance: what a run's
    provenance records as its outputs there (``outputs``)."""
    return sorted({p.name for p in out.destinations if p.parent == outdir} | {"provenance.json"})


def remove_stale_outputs(outdir: Path | None, known: Iterable[str], written: Iterable[Path],
                         inputs: Iterable[Any] = ()) -> list[Path]:
    """After a run with ``--overwrite``: remove the files of ``known`` (what the earlier run
    of the command recorded writing to ``--outdir``: :func:`earlier_aslcal_run`) that this
    run did not write, so that the earlier run's maps do not sit beside this run's
    provenance.  Never a file this run wrote or read (``inputs``: its input options; paths
    compared resolved).  Returns the removed paths."""
    if outdir is None:
        return []

    def same(a: Path, b: Path) -> bool:
        try:
            return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
        except OSError:
            return False

    keep = [Path(p) for p in written] + [Path(p) for p in inputs if isinstance(p, str | os.PathLike)]
    removed = []
    for name in known:
        path = outdir / name
        if path.is_file() and not any(same(path, k) for k in keep):
            path.unlink()
            removed.append(path)
    if removed:
        log.warning("--overwrite: removed %s of the earlier run in %s (this run does not write them)",
                    ", ".join(p.name for p in removed), outdir)
    return removed


def cleanup_outdir(path: Path | None, created: bool) -> None:
    """Remove an ``--outdir`` this run created if the run failed and left it empty."""
    if path is not None and created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def provenance(args: argparse.Namespace, command: str, **results: Any) -> dict:
    """The JSON provenance record of a run: command line, versions, inputs, results."""
    from .info import _package_version

    return {
        "aslcal": __version__,
        "command": command,
        "argv": getattr(args, "argv", None),
        "options": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": {n: _package_version(n) for n in ("numpy", "numba", "nibabel", "scipy", "cupy")},
        "units": {"te_t2_t2star": "ms", "tr_ti_t1_taq_dt": "s", "flip_angles": "degrees",
                  "m0": "scanner units", "cbf": "ml/100g/min"},
        **results,
    }
