"""Tests for aslcal.io.atomic: atomic rename, clean failure, refusal to clobber."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.io import atomic
from aslcal.io.atomic import OutputSet, atomic_output, write_json, write_scalar, write_text


@contextlib.contextmanager
def raises_input_error(pattern: str, folder: Path) -> Iterator[pytest.ExceptionInfo[InputError]]:
    """``pytest.raises(InputError)``, searching ``pattern`` in the message with ``folder``
    blanked out: tmp_path names contain the test's name, which would match by itself."""
    with pytest.raises(InputError) as info:
        yield info
    message = str(info.value).replace(str(folder), "<folder>")
    assert re.search(pattern, message), f"{pattern!r} not found in {message!r}"


def _names(folder: Path) -> list[str]:
    """Every entry of a folder, hidden ones included."""
    return sorted(os.listdir(folder))


class _Boom(Exception):
    pass


# ------------------------------------------------------------------ atomic_output


def test_success_renames_temp_to_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    with atomic_output(dest) as tmp:
        # The temporary file is hidden, in the same folder, keeps the suffix and
        # the destination does not exist yet.
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".out.tmp-")
        assert tmp.name.endswith(".txt")
        assert not dest.exists()
        tmp.write_text("hello\n")
    assert dest.read_text() == "hello\n"
    assert _names(tmp_path) == ["out.txt"]


@pytest.mark.parametrize(
    ("name", "prefix", "suffix"),
    [
        ("m0.nii.gz", ".m0.tmp-", ".nii.gz"),
        ("m0.nii", ".m0.tmp-", ".nii"),
        ("prov.json", ".prov.tmp-", ".json"),
        ("sub-01_m0.txt", ".sub-01_m0.tmp-", ".txt"),
        ("a.b.c.nii.gz", ".a.b.c.tmp-", ".nii.gz"),
        ("noext", ".noext.tmp-", ""),
    ],
)
def test_temp_name_keeps_suffixes(tmp_path: Path, name: str, prefix: str, suffix: str) -> None:
    with atomic_output(tmp_path / name) as tmp:
        assert tmp.name.startswith(prefix)
        assert tmp.name.endswith(suffix)
        # ".{stem}.tmp-" + 8 hex characters + suffixes
        assert len(tmp.name) == len(prefix) + 8 + len(suffix)
    assert (tmp_path / name).exists()


def test_exception_leaves_no_destination_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "out.nii.gz"
    with pytest.raises(_Boom):
        with atomic_output(dest) as tmp:
            tmp.write_bytes(b"partial")
            raise _Boom
    assert _names(tmp_path) == []


def test_exception_keeps_previous_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old\n")
    with pytest.raises(_Boom):
        with atomic_output(dest) as tmp:
            tmp.write_text("new but unfinished")
            raise _Boom
    assert dest.read_text() == "old\n"
    assert _names(tmp_path) == ["out.txt"]


def test_overwrite_true_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old\n")
    with atomic_output(dest) as tmp:
        tmp.write_text("new\n")
    assert dest.read_text() == "new\n"
    assert _names(tmp_path) == ["out.txt"]


