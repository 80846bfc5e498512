"""Reading and writing NIfTI images (``.nii`` / ``.nii.gz``) with nibabel.

:func:`load_image` reads the whole file eagerly and checks it, so that a missing,
truncated, corrupt or wrongly shaped input fails *here* with an :class:`InputError`
that names the input, rather than later inside a fit.  :func:`save_image` writes
through :func:`aslcal.io.atomic.atomic_output`, so an output is either complete or
absent.

gzip (``.nii.gz``) is *read* through ISA-L (:mod:`isal.igzip`, 1.6x faster
decompression than zlib) when the ``isal`` package can be imported, and *written*
through the standard library :mod:`gzip` (zlib), whose bytes are the same for the same
data in every run -- ISA-L's are not always (see :func:`gzip_backend`).  Both read every
valid gzip file and write files that any gzip reader reads.  The environment variable
``ASLCAL_GZIP=zlib`` forces the standard library for both; ``ASLCAL_GZIP=isal`` ISA-L
for both (faster writes, bytes that may vary); unset, empty or ``auto`` is the default
above.  It is read at every call; :func:`gzip_backend` says which one is in use.

This module is an I/O boundary: :func:`save_image` copies a CuPy array to the host.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from ..errors import BackendUnavailableError, InputError
from .atomic import StrPath, atomic_output

log = logging.getLogger("aslcal")

try:  # ISA-L: the same gzip format as zlib, compressed/decompressed several times faster.
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _igzip = None
    _isal_zlib = None

__all__ = ["GZIP_ENV", "Image", "encode_image", "gzip_backend", "gzip_backends", "load_image", "save_image"]

#: Environment variable choosing the gzip implementation: "zlib", "isal" or "auto".
GZIP_ENV = "ASLCAL_GZIP"
#: zlib/ISA-L compression level of written ``.nii.gz`` files (nibabel's default, 1).
_GZIP_LEVEL = 1

_GZIP_MAGIC = b"\x1f\x8b"
_ALLOWED_NDIM = frozenset({3, 4})
_DESCRIP_BYTES = 79  # descrip is char[80] including the terminating NUL
_NIFTI_CODE_SCANNER = 1
# Factor from the header's spatial unit to millimetres (NIfTI-1 xyzt_units).
_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}


def _unit_to_mm(header: Any) -> float:
    """Millimetres per unit of the header's spatial unit (an unset unit: mm)."""
    return _TO_MM.get(header.get_xyzt_units()[0], 1.0)

# Exceptions that mean "the gzip stream is truncated or corrupt": the standard library
# raises EOFError (truncated), gzip.BadGzipFile (an OSError: bad header, CRC or length)
# and zlib.error; ISA-L raises EOFError, gzip.BadGzipFile and isal_zlib.error
# (IsalError, "Invalid deflate block found"), which derives from neither of the others.
_GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error) + (
    () if _isal_zlib is None else (_isal_zlib.error,)
)

# Exceptions that mean "the bytes are not a readable NIfTI image" while parsing a
# header or reading its data (nibabel raises several kinds, NumPy raises ValueError
# for impossible shapes/dtypes, gzip raises EOFError/BadGzipFile/zlib.error).
_READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    WrapStructError,
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    TypeError,
    KeyError,
)


