"""BIDS derivatives output: ``derivatives/aslcal/`` with per-subject ``perf/`` maps.

Layout written by :class:`DerivativesWriter` (``out_root`` is the folder that *contains*
``derivatives/``; the pipeline folder is ``out_root/derivatives/<pipeline>``)::

    out_root/derivatives/aslcal/
        dataset_description.json
        sub-01/[ses-1/]perf/
            sub-01_ses-1_run-1_desc-M0_M0map.nii.gz       (+ .json sidecar)
            sub-01_ses-1_run-1_desc-T1_T1map.nii.gz       (+ .json sidecar)
            sub-01_ses-1_run-1_desc-facorr_TB1map.nii.gz  (+ .json sidecar)
            sub-01_ses-1_run-1_desc-cbf_cbf.nii.gz        (+ .json sidecar)
            sub-01_ses-1_run-1_desc-ref_mask.nii.gz       (+ .json sidecar)
            sub-01_ses-1_run-1_desc-brain_mask.nii.gz     (+ .json sidecar)
            sub-01_ses-1_run-1_desc-aslcal_summary.json
            sub-01_ses-1_run-1_desc-aslcal_provenance.json
            sub-01_ses-1_run-1_desc-aslcal_complete.json  (completion marker, last)

File names are ``<source entities>_desc-<label>_<suffix><extension>``: the entities of
the input ASL series (``sub``, ``ses``, ``acq``, ``rec``, ``dir``, ``run``, in BIDS
order), a ``desc`` naming the map, and the BIDS suffix of the quantity (``M0map`` and
``T1map`` as in BIDS quantitative MRI, ``TB1map`` for the flip-angle correction (actual /
nominal flip angle, a ratio), ``cbf`` as in BIDS ASL derivatives, ``mask`` for masks).
Every file of a subject starts with ``<entities>_desc-``, which is how the files of one
subject are told apart from those of another subject in the same folder (``sub-01_`` vs
``sub-01_run-1_``).

Completeness: :meth:`DerivativesWriter.write_subject` writes every file of a subject
through one :class:`~aslcal.io.atomic.OutputSet` (they appear together or not at all)
and only then the completion marker, a small JSON file listing every file with its size
and SHA-256.  :meth:`DerivativesWriter.is_complete` trusts a subject only if the marker
parses, every listed file exists with the recorded checksum and no temporary file of a
killed writer is left; anything else is *partial* and :meth:`remove_partial` deletes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from .atomic import _TEMP_MARKER, OutputSet, StrPath, json_text, sha256_file, write_json, write_text
from .bids import ASL_ENTITIES
from .nifti import encode_image

__all__ = [
    "BIDS_VERSION",
    "DerivativesWriter",
    "IMAGE_OUTPUTS",
    "JSON_OUTPUTS",
    "entities_from_key",
    "subject_key",
    "write_summary_tsv",
]

#: BIDS version written into ``dataset_description.json``.
BIDS_VERSION = "1.10.0"

# Output names keep the source ASL series' entities, in BIDS order (bids.ASL_ENTITIES).
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_INDEX_RE = re.compile(r"^[0-9]+$")

#: Image outputs: name -> (desc label, BIDS suffix, units, description).
IMAGE_OUTPUTS: dict[str, tuple[str, str, str | None, str]] = {
    "m0": ("M0", "M0map", "arbitrary", "Equilibrium magnetisation M0 of tissue, voxelwise"),
    "t1": ("T1", "T1map", "s", "Longitudinal relaxation time T1 of tissue"),
    "facorr": ("facorr", "TB1map", "ratio",
               "Flip-angle correction: actual / nominal flip angle (Look-Locker fit)"),
    "cbf": ("cbf", "cbf", "mL/100g/min", "Calibrated cerebral blood flow"),
    "ref_mask": ("ref", "mask", None, "Reference-region mask used for M0a"),
    "brain_mask": ("brain", "mask", None, "Brain mask"),
}
#: BIDS ``Type`` of the mask outputs (masks have no units).
MASK_TYPES = {"ref_mask": "ROI", "brain_mask": "Brain"}

#: JSON outputs (other than the image sidecars): name -> (desc label, suffix).
JSON_OUTPUTS: dict[str, tuple[str, str]] = {
    "summary": ("aslcal", "summary"),
    "provenance": ("aslcal", "provenance"),
}

_MARKER = ("aslcal", "complete")
_MARKER_NAME = "complete"

#: The derivative's ``.bidsignore`` (not BIDS files: logs, run-level table, records).
BIDSIGNORE = "logs/\nsummary.tsv\nsummary.json\n*_desc-aslcal_summary.json\n*_desc-aslcal_provenance.json\n*_desc-aslcal_complete.json\n"

_SUMMARY_LEADING = ("participant_id", "session", "run", "status", "stage", "message")
#: Entities between ``session`` and ``run`` in the summary, as columns when some row has them.
_SUMMARY_ENTITIES = ("acq", "rec", "dir")
_STATUSES = ("ok", "failed")


# --------------------------------------------------------------------------- entities


def _normalise_entities(entities: Mapping[str, Any]) -> dict[str, str]:
    """Validate entity values; return them as labels without the ``key-`` prefix."""
    if not isinstance(entities, Mapping):
        raise InputError(
            f"entities must be a mapping like {{'sub': '01', 'ses': '1'}}, got {entities!r}"
        )
    unknown = sorted(set(entities) - set(ASL_ENTITIES))
    if unknown:
        raise InputError(
            f"entities {entities!r}: unknown entity {unknown[0]!r}; expected some of "
            f"{', '.join(ASL_ENTITIES)}"
        )
    out: dict[str, str] = {}
    for key in ASL_ENTITIES:
        value = entities.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | np.integer):
            raise InputError(f"entity {key}={value!r}: expected a str label or an int")
        text = str(int(value)) if not isinstance(value, str) else value
        if text.startswith(f"{key}-"):
            text = text[len(key) + 1:]
        pattern = _INDEX_RE if key == "run" else _LABEL_RE
        if not pattern.match(text):
            what = "a non-negative integer" if key == "run" else "letters and digits only"
            raise InputError(f"entity {key}={value!r}: expected {what} (BIDS label)")
        out[key] = text
    if "sub" not in out:
        raise InputError(f"entities {dict(entities)!r}: 'sub' (the participant label) is required")
    return out


def subject_key(entities: Mapping[str, Any] | str) -> str:
    """The key of one subject/session/run, e.g. ``"sub-01_ses-1_run-2"``.

    This is the file-name prefix of its outputs and the key used by
    :mod:`aslcal.cohort` (sharding, failure logs, resume).  A key string is
    validated and returned in canonical form.
    """
    if isinstance(entities, str):
        entities = entities_from_key(entities)
    ent = _normalise_entities(entities)
    return "_".join(f"{k}-{ent[k]}" for k in ASL_ENTITIES if k in ent)


def entities_from_key(key: str) -> dict[str, str]:
    """Inverse of :func:`subject_key`: ``"sub-01_run-2"`` -> ``{"sub": "01", "run": "2"}``."""
    if not isinstance(key, str) or not key:
        raise InputError(f"subject key {key!r}: expected a string like 'sub-01_ses-1'")
    out: dict[str, str] = {}
    for part in key.split("_"):
        name, sep, value = part.partition("-")
        if not sep or not value or name in out:
            raise InputError(
                f"subject key {key!r}: expected '_'-separated key-value entities like "
                "'sub-01_ses-1_run-1'"
            )
        out[name] = value
    _normalise_entities(out)
    order = [k for k in ASL_ENTITIES if k in out]
    if list(out) != order:
        raise InputError(
            f"subject key {key!r}: entities out of BIDS order; expected {'_'.join(order)} order"
        )
    return out


# --------------------------------------------------------------------------- helpers


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _image_parts(name: str, value: Any) -> tuple[Any, Any, Any]:
    if isinstance(value, tuple | list) and len(value) in (2, 3):
        data, affine = value[0], value[1]
        header = value[2] if len(value) == 3 else None
        return data, affine, header
    # An aslcal.io.Image (or anything with data/affine/header attributes).
    if all(hasattr(value, a) for a in ("data", "affine")):
        return value.data, value.affine, getattr(value, "header", None)
    raise InputError(
        f"images[{name!r}]: expected a tuple (array, affine[, header]) or an Image, "
        f"got {type(value).__name__}"
    )


# --------------------------------------------------------------------------- writer


class DerivativesWriter:
    """Writes aslcal's BIDS derivatives: one folder per pipeline, one marker per subject.

    Parameters
    ----------
    out_root : str or os.PathLike
        The folder that contains ``derivatives/`` (``OUT_ROOT`` of ``aslcal cohort``).
        It is created if missing (its parent must exist); the pipeline folder
        ``out_root/derivatives/<pipeline>`` is created inside it.
    pipeline : str, optional
        Pipeline name: the folder name and ``GeneratedBy[0].Name``.  Default ``"aslcal"``.
    version : str, optional
        ``GeneratedBy[0].Version``; default the installed aslcal version.
    overwrite : bool, optional
        Default False: existing outputs of a subject are an error (use
        :meth:`remove_partial`, or ``aslcal.cohort.plan_run(..., resume=True)``), and
        an existing ``dataset_description.json`` written by another version is an error.
        True: a subject's outputs are replaced (its marker is removed first, stale files
        of the subject removed after), and the description is rewritten for this version.
    code_url : str, optional
        ``GeneratedBy[0].CodeURL``.
    source_datasets : list of dict, optional
        ``SourceDatasets`` (e.g. ``[{"URL": "file:///data/bids"}]``).
    dataset_links : dict of str to str, optional
        ``DatasetLinks`` (e.g. ``{"raw": "file:///data/bids"}``), the names the BIDS URIs
        of the sidecars' ``Sources`` use (``bids:raw:sub-01/perf/...``).
    name : str, optional
        ``Name`` of the derivative dataset; default ``"<pipeline> outputs"``.

    Raises
    ------
    InputError
        ``out_root`` cannot be created; an existing ``dataset_description.json`` is not
        a derivative of this pipeline, cannot be read, or (``overwrite=False``) comes
        from another version.

    Notes
    -----
    ``dataset_description.json`` is written without clobbering (hard link), so that
    several processes starting on the same folder (job-array shards) write it once
    and each checks the one that won.
    """

    def __init__(
        self,
        out_root: StrPath,
        *,
        pipeline: str = "aslcal",
        version: str | None = None,
        overwrite: bool = False,
        code_url: str | None = None,
        source_datasets: list[dict] | None = None,
        dataset_links: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        if version is None:
            from .. import __version__

            version = __version__
        if not isinstance(pipeline, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", pipeline):
            raise InputError(f"pipeline {pipeline!r}: expected a folder name (letters, digits, ._-)")
        self.out_root = Path(out_root)
        self.pipeline = pipeline
        self.version = str(version)
        self.overwrite = bool(overwrite)
        self.root = self.out_root / "derivatives" / pipeline
        generated: dict[str, Any] = {"Name": pipeline, "Version": self.version}
        if code_url:
            generated["CodeURL"] = str(code_url)
        self.description: dict[str, Any] = {
            "Name": name or f"{pipeline} outputs",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [generated],
        }
        if source_datasets:
            self.description["SourceDatasets"] = list(source_datasets)
        if dataset_links:
            self.description["DatasetLinks"] = dict(dataset_links)
        self._make_root()
        self._write_description()

    # ----------------------------------------------------------------- dataset level

    def _make_root(self) -> None:
        if self.out_root.exists() and not self.out_root.is_dir():
            raise InputError(f"output root {str(self.out_root)!r} exists and is not a folder")
        if not self.out_root.exists() and not self.out_root.parent.is_dir():
            raise InputError(
                f"output root {str(self.out_root)!r}: parent folder "
                f"{str(self.out_root.parent)!r} does not exist"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create derivatives folder {str(self.root)!r}: {exc.strerror or exc}"
            ) from None

    @property
    def description_path(self) -> Path:
        return self.root / "dataset_description.json"

    def _write_description(self) -> None:
        path = self.description_path
        written = False
        if not path.exists():
            try:
                write_json(path, self.description, overwrite=False)
                written = True
            except InputError:
                if not path.exists():
                    raise
                # Another process wrote it meanwhile: check theirs below.
        if not written:
            self._check_description(path)
        self._write_bidsignore()  # only in a folder accepted as this pipeline's

    def _write_bidsignore(self) -> None:
        """``.bidsignore``: the files a BIDS validator should skip (run logs, the summary
        table, the per-subject summary/provenance records and completion markers), as
        fMRIPrep and ASLPrep write one."""
        path = self.root / ".bidsignore"
        try:
            have = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        except (OSError, UnicodeDecodeError) as exc:
            # someone else's file we cannot read as text: left as it is
            logging.getLogger("aslcal").warning("%s: not read (%s); aslcal's lines not added", path, exc)
            return
        missing = [line for line in BIDSIGNORE.splitlines() if line not in have]
        if missing:  # a user's own lines are kept; aslcal's are added once
            write_text(path, "".join(f"{line}\n" for line in have + missing), overwrite=True)

    def _check_description(self, path: Path) -> None:
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{str(path)!r}: cannot read it as JSON ({exc})") from None
        if not isinstance(existing, dict) or existing.get("DatasetType") != "derivative":
            raise InputError(
                f"{str(path)!r}: DatasetType is {existing.get('DatasetType') if isinstance(existing, dict) else None!r}, "
                "expected 'derivative'; the output folder holds something else"
            )
        generated = existing.get("GeneratedBy")
        first = generated[0] if isinstance(generated, list) and generated and isinstance(generated[0], dict) else {}
        if first.get("Name") != self.pipeline:
            raise InputError(
                f"{str(path)!r}: GeneratedBy Name is {first.get('Name')!r}, expected "
                f"{self.pipeline!r}; this folder belongs to another pipeline"
            )
        links = self.description.get("DatasetLinks")
        if links is not None and existing.get("DatasetLinks") not in (None, links):
            # Sources name inputs as bids:raw:<path>: one folder, one raw dataset
            raise InputError(
                f"{str(path)!r}: made from {existing['DatasetLinks'].get('raw', existing['DatasetLinks'])!r}"
                f", not {links.get('raw', links)!r}; use another output folder for another dataset"
                if isinstance(existing.get("DatasetLinks"), dict) else
                f"{str(path)!r}: DatasetLinks {existing.get('DatasetLinks')!r} is not {links!r}"
            )
        if first.get("Version") != self.version:
            if not self.overwrite:
                raise InputError(
                    f"{str(path)!r}: written by {self.pipeline} {first.get('Version')!r}, this is "
                    f"{self.version!r}; use a new output folder or pass overwrite=True"
                )
            write_json(path, self.description, overwrite=True)

    # ----------------------------------------------------------------- subject level

    def subject_dir(self, entities: Mapping[str, Any] | str) -> Path:
        """``<root>/sub-X/[ses-Y/]perf`` for these entities."""
        ent = _normalise_entities(entities_from_key(entities) if isinstance(entities, str) else entities)
        folder = self.root / f"sub-{ent['sub']}"
        if "ses" in ent:
            folder = folder / f"ses-{ent['ses']}"
        return folder / "perf"

    def subject_paths(self, entities: Mapping[str, Any] | str) -> dict[str, Path]:
        """Every output path of a subject, by output name.

        Keys: the image names of :data:`IMAGE_OUTPUTS` (``m0``, ``t1``, ``facorr``,
        ``cbf``, ``ref_mask``, ``brain_mask``), their sidecars as ``<name>_json``, the
        JSON outputs ``summary`` and ``provenance``, and ``complete`` (the marker).
        """
        prefix = subject_key(entities)
        folder = self.subject_dir(entities)
        paths: dict[str, Path] = {}
        for name, (desc, suffix, _, _) in IMAGE_OUTPUTS.items():
            paths[name] = folder / f"{prefix}_desc-{desc}_{suffix}.nii.gz"
            paths[f"{name}_json"] = folder / f"{prefix}_desc-{desc}_{suffix}.json"
        for name, (desc, suffix) in JSON_OUTPUTS.items():
            paths[name] = folder / f"{prefix}_desc-{desc}_{suffix}.json"
        paths[_MARKER_NAME] = folder / f"{prefix}_desc-{_MARKER[0]}_{_MARKER[1]}.json"
        return paths

    def marker_path(self, entities: Mapping[str, Any] | str) -> Path:
        return self.subject_paths(entities)[_MARKER_NAME]

    def subject_files(self, entities: Mapping[str, Any] | str) -> list[Path]:
        """Every existing file of this subject (outputs, marker, temporary files), sorted."""
        prefix = subject_key(entities) + "_desc-"
        folder = self.subject_dir(entities)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        mine = [n for n in names if n.startswith(prefix) or n.startswith("." + prefix)]
        return sorted(folder / n for n in mine)

    def _read_marker(self, entities) -> dict | None:
        try:
            marker = json.loads(self.marker_path(entities).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        files = marker.get("files") if isinstance(marker, dict) else None
        if not isinstance(files, dict) or not files:
            return None
        return marker

    def is_complete(
        self, entities: Mapping[str, Any] | str, *, check: Literal["sha256", "size"] = "sha256"
    ) -> bool:
        """Whether the subject's outputs are complete and intact.

        True only if the completion marker parses, every file it lists exists with the
        recorded size (and, with ``check="sha256"``, the recorded SHA-256), and no
        temporary file of an interrupted writer is left for this subject.
        """
        if check not in ("sha256", "size"):
            raise InputError(f"check={check!r}: expected 'sha256' or 'size'")
        marker = self._read_marker(entities)
        if marker is None:
            return False
        folder = self.subject_dir(entities)
        for fname, info in marker["files"].items():
            if not isinstance(fname, str) or "/" in fname or "\\" in fname or not isinstance(info, dict):
                return False
            path = folder / fname
            try:
                if path.stat().st_size != info.get("bytes"):
                    return False
            except OSError:
                return False
            if check == "sha256" and sha256_file(path) != info.get("sha256"):
                return False
        return not any(_TEMP_MARKER in p.name for p in self.subject_files(entities))

    def status(self, entities: Mapping[str, Any] | str, *, check: Literal["sha256", "size"] = "sha256") -> str:
        """``"complete"``, ``"partial"`` (some files, not complete) or ``"absent"``."""
        if self.is_complete(entities, check=check):
            return "complete"
        return "partial" if self.subject_files(entities) else "absent"

    def remove_partial(self, entities: Mapping[str, Any] | str) -> list[Path]:
        """Delete every file of an incomplete subject (temporary files included).

        A complete subject is left alone.  Folders left empty are removed.  Returns the
        removed files.
        """
        if self.is_complete(entities):
            return []
        return self.remove_subject(entities)

    def remove_subject(self, entities: Mapping[str, Any] | str) -> list[Path]:
        """Delete every file of a subject, complete or not (e.g. its inputs changed), and the
        folders left empty; returns the removed files."""
        removed = [p for p in self.subject_files(entities) if _unlink(p)]
        folder = self.subject_dir(entities)
        # perf/, then ses-*/ and sub-*/ if they became empty; never the pipeline root.
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent
        return removed

    def write_subject(
        self,
        entities: Mapping[str, Any] | str,
        images: Mapping[str, Any],
        records: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> dict[str, Path]:
        """Write all outputs of one subject, then its completion marker.

        Parameters
        ----------
        entities : mapping or str
            ``{"sub": "01", "ses": "1", "run": 1}`` (``ses``/``acq``/``rec``/``dir``/
            ``run`` optional) or a key like ``"sub-01_ses-1_run-1"``.
        images : mapping of str to (array, affine[, header]) or Image
            Maps by name (see :data:`IMAGE_OUTPUTS`).  Arrays of shape (x, y, z) are
            written as float32 (bool masks as uint8), affine in mm.  Each image gets a
            JSON sidecar with ``Units`` and ``Description``.
        records : mapping of str to JSON-able, optional
            ``records[<image name>]`` (a dict) is merged into that image's sidecar;
            ``records["summary"]`` is written as the subject's summary JSON.
        provenance : mapping, optional
            The subject's provenance record (e.g. from ``aslcal.cli._common.provenance``).

        Returns
        -------
        dict of str to pathlib.Path
            The written files by output name, including ``complete`` (the marker).

        Raises
        ------
        InputError
            Unknown names, bad images or records, or (``overwrite=False``) the subject
            already has files.  Nothing of the subject is written then; an exception
            from a writer leaves no file of the subject either.
        """
        records = dict(records or {})
        unknown = sorted(set(images) - set(IMAGE_OUTPUTS))
        if unknown:
            raise InputError(
                f"images: unknown output {unknown[0]!r}; expected some of {', '.join(IMAGE_OUTPUTS)}"
            )
        unknown = sorted(set(records) - set(IMAGE_OUTPUTS) - {"summary"})
        if unknown:
            raise InputError(
                f"records: unknown output {unknown[0]!r}; expected an image name or 'summary'"
            )
        for name in set(records) & set(IMAGE_OUTPUTS):
            if name not in images:
                raise InputError(f"records[{name!r}] is a sidecar of an image that is not written")
            if not isinstance(records[name], Mapping):
                raise InputError(f"records[{name!r}]: a sidecar must be a dict, got {type(records[name]).__name__}")
        if not images and "summary" not in records and provenance is None:
            raise InputError("write_subject: nothing to write (no images, summary or provenance)")

        key = subject_key(entities)
        ent = entities_from_key(key)
        paths = self.subject_paths(ent)
        folder = self.subject_dir(ent)
        existing = self.subject_files(ent)
        if existing and not self.overwrite:
            state = "complete" if self.is_complete(ent) else "partial"
            raise InputError(
                f"{key}: outputs exist already ({state}, e.g. {str(existing[0])!r}); "
                "pass overwrite=True, or resume (which removes partial outputs)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        # Invalidate first: from here until the new marker the subject is not complete.
        _unlink(paths[_MARKER_NAME])

        written: dict[str, Path] = {}
        files: dict[str, dict[str, Any]] = {}
        with OutputSet(overwrite=self.overwrite) as out:

            def stage(name: str, dest: Path, payload: bytes) -> None:
                # Hashed from memory: the bytes written are the bytes hashed.
                out.write_bytes(dest, payload)
                written[name] = dest
                files[dest.name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

            brain = None
            if "brain_mask" in images:
                mask = np.asarray(_image_parts("brain_mask", images["brain_mask"])[0])
                brain = _spatial(mask) > 0
            for name in IMAGE_OUTPUTS:  # fixed order: deterministic
                if name not in images:
                    continue
                data, affine, header = _image_parts(name, images[name])
                stage(name, paths[name], encode_image(paths[name].name, data, affine, header=header))
                _, _, units, description = IMAGE_OUTPUTS[name]
                sidecar = ({"Units": units} if units else {"Type": MASK_TYPES[name]}) | {
                    "Description": description, **dict(records.get(name, {}))}
                if units and "SkullStripped" not in sidecar:
                    # BIDS ImageDerivatives: whether the map is skull-stripped, i.e. zero (not
                    # NaN either) outside the brain mask written with it; without a mask on
                    # the map's grid, not (masks need not say)
                    values = _spatial(np.asarray(data))
                    sidecar["SkullStripped"] = bool(
                        brain is not None and values.shape == brain.shape and not np.any(values[~brain]))
                stage(f"{name}_json", paths[f"{name}_json"], json_text(sidecar).encode("utf-8"))
            if "summary" in records:
                stage("summary", paths["summary"], json_text(records["summary"]).encode("utf-8"))
            if provenance is not None:
                stage("provenance", paths["provenance"], json_text(provenance).encode("utf-8"))
            files = dict(sorted(files.items()))
        # All files are in place.  Remove stale files of an earlier run of this subject
        # (overwrite=True), then mark the subject complete.
        keep = set(written.values())
        for path in self.subject_files(ent):
            if path not in keep and _TEMP_MARKER not in path.name:
                _unlink(path)
        marker = {
            "Subject": key,
            "Entities": ent,
            "GeneratedBy": {"Name": self.pipeline, "Version": self.version},
            "files": files,
        }
        write_json(paths[_MARKER_NAME], marker, overwrite=True)
        written[_MARKER_NAME] = paths[_MARKER_NAME]
        return written


def _spatial(a: np.ndarray) -> np.ndarray:
    """An image without trailing length-1 axes beyond the third ((x, y, z, 1) -> (x, y, z))."""
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


# --------------------------------------------------------------------------- summary TSV


def _tsv_cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "n/a"
    text = str(value)
    if text == "":
        return "n/a"
    return " ".join(text.split())  # no tabs or newlines inside a cell


def _prefixed(value: Any, entity: str) -> Any:
    if value is None or value == "":
        return None
    text = str(value)
    return text if text.startswith(f"{entity}-") else f"{entity}-{text}"


def write_summary_tsv(
    rows: Iterable[Mapping[str, Any]], path: StrPath, *, overwrite: bool = True
) -> Path:
    """Write the run-level summary table (``participants.tsv`` style), atomically.

    Parameters
    ----------
    rows : iterable of mapping
        One per subject/session/run.  Required: ``participant_id`` (``"01"`` or
        ``"sub-01"``) and ``status`` (``"ok"`` or ``"failed"``).  Usual: ``session``,
        ``run``, ``stage`` and ``message`` (of a failure), then any summary values
        (e.g. ``M0a``, ``T1_mean_wm``).
    path : str or os.PathLike
        Destination ``.tsv``; its folder must exist.
    overwrite : bool, optional
        Whether an existing file may be replaced.  Default True.

    Returns
    -------
    pathlib.Path

    Notes
    -----
    Deterministic: columns are ``participant_id, session``, the ``acq``/``rec``/``dir``
    entities when some row has them, ``run, status, stage, message``, then the other
    columns sorted by name; rows are sorted by (participant_id, session, those entities,
    run).  ``participant_id`` gets the ``sub-`` prefix and
    ``session`` the ``ses-`` prefix.  Missing, None, empty and non-finite values are
    written as ``n/a`` (BIDS); floats with ``repr`` (shortest round-trip form).  Tabs and
    newlines inside a value become spaces.
    """
    normal: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputError(f"rows[{i}]: expected a dict, got {type(row).__name__}")
        if not row.get("participant_id"):
            raise InputError(f"rows[{i}]: 'participant_id' is required")
        if row.get("status") not in _STATUSES:
            raise InputError(
                f"rows[{i}]: status {row.get('status')!r}; expected one of {', '.join(_STATUSES)}"
            )
        for column in row:
            if not isinstance(column, str) or not column or any(c in column for c in "\t\n\r"):
                raise InputError(f"rows[{i}]: column name {column!r} is not a plain string")
        item = dict(row)
        item["participant_id"] = _prefixed(item["participant_id"], "sub")
        if "session" in item:
            item["session"] = _prefixed(item["session"], "ses")
        normal.append(item)

    entities = [e for e in _SUMMARY_ENTITIES if any(r.get(e) is not None for r in normal)]
    extra = sorted({c for r in normal for c in r} - set(_SUMMARY_LEADING) - set(_SUMMARY_ENTITIES))
    columns = list(_SUMMARY_LEADING[:2]) + entities + list(_SUMMARY_LEADING[2:]) + extra

    def sort_key(r: Mapping[str, Any]):
        run = r.get("run")
        run_key = (0, int(run), "") if run is not None and _INDEX_RE.match(str(run)) else (1, 0, str(run or ""))
        return (str(r["participant_id"]), str(r.get("session") or ""),
                tuple(str(r.get(e) or "") for e in entities), run_key)

    normal.sort(key=sort_key)
    lines = ["\t".join(columns)]
    lines += ["\t".join(_tsv_cell(r.get(c)) for c in columns) for r in normal]
    out = write_text(path, "\n".join(lines) + "\n", overwrite=overwrite)
    # its data dictionary (BIDS: a JSON beside a TSV describes the columns)
    write_json(Path(path).with_suffix(".json"), summary_dictionary(columns), overwrite=overwrite)
    return out


#: Descriptions (and units) of the summary table's columns; ``{t}`` a tissue name.
_COLUMN_DOCS: dict[str, dict[str, str]] = {
    "participant_id": {"Description": "Subject label (sub-<label>)"},
    "session": {"Description": "Session label (ses-<label>), n/a without sessions"},
    "acq": {"Description": "acq entity of the ASL run"},
    "rec": {"Description": "rec entity of the ASL run"},
    "dir": {"Description": "dir entity of the ASL run"},
    "run": {"Description": "run entity of the ASL run"},
    "status": {"Description": "ok: every output written; failed: see stage and message",
               "Levels": {"ok": "processed", "failed": "not processed (see stage, message)"}},
    "stage": {"Description": "Pipeline stage at which the run failed (metadata, load, prepare, fit, calibrate, "
                             "write, worker)"},
    "message": {"Description": "Why the run failed, naming the file and field at fault"},
    "M0a": {"Description": "M0 of arterial blood used for CBF (reference region, or M0Estimate); n/a with a voxelwise M0 map",
            "Units": "arbitrary (scanner signal units)"},
    "m0_mode": {"Description": "How M0 was obtained: refregion, voxel (voxelwise M0 map) or estimate (M0Estimate)"},
    "m0_kind": {"Description": "Kind of M0 data: longtr, control, satrecov, lookLocker or estimate"},
    "field_strength": {"Description": "MagneticFieldStrength: selects the tissue table", "Units": "T"},
    "n_brain_voxels": {"Description": "Voxels in the brain mask"},
    "n_ref_voxels": {"Description": "Voxels in the reference-region mask"},
    "cbf_mean_brain": {"Description": "Mean CBF over the brain mask (finite voxels)", "Units": "mL/100g/min"},
    "n_brain_nonfinite_cbf": {"Description": "Brain voxels whose CBF is not finite (non-finite input data)"},
    "ref_m0t_rel_se": {"Description": "Median relative standard error of the fitted M0t over the reference region"},
    "ref_noise_floor_lift": {"Description": "Mean lift of the fitted reference series by the magnitude (Rician) noise "
                             "floor over its mean signal; above 0.10 M0a may be biased high"},
    "warnings": {"Description": "Warnings of an otherwise processed run"},
    "T1_median_brain": {"Description": "Median fitted tissue T1 over the brain mask (converged fits)", "Units": "s"},
}
_COLUMN_PATTERNS = (
    (re.compile(r"^T1_mean_ref_(\w+)$"), "Mean fitted T1 over the {t} reference region (the fit that made M0a)", "s"),
    (re.compile(r"^T1_mean_(\w+)$"), "Mean fitted T1 over the brain voxels of at least the partial-volume threshold of {t}", "s"),
    (re.compile(r"^n_(\w+)_voxels$"), "Brain voxels counted as {t} for T1_mean_{t}", None),
)


def summary_dictionary(columns: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The data dictionary (``summary.json``) of the summary table's ``columns``."""
    out: dict[str, dict[str, Any]] = {}
    for column in columns:
        doc = _COLUMN_DOCS.get(column)
        if doc is None:
            for pattern, text, units in _COLUMN_PATTERNS:
                m = pattern.match(column)
                if m:
                    doc = {"Description": text.format(t=m.group(1))} | ({"Units": units} if units else {})
                    break
        out[column] = dict(doc) if doc is not None else {"Description": "Summary value (see the run's provenance)"}
    return out
