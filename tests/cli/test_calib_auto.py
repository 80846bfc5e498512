"""``aslcal calib`` without -m: the automatic reference mask (calibration.md §8), and its
bad inputs (each: exit 2, one stderr line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def _save(path: Path, data, affine) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return path


def _outputs(root: Path):
    (root / "out").mkdir(exist_ok=True)
    paths = [root / "out" / "M0.txt", root / "out" / "om.nii.gz"]
    return ["--Mo", paths[0], "--om", paths[1], "--outdir", root / "outdir"], paths


def _calib_error(phantom_ds, bad_input, tmp_path, *args) -> str:
    """``aslcal calib -c calib ARGS`` with every output asked for: the bad-input contract
    (exit 2, one line, nothing written); returns the error line."""
    outs, paths = _outputs(tmp_path)
    return bad_input(["calib", "-c", phantom_ds.root / "calib.nii.gz", *args, *outs], tmp_path, outputs=paths)


def test_structural_and_transform_make_the_mask(phantom_ds, cli, tmp_path):
    """asl_calib's default path: -c calib -s struct_brain -t asl2struct.mat, no -m."""
    root, ph = phantom_ds.root, phantom_ds.ph
    res = cli("calib", "-c", root / "calib.nii.gz", "-s", root / "struct_brain.nii.gz",
              "-t", root / "asl2struct.mat", "--isen", root / "truth" / "sensitivity.nii.gz",
              "--outdir", tmp_path / "od")
    assert res.rc == 0, res.err
    # noise-free long-TR image, pure ventricle voxels: the phantom's M0a (within 0.5 %)
    assert abs(res.m0 / ph.m0a - 1) < 5e-3
    mask = nib.load(tmp_path / "od" / "refmask.nii.gz").get_fdata() > 0
    assert mask.sum() > 10 and not np.any(mask & ph.sulcal_csf_mask)
    assert np.all(ph.ventricle_pv[mask] > 0.5)
    prov = json.loads((tmp_path / "od" / "provenance.json").read_text())
    assert prov["reference_mask"]["n_voxels"] == int(mask.sum())
    assert any("segmentation" in s for s in prov["reference_mask"]["steps"])
    assert (tmp_path / "od" / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refpve_route_with_csfmaskingoff(phantom_ds, cli, tmp_path):
    """--refpve (a CSF map in structural space) with all CSF kept: more voxels, sulcal ones too."""
    root, ph = phantom_ds.root, phantom_ds.ph
    res = cli("calib", "-c", root / "calib.nii.gz", "--refpve", root / "struct_pv_csf.nii.gz",
              "-t", root / "asl2struct.mat", "--csfmaskingoff", "--om", tmp_path / "om.nii.gz")
    assert res.rc == 0, res.err
    mask = nib.load(tmp_path / "om.nii.gz").get_fdata() > 0
    assert np.count_nonzero(mask & ph.sulcal_csf_mask) > 0


def _itk_from_flirt(root: Path, folder: Path):
    """fMRIPrep-style from-asl_to-T1w ITK files (text and ANTs' binary MATLAB) equal to the
    dataset's FLIRT matrix: ITK maps points of the fixed space (T1w) to the moving one
    (ASL), in LPS (x and y negated)."""
    from scipy.io import savemat

    from aslcal.io import load_image, read_flirt_matrix
    from aslcal.geometry import flirt_to_world

    asl, pv = load_image(root / "calib.nii.gz"), load_image(root / "struct_pv_csf.nii.gz")
    world_asl_to_t1w = flirt_to_world(read_flirt_matrix(root / "asl2struct.mat"), asl.affine, asl.shape[:3],
                                      pv.affine, pv.shape[:3], src_zooms=asl.voxel_size, ref_zooms=pv.voxel_size)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ np.linalg.inv(world_asl_to_t1w) @ flip
    params = list(lps[:3, :3].ravel()) + list(lps[:3, 3])
    text = folder / "from-asl_to-T1w_xfm.txt"
    text.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                    f"Parameters: {' '.join(repr(float(v)) for v in params)}\nFixedParameters: 0 0 0\n")
    binary = folder / "from-asl_to-T1w_0GenericAffine.mat"
    savemat(str(binary), {"AffineTransform_double_3_3": np.array(params)[:, None], "fixed": np.zeros((3, 1))},
            format="4")
    return text, binary


def test_itk_text_and_binary_transforms_give_the_flirt_result(phantom_ds, cli, tmp_path):
    """-t takes an ITK/ANTs affine (text, or the binary .mat ANTs writes) for the same
    mapping as the FLIRT matrix: the same reference mask and M0a."""
    root = phantom_ds.root
    text, binary = _itk_from_flirt(root, tmp_path)
    runs = {}
    for name, trans in (("flirt", root / "asl2struct.mat"), ("text", text), ("binary", binary)):
        res = cli("calib", "-c", root / "calib.nii.gz", "--refpve", root / "struct_pv_csf.nii.gz", "-t", trans, "--csfmaskingoff",
                  "--om", tmp_path / f"om_{name}.nii.gz")
        assert res.rc == 0, (name, res.err)
        runs[name] = (res.m0, nib.load(tmp_path / f"om_{name}.nii.gz").get_fdata())
    for name in ("text", "binary"):
        assert runs[name][0] == pytest.approx(runs["flirt"][0], rel=1e-9), name
        np.testing.assert_array_equal(runs[name][1], runs["flirt"][1], err_msg=name)
    assert runs["flirt"][1].sum() > 10


