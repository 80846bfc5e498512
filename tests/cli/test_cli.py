"""The console commands, in-process: help, info, demo, and the one-line error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from aslcal.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: aslcal" in out


def test_help_mentions_units(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "seconds" in out and "milliseconds" in out and "degrees" in out


def test_version(capsys):
    import aslcal

    assert main(["--version"]) == 0
    assert aslcal.__version__ in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_info_reports_versions_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["packages"]["numpy"] == np.__version__
    assert set(rep["backends"]) == {"numpy", "numba", "cuda"}
    assert rep["backends"]["numba"]["available"] is True
    for b in rep["backends"].values():
        assert b["reason"]
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "backends:" in text and "numba" in text


def test_demo_noise_free_recovers_truth(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--snr", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "T1 gm" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["quantity"]: r for r in summary["recovered_vs_true"]}
    # Noise-free, pure GM/WM voxels (pv >= 0.98; the last 2 % is another tissue, which
    # biases a mono-exponential fit slightly): T1 within 0.5 % of the tissue table value.
    for t in ("gm", "wm"):
        r = rows[f"T1 {t} (s)"]
        assert abs(r["recovered"] - r["true"]) / r["true"] < 5e-3, r
    # The flip-angle correction is recovered voxelwise (median absolute error of g).
    assert rows["g abs. error (median)"]["recovered"] < 1e-3
    for name in ("T1t", "M0t", "A", "facorr", "status", "T1t_se"):
        assert (out / "fit" / f"{name}.nii.gz").is_file()
    assert (out / "calib_ll.nii.gz").is_file() and (out / "truth" / "brain_mask.nii.gz").is_file()


def test_demo_refuses_non_empty_outdir_without_overwrite(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("keep me")
    assert main(["demo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aslcal: error:") and "--overwrite" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_console_script_entry_point():
    res = subprocess.run([sys.executable, "-m", "aslcal", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "aslcal" in res.stdout
