"""``aslcal voxelwise`` in-process: the voxelwise M0 map (calibration.md §5) against closed
forms written here, edge correction on a constant image, calibrated CBF (§9), and the
bad-input contract (exit 2, one stderr line, no traceback, no output file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# The maps are written as float32: 1e-6 relative covers the float32 rounding of
# C·cgain/(pc·(1 − exp(−TR/T1t))) and of 6000·perf/(M0·α).
RTOL = 1e-6

AFFINE = np.array(
    [[-3.0, 0.0, 0.0, 20.0], [0.0, 3.0, 0.0, -18.0], [0.0, 0.0, 4.0, -10.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPE = (12, 11, 8)


def save_nifti(path: Path, data, affine=AFFINE, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), np.asarray(affine, float)), str(path))
    return Path(path)


def read_nifti(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64))


@pytest.fixture
def vw(tmp_path):
    """A constant calibration image (500), a random one, a box brain mask, a perfusion image."""
    rng = np.random.default_rng(11)
    data = tmp_path / "data"
    data.mkdir()
    brain = np.zeros(SHAPE, bool)
    brain[2:10, 2:9, 1:6] = True
    const = np.full(SHAPE, 500.0, np.float32)
    rand = rng.uniform(300.0, 800.0, SHAPE).astype(np.float32)
    perf = rng.uniform(2.0, 12.0, SHAPE).astype(np.float32)
    return type("VW", (), dict(
        root=tmp_path, data=data, brain=brain, const=const, rand=rand, perf=perf,
        const_path=save_nifti(data / "const.nii.gz", const),
        rand_path=save_nifti(data / "rand.nii.gz", rand),
        brain_path=save_nifti(data / "brain.nii.gz", brain, dtype=np.uint8),
        perf_path=save_nifti(data / "perf.nii.gz", perf),
    ))


def short_tr_scale(tr, t1t=1.3, pc=0.9, cgain=1.0) -> float:
    """cgain / (pc · [1 − exp(−TR/T1t) if TR < 5 s]) (calibration.md §5)."""
    factor = 1.0 - math.exp(-tr / t1t) if tr is not None and tr < 5.0 else 1.0
    return cgain / (pc * factor)


@pytest.mark.parametrize("tr,t1t,pc,cgain", [
    (3.0, None, None, None),        # defaults T1t 1.3 s, pc 0.9: short-TR factor applied
    (2.0, 1.6, 0.95, 1.8),
    (4.99, 1.0, 0.8, 1.0),          # just below the 5 s limit: applied
    (5.0, 1.3, 0.9, 1.0),           # at the limit: not applied
    (8.0, 1.3, 0.9, 2.0),           # long TR: not applied
    (None, 1.3, 0.9, 1.5),          # no TR: not applied
])
def test_m0_map_constant_image(vw, cli, tr, t1t, pc, cgain):
    """Edge correction of a constant image gives the constant back in every brain voxel
    (median of a constant, fill = mean of equal neighbours), 0 outside the brain."""
    m0map = vw.root / "m0.nii.gz"
    argv = ["voxelwise", "-c", vw.const_path, "--bmask", vw.brain_path, "--m0map", m0map]
    for opt, val in (("--tr", tr), ("--t1t", t1t), ("--pc", pc), ("--cgain", cgain)):
        argv += [opt, val] if val is not None else []
    res = cli(*argv)
    assert res.rc == 0, res.err
    m0 = read_nifti(m0map)
    expected = 500.0 * short_tr_scale(tr, t1t or 1.3, pc or 0.9, cgain or 1.0)
    np.testing.assert_allclose(m0[vw.brain], expected, rtol=RTOL)
    assert (m0[~vw.brain] == 0).all()


def test_no_edgecorr_keeps_raw_values(vw, cli):
    m0map = vw.root / "m0.nii.gz"
    res = cli("voxelwise", "-c", vw.rand_path, "--bmask", vw.brain_path, "--tr", 2.5, "--cgain", 1.2,
              "--no-edgecorr", "--m0map", m0map)
    assert res.rc == 0, res.err
    m0 = read_nifti(m0map)
    np.testing.assert_allclose(m0[vw.brain], vw.rand[vw.brain] * short_tr_scale(2.5, cgain=1.2), rtol=RTOL)
    assert (m0[~vw.brain] == 0).all()


def test_edge_correction_fills_every_brain_voxel(vw, cli):
    """A random image: every brain voxel non-zero and finite after the edge correction,
    interior voxels (more than one voxel from the mask edge) are the 3x3x3 median."""
    m0map = vw.root / "m0.nii.gz"
    res = cli("voxelwise", "-c", vw.rand_path, "--bmask", vw.brain_path, "--m0map", m0map)
    assert res.rc == 0, res.err
    m0 = read_nifti(m0map)
    assert (m0[vw.brain] > 0).all() and np.isfinite(m0).all()
    assert (m0[~vw.brain] == 0).all()
    # an interior voxel whose 3x3x3 neighbourhood is all brain and survives the erosion
    x, y, z = 5, 5, 3
    assert vw.brain[x - 2:x + 3, y - 2:y + 3, z - 2:z + 3].all()
    med = np.median(vw.rand[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2].astype(np.float64))
    assert m0[x, y, z] == pytest.approx(med / 0.9, rel=RTOL)  # no TR: scale 1/pc


def test_calibrated_perfusion_voxelwise(vw, cli):
    out, outdir = vw.root / "cbf.nii.gz", vw.root / "od"
    res = cli("voxelwise", "-c", vw.rand_path, "--bmask", vw.brain_path, "--tr", 3.5, "--no-edgecorr",
              "-i", vw.perf_path, "-o", out, "--alpha", 0.85, "--outdir", outdir)
    assert res.rc == 0, res.err
    m0 = vw.rand.astype(np.float64) * short_tr_scale(3.5)
    cbf = read_nifti(out)
    np.testing.assert_allclose(cbf[vw.brain], 6000.0 * vw.perf[vw.brain] / (m0[vw.brain] * 0.85), rtol=RTOL)
    assert (cbf[~vw.brain] == 0).all()  # M0 = 0 outside the brain: set to 0, not Inf/NaN
    assert "set to 0" not in res.err  # ... and that is no news: only brain voxels are warned about
    assert sorted(p.name for p in outdir.iterdir()) == ["M0map.nii.gz", "perfusion_calib.nii.gz", "provenance.json"]
    np.testing.assert_allclose(read_nifti(outdir / "perfusion_calib.nii.gz"), cbf, rtol=0)
    np.testing.assert_allclose(read_nifti(outdir / "M0map.nii.gz")[vw.brain], m0[vw.brain], rtol=RTOL)
    prov = json.loads((outdir / "provenance.json").read_text())
    assert prov["voxelwise"]["short_tr"] is True
    assert prov["calibrated"]["alpha"] == 0.85


def test_overwrite_without_a_perfusion_image_removes_the_earlier_calibrated_one(vw, cli):
    outdir = vw.root / "od_over"
    first = cli("voxelwise", "-c", vw.rand_path, "--bmask", vw.brain_path, "-i", vw.perf_path,
                "-o", vw.root / "cbf_over.nii.gz", "--outdir", outdir)
    assert first.rc == 0 and (outdir / "perfusion_calib.nii.gz").exists(), first.err
    again = cli("voxelwise", "-c", vw.rand_path, "--bmask", vw.brain_path, "--outdir", outdir, "--overwrite")
    assert again.rc == 0, again.err
    assert sorted(p.name for p in outdir.iterdir()) == ["M0map.nii.gz", "provenance.json"]


def test_labelling_sets_alpha_and_unknown_alpha_warns(vw, cli):
    out = vw.root / "cbf.nii.gz"
    res = cli("voxelwise", "-c", vw.const_path, "--bmask", vw.brain_path, "-i", vw.perf_path, "-o", out,
              "--labelling", "pasl")
    assert res.rc == 0, res.err
    np.testing.assert_allclose(read_nifti(out)[vw.brain], 6000.0 * vw.perf[vw.brain] / (500.0 / 0.9 * 0.98),
                               rtol=RTOL)
    res = cli("voxelwise", "-c", vw.const_path, "--bmask", vw.brain_path, "-i", vw.perf_path, "-o", out,
              "--overwrite")
    assert res.rc == 0
    assert "aslcal: warning: labelling efficiency unknown" in res.err
    np.testing.assert_allclose(read_nifti(out)[vw.brain], 6000.0 * vw.perf[vw.brain] / (500.0 / 0.9), rtol=RTOL)


def test_nonfinite_calibration_voxels_are_filled_not_propagated(vw, cli):
    calib = vw.const.copy()
    calib[4, 4, 2], calib[6, 5, 3], calib[7, 6, 4] = np.nan, np.inf, -np.inf
    path = save_nifti(vw.data / "nan.nii.gz", calib)
    m0map, out = vw.root / "m0.nii.gz", vw.root / "cbf.nii.gz"
    res = cli("voxelwise", "-c", path, "--bmask", vw.brain_path, "--m0map", m0map, "-i", vw.perf_path, "-o", out,
              "--alpha", 1)
    assert res.rc == 0, res.err
    m0 = read_nifti(m0map)
    assert np.isfinite(m0).all() and np.isfinite(read_nifti(out)).all()
    np.testing.assert_allclose(m0[vw.brain], 500.0 / 0.9, rtol=RTOL)
    # without the edge correction they are 0 (and the CBF there 0), never NaN
    res = cli("voxelwise", "-c", path, "--bmask", vw.brain_path, "--m0map", m0map, "-i", vw.perf_path, "-o", out,
              "--alpha", 1, "--no-edgecorr", "--overwrite")
    assert res.rc == 0, res.err
    m0, cbf = read_nifti(m0map), read_nifti(out)
    assert np.isfinite(m0).all() and np.isfinite(cbf).all()
    assert m0[4, 4, 2] == m0[6, 5, 3] == m0[7, 6, 4] == 0.0 and cbf[4, 4, 2] == 0.0


def test_help(cli):
    res = cli("voxelwise", "--help")
    assert res.rc == 0
    assert "usage: aslcal voxelwise" in res.out
    # voxelwise has no TE/T2 or flip-angle option: only the seconds of TR and T1t apply
    assert "seconds" in res.out
    for opt in ("--bmask", "--tr", "--t1t", "--pc", "--cgain", "--no-edgecorr", "--alpha", "--m0map", "--outdir"):
        assert opt in res.out


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def _outs(root: Path):
    paths = [root / "m0.nii.gz", root / "cbf.nii.gz", root / "od"]
    return ["--m0map", paths[0], "-o", paths[1], "--outdir", paths[2]], paths


def _base(vw, without=()):
    argv = ["voxelwise"]
    for k, v in (("-c", vw.rand_path), ("--bmask", vw.brain_path), ("-i", vw.perf_path)):
        if k not in without:
            argv += [k, v]
    return argv + ["--alpha", "0.85", "--tr", "3"]


@pytest.mark.parametrize("missing,word", [("-c", "-c"), ("--bmask", "--bmask"), ("-i", "-i")])
def test_missing_required(vw, bad_input, missing, word):
    outs, paths = _outs(vw.root)
    err = bad_input(_base(vw, without=(missing,)) + outs, vw.root, outputs=paths)
    assert word in err


def test_empty_brain_mask(vw, bad_input):
    empty = save_nifti(vw.data / "empty.nii.gz", np.zeros(SHAPE), dtype=np.uint8)
    outs, paths = _outs(vw.root)
    err = bad_input(_base(vw, without=("--bmask",)) + ["--bmask", empty] + outs, vw.root, outputs=paths)
    assert "empty" in err and "brain extraction" in err


@pytest.mark.parametrize("what", ["shape", "affine"])
@pytest.mark.parametrize("opt", ["--bmask", "-i"])
def test_grid_mismatch(vw, bad_input, what, opt):
    if what == "shape":
        path = save_nifti(vw.data / "other.nii.gz", np.ones((12, 11, 9)), dtype=np.uint8)
    else:
        shifted = AFFINE.copy()
        shifted[1, 3] += 3.0
        path = save_nifti(vw.data / "other.nii.gz", vw.brain, shifted, dtype=np.uint8)
    outs, paths = _outs(vw.root)
    err = bad_input(_base(vw, without=(opt,)) + [opt, path] + outs, vw.root, outputs=paths)
    assert "other.nii.gz" in err


@pytest.mark.parametrize("opt", ["-c", "--bmask", "-i"])
def test_unreadable_input(vw, bad_input, opt):
    bad = vw.data / "text.nii.gz"
    bad.write_text("not a NIfTI image\n")
    outs, paths = _outs(vw.root)
    err = bad_input(_base(vw, without=(opt,)) + [opt, bad] + outs, vw.root, outputs=paths)
    assert "text.nii.gz" in err


@pytest.mark.parametrize("opt", ["--m0map", "-o"])
def test_unwritable_output(vw, bad_input, opt):
    (vw.root / "somefile.txt").write_text("x\n")
    for target in (vw.root / "nofolder" / "x.nii.gz", vw.root / "somefile.txt" / "x.nii.gz"):
        outs, paths = _outs(vw.root)
        outs[outs.index(opt) + 1] = target
        bad_input(_base(vw) + outs, vw.root, outputs=paths)


@pytest.mark.parametrize("opt", ["--m0map", "-o", "--outdir"])
def test_existing_output_needs_overwrite(vw, bad_input, cli, opt):
    outs, paths = _outs(vw.root)
    existing = paths[["--m0map", "-o", "--outdir"].index(opt)]
    if opt == "--outdir":
        existing.mkdir()
        existing = existing / "M0map.nii.gz"
    existing.write_bytes(b"precious")
    err = bad_input(_base(vw) + outs, vw.root, outputs=paths)
    assert "exists" in err and "overwrite" in err
    assert existing.read_bytes() == b"precious"
    res = cli(*_base(vw), *outs, "--overwrite")
    assert res.rc == 0, res.err
    assert existing.read_bytes() != b"precious"
    assert all(p.exists() for p in paths)


def test_nothing_to_write_is_an_error(vw, bad_input):
    err = bad_input(["voxelwise", "-c", vw.rand_path, "--bmask", vw.brain_path], vw.root)
    assert "nothing to write" in err and "--m0map" in err


def test_brain_voxels_set_to_zero_are_counted(vw, cli):
    """A brain voxel whose calibration value is NaN (no edge correction to fill it): M0 and
    CBF 0 there, and the warning counts that one voxel, not the background."""
    calib = vw.rand.astype(np.float32).copy()
    x, y, z = np.argwhere(vw.brain)[0]
    calib[x, y, z] = np.nan
    path = save_nifti(vw.data / "calib_nan.nii.gz", calib)
    res = cli("voxelwise", "-c", path, "--bmask", vw.brain_path, "--no-edgecorr", "-i", vw.perf_path,
              "-o", vw.root / "cbf_nan.nii.gz", "--alpha", 0.85)
    assert res.rc == 0, res.err
    assert "1 brain-mask voxels with M0 <= 0 or non-finite were set to 0" in res.err
    assert read_nifti(vw.root / "cbf_nan.nii.gz")[x, y, z] == 0
