"""Tests for aslcal.masks.segment: CSF/GM/WM segmentation of a brain-extracted T1w image.

Independent truth: the phantom's structural label volume (majority label of each voxel,
ventricles counted as CSF) and its partial-volume maps, rasterised from the analytic
anatomy; the T1w image the segmentation sees is that anatomy through intensities, a bias
field and noise.  Dice is computed inside the phantom's brain mask.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from aslcal.errors import InputError
from aslcal.masks.segment import (
    TISSUE_LABELS,
    TISSUES,
    Segmentation,
    check_brain_extracted,
    segment_tissues,
)
from aslcal.testing.phantoms import LABELS, make_phantom

# Pure-tissue T1w intensities of the phantom (aslcal.testing.phantoms._T1W_INTENSITY:
# CSF 250, GM 620, WM 950, arbitrary units) and its noise (1 % of WM).
T1W_TRUE = {"csf": 250.0, "gm": 620.0, "wm": 950.0}
WM_LEVEL = 950.0
SMALL_GRID = (2.0, 2.0, 2.0)  # mm: the anatomy holds (cortex ~1.5 voxels) and it is fast


def dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def truth_labels(st) -> np.ndarray:
    lab = st.labels.astype(np.uint8).copy()
    lab[lab == LABELS["ventricle"]] = LABELS["csf"]
    return lab


def dices(seg: Segmentation, st) -> dict[str, float]:
    truth = truth_labels(st)
    m = st.brain_mask
    return {t: dice((seg.labels == TISSUE_LABELS[t]) & m, (truth == LABELS[t]) & m) for t in TISSUES}


def with_noise(st, level: float, seed: int) -> np.ndarray:
    """The brain-extracted T1w plus Gaussian noise of ``level`` x WM, inside the brain."""
    rng = np.random.default_rng(1000 + seed)
    noisy = np.abs(st.t1w_brain + rng.normal(0.0, level * WM_LEVEL, st.shape))
    return np.where(st.brain_mask, noisy, 0.0).astype(np.float32)


def ramp(shape) -> np.ndarray:
    """A +-20 % linear bias ramp along x."""
    x = np.linspace(-1.0, 1.0, shape[0])[:, None, None]
    return np.broadcast_to(1.0 + 0.2 * x, shape)


@pytest.fixture(scope="module")
def default_phantom():
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def small_phantoms():
    return {s: make_phantom(seed=s, struct_voxel_size=SMALL_GRID) for s in (0, 1, 2)}


@pytest.fixture(scope="module")
def default_seg(default_phantom):
    st = default_phantom.structural
    segment_tissues(st.t1w_brain[::4, ::4, ::4], brain_mask=st.brain_mask[::4, ::4, ::4])  # warm-up
    t0 = time.perf_counter()
    seg = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size)
    elapsed = time.perf_counter() - t0
    return seg, elapsed


# --------------------------------------------------------------------------- accuracy


def test_default_phantom_dice_pv_and_runtime(default_phantom, default_seg):
    st = default_phantom.structural
    seg, elapsed = default_seg
    d = dices(seg, st)
    m = st.brain_mask
    pv_err = {t: float(np.abs(seg.pv[t] - st.pv[t])[m].mean()) for t in TISSUES}
    print(
        f"\ndefault phantom (seed 0, {st.shape} at {st.voxel_size[0]} mm, {seg.n_voxels} brain "
        f"voxels): Dice " + ", ".join(f"{t} {v:.3f}" for t, v in d.items())
        + "; mean |PV error| " + ", ".join(f"{t} {v:.3f}" for t, v in pv_err.items())
        + f"; {elapsed:.2f} s ({seg.n_iter} EM iterations, {seg.n_bias_updates} bias updates)"
    )
    assert all(v >= 0.85 for v in d.values()), d
    # PV maps: the mixel model recovers fractions to a few per cent on average.
    assert all(v < 0.05 for v in pv_err.values()), pv_err
    # Class means near the phantom's pure intensities (its own bias field has a geometric
    # mean near 1 over the brain, as ours has): within 3 %.
    for t in TISSUES:
        assert seg.means[t] == pytest.approx(T1W_TRUE[t], rel=0.03), (t, seg.means)
    assert seg.converged
    # Wall time on the CI runner (2 cores): a few seconds; generous bound.
    assert elapsed < 15.0


def test_output_contract(default_phantom, default_seg):
    st = default_phantom.structural
    seg, _ = default_seg
    mask = seg.mask
    assert mask.dtype == bool and mask.shape == st.shape
    np.testing.assert_array_equal(mask, st.t1w_brain > 0)
    total = np.zeros(st.shape, dtype=np.float64)
    for t in TISSUES:
        pv = seg.pv[t]
        assert pv.dtype == np.float32 and pv.shape == st.shape
        assert pv.min() >= 0.0 and pv.max() <= 1.0
        assert not pv[~mask].any()
        total += pv
    np.testing.assert_allclose(total[mask], 1.0, atol=1e-5)
    assert seg.labels.dtype == np.uint8
    assert not seg.labels[~mask].any()
    stack = np.stack([seg.pv[t] for t in TISSUES])
    np.testing.assert_array_equal(seg.labels[mask], np.argmax(stack, axis=0)[mask] + 1)
    assert seg.bias_field is not None and seg.bias_field.shape == st.shape
    assert np.all(seg.bias_field[~mask] == 1.0)
    assert abs(float(np.mean(np.log(seg.bias_field[mask])))) < 1e-3  # geometric mean 1
    assert seg.means["csf"] < seg.means["gm"] < seg.means["wm"]
    assert sum(seg.fractions.values()) == pytest.approx(1.0, abs=1e-4)
    record = seg.as_dict()
    json.dumps(record)
    assert record["n_voxels"] == seg.n_voxels and record["labels"] == {"csf": 1, "gm": 2, "wm": 3}


def test_ventricles_are_pure_csf(default_phantom, default_seg):
    """The reference region of the calibration: interior ventricle voxels get CSF PV >= 0.9."""
    from scipy import ndimage

    st = default_phantom.structural
    seg, _ = default_seg
    core = ndimage.binary_erosion(st.labels == LABELS["ventricle"])
    frac = float(np.mean(seg.pv["csf"][core] >= 0.9))
    print(f"\n{int(core.sum())} interior ventricle voxels, {100 * frac:.1f} % with CSF PV >= 0.9")
    assert frac >= 0.99
    # ... and no deep white matter is called CSF.
    deep_wm = ndimage.binary_erosion(st.labels == LABELS["wm"], iterations=2)
    assert float(np.mean(seg.pv["csf"][deep_wm] >= 0.5)) < 0.001


@pytest.mark.parametrize("noise", [0.0, 0.03], ids=["default-noise", "extra-noise-3pc"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_seeds_and_noise(small_phantoms, seed, noise):
    st = small_phantoms[seed].structural
    img = st.t1w_brain if noise == 0.0 else with_noise(st, noise, seed)
    seg = segment_tissues(img, voxel_size=st.voxel_size, seed=seed)
    d = dices(seg, st)
    print(f"\nseed {seed}, extra noise {noise:.0%} of WM: Dice " + ", ".join(f"{t} {v:.3f}" for t, v in d.items()))
    assert all(v >= 0.85 for v in d.values()), d


@pytest.mark.parametrize(("n_hot", "factor"), [(1, 1000.0), (50, 500.0), (5, -1000.0)])
def test_extreme_voxels_do_not_move_the_classes(small_phantoms, n_hot, factor):
    """A few voxels at hundreds of times the WM intensity (a spike, a vessel; or far below
    zero inside a given mask) once stretched the intensity histograms until the class
    means crossed (a bare ValueError) or moved CSF by 50 %: the segmentation must still
    find the phantom's tissues (Dice and class means as on a clean image)."""
    st = small_phantoms[1].structural
    img = st.t1w_brain.astype(np.float32).copy()
    edge = np.argwhere(st.brain_mask & ~ndimage.binary_erosion(st.brain_mask))
    pick = edge[np.random.default_rng(7).choice(len(edge), n_hot, replace=False)]
    img[tuple(pick.T)] = factor * WM_LEVEL
    seg = segment_tissues(img, brain_mask=st.brain_mask, voxel_size=st.voxel_size)
    d = dices(seg, st)
    assert all(v >= 0.85 for v in d.values()), d
    for t in TISSUES:
        assert seg.means[t] == pytest.approx(T1W_TRUE[t], rel=0.05), (t, seg.means)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strong_bias_ramp_is_corrected(small_phantoms, seed):
    st = small_phantoms[seed].structural
    m = st.brain_mask
    base = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size)
    r = ramp(st.shape)
    seg = segment_tissues((st.t1w_brain * r).astype(np.float32), voxel_size=st.voxel_size)
    d = dices(seg, st)
    # The extra field the segmentation found is the ramp (up to a constant factor).
    extra = np.log(seg.bias_field[m]) - np.log(base.bias_field[m])
    err = float(np.std(extra - np.log(r[m])))
    print(f"\nseed {seed}, +-20 % ramp: Dice " + ", ".join(f"{t} {v:.3f}" for t, v in d.items())
          + f"; ramp recovered to {100 * err:.2f} % (sd of the log ratio)")
    assert all(v >= 0.85 for v in d.values()), d
    assert err < 0.01
    # Without the bias correction the ramp pulls the classes apart.
    if seed == 0:
        raw = segment_tissues((st.t1w_brain * r).astype(np.float32), voxel_size=st.voxel_size,
                              bias_correction=False)
        assert raw.bias_field is None
        assert min(dices(raw, st).values()) < min(d.values())