def gzip_backend(purpose: str = "read") -> str:
    """Which gzip implementation this process uses for ``.nii.gz`` now.

    Parameters
    ----------
    purpose : {"read", "write"}
        Decompressing (:func:`load_image`) or compressing (:func:`save_image`,
        :func:`encode_image`).

    Returns
    -------
    {"isal", "zlib"}
        ``"isal"``: ISA-L (:mod:`isal.igzip`, the ``isal`` package).  ``"zlib"``: the
        standard library :mod:`gzip`.  By default (``ASLCAL_GZIP`` unset, empty or
        ``auto``) files are *read* with ISA-L when it can be imported (1.6x faster
        decompression) and *written* with zlib: ISA-L's compressed bytes are not
        always the same for the same data (seen in about one run of sixteen; the data
        decompress identically), and outputs must be byte-identical from run to run
        (checksums, resumed cohorts).  ``ASLCAL_GZIP=isal`` uses ISA-L for both (7.7x
        faster compression, bytes that may differ between runs); ``zlib`` the
        standard library for both.

    Raises
    ------
    InputError
        ``ASLCAL_GZIP`` is set to something other than ``zlib``, ``isal``, ``auto``
        or the empty string (case-insensitive), or ``purpose`` is neither ``read`` nor
        ``write``.
    BackendUnavailableError
        ``ASLCAL_GZIP=isal`` but the ``isal`` package cannot be imported.

    Notes
    -----
    ``ASLCAL_GZIP`` is read at every call (and so at every :func:`load_image` and
    :func:`save_image`).  Both implementations read any valid gzip file and verify
    its CRC; zlib writes deterministic files (level 1, mtime 0, no file name).
    """
    if purpose not in ("read", "write"):
        raise InputError(f"purpose={purpose!r}: expected 'read' or 'write'")
    raw = os.environ.get(GZIP_ENV, "")
    choice = raw.strip().lower()
    if choice == "zlib":
        return "zlib"
    if choice in ("", "auto", "isal"):
        if choice != "isal" and purpose == "write":
            return "zlib"  # deterministic bytes (see above)
        if _igzip is not None:
            return "isal"
        if choice == "isal":
            raise BackendUnavailableError(
                f"{GZIP_ENV}=isal but the 'isal' package cannot be imported; "
                f"install isal or set {GZIP_ENV}=zlib (or unset it)"
            )
        return "zlib"
    raise InputError(
        f"environment variable {GZIP_ENV}={raw!r}: expected 'zlib', 'isal' or 'auto' "
        "(or unset)"
    )


def gzip_backends() -> str:
    """``"<read> read, <write> write"``, e.g. ``"isal read, zlib write"``, for reports."""
    return f"{gzip_backend('read')} read, {gzip_backend('write')} write"


def _gunzip(raw: bytes, backend: str) -> bytes:
    """Decompress a whole gzip file (all members), verifying CRC and length."""
    if backend == "isal":
        assert _igzip is not None
        return _igzip.decompress(raw)
    return gzip.decompress(raw)


def _gzip(data: bytes, backend: str) -> bytes:
    """gzip ``data`` deterministically: level 1, mtime 0, no file name in the header."""
    if backend == "isal":
        assert _igzip is not None
        return _igzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)
    return gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)


def _write_file(path: Path, payload: bytes) -> None:
    """Write ``payload`` as the whole content of ``path`` (the atomic temporary file)."""
    with open(path, "wb") as fh:
        fh.write(payload)


@dataclass(eq=False)
class Image:
    """A NIfTI image held in memory.

    Parameters
    ----------
    data : numpy.ndarray of shape (x, y, z) or (x, y, z, t)
        Voxel values after applying the file's scaling (``scl_slope``/``scl_inter``).
        From :func:`load_image`, in the file's memory order (Fortran: each volume
        contiguous).
    affine : numpy.ndarray of shape (4, 4), float64
        Voxel index -> world (scanner) coordinates, millimetres: the sform if its code
        is set, else the qform, as nibabel chooses.
    header : nibabel.Nifti1Header
        A copy of the file's header (a ``Nifti2Header`` for NIfTI-2 files).  Its
        scaling fields are reset ("no scaling"), since ``data`` is already scaled.
    path : pathlib.Path or None, optional
        The file the image was read from, as given to :func:`load_image`.
    """

    data: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    header: nibabel.Nifti1Header = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputError(f"affine must have shape (4, 4), got {affine.shape}")
        self.affine = affine
        if not isinstance(self.header, nibabel.Nifti1Header):
            raise InputError(
                f"header must be a nibabel.Nifti1Header, got {type(self.header).__name__}"
            )
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        """tuple of int: shape of :attr:`data`, voxels (and volumes for 4-D)."""
        return tuple(self.data.shape)

    @property
    def ndim(self) -> int:
        """int: number of dimensions of :attr:`data` (3 or 4 for loaded images)."""
        return int(self.data.ndim)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """tuple of 3 float, millimetres: voxel size along x, y, z from the header zooms.

        Converted from the header's spatial unit (metres, micrometres) when set;
        an unset unit is taken as millimetres.  Missing zooms (images of fewer than
        three dimensions) count as 1.0.
        """
        zooms = [float(z) for z in self.header.get_zooms()[:3]]
        zooms += [1.0] * (3 - len(zooms))
        factor = _unit_to_mm(self.header)
        return (zooms[0] * factor, zooms[1] * factor, zooms[2] * factor)

    def __repr__(self) -> str:
        return (
            f"Image(shape={self.shape}, dtype={self.data.dtype}, "
            f"voxel_size={self.voxel_size}, path={self.path!r})"
        )


