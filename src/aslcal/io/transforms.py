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

FSL takes voxel sizes from the header's ``pixdim``, and so do the command line and the
cohort runner (they pass :attr:`aslcal.io.Image.voxel_size`); without them, the column
norms of the affine are used, which are the same for every header nibabel writes.

ITK / ANTs affine files
-----------------------
An ITK transform (``AffineTransform_double_3_3`` or
``MatrixOffsetTransformBase_double_3_3``: 12 ``Parameters`` = the 3x3 matrix A row by
row, then the translation t; ``FixedParameters`` = the centre c) maps a point x of the
**fixed (reference) space** to the **moving space**, in LPS millimetres:
``y = A (x - c) + t + c``.  The text format (``#Insight Transform File V1.0``, fMRIPrep's
``*_xfm.txt``) and ITK's binary MATLAB format (ANTs' ``*GenericAffine.mat``: the
parameters in a variable named after the transform type, the centre in ``fixed``) hold
the same numbers.  ``antsApplyTransforms -i MOVING -r FIXED -t file`` uses it
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
    "asl_to_structural_world",
    "flirt_scaling",
    "flirt_to_world",
    "is_itk_transform",
    "read_asl_to_structural",
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
    text = _decode(raw)
    if text is None:
        hint = ""
        if what == "ITK transform":
            hint = " (an ITK .h5? convert it with: ConvertTransformFile 3 IN OUT.txt)"
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


def _decode(raw: bytes) -> str | None:
    """The text of a file's bytes (UTF-8, without the byte-order mark some editors write),
    or None for a binary file (not UTF-8, or NUL bytes)."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _is_text(p: Path) -> bool:
    """Whether the file is text (:func:`_decode`; False if unreadable)."""
    try:
        return _decode(p.read_bytes()) is not None
    except OSError:
        return False


def _matlab_variables(p: Path) -> dict[str, np.ndarray] | None:
    """The variables of a binary MATLAB (v4/v5) file, or None if it is not one."""
    from scipy.io import loadmat

    try:
        raw = loadmat(str(p), squeeze_me=False)
    except Exception:  # noqa: BLE001 - scipy raises several kinds for non-MATLAB bytes
        return None
    return {k: np.asarray(v) for k, v in raw.items() if not k.startswith("__")}


def is_itk_transform(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ITK transform file (text, or a binary MATLAB file: ITK's
    format, else one :func:`read_itk_affine` refuses naming its variables) rather than,
    e.g., a FLIRT matrix (4 lines of text); False if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"#Insight Transform File"):
        return True
    p = Path(os.fspath(path))
    if _is_text(p):
        return False  # text, not ITK: a FLIRT matrix (or garbage for its reader to report)
    # any MATLAB file: ITK's binary format, or not a transform aslcal reads, which the ITK
    # reader says by naming its variables (a FLIRT matrix is text)
    return _matlab_variables(p) is not None


def _itk_binary(p: Path, where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(12 parameters, centre) of an ITK binary MATLAB transform, or None if the file is
    not a MATLAB file."""
    variables = _matlab_variables(p)
    if variables is None:
        return None
    kinds = [k for k in variables if _ITK_TYPE_RE.match(k)]
    if len(kinds) != 1 or "fixed" not in variables:
        raise InputError(
            f"{where}: a MATLAB file with variables {sorted(variables)}; expected an ITK affine "
            f"transform (one of {', '.join(f'{t}_double_3_3' for t in _ITK_TYPES)}, and 'fixed')"
        )
    params = np.asarray(variables[kinds[0]], dtype=np.float64).ravel()
    centre = np.asarray(variables["fixed"], dtype=np.float64).ravel()
    for name, arr, count in (("parameters", params, 12), ("fixed", centre, 3)):
        if arr.size != count:
            raise InputError(f"{where}: {name} has {arr.size} numbers; expected {count}")
        if not np.isfinite(arr).all():
            raise InputError(f"{where}: {name} contains NaN or Inf; expected finite numbers")
    return params, centre


def read_itk_affine(path: str | os.PathLike[str], *, invert: bool = False) -> np.ndarray:
    """Read an ITK/ANTs affine transform file as a world (RAS mm) point mapping.

    Parameters
    ----------
    path : path
        An ITK text transform (``#Insight Transform File V1.0``) holding one
        ``AffineTransform_{double,float}_3_3`` or
        ``MatrixOffsetTransformBase_{double,float}_3_3`` with 12 ``Parameters``
        (3x3 matrix A row-major, then translation t) and 3 ``FixedParameters``
        (centre c), as ANTs and fMRIPrep write (``*_xfm.txt``); or the same transform in
        ITK's binary MATLAB format (ANTs' ``*GenericAffine.mat``).
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
    try:
        p = Path(os.fspath(path))
    except TypeError:
        raise InputError(f"ITK transform={path!r}: expected a file path") from None
    where = f"ITK transform file {str(p)!r}"
    binary = _itk_binary(p, where) if p.is_file() and not _is_text(p) else None
    params, centre = binary if binary is not None else _itk_text(p, where)
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


def _itk_text(path: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The 12 parameters and the centre of an ITK text transform."""
    p, text = _read_text(path, "ITK transform")
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
    return params, centre


def read_asl_to_structural(path: str | os.PathLike[str]) -> tuple[str, np.ndarray]:
    """Read an ASL -> structural transform file of either kind users have.

    Returns ``("itk", world_asl_to_struct)`` for an ITK/ANTs ``from-<asl>_to-T1w`` affine
    (text or binary: its point mapping is T1w -> ASL, so it is inverted here), or
    ``("flirt", matrix)`` for an FSL FLIRT matrix (ASL = source), whose world form needs
    the two images (:func:`asl_to_structural_world`).  Malformed files raise
    :class:`~aslcal.errors.InputError` before any image is read.
    """
    if is_itk_transform(path):
        return "itk", read_itk_affine(path, invert=True)
    return "flirt", read_flirt_matrix(path)


def asl_to_structural_world(transform: tuple[str, np.ndarray], asl: Any, struct: Any) -> np.ndarray:
    """World (RAS mm) ASL -> structural point mapping of a :func:`read_asl_to_structural`
    result, given the two images (:class:`aslcal.io.Image`: a FLIRT matrix takes their
    affines, shapes and header voxel sizes, as FSL does)."""
    kind, matrix = transform
    if kind == "itk":
        return matrix
    return flirt_to_world(matrix, asl.affine, asl.shape[:3], struct.affine, struct.shape[:3],
                          src_zooms=asl.voxel_size, ref_zooms=struct.voxel_size)
