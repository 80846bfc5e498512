"""Spatial transforms between images: FSL FLIRT matrices and ITK/ANTs affine files.

aslcal describes every spatial transform the same way inside the library: a 4x4
matrix that maps **points** (not images) in world coordinates, RAS millimetres (the
frame of the NIfTI sform/qform, as nibabel reports it), written ``world_a_to_b`` when it
takes the world coordinates of an anatomical point in image a's session to the world
coordinates of the same point in image b's session.  The readers here convert the two
file formats users have into that form.

FSL FLIRT matrices
------------------
A FLIRT matrix (``flirt -omat``, ``asl_reg``, asl_calib's ``-t``) maps the
*scaled-voxel* coordinates of the **source** image (``-in``) to those of the
**reference** image (``-ref``).  Scaled-voxel coordinates are voxel index times voxel
size (mm, from the voxel -> world matrix), with the x axis flipped first,
``x = (nx - 1 - i) * dx``, when the voxel -> world matrix has a positive determinant
("neurological" storage; FSL stores radiologically internally).  Hence

    world_src_to_ref = A_ref @ inv(S_ref) @ mat @ S_src @ inv(A_src)

(:func:`flirt_to_world`) with ``A`` the voxel -> world matrices and ``S`` the
index -> scaled-voxel matrices (:func:`flirt_scaling`); :func:`world_to_flirt` is the
inverse.  An ASL -> structural FLIRT matrix (source = the ASL/calibration image,
reference = the structural) therefore gives ``world_asl_to_struct``.

FSL takes voxel sizes from the header's ``pixdim``; we take them from the column norms
of the affine, which are the same for every header nibabel writes.

ITK / ANTs affine text files
----------------------------
An ITK transform (``AffineTransform_double_3_3`` or
``MatrixOffsetTransformBase_double_3_3``: 12 ``Parameters`` = the 3x3 matrix A row by
row, then the translation t; ``FixedParameters`` = the centre c) maps a point x of the
**fixed (reference) space** to the **moving space**, in LPS millimetres:
``y = A (x - c) + t + c``.  ``antsApplyTransforms -i MOVING -r FIXED -t file`` uses it
that way: each output voxel at x takes the input's value at y.  fMRIPrep names a
transform by the direction it moves *images*: ``from-X_to-Y`` resamples an image of X
onto Y, so its point mapping is **Y -> X** (``from-boldref_to-T1w`` maps T1w-space points
to boldref-space points).  :func:`read_itk_affine` returns that point mapping in RAS
(``diag(-1, -1, 1, 1) @ M_lps @ diag(-1, -1, 1, 1)``); ``invert=True`` returns X -> Y.

All functions here are small host (NumPy) computations on 4x4 matrices.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..geometry import SINGULAR_DET, flirt_scaling, flirt_to_world, world_to_flirt

__all__ = [
    "flirt_scaling",
    "flirt_to_world",
    "read_flirt_matrix",
    "read_itk_affine",
    "world_to_flirt",
]


# LPS <-> RAS: negate x and y (its own inverse).
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_ITK_TYPES = ("AffineTransform", "MatrixOffsetTransformBase")
_ITK_TYPE_RE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3$")


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _short(text: str, limit: int = 40) -> str:
    """A one-line, bounded repr of a piece of file content for an error message."""
    text = text.strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def _read_text(path: Any, what: str) -> tuple[Path, str]:
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise InputError(f"{what}={path!r}: expected a file path") from None
    if not p.is_file():
        raise InputError(f"{what} file {str(p)!r}: not found (or not a regular file)")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} file {str(p)!r}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        hint = ""
        if what == "ITK transform":
            hint = " (a binary ITK .mat/.h5? convert it with: ConvertTransformFile 3 IN OUT.txt)"
        raise InputError(f"{what} file {str(p)!r}: not a text file{hint}")
    return p, text


# --------------------------------------------------------------------------------------
# FLIRT
# --------------------------------------------------------------------------------------


def read_flirt_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an FSL FLIRT matrix file (4 rows of 4 numbers, whitespace separated).

    Parameters
    ----------
    path : path
        The text file, as written by ``flirt -omat`` or ``asl_reg`` (asl_calib's
        ``-t``).  Blank lines are ignored.

    Returns
    -------
    ndarray of shape (4, 4), float64
        The matrix as stored: source scaled-voxel mm -> reference scaled-voxel mm.
        Convert it to a world (RAS mm) point mapping with :func:`flirt_to_world`.

    Raises
    ------
    InputError
        One line naming the file and the problem: missing/unreadable/binary file, not
        4 rows of 4 numbers, a non-number or non-finite entry, a last row other than
        ``0 0 0 1``, or a singular matrix (|det of the 3x3 part| < 1e-6).
    """
    p, text = _read_text(path, "FLIRT matrix")
    where = f"FLIRT matrix file {str(p)!r}"
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if len(rows) != 4:
        raise InputError(f"{where}: {len(rows)} non-empty rows; expected 4 rows of 4 numbers")
    mat = np.empty((4, 4))
    for r, row in enumerate(rows):
        if len(row) != 4:
            raise InputError(
                f"{where}: row {r + 1} has {len(row)} entries; expected 4 rows of 4 numbers"
            )
        for c, tok in enumerate(row):
            try:
                v = float(tok)
            except ValueError:
                raise InputError(
                    f"{where}: row {r + 1}, column {c + 1} is {_short(tok)}; expected a number"
                ) from None
            if not math.isfinite(v):
                raise InputError(
                    f"{where}: row {r + 1}, column {c + 1} is {_short(tok)}; expected a finite number"
                )
            mat[r, c] = v
    if not np.allclose(mat[3], (0.0, 0.0, 0.0, 1.0), rtol=0.0, atol=1e-6):
        raise InputError(
            f"{where}: last row is {' '.join(rows[3])}; expected 0 0 0 1 (an affine matrix)"
        )
    det = float(np.linalg.det(mat[:3, :3]))
    if not abs(det) >= SINGULAR_DET:
        raise InputError(
            f"{where}: singular matrix (det of the 3x3 part {det:.3g}); expected an invertible transform"
        )
    mat[3] = (0.0, 0.0, 0.0, 1.0)
    return mat