# --------------------------------------------------------------------------- loading


def _allowed_ndims(ndim: int | tuple[int, ...] | None) -> frozenset[int]:
    if ndim is None:
        return _ALLOWED_NDIM
    values = (ndim,) if isinstance(ndim, int | np.integer) else tuple(ndim)
    allowed = frozenset(int(v) for v in values)
    if not allowed or not allowed <= _ALLOWED_NDIM:
        raise InputError(f"ndim must be None, 3, 4 or a tuple of these, got {ndim!r}")
    return allowed


def _describe_ndims(allowed: frozenset[int]) -> str:
    return " or ".join(f"{n}-D" for n in sorted(allowed))


def _float_dtype(dtype: Any) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from exc
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return resolved


def _nifti_class(block: bytes) -> type[nibabel.Nifti1Image] | None:
    """Return the nibabel single-file image class for a header, or None if not NIfTI."""
    for klass, size, magic in (
        (nibabel.Nifti1Image, 348, b"n+1\x00"),
        (nibabel.Nifti2Image, 540, b"n+2\x00"),
    ):
        if len(block) < size:
            continue
        sizeof_hdr = block[:4]
        if sizeof_hdr not in (size.to_bytes(4, "little"), size.to_bytes(4, "big")):
            continue
        magic_offset = 344 if size == 348 else 4
        if block[magic_offset : magic_offset + 4] == magic:
            return klass
    return None


def _check_scaling(header: nibabel.Nifti1Header, where: str) -> None:
    """Reject non-finite scaling that nibabel would silently ignore or fail on."""
    slope = float(header["scl_slope"])
    inter = float(header["scl_inter"])
    # NIfTI-1: slope 0 means "no scaling"; nibabel also reads NaN as unset.
    if slope == 0.0 or math.isnan(slope):
        return
    if math.isinf(slope) or not math.isfinite(inter):
        raise InputError(
            f"{where}: header scaling is not finite (scl_slope={slope}, scl_inter={inter}); "
            "expected finite scl_slope and scl_inter (or scl_slope 0/NaN for no scaling)"
        )


