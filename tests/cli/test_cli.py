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


def test_usage_errors_name_the_subcommand(capsys):
    """An unknown option or bad value of a subcommand points to that subcommand's help."""
    assert main(["calib", "--bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "aslcal: error: unrecognized arguments: --bogus (see 'aslcal calib --help')"
    assert main(["calib", "--mode", "bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aslcal: error: argument --mode: invalid choice") and err.count("\n") == 0


def test_info_names_each_gpu_with_its_cuda_versions(monkeypatch):
    """GPU entries carry name, memory, compute capability and the CUDA driver/runtime
    versions (CUDA encodes 13.0 as 13000 and 12.8 as 12080), from CuPy's runtime API."""
    import types

    from aslcal.cli.info import _gpus

    runtime = types.SimpleNamespace(
        driverGetVersion=lambda: 13000, runtimeGetVersion=lambda: 12080, getDeviceCount=lambda: 1,
        getDeviceProperties=lambda i: {"name": b"NVIDIA H200", "totalGlobalMem": 141 * 2**30, "major": 9, "minor": 0},
    )
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    assert _gpus() == [{"index": 0, "name": "NVIDIA H200", "memory_gib": 141.0, "compute_capability": "9.0",
                        "cuda_driver": "13.0", "cuda_runtime": "12.8"}]


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
    import nibabel as nib

    out = tmp_path / "demo"
    assert main(["demo", str(out), "--snr", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "M0a (reference region)" in printed and "CBF gm" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["quantity"]: r for r in summary["recovered_vs_true"]}
    truth = json.loads((out / "phantom.json").read_text())
    # M0a: the phantom's arterial-blood M0 (phantom.json), noise-free, pure CSF reference
    # region, coil sensitivity from the body-coil image: within 0.5 %.
    assert abs(rows["M0a (reference region)"]["recovered"] / truth["m0a"] - 1) < 5e-3
    # T1 medians over pure voxels (pv >= 0.98: the last 2 % is another tissue, which
    # biases a mono-exponential fit slightly): within 0.5 % of the tissue table.
    for key, t1 in (("T1 gm (s), median", 1.3), ("T1 wm (s), median", 1.0), ("T1 csf (s), median, ref. fit", 4.3)):
        assert abs(rows[key]["recovered"] / t1 - 1) < 5e-3, rows[key]
    # CBF against the truth map written by the phantom, in pure GM / WM voxels: within 1 %
    cbf = nib.load(out / "calibration" / "cbf.nii.gz").get_fdata()
    true_cbf = nib.load(out / "truth" / "cbf.nii.gz").get_fdata()
    for tissue in ("gm", "wm"):
        pv = nib.load(out / "truth" / f"pv_{tissue}.nii.gz").get_fdata()
        sel = pv >= 0.99
        assert sel.sum() > 10
        np.testing.assert_allclose(cbf[sel], true_cbf[sel], rtol=0.01)
    for name in ("T1t", "M0t", "A", "facorr", "status", "T1t_se", "cbf", "M0map", "refmask", "sensitivity"):
        assert (out / "calibration" / f"{name}.nii.gz").is_file()
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


@pytest.mark.parametrize(("var", "value"), [("ASLCAL_BACKEND", "quantum"), ("ASLCAL_DTYPE", "float16"),
                                            ("ASLCAL_GZIP", "brotli")])
def test_invalid_environment_is_one_clean_error(monkeypatch, capsys, var, value):
    """A bad ASLCAL_* value: --help still works; every command stops with exit 2 and one
    line naming the variable (it was a traceback at import, or silently ignored)."""
    from aslcal import config

    monkeypatch.setattr(config, "_ENV_DEFAULTS", None)  # read the environment afresh
    monkeypatch.setenv(var, value)
    assert main(["--help"]) == 0
    capsys.readouterr()
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aslcal: error: ") and var in err and len(err.splitlines()) == 1, err
    monkeypatch.setattr(config, "_ENV_DEFAULTS", None)  # not cached: the next read sees the fix
    monkeypatch.delenv(var)
    assert main(["info"]) == 0


def test_demo_bad_outdir_and_snr_are_clean_errors(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert main(["demo", str(blocker / "d")]) == 2
    assert "cannot create it" in capsys.readouterr().err
    assert main(["demo", str(tmp_path / "n"), "--snr", "nan"]) == 2
    assert "--snr" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_demo_leaves_nothing_behind(tmp_path, capsys, monkeypatch, existing):
    """A demo that fails after writing the phantom removes what it wrote from a folder it
    created or found empty, so that the next run does not refuse a non-empty folder."""
    import aslcal.calibration

    def broken(*args, **kwargs):
        raise aslcal.errors.InputError("simulated failure")

    monkeypatch.setattr(aslcal.calibration, "m0_refregion_satrecov", broken)
    out = tmp_path / "demo"
    if existing:
        out.mkdir()
    assert main(["demo", str(out), "-q"]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert (out.exists() and not any(out.iterdir())) if existing else not out.exists()


@pytest.mark.parametrize("argv", [["--debug", "info"], ["info", "--debug"], ["-q", "info"], ["info", "--quiet"]])
def test_debug_and_quiet_before_or_after_the_command(argv):
    from aslcal.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.debug == ("--debug" in argv)
    assert args.quiet == any(a in argv for a in ("-q", "--quiet"))


def test_config_context_overriding_a_bad_variable_works(monkeypatch):
    """config_context(dtype=...) does not read ASLCAL_DTYPE, so an invalid one does not matter."""
    from aslcal import config

    monkeypatch.setattr(config, "_ENV_DEFAULTS", None)
    monkeypatch.setenv("ASLCAL_DTYPE", "bogus")
    with config.config_context(dtype="float64") as cfg:
        assert cfg["dtype"] == "float64"
    with pytest.raises(aslcal_errors().InputError, match="ASLCAL_DTYPE"):
        config.get_config()


def aslcal_errors():
    import aslcal.errors

    return aslcal.errors


def test_file_system_errors_are_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """A refusal of the file system (read-only, full) is no traceback and not exit 1
    (which means 'some subject failed'): one line naming the file, exit 2."""
    import errno

    import aslcal.cohort

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "o" / "logs" / "run.lock"))

    monkeypatch.setattr(aslcal.cohort, "run_cohort", refuse)
    (tmp_path / "bids").mkdir()
    assert main(["cohort", str(tmp_path / "bids"), str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"aslcal: error: Read-only file system: {tmp_path / 'o' / 'logs' / 'run.lock'}"


def test_debug_shows_the_traceback_and_keeps_exit_status_2(tmp_path, capsys):
    """--debug adds the traceback of an error; the exit status stays 2 (scripts check it)."""
    assert main(["--debug", "calib", "-c", str(tmp_path / "nosuch.nii.gz"), "-m", str(tmp_path / "m.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("aslcal: error: ")


def test_debug_logging_is_aslcal_s_own(capsys):
    """--debug lowers aslcal's logger only: other libraries (numba's compiler logs every
    pass at DEBUG) stay at INFO."""
    import logging

    assert main(["--debug", "info"]) == 0
    assert logging.getLogger("aslcal").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("numba").getEffectiveLevel() >= logging.INFO
    capsys.readouterr()


def test_blank_environment_variable_is_unset(monkeypatch):
    from aslcal import config

    monkeypatch.setenv("ASLCAL_BACKEND", "  ")
    monkeypatch.setattr(config, "_ENV_DEFAULTS", None)
    assert config.get_config()["backend"] == "auto"


def test_failed_demo_overwrite_keeps_the_previous_data_set_whole(tmp_path, capsys, monkeypatch):
    """--overwrite of an earlier demo that fails part-way: the earlier data set is left as
    it was (it was a mix of new and old files: new images beside the old summary.json)."""
    import aslcal.calibration

    out = tmp_path / "demo"
    out.mkdir()
    (out / "summary.json").write_text('{"phantom_seed": 0}')
    (out / "calib.nii.gz").write_bytes(b"old image")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise aslcal.errors.InputError("simulated failure")

    monkeypatch.setattr(aslcal.calibration, "m0_refregion_satrecov", broken)
    assert main(["demo", str(out), "-q", "--overwrite", "--seed", "1"]) == 2
    assert "simulated failure" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folder left


def test_demo_overwrite_keeps_other_files_and_works_in_the_current_folder(tmp_path, capsys, monkeypatch):
    """--overwrite replaces the demo's files only (a user's file beside them stays), also
    with OUTDIR '.', whose staging folder must go beside it, not inside."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "my_notes.txt").write_text("mine")
    (out / "summary.json").write_text("old")
    monkeypatch.chdir(out)
    assert main(["demo", ".", "-q", "--overwrite"]) == 0, capsys.readouterr().err
    assert (out / "my_notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["phantom_seed"] == 0
    assert (out / "calib_ll.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folder left
