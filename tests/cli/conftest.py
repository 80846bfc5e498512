"""Fixtures of the console-command tests: the phantom data set (written once per session),
small synthetic NIfTI images, and the one-line error contract of the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from aslcal.cli import main
from aslcal.testing.phantoms import DEFAULT_LOOK_LOCKER, make_phantom, write_dataset


def save_nifti(path: Path, data, affine, dtype=np.float32) -> Path:
    """Write ``data`` as a NIfTI-1 image with nibabel (not aslcal's writer)."""
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), np.asarray(affine, float)), str(path))
    return Path(path)


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    @property
    def m0(self) -> float:
        """The value of the single stdout line ``M0: <value>``."""
        lines = self.out.splitlines()
        assert len(lines) == 1, self.out
        key, _, value = lines[0].partition(": ")
        assert key == "M0", lines[0]
        return float(value)


@pytest.fixture
def cli(capsys):
    """Run ``aslcal.cli.main(argv)`` in-process; return rc, stdout and stderr."""

    def run(*argv) -> CliResult:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        cap = capsys.readouterr()
        return CliResult(rc, cap.out, cap.err)

    return run


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def bad_input(cli):
    """Assert the bad-input contract: exit 2, exactly one stderr line ``aslcal: error: ...``,
    no traceback, and nothing created, changed or removed under ``root`` (so no output
    file, no temporary file, no --outdir left behind, existing files untouched).
    Returns the error line."""

    def check(argv, root: Path, *, outputs=()) -> str:
        root = Path(root)
        before = _snapshot(root)
        res = cli(*argv)
        assert res.rc == 2, (res.out, res.err)
        assert "Traceback" not in res.err and "Traceback" not in res.out
        lines = res.err.splitlines()
        assert len(lines) == 1, res.err
        assert lines[0].startswith("aslcal: error: "), lines[0]
        assert res.out == "", res.out
        for p in outputs:
            p = Path(p)
            assert str(p.relative_to(root)) in before or not p.exists(), f"{p} was created"
        after = _snapshot(root)
        assert after == before, (
            f"files changed: created {sorted(set(after) - set(before))}, "
            f"removed {sorted(set(before) - set(after))}, "
            f"modified {sorted(k for k in set(before) & set(after) if before[k] != after[k])}"
        )
        return lines[0]

    return check


# ------------------------------------------------------------------------------------------
# The phantom data set (noise free), written once per session
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def phantom_ds(tmp_path_factory):
    """The default phantom (seed 0) written by ``write_dataset`` (noise free), plus a PURE
    reference mask (``ventricle_pv >= 0.99``) in the phantom's ASL space."""
    ph = make_phantom(seed=0)
    root = tmp_path_factory.mktemp("phantom")
    files = write_dataset(ph, root)
    pure_vent = ph.ventricle_pv >= 0.99
    save_nifti(root / "pure_ventricle_mask.nii.gz", pure_vent, ph.affine, np.uint8)
    ll = DEFAULT_LOOK_LOCKER
    tis = [round(ll["ti1"] + k * ll["dt"], 10) for k in range(ll["n_ti"])]
    ll_args = [
        "--mode", "satrecov", "--tis", ",".join(f"{t:g}" for t in tis), "--fa", f"{ll['fa']:g}",
        "--lfa", f"{ll['lfa']:g}", "--nphases", str(ll["nphases"]),
    ]
    return SimpleNamespace(
        ph=ph, root=root, files=files, pure_vent=pure_vent,
        pure_vent_path=root / "pure_ventricle_mask.nii.gz", tis=tis, ll_args=ll_args,
    )


# ------------------------------------------------------------------------------------------
# Small synthetic images (longtr formulas and error cases)
# ------------------------------------------------------------------------------------------

#: A voxel grid of 2 x 2.5 x 3 mm, not at the origin.
SYN_AFFINE = np.array(
    [[2.0, 0.0, 0.0, -10.0], [0.0, 2.5, 0.0, -12.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]]
)
SYN_SHAPE = (10, 9, 6)


@pytest.fixture
def syn(tmp_path):
    """Synthetic calibration image, reference mask, sensitivity, perfusion and brain mask.

    The folder ``tmp_path/data`` holds the inputs; outputs of a test go to ``tmp_path``.
    """
    rng = np.random.default_rng(7)
    data = tmp_path / "data"
    data.mkdir()
    calib = rng.uniform(200.0, 900.0, SYN_SHAPE).astype(np.float32)
    mask = np.zeros(SYN_SHAPE, bool)
    mask[3:7, 2:6, 2:4] = True                      # 32 voxels
    mask[3, 2, 2] = mask[6, 5, 3] = False           # irregular: 30 voxels
    brain = np.zeros(SYN_SHAPE, bool)
    brain[1:9, 1:8, 1:5] = True
    sens = rng.uniform(0.7, 1.3, SYN_SHAPE).astype(np.float32)
    perf = rng.uniform(1.0, 10.0, SYN_SHAPE).astype(np.float32)
    ns = SimpleNamespace(
        root=tmp_path, data=data, calib=calib, mask=mask, brain=brain, sens=sens, perf=perf,
        affine=SYN_AFFINE,
        calib_path=save_nifti(data / "calib.nii.gz", calib, SYN_AFFINE),
        mask_path=save_nifti(data / "mask.nii.gz", mask, SYN_AFFINE, np.uint8),
        brain_path=save_nifti(data / "brain.nii.gz", brain, SYN_AFFINE, np.uint8),
        sens_path=save_nifti(data / "sens.nii.gz", sens, SYN_AFFINE),
        perf_path=save_nifti(data / "perf.nii.gz", perf, SYN_AFFINE),
    )
    return ns
