"""BIDS derivatives writer: names, all-or-nothing subjects, completion markers, summary TSV."""

from __future__ import annotations

import hashlib
import json

import nibabel
import numpy as np
import pytest

import aslcal
from aslcal.errors import InputError
from aslcal.io import derivatives as deriv
from aslcal.io.derivatives import (
    DerivativesWriter,
    entities_from_key,
    subject_key,
    write_summary_tsv,
)

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _images(seed=0):
    rng = np.random.default_rng(seed)
    shape = (4, 5, 3)
    return {
        "m0": (rng.uniform(100, 200, shape), AFFINE),
        "t1": (rng.uniform(0.5, 2.0, shape), AFFINE, None),
        "facorr": (np.full(shape, 0.95), AFFINE),
        "cbf": (rng.uniform(0, 80, shape), AFFINE),
        "ref_mask": (rng.uniform(size=shape) > 0.5, AFFINE),
        "brain_mask": (np.ones(shape, bool), AFFINE),
    }


def _write(writer, key="sub-01_ses-1_run-1", seed=0):
    return writer.write_subject(
        key, _images(seed), {"summary": {"M0a": 1234.5}, "m0": {"Sources": ["bids:raw:x"]}},
        {"aslcal": "test", "seed": seed},
    )


@pytest.fixture
def writer(tmp_path):
    return DerivativesWriter(tmp_path / "out")


# --------------------------------------------------------------------- dataset level


