"""`import aslcal` is light: it compiles nothing and imports neither numba nor CuPy."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout
    return set(out.split())


def test_import_aslcal_imports_neither_numba_nor_cupy():
    mods = _modules_after("import aslcal")
    assert "aslcal.config" in mods  # sanity: the probe really lists modules
    heavy = {m for m in mods if m.split(".")[0] in {"numba", "numba_cuda", "cupy", "cupyx", "scipy"}}
    assert not heavy, sorted(heavy)[:10]


def test_every_public_name_resolves():
    import aslcal

    for name in aslcal.__all__:
        assert getattr(aslcal, name) is not None, name


def test_public_names_resolve_lazily():
    mods = _modules_after("import aslcal\nf = aslcal.fit_satrecov\nassert callable(f)")
    assert "aslcal.fitting" in mods
    assert not {m for m in mods if m.split(".")[0] in {"numba", "cupy"}}  # still nothing compiled


def test_cli_help_compiles_nothing():
    code = "from aslcal.cli import main\nfor a in (['--help'], ['calib', '--help'], ['demo', '--help']):\n    main(a)"
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    mods = set(out.split())
    assert "aslcal.cli.calib" in mods
    assert not {m for m in mods if m.split(".")[0] in {"numba", "numba_cuda", "cupy", "scipy"}}