def test_overwrite_false_refuses_existing_and_leaves_it(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old\n")
    entered = False
    with raises_input_error("overwrite", tmp_path) as info:
        with atomic_output(dest, overwrite=False):
            entered = True
    assert str(dest) in str(info.value)
    assert not entered  # refused before anything was written
    assert dest.read_text() == "old\n"
    assert _names(tmp_path) == ["out.txt"]


def test_overwrite_false_writes_new_file(tmp_path: Path) -> None:
    dest = tmp_path / "new.txt"
    with atomic_output(dest, overwrite=False) as tmp:
        tmp.write_text("x")
    assert dest.read_text() == "x"
    assert _names(tmp_path) == ["new.txt"]


def test_overwrite_false_detects_file_created_during_write(tmp_path: Path) -> None:
    # Another process creates dest while we write: no-clobber must still hold.
    dest = tmp_path / "out.txt"
    with raises_input_error("already exists", tmp_path):
        with atomic_output(dest, overwrite=False) as tmp:
            tmp.write_text("ours")
            dest.write_text("theirs")
    assert dest.read_text() == "theirs"
    assert _names(tmp_path) == ["out.txt"]


def test_missing_parent_folder_is_not_created(tmp_path: Path) -> None:
    dest = tmp_path / "missing" / "out.nii.gz"
    with raises_input_error("does not exist", tmp_path) as info:
        with atomic_output(dest):
            pytest.fail("block must not run")
    assert str(tmp_path / "missing") in str(info.value)
    assert not (tmp_path / "missing").exists()


def test_parent_that_is_a_file(tmp_path: Path) -> None:
    # Fails for root too (unlike chmod-based read-only folders).
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with raises_input_error("not a folder", tmp_path) as info:
        with atomic_output(blocker / "out.nii"):
            pytest.fail("block must not run")
    assert str(blocker) in str(info.value)


def test_unwritable_folder_reported_by_access(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # We run as root, where chmod 0o500 does not stop writes; simulate the check.
    real_access = os.access

    def fake_access(path: os.PathLike[str] | str, mode: int, **kwargs: object) -> bool:
        if Path(path) == tmp_path and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "access", fake_access)
    with raises_input_error("not writable", tmp_path) as info:
        with atomic_output(tmp_path / "out.txt"):
            pytest.fail("block must not run")
    assert str(tmp_path) in str(info.value)
    assert _names(tmp_path) == []


def test_unwritable_folder_reported_on_create(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # os.access can say yes where creation still fails (ACLs, read-only mounts).
    real_open = os.open

    def fake_open(path: os.PathLike[str] | str, flags: int, *args: object, **kwargs: object) -> int:
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic.os, "open", fake_open)
    with raises_input_error("Permission denied", tmp_path) as info:
        with atomic_output(tmp_path / "out.txt"):
            pytest.fail("block must not run")
    assert str(tmp_path) in str(info.value)
    assert _names(tmp_path) == []


def test_destination_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "out.nii").mkdir()
    with raises_input_error("folder", tmp_path):
        with atomic_output(tmp_path / "out.nii"):
            pytest.fail("block must not run")


def test_new_file_gets_ordinary_permissions(tmp_path: Path) -> None:
    # mkstemp would give 0o600; an ordinary new file gets 0o666 & ~umask.
    umask = os.umask(0o022)
    os.umask(umask)
    dest = write_text(tmp_path / "p.txt", "x")
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


def test_relative_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with atomic_output("rel.txt") as tmp:
        tmp.write_text("r")
    assert (tmp_path / "rel.txt").read_text() == "r"
    assert _names(tmp_path) == ["rel.txt"]


# --------------------------------------------------------------------- writers


def test_write_text_exact_bytes(tmp_path: Path) -> None:
    dest = write_text(tmp_path / "a.txt", "line1\nline2 µ\n")
    assert dest == tmp_path / "a.txt"
    assert dest.read_bytes() == "line1\nline2 µ\n".encode()


def test_write_text_rejects_non_str(tmp_path: Path) -> None:
    with raises_input_error("str", tmp_path):
        write_text(tmp_path / "a.txt", b"bytes")  # type: ignore[arg-type]
    assert _names(tmp_path) == []


