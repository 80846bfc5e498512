"""Finding and reading existing tissue partial-volume maps (FSL FAST, BIDS derivatives).

Users often have a segmentation already: ``fsl_anat``/``fast`` outputs, or the
probability maps of fMRIPrep/sMRIPrep.  :func:`find_tissue_maps` locates the CSF, GM
and WM maps of one segmentation from what the user points at, and
:func:`load_tissue_map` reads one map and checks that it holds fractions.

Recognised names (``.nii.gz`` or ``.nii``):

* **FSL FAST**: ``<prefix>_pve_0`` (CSF), ``<prefix>_pve_1`` (GM), ``<prefix>_pve_2``
  (WM), e.g. ``struc_brain_pve_0.nii.gz`` or fsl_anat's ``T1_fast_pve_0.nii.gz``
  (FAST's default ``-n 3`` class order for a T1-weighted image).
* **BIDS derivatives**: ``<entities>_label-CSF_probseg``, ``..._label-GM_probseg``,
  ``..._label-WM_probseg``, with any entities before the label (``sub-01_ses-1_``,
  ``space-T1w_``, ...) and after it (``desc-...``), e.g.
  ``sub-01_space-T1w_label-CSF_probseg.nii.gz``.

A map is found from (a) one of the map files (its siblings are the other tissues),
(b) a folder holding them, or (c) a prefix: ``<prefix>_pve_N`` or
``<prefix>_label-<X>_probseg``.  In a folder with several segmentations (subjects,
spaces), the one in the structural's own space (no ``space-`` entity, or
``space-T1w``) is taken if it is the only such one; otherwise the error lists them.

This module reads files; it does no computation on the maps beyond the range check.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "TISSUE_MAP_TISSUES",
    "FAST_PVE_INDEX",
    "BIDS_TISSUE_LABEL",
    "find_tissue_maps",
    "load_tissue_map",
]

#: The tissues a segmentation provides.
TISSUE_MAP_TISSUES: tuple[str, ...] = ("csf", "gm", "wm")

#: FSL FAST's ``_pve_N`` index of each tissue (T1-weighted input, 3 classes).
FAST_PVE_INDEX: dict[str, int] = {"csf": 0, "gm": 1, "wm": 2}

#: The BIDS ``label-`` value of each tissue.
BIDS_TISSUE_LABEL: dict[str, str] = {"csf": "CSF", "gm": "GM", "wm": "WM"}

_EXTS = (".nii.gz", ".nii")
_FAST_RE = re.compile(r"^(?P<prefix>.+)_pve_(?P<index>[012])\.nii(?:\.gz)?$")
_BIDS_RE = re.compile(
    r"^(?P<before>(?:[A-Za-z0-9]+-[A-Za-z0-9]+_)*)label-(?P<label>CSF|GM|WM)"
    r"(?P<after>(?:_[A-Za-z0-9]+-[A-Za-z0-9]+)*)_probseg\.nii(?:\.gz)?$"
)
_TISSUE_OF_INDEX = {v: k for k, v in FAST_PVE_INDEX.items()}
_TISSUE_OF_LABEL = {v: k for k, v in BIDS_TISSUE_LABEL.items()}
_DEFAULT_TOL = 0.01


def _fast_names(prefix: str) -> dict[str, list[str]]:
    return {t: [f"{prefix}_pve_{i}{e}" for e in _EXTS] for t, i in FAST_PVE_INDEX.items()}


def _bids_names(before: str, after: str) -> dict[str, list[str]]:
    return {
        t: [f"{before}label-{lab}{after}_probseg{e}" for e in _EXTS]
        for t, lab in BIDS_TISSUE_LABEL.items()
    }


def _existing(folder: Path, names: dict[str, list[str]]) -> dict[str, Path]:
    found = {}
    for tissue, candidates in names.items():
        for name in candidates:
            p = folder / name
            if p.is_file():
                found[tissue] = p
                break
    return found


def _group_of(name: str) -> tuple[str, Any] | None:
    """("fast", prefix) or ("bids", (before, after)) for a map file name, else None."""
    m = _FAST_RE.match(name)
    if m:
        return ("fast", m.group("prefix"))
    m = _BIDS_RE.match(name)
    if m:
        return ("bids", (m.group("before"), m.group("after")))
    return None


def _names_of(group: tuple[str, Any]) -> dict[str, list[str]]:
    kind, key = group
    return _fast_names(key) if kind == "fast" else _bids_names(*key)


def _describe(group: tuple[str, Any]) -> str:
    kind, key = group
    if kind == "fast":
        return f"FAST {key}_pve_{{0,1,2}}"
    before, after = key
    return f"BIDS {before}label-{{CSF,GM,WM}}{after}_probseg"


def _expected_text(names: dict[str, list[str]], tissues) -> str:
    return ", ".join(f"{t.upper()}: {names[t][0]}" for t in tissues)


def _native_space(group: tuple[str, Any]) -> bool:
    """True for FAST outputs and BIDS maps without a space entity or in T1w space."""
    kind, key = group
    if kind == "fast":
        return True
    entities = (key[0] + key[1]).strip("_").split("_")
    spaces = [e.split("-", 1)[1] for e in entities if e.startswith("space-")]
    return not spaces or spaces == ["T1w"]


def _require(require: Any) -> tuple[str, ...]:
    if isinstance(require, str):
        require = (require,)
    try:
        req = tuple(require)
    except TypeError:
        raise InputError(
            f"require={require!r}: expected tissue names from {TISSUE_MAP_TISSUES}"
        ) from None
    bad = [t for t in req if t not in TISSUE_MAP_TISSUES]
    if bad:
        raise InputError(f"require={require!r}: unknown tissue(s) {bad}; expected names from {TISSUE_MAP_TISSUES}")
    return req


def find_tissue_maps(
    path_or_prefix: str | os.PathLike[str],
    *,
    require: Any = TISSUE_MAP_TISSUES,
) -> dict[str, Path]:
    """Find the CSF, GM and WM partial-volume maps of one existing segmentation.

    Parameters
    ----------
    path_or_prefix : str or os.PathLike
        One of the map files (FAST ``*_pve_N`` or BIDS ``*_label-<CSF|GM|WM>_probseg``,
        ``.nii.gz`` or ``.nii``), a folder holding the maps, or a prefix that the
        FAST or BIDS names extend (``/data/struc`` for ``/data/struc_pve_0.nii.gz``;
        ``/data/sub-01`` for ``/data/sub-01_label-CSF_probseg.nii.gz``).
    require : str or sequence of str, optional
        Tissues that must be found (``"csf"``, ``"gm"``, ``"wm"``).  Default all three.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"csf": ..., "gm": ..., "wm": ...}``: every tissue found (at least those in
        ``require``), in the order CSF, GM, WM.

    Raises
    ------
    InputError
        Nothing there; a file whose name is neither a FAST nor a BIDS tissue map; a
        folder with no maps or with several segmentations to choose from; or a
        required tissue missing -- the message names the files that were expected.
    """
    req = _require(require)
    if path_or_prefix is None or str(path_or_prefix) == "":
        raise InputError("tissue maps: no path given; expected a map file, a folder or a FAST/BIDS prefix")
    path = Path(path_or_prefix)
    where = f"tissue maps {str(path)!r}"

    if path.is_dir():
        groups: dict[tuple[str, Any], dict[str, Path]] = {}
        for entry in sorted(path.iterdir()):
            if not entry.is_file():
                continue
            group = _group_of(entry.name)
            if group is not None:
                groups.setdefault(group, {})
        if not groups:
            raise InputError(
                f"{where}: the folder holds no tissue maps; expected FSL FAST "
                "<prefix>_pve_0/1/2.nii.gz or BIDS <entities>_label-CSF/GM/WM_probseg.nii.gz files"
            )
        if len(groups) > 1:
            native = [g for g in groups if _native_space(g)]
            if len(native) == 1:
                groups = {native[0]: {}}
            else:
                listed = "; ".join(_describe(g) for g in (native or list(groups)))
                raise InputError(
                    f"{where}: the folder holds several segmentations ({listed}); "
                    "give one of the map files or its prefix instead of the folder"
                )
        group = next(iter(groups))
        folder = path
    elif path.is_file():
        group = _group_of(path.name)
        if group is None:
            raise InputError(
                f"{where}: the file name is not a tissue map name; expected FSL FAST "
                "<prefix>_pve_0/1/2.nii.gz (CSF/GM/WM) or BIDS "
                "<entities>_label-CSF/GM/WM_probseg.nii.gz"
            )
        folder = path.parent
    else:
        folder = path.parent
        base = path.name
        candidates = [("fast", base), ("bids", (base + "_", ""))]
        found_any = [(g, _existing(folder, _names_of(g))) for g in candidates]
        found_any = [(g, f) for g, f in found_any if f]
        if not found_any:
            if not folder.is_dir():
                raise InputError(
                    f"{where}: no such file or folder, and the folder {str(folder)!r} of the "
                    "prefix does not exist; expected a tissue map file, a folder or a prefix"
                )
            fast = _fast_names(base)
            bids = _bids_names(base + "_", "")
            raise InputError(
                f"{where}: no such file or folder, and no tissue maps with that prefix in "
                f"{str(folder)!r}; expected FSL FAST files ({_expected_text(fast, TISSUE_MAP_TISSUES)}) "
                f"or BIDS files ({_expected_text(bids, TISSUE_MAP_TISSUES)})"
            )
        if len(found_any) > 1:
            listed = "; ".join(_describe(g) for g, _ in found_any)
            raise InputError(
                f"{where}: the prefix matches several segmentations ({listed}); give one "
                "of the map files instead"
            )
        group = found_any[0][0]

    names = _names_of(group)
    found = _existing(folder, names)
    missing = [t for t in req if t not in found]
    if missing:
        raise InputError(
            f"{where}: the {_describe(group)} segmentation in {str(folder)!r} lacks the "
            + " and ".join(t.upper() for t in missing)
            + f" map; expected {_expected_text(names, missing)} (or .nii)"
        )
    return {t: found[t] for t in TISSUE_MAP_TISSUES if t in found}


def load_tissue_map(
    path: str | os.PathLike[str],
    tissue: str,
    *,
    dtype: Any = "float32",
    tol: float = _DEFAULT_TOL,
):
    """Read one partial-volume map and check that it holds fractions in [0, 1].

    Parameters
    ----------
    path : str or os.PathLike
        A 3-D NIfTI image (``.nii`` or ``.nii.gz``).
    tissue : str
        What the map is (``"csf"``, ``"gm"``, ``"wm"`` or any name), for messages.
    dtype : {"float32", "float64"}, optional
        Data type of the returned data.  Default float32.
    tol : float, optional
        Values in ``[-tol, 1 + tol]`` are accepted and clipped to [0, 1] (interpolated
        maps overshoot a little).  Default 0.01.

    Returns
    -------
    aslcal.io.Image
        The map (``data`` clipped to [0, 1], on the host), with its affine, header and path.

    Raises
    ------
    InputError
        The file cannot be read as a 3-D NIfTI image (see
        :func:`aslcal.io.load_image`), holds NaN or Inf, or values outside
        ``[-tol, 1 + tol]`` (the message gives the range found, and suggests dividing
        by 100 for a percentage map).
    """
    from .nifti import load_image  # nibabel only when a map is read

    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and 0 <= tol < 1):
        raise InputError(f"tol={tol!r}: expected a number in [0, 1)")
    name = f"{tissue} partial-volume map"
    img = load_image(path, dtype=dtype, ndim=3, name=name)
    data = img.data
    where = f"{name} {str(img.path)!r}"
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        raise InputError(
            f"{where}: {n_bad} voxels are NaN or Inf; expected partial-volume fractions in [0, 1]"
        )
    lo = float(data.min()) if data.size else 0.0
    hi = float(data.max()) if data.size else 0.0
    if lo < -tol or hi > 1.0 + tol:
        hint = "; a percentage map? divide it by 100" if 1.0 + tol < hi <= 100.0 + tol and lo >= -tol else ""
        raise InputError(
            f"{where}: values range from {lo:.4g} to {hi:.4g}; expected partial-volume "
            f"fractions in [0, 1] (tolerance {tol:g}){hint}"
        )
    np.clip(data, 0.0, 1.0, out=data)
    return img