def _squeeze_shape(shape: tuple[int, ...], allowed: frozenset[int]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the smallest allowed dimensionality (>= 3)."""
    floor = max(3, min(allowed))
    out = list(shape)
    while len(out) > floor and out[-1] == 1:
        out.pop()
    return tuple(out)


def load_image(
    path: StrPath,
    *,
    dtype: Any = "float32",
    ndim: int | tuple[int, ...] | None = None,
    name: str = "image",
) -> Image:
    """Read a NIfTI-1 or NIfTI-2 image fully into memory and check it.

    Parameters
    ----------
    path : str or os.PathLike
        A single-file NIfTI image, ``.nii`` or gzip-compressed ``.nii.gz`` (the
        compression is recognised from the content, not the name).
    dtype : {"float32", "float64"} or numpy float dtype, optional
        Data type of :attr:`Image.data`.  Default ``"float32"``.
    ndim : int, tuple of int or None, optional
        Accepted dimensionalities, from {3, 4}.  None (default) accepts 3-D and 4-D.
        Trailing singleton axes beyond the smallest accepted dimensionality are
        dropped: with 3 accepted, an image of shape (x, y, z, 1) or (x, y, z, 1, 1)
        is returned 3-D; with only 4 accepted, (x, y, z, 1, 1) becomes (x, y, z, 1).
        A time series (x, y, z, t) with t > 1 is never squeezed.
    name : str, optional
        What the image is, for error messages, e.g. ``"calibration image (-c)"``.

    Returns
    -------
    Image
        ``data`` in ``dtype`` with the file's ``scl_slope``/``scl_inter`` applied,
        ``affine`` (float64, mm: a file whose spatial unit is metres or micrometres is
        converted, and the header copy then says mm), a copy of the header and ``path``.

    Raises
    ------
    InputError
        The message contains ``name``, the path and what was expected, for: a
        missing path or a folder; a file that is not a NIfTI image (text, PNG, ...);
        a truncated or corrupt file (gzip stream or data shorter than the header
        says); non-finite header scaling (``scl_slope`` +-Inf, or ``scl_inter``
        NaN/Inf with a non-zero finite slope); a dimensionality not in ``ndim``
        (e.g. a 2-D image, or a 4-D series of several volumes when 3-D is required);
        an axis of length 0; a ``vox_offset`` inside the header; complex or RGB data.  Also (without the path) for a gzip file when
        ``ASLCAL_GZIP`` has an unknown value (see :func:`gzip_backend`).
    BackendUnavailableError
        A gzip file with ``ASLCAL_GZIP=isal`` but no ``isal`` package.

    Notes
    -----
    The file is read and decompressed completely (the gzip CRC is verified), so
    corruption is detected here.  Memory use is briefly the size of the
    uncompressed file plus the returned array.  Decompression uses ISA-L when
    available, else zlib (see :func:`gzip_backend` and ``ASLCAL_GZIP``).
    """
    target = _float_dtype(dtype)
    allowed = _allowed_ndims(ndim)
    file_path = Path(path)
    where = f"{name} {str(file_path)!r}"
    expected = f"expected a {_describe_ndims(allowed)} NIfTI image (.nii or .nii.gz)"

    if not file_path.exists():
        raise InputError(f"{where}: file does not exist; {expected}")
    if file_path.is_dir():
        raise InputError(f"{where}: is a folder, not a file; {expected}")

    try:
        raw = file_path.read_bytes()
    except OSError as exc:
        raise InputError(f"{where}: cannot read the file ({exc.strerror or exc}); {expected}") from exc
    if raw[:2] == _GZIP_MAGIC:
        backend = gzip_backend()
        try:
            raw = _gunzip(raw, backend)
        except _GZIP_ERRORS as exc:
            raise InputError(
                f"{where}: the gzip stream is truncated or corrupt "
                f"({type(exc).__name__}: {exc}); {expected}"
            ) from exc

    klass = _nifti_class(raw)
    if klass is None:
        raise InputError(
            f"{where}: not a NIfTI image (no NIfTI-1/NIfTI-2 single-file header found); "
            f"{expected}"
        )
    header_size = 348 if klass is nibabel.Nifti1Image else 540
    try:
        raw_header = klass.header_class(raw[:header_size], check=False)
    except _READ_ERRORS as exc:
        raise InputError(f"{where}: unreadable NIfTI header ({exc}); {expected}") from exc
    _check_scaling(raw_header, where)

    try:
        img = klass.from_bytes(raw)
    except _READ_ERRORS as exc:
        raise InputError(
            f"{where}: corrupt NIfTI header ({type(exc).__name__}: {exc}); {expected}"
        ) from exc

    on_disk = img.get_data_dtype()
    if on_disk.kind == "c" or on_disk.fields is not None:
        raise InputError(
            f"{where}: data type {on_disk} (complex or RGB) is not supported; "
            f"{expected} with real-valued voxels"
        )

    file_shape = tuple(int(n) for n in img.shape)
    shape = _squeeze_shape(file_shape, allowed)
    if len(shape) not in allowed:
        raise InputError(
            f"{where}: has shape {file_shape} ({len(file_shape)}-D); {expected}"
            + (" with a single volume" if allowed == {3} and len(shape) == 4 else "")
        )

    if any(n == 0 for n in file_shape):
        raise InputError(f"{where}: has shape {file_shape}, with an axis of length 0 (no voxels); {expected}")
    # The offset as the file says it: the header nibabel builds from bytes resets it to 0.
    vox_offset = int(raw_header.get_data_offset())
    if vox_offset < header_size + 4:
        raise InputError(
            f"{where}: corrupt NIfTI header: vox_offset {vox_offset} points into the header "
            f"(a single-file image stores its voxels from byte {header_size + 4} on); {expected}"
        )
    needed = vox_offset + math.prod(file_shape) * on_disk.itemsize
    if len(raw) < needed:
        raise InputError(
            f"{where}: file is truncated: the header describes {needed} bytes "
            f"(uncompressed) but the file holds {len(raw)}; {expected}"
        )

    try:
        with np.errstate(over="raise"):
            data = np.asarray(img.get_fdata(dtype=target, caching="unchanged"))
    except FloatingPointError as exc:
        raise InputError(
            f"{where}: voxel values (after scaling) exceed the range of {target}; "
            "load it with dtype='float64'"
        ) from exc
    except _READ_ERRORS as exc:
        raise InputError(
            f"{where}: cannot read the voxel data ({type(exc).__name__}: {exc}); {expected}"
        ) from exc
    # Kept in the file's memory order (NIfTI: Fortran, x fastest, each volume contiguous):
    # a C-order copy cost as much as the decompression.
    data = data.reshape(shape)

    affine = np.array(img.affine, dtype=np.float64)
    header = img.header.copy()
    unit_to_mm = _unit_to_mm(header)
    if unit_to_mm != 1.0:
        # A file in metres or micrometres: the affine (and the zooms) in millimetres, as
        # everywhere in aslcal; the header then says mm so that nothing converts twice.
        affine[:3, :] *= unit_to_mm
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        zooms = header.get_zooms()
        header.set_zooms(tuple(z * unit_to_mm for z in zooms[:3]) + tuple(zooms[3:]))
        header.set_xyzt_units(xyz="mm", t=header.get_xyzt_units()[1])
        for form, code, setter in ((qform, qcode, header.set_qform), (sform, scode, header.set_sform)):
            if form is not None:
                form = np.array(form, dtype=np.float64)
                form[:3, :] *= unit_to_mm
                setter(form, code=int(code))
    _check_affine(affine, header, where)
    return Image(data=data, affine=affine, header=header, path=file_path)


def _check_affine(affine: np.ndarray, header: Any, where: str) -> None:
    """Refuse an affine that places no voxel (non-finite, or an axis of length 0), naming the
    file; where the header's voxel size (pixdim) disagrees with the affine's -- a zero pixdim,
    which nibabel reads as 1 -- take the affine's (``header`` is the image's own copy), with
    a warning: every grid check and every size in mm (the brain mask's balls) must agree."""
    if not np.isfinite(affine).all():
        raise InputError(f"{where}: its affine (sform/qform) holds non-finite values; expected a finite "
                         "voxel-to-world transform")
    columns = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not abs(np.linalg.det(affine[:3, :3])) > 1e-12 * float(np.prod(columns)):
        raise InputError(f"{where}: its affine (sform/qform) is singular (voxel axes of length 0 or in one "
                         "plane); expected a voxel-to-world transform of a 3-D grid")
    zooms = [float(z) for z in header.get_zooms()[:3]]
    if len(zooms) == 3 and not np.allclose(zooms, columns, rtol=1e-3, atol=0.0):
        log.warning("%s: the header's voxel size %s mm (pixdim) disagrees with its affine's %s mm: the "
                    "affine's is used", where, tuple(round(z, 6) for z in zooms),
                    tuple(round(float(c), 6) for c in columns))
        header.set_zooms(tuple(float(c) for c in columns) + tuple(header.get_zooms()[3:]))


# ---------------------------------------------------------------------------- saving


def _to_host(data: Any) -> np.ndarray:
    """Return ``data`` as a NumPy array, copying a CuPy (device) array to the host."""
    if not isinstance(data, np.ndarray) and (
        hasattr(data, "__cuda_array_interface__") or callable(getattr(data, "get", None))
    ):
        getter = getattr(data, "get", None)
        if not callable(getter):
            raise InputError(
                f"data of type {type(data).__name__} exposes __cuda_array_interface__ but "
                "has no .get() to copy it to the host; pass a NumPy or CuPy array"
            )
        data = getter()
    return np.asarray(data)


def _cast_for_output(data: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast ``data`` to the on-disk dtype, refusing lossy surprises."""
    if data.dtype.kind in "cOSUV" or data.dtype.fields is not None:
        raise InputError(
            f"data of dtype {data.dtype} cannot be saved; expected real numbers or bool"
        )
    if dtype is None:
        target = np.dtype(np.uint8) if data.dtype.kind == "b" else np.dtype(np.float32)
    else:
        try:
            target = np.dtype(dtype)
        except TypeError as exc:
            raise InputError(f"dtype {dtype!r} is not a NumPy dtype") from exc
        if target.kind not in "biuf" or target.itemsize > 8 or (target.kind == "f" and target.itemsize < 4):
            raise InputError(
                f"dtype {dtype!r} cannot be stored in NIfTI; expected an integer or float dtype "
                "(e.g. 'float32', 'float64', 'int16', 'uint8')"
            )
        if target.kind == "b":
            target = np.dtype(np.uint8)
    if data.dtype == target:
        return data
    if target.kind in "iu" and data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            raise InputError(
                f"data contain NaN or Inf, which {target} cannot store; "
                "save as a float dtype or replace them first"
            )
        rounded = np.rint(data)
        info = np.iinfo(target)
        if rounded.size and (rounded.min() < info.min or rounded.max() > info.max):
            raise InputError(
                f"data range [{rounded.min()}, {rounded.max()}] does not fit {target} "
                f"[{info.min}, {info.max}]"
            )
        return rounded.astype(target)
    if target.kind in "iu" and data.dtype.kind in "iu":
        info = np.iinfo(target)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise InputError(
                f"data range [{data.min()}, {data.max()}] does not fit {target} "
                f"[{info.min}, {info.max}]"
            )
        return data.astype(target)
    with np.errstate(over="ignore", invalid="ignore"):
        out = data.astype(target)
    if target.kind == "f" and data.dtype.kind == "f" and target.itemsize < data.itemsize:
        if np.count_nonzero(~np.isfinite(out)) != np.count_nonzero(~np.isfinite(data)):
            raise InputError(
                f"data values exceed the range of {target}; pass dtype='float64'"
            )
    return out


def _descrip(description: str | None) -> bytes:
    if description is None:
        from .. import __version__

        description = f"aslcal {__version__}"
    encoded = str(description).encode("utf-8")[:_DESCRIP_BYTES]
    # Do not leave half a multi-byte character at the cut.
    return encoded.decode("utf-8", errors="ignore").encode("utf-8")


def save_image(
    path: StrPath,
    data: Any,
    affine: Any = None,
    *,
    header: nibabel.Nifti1Header | None = None,
    description: str | None = None,
    overwrite: bool = True,
    dtype: Any = None,
) -> Path:
    """Write an array as a NIfTI image, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination ending in ``.nii`` or ``.nii.gz`` (gzip-compressed).  Its folder
        must exist.
    data : array_like of shape (x, y, z) or (x, y, z, t)
        Voxel values.  A CuPy array (anything with ``.get()`` or
        ``__cuda_array_interface__``) is copied to the host: this is an I/O boundary.
    affine : array_like of shape (4, 4), optional
        Voxel index -> world coordinates, millimetres.  Default: the best affine of
        ``header``.  At least one of ``affine`` and ``header`` is required.
    header : nibabel.Nifti1Header, optional
        Header to start from, e.g. ``Image.header`` of the input the output is
        aligned with.  It is copied; its qform/sform codes are kept (a code of 0
        becomes 1, "scanner", so that ``affine`` is not lost) and both forms are
        set from ``affine``.  A ``Nifti2Header`` gives a NIfTI-2 file.  Without a
        header, both forms are set from ``affine`` with code 1 ("scanner").
    description : str, optional
        Text for the header's ``descrip`` field; default ``"aslcal <version>"``.
        Truncated to 79 bytes (UTF-8).
    overwrite : bool, optional
        Whether an existing file may be replaced.  Default True.
    dtype : numpy dtype or str, optional
        On-disk data type.  Default: ``uint8`` for bool data, else ``float32``.
        Integer targets round float data to the nearest integer and reject NaN/Inf
        and out-of-range values.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    InputError
        Bad extension; neither ``affine`` nor ``header``; ``affine`` not a finite
        4x4 matrix, or singular; complex, object or string data; a dtype NIfTI cannot
        store (float16); values the chosen dtype cannot hold; the destination cannot be written (see
        :func:`aslcal.io.atomic.atomic_output`); or, for ``.nii.gz``, an unknown
        ``ASLCAL_GZIP`` value (see :func:`gzip_backend`).
    BackendUnavailableError
        ``.nii.gz`` with ``ASLCAL_GZIP=isal`` but no ``isal`` package.

    Notes
    -----
    Spatial/temporal units are set to millimetres/seconds (an affine taken from a
    ``header`` in metres or micrometres is converted), and the scaling fields to
    "no scaling" (the values are stored as given).  The data are written to a hidden
    temporary file in the destination folder and renamed when complete.

    The file is built in memory (nibabel's ``to_bytes``) and, for ``.nii.gz``,
    gzip-compressed at level 1 with mtime 0 and no file name by zlib (or ISA-L with
    ``ASLCAL_GZIP=isal``, see :func:`gzip_backend`): the same array and header give
    byte-identical files.  Memory use is briefly the uncompressed plus the compressed
    file size.
    """
    dest = Path(path)
    payload = encode_image(dest.name, data, affine, header=header, description=description, dtype=dtype)
    with atomic_output(dest, overwrite=overwrite) as tmp:
        _write_file(tmp, payload)
    return dest


def encode_image(
    name: str,
    data: Any,
    affine: Any = None,
    *,
    header: nibabel.Nifti1Header | None = None,
    description: str | None = None,
    dtype: Any = None,
) -> bytes:
    """The bytes of the file :func:`save_image` writes (nothing is written).

    ``name`` is the file name (``*.nii`` or ``*.nii.gz``: gzip-compressed); the other
    arguments and the errors are those of :func:`save_image`.  For writers that stage
    many files at once (:meth:`aslcal.io.atomic.OutputSet.write_bytes`) and hash what
    they wrote without reading it back.
    """
    dest = Path(name)
    lower = dest.name.lower()
    if not (lower.endswith(".nii") or lower.endswith(".nii.gz")) or lower in (".nii", ".nii.gz"):
        raise InputError(
            f"output image path {str(dest)!r} has an unsupported extension; "
            "expected a name ending in .nii or .nii.gz"
        )
    if header is not None and not isinstance(header, nibabel.Nifti1Header):
        raise InputError(
            f"header must be a nibabel.Nifti1Header (or Nifti2Header), "
            f"got {type(header).__name__}"
        )
    if affine is None and header is None:
        raise InputError(
            f"save_image({str(dest)!r}): an affine or a header is required to place "
            "the image in space"
        )

    if affine is None:
        assert header is not None
        affine_arr = np.array(header.get_best_affine(), dtype=np.float64)
        # in the header's spatial unit: millimetres, as the file written below says
        affine_arr[:3, :] *= _unit_to_mm(header)
    else:
        try:
            affine_arr = np.array(affine, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"affine must be a 4x4 array of numbers, got {affine!r}") from exc
    if affine_arr.shape != (4, 4) or not np.isfinite(affine_arr).all():
        raise InputError(
            f"affine must be a finite 4x4 matrix, got shape {affine_arr.shape} "
            f"with values {affine_arr.tolist()}"
        )
    if abs(np.linalg.det(affine_arr[:3, :3])) <= 1e-12 * max(1.0, float(np.abs(affine_arr[:3, :3]).max()) ** 3):
        raise InputError(
            f"save_image({str(dest)!r}): the affine's 3x3 part is singular "
            f"({affine_arr[:3, :3].tolist()}): voxels would have no extent in space"
        )

    array = _to_host(data)
    if not 1 <= array.ndim <= 7:
        raise InputError(
            f"data for {str(dest)!r} has {array.ndim} dimensions; NIfTI stores 1 to 7"
        )
    array = _cast_for_output(array, dtype)

    if header is None:
        # dtype given explicitly: nibabel asks for it before it stores (u)int64
        img = nibabel.Nifti1Image(array, affine_arr, dtype=array.dtype)
        sform_code = qform_code = _NIFTI_CODE_SCANNER
    else:
        klass = nibabel.Nifti2Image if isinstance(header, nibabel.Nifti2Header) else nibabel.Nifti1Image
        img = klass(array, affine_arr, header=header.copy(), dtype=array.dtype)
        sform_code = int(header["sform_code"]) or _NIFTI_CODE_SCANNER
        qform_code = int(header["qform_code"]) or _NIFTI_CODE_SCANNER
    img.set_sform(affine_arr, code=sform_code)
    img.set_qform(affine_arr, code=qform_code)

    out_header = img.header
    out_header.set_data_dtype(array.dtype)
    out_header.set_xyzt_units(xyz="mm", t="sec")
    out_header.set_slope_inter(None, None)
    out_header["descrip"] = _descrip(description)

    payload = img.to_bytes()
    if lower.endswith(".nii.gz"):
        payload = _gzip(payload, gzip_backend("write"))
    return payload