def test_write_text_overwrite_false(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("keep")
    with raises_input_error("overwrite", tmp_path):
        write_text(tmp_path / "a.txt", "new", overwrite=False)
    assert (tmp_path / "a.txt").read_text() == "keep"


def test_write_json_numpy_paths_and_nonfinite(tmp_path: Path) -> None:
    obj = {
        "b_name": "m0",
        "a_m0": np.float32(1.5),
        "t1_s": np.float64(1.3),
        "n_vox": np.int64(123),
        "ok": np.bool_(True),
        "bad": float("nan"),
        "also_bad": np.float64(np.inf),
        "tis_s": np.array([0.5, np.nan, 2.0]),
        "shape": (64, 64, np.int32(24)),
        "input": Path("/data/sub-01/calib.nii.gz"),
        "nested": {np.int64(3): [np.float32(-np.inf), None]},
    }
    dest = write_json(tmp_path / "prov.json", obj)
    text = dest.read_text()
    # Golden text written by hand: key order kept, indent 2, NaN/Inf -> null,
    # numpy values as plain numbers, tuple -> list, path -> string, trailing newline.
    expected = """{
  "b_name": "m0",
  "a_m0": 1.5,
  "t1_s": 1.3,
  "n_vox": 123,
  "ok": true,
  "bad": null,
  "also_bad": null,
  "tis_s": [
    0.5,
    null,
    2.0
  ],
  "shape": [
    64,
    64,
    24
  ],
  "input": "/data/sub-01/calib.nii.gz",
  "nested": {
    "3": [
      null,
      null
    ]
  }
}
"""
    assert text == expected
    assert json.loads(text)["tis_s"] == [0.5, None, 2.0]


def test_write_json_full_float_precision(tmp_path: Path) -> None:
    value = 0.1 + 0.2  # 0.30000000000000004, must round-trip exactly
    dest = write_json(tmp_path / "x.json", {"v": value})
    assert json.loads(dest.read_text())["v"] == value


def test_write_json_unserialisable_names_location(tmp_path: Path) -> None:
    with raises_input_error(r"obj\['fits'\]\[1\].*set", tmp_path):
        write_json(tmp_path / "x.json", {"fits": [1, {2, 3}]})
    assert _names(tmp_path) == []


def test_write_json_converts_device_arrays(tmp_path: Path) -> None:
    class FakeCupyArray:
        __cuda_array_interface__ = {"shape": (2,), "typestr": "<f8", "version": 3}

        def get(self) -> np.ndarray:
            return np.array([1.0, 2.5])

    dest = write_json(tmp_path / "x.json", {"v": FakeCupyArray()})
    assert json.loads(dest.read_text()) == {"v": [1.0, 2.5]}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # Golden strings: Python's format spec ".10g" (10 significant digits,
        # exponent form below 1e-4 or at/above 1e10), worked out by hand.
        (1234.56789012345, "1234.56789\n"),
        (1.0 / 3.0, "0.3333333333\n"),
        (1500, "1500\n"),
        (np.float64(2.5e-7), "2.5e-07\n"),
        (np.float32(0.1), "0.1000000015\n"),  # float32 0.1 = 0.100000001490116...
        (np.array([42.0]), "42\n"),
        (12345678901.0, "1.23456789e+10\n"),
        (-0.0, "-0\n"),
    ],
)
def test_write_scalar_content(tmp_path: Path, value: object, expected: str) -> None:
    dest = write_scalar(tmp_path / "m0.txt", value)
    assert dest.read_text() == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), np.array([1.0, 2.0]), "12", True, 1 + 2j])
def test_write_scalar_rejects(tmp_path: Path, value: object) -> None:
    with raises_input_error("value", tmp_path):
        write_scalar(tmp_path / "m0.txt", value)
    assert _names(tmp_path) == []


# -- OutputSet: all outputs or none ----------------------------------------------------


def test_output_set_commits_all_files_together(tmp_path):
    from aslcal.io import OutputSet, save_image

    with OutputSet() as out:
        out.path(tmp_path / "a.txt").write_text("a")
        save_image(out.path(tmp_path / "m.nii.gz"), np.ones((2, 2, 2)), np.eye(4))
        # nothing is visible under its final name before the block ends
        assert not (tmp_path / "a.txt").exists() and not (tmp_path / "m.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m.nii.gz"]


