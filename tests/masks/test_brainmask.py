"""Brain mask from the calibration image (aslcal.masks.brainmask), replacing BET.

Independent truth: the phantom's ``brain_mask`` (gm + wm + csf >= 0.5) and its scalp
(``pv["nonbrain"]``), on a long-TR calibration image with Rician noise.  The scalp
carries signal (T1 0.6 s) and is separated from the brain by the skull (no signal).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.masks.brainmask import BrainMask, brain_mask_from_calib
from aslcal.testing.phantoms import longtr_calibration, make_phantom


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantoms():
    return {seed: make_phantom(seed=seed) for seed in (0, 1, 2)}


@pytest.mark.parametrize("snr", [50, 100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_against_the_phantom(phantoms, seed, snr):
    ph = phantoms[seed]
    calib, _ = longtr_calibration(ph, snr=snr)
    t0 = time.perf_counter()
    res = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    elapsed = time.perf_counter() - t0
    d = dice(res.mask, ph.brain_mask)
    scalp = ph.pv["nonbrain"] >= 0.9
    print(f"\nbrain mask seed {seed} SNR {snr}: Dice {d:.4f}, {res.n_voxels} voxels (truth "
          f"{int(ph.brain_mask.sum())}), threshold {res.threshold:.0f} (otsu {res.otsu:.0f}, tissue "
          f"{res.tissue_level:.0f}), {elapsed * 1000:.0f} ms")
    assert d >= 0.95
    assert not (res.mask & scalp).any()  # the scalp is excluded
    assert res.mask.dtype == bool and res.mask.shape == ph.shape
    assert res.volume_ml == pytest.approx(res.n_voxels * np.prod(ph.voxel_size) / 1000.0)


@pytest.mark.parametrize(("n_slices", "slice_mm"), [(1, 5.0), (2, 5.0), (3, 3.0)])
def test_thin_slab(phantoms, n_slices, slice_mm):
    """One to three slices (a thin 2-D acquisition): a 3-D erosion with the outside of the
    field of view as background left nothing; the ball is flattened along that axis."""
    ph = phantoms[1]
    calib, _ = longtr_calibration(ph, snr=50)
    z = slice(12, 12 + n_slices)
    vox = (ph.voxel_size[0], ph.voxel_size[1], slice_mm)
    res = brain_mask_from_calib(calib[:, :, z], voxel_size=vox)
    assert dice(res.mask, ph.brain_mask[:, :, z]) >= 0.95
    assert not (res.mask & (ph.pv["nonbrain"][:, :, z] >= 0.9)).any()
    assert res.settings["flat_axes"] == [2]


@pytest.mark.parametrize("value", [-1e6, 1e6, -32768.0])
def test_one_extreme_voxel_does_not_move_the_threshold(phantoms, value):
    ph = phantoms[1]
    calib, _ = longtr_calibration(ph, snr=50)
    img = calib.astype(np.float32).copy()
    img[0, 0, 0] = value
    res = brain_mask_from_calib(img, voxel_size=ph.voxel_size)
    assert dice(res.mask, ph.brain_mask) >= 0.95
    assert res.n_components == 1
    assert not (res.mask & (ph.pv["nonbrain"] >= 0.9)).any()


def test_all_nonfinite_image_is_named_so():
    with pytest.raises(InputError, match="every voxel is NaN or Inf"):
        brain_mask_from_calib(np.full((20, 20, 10), np.nan, np.float32))


def test_without_voxel_size(phantoms):
    """Isotropic-voxel defaults (2-voxel erosion, 1-voxel closing) also work here."""
    ph = phantoms[0]
    calib, _ = longtr_calibration(ph, snr=50)
    res = brain_mask_from_calib(calib)
    d = dice(res.mask, ph.brain_mask)
    print(f"\nbrain mask without voxel size: Dice {d:.4f}")
    assert d >= 0.95
    assert not (res.mask & (ph.pv["nonbrain"] >= 0.9)).any()
    assert res.volume_ml is None and res.settings["radius_unit"] == "voxels"


def test_series_is_averaged(phantoms):
    ph = phantoms[1]
    vols = [longtr_calibration(ph, snr=50, seed=k)[0] for k in range(3)]
    series = np.stack(vols, axis=-1)
    res4 = brain_mask_from_calib(series, voxel_size=ph.voxel_size)
    res3 = brain_mask_from_calib(series.mean(axis=-1), voxel_size=ph.voxel_size)
    np.testing.assert_array_equal(res4.mask, res3.mask)
    assert dice(res4.mask, ph.brain_mask) >= 0.95


def test_nonfinite_voxels_count_as_background(phantoms):
    ph = phantoms[2]
    calib, _ = longtr_calibration(ph, snr=100)
    calib = calib.copy()
    calib[0, 0, :3] = np.nan  # background corner
    res = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    assert res.n_nonfinite == 3
    assert dice(res.mask, ph.brain_mask) >= 0.95


def test_bad_input():
    with pytest.raises(InputError, match="constant"):
        brain_mask_from_calib(np.zeros((20, 20, 10)))
    with pytest.raises(InputError, match="constant"):
        brain_mask_from_calib(np.full((20, 20, 10), 7.0))
    with pytest.raises(InputError, match="3-D image"):
        brain_mask_from_calib(np.ones((20, 20)))
    with pytest.raises(InputError, match="no volumes"):
        brain_mask_from_calib(np.ones((20, 20, 10, 0)))
    with pytest.raises(InputError, match="fraction"):
        brain_mask_from_calib(np.random.default_rng(0).random((20, 20, 10)), fraction=1.5)
    with pytest.raises(InputError, match="voxel_size"):
        brain_mask_from_calib(np.random.default_rng(0).random((20, 20, 10)), voxel_size=(1, 1))
    with pytest.raises(InputError, match="calib"):
        brain_mask_from_calib(np.array(["a", "b"]))
    # a 3-voxel bright speck on a dark image: nothing brain-sized survives the erosion
    img = np.zeros((30, 30, 20))
    img[10:13, 10, 10] = 100.0
    with pytest.raises(InputError, match="no brain left"):
        brain_mask_from_calib(img, voxel_size=(3, 3, 3))


def test_result_record(phantoms):
    ph = phantoms[0]
    calib, _ = longtr_calibration(ph, snr=50)
    res = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    assert isinstance(res, BrainMask)
    rec = res.as_dict()
    json.dumps(rec)
    assert "mask" not in rec
    assert rec["threshold"] >= rec["otsu"]
    assert rec["settings"]["voxel_size_mm"] == pytest.approx(list(ph.voxel_size))


@pytest.mark.gpu
def test_cupy_matches_numpy(phantoms):
    cp = pytest.importorskip("cupy")
    ph = phantoms[0]
    calib, _ = longtr_calibration(ph, snr=50)
    ref = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    t0 = time.perf_counter()
    got = brain_mask_from_calib(cp.asarray(calib), voxel_size=ph.voxel_size)
    cp.cuda.Device().synchronize()
    print(f"\nCuPy brain_mask_from_calib: {time.perf_counter() - t0:.2f} s (first call)")
    assert isinstance(got.mask, cp.ndarray)
    assert dice(got.mask.get(), ref.mask) > 0.999
    assert got.threshold == pytest.approx(ref.threshold, rel=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_inplane_fill_also_fills_3d_holes(seed):
    """_fill_holes does one in-plane pass: check it equals in-plane then 3-D fill."""
    from scipy import ndimage as ndi

    from aslcal.backend import array_namespace
    from aslcal.masks.brainmask import _fill_holes

    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=(21, 17, 13)), 1.2)
    for q in (0.3, 0.5, 0.7):
        mask = field > np.quantile(field, q)
        shell = mask & ~ndi.binary_erosion(mask, iterations=2)  # cavities inside
        for m in (mask, shell, ~mask):
            inplane = np.zeros((3, 3, 3), dtype=bool)
            inplane[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
            expected = ndi.binary_fill_holes(ndi.binary_fill_holes(m, structure=inplane))
            np.testing.assert_array_equal(_fill_holes(ndi, array_namespace(m), m), expected)


@pytest.mark.parametrize("seed", range(3))
def test_label_fill_equals_binary_fill_holes(seed):
    from scipy import ndimage as ndi

    from aslcal.backend import array_namespace
    from aslcal.masks.brainmask import _fill

    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.normal(size=(19, 23, 9)), 1.0)
    inplane = np.zeros((3, 3, 3), dtype=bool)
    inplane[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    structures = (inplane, ndi.generate_binary_structure(3, 1), ndi.generate_binary_structure(3, 3))
    for q in (0.3, 0.5, 0.7):
        mask = field > np.quantile(field, q)
        for m in (mask, mask & ~ndi.binary_erosion(mask, iterations=2), ~mask):
            for st in structures:
                np.testing.assert_array_equal(_fill(ndi, array_namespace(m), m, st),
                                              ndi.binary_fill_holes(m, structure=st))


def _full_grid_scipy_mask(calib, vox, fraction=0.5, erode_mm=7.0, close_mm=3.5):
    """The brain-mask method written plainly: the whole grid, scipy.ndimage, np.histogram."""
    from scipy import ndimage as ndi

    from aslcal.masks.ventricles import _ellipsoid

    img = np.where(np.isfinite(calib), calib, 0)
    flat = img.reshape(-1)
    lo, hi = float(np.quantile(flat, 0.005)), float(np.quantile(flat, 0.995))
    counts, edges = np.histogram(np.clip(flat, lo, hi), bins=256, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(counts.astype(float))
    m0 = np.cumsum(counts * centres)
    w1 = w0[-1] - w0
    mu0 = m0 / np.where(w0 > 0, w0, 1.0)
    mu1 = (m0[-1] - m0) / np.where(w1 > 0, w1, 1.0)
    otsu = float(edges[int(np.argmax((w0 * w1 * (mu0 - mu1) ** 2)[:-1])) + 1])
    cand = img > max(otsu, fraction * float(np.median(flat[flat > otsu])))
    ball, cb = _ellipsoid(erode_mm, vox), _ellipsoid(close_mm, vox)
    labels, _ = ndi.label(ndi.binary_erosion(cand, structure=ball, border_value=0))
    sizes = np.bincount(labels.reshape(-1))
    sizes[0] = 0
    mask = ndi.binary_dilation(labels == np.argmax(sizes), structure=ball) & cand
    inplane = np.zeros((3, 3, 3), dtype=bool)
    inplane[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    mask = ndi.binary_fill_holes(mask, structure=inplane)
    mask = ndi.binary_erosion(ndi.binary_dilation(mask, structure=cb), structure=cb, border_value=1)
    return ndi.binary_fill_holes(mask, structure=inplane)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cropped_shift_morphology_equals_the_full_grid_method(phantoms, seed):
    """The fast path (bounding-box crop, shift morphology, direct histogram) changes no voxel.

    Also with the head touching the grid's faces (a cropped field of view), where the
    closing's border rule matters.
    """
    ph = phantoms[seed]
    calib, _ = longtr_calibration(ph, snr=50)
    for img in (calib, calib[6:-6, 4:-9, 3:]):
        res = brain_mask_from_calib(img, voxel_size=ph.voxel_size)
        np.testing.assert_array_equal(res.mask, _full_grid_scipy_mask(img, ph.voxel_size))


def test_device_code_path_gives_the_host_result(phantoms, monkeypatch):
    """The CuPy path (shifted slices, ndimage labelling, array-API histogram) run on NumPy.

    ``is_cupy_array`` is made to answer True so that brain_mask_from_calib takes the
    branch a CuPy image takes, with NumPy and scipy.ndimage standing in for CuPy and
    cupyx.scipy.ndimage: it must give the host kernels' mask and threshold.
    """
    import aslcal.masks.brainmask as bm

    ph = phantoms[1]
    calib, _ = longtr_calibration(ph, snr=50)
    host = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    monkeypatch.setattr(bm, "is_cupy_array", lambda a: True)
    device = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    np.testing.assert_array_equal(device.mask, host.mask)
    assert device.threshold == host.threshold and device.n_components == host.n_components


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_quantile_and_median_equal_numpy(dtype):
    """The sorted-copy quantile and the one-partition median give NumPy's numbers exactly
    (ties, both parities, q at 0 and 1, lengths 1-2000)."""
    from aslcal.masks.brainmask import _median, _quantile

    rng = np.random.default_rng(7)
    for case in range(600):
        n = int(rng.integers(1, 2000))
        if case % 3 == 0:
            x = rng.integers(0, 4, size=n)  # many ties
        elif case % 3 == 1:
            x = rng.normal(size=n)
        else:
            x = rng.gamma(2.0, 300.0, size=n)
        x = x.astype(dtype)
        for q in (0.995, 0.5, 0.0, 1.0, float(rng.uniform())):
            assert _quantile(np, x, q) == float(np.quantile(x, q)), (case, n, q)
        assert _median(np, x) == float(np.median(x)), (case, n)