def test_dataset_description(tmp_path):
    w = DerivativesWriter(tmp_path / "out", code_url="https://example.org/aslcal",
                          source_datasets=[{"URL": "file:///bids"}])
    assert w.root == tmp_path / "out" / "derivatives" / "aslcal"
    desc = json.loads((w.root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["BIDSVersion"] == deriv.BIDS_VERSION
    assert desc["Name"]
    assert desc["GeneratedBy"] == [
        {"Name": "aslcal", "Version": aslcal.__version__, "CodeURL": "https://example.org/aslcal"}
    ]
    assert desc["SourceDatasets"] == [{"URL": "file:///bids"}]


def test_description_written_once_and_compatibility(tmp_path):
    w = DerivativesWriter(tmp_path / "out")
    path = w.description_path
    before = path.stat().st_mtime_ns, path.read_text()
    DerivativesWriter(tmp_path / "out")  # same pipeline and version: accepted, untouched
    assert (path.stat().st_mtime_ns, path.read_text()) == before

    with pytest.raises(InputError, match="another version|overwrite=True"):
        DerivativesWriter(tmp_path / "out", version="9.9")
    w2 = DerivativesWriter(tmp_path / "out", version="9.9", overwrite=True)
    assert json.loads(path.read_text())["GeneratedBy"][0]["Version"] == "9.9"
    assert w2.version == "9.9"


@pytest.mark.parametrize(
    "content, match",
    [
        ({"Name": "raw", "BIDSVersion": "1.9.0"}, "DatasetType"),
        ({"DatasetType": "derivative", "GeneratedBy": [{"Name": "fmriprep", "Version": "1"}]},
         "another pipeline"),
        ("{not json", "JSON"),
    ],
)
def test_incompatible_description_refused_even_with_overwrite(tmp_path, content, match):
    root = tmp_path / "out" / "derivatives" / "aslcal"
    root.mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (root / "dataset_description.json").write_text(text)
    for overwrite in (False, True):
        with pytest.raises(InputError, match=match):
            DerivativesWriter(tmp_path / "out", overwrite=overwrite)
    assert (root / "dataset_description.json").read_text() == text


def test_out_root_parent_must_exist(tmp_path):
    with pytest.raises(InputError, match="parent folder"):
        DerivativesWriter(tmp_path / "missing" / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        DerivativesWriter(tmp_path / "file")


# --------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "entities, folder, prefix",
    [
        ({"sub": "01"}, "sub-01/perf", "sub-01"),
        ({"sub": "01", "ses": "pre"}, "sub-01/ses-pre/perf", "sub-01_ses-pre"),
        ({"sub": "01", "run": 2}, "sub-01/perf", "sub-01_run-2"),
        ({"run": "3", "ses": "1", "sub": "sub-ab12"}, "sub-ab12/ses-1/perf", "sub-ab12_ses-1_run-3"),
        ({"sub": "7", "acq": "pcasl", "ses": None}, "sub-7/perf", "sub-7_acq-pcasl"),
    ],
)
def test_subject_paths(writer, entities, folder, prefix):
    paths = writer.subject_paths(entities)
    base = writer.root / folder
    expected = {
        "m0": f"{prefix}_desc-M0_M0map.nii.gz",
        "m0_json": f"{prefix}_desc-M0_M0map.json",
        "t1": f"{prefix}_desc-T1_T1map.nii.gz",
        "facorr": f"{prefix}_desc-facorr_TB1map.nii.gz",
        "cbf": f"{prefix}_desc-cbf_cbf.nii.gz",
        "cbf_json": f"{prefix}_desc-cbf_cbf.json",
        "ref_mask": f"{prefix}_desc-ref_mask.nii.gz",
        "brain_mask": f"{prefix}_desc-brain_mask.nii.gz",
        "provenance": f"{prefix}_desc-aslcal_provenance.json",
        "summary": f"{prefix}_desc-aslcal_summary.json",
        "complete": f"{prefix}_desc-aslcal_complete.json",
    }
    for name, fname in expected.items():
        assert paths[name] == base / fname, name
    assert len(set(paths.values())) == len(paths)
    assert subject_key(entities) == prefix
    assert subject_key(prefix) == prefix
    assert subject_key(entities_from_key(prefix)) == prefix


@pytest.mark.parametrize(
    "entities",
    [{}, {"ses": "1"}, {"sub": "0_1"}, {"sub": "01", "run": "x"}, {"sub": "01", "task": "rest"},
     {"sub": "a-b"}, {"sub": 1.5}, "sub-01_sub-02", "ses-1_sub-01", "sub01", ""],
)
def test_bad_entities(writer, entities):
    with pytest.raises(InputError):
        writer.subject_paths(entities)


# --------------------------------------------------------------------- writing a subject


def test_write_subject_contents_and_marker(writer):
    images = _images()
    written = _write(writer)
    paths = writer.subject_paths("sub-01_ses-1_run-1")
    for name in ("m0", "t1", "facorr", "cbf", "ref_mask", "brain_mask"):
        assert written[name] == paths[name]
        img = nibabel.load(paths[name])
        np.testing.assert_allclose(img.affine, AFFINE)
        # float32 on disk: relative tolerance of single precision
        np.testing.assert_allclose(np.asarray(img.dataobj), images[name][0], rtol=1e-6)
        sidecar = json.loads(paths[f"{name}_json"].read_text())
        if name.endswith("mask"):  # BIDS masks: a Type, no units
            assert "Units" not in sidecar and sidecar["Type"] == {"ref_mask": "ROI", "brain_mask": "Brain"}[name]
        else:
            assert sidecar["Units"] == deriv.IMAGE_OUTPUTS[name][2]
    assert nibabel.load(paths["ref_mask"]).get_data_dtype() == np.uint8
    assert json.loads(paths["m0_json"].read_text())["Sources"] == ["bids:raw:x"]
    assert json.loads(paths["summary"].read_text()) == {"M0a": 1234.5}
    assert json.loads(paths["provenance"].read_text()) == {"aslcal": "test", "seed": 0}

    marker = json.loads(paths["complete"].read_text())
    files = {p.name for n, p in written.items() if n != "complete"}
    assert set(marker["files"]) == files
    for fname, info in marker["files"].items():
        data = (paths["m0"].parent / fname).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert writer.is_complete({"sub": "01", "ses": "1", "run": "1"})
    assert writer.status("sub-01_ses-1_run-1") == "complete"
    assert not [p for p in paths["m0"].parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("case", "expected"), [
    ("zero outside a 3-D mask", True),
    ("zero outside an (x, y, z, 1) mask", True),
    ("NaN outside the mask", False),
    ("non-zero outside the mask", False),
    ("no brain mask", False),
    ("map on another grid", False),
])
def test_maps_say_skullstripped_when_zero_outside_the_brain_mask(tmp_path, case, expected):
    """BIDS ImageDerivatives require SkullStripped on every map: true exactly when the map
    is zero outside the brain mask written with it; a mask of another grid, or none, cannot
    tell (a map on another grid raised an IndexError)."""
    brain = np.zeros((4, 4, 4), np.uint8)
    brain[1:3, 1:3, 1:3] = 1
    cbf = np.where(brain > 0, 50.0, 0.0).astype(np.float32)
    images = {"cbf": (cbf, AFFINE), "brain_mask": (brain, AFFINE)}
    if case == "zero outside an (x, y, z, 1) mask":
        images["brain_mask"] = (brain[..., None], AFFINE)
    elif case == "NaN outside the mask":
        images["cbf"] = (np.where(brain > 0, 50.0, np.nan).astype(np.float32), AFFINE)
    elif case == "non-zero outside the mask":
        images["cbf"] = (cbf + 1.0, AFFINE)
    elif case == "no brain mask":
        del images["brain_mask"]
    elif case == "map on another grid":
        images["cbf"] = (np.zeros((5, 5, 5), np.float32), AFFINE)
    paths = DerivativesWriter(tmp_path / "d").write_subject({"sub": "01"}, images)
    assert json.loads(paths["cbf_json"].read_text())["SkullStripped"] is expected


def test_failing_writer_leaves_nothing(writer, monkeypatch):
    calls = []
    real = deriv.OutputSet.write_bytes

    def flaky(self, dest, payload):
        calls.append(dest)
        if len(calls) == 3:  # the disk fills up half-way through the third file
            self.path(dest).write_bytes(payload[: len(payload) // 2])
            raise OSError("disk full (injected)")
        return real(self, dest, payload)

    monkeypatch.setattr(deriv.OutputSet, "write_bytes", flaky)
    with pytest.raises(OSError, match="injected"):
        _write(writer)
    assert len(calls) == 3
    folder = writer.subject_dir("sub-01_ses-1_run-1")
    assert list(folder.iterdir()) == []  # no file, no temporary file, no marker
    assert writer.status("sub-01_ses-1_run-1") == "absent"


def test_incomplete_states(writer):
    key = "sub-01_ses-1_run-1"
    written = _write(writer)
    paths = writer.subject_paths(key)

    # corrupt one file (same size: only the checksum can tell)
    data = bytearray(paths["cbf"].read_bytes())
    data[-1] ^= 0xFF
    paths["cbf"].write_bytes(bytes(data))
    assert not writer.is_complete(key)
    assert writer.is_complete(key, check="size")
    assert writer.status(key) == "partial"

    _write(DerivativesWriter(writer.out_root, overwrite=True))
    assert writer.is_complete(key)
    paths["t1_json"].unlink()  # one file missing
    assert not writer.is_complete(key)

    _write(DerivativesWriter(writer.out_root, overwrite=True))
    leftover = paths["m0"].parent / f".{key}_desc-T1_T1map.tmp-0123abcd.nii.gz"
    leftover.write_bytes(b"half")  # a killed writer's temporary file
    assert not writer.is_complete(key)
    leftover.unlink()
    assert writer.is_complete(key)

    for name, path in written.items():  # only the marker left
        if name != "complete":
            path.unlink()
    assert not writer.is_complete(key)
    assert writer.status(key) == "partial"

    paths["complete"].write_text("{trunc")
    assert not writer.is_complete(key)


def test_remove_partial(writer):
    key = "sub-02_ses-1"
    other = "sub-02_ses-1_run-1"  # shares the folder and the name start
    _write(writer, key)
    _write(writer, other)
    writer.marker_path(key).unlink()  # killed between the outputs and the marker
    folder = writer.subject_dir(key)
    (folder / f".{key}_desc-cbf_cbf.tmp-deadbeef.nii.gz").write_bytes(b"x")
    removed = writer.remove_partial(key)
    assert removed and all(p.name.lstrip(".").startswith(key + "_desc-") for p in removed)
    assert writer.subject_files(key) == []
    assert writer.status(key) == "absent"
    assert writer.is_complete(other)  # untouched
    assert writer.remove_partial(other) == []  # complete subjects are kept

    _write(writer, "sub-03")
    writer.subject_paths("sub-03")["m0"].unlink()
    writer.remove_partial("sub-03")
    assert not (writer.root / "sub-03").exists()  # empty folders removed
    assert writer.root.is_dir()


def test_overwrite_rules(writer):
    key = "sub-01_ses-1_run-1"
    _write(writer)
    before = writer.marker_path(key).read_text()
    with pytest.raises(InputError, match="exist already.*complete"):
        _write(writer, seed=1)
    assert writer.marker_path(key).read_text() == before
    writer.subject_paths(key)["m0"].unlink()
    with pytest.raises(InputError, match="partial"):
        _write(writer, seed=1)

    w2 = DerivativesWriter(writer.out_root, overwrite=True)
    _write(w2, seed=1)
    assert w2.is_complete(key)
    assert writer.marker_path(key).read_text() != before
    # a rewrite with fewer outputs removes the stale files of the earlier run
    w2.write_subject(key, {"m0": _images()["m0"]})
    assert {p.name for p in w2.subject_files(key)} == {
        f"{key}_desc-M0_M0map.nii.gz", f"{key}_desc-M0_M0map.json", f"{key}_desc-aslcal_complete.json"
    }
    assert w2.is_complete(key)


def test_write_subject_bad_arguments(writer):
    with pytest.raises(InputError, match="unknown output"):
        writer.write_subject("sub-01", {"m0map": _images()["m0"]})
    with pytest.raises(InputError, match="unknown output"):
        writer.write_subject("sub-01", {}, {"qc": {}})
    with pytest.raises(InputError, match="not written"):
        writer.write_subject("sub-01", {}, {"t1": {}}, {"a": 1})
    with pytest.raises(InputError, match="nothing to write"):
        writer.write_subject("sub-01", {})
    with pytest.raises(InputError, match="tuple"):
        writer.write_subject("sub-01", {"m0": np.ones((2, 2, 2))})
    assert writer.subject_files("sub-01") == []


# --------------------------------------------------------------------- summary TSV


def test_summary_tsv(tmp_path):
    rows = [
        {"participant_id": "sub-02", "status": "ok", "M0a": 1500.25, "T1_mean_gm": 1.33,
         "session": "1"},
        {"participant_id": "01", "session": "ses-1", "run": 10, "status": "ok", "M0a": 1.0 / 3},
        {"participant_id": "01", "session": "1", "run": 2, "status": "failed",
         "stage": "read", "message": "sub-01_asl.json:\tRepetitionTimePreparation\nis 0",
         "M0a": float("nan")},
    ]
    path = write_summary_tsv(rows, tmp_path / "summary.tsv")
    lines = path.read_text().split("\n")
    assert lines[-1] == ""
    table = [line.split("\t") for line in lines[:-1]]
    assert table[0] == ["participant_id", "session", "run", "status", "stage", "message",
                        "M0a", "T1_mean_gm"]
    assert all(len(r) == len(table[0]) for r in table)
    assert table[1] == ["sub-01", "ses-1", "2", "failed", "read",
                        "sub-01_asl.json: RepetitionTimePreparation is 0", "n/a", "n/a"]
    assert table[2] == ["sub-01", "ses-1", "10", "ok", "n/a", "n/a", repr(1.0 / 3), "n/a"]
    assert table[3] == ["sub-02", "ses-1", "n/a", "ok", "n/a", "n/a", "1500.25", "1.33"]
    # determinism: any input order gives the same bytes
    again = write_summary_tsv(list(reversed(rows)), tmp_path / "again.tsv")
    assert again.read_bytes() == path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_summary_tsv(rows, path, overwrite=False)


def test_summary_tsv_tells_acquisitions_apart(tmp_path):
    """Runs that differ by acq (or rec/dir) get that column, after session, before run."""
    rows = [{"participant_id": "07", "status": "ok", "M0a": 2.0, "acq": "b"},
            {"participant_id": "07", "status": "ok", "M0a": 1.0}]
    table = [line.split("\t") for line in write_summary_tsv(rows, tmp_path / "s.tsv").read_text().splitlines()]
    assert table[0][:4] == ["participant_id", "session", "acq", "run"]
    assert [r[2] for r in table[1:]] == ["n/a", "b"] and [r[-1] for r in table[1:]] == ["1.0", "2.0"]


@pytest.mark.parametrize(
    "row, match",
    [({"status": "ok"}, "participant_id"), ({"participant_id": "01", "status": "done"}, "status"),
     ({"participant_id": "01", "status": "ok", "a\tb": 1}, "column")],
)
def test_summary_tsv_bad_rows(tmp_path, row, match):
    with pytest.raises(InputError, match=match):
        write_summary_tsv([row], tmp_path / "s.tsv")
    assert not (tmp_path / "s.tsv").exists()


def test_outputs_are_byte_identical_across_runs(tmp_path):
    """Resume acceptance compares checksums: the same inputs must give the same bytes.

    The sleep crosses a second boundary so that a gzip header time stamp would differ.
    """
    import time

    markers = []
    for i in range(2):
        w = DerivativesWriter(tmp_path / f"run{i}")
        written = _write(w)
        markers.append(written["complete"].read_bytes())
        time.sleep(1.1)
    assert markers[0] == markers[1]


def test_summary_tsv_has_a_data_dictionary(tmp_path):
    """BIDS: a JSON beside a TSV describes its columns; every column is there, with units
    for the physical values (T1 in s, CBF in mL/100g/min, field in T)."""
    rows = [{"participant_id": "01", "status": "ok", "M0a": 1200.0, "cbf_mean_brain": 55.0,
             "T1_mean_ref_csf": 4.3, "T1_mean_gm": 1.3, "n_gm_voxels": 12, "field_strength": 3.0,
             "something_new": 1}]
    write_summary_tsv(rows, tmp_path / "summary.tsv")
    header = (tmp_path / "summary.tsv").read_text().splitlines()[0].split("\t")
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(doc) == sorted(header)
    assert all(doc[c]["Description"] for c in header)
    assert doc["T1_mean_ref_csf"]["Units"] == "s" and "csf reference region" in doc["T1_mean_ref_csf"]["Description"]
    assert doc["T1_mean_gm"]["Units"] == "s" and doc["cbf_mean_brain"]["Units"] == "mL/100g/min"
    assert doc["field_strength"]["Units"] == "T" and "Units" not in doc["n_gm_voxels"]


def test_derivative_root_has_a_bidsignore(tmp_path):
    writer = DerivativesWriter(tmp_path / "out")
    ignore = (writer.root / ".bidsignore").read_text().splitlines()
    for pattern in ("logs/", "summary.tsv", "*_desc-aslcal_provenance.json", "*_desc-aslcal_complete.json"):
        assert pattern in ignore
    DerivativesWriter(tmp_path / "out")  # a second writer (resume, shards) finds it and keeps it
    assert (writer.root / ".bidsignore").read_text().splitlines() == ignore
    # a user's own lines survive a later run; aslcal's come back if removed
    (writer.root / ".bidsignore").write_text("work/\nlogs/\n")
    DerivativesWriter(tmp_path / "out")
    lines = (writer.root / ".bidsignore").read_text().splitlines()
    assert lines[:2] == ["work/", "logs/"] and sorted(lines[2:]) == sorted(p for p in ignore if p != "logs/")
    # a folder refused as another pipeline's: its .bidsignore is not touched
    other = tmp_path / "other" / "derivatives" / "aslcal"
    other.mkdir(parents=True)
    (other / "dataset_description.json").write_text(json.dumps(
        {"Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "fmriprep"}]}))
    (other / ".bidsignore").write_text("work/\n")
    with pytest.raises(InputError, match="another pipeline"):
        DerivativesWriter(tmp_path / "other")
    assert (other / ".bidsignore").read_text() == "work/\n"


def test_an_unreadable_bidsignore_is_left_alone(tmp_path):
    """A .bidsignore that is not UTF-8 (someone else's): kept byte for byte, not replaced."""
    root = tmp_path / "out" / "derivatives" / "aslcal"
    root.mkdir(parents=True)
    raw = "# caf\xe9\nwork/\n".encode("latin-1")
    (root / ".bidsignore").write_bytes(raw)
    DerivativesWriter(tmp_path / "out")
    assert (root / ".bidsignore").read_bytes() == raw