def test_brain_mask_argument_skips_the_extraction_check(small_phantoms):
    """With a mask, the head image is segmented inside it (as FAST with a mask)."""
    st = small_phantoms[0].structural
    seg = segment_tissues(st.t1w, brain_mask=st.brain_mask, voxel_size=st.voxel_size, mrf_beta=0.0)
    ref = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size, mrf_beta=0.0)
    np.testing.assert_array_equal(seg.labels, ref.labels)
    assert seg.mrf_beta == 0.0


def test_deterministic_and_seed_insensitive(small_phantoms):
    st = small_phantoms[1].structural
    a = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size, seed=3)
    b = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size, seed=3)
    c = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size, seed=4)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.mean(a.labels[a.mask] == c.labels[c.mask]) > 0.999


# ------------------------------------------------------------------ brain extraction


def test_head_image_is_not_brain_extracted(default_phantom):
    st = default_phantom.structural
    with pytest.raises(InputError, match=r"does not look brain-extracted \(.*background noise") as info:
        segment_tissues(st.t1w, voxel_size=st.voxel_size)
    msg = str(info.value)
    assert msg.startswith("t1w_brain: the structural image does not look brain-extracted (")
    assert "run a brain extraction (e.g. BET, SynthStrip) or give --refpve" in msg
    assert "\n" not in msg


