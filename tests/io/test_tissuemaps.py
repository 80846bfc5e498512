"""Tests for aslcal.io.tissuemaps: finding FAST / BIDS tissue maps and reading them."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.io.tissuemaps import find_tissue_maps, load_tissue_map

SHAPE = (6, 5, 4)


def write_map(path: Path, value: float | np.ndarray = 0.5, shape=SHAPE) -> Path:
    data = np.broadcast_to(np.asarray(value, dtype=np.float32), shape).copy()
    nibabel.save(nibabel.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def write_set(folder: Path, names: dict[str, str]) -> dict[str, Path]:
    """Write one map per tissue; each holds a different constant (CSF .1, GM .2, WM .3)."""
    folder.mkdir(parents=True, exist_ok=True)
    value = {"csf": 0.1, "gm": 0.2, "wm": 0.3}
    return {t: write_map(folder / n, value[t]) for t, n in names.items()}


FAST = {"csf": "struc_brain_pve_0.nii.gz", "gm": "struc_brain_pve_1.nii.gz", "wm": "struc_brain_pve_2.nii.gz"}
BIDS = {
    "csf": "sub-01_space-T1w_label-CSF_probseg.nii.gz",
    "gm": "sub-01_space-T1w_label-GM_probseg.nii.gz",
    "wm": "sub-01_space-T1w_label-WM_probseg.nii.gz",
}


def names_of(found: dict[str, Path]) -> dict[str, str]:
    return {t: p.name for t, p in found.items()}


# ------------------------------------------------------------------------------ FAST


@pytest.mark.parametrize("given", ["csf", "gm", "wm", "folder", "prefix"])
def test_fast_outputs(tmp_path, given):
    paths = write_set(tmp_path / "fast", FAST)
    arg = {"folder": tmp_path / "fast", "prefix": tmp_path / "fast" / "struc_brain"}.get(given) or paths[given]
    found = find_tissue_maps(arg)
    assert list(found) == ["csf", "gm", "wm"]
    assert found == paths
    # The mapping is right: pve_0 is CSF (value .1), pve_2 WM (value .3).
    assert float(load_tissue_map(found["csf"], "csf").data.mean()) == pytest.approx(0.1)
    assert float(load_tissue_map(found["wm"], "wm").data.mean()) == pytest.approx(0.3)


def test_fast_uncompressed_and_fsl_anat_names(tmp_path):
    paths = write_set(tmp_path, {"csf": "T1_fast_pve_0.nii", "gm": "T1_fast_pve_1.nii", "wm": "T1_fast_pve_2.nii"})
    assert find_tissue_maps(tmp_path / "T1_fast") == paths
    assert find_tissue_maps(paths["gm"]) == paths
    # FAST's other outputs in the same folder are not maps.
    write_map(tmp_path / "T1_fast_seg.nii")
    write_map(tmp_path / "T1_fast_pveseg.nii")
    assert find_tissue_maps(tmp_path) == paths


# ------------------------------------------------------------------------------ BIDS


@pytest.mark.parametrize("given", ["csf", "gm", "wm", "folder", "prefix"])
def test_bids_probseg(tmp_path, given):
    paths = write_set(tmp_path / "anat", BIDS)
    arg = {"folder": tmp_path / "anat", "prefix": tmp_path / "anat" / "sub-01_space-T1w"}.get(given) or paths[given]
    found = find_tissue_maps(arg)
    assert found == paths
    assert float(load_tissue_map(found["gm"], "gm").data.mean()) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "names",
    [
        {t: f"sub-01_label-{lab}_probseg.nii.gz" for t, lab in (("csf", "CSF"), ("gm", "GM"), ("wm", "WM"))},
        {t: f"sub-01_ses-2_acq-mprage_run-1_space-T1w_res-2_label-{lab}_probseg.nii"
         for t, lab in (("csf", "CSF"), ("gm", "GM"), ("wm", "WM"))},
        {t: f"sub-01_label-{lab}_desc-fast_probseg.nii.gz" for t, lab in (("csf", "CSF"), ("gm", "GM"), ("wm", "WM"))},
    ],
    ids=["no-space", "many-entities", "desc-after-label"],
)
def test_bids_entity_variants(tmp_path, names):
    paths = write_set(tmp_path, names)
    assert find_tissue_maps(paths["wm"]) == paths
    assert find_tissue_maps(tmp_path) == paths


def test_folder_prefers_the_structural_space(tmp_path):
    """fMRIPrep's anat folder: T1w-space maps and template-space maps side by side."""
    native = write_set(tmp_path, {t: n.replace("_space-T1w", "") for t, n in BIDS.items()})
    write_set(tmp_path, {t: n.replace("T1w", "MNI152NLin2009cAsym") for t, n in BIDS.items()})
    assert find_tissue_maps(tmp_path) == native


