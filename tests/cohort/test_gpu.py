"""aslcal cohort with GPU fitting: the same M0a and maps as the CPU run.

Run with ``pytest -m gpu`` on a machine with a GPU and CuPy; deselected by default.
"""

from __future__ import annotations

import numpy as np
import pytest

from aslcal.cohort import CohortOptions, run_cohort
from aslcal.io import load_image
from aslcal.io.derivatives import DerivativesWriter
from aslcal.testing.bids import make_bids_cohort

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    pytest.importorskip("cupy")
    return make_bids_cohort(tmp_path_factory.mktemp("bids"), n_subjects=12, seed=3, broken=2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cuda_cohort_matches_truth_and_cpu(cohort, tmp_path, dtype):
    masks = str(cohort.root / "derivatives" / "refmasks")
    gpu = run_cohort(cohort.root, tmp_path / "gpu", batch_size=6,
                     options=CohortOptions(ref_masks=masks, backend="cuda", dtype=dtype))
    cpu = run_cohort(cohort.root, tmp_path / "cpu", batch_size=6,
                     options=CohortOptions(ref_masks=masks, backend="numba", dtype=dtype))
    assert sorted(gpu.done) == sorted(cohort.good) == sorted(cpu.done)
    assert {launch["backend"] for launch in gpu.launches} == {"cuda"}
    rtol = 1e-4 if dtype == "float32" else 1e-7
    for name, report in (("gpu", gpu), ("cpu", cpu)):
        writer = DerivativesWriter(tmp_path / name)
        for key, truth in cohort.good.items():
            import json

            summary = json.loads(writer.subject_paths(key)["summary"].read_text())
            assert summary["M0a"] == pytest.approx(truth.m0a_te, rel=max(rtol, 1e-5)), (name, key)
    g, c = DerivativesWriter(tmp_path / "gpu"), DerivativesWriter(tmp_path / "cpu")
    for key in cohort.good:
        for out in ("cbf", "t1", "facorr"):
            pg, pc = g.subject_paths(key)[out], c.subject_paths(key)[out]
            if pc.exists():
                a, b = load_image(pg).data, load_image(pc).data
                np.testing.assert_allclose(a, b, rtol=10 * rtol, atol=1e-3 if dtype == "float32" else 1e-6)


def test_cuda_cohort_whitepaper_and_tissue_t1(tmp_path):
    """GPU fitting with --quantification whitepaper and --anat (tissue T1 means on the
    device): the CPU run's CBF maps and summaries."""
    import json

    from aslcal.testing.bids import ANAT_DIR

    pytest.importorskip("cupy")
    truth = make_bids_cohort(tmp_path / "bids", n_subjects=5, seed=4, shape=(64, 64, 24), broken=0,
                             anat=True, ref_masks=False, kinetics="whitepaper", slicedt=0.04,
                             phantom_options={"struct_voxel_size": (1.7, 1.7, 1.7), "struct_oversample": 1})
    runs = {}
    for backend in ("cuda", "numba"):
        opts = CohortOptions(anat=str(truth.root / ANAT_DIR), quantification="whitepaper", backend=backend,
                             dtype="float64")
        report = run_cohort(truth.root, tmp_path / backend, options=opts)
        assert report.exit_code == 0, report.failed
        runs[backend] = DerivativesWriter(tmp_path / backend)
    for key in truth.runs:
        g, c = runs["cuda"].subject_paths(key), runs["numba"].subject_paths(key)
        np.testing.assert_allclose(load_image(g["cbf"]).data, load_image(c["cbf"]).data, rtol=1e-6, atol=1e-6)
        sg, sc = (json.loads(p["summary"].read_text()) for p in (g, c))
        for name, value in sc.items():
            if name.startswith("T1_mean_") and value is not None:
                assert sg[name] == pytest.approx(value, rel=1e-6), (key, name)