def test_output_set_failure_leaves_nothing(tmp_path):
    from aslcal.io import OutputSet

    with pytest.raises(RuntimeError):
        with OutputSet() as out:
            out.path(tmp_path / "a.txt").write_text("a")
            out.path(tmp_path / "b.txt").write_text("b")
            raise RuntimeError("computation failed after two outputs were written")
    assert list(tmp_path.iterdir()) == []


def test_output_set_refuses_existing_without_overwrite_before_writing(tmp_path):
    from aslcal.io import OutputSet

    (tmp_path / "b.txt").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        with OutputSet(overwrite=False) as out:
            out.path(tmp_path / "a.txt").write_text("a")
            out.path(tmp_path / "b.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt"]
    assert (tmp_path / "b.txt").read_text() == "old"


def test_output_set_unwritten_or_duplicate_output_is_an_error(tmp_path):
    from aslcal.io import OutputSet

    with pytest.raises(InputError, match="requested twice"):
        with OutputSet() as out:
            out.path(tmp_path / "a.txt")
            out.path(tmp_path / "a.txt")
    assert list(tmp_path.iterdir()) == []
    # registered, never written (nothing deleted by hand): the set refuses to commit it
    with pytest.raises(InputError, match="never written"):
        with OutputSet() as out:
            (out.path(tmp_path / "b.txt")).write_text("b")
            out.path(tmp_path / "c.txt")
    assert list(tmp_path.iterdir()) == []


def test_output_set_write_bytes_commits_together_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    fsynced: list[str] = []
    real_fsync = atomic._fsync_path
    monkeypatch.setattr(atomic, "_fsync_path", lambda p, **kw: (fsynced.append(Path(p).name), real_fsync(p, **kw)))
    with atomic.OutputSet() as out:
        out.write_bytes(tmp_path / "a.bin", b"alpha")
        out.write_bytes(tmp_path / "b.json", b"{}\n")
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    assert (tmp_path / "a.bin").read_bytes() == b"alpha" and (tmp_path / "b.json").read_bytes() == b"{}\n"
    # each file flushed once, then the folder once: no per-file folder flushes
    assert len(fsynced) == 3 and fsynced[-1] == tmp_path.name
    with pytest.raises(RuntimeError), atomic.OutputSet() as out:
        out.write_bytes(tmp_path / "c.bin", b"gamma")
        raise RuntimeError("fails before the commit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json"]


def test_output_set_check_probes_the_folder(tmp_path: Path, monkeypatch) -> None:
    """check() finds a folder that refuses new files (permission bits can say otherwise,
    e.g. for root or on a read-only mount) before any work is done, and leaves nothing."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kw):
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(InputError, match="cannot create a file in output folder .*Read-only file system"):
        atomic.OutputSet().check(tmp_path / "ok.txt", tmp_path / "ro" / "M0.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"] and not any((tmp_path / "ro").iterdir())


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel says it: no file name


def test_a_full_disk_names_the_output_it_could_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'No space left on device' alone (an audit's failure records said only that) does not
    say where: the error carries the destination, and nothing is left behind."""
    monkeypatch.setattr(os, "fsync", _disk_full)
    dest = tmp_path / "out.txt"
    with pytest.raises(OSError) as info:
        write_text(dest, "x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(dest)
    assert str(dest) in str(info.value)
    dest2 = tmp_path / "set.bin"
    with pytest.raises(OSError) as info, OutputSet() as outputs:
        outputs.write_bytes(dest2, b"x")
    assert info.value.filename == str(dest2)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_names_the_failure_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aslcal.cohort.state import FailureLog

    monkeypatch.setattr(os, "fsync", _disk_full)
    log = FailureLog(tmp_path / "failures.jsonl")
    with pytest.raises(OSError) as info:
        log.record("sub-01", "write", "disk full")
    assert info.value.filename == str(tmp_path / "failures.jsonl")