def test_folder_with_several_segmentations_is_ambiguous(tmp_path):
    write_set(tmp_path, BIDS)
    write_set(tmp_path, {t: n.replace("sub-01", "sub-02") for t, n in BIDS.items()})
    with pytest.raises(InputError, match="several segmentations .*sub-01.*sub-02.*give one of the map files"):
        find_tissue_maps(tmp_path)
    # ... while one of the files picks its own set.
    assert find_tissue_maps(tmp_path / BIDS["csf"].replace("sub-01", "sub-02"))["csf"].name.startswith("sub-02")


# ---------------------------------------------------------------------- missing maps


def test_missing_fast_map_names_the_expected_file(tmp_path):
    write_set(tmp_path, {"csf": FAST["csf"], "gm": FAST["gm"]})
    with pytest.raises(InputError, match=r"lacks the WM map; expected WM: struc_brain_pve_2\.nii\.gz") as info:
        find_tissue_maps(tmp_path / FAST["csf"])
    assert "\n" not in str(info.value)
    # Only what is needed: a CSF reference needs the CSF map alone.
    found = find_tissue_maps(tmp_path / "struc_brain", require=("csf",))
    assert names_of(found) == {"csf": FAST["csf"], "gm": FAST["gm"]}


def test_missing_bids_maps_name_the_expected_files(tmp_path):
    write_set(tmp_path, {"wm": BIDS["wm"]})
    with pytest.raises(
        InputError,
        match=r"lacks the CSF and GM map; expected CSF: sub-01_space-T1w_label-CSF_probseg\.nii\.gz, "
        r"GM: sub-01_space-T1w_label-GM_probseg\.nii\.gz",
    ):
        find_tissue_maps(tmp_path)
    with pytest.raises(InputError, match="lacks the CSF map"):
        find_tissue_maps(tmp_path, require="csf")


def test_nothing_there(tmp_path):
    with pytest.raises(InputError, match=r"no tissue maps with that prefix .*struc_pve_0\.nii\.gz.*struc_label-CSF_probseg"):
        find_tissue_maps(tmp_path / "struc")
    with pytest.raises(InputError, match="the folder of the prefix does not exist|does not exist"):
        find_tissue_maps(tmp_path / "nowhere" / "struc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="the folder holds no tissue maps"):
        find_tissue_maps(tmp_path / "empty")
    other = write_map(tmp_path / "struc_brain.nii.gz")
    with pytest.raises(InputError, match="not a tissue map name; expected FSL FAST"):
        find_tissue_maps(other)
    with pytest.raises(InputError, match="no path given"):
        find_tissue_maps("")
    with pytest.raises(InputError, match="unknown tissue"):
        find_tissue_maps(tmp_path, require=("csf", "bone"))


# --------------------------------------------------------------------------- loading


def test_load_checks_and_clips_the_range(tmp_path):
    values = np.linspace(-0.004, 1.006, np.prod(SHAPE)).reshape(SHAPE)
    img = load_tissue_map(write_map(tmp_path / "a_pve_0.nii.gz", values), "csf")
    assert img.data.dtype == np.float32 and img.data.shape == SHAPE
    assert img.data.min() == 0.0 and img.data.max() == 1.0
    assert img.voxel_size == (2.0, 2.0, 2.0) and img.path.name == "a_pve_0.nii.gz"
    img64 = load_tissue_map(tmp_path / "a_pve_0.nii.gz", "csf", dtype="float64")
    assert img64.data.dtype == np.float64


def test_load_rejects_out_of_range(tmp_path):
    path = write_map(tmp_path / "a_pve_1.nii.gz", np.linspace(-0.2, 1.5, np.prod(SHAPE)).reshape(SHAPE))
    with pytest.raises(InputError, match=r"gm partial-volume map .*values range from -0\.2 to 1\.5; expected .* \[0, 1\]") as info:
        load_tissue_map(path, "gm")
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="tolerance 0.2"):
        load_tissue_map(path, "gm", tol=0.2)
    assert load_tissue_map(path, "gm", tol=0.5).data.max() == 1.0


def test_load_percentage_map_hint(tmp_path):
    path = write_map(tmp_path / "p_pve_0.nii.gz", np.linspace(0.0, 100.0, np.prod(SHAPE)).reshape(SHAPE))
    with pytest.raises(InputError, match="a percentage map\\? divide it by 100"):
        load_tissue_map(path, "csf")


def test_load_rejects_nan_and_bad_files(tmp_path):
    values = np.full(SHAPE, 0.5, dtype=np.float32)
    values[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 voxels are NaN or Inf"):
        load_tissue_map(write_map(tmp_path / "n_pve_0.nii.gz", values), "csf")
    with pytest.raises(InputError, match="wm partial-volume map .*does not exist"):
        load_tissue_map(tmp_path / "missing_pve_2.nii.gz", "wm")
    four_d = write_map(tmp_path / "f_pve_0.nii.gz", 0.5, shape=SHAPE + (2,))
    with pytest.raises(InputError, match="3-D"):
        load_tissue_map(four_d, "csf")
    with pytest.raises(InputError, match="tol="):
        load_tissue_map(tmp_path / "n_pve_0.nii.gz", "csf", tol=-1.0)