def test_head_with_zeroed_background_is_not_brain_extracted(default_phantom):
    """No background noise left, but a scalp around a dark skull: the shell cue."""
    st = default_phantom.structural
    head = np.where(st.labels != LABELS["background"], st.t1w, 0.0)
    with pytest.raises(InputError, match="enclosed dark shell .* skull under a scalp"):
        check_brain_extracted(head, voxel_size=st.voxel_size, name="structural image (-s)")
    with pytest.raises(InputError, match=r"^structural image \(-s\): the structural image does not"):
        check_brain_extracted(head, voxel_size=st.voxel_size, name="structural image (-s)")


def test_brain_extracted_images_pass(default_phantom):
    st = default_phantom.structural
    ev = check_brain_extracted(st.t1w_brain, voxel_size=st.voxel_size)
    assert ev["border_nonzero"] == 0.0 and ev["dark_shell"] < 0.02
    # Cropped tightly around the brain (brain touching the edges of the FOV).
    idx = [np.flatnonzero(st.brain_mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    tight = st.t1w_brain[idx[0][0]:idx[0][-1] + 1, idx[1][0]:idx[1][-1] + 1, idx[2][0]:idx[2][-1] + 1]
    ev = check_brain_extracted(tight, voxel_size=st.voxel_size)
    assert ev["border_nonzero"] < 0.1 and ev["dark_shell"] < 0.02


# --------------------------------------------------------------- three-class failures


def _brain_like(st, values):
    return np.where(st.brain_mask, values, 0.0).astype(np.float32)


def test_constant_image(small_phantoms):
    st = small_phantoms[0].structural
    with pytest.raises(InputError, match=r"failed to separate three tissue classes: the brain holds only 1 distinct intensity"):
        segment_tissues(_brain_like(st, 500.0), voxel_size=st.voxel_size)


def test_two_valued_image(small_phantoms):
    st = small_phantoms[0].structural
    x = np.arange(st.shape[0])[:, None, None] < st.shape[0] // 2
    with pytest.raises(InputError, match="only 2 distinct intensities"):
        segment_tissues(_brain_like(st, np.where(x, 300.0, 900.0)), voxel_size=st.voxel_size)


@pytest.mark.parametrize("noise", [0.01, 0.03])
def test_two_classes_with_noise(small_phantoms, noise):
    st = small_phantoms[0].structural
    rng = np.random.default_rng(7)
    x = np.arange(st.shape[0])[:, None, None] < st.shape[0] // 2
    img = _brain_like(st, np.where(x, 400.0, 900.0) + rng.normal(0.0, noise * WM_LEVEL, st.shape))
    with pytest.raises(InputError, match="failed to separate three tissue classes") as info:
        segment_tissues(img, voxel_size=st.voxel_size)
    print(f"\n{info.value}")
    assert "\n" not in str(info.value)


def test_one_noisy_class(small_phantoms):
    st = small_phantoms[0].structural
    img = _brain_like(st, 600.0 + np.random.default_rng(8).normal(0.0, 20.0, st.shape))
    with pytest.raises(InputError, match="pooled standard deviations apart"):
        segment_tissues(img, voxel_size=st.voxel_size)


def test_tiny_third_class(small_phantoms):
    """Two tissues plus a handful (0.2 %) of dark voxels: no third class worth the name."""
    st = small_phantoms[0].structural
    rng = np.random.default_rng(9)
    x = np.arange(st.shape[0])[:, None, None] < st.shape[0] // 2
    values = np.where(x, 400.0, 900.0) + rng.normal(0.0, 9.5, st.shape)
    values[rng.random(st.shape) < 0.002] = 100.0
    with pytest.raises(InputError, match="failed to separate three tissue classes") as info:
        segment_tissues(_brain_like(st, values), voxel_size=st.voxel_size)
    print(f"\n{info.value}")


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n_iter": 0}, "n_iter=0"),
        ({"mrf_beta": -1.0}, "mrf_beta=-1.0"),
        ({"mrf_iter": -1}, "mrf_iter=-1"),
        ({"bias_order": 7}, "bias_order=7"),
        ({"tol": 0.0}, "tol=0.0"),
        ({"seed": -1}, "seed=-1"),
        ({"voxel_size": (1.0, 0.0, 1.0)}, "voxel_size"),
    ],
)
def test_bad_options(kwargs, pattern):
    img = np.zeros((20, 20, 20), dtype=np.float32)
    with pytest.raises(InputError, match=pattern):
        segment_tissues(img, **kwargs)