def _itk_numbers(where: str, key: str, value: str, count: int) -> np.ndarray:
    toks = value.split()
    if len(toks) != count:
        raise InputError(f"{where}: {key} has {len(toks)} numbers; expected {count}")
    out = np.empty(count)
    for n, tok in enumerate(toks):
        try:
            out[n] = float(tok)
        except ValueError:
            raise InputError(f"{where}: {key} entry {n + 1} is {_short(tok)}; expected a number") from None
    if not np.isfinite(out).all():
        raise InputError(f"{where}: {key} contains NaN or Inf; expected finite numbers")
    return out


def read_itk_affine(path: str | os.PathLike[str], *, invert: bool = False) -> np.ndarray:
    """Read an ITK/ANTs affine text transform as a world (RAS mm) point mapping.

    Parameters
    ----------
    path : path
        An ITK text transform (``#Insight Transform File V1.0``) holding one
        ``AffineTransform_{double,float}_3_3`` or
        ``MatrixOffsetTransformBase_{double,float}_3_3`` with 12 ``Parameters``
        (3x3 matrix A row-major, then translation t) and 3 ``FixedParameters``
        (centre c), as ANTs and fMRIPrep write (``*_xfm.txt``).
    invert : bool, optional
        False (default): return the file's own point mapping, **fixed (reference)
        space -> moving space**: ``y = A (x - c) + t + c`` in LPS, converted to RAS.
        That is the mapping antsApplyTransforms uses with this file (output point ->
        input point).  For an fMRIPrep ``from-X_to-Y`` file it maps **Y -> X** points
        (``from-boldref_to-T1w``: T1w world -> boldref world).  True: the inverse,
        moving -> fixed (``from-X_to-Y``: X -> Y).

    Returns
    -------
    ndarray of shape (4, 4), float64
        Point mapping in world RAS mm: ``diag(-1, -1, 1, 1) @ M_lps @ diag(-1, -1, 1, 1)``
        (inverted when ``invert``).  To resample a T1w-space map into the space of the
        calibration image with :func:`aslcal.masks.resample_to_grid`, the argument
        ``world_ref_to_src`` is calibration world -> T1w world, i.e.
        ``read_itk_affine("..._from-boldref_to-T1w_..._xfm.txt", invert=True)``, or
        ``read_itk_affine("..._from-T1w_to-boldref_..._xfm.txt")``.

    Raises
    ------
    InputError
        One line naming the file and the problem: missing/unreadable/binary file, no
        ITK header, not exactly one transform, an unsupported transform type, wrong
        number of parameters, a non-number or non-finite entry, a singular matrix.
    """
    p, text = _read_text(path, "ITK transform")
    where = f"ITK transform file {str(p)!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].lower().startswith("#insight transform file"):
        first = _short(lines[0]) if lines else "nothing"
        raise InputError(
            f"{where}: starts with {first}; expected an ITK text transform "
            "('#Insight Transform File V1.0')"
        )
    fields: dict[str, list[str]] = {"transform": [], "parameters": [], "fixedparameters": []}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        k = key.strip().lower()
        if not sep or k not in fields:
            raise InputError(
                f"{where}: unexpected line {_short(line)}; expected Transform:, Parameters:, "
                "FixedParameters:"
            )
        fields[k].append(value.strip())
    if len(fields["transform"]) != 1:
        raise InputError(
            f"{where}: {len(fields['transform'])} transforms; expected exactly one affine transform"
        )
    kind = fields["transform"][0]
    if not _ITK_TYPE_RE.match(kind):
        raise InputError(
            f"{where}: transform type {_short(kind)}; expected one of "
            + ", ".join(f"{t}_double_3_3" for t in _ITK_TYPES)
        )
    for k, name in (("parameters", "Parameters"), ("fixedparameters", "FixedParameters")):
        if len(fields[k]) != 1:
            raise InputError(f"{where}: {len(fields[k])} '{name}:' lines; expected exactly one")
    params = _itk_numbers(where, "Parameters", fields["parameters"][0], 12)
    centre = _itk_numbers(where, "FixedParameters", fields["fixedparameters"][0], 3)
    a = params[:9].reshape(3, 3)
    det = float(np.linalg.det(a))
    if not abs(det) >= SINGULAR_DET:
        raise InputError(
            f"{where}: singular matrix (det {det:.3g}); expected an invertible transform"
        )
    m_lps = np.eye(4)
    m_lps[:3, :3] = a
    m_lps[:3, 3] = params[9:] + centre - a @ centre
    m_ras = _LPS_RAS @ m_lps @ _LPS_RAS
    if invert:
        m_ras = np.linalg.inv(m_ras)
        m_ras[3] = (0.0, 0.0, 0.0, 1.0)
    return m_ras
