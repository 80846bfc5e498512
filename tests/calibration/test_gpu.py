"""CuPy in, CuPy out: every calibration function on the GPU gives the CPU numbers.

Run with ``pytest -m gpu`` on a machine with a GPU and CuPy; deselected by default.
"""

from __future__ import annotations

import numpy as np
import pytest

from aslcal.calibration import (
    apply_calibration,
    coil_sensitivity,
    m0_refregion,
    m0_refregion_satrecov,
    m0_voxelwise,
)
from aslcal.errors import InputError
from aslcal.testing.phantoms import (
    DEFAULT_LOOK_LOCKER,
    body_coil_reference,
    longtr_calibration,
    look_locker_series,
    make_phantom,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ph():
    return make_phantom()


def test_refregion_voxelwise_sensitivity_apply_on_gpu(ph):
    import cupy

    calib, _ = longtr_calibration(ph, tr=3.2, te=15.0, dtype=np.float64)
    cref, _ = body_coil_reference(ph, tr=3.2, te=15.0, dtype=np.float64)
    ref = ph.ventricle_pv >= 0.99
    g = {k: cupy.asarray(v) for k, v in dict(calib=calib, cref=cref, ref=ref, brain=ph.brain_mask).items()}

    sens_cpu = coil_sensitivity(calib, cref, ph.brain_mask)
    sens_gpu = coil_sensitivity(g["calib"], g["cref"], g["brain"])
    assert isinstance(sens_gpu.map, cupy.ndarray)
    np.testing.assert_allclose(sens_gpu.map.get(), sens_cpu.map, rtol=1e-12)
    assert sens_gpu.n_invalid == sens_cpu.n_invalid

    a = m0_refregion(calib, ref, te=15.0, sensitivity=sens_cpu.map)
    b = m0_refregion(g["calib"], g["ref"], te=15.0, sensitivity=sens_gpu.map)
    assert b.m0a == pytest.approx(a.m0a, rel=1e-12) and b.n_voxels == a.n_voxels

    v_cpu = m0_voxelwise(calib, ph.brain_mask, tr=3.2)
    v_gpu = m0_voxelwise(g["calib"], g["brain"], tr=3.2)
    assert isinstance(v_gpu.m0, cupy.ndarray)
    np.testing.assert_allclose(v_gpu.m0.get(), v_cpu.m0, rtol=1e-9, atol=1e-9)
    assert v_gpu.n_filled == v_cpu.n_filled and v_gpu.fill_passes == v_cpu.fill_passes

    perf = np.random.default_rng(0).normal(5.0, 1.0, ph.shape)
    c_cpu = apply_calibration(perf, v_cpu.m0, alpha=0.85)
    c_gpu = apply_calibration(cupy.asarray(perf), v_gpu.m0, alpha=0.85)
    assert isinstance(c_gpu.image, cupy.ndarray)
    np.testing.assert_allclose(c_gpu.image.get(), c_cpu.image, rtol=1e-9)
    assert c_gpu.n_zeroed == c_cpu.n_zeroed


def test_satrecov_on_gpu(ph):
    import cupy

    ll = dict(DEFAULT_LOOK_LOCKER)
    data, truth = look_locker_series(ph, **ll, dtype=np.float32)
    ref = ph.ventricle_pv >= 0.99
    res = m0_refregion_satrecov(
        cupy.asarray(data), truth["tis"], cupy.asarray(ref), cupy.asarray(ph.brain_mask),
        fa=ll["fa"], lfa=ll["lfa"], nphases=ll["nphases"], dt=ll["dt"],
        sensitivity=cupy.asarray(ph.sensitivity), m0_scale="relaxed",  # the phantom's M0a (as test_phantom)
    )
    assert res.ref_fit.backend == "cuda" and isinstance(res.brain_fit.t1t, cupy.ndarray)
    # float32 fit: 0.5 % acceptance (float32 data and arithmetic)
    assert abs(res.m0a / ph.m0a - 1) < 0.005


def test_mixed_devices_are_an_input_error(ph):
    import cupy

    with pytest.raises(InputError, match="different devices"):
        m0_refregion(cupy.ones(ph.shape), ph.ventricle_mask)


def test_whitepaper_on_the_gpu():
    """quantify_whitepaper with CuPy ΔM, M0 map and slice times: CuPy out, the CPU numbers."""
    cp = pytest.importorskip("cupy")

    from aslcal.calibration import quantify_whitepaper

    rng = np.random.default_rng(0)
    dm = rng.uniform(1.0, 20.0, (8, 7, 5)).astype(np.float32)
    m0 = rng.uniform(800.0, 1200.0, (8, 7, 5)).astype(np.float32)
    kw = dict(labelling="pcasl", pld=1.8, tau=1.8, slice_times=[0.0, 0.04, 0.08, 0.12, 0.16])
    cpu = quantify_whitepaper(dm, m0, **kw)
    gpu = quantify_whitepaper(cp.asarray(dm), cp.asarray(m0), **kw)
    assert isinstance(gpu.image, cp.ndarray) and gpu.image.dtype == cp.float32
    np.testing.assert_allclose(cp.asnumpy(gpu.image), cpu.image, rtol=1e-6)