def test_bad_images():
    rng = np.random.default_rng(0)
    vol = rng.uniform(100.0, 1000.0, (24, 24, 24)).astype(np.float32)
    with pytest.raises(InputError, match="expected a 3-D image"):
        segment_tissues(vol[0])
    with pytest.raises(InputError, match="real numbers"):
        segment_tissues(vol.astype(np.complex64))
    with pytest.raises(InputError, match="brain_mask: shape"):
        segment_tissues(vol, brain_mask=np.ones((24, 24, 23), bool))
    bad = vol.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN or Inf"):
        segment_tissues(bad, brain_mask=np.ones(vol.shape, bool))
    with pytest.raises(InputError, match="NaN or Inf"):
        segment_tissues(bad)
    small = np.zeros_like(vol)
    small[10:14, 10:14, 10:14] = vol[10:14, 10:14, 10:14]
    with pytest.raises(InputError, match="holds 64 voxels; expected at least 1000"):
        segment_tissues(small)


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cupy_matches_numpy(small_phantoms):
    import cupy

    st = small_phantoms[0].structural
    cpu = segment_tissues(st.t1w_brain, voxel_size=st.voxel_size)
    t0 = time.perf_counter()
    gpu = segment_tissues(cupy.asarray(st.t1w_brain), voxel_size=st.voxel_size)
    cupy.cuda.Device().synchronize()
    elapsed = time.perf_counter() - t0
    for t in TISSUES:
        assert isinstance(gpu.pv[t], cupy.ndarray)
        assert gpu.means[t] == pytest.approx(cpu.means[t], rel=1e-3)
    assert isinstance(gpu.labels, cupy.ndarray) and isinstance(gpu.bias_field, cupy.ndarray)
    agree = float(np.mean(gpu.labels.get()[cpu.mask] == cpu.labels[cpu.mask]))
    print(f"\nCuPy: {elapsed:.2f} s, labels agree with NumPy on {100 * agree:.3f} % of the brain")
    assert agree > 0.999
    with pytest.raises(InputError, match="does not look brain-extracted"):
        check_brain_extracted(cupy.asarray(st.t1w), voxel_size=st.voxel_size)
