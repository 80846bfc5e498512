"""Atomic file output: nothing aslcal writes is ever left half-written.

Every writer goes through :func:`atomic_output`, which hands the caller a temporary
path in the *destination folder* and renames it over the destination only when the
block finishes without an exception.  A reader therefore sees either the old file, no
file, or the complete new file, never a partial one -- even if the process is killed
mid-write (the rename is atomic on POSIX and on Windows within one volume, which is why
the temporary file lives next to the destination rather than in ``/tmp``).

:class:`OutputSet` extends the guarantee to several files: a run's outputs all appear
together when it succeeds, or none of them do.

The small writers :func:`write_text`, :func:`write_json` and :func:`write_scalar` cover
the text outputs of a calibration run (provenance JSON, the FSL-style ``M0`` value file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["OutputSet", "atomic_output", "json_text", "sha256_file", "write_text", "write_json", "write_scalar"]

StrPath = str | os.PathLike[str]

# A final suffix that is a compression layer keeps the suffix before it too, so that
# ``m0.nii.gz`` gives a temporary ``.m0.tmp-1a2b3c4d.nii.gz`` that nibabel still gzips.
_COMPRESSION_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst"})
_TEMP_MARKER = ".tmp-"
_MAX_NAME_TRIES = 100


def _split_suffixes(name: str) -> tuple[str, str]:
    """Split a file name into (stem, suffixes), keeping e.g. ``.nii.gz`` together."""
    pure = PurePath(name)
    suffixes = pure.suffixes
    if not suffixes or pure.suffix == name:  # no suffix, or a dot file like ".bashrc"
        return name, ""
    keep = 2 if len(suffixes) >= 2 and suffixes[-1].lower() in _COMPRESSION_SUFFIXES else 1
    tail = "".join(suffixes[-keep:])
    stem = name[: -len(tail)]
    if not stem:  # e.g. ".nii.gz" as a whole name: keep only the last suffix
        tail = suffixes[-1]
        stem = name[: -len(tail)]
    return stem, tail


def _check_destination(dest: Path, *, overwrite: bool) -> None:
    """Raise :class:`InputError` when ``dest`` cannot or may not be written."""
    folder = dest.parent
    if not folder.exists():
        raise InputError(
            f"output folder {str(folder)!r} does not exist (needed for {str(dest)!r}); "
            "create it first"
        )
    if not folder.is_dir():
        raise InputError(
            f"output folder {str(folder)!r} is not a folder (needed for {str(dest)!r})"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(
            f"output folder {str(folder)!r} is not writable (needed for {str(dest)!r})"
        )
    if dest.is_dir():
        raise InputError(f"output path {str(dest)!r} is an existing folder; expected a file path")
    if not overwrite and os.path.lexists(dest):
        raise InputError(
            f"output file {str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it"
        )


def _create_temp(dest: Path) -> Path:
    """Create (exclusively) and return an empty hidden temporary file next to ``dest``.

    The file is created with mode ``0o666`` filtered by the process umask, i.e. the
    permissions an ordinary new file gets (unlike :func:`tempfile.mkstemp`'s ``0o600``).
    """
    stem, suffixes = _split_suffixes(dest.name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_MAX_NAME_TRIES):
        tmp = dest.with_name(f".{stem}{_TEMP_MARKER}{secrets.token_hex(4)}{suffixes}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise InputError(
                f"cannot create a file in output folder {str(dest.parent)!r} "
                f"(needed for {str(dest)!r}): {exc.strerror or exc}"
            ) from exc
        os.close(fd)
        return tmp
    raise InputError(  # pragma: no cover - needs 100 random-name collisions
        f"cannot find a free temporary name in output folder {str(dest.parent)!r}"
    )


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory=True`` a folder) to stable storage."""
    if directory:
        if os.name == "nt":  # folders cannot be opened for fsync on Windows
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some file systems do not support fsync on folders
            pass
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_errors(path: StrPath) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block that names no file with ``path`` as its file
    name: a failed write or fsync says "No space left on device" without saying where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise type(exc)(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _commit(tmp: Path, dest: Path, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``dest`` atomically."""
    if overwrite:
        os.replace(tmp, dest)
        return
    # No-clobber: a hard link fails atomically if dest appeared since the check.
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise InputError(
            f"output file {str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it"
        ) from None
    except OSError:
        # File system without hard links: best effort check-then-rename.
        if os.path.lexists(dest):
            raise InputError(
                f"output file {str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it"
            ) from None
        os.replace(tmp, dest)
        return
    _remove_quietly(tmp)


@contextlib.contextmanager
def atomic_output(dest: StrPath, *, overwrite: bool = True) -> Iterator[Path]:
    """Write a file atomically through a temporary path in the destination folder.

    Parameters
    ----------
    dest : str or os.PathLike
        Final path of the file.  Its folder must already exist and be writable;
        missing folders are *not* created (that is the caller's decision).
    overwrite : bool, optional
        Whether an existing ``dest`` may be replaced.  Default True.

    Yields
    ------
    tmp : pathlib.Path
        An existing, empty, hidden file ``.{stem}.tmp-<8 hex digits>{suffixes}`` in the
        folder of ``dest``.  It keeps the suffixes of ``dest`` (``.nii.gz``, ``.nii``,
        ``.json``, ``.txt``, ...) so that writers which pick the format from the
        extension (``nibabel.save``) behave as for ``dest``.  Write the whole content
        to it (overwriting, not appending).

    Raises
    ------
    InputError
        Before anything is written: the folder of ``dest`` is missing, not a folder
        or not writable; ``dest`` is a folder; or ``dest`` exists and ``overwrite``
        is False.

    Notes
    -----
    On normal exit the temporary file is flushed to disk (``fsync``) and renamed to
    ``dest`` with :func:`os.replace` (or, with ``overwrite=False``, hard-linked so
    that a file created meanwhile is not clobbered).  If the block raises, the
    temporary file is removed and the exception propagates; ``dest`` is untouched.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(folder / "notes.txt") as tmp:
    ...     _ = tmp.write_text("done\\n")
    >>> (folder / "notes.txt").read_text()
    'done\\n'
    """
    dest_path = Path(dest)
    _check_destination(dest_path, overwrite=overwrite)
    tmp = _create_temp(dest_path)
    try:
        with naming_errors(dest_path):
            yield tmp
            _fsync_path(tmp)
            _commit(tmp, dest_path, overwrite=overwrite)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_path(dest_path.parent, directory=True)


class OutputSet:
    """Several output files that appear together, or not at all.

    Each :meth:`path` call checks the destination (as :func:`atomic_output` does) and
    returns a temporary path next to it; write the file there with any writer.  Leaving
    the ``with`` block normally renames every temporary file onto its destination;
    leaving it by an exception removes them all, so a failed run leaves no partial
    output anywhere.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> with OutputSet() as out:
    ...     _ = out.path(folder / "a.txt").write_text("a")
    ...     _ = out.path(folder / "b.txt").write_text("b")
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt', 'b.txt']
    """

    def __init__(self, *, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []

    def check(self, *dests: StrPath) -> None:
        """Validate destinations up front: each written once, folder writable, overwrite rule."""
        seen: dict[str, Path] = {}
        for dest in dests:
            key = os.path.normcase(os.path.abspath(dest))
            if key in seen:
                raise InputError(f"output file {str(dest)!r} is requested twice (two outputs would overwrite each other)")
            seen[key] = Path(dest)
        probed: set[Path] = set()
        for dest in dests:
            dest_path = Path(dest)
            _check_destination(dest_path, overwrite=self.overwrite)
            if dest_path.parent not in probed:
                # the permission bits do not tell everything (root, read-only mounts,
                # /proc): create and remove a file there now, before any work is done
                _remove_quietly(_create_temp(dest_path))
                probed.add(dest_path.parent)

    def path(self, dest: StrPath) -> Path:
        """Register ``dest`` and return the temporary path to write it to."""
        dest_path = Path(dest)
        if any(d == dest_path for _, d in self._staged):
            raise InputError(f"output file {str(dest_path)!r} is requested twice")
        _check_destination(dest_path, overwrite=self.overwrite)
        tmp = _create_temp(dest_path)  # checks that the folder takes new files
        # Not left behind as an empty file: :meth:`commit` tells a file never written by
        # its absence (the random name keeps it this set's own).
        _remove_quietly(tmp)
        self._staged.append((tmp, dest_path))
        return tmp

    def write_bytes(self, dest: StrPath, payload: bytes) -> Path:
        """Register ``dest`` and write ``payload`` as its whole content (committed with the set).

        The file is flushed to disk once, by :meth:`commit`; returns the temporary path.
        """
        tmp = self.path(dest)
        with naming_errors(dest), open(tmp, "wb") as handle:
            handle.write(payload)
        return tmp

    @property
    def destinations(self) -> list[Path]:
        return [d for _, d in self._staged]

    def discard(self, dest: StrPath) -> None:
        """Forget one staged output (its temporary file is removed); no-op if not staged."""
        dest_path = Path(dest)
        for item in list(self._staged):
            if item[1] == dest_path or item[0] == dest_path:
                _remove_quietly(item[0])
                self._staged.remove(item)

    def abort(self) -> None:
        """Remove every staged temporary file."""
        for tmp, _ in self._staged:
            _remove_quietly(tmp)
        self._staged.clear()

    def commit(self) -> list[Path]:
        """Rename every staged file onto its destination; return the destinations."""
        try:
            for tmp, dest in self._staged:
                if not tmp.exists():
                    raise InputError(f"output {str(dest)!r} was registered but never written")
                with naming_errors(dest):
                    _fsync_path(tmp)
                if not self.overwrite and os.path.lexists(dest):
                    raise InputError(
                        f"output file {str(dest)!r} already exists; pass overwrite=True (--overwrite) to replace it"
                    )
        except BaseException:
            self.abort()
            raise
        done = []
        for tmp, dest in self._staged:
            os.replace(tmp, dest)
            done.append(dest)
        for folder in {d.parent for d in done}:
            _fsync_path(folder, directory=True)
        self._staged.clear()
        return done

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text(path: StrPath, text: str, *, overwrite: bool = True) -> Path:
    """Write a text file atomically (UTF-8, line endings written as given).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its folder must exist.
    text : str
        The complete content.  No newline is added and none is translated.
    overwrite : bool, optional
        Whether an existing file may be replaced.  Default True.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`pathlib.Path`.

    Raises
    ------
    InputError
        ``text`` is not a str, or the destination cannot be written
        (see :func:`atomic_output`).
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    dest = Path(path)
    with atomic_output(dest, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return dest


def _to_jsonable(obj: Any, where: str) -> Any:
    """Return ``obj`` with NumPy/CuPy values, paths and non-finite floats made JSON-safe."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if hasattr(obj, "__cuda_array_interface__") and callable(getattr(obj, "get", None)):
        obj = obj.get()  # CuPy array: provenance output is an I/O boundary
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item(), where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, PurePath | os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            json_key = key
            if isinstance(key, np.generic):
                json_key = key.item()
            elif isinstance(key, PurePath | os.PathLike):
                json_key = os.fspath(key)
            if isinstance(json_key, float) and not math.isfinite(json_key):
                raise InputError(f"{where}: key {key!r} is not finite; expected a str key")
            if not (json_key is None or isinstance(json_key, str | int | float | bool)):
                raise InputError(
                    f"{where}: key {key!r} of type {type(key).__name__} cannot be a JSON key; "
                    "expected str, int, float, bool or None"
                )
            out[json_key] = _to_jsonable(value, f"{where}[{key!r}]")
        return out
    if isinstance(obj, list | tuple):
        return [_to_jsonable(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    raise InputError(
        f"{where}: object of type {type(obj).__name__} cannot be written to JSON; expected "
        "dict, list, tuple, str, int, float, bool, None, NumPy scalar/array or path"
    )


def write_json(path: StrPath, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file (conventionally ``*.json``); its folder must exist.
    obj : object
        Nested dicts/lists/tuples of str, int, float, bool and None.  Also accepted:
        NumPy scalars and arrays (written as numbers and nested lists), CuPy arrays
        (copied to the host: this is an I/O boundary) and paths (written as strings).
        Non-finite floats (NaN, +-Inf) are written as ``null``, since JSON has no
        representation for them.
    overwrite : bool, optional
        Whether an existing file may be replaced.  Default True.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`pathlib.Path`.

    Raises
    ------
    InputError
        A value or key cannot be represented in JSON (the message gives where in
        ``obj``), or the destination cannot be written (see :func:`atomic_output`).

    Notes
    -----
    Keys keep their insertion order (``sort_keys=False``), the indent is 2 spaces,
    floats are written with full precision (shortest repr that round-trips) and the
    file ends with a newline.
    """
    return write_text(path, json_text(obj), overwrite=overwrite)


def json_text(obj: Any) -> str:
    """The text :func:`write_json` writes for ``obj`` (same conversions and errors)."""
    return json.dumps(_to_jsonable(obj, "obj"), indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_scalar(path: StrPath, value: Any, *, overwrite: bool = True) -> Path:
    """Write one number on one line, like the ``M0`` value file of FSL ``oxford_asl``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file (conventionally ``*.txt``); its folder must exist.
    value : float, int, NumPy scalar or one-element array
        The number, in the units the caller documents for the file (for the M0 file:
        the scanner's arbitrary signal units).  Must be finite.
    overwrite : bool, optional
        Whether an existing file may be replaced.  Default True.

    Returns
    -------
    pathlib.Path
        ``path`` as a :class:`pathlib.Path`.

    Raises
    ------
    InputError
        ``value`` is not a single real finite number, or the destination cannot be
        written (see :func:`atomic_output`).

    Notes
    -----
    The content is ``f"{value:.10g}\\n"``: ten significant digits, e.g. ``1234.56789``
    or ``1.5e-07``, well beyond the precision of any MRI signal.
    """
    if hasattr(value, "__cuda_array_interface__") and callable(getattr(value, "get", None)):
        value = value.get()
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf" or isinstance(value, bool):
        raise InputError(
            f"value must be a single real number, got {value!r} "
            f"(type {type(value).__name__})"
        )
    number = float(array.reshape(()))
    if not math.isfinite(number):
        raise InputError(f"value must be finite, got {number!r}")
    return write_text(path, f"{number:.10g}\n", overwrite=overwrite)


def sha256_file(path: StrPath) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
