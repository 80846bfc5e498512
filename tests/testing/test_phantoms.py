"""Tests of aslcal.testing.phantoms: anatomy, geometry, signal equations, noise, files.

Expected numbers are computed here from the equations of calibration.md (sections 4,
7.1 and 9) and from hand-written affine arithmetic, never with the module's helpers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.testing import (
    LABELS,
    body_coil_reference,
    flirt_matrix,
    longtr_calibration,
    look_locker_series,
    make_phantom,
    perfusion_image,
    satrecov_series,
    write_dataset,
)

# Small, fast phantom for tests that do not need the default resolution.
SMALL = dict(
    shape=(32, 32, 16),
    voxel_size=(6.8, 6.8, 7.5),
    struct_voxel_size=(2.5, 2.5, 2.5),
    struct_oversample=1,
)

# 3 T table (calibration.md section 3) and the phantom's documented defaults.
T1 = {"gm": 1.3, "wm": 1.0, "csf": 4.3, "nonbrain": 0.6}
T2 = {"gm": 100.0, "wm": 50.0, "csf": 750.0, "nonbrain": 60.0}
T2STAR = {"gm": 60.0, "wm": 50.0, "csf": 400.0, "nonbrain": 30.0}
PC = {"gm": 0.98, "wm": 0.82, "csf": 1.15}


@pytest.fixture(scope="module")
def ph():
    """The default phantom (built once)."""
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def small():
    return make_phantom(seed=7, **SMALL)


def _pure(ph, layout):
    """Copy of ``ph`` whose pv maps are pure tissues by slice: layout[z] = tissue name."""
    pv = {t: np.zeros(ph.shape) for t in ("gm", "wm", "csf", "nonbrain")}
    for z, tissue in enumerate(layout):
        pv[tissue][:, :, z] = 1.0
    return dataclasses.replace(ph, pv=pv)


def _voxel_to_world(affine, ijk):
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


# --------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------


def test_pv_fractions_are_valid(ph):
    for name in ("gm", "wm", "csf", "nonbrain"):
        v = ph.pv[name]
        assert v.shape == ph.shape and v.dtype == np.float64
        assert v.min() >= 0.0 and v.max() <= 1.0
        assert v.max() == 1.0, f"{name}: no pure voxel"
    total = sum(ph.pv.values())
    assert total.max() <= 1.0 + 1e-12
    assert (total < 0.5).any()  # skull and air exist
    assert np.all(ph.ventricle_pv <= ph.pv["csf"] + 1e-12)
    assert np.array_equal(ph.brain_mask, ph.pv["gm"] + ph.pv["wm"] + ph.pv["csf"] >= 0.5)
    assert np.array_equal(ph.ventricle_mask, ph.ventricle_pv >= 0.9)


def test_tissue_volumes_are_plausible(ph):
    vox_l = np.prod(ph.voxel_size) / 1e6  # litre per voxel
    gm = ph.pv["gm"].sum() * vox_l
    wm = ph.pv["wm"].sum() * vox_l
    csf = ph.pv["csf"].sum() * vox_l
    assert 1.0 <= gm + wm + csf <= 1.8
    assert 0.8 <= gm / wm <= 1.6
    assert 0.05 <= csf <= 0.6
    vent_ml = ph.ventricle_pv.sum() * vox_l * 1000
    assert 8.0 <= vent_ml <= 60.0
    assert ph.ventricle_mask.sum() >= 20  # enough for a CSF reference region
    # CBF truth: GM 60, WM 20, pv-weighted, 0 outside the brain.
    np.testing.assert_allclose(ph.cbf, 60.0 * ph.pv["gm"] + 20.0 * ph.pv["wm"], rtol=0, atol=1e-12)
    assert np.all(ph.cbf[(ph.pv["gm"] + ph.pv["wm"]) == 0] == 0)


def test_ventricles_left_right_and_deep_in_white_matter(ph):
    ijk = np.argwhere(ph.ventricle_mask)
    x_world = _voxel_to_world(ph.affine, ijk)[:, 0]
    assert (x_world < -3).sum() >= 10 and (x_world > 3).sum() >= 10  # both hemispheres
    # Mirrored: similar size left and right.
    assert 0.6 <= (x_world < 0).sum() / (x_world > 0).sum() <= 1.6
    # Near the centre of the brain.
    brain_centre = _voxel_to_world(ph.affine, np.argwhere(ph.brain_mask)).mean(axis=0)
    assert np.all(np.abs(_voxel_to_world(ph.affine, ijk) - brain_centre).max(axis=0) < [40, 60, 45])

    # On the fine structural labels: the 3x3x3 neighbourhood of every ventricle voxel
    # is ventricle or parenchyma (never sulcal CSF, skull, scalp or air) and mostly WM.
    lab = ph.structural.labels
    vent = lab == LABELS["ventricle"]
    assert vent.sum() > 100
    nb_counts = {}
    for name in LABELS:
        other = lab == LABELS[name]
        shifted = np.zeros_like(other)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dz in (-1, 0, 1):
                    shifted |= np.roll(other, (dx, dy, dz), axis=(0, 1, 2))
        nb_counts[name] = int((shifted & vent).sum())
    for name in ("csf", "bone", "nonbrain", "background"):
        assert nb_counts[name] == 0, f"ventricle touches {name}"
    assert nb_counts["wm"] > nb_counts["gm"]


def test_sulcal_csf_scalp_and_folding(ph):
    sulcal = ph.sulcal_csf_mask
    assert sulcal.sum() > 100
    assert not (sulcal & ph.ventricle_mask).any()
    # Scalp: non-brain tissue with signal outside the brain.
    scalp = (ph.pv["nonbrain"] >= 0.5) & ~ph.brain_mask
    assert scalp.sum() > 200
    data, _ = longtr_calibration(ph)
    assert np.median(data[scalp]) > 0.2 * np.median(data[ph.brain_mask])
    # Folding: a cortical ribbon, not a smooth shell -- GM reaches well below the
    # hull: along a radial line, GM and WM alternate on the structural grid.
    lab = ph.structural.labels
    st = ph.structural.shape
    row = lab[st[0] // 2 + 15, :, st[2] // 2 + 20]
    changes = np.count_nonzero(np.diff((row == LABELS["gm"]).astype(int)))
    assert changes >= 8


def test_structural_image(ph):
    st = ph.structural
    assert st.t1w.shape == st.shape == st.labels.shape == st.brain_mask.shape
    assert st.affine.shape == (4, 4) and np.linalg.det(st.affine[:3, :3]) > 0
    assert np.linalg.det(ph.affine[:3, :3]) < 0  # ASL stored LAS, structural RAS
    np.testing.assert_allclose(np.abs(np.diag(st.affine)[:3]), st.voxel_size)
    total = st.pv["gm"] + st.pv["wm"] + st.pv["csf"] + st.pv["nonbrain"]
    assert total.max() <= 1.0 + 1e-6 and total.min() >= 0
    assert np.array_equal(st.brain_mask, st.pv["gm"] + st.pv["wm"] + st.pv["csf"] >= 0.5)
    # T1 contrast: WM > GM > CSF; scalp bright, skull dark; brain extraction zeroes the rest.
    mean = {k: st.t1w[st.labels == v].mean() for k, v in LABELS.items()}
    assert mean["wm"] > mean["gm"] > mean["csf"] > mean["bone"]
    assert mean["nonbrain"] > mean["gm"]
    assert np.all(st.t1w_brain[~st.brain_mask] == 0)
    # The whole head (scalp included) lies inside the structural field of view.
    for face in (st.labels[0], st.labels[-1], st.labels[:, 0], st.labels[:, -1]):
        assert not face.any()
    assert not st.labels[:, :, 0].any() and not st.labels[:, :, -1].any()
    assert np.array_equal(st.t1w_brain[st.brain_mask], st.t1w[st.brain_mask])
    # The pose is non-trivial but small: a few degrees, a few mm at the brain centre.
    w = st.world_asl_to_struct
    np.testing.assert_allclose(w[:3, :3] @ w[:3, :3].T, np.eye(3), atol=1e-12)
    angle = math.degrees(math.acos((np.trace(w[:3, :3]) - 1) / 2))
    assert 1.0 < angle < 10.0
    centre = _voxel_to_world(ph.affine, np.argwhere(ph.brain_mask)).mean(axis=0)
    assert 0.5 < np.linalg.norm(w[:3, :3] @ centre + w[:3, 3] - centre) < 10.0


# --------------------------------------------------------------------------------------
# FLIRT matrices
# --------------------------------------------------------------------------------------


def test_flirt_matrix_hand_cases():
    # Both images stored with det < 0 (no FSL x flip): scaled = index * voxel size.
    src = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -20.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
    ref = np.array([[-1.0, 0, 0, 40.0], [0, 1.0, 0, -30.0], [0, 0, 1.0, -20.0], [0, 0, 0, 1]])
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -3.0, 2.0]
    mat = flirt_matrix(src, (20, 20, 10), ref, (80, 60, 40), world_src_to_ref=shift)
    # src voxel (3, 4, 5): world (24, -12, 5); shifted (29, -15, 7); ref voxel
    # ((40-29)/1, (-15+30)/1, (7+20)/1) = (11, 15, 27); scaled src (6, 8, 15).
    np.testing.assert_allclose(mat @ [6.0, 8.0, 15.0, 1.0], [11.0, 15.0, 27.0, 1.0], atol=1e-12)

    # Reference stored RAS (det > 0, nx = 80): FSL flips x -> (nx - 1 - i) * dx.
    ref_ras = np.array([[1.0, 0, 0, -40.0], [0, 1.0, 0, -30.0], [0, 0, 1.0, -20.0], [0, 0, 0, 1]])
    mat2 = flirt_matrix(src, (20, 20, 10), ref_ras, (80, 60, 40), world_src_to_ref=shift)
    # shifted world (29, -15, 7) -> ref voxel (69, 15, 27) -> scaled ((79 - 69) * 1, 15, 27)
    np.testing.assert_allclose(mat2 @ [6.0, 8.0, 15.0, 1.0], [10.0, 15.0, 27.0, 1.0], atol=1e-12)

    # Source RAS with 2 mm voxels, nx = 20: scaled x of voxel i is (19 - i) * 2.
    src_ras = np.array([[2.0, 0, 0, -30.0], [0, 2.0, 0, -20.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
    mat3 = flirt_matrix(src_ras, (20, 20, 10), ref, (80, 60, 40))
    # voxel (3, 4, 5) -> world (-24, -12, 5) -> ref voxel (64, 18, 25); scaled src (32, 8, 15)
    np.testing.assert_allclose(mat3 @ [32.0, 8.0, 15.0, 1.0], [64.0, 18.0, 25.0, 1.0], atol=1e-12)

    # An image onto itself is the identity, with or without the flip.
    for aff in (src, src_ras):
        same = flirt_matrix(aff, (20, 20, 10), aff, (20, 20, 10))
        np.testing.assert_allclose(same, np.eye(4), atol=1e-12)


def test_phantom_flirt_matrix_maps_asl_voxels_onto_structural(ph):
    st = ph.structural
    # Hand-written scalings: ASL is LAS (det < 0, no flip), structural RAS (flip x).
    s_src = np.diag(list(ph.voxel_size) + [1.0])
    nx = st.shape[0]
    s_ref = np.diag(list(st.voxel_size) + [1.0])
    s_ref[0, 0] = -st.voxel_size[0]
    s_ref[0, 3] = (nx - 1) * st.voxel_size[0]
    expected = (
        s_ref @ np.linalg.inv(st.affine) @ st.world_asl_to_struct @ ph.affine @ np.linalg.inv(s_src)
    )
    np.testing.assert_allclose(st.asl2struct, expected, rtol=0, atol=1e-9)

    # Pure tissue in an ASL voxel -> that label at its centre in the structural image.
    cases = (("ventricle", ph.ventricle_pv), ("wm", ph.pv["wm"]), ("nonbrain", ph.pv["nonbrain"]))
    for name, pv in cases:
        ijk = np.argwhere(pv == 1.0)
        assert len(ijk) > 0, name
        scaled = np.c_[ijk * np.asarray(ph.voxel_size), np.ones(len(ijk))]
        ref_scaled = scaled @ st.asl2struct.T
        i_ref = (nx - 1) - ref_scaled[:, 0] / st.voxel_size[0]
        j_ref = ref_scaled[:, 1] / st.voxel_size[1]
        k_ref = ref_scaled[:, 2] / st.voxel_size[2]
        idx = np.rint(np.c_[i_ref, j_ref, k_ref]).astype(int)
        labels = st.labels[idx[:, 0], idx[:, 1], idx[:, 2]]
        assert np.mean(labels == LABELS[name]) > 0.95, name


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------


def test_same_seed_same_phantom_different_seed_different(small):
    again = make_phantom(seed=7, **SMALL)
    other = make_phantom(seed=8, **SMALL)
    for name in ("gm", "wm", "csf", "nonbrain"):
        assert np.array_equal(small.pv[name], again.pv[name])
        assert not np.array_equal(small.pv[name], other.pv[name])
    for attr in ("sensitivity", "fa_scale", "ventricle_pv", "cbf"):
        assert np.array_equal(getattr(small, attr), getattr(again, attr))
        assert not np.array_equal(getattr(small, attr), getattr(other, attr))
    assert np.array_equal(small.structural.t1w, again.structural.t1w)
    assert np.array_equal(small.structural.asl2struct, again.structural.asl2struct)
    assert not np.array_equal(small.structural.asl2struct, other.structural.asl2struct)
    d1, _ = look_locker_series(small, ti1=0.1, dt=0.3, n_ti=4, fa=35, snr=20)
    d2, _ = look_locker_series(again, ti1=0.1, dt=0.3, n_ti=4, fa=35, snr=20)
    d3, _ = look_locker_series(again, ti1=0.1, dt=0.3, n_ti=4, fa=35, snr=20, seed=99)
    assert np.array_equal(d1, d2) and not np.array_equal(d1, d3)


def test_coil_fields_smooth_and_in_range(ph):
    s, g = ph.sensitivity[ph.head_mask], ph.fa_scale[ph.head_mask]
    assert 0.7 < s.min() and s.max() < 1.3 and s.max() - s.min() > 0.15
    assert 0.85 < g.min() and g.max() < 1.15 and g.max() - g.min() > 0.05
    for field in (ph.sensitivity, ph.fa_scale):  # smooth: small neighbour differences
        assert np.abs(np.diff(field, axis=0)).max() < 0.05
        assert np.abs(np.diff(field, axis=2)).max() < 0.05


# --------------------------------------------------------------------------------------
# Signal equations (noise-free, pure voxels)
# --------------------------------------------------------------------------------------

LAYOUT = ["gm", "wm", "csf", "nonbrain"] * 4  # 16 slices of the small phantom


def _m0(ph, tissue):
    return {"nonbrain": 0.75 * ph.m0a}.get(tissue, PC.get(tissue, 0) * ph.m0a)


def test_longtr_and_body_coil_match_hand_formula(small):
    ph = _pure(small, LAYOUT)
    tr, te = 2.5, 13.0
    for t2star, t2tab in ((False, T2), (True, T2STAR)):
        data, truth = longtr_calibration(ph, tr=tr, te=te, t2star=t2star, dtype=np.float64)
        ref, _ = body_coil_reference(ph, tr=tr, te=te, t2star=t2star, dtype=np.float64)
        for z, tissue in enumerate(LAYOUT):
            expect = (
                _m0(ph, tissue)
                * (1 - math.exp(-tr / T1[tissue]))
                * math.exp(-te / t2tab[tissue])
            )
            np.testing.assert_allclose(ref[:, :, z], expect, rtol=1e-12)
            np.testing.assert_allclose(data[:, :, z], expect * ph.sensitivity[:, :, z], rtol=1e-12)
        assert truth["sigma"] is None and np.array_equal(truth["clean"], data)
    f32, _ = longtr_calibration(ph)
    assert f32.dtype == np.float32


def test_satrecov_matches_hand_formula(small):
    ph = _pure(small, LAYOUT)
    tis = [0.25, 0.8, 1.6, 3.0]
    a = np.full(ph.shape, 0.9)
    a[:, :16] = 1.1  # a map, two values
    data, truth = satrecov_series(ph, tis, repeats=3, a=a, slicedt=0.04, dtype=np.float64)
    assert data.shape == ph.shape + (12,)
    for v in range(12):
        ti = tis[v // 3]  # TI slowest, repeat fastest
        for z, tissue in enumerate(LAYOUT):
            ti_z = ti + 0.04 * z
            recovery = 1 - a[:, :, z] * np.exp(-ti_z / T1[tissue])
            expect = _m0(ph, tissue) * ph.sensitivity[:, :, z] * recovery
            np.testing.assert_allclose(data[:, :, z, v], expect, rtol=1e-12)
    np.testing.assert_array_equal(truth["ti_per_volume"], np.repeat(tis, 3))


def test_recovery_series_decay_with_each_tissues_t2_at_the_echo_time(small):
    """te (ms): every readout of a pure tissue times exp(-TE/T2 of that tissue) (calibration.md
    section 3's T2s), in both recovery-series generators; the truth's m0t too."""
    ph = _pure(small, LAYOUT)
    te = 12.0
    for make in (lambda **kw: satrecov_series(ph, [0.5, 1.0, 2.0], dtype=np.float64, **kw),
                 lambda **kw: look_locker_series(ph, ti1=0.1, dt=0.3, n_ti=4, fa=35.0, lfa=11.7,
                                                 dtype=np.float64, **kw)):
        base, base_truth = make()
        echo, truth = make(te=te)
        for z, tissue in enumerate(LAYOUT):
            decay = math.exp(-te / T2[tissue])
            np.testing.assert_allclose(echo[:, :, z], base[:, :, z] * decay, rtol=1e-12)
            np.testing.assert_allclose(truth["m0t"][tissue], base_truth["m0t"][tissue] * decay, rtol=1e-12)
        assert truth["te"] == te


def _ll_closed_form(m0, sens, t1, a, ti1, dt, n_ti, theta, theta_high, q_low):
    """calibration.md 7.1: S(TI) = M0t q [r + (1 - A exp(-TI1/T1) - r) exp(-(TI - TI1)/T1app)]."""
    e = math.exp(-dt / t1)
    t1app = 1.0 / (1.0 / t1 - np.log(np.cos(theta)) / dt)
    r = (1 - e) / (1 - np.cos(theta) * e)
    m0t = m0 * np.sin(theta_high) * sens
    q = np.sin(theta) / np.sin(theta_high) if q_low else 1.0
    out = []
    for k in range(n_ti):
        ti = ti1 + k * dt
        out.append(m0t * q * (r + (1 - a * np.exp(-ti1 / t1) - r) * np.exp(-(ti - ti1) / t1app)))
    return np.stack(out, axis=-1)


@pytest.mark.parametrize("g_value", [0.85, 1.15, "map"])
def test_look_locker_matches_closed_form(small, g_value):
    ph = _pure(small, LAYOUT)
    if g_value == "map":
        g = np.broadcast_to(np.linspace(0.86, 1.14, ph.shape[0])[:, None, None], ph.shape).copy()
    else:
        g = np.full(ph.shape, g_value)
    ph = dataclasses.replace(ph, fa_scale=g)
    ti1, dt, n_ti, fa, lfa, a = 0.1, 0.3, 11, 35.0, 11.7, 0.93
    nphases, repeats = 2, 2
    data, truth = look_locker_series(
        ph, ti1=ti1, dt=dt, n_ti=n_ti, fa=fa, lfa=lfa, nphases=nphases, repeats=repeats, a=a,
        dtype=np.float64,
    )
    assert data.shape == ph.shape + (n_ti * repeats * (nphases + 1),)
    th_high = g * math.radians(fa)
    th_low = (g + 0.023) * math.radians(lfa)
    for z, tissue in enumerate(LAYOUT):
        args = (_m0(ph, tissue), ph.sensitivity[:, :, z], T1[tissue], a, ti1, dt, n_ti)
        high = _ll_closed_form(*args, th_high[:, :, z], th_high[:, :, z], q_low=False)
        low = _ll_closed_form(*args, th_low[:, :, z], th_high[:, :, z], q_low=True)
        for p in range(nphases + 1):  # phase slowest, then TI, repeat fastest
            expect = low if p == nphases else high
            for k in range(n_ti):
                for rep in range(repeats):
                    v = (p * n_ti + k) * repeats + rep
                    np.testing.assert_allclose(data[:, :, z, v], expect[..., k], rtol=1e-6)
        np.testing.assert_allclose(
            truth["m0t"][tissue][:, :, z],
            _m0(ph, tissue) * np.sin(g[:, :, z] * math.radians(fa)) * ph.sensitivity[:, :, z],
            rtol=1e-12,
        )
    assert truth["t1"]["csf"] == 4.3 and np.array_equal(truth["g"], g) and truth["a"] == a
    np.testing.assert_allclose(truth["tis"], ti1 + dt * np.arange(n_ti))
    assert truth["phase_per_volume"].tolist() == sorted([0, 1, 2] * (n_ti * repeats))


def test_look_locker_slice_timing_and_lfa_offset(small):
    ph = _pure(small, LAYOUT)
    g = np.full(ph.shape, 1.07)
    ph = dataclasses.replace(ph, fa_scale=g)
    data, _ = look_locker_series(
        ph, ti1=0.05, dt=0.25, n_ti=6, fa=40.0, lfa=10.0, a=1.0, lfa_offset=0.05,
        slicedt=0.03, sliceband=4, dtype=np.float64,
    )
    th_high, th_low = 1.07 * math.radians(40.0), (1.07 + 0.05) * math.radians(10.0)
    for z, tissue in enumerate(LAYOUT):
        ti1_z = 0.05 + 0.03 * (z % 4)
        args = (_m0(ph, tissue), ph.sensitivity[:, :, z], T1[tissue], 1.0, ti1_z, 0.25, 6)
        high = _ll_closed_form(*args, np.full(g.shape[:2], th_high), th_high, q_low=False)
        low = _ll_closed_form(*args, np.full(g.shape[:2], th_low), th_high, q_low=True)
        np.testing.assert_allclose(data[:, :, z, :6], high, rtol=1e-6)
        np.testing.assert_allclose(data[:, :, z, 6:], low, rtol=1e-6)


def test_perfusion_inverts_the_calibration_equation(ph):
    data, truth = perfusion_image(ph, alpha=0.85, dtype=np.float64)
    # calibration.md 9: CBF = 6000 * perf / (s * M0a * alpha)
    cbf = 6000.0 * data / (ph.sensitivity * 1200.0 * 0.85)
    np.testing.assert_allclose(cbf, ph.cbf, rtol=1e-12, atol=1e-12)
    assert truth["cbf_gm"] == 60.0 and truth["cbf_wm"] == 20.0


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def test_gaussian_noise_sigma_matches_definition(ph):
    snr = 25.0
    # sigma = M0_gm * (pv_gm-weighted mean sensitivity) / snr, M0_gm = 0.98 * 1200.
    w = ph.pv["gm"]
    sigma = 0.98 * 1200.0 * (w * ph.sensitivity).sum() / w.sum() / snr
    data, truth = satrecov_series(
        ph, [1.0, 2.0, 3.0], repeats=4, snr=snr, noise="gaussian", dtype=np.float64
    )
    assert truth["sigma"] == pytest.approx(sigma, rel=1e-12)
    resid = (data - truth["clean"])[ph.brain_mask]
    assert abs(resid.std() / sigma - 1) < 0.05
    assert abs(resid.mean()) < 0.05 * sigma
    # Body-coil reference: flat coil, sigma = M0_gm / snr.
    _, t_ref = body_coil_reference(ph, snr=snr, noise="gaussian")
    assert t_ref["sigma"] == pytest.approx(0.98 * 1200.0 / snr, rel=1e-12)
    # Perfusion: the reference is the GM perfusion signal.
    _, t_perf = perfusion_image(ph, snr=5.0)
    expect = 60.0 * 1200.0 * 0.85 / 6000.0 * (w * ph.sensitivity).sum() / w.sum() / 5.0
    assert t_perf["sigma"] == pytest.approx(expect, rel=1e-12)


def test_rician_noise_is_non_negative_and_unbiased_at_high_snr(ph):
    data, truth = longtr_calibration(ph, snr=100.0, noise="rician")
    assert data.min() >= 0
    air = sum(ph.pv.values()) == 0
    assert air.any() and np.all(data[air] >= 0) and data[air].mean() > 0  # Rayleigh floor
    bright = truth["clean"] > 20 * truth["sigma"]
    assert bright.sum() > 5000
    resid = data[bright] - truth["clean"][bright]
    assert abs(resid.std() / truth["sigma"] - 1) < 0.05


def test_input_errors(small):
    with pytest.raises(InputError, match="snr"):
        longtr_calibration(small, snr=10, sigma=3)
    with pytest.raises(InputError, match="noise"):
        longtr_calibration(small, snr=10, noise="poisson")
    with pytest.raises(InputError, match="fa"):
        look_locker_series(small, ti1=0.1, dt=0.3, n_ti=3, fa=95.0)
    with pytest.raises(InputError, match="dt"):
        look_locker_series(small, ti1=0.1, dt=0.0, n_ti=3, fa=30.0)
    with pytest.raises(InputError, match="a: map"):
        satrecov_series(small, [1.0], a=np.ones((3, 3, 3)))
    with pytest.raises(InputError, match="tis"):
        satrecov_series(small, [])
    with pytest.raises(InputError, match="dtype"):
        longtr_calibration(small, dtype=np.int16)
    with pytest.raises(InputError, match="shape"):
        make_phantom(shape=(64, 64))
    with pytest.raises(InputError, match="struct_pose"):
        make_phantom(struct_pose="wobbly", **SMALL)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def test_write_dataset_round_trip(tmp_path, small):
    files = write_dataset(small, tmp_path / "demo", snr=40.0)
    out = tmp_path / "demo"
    expected_names = [
        "calib.nii.gz", "calib.json", "cref.nii.gz", "satrecov.nii.gz", "calib_ll.nii.gz",
        "calib_ll.json", "perfusion.nii.gz", "struct.nii.gz", "struct_brain.nii.gz",
        "struct_labels.nii.gz", "asl2struct.mat", "phantom.json", "truth/ventricle_mask.nii.gz",
        "truth/pv_gm.nii.gz", "truth/sensitivity.nii.gz",
    ]
    for name in expected_names:
        assert (out / name).is_file(), name
    assert all(p.is_file() for p in files.values())

    calib, _ = longtr_calibration(small, snr=40.0)
    img = nib.load(out / "calib.nii.gz")
    np.testing.assert_allclose(img.affine, small.affine, atol=1e-5)
    assert np.array_equal(np.asarray(img.dataobj), calib)
    ll, ll_truth = look_locker_series(
        small, ti1=0.1, dt=0.3, n_ti=12, fa=35.0, lfa=11.7, nphases=3, snr=40.0
    )
    assert np.array_equal(np.asarray(nib.load(out / "calib_ll.nii.gz").dataobj), ll)
    side = json.loads((out / "calib_ll.json").read_text())
    assert (side["fa"], side["lfa"], side["nphases"], side["n_ti"]) == (35.0, 11.7, 3, 12)
    assert side["sigma"] == pytest.approx(ll_truth["sigma"]) and side["m0a"] == 1200.0
    assert "m0t" in side["maps_not_in_sidecar"]

    mask = np.asarray(nib.load(out / "truth" / "ventricle_mask.nii.gz").dataobj)
    assert np.array_equal(mask.astype(bool), small.ventricle_mask)
    pv_gm = np.asarray(nib.load(out / "truth" / "pv_gm.nii.gz").dataobj)
    np.testing.assert_allclose(pv_gm, small.pv["gm"], atol=1e-6)
    st = nib.load(out / "struct.nii.gz")
    np.testing.assert_allclose(st.affine, small.structural.affine, atol=1e-5)
    assert np.array_equal(np.asarray(st.dataobj), small.structural.t1w)
    labels = np.asarray(nib.load(out / "struct_labels.nii.gz").dataobj)
    assert np.array_equal(labels, small.structural.labels)
    mat = np.loadtxt(out / "asl2struct.mat")
    np.testing.assert_allclose(mat, small.structural.asl2struct, atol=1e-8)
    record = json.loads((out / "phantom.json").read_text())
    assert record["m0a"] == 1200.0 and record["seed"] == 7


def test_generator_write_argument(tmp_path, small):
    dest = tmp_path / "sub" / "sr.nii"
    data, _ = satrecov_series(small, [0.5, 2.0], repeats=2, write=dest, dtype=np.float64)
    img = nib.load(tmp_path / "sub" / "sr.nii")
    assert img.shape == small.shape + (4,)
    assert np.array_equal(np.asarray(img.dataobj), data)
    side = json.loads((tmp_path / "sub" / "sr.json").read_text())
    assert side["tis"] == [0.5, 2.0] and side["repeats"] == 2
    assert side["generator"] == "satrecov_series"
    with pytest.raises(InputError):
        longtr_calibration(small, write=tmp_path / "bad.txt")