def test_not_brain_extracted_structural(phantom_ds, bad_input, tmp_path):
    root = phantom_ds.root
    outs, paths = _outputs(tmp_path)
    err = bad_input(["calib", "-c", root / "calib.nii.gz", "-s", root / "struct.nii.gz",
                     "-t", root / "asl2struct.mat", *outs], tmp_path, outputs=paths)
    assert "brain-extracted" in err


def test_malformed_and_singular_transforms(phantom_ds, bad_input, tmp_path):
    root = phantom_ds.root
    outs, paths = _outputs(tmp_path)
    for name, text, expected in (
        ("bad.mat", "1 0 0\n0 1 0\n0 0 1\n", "4"),
        ("nan.mat", "1 0 0 0\n0 nan 0 0\n0 0 1 0\n0 0 0 1\n", "finite"),
        ("singular.mat", "1 0 0 0\n0 0 0 0\n0 0 1 0\n0 0 0 1\n", "singular"),
    ):
        (tmp_path / name).write_text(text)
        err = bad_input(["calib", "-c", root / "calib.nii.gz", "-s", root / "struct_brain.nii.gz",
                         "-t", tmp_path / name, *outs], tmp_path, outputs=paths)
        assert name in err and expected in err, err


def test_segmentation_that_cannot_separate_three_classes(phantom_ds, bad_input, tmp_path):
    root, ph = phantom_ds.root, phantom_ds.ph
    st = ph.structural
    flat = _save(tmp_path / "flat_brain.nii.gz", np.where(st.brain_mask, 100.0, 0.0), st.affine)
    err = _calib_error(phantom_ds, bad_input, tmp_path, "-s", flat, "-t", root / "asl2struct.mat")
    assert "class" in err or "separate" in err


def test_empty_automatic_mask(phantom_ds, bad_input, tmp_path):
    """A transform that moves the structural far away: no calibration voxel gets any CSF."""
    root = phantom_ds.root
    (tmp_path / "away.mat").write_text("1 0 0 500\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    err = _calib_error(phantom_ds, bad_input, tmp_path, "--refpve", root / "struct_pv_csf.nii.gz",
                       "--csfmaskingoff", "-t", tmp_path / "away.mat")
    assert "empty" in err and "brain extraction" in err and "-m" in err


def test_refpve_in_percent_is_refused(phantom_ds, bad_input, tmp_path):
    """--refpve given in percent (0-100): refused as --tissue-maps refuses it.  It was
    clipped to [0, 1], which made every voxel with 1 % CSF a reference voxel (12,235
    voxels, mostly WM, M0a +28 %)."""
    root = phantom_ds.root
    img = nib.load(root / "struct_pv_csf.nii.gz")
    pct = _save(tmp_path / "csf_pct.nii.gz", 100.0 * img.get_fdata(), img.affine)
    err = _calib_error(phantom_ds, bad_input, tmp_path, "--refpve", pct, "-t", root / "asl2struct.mat")
    assert "values range from 0 to 100" in err and "divide it by 100" in err


def test_tissref_none_without_a_mask_is_one_clear_error(phantom_ds, bad_input, tmp_path):
    root = phantom_ds.root
    for route in (["-s", root / "struct_brain.nii.gz"], ["--refpve", root / "struct_pv_csf.nii.gz"]):
        err = _calib_error(phantom_ds, bad_input, tmp_path, *route, "-t", root / "asl2struct.mat",
                           "--tissref", "none", "--t1r", "4.3", "--pc", "1.15")
        assert "--tissref none" in err and "(-m)" in err


def test_tissue_maps_on_different_grids_are_refused(phantom_ds, bad_input, tmp_path):
    """The three FAST maps are summed voxel by voxel: they must share one grid (a flipped
    storage of the same world gave a misleading 'empty reference region')."""
    root = phantom_ds.root
    fast = tmp_path / "fast"
    fast.mkdir()
    for k, t in enumerate(("csf", "gm", "wm")):
        img = nib.load(root / f"struct_pv_{t}.nii.gz")
        data, aff = img.get_fdata(), img.affine.copy()
        if t == "wm":  # the same world stored x-flipped (LAS)
            data = data[::-1]
            aff = aff @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        _save(fast / f"s_pve_{k}.nii.gz", data, aff)
    err = _calib_error(phantom_ds, bad_input, tmp_path, "--tissue-maps", fast / "s", "-t", root / "asl2struct.mat")
    assert "wm partial-volume map" in err and "not on the same grid" in err
