"""Issue acceptance for the automatic masks, end to end on the phantom.

Independent truth: the phantom's label volume on the structural grid (ventricle label,
eroded once exactly as the automatic route erodes its ventricle mask, then averaged over
each calibration voxel through the same transform and thresholded at 0.9: "thresholded
the same way"), its sulcal-CSF mask and its brain mask on the ASL grid, and M0a from the
true ventricle mask.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from aslcal.calibration import m0_refregion
from aslcal.geometry import flirt_to_world
from aslcal.masks import (
    brain_mask_from_calib,
    lateral_ventricles,
    reference_mask_from_pv,
    resample_to_grid,
    segment_tissues,
)
from aslcal.testing.phantoms import LABELS, longtr_calibration, make_phantom


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module", params=[0, 1, 2])
def phantom(request):
    return make_phantom(seed=request.param)


def _world(ph):
    st = ph.structural
    return flirt_to_world(st.asl2struct, ph.affine, ph.shape, st.affine, st.shape)


def _automatic(ph, t1w_brain):
    st = ph.structural
    t0 = time.perf_counter()
    seg = segment_tissues(t1w_brain, voxel_size=st.voxel_size)
    t_seg = time.perf_counter() - t0
    vm = lateral_ventricles(seg.pv["csf"], t1w_brain > 0, voxel_size=st.voxel_size, affine=st.affine)
    t_ven = time.perf_counter() - t0 - t_seg
    ref = reference_mask_from_pv(vm.pv, st.affine, ph.shape, ph.affine, _world(ph))
    t_res = time.perf_counter() - t0 - t_seg - t_ven
    return ref, (t_seg, t_ven, t_res)


def _truth_same_way(ph):
    st = ph.structural
    ventricle = ndimage.binary_erosion(st.labels == LABELS["ventricle"], structure=np.ones((3, 3, 3)))
    pv = resample_to_grid(ventricle.astype(np.float64), st.affine, ph.shape, ph.affine, _world(ph))
    return pv >= 0.9


@pytest.mark.parametrize("extra_noise", [0.0, 0.03])
def test_automatic_reference_mask_on_the_phantom(phantom, extra_noise):
    ph = phantom
    st = ph.structural
    t1w = st.t1w_brain.astype(np.float64)
    if extra_noise:
        # more noise on the structural: extra_noise x the WM intensity, inside the brain
        wm_level = float(np.median(t1w[st.labels == LABELS["wm"]]))
        rng = np.random.default_rng(ph.seed + 100)
        t1w = np.where(t1w > 0, t1w + rng.normal(0.0, extra_noise * wm_level, t1w.shape), 0.0)
    ref, (t_seg, t_ven, t_res) = _automatic(ph, t1w)
    truth = _truth_same_way(ph)
    d = dice(ref.mask, truth)
    sulcal = int(np.count_nonzero(ref.mask & ph.sulcal_csf_mask))
    print(f"\nseed {ph.seed} noise {extra_noise}: {ref.n_voxels} voxels, Dice {d:.3f} vs truth "
          f"({int(truth.sum())} voxels), sulcal {sulcal}; segmentation {t_seg:.2f} s, ventricles "
          f"{t_ven:.2f} s, resampling {t_res:.2f} s")
    assert d >= 0.8
    assert sulcal == 0
    # every kept voxel is ventricle in the phantom's own ASL-grid truth
    assert np.all(ph.ventricle_pv[ref.mask] > 0.5)

    # M0a from the automatic mask vs from the true mask (long TR, noisy calibration image)
    for snr in (None, 50.0):
        calib, _ = longtr_calibration(ph, snr=snr, dtype=np.float64)
        auto = m0_refregion(calib, ref.mask, sensitivity=ph.sensitivity).m0a
        true = m0_refregion(calib, ph.ventricle_mask, sensitivity=ph.sensitivity).m0a
        print(f"  snr {snr}: M0a auto {auto:.2f}, true mask {true:.2f}, phantom {ph.m0a:.2f}")
        assert abs(auto / true - 1) < 0.02


@pytest.mark.parametrize("snr", [50.0, 100.0])
def test_automatic_brain_mask_dice(phantom, snr):
    calib, _ = longtr_calibration(phantom, snr=snr)
    bm = brain_mask_from_calib(calib, voxel_size=phantom.voxel_size)
    d = dice(bm.mask, phantom.brain_mask)
    print(f"\nseed {phantom.seed} snr {snr}: brain mask Dice {d:.4f}")
    assert d >= 0.95
    assert not np.any(bm.mask & (phantom.pv["nonbrain"] >= 0.9))
