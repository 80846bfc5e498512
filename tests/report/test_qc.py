"""QC figure (aslcal.report.qc_figure): a PNG written atomically, or nothing at all."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from aslcal.errors import AslcalError, InputError
from aslcal.masks.brainmask import brain_mask_from_calib
from aslcal.report import ReportUnavailableError, qc_figure
from aslcal.testing.phantoms import longtr_calibration, make_phantom

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    ph = make_phantom(seed=0, struct_voxel_size=(2.5, 2.5, 2.5), struct_oversample=1)
    calib, _ = longtr_calibration(ph, snr=50)
    return ph, calib


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path, format="png")


def test_png_is_written(tmp_path, data):
    ph, calib = data
    dest = tmp_path / "qc.png"
    t0 = time.perf_counter()
    out = qc_figure(dest, calib, refmask=ph.ventricle_mask, brain_mask=ph.brain_mask, title="phantom")
    print(f"\nqc_figure: {time.perf_counter() - t0:.2f} s")
    assert out == dest
    img = _read_png(dest)
    # 6 slices -> 2 rows of 3 panels, 3 inches each at 100 dpi (+ title and legend)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[1] == 900
    assert 600 < img.shape[0] < 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc.png"]  # no temporary file left
    # the outline colours are drawn (red of the reference mask, cyan of the brain mask)
    rgb = img[..., :3]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.4) & (rgb[..., 2] < 0.4)
    cyan = (rgb[..., 0] < 0.2) & (rgb[..., 1] > 0.6) & (rgb[..., 2] > 0.9)
    assert red.sum() > 50 and cyan.sum() > 500


def test_series_slices_and_result_objects(tmp_path, data):
    ph, calib = data
    series = np.stack([calib, calib * 1.1], axis=-1)
    bm = brain_mask_from_calib(calib, voxel_size=ph.voxel_size)
    dest = tmp_path / "qc2.png"
    qc_figure(dest, series, brain_mask=bm, slices=[5, 12], dpi=50)
    img = _read_png(dest)
    assert img.shape[1] == 375  # 2 panels of 3 inches, widened to 7.5 inches for the title and legend, at 50 dpi
    qc_figure(dest, calib)  # no masks at all; overwrites
    _read_png(dest)


def test_nothing_left_behind_on_failure(tmp_path, data, monkeypatch):
    ph, calib = data
    dest = tmp_path / "qc.png"
    dest.write_bytes(b"old")
    import matplotlib.figure

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(PNG_SIGNATURE + b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        qc_figure(dest, calib, brain_mask=ph.brain_mask)
    assert dest.read_bytes() == b"old"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc.png"]


def test_bad_destination_and_input(tmp_path, data):
    ph, calib = data
    with pytest.raises(InputError):
        qc_figure(tmp_path / "missing" / "qc.png", calib)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "keep.png").write_bytes(b"keep")
    with pytest.raises(InputError):
        qc_figure(tmp_path / "keep.png", calib, overwrite=False)
    assert (tmp_path / "keep.png").read_bytes() == b"keep"
    with pytest.raises(InputError, match="refmask: shape"):
        qc_figure(tmp_path / "x.png", calib, refmask=ph.brain_mask[:-1])
    with pytest.raises(InputError, match="slices"):
        qc_figure(tmp_path / "x.png", calib, slices=[0, 99])
    with pytest.raises(InputError, match="calib"):
        qc_figure(tmp_path / "x.png", calib[..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_without_matplotlib(tmp_path, data, monkeypatch):
    _, calib = data
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.lines"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now fails
    with pytest.raises(ReportUnavailableError, match=r"pip install 'aslcal\[report\]'") as info:
        qc_figure(tmp_path / "qc.png", calib)
    assert isinstance(info.value, ImportError) and isinstance(info.value, AslcalError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_cupy_input(tmp_path, data):
    cp = pytest.importorskip("cupy")
    pytest.importorskip("matplotlib")  # the report extra: not on every GPU machine
    ph, calib = data
    dest = tmp_path / "qc.png"
    qc_figure(dest, cp.asarray(calib), refmask=cp.asarray(ph.ventricle_mask), brain_mask=cp.asarray(ph.brain_mask))
    _read_png(dest)
