"""BIDS ASL input: discover runs and read their metadata into typed records.

:func:`discover` finds every ``sub-<label>[/ses-<label>]/perf/*_asl.nii[.gz]`` of a BIDS
dataset; :func:`read_run` reads one run's sidecar JSON, ``_aslcontext.tsv`` and (for
``M0Type`` "Separate") the ``_m0scan`` JSON, checks them and returns an
:class:`AslAcquisition`.  Image *data* are not read here: only NIfTI headers (for the
number of volumes); :meth:`AslAcquisition.load_asl` and :meth:`AslAcquisition.load_m0`
read the voxels with :func:`aslcal.io.load_image`.

Every problem is an :class:`~aslcal.errors.InputError` whose message names the file and
the field, so a cohort runner can record it per subject and go on.  Where one file is at
fault (a sidecar JSON, the ``_aslcontext.tsv``, an image whose header or volume count is
wrong) it is a :class:`BidsFieldError`, which also carries that file and the field as
data (``.file``, ``.field``).  Nothing is ever replaced by a silent zero or default.

Units (calibration.md section 2): times in seconds, except ``te_ms`` (BIDS
``EchoTime`` is in seconds and is converted here, the one place); flip angles in
degrees; field strength in tesla.

Fields aslcal requires in ``*_asl.json`` (beyond what BIDS requires, aslcal needs
``EchoTime`` for the T2/T2* correction of the calibration):

* ``ArterialSpinLabelingType`` ("PCASL", "CASL" or "PASL"),
* ``M0Type`` ("Separate", "Included", "Estimate" or "Absent"),
* ``RepetitionTimePreparation`` (s; > 0, or 0 for a "noRF" / "n/a" volume, which is
  not used; a number or one value per volume),
* ``EchoTime`` (s; > 0, as BIDS requires; a number, or one equal value per volume),
* ``MagneticFieldStrength`` (T; 1.5, 3 or 7, within 0.15 T: e.g. 2.89 reads as 3),
* ``M0Estimate`` (> 0) when ``M0Type`` is "Estimate",
* ``FlipAngle`` (degrees, a Look-Locker readout angle in (0, 90); a number or one value
  per volume) when ``LookLocker`` is true (otherwise not read: BIDS allows up to 360
  degrees and aslcal does not use it),
* ``BackgroundSuppression`` (bool) when ``M0Type`` is "Absent" and the mean control
  is allowed as M0.

Optional fields, checked when present: ``PostLabelingDelay``, ``InversionTime`` (s,
>= 0, a number or one value per volume), ``LabelingDuration`` (s, >= 0),
``LabelingEfficiency`` (in (0, 1]; overrides the default alpha), ``LookLocker`` and
``BackgroundSuppression`` (JSON booleans).

A ``*_m0scan.json`` needs ``RepetitionTimePreparation`` (one number or one per M0
volume) and ``EchoTime``; it may hold ``LookLocker``, ``FlipAngle`` and
``InversionTime`` (a Look-Locker saturation-recovery M0 series).

``SliceTiming`` (s, >= 0, one per slice along ``SliceEncodingDirection``, default k;
with a negative direction the first entry is the highest slice index) in the sidecar
of the M0 volumes (the m0scan's, or the ASL one for "Included") marks a 2-D multi-slice
readout: each slice is read ``SliceTiming[z] - min(SliceTiming)`` after the volume's
recovery time (BIDS: the PLD runs until the first slice is excited), and the M0 series
fit adds it (``M0Source.slice_timing``; :func:`asl_slice_timing` likewise for the ASL
series' per-slice PLD).  Where the slice delays are used (the
white-paper model's per-slice PLD, the fit of an M0 recovery series), ``SliceTiming`` must
agree with ``MRAcquisitionType`` when that is given: "2D" without ``SliceTiming`` and
"3D" with it are errors on ``SliceTiming`` (BIDS requires it for 2-D and forbids it for
3-D readouts); without ``MRAcquisitionType``, ``SliceTiming`` alone decides.

Sidecars follow the BIDS inheritance principle: every ``*_asl.json`` (``*_m0scan.json``)
from the dataset root down to the ``perf`` folder whose entities are a subset of the
run's applies, the nearer overriding the farther (e.g. ``asl.json`` at the root with
the fields shared by all subjects); two applicable files at one level are an error.  A
field's error names the file that gave it.  A run without its own ``_aslcontext.tsv``
reads the lowest applicable one in the same hierarchy (e.g. ``sub-01/sub-01_aslcontext.tsv``).

The m0scan of ``M0Type`` "Separate" is the one with the ASL file's entities; its
``IntendedFor`` (a BIDS URI ``bids::sub-01/perf/sub-01_asl.nii.gz`` or the deprecated
path relative to the subject folder, a string or a list) must then name the ASL image when
given.  Without such an m0scan, the m0scan of the same ``perf`` folder whose own JSON names
the ASL image in ``IntendedFor`` is the M0 (two of them are an error).

Not supported: multi-echo ASL, and an m0scan in another folder (e.g. ``fmap/``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel
import numpy as np

from ..errors import InputError
from .atomic import sha256_file
from .nifti import Image, load_image

log = logging.getLogger("aslcal")

__all__ = [
    "ASL_VOLUME_TYPES",
    "DEFAULT_ALPHA",
    "AslAcquisition",
    "AslRun",
    "BidsFieldError",
    "M0Source",
    "asl_slice_timing",
    "bolus_cutoff",
    "dataset_path",
    "discover",
    "input_checksum",
    "is_number",
    "read_run",
    "run_sidecars",
]

#: Labelling efficiency used when the sidecar gives no ``LabelingEfficiency``
#: (Alsop et al. 2015 white paper: 0.85 for (p)CASL, 0.98 for PASL).
DEFAULT_ALPHA = {"PCASL": 0.85, "CASL": 0.85, "PASL": 0.98}

#: Allowed ``volume_type`` values of ``_aslcontext.tsv`` (BIDS spelling; "n/a", BIDS 1.10,
#: marks a volume of no listed type, ignored like "noRF").
ASL_VOLUME_TYPES = ("control", "label", "m0scan", "deltam", "cbf", "noRF", "n/a")
#: Volume types whose volumes aslcal never uses (their timing fields are not checked).
_UNUSED_VOLUME_TYPES = ("noRF", "n/a")
_VOLUME_TYPE_LOOKUP = {v.lower(): v for v in ASL_VOLUME_TYPES}

_M0_TYPES = ("Separate", "Included", "Estimate", "Absent")
_FIELD_STRENGTHS = (1.5, 3.0, 7.0)
_FIELD_TOLERANCE = 0.15  # tesla: vendors write e.g. 2.89 for a 3 T magnet

_ASL_NAME = re.compile(r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_asl\.nii(?:\.gz)?$")
_ENTITY = re.compile(r"([A-Za-z]+)-([A-Za-z0-9]+)")
_ASL_SUFFIXES = ("_asl.nii", "_asl.nii.gz")


# --------------------------------------------------------------------------- errors


class BidsFieldError(InputError):
    """An :class:`~aslcal.errors.InputError` caused by one file of a BIDS run.

    The message is the same text as for any ``InputError`` (it names the file and
    the field); the attributes give them to a program, e.g. a cohort runner that
    tabulates what is wrong per subject.

    Parameters
    ----------
    message : str
        The error message.
    file : str or os.PathLike
        The file that is wrong (or missing): a ``*_asl.json`` / ``*_m0scan.json``
        sidecar, an ``*_aslcontext.tsv``, an image, or ``dataset_description.json``.
    field : str or None, optional
        The JSON key at fault (without any ``[i]`` index of an array element),
        ``"volume_type"`` for the aslcontext column, or None when no single field is
        at fault (a missing or unreadable file, an image header).

    Attributes
    ----------
    file : str
        ``os.fspath`` of the ``file`` argument, as the path was given (not resolved).
    field : str or None
    """

    def __init__(self, message: str, *, file: str | os.PathLike[str],
                 field: str | None = None) -> None:
        super().__init__(message)
        self.file = os.fspath(file)
        self.field = field

    def __reduce__(self) -> tuple:
        # Keyword-only constructor arguments: rebuild without calling __init__ so that
        # the error pickles (process pools, dask) with its attributes.
        return (_rebuild_error, (type(self), self.args, self.__dict__))


def _rebuild_error(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


# ------------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class AslRun:
    """One ASL run found by :func:`discover` (paths only; nothing read yet).

    Attributes
    ----------
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``.
    run : str or None
        Run label without ``run-``.
    entities : dict of str to str
        All entities of the file name in order (``sub``, ``ses``, ``acq``, ``run``, ...).
    key : str
        Stable unique name, the file name before ``_asl``: e.g. ``"sub-01_ses-1_run-1"``.
    asl : pathlib.Path
        The ``*_asl.nii[.gz]`` image.
    sidecar, aslcontext : pathlib.Path
        ``*_asl.json`` and ``*_aslcontext.tsv`` (they may not exist; :func:`read_run`
        reports that).
    m0scan, m0scan_sidecar : pathlib.Path or None
        ``*_m0scan.nii[.gz]`` and its JSON with the same entities, if the image exists;
        else the m0scan of the same folder whose own JSON names this ASL image in
        ``IntendedFor`` (e.g. one M0 shared by several runs, or an ASL file with an
        ``acq-`` entity the m0scan lacks), if there is one.
    m0scan_linked : bool
        The m0scan was found by its ``IntendedFor``, not by its name.
    m0scan_others : tuple of pathlib.Path
        Further m0scan images whose ``IntendedFor`` name this ASL image (besides
        ``m0scan``; :func:`read_run` refuses the run then, since which one is meant is
        unknown).
    duplicate : pathlib.Path or None
        A second image of the same run (``.nii`` beside ``.nii.gz``): :func:`read_run`
        refuses the run, since which one is meant is unknown.
    m0scan_duplicate : pathlib.Path or None
        The same for the m0scan (refused when the run's M0 is that m0scan).
    """

    subject: str
    session: str | None
    run: str | None
    entities: dict[str, str] = field(compare=False, hash=False)
    key: str
    asl: Path
    sidecar: Path
    aslcontext: Path
    m0scan: Path | None = None
    m0scan_sidecar: Path | None = None
    duplicate: Path | None = None
    m0scan_duplicate: Path | None = None
    m0scan_linked: bool = False
    m0scan_others: tuple[Path, ...] = ()


#: Entities of a BIDS ASL file name (perf datatype), in their order.
ASL_ENTITIES = ("sub", "ses", "acq", "rec", "dir", "run")


def _folder_problem(entities: dict[str, str], subject: str, session: str | None) -> str | None:
    """Why a ``*_asl`` file does not belong in its folder (its sub/ses entities disagree), or None."""
    if entities.get("sub") != subject:
        return f"its sub-{entities.get('sub')} is not the folder's sub-{subject}"
    if entities.get("ses") != session:
        where = f"ses-{session}" if session is not None else "a subject folder without session"
        return f"its {'ses-' + entities['ses'] if 'ses' in entities else 'missing session entity'} does not match {where}"
    return None


def _name_problem(entities: list[tuple[str, str]]) -> str | None:
    """Why a ``*_asl`` file name is not a BIDS ASL name, or None."""
    names = [k for k, _ in entities]
    unknown = [k for k in names if k not in ASL_ENTITIES]
    if unknown:
        return f"entity {unknown[0]!r} is not a BIDS ASL entity (expected some of {', '.join(ASL_ENTITIES)})"
    if len(set(names)) != len(names):
        return "an entity is repeated"
    if names != sorted(names, key=ASL_ENTITIES.index):
        return f"entities out of BIDS order (expected {'_'.join(k for k in ASL_ENTITIES if k in names)})"
    run = dict(entities).get("run")
    if run is not None and not run.isdigit():
        return f"run-{run}: the run entity is an index (digits only)"
    return None


def _strip(label: str, prefix: str) -> str:
    label = str(label).strip()
    return label[len(prefix) :] if label.startswith(prefix) else label


def _natural(value: str | None) -> tuple:
    if value is None:
        return (0, 0, "")
    return (1, int(value), "") if value.isdigit() else (1, math.inf, value)


def discover(
    bids_root: str | os.PathLike[str],
    *,
    participant_label: str | list[str] | tuple[str, ...] | None = None,
    rejected: list[tuple[Path, str]] | None = None,
) -> list[AslRun]:
    """Find every ASL run of a BIDS dataset.

    Parameters
    ----------
    bids_root : str or os.PathLike
        The dataset folder (holding ``dataset_description.json``).
    participant_label : str or sequence of str, optional
        Keep only these subjects; labels with or without ``sub-``.
    rejected : list, optional
        ``*_asl.nii[.gz]`` files that cannot be runs are left out and appended here as
        ``(path, reason)``; without a list they are logged as warnings: names that are
        not BIDS ASL names (labels not alphanumeric, an unknown entity such as ``task``,
        entities out of order), files whose ``sub``/``ses`` entities disagree with
        their folders, and symbolic links to missing files (DataLad/git-annex content
        not fetched).  One bad file never stops the others.

    Returns
    -------
    list of AslRun
        Sorted by subject, session and run (numeric labels numerically), then key.

    Raises
    ------
    InputError
        ``bids_root`` is not a folder, has no ``dataset_description.json``, a
        requested participant does not exist, or no ASL run is found.
    """
    root = Path(bids_root)
    if not root.is_dir():
        raise InputError(f"BIDS root {str(root)!r} is not a folder; expected a BIDS dataset")
    if not (root / "dataset_description.json").is_file():
        raise BidsFieldError(
            f"BIDS root {str(root)!r}: dataset_description.json is missing; "
            "expected a BIDS dataset",
            file=root / "dataset_description.json",
        )
    wanted: set[str] | None = None
    if participant_label is not None:
        labels = [participant_label] if isinstance(participant_label, str) else list(participant_label)
        wanted = {_strip(lab, "sub-") for lab in labels}
        if not wanted or "" in wanted:
            raise InputError(f"participant_label={participant_label!r}: expected subject labels")
        missing = sorted(lab for lab in wanted if not (root / f"sub-{lab}").is_dir())
        if missing:
            raise InputError(
                f"BIDS root {str(root)!r}: participant_label {missing} not found "
                "(no sub-<label> folder)"
            )

    runs: list[AslRun] = []
    for sub_dir in sorted(root.glob("sub-*")):
        if not sub_dir.is_dir():
            continue
        subject = sub_dir.name[4:]
        if wanted is not None and subject not in wanted:
            continue
        perf_dirs = [sub_dir / "perf"] + sorted(p / "perf" for p in sub_dir.glob("ses-*"))
        for perf in perf_dirs:
            if not perf.is_dir():
                continue
            by_prefix: dict[str, list[Path]] = {}
            session = perf.parent.name[4:] if perf.parent != sub_dir else None
            for asl in sorted(perf.iterdir()):
                # hidden files (".", e.g. macOS "._" twins) are not part of a BIDS dataset
                if asl.name.startswith(".") or not asl.name.lower().endswith(_ASL_SUFFIXES):
                    continue
                match = _ASL_NAME.match(asl.name)
                if not asl.name.endswith(_ASL_SUFFIXES):
                    match, problem = None, "the suffix and extension are _asl.nii or _asl.nii.gz, in lower case"
                elif asl.is_dir():
                    match, problem = None, "a folder, not an image file"
                elif match is None:
                    problem = "labels are letters and digits only, as sub-<label>[_<entity>-<label>...]_asl.nii[.gz]"
                else:
                    entities = _ENTITY.findall(match.group("prefix"))
                    problem = _name_problem(entities) or _folder_problem(dict(entities), subject, session)
                if problem is None and not asl.is_file():
                    problem = ("a symbolic link to a missing file (a DataLad/git-annex file not fetched?)"
                               if asl.is_symlink() else "not a regular file")
                if problem is not None:
                    if rejected is None:
                        log.warning("%s: not a usable BIDS ASL file (%s): skipped", asl, problem)
                    else:
                        rejected.append((asl, problem))
                    continue
                by_prefix.setdefault(match.group("prefix"), []).append(asl)
            for prefix, images in by_prefix.items():
                images.sort(key=lambda p: not p.name.endswith(".gz"))  # .nii.gz first
                run = _make_run(perf, images[0], prefix)
                if len(images) > 1:
                    run = dataclasses.replace(run, duplicate=images[1])
                runs.append(run)
    if not runs:
        which = "" if wanted is None else f" for participant(s) {sorted(wanted)}"
        raise InputError(
            f"BIDS root {str(root)!r}: no ASL runs found{which} "
            "(expected sub-<label>/[ses-<label>/]perf/*_asl.nii[.gz])"
        )
    runs.sort(key=lambda r: (r.subject, _natural(r.session), _natural(r.run), r.key))
    return runs


_M0SCAN_NAME = re.compile(r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*)_m0scan\.nii(?:\.gz)?$")


def _m0scan_images(perf: Path, prefix: str) -> list[Path]:
    """``<prefix>_m0scan.nii.gz`` and ``.nii`` in ``perf``, those present (``.nii.gz`` first)."""
    # a link whose content is not fetched counts as present: reading it then says so
    return [c for c in (perf / f"{prefix}_m0scan.nii.gz", perf / f"{prefix}_m0scan.nii")
            if c.is_file() or c.is_symlink()]


def _intended_for(value: Any) -> list[str] | None:
    """``IntendedFor`` as a list of strings (a string is one), None when malformed."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return None
    return values


def _names_image(target: str, subject: str, rel: str) -> bool:
    """Whether an ``IntendedFor`` entry names the image ``rel`` (relative to the dataset
    root, e.g. ``sub-01/perf/sub-01_asl.nii.gz``): a BIDS URI ``bids::<rel>`` or the
    deprecated path relative to the subject folder; ``.nii`` and ``.nii.gz`` alike.  A
    path relative to the dataset root (``sub-01/perf/...``, a common converter slip) or
    with a leading ``./`` names the same image: no other reading is possible."""
    def stem(path: str) -> str:
        path = path.strip().lstrip("/")
        while path.startswith("./"):
            path = path[2:]
        for ext in (".nii.gz", ".nii"):
            if path.endswith(ext):
                return path[: -len(ext)]
        return path

    target = target.strip()
    want = stem(rel)
    if target.startswith("bids:"):
        dataset, _, path = target[5:].partition(":")
        return dataset == "" and stem(path) == want
    return stem(f"sub-{subject}/{stem(target)}") == want or stem(target) == want


def _asl_rel(subject: str, session: str | None, asl: Path) -> str:
    """The ASL image's path relative to the dataset root."""
    return "/".join([f"sub-{subject}"] + ([f"ses-{session}"] if session else []) + ["perf", asl.name])


def _m0scan_sidecars(perf: Path) -> list[tuple[str, Path, Any]]:
    """``(prefix, JSON path, parsed content or the exception)`` of the sidecar of every
    m0scan image in ``perf``, by prefix; an image without a sidecar is left out."""
    out = []
    for prefix in sorted({m.group("prefix") for f in perf.iterdir() if (m := _M0SCAN_NAME.match(f.name))}):
        path = perf / f"{prefix}_m0scan.json"
        try:
            content: Any = _parse_json(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            content = exc
        out.append((prefix, path, content))
    return out


def _unreadable_m0scan_sidecars(perf: Path) -> list[tuple[Path, Exception]]:
    """The m0scan JSONs in ``perf`` (of images present) that cannot be parsed, with why."""
    return [(path, content) for _, path, content in _m0scan_sidecars(perf) if isinstance(content, Exception)]


def _linked_m0scans(perf: Path, asl: Path, subject: str, session: str | None) -> list[str]:
    """Prefixes of the m0scans in ``perf`` whose own JSON names ``asl`` in ``IntendedFor``
    (an unreadable JSON is skipped here: it names nothing)."""
    rel = _asl_rel(subject, session, asl)
    out = []
    for prefix, _, obj in _m0scan_sidecars(perf):
        targets = _intended_for(obj.get("IntendedFor")) if isinstance(obj, dict) else None
        if targets and any(_names_image(t, subject, rel) for t in targets):
            out.append(prefix)
    return out


def _make_run(perf: Path, asl: Path, prefix: str) -> AslRun:
    entities = dict(_ENTITY.findall(prefix))
    found = _m0scan_images(perf, prefix)
    linked = False
    others: tuple[Path, ...] = ()
    m0_prefix = prefix
    if not found:
        # BIDS links an m0scan to its ASL image(s) by IntendedFor: one without this run's
        # name may be meant for it
        prefixes = _linked_m0scans(perf, asl, entities["sub"], entities.get("ses"))
        if prefixes:
            m0_prefix, linked = prefixes[0], True
            found = _m0scan_images(perf, m0_prefix)
            others = tuple(_m0scan_images(perf, p)[0] for p in prefixes[1:])
    else:
        # another m0scan whose IntendedFor names this run's image contradicts the pairing by
        # name (it was passed over without a word): the run's M0 is ambiguous
        claims = [p for p in _linked_m0scans(perf, asl, entities["sub"], entities.get("ses")) if p != prefix]
        others = tuple(images[0] for p in claims if (images := _m0scan_images(perf, p)))
    m0scan = found[0] if found else None
    return AslRun(
        subject=entities["sub"],
        session=entities.get("ses"),
        run=entities.get("run"),
        entities=entities,
        key=prefix,
        asl=asl,
        sidecar=perf / f"{prefix}_asl.json",
        aslcontext=perf / f"{prefix}_aslcontext.tsv",
        m0scan=m0scan,
        m0scan_sidecar=None if m0scan is None else perf / f"{m0_prefix}_m0scan.json",
        m0scan_duplicate=found[1] if len(found) > 1 else None,
        m0scan_linked=linked,
        m0scan_others=others,
    )


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class M0Source:
    """Where a run's M0 comes from (calibration inputs; no image data).

    Attributes
    ----------
    kind : {"separate", "included", "estimate", "control"}
        ``M0Type`` Separate / Included / Estimate, or "control": ``M0Type`` Absent
        with the mean control image allowed as M0 (no background suppression).
    path : pathlib.Path or None
        Image holding the M0 volumes (the m0scan file, or the ASL file); None for
        "estimate".
    volumes : tuple of int
        Indices of the M0 volumes in ``path`` (0-based; all volumes of an m0scan).
    trs : tuple of float, seconds
        ``RepetitionTimePreparation`` of each M0 volume.  Several distinct values mean
        a saturation-recovery series: fit it, do not average across TRs.
    tis : tuple of float, seconds, or None
        ``InversionTime`` of each M0 volume (``PostLabelingDelay`` for an included
        Look-Locker M0 without InversionTime), when given.
    te_ms : float, milliseconds
        Echo time of the M0 volumes.
    look_locker : bool
    flip_angle : tuple of float, degrees, or None
        Per M0 volume, when given (required with Look-Locker).
    estimate : float or None, signal units
        ``M0Estimate`` (the M0 of blood, BIDS) for "estimate".
    sidecar : pathlib.Path
        The run's own JSON (where a field without another source is reported).
    metadata : Sidecar
        The merged JSON the values came from (:attr:`sidecar_files`, :meth:`source_of`).
    slice_timing : tuple of float, seconds, or None
        ``SliceTiming`` of a 2-D multi-slice readout: the acquisition time of each slice
        along ``slice_axis`` after the first slice acquired (``SliceTiming[z] -
        min(SliceTiming)``), indexed by slice (ascending array index, whatever the sign of
        ``SliceEncodingDirection``), added to the volume's recovery time in the fit.
    slice_axis : int
        Array axis of the slices (``SliceEncodingDirection`` i, j, k; default k = 2).
    """

    kind: str
    path: Path | None
    volumes: tuple[int, ...]
    trs: tuple[float, ...]
    tis: tuple[float, ...] | None
    te_ms: float
    look_locker: bool
    flip_angle: tuple[float, ...] | None
    estimate: float | None
    sidecar: Path
    slice_timing: tuple[float, ...] | None = None
    slice_axis: int = 2
    metadata: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def sidecar_files(self) -> tuple[Path, ...]:
        """Every JSON the values came from (BIDS inheritance), most general first."""
        return _files(self.metadata, self.sidecar)

    def source_of(self, name: str) -> Path:
        """The JSON file that gave field ``name`` (``sidecar`` when none has it)."""
        return _src(self.metadata, self.sidecar, name)

    @property
    def distinct_trs(self) -> tuple[float, ...]:
        """tuple of float, seconds: the distinct TRs of the M0 volumes, ascending."""
        return tuple(sorted(set(self.trs)))

    @property
    def is_satrecov(self) -> bool:
        """bool: the M0 volumes are a recovery series to fit (several TRs or Look-Locker)."""
        return self.look_locker or len(self.distinct_trs) > 1


@dataclass(frozen=True)
class AslAcquisition:
    """The checked metadata of one ASL run (see :func:`read_run`).

    Attributes
    ----------
    run : AslRun
    shape : tuple of int
        Shape of the ASL image from its header (x, y, z[, t]).
    n_volumes : int
        Volumes in the ASL image (1 for a 3-D image).
    volume_types : tuple of str
        ``volume_type`` of each volume, from :data:`ASL_VOLUME_TYPES`.
    labeling_type : {"PCASL", "CASL", "PASL"}
    alpha : float
        Labelling efficiency: ``LabelingEfficiency`` if given, else
        :data:`DEFAULT_ALPHA` of the labelling type.
    m0_type : {"Separate", "Included", "Estimate", "Absent"}
    m0 : M0Source
    tr : tuple of float, seconds
        ``RepetitionTimePreparation`` of each ASL volume.
    te_ms : float, milliseconds
        ``EchoTime`` converted from seconds.
    field_strength : float, tesla
        1.5, 3.0 or 7.0 (selects the tissue table).
    magnetic_field_strength : float, tesla
        The value as written in the sidecar.
    look_locker : bool
    flip_angle : tuple of float, degrees, or None
        Per volume, when given.
    post_labeling_delay, inversion_time : tuple of float, seconds, or None
        Per volume, when given.
    labeling_duration : tuple of float, seconds, or None
        Per volume, when given.
    background_suppression : bool or None
    metadata : dict
        The sidecar as read.  Fields only a kinetic model needs (bolus cut-off, the ASL
        series' slice timing) are checked when asked for: :func:`bolus_cutoff`,
        :func:`asl_slice_timing`.
    aslcontext_file : pathlib.Path or None
        The ``_aslcontext.tsv`` read: the run's own, or one it inherits (BIDS inheritance
        principle); None means ``run.aslcontext``.
    """

    run: AslRun
    shape: tuple[int, ...]
    n_volumes: int
    volume_types: tuple[str, ...]
    labeling_type: str
    alpha: float
    m0_type: str
    m0: M0Source
    tr: tuple[float, ...]
    te_ms: float
    field_strength: float
    magnetic_field_strength: float
    look_locker: bool
    flip_angle: tuple[float, ...] | None
    post_labeling_delay: tuple[float, ...] | None
    inversion_time: tuple[float, ...] | None
    labeling_duration: tuple[float, ...] | None
    background_suppression: bool | None
    metadata: dict = field(repr=False, compare=False)
    aslcontext_file: Path | None = None

    @property
    def aslcontext(self) -> Path:
        """The ``_aslcontext.tsv`` read (the run's own or an inherited one)."""
        return self.run.aslcontext if self.aslcontext_file is None else self.aslcontext_file

    @property
    def sidecar_files(self) -> tuple[Path, ...]:
        """The ASL JSON files the metadata was merged from (BIDS inheritance), most general first."""
        return _files(self.metadata, self.run.sidecar)

    def source_of(self, name: str) -> Path:
        """The JSON file that gave field ``name`` (the run's own sidecar when none has it)."""
        return _src(self.metadata, self.run.sidecar, name)

    def volumes_of(self, volume_type: str) -> tuple[int, ...]:
        """Indices (0-based) of the ASL volumes of one ``volume_type``."""
        if volume_type not in ASL_VOLUME_TYPES:
            raise InputError(f"volume_type={volume_type!r}: expected one of {ASL_VOLUME_TYPES}")
        return tuple(i for i, v in enumerate(self.volume_types) if v == volume_type)

    def load_asl(self, *, dtype: Any = "float32") -> Image:
        """Read the ASL image (all volumes) with :func:`aslcal.io.load_image`."""
        return load_image(self.run.asl, dtype=dtype, name=f"ASL image of {self.run.key}")

    def load_m0(self, *, dtype: Any = "float32") -> Image:
        """Read the M0 volumes as a 4-D image of shape (x, y, z, len(m0.volumes)).

        Raises
        ------
        InputError
            For ``M0Type`` "Estimate" (no M0 image: use ``m0.estimate``; a
            :class:`BidsFieldError` with ``field`` "M0Type"), an M0 image with fewer
            volumes than indexed (a :class:`BidsFieldError`), or an unreadable file.
        """
        src = self.m0
        if src.kind == "estimate" or src.path is None:
            where = self.source_of("M0Type")
            raise BidsFieldError(
                f"{where}: M0Type 'Estimate' has no M0 image; "
                f"use the M0Estimate value {src.estimate} (of {self.source_of('M0Estimate')})",
                file=where, field="M0Type",
            )
        name = f"M0 ({src.kind}) of {self.run.key}"
        img = load_image(src.path, dtype=dtype, name=name)
        data = img.data if img.ndim == 4 else img.data[..., None]
        if data.shape[3] <= max(src.volumes):
            raise BidsFieldError(
                f"{name} {str(src.path)!r}: has {data.shape[3]} volumes, expected at "
                f"least {max(src.volumes) + 1}",
                file=src.path,
            )
        if src.volumes != tuple(range(data.shape[3])):
            data = np.ascontiguousarray(data[..., list(src.volumes)])
        return Image(data=data, affine=img.affine, header=img.header, path=img.path)


# ---------------------------------------------------------------------- validation


class Sidecar(dict):
    """Sidecar metadata merged over the BIDS inheritance levels.

    A ``dict`` of the fields; ``files`` are the JSON files it was merged from (most
    general first) and ``origin`` maps each field to the file that gave it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.files: tuple[Path, ...] = ()
        self.origin: dict[str, Path] = {}

    def source(self, name: str, default: Path) -> Path:
        """The file that gave field ``name`` (``default`` when no file has it)."""
        return self.origin.get(name, default)


def _files(meta: dict, path: Path) -> tuple[Path, ...]:
    """The JSON files ``meta`` was merged from (``(path,)`` for a plain dict)."""
    return meta.files if isinstance(meta, Sidecar) else (path,)


def _src(meta: dict, path: Path, name: str) -> Path:
    """Where field ``name`` of ``meta`` came from (``path`` for a plain dict)."""
    return meta.source(name, path) if isinstance(meta, Sidecar) else path


def _applicable_sidecars(own: Path, run: "AslRun") -> list[Path]:
    """The JSON files that apply to ``own`` (the run's sidecar name) by the BIDS
    inheritance principle, most general first; two at one level are an error.

    Applicable names are the run's entities, any subset in BIDS order, with the suffix:
    they are probed by name (a few ``stat`` calls per level) rather than by listing the
    folders, whose root holds every subject of the dataset.
    """
    suffix = own.name.rsplit("_", 1)[-1]  # "asl.json", "m0scan.json"
    # the file's own entities: an m0scan found by IntendedFor may have fewer than the run
    entities = _ENTITY.findall(own.name[: -len(suffix) - 1])
    perf = own.parent
    top = perf.parent.parent.parent if run.session is not None else perf.parent.parent
    levels = [top, top / f"sub-{run.subject}"]
    if run.session is not None:
        levels.append(top / f"sub-{run.subject}" / f"ses-{run.session}")
    levels.append(perf)
    pairs = [f"{k}-{v}" for k, v in entities]  # in BIDS order (discover checked the run's)
    names = ["_".join(p for bit, p in enumerate(pairs) if mask >> bit & 1) for mask in range(1 << len(pairs))]
    names = sorted({f"{n}_{suffix}" if n else suffix for n in names}, key=len)
    out: list[Path] = []
    for level in levels:
        # a link whose content is not fetched counts as present: reading it then says so
        found = [level / n for n in names if (level / n).is_file() or (level / n).is_symlink()]
        if len(found) > 1:
            raise BidsFieldError(
                f"{found[0]} and {found[1].name} both apply to {own.name} at one level "
                "(BIDS inheritance principle); keep one", file=found[1],
            )
        out += found
    return out


def run_sidecars(run: "AslRun") -> tuple[list[Path], list[Path]]:
    """The JSON files that apply to the run's ASL image (and the ``_aslcontext.tsv`` it
    reads, last) and to its m0scan (none without one), by the inheritance principle, most
    general first; as :func:`read_run` reads them."""
    asl = _applicable_sidecars(run.sidecar, run) + _applicable_sidecars(run.aslcontext, run)[-1:]
    m0 = _applicable_sidecars(run.m0scan_sidecar, run) if run.m0scan_sidecar is not None else []
    return asl, m0


def dataset_path(path: Path | None, root: Path | None) -> str | None:
    """``path`` relative to ``root`` as named in the dataset, else absolute.

    Symbolic links inside the dataset are not followed: a DataLad/git-annex file is
    ``sub-01/perf/sub-01_asl.nii.gz``, not the annex object it points to.
    """
    if path is None:
        return None
    absolute = Path(os.path.abspath(path))
    if root is not None:
        # then with the folders' links followed (a root given through a link), never the file's
        folder_real = Path(os.path.realpath(absolute.parent)) / absolute.name
        for p, r in ((absolute, Path(os.path.abspath(root))), (folder_real, Path(root).resolve())):
            try:
                return p.relative_to(r).as_posix()
            except ValueError:
                pass
    return absolute.as_posix()


def input_checksum(path: Path) -> str:
    """``crc32:<hex>`` of a NIfTI image's uncompressed bytes, ``sha256:<hex>`` of any other
    (small) input; ``""`` when unreadable.  A cheap fingerprint of an input's content (a
    resume's change check): a ``.nii.gz`` records the CRC-32 in its gzip trailer (of the
    last member), so nothing is decompressed."""
    path = Path(path)
    try:
        if path.name.endswith(".nii.gz"):
            with open(path, "rb") as fh:
                fh.seek(-8, os.SEEK_END)
                return "crc32:" + fh.read(4)[::-1].hex()  # little-endian CRC32, then ISIZE
        if path.name.endswith(".nii"):
            crc = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            return f"crc32:{crc & 0xFFFFFFFF:08x}"
        return "sha256:" + sha256_file(path)
    except OSError:
        return ""


def _read_sidecar(own: Path, run: "AslRun", what: str) -> Sidecar:
    """The run's sidecar ``own`` merged with the ones it inherits (module docstring)."""
    files = _applicable_sidecars(own, run)
    if not files:
        _read_json(own, what)  # raises: the run's own sidecar is missing (it would be found)
    meta = Sidecar()
    for f in files:
        obj = _read_json(f, what)
        meta.update(obj)
        meta.origin.update(dict.fromkeys(obj, f))
    meta.files = tuple(files)
    return meta


def _dangling(path: Path) -> str:
    """The hint for a missing file that is a symbolic link (content not fetched), or ''."""
    return (" (a symbolic link to a missing file: DataLad/git-annex content not fetched?)"
            if Path(path).is_symlink() else "")


class _DuplicateField(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are unique: Python's parser keeps the last of two equal keys,
    and which of two EchoTime values is meant is not the parser's choice to make."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateField(key)
        out[key] = value
    return out


def _parse_json(text: str) -> Any:
    # an integer too long for Python's int parsing becomes a float (inf): the field's
    # check then names it, instead of a parser error without a field
    return json.loads(text, parse_int=lambda s: int(s) if len(s) <= 4000 else float(s),
                      object_pairs_hook=_object_without_duplicates)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BidsFieldError(f"{path}: {what} sidecar is missing{_dangling(path)}; expected a JSON file",
                             file=path)
    try:
        obj = _parse_json(path.read_text(encoding="utf-8-sig"))
    except _DuplicateField as exc:
        raise BidsFieldError(f"{path}: field {exc.name!r} is given twice in the {what} JSON: which value is meant "
                             "is unknown", file=path, field=exc.name) from exc
    except RecursionError as exc:
        raise BidsFieldError(f"{path}: cannot read the {what} JSON (nested too deeply)", file=path) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an int of > 4300 digits
        raise BidsFieldError(f"{path}: cannot read the {what} JSON ({exc})", file=path) from exc
    if not isinstance(obj, dict):
        raise BidsFieldError(f"{path}: expected a JSON object, got {type(obj).__name__}",
                             file=path)
    return obj


def _shown(value: Any) -> str:
    """``repr(value)``, shortened when long (a 400-digit number is no message)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:24]}...{text[-8:]} ({len(text)} characters)"


def is_number(value: Any) -> bool:
    """A finite JSON number (not a boolean; an integer too large for a float is not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _require(meta: dict, path: Path, name: str, why: str = "") -> Any:
    path = _src(meta, path, name)
    if name not in meta or meta[name] is None:
        raise BidsFieldError(f"{path}: required field {name!r} is missing{why}",
                             file=path, field=name)
    return meta[name]


#: Most background-suppression pulses a sequence has (a larger count is not one).
MAX_BS_PULSES = 20


def background_suppression_pulses(acq: AslAcquisition) -> int | None:
    """The run's ``BackgroundSuppressionNumberPulses``: None if absent, else an integer
    0..20 (read only by what uses it: anything else is a :class:`BidsFieldError`)."""
    name = "BackgroundSuppressionNumberPulses"
    value = acq.metadata.get(name)
    if value is None:
        return None
    where = acq.source_of(name)
    if not (is_number(value) and float(value).is_integer() and 0 <= value <= MAX_BS_PULSES):
        raise BidsFieldError(f"{where}: field {name!r} = {_shown(value)}: expected a number of pulses, "
                             f"0 to {MAX_BS_PULSES}", file=where, field=name)
    return int(value)


def _field(meta: dict, path: Path, name: str, *, required: bool, why: str = "") -> Any:
    """The field's value; a missing required field is an InputError, a missing optional one None."""
    return _require(meta, path, name, why) if required else meta.get(name)


#: Upper limits (seconds) of BIDS times: above them a value was written in milliseconds,
#: which BIDS does not use (an EchoTime of 14 "seconds" would make M0a ~1e-13).
MAX_ECHO_TIME_S = 1.0
MAX_TR_S = 100.0
MAX_DELAY_S = 30.0


def _check_value(value: Any, path: Path, name: str, *, low: float, low_open: bool,
                 high: float | None = None, unit: str, key: str | None = None) -> float:
    """Check one number; ``name`` is as shown (``"X[2]"``), ``key`` the JSON key (``"X"``)."""
    key = name if key is None else key
    expected = f"a number {'>' if low_open else '>='} {low}" + (
        f" and < {high}" if high is not None else ""
    ) + f" ({unit})"
    if unit == "s" and high is not None and is_number(value) and float(value) >= high:
        expected += "; BIDS times are in seconds, not milliseconds"
    if not is_number(value):
        raise BidsFieldError(f"{path}: field {name!r} = {_shown(value)}: expected {expected}",
                             file=path, field=key)
    v = float(value)
    if (v <= low if low_open else v < low) or (high is not None and v >= high):
        raise BidsFieldError(f"{path}: field {name!r} = {_shown(value)}: expected {expected}",
                             file=path, field=key)
    return v


def _scalar(meta: dict, path: Path, name: str, *, required: bool, low: float = 0.0,
            low_open: bool = False, high: float | None = None, unit: str = "s",
            why: str = "") -> float | None:
    value = _field(meta, path, name, required=required, why=why)
    if value is None:
        return None
    path = _src(meta, path, name)
    return _check_value(value, path, name, low=low, low_open=low_open, high=high, unit=unit)


def _per_volume(meta: dict, path: Path, name: str, n: int, *, required: bool,
                low: float = 0.0, low_open: bool = False, high: float | None = None,
                unit: str = "s", why: str = "", closed_for: frozenset[int] = frozenset()
                ) -> tuple[float, ...] | None:
    """A number (broadcast to ``n``) or a list of exactly ``n`` numbers; the volumes in
    ``closed_for`` (unused ones) may equal ``low`` even when ``low_open``."""
    value = _field(meta, path, name, required=required, why=why)
    if value is None:
        return None
    path = _src(meta, path, name)
    if isinstance(value, list):
        if len(value) != n:
            raise BidsFieldError(
                f"{path}: field {name!r} has {len(value)} values but the image has "
                f"{n} volumes; expected one number or one per volume",
                file=path, field=name,
            )
        return tuple(
            _check_value(v, path, f"{name}[{i}]", low=low, low_open=low_open and i not in closed_for,
                         high=high, unit=unit, key=name)
            for i, v in enumerate(value)
        )
    v = _check_value(value, path, name, low=low, low_open=low_open and len(closed_for) < n, high=high,
                     unit=unit)
    return (v,) * n


def _flag(meta: dict, path: Path, name: str, *, required: bool = False, why: str = "") -> bool | None:
    value = _field(meta, path, name, required=required, why=why)
    if value is None:
        return None
    path = _src(meta, path, name)
    if not isinstance(value, bool):
        raise BidsFieldError(f"{path}: field {name!r} = {value!r}: expected true or false",
                             file=path, field=name)
    return value


def _echo_time_ms(meta: dict, path: Path, n: int, volumes: tuple[int, ...] | None = None,
                  what: str = "ASL") -> float:
    """The one echo time (ms) of ``volumes`` (None: all); several are multi-echo data."""
    # BIDS: EchoTime > 0 (a readout has an echo); 0 would silently drop the T2 corrections
    values = _per_volume(meta, path, "EchoTime", n, required=True, low=0.0, low_open=True, high=MAX_ECHO_TIME_S,
                         unit="s")
    assert values is not None
    path = _src(meta, path, "EchoTime")
    chosen = [values[i] for i in volumes] if volumes else list(values)
    if len(set(chosen)) > 1:
        which = "" if not volumes or len(volumes) == n else f" over the {what} volumes {list(volumes)}"
        raise BidsFieldError(
            f"{path}: field 'EchoTime' has several values {sorted(set(chosen))}{which}; "
            f"multi-echo {what} is not supported (expected one echo time, seconds)",
            file=path, field="EchoTime",
        )
    return chosen[0] * 1000.0  # BIDS seconds -> aslcal milliseconds


def _field_strength(meta: dict, path: Path) -> tuple[float, float]:
    raw = _scalar(meta, path, "MagneticFieldStrength", required=True, low=0.0,
                  low_open=True, unit="T")
    assert raw is not None
    path = _src(meta, path, "MagneticFieldStrength")
    for fs in _FIELD_STRENGTHS:
        if abs(raw - fs) <= _FIELD_TOLERANCE:
            return fs, raw
    raise BidsFieldError(
        f"{path}: field 'MagneticFieldStrength' = {raw!r}: no tissue table for this field; "
        f"expected 1.5, 3 or 7 (tesla)",
        file=path, field="MagneticFieldStrength",
    )


def _n_volumes(image: Path, what: str) -> tuple[tuple[int, ...], int]:
    """Shape and volume count from the NIfTI header only (nibabel proxies are lazy)."""
    if not image.is_file():
        raise BidsFieldError(f"{image}: {what} image is missing{_dangling(image)}", file=image)
    try:
        shape = tuple(int(s) for s in nibabel.load(os.fspath(image)).shape)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for bad headers
        raise BidsFieldError(f"{image}: cannot read the {what} NIfTI header ({exc})",
                             file=image) from exc
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise BidsFieldError(f"{image}: {what} image has shape {shape}; expected 3-D or 4-D",
                             file=image)
    extra = shape[4:]
    if any(s != 1 for s in extra):
        raise BidsFieldError(f"{image}: {what} image has shape {shape}; expected 3-D or 4-D",
                             file=image)
    return shape, (shape[3] if len(shape) >= 4 else 1)


def _read_aslcontext(path: Path, n: int, image: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise BidsFieldError(
            f"{path}: aslcontext file is missing{_dangling(path)}; expected a TSV with 'volume_type'", file=path
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no part of the header
    except (OSError, UnicodeDecodeError) as exc:
        raise BidsFieldError(f"{path}: cannot read the aslcontext TSV ({exc})", file=path) from exc
    # (physical line number, cells) of the non-blank lines: errors cite the line as in an editor
    rows = [(i, r) for i, r in enumerate(csv.reader(text.splitlines(), delimiter="\t"), start=1)
            if r and any(c.strip() for c in r)]
    if not rows:
        raise BidsFieldError(f"{path}: aslcontext is empty; expected a header 'volume_type'",
                             file=path, field="volume_type")
    header = [c.strip() for c in rows[0][1]]
    if "volume_type" not in header:
        raise BidsFieldError(f"{path}: column 'volume_type' is missing (header {header})",
                             file=path, field="volume_type")
    if header.count("volume_type") > 1:
        raise BidsFieldError(f"{path}: column 'volume_type' appears {header.count('volume_type')} times "
                             f"(header {header}): which one is meant is unknown", file=path, field="volume_type")
    col = header.index("volume_type")
    types = []
    for line, row in rows[1:]:
        raw = row[col].strip() if col < len(row) else ""
        canon = _VOLUME_TYPE_LOOKUP.get(raw.lower())
        if canon is None:
            raise BidsFieldError(
                f"{path}: column 'volume_type' line {line} = {raw!r}: "
                f"expected one of {', '.join(ASL_VOLUME_TYPES)}",
                file=path, field="volume_type",
            )
        types.append(canon)
    if len(types) != n:
        raise BidsFieldError(
            f"{path}: column 'volume_type' has {len(types)} entries but {image.name} has "
            f"{n} volumes; expected one entry per volume",
            file=path, field="volume_type",
        )
    return tuple(types)


# ----------------------------------------------------------------------------- read


def read_run(run: AslRun, *, allow_control_m0: bool = False) -> AslAcquisition:
    """Read and check the metadata of one ASL run (no image data are loaded).

    Parameters
    ----------
    run : AslRun
        From :func:`discover`.
    allow_control_m0 : bool, optional
        For ``M0Type`` "Absent": use the mean control image as M0, allowed only when
        the sidecar says ``BackgroundSuppression`` is false (suppressed controls are
        not an M0).  Default False: "Absent" is an error.

    Returns
    -------
    AslAcquisition

    Raises
    ------
    BidsFieldError
        An :class:`~aslcal.errors.InputError` naming the file and the field in its
        message and as ``.file``/``.field``: a missing or unreadable sidecar,
        aslcontext or image header (``field`` None); a missing required field (see
        the module docstring); a value that makes no sense
        (``RepetitionTimePreparation`` <= 0 on a volume that is used, negative delays,
        unknown labelling or M0 type, a field strength without a tissue table, an array
        whose length is not the number of volumes; ``field`` is the JSON key, without
        the ``[i]`` of an array element); an aslcontext whose length differs from the
        number of volumes or with an unknown ``volume_type`` (``field``
        "volume_type"); ``SliceTiming`` that contradicts ``MRAcquisitionType`` where
        slice delays are used; an m0scan whose ``IntendedFor`` names another image, or
        two m0scans naming this one ("IntendedFor");
        ``M0Type`` "Separate" without an m0scan file (the file that gave "M0Type");
        "Included" without m0scan volumes (the aslcontext, "volume_type"); "Estimate"
        without a positive ``M0Estimate``; "Absent" (unless allowed, see
        ``allow_control_m0``; "M0Type", also when refused for
        ``BackgroundSuppression`` true).
    InputError
        ``run`` is not an :class:`AslRun`.
    """
    if not isinstance(run, AslRun):
        raise InputError(f"run={run!r}: expected an AslRun from discover()")
    if run.duplicate is not None:
        raise BidsFieldError(
            f"{run.asl}: the run has two images, {run.asl.name} and {run.duplicate.name}; "
            "keep one", file=run.duplicate,
        )
    js = run.sidecar
    meta = _read_sidecar(js, run, "ASL")
    shape, n = _n_volumes(run.asl, "ASL")
    tsv = _aslcontext_file(run)
    volume_types = _read_aslcontext(tsv, n, run.asl)
    unused = frozenset(i for i, v in enumerate(volume_types) if v in _UNUSED_VOLUME_TYPES)

    lab = _require(meta, js, "ArterialSpinLabelingType")
    if not isinstance(lab, str) or lab.upper() not in DEFAULT_ALPHA:
        where = _src(meta, js, "ArterialSpinLabelingType")
        raise BidsFieldError(
            f"{where}: field 'ArterialSpinLabelingType' = {lab!r}: expected PCASL, CASL or PASL",
            file=where, field="ArterialSpinLabelingType",
        )
    lab = lab.upper()
    eff = _scalar(meta, js, "LabelingEfficiency", required=False, low=0.0, low_open=True,
                  high=1.0 + 1e-12, unit="fraction")
    alpha = DEFAULT_ALPHA[lab] if eff is None else eff

    m0_type = _require(meta, js, "M0Type")
    m0js = _src(meta, js, "M0Type")
    if m0_type not in _M0_TYPES:
        raise BidsFieldError(
            f"{m0js}: field 'M0Type' = {m0_type!r}: expected one of {', '.join(_M0_TYPES)}",
            file=m0js, field="M0Type",
        )

    # BIDS allows 0 (a volume without preparation): only for a volume aslcal does not use
    tr = _per_volume(meta, js, "RepetitionTimePreparation", n, required=True, low=0.0,
                     low_open=True, high=MAX_TR_S, unit="s", closed_for=unused)
    assert tr is not None
    # the ASL volumes' echo (blood T2 decay of M0a); the m0scan volumes of the series may
    # have their own (the M0's tissue T2 correction, as a separate m0scan's)
    asl_volumes = tuple(i for i, v in enumerate(volume_types) if v != "m0scan" and i not in unused)
    te_ms = _echo_time_ms(meta, js, n, asl_volumes or None)
    fs, fs_raw = _field_strength(meta, js)
    look_locker = bool(_flag(meta, js, "LookLocker"))
    # the M0 volumes of the series are the Look-Locker readout fitted (Included; Absent: the controls)
    fitted = {"Included": "m0scan", "Absent": "control"}.get(m0_type)
    flip = _flip_angles(meta, js, n, look_locker,
                        frozenset(i for i, v in enumerate(volume_types) if v == fitted))
    pld = _per_volume(meta, js, "PostLabelingDelay", n, required=False, high=MAX_DELAY_S, unit="s")
    ti = _per_volume(meta, js, "InversionTime", n, required=False, high=MAX_DELAY_S, unit="s")
    ld = _per_volume(meta, js, "LabelingDuration", n, required=False, high=MAX_DELAY_S, unit="s")
    bs = _flag(meta, js, "BackgroundSuppression")

    if m0_type == "Separate":
        m0 = _separate_m0(run, m0js)
    elif m0_type == "Included":
        idx = tuple(i for i, v in enumerate(volume_types) if v == "m0scan")
        if not idx:
            raise BidsFieldError(
                f"{tsv}: column 'volume_type' has no 'm0scan' volume but "
                f"{m0js.name} says M0Type 'Included'",
                file=tsv, field="volume_type",
            )
        times = ti if ti is not None else pld
        # the slice delays enter the fit of a recovery series only
        slices, axis = _slice_timing(meta, js, shape,
                                     check_type=look_locker or len({tr[i] for i in idx}) > 1,
                                     below=(max(tr[i] for i in idx), "the longest recovery time (RepetitionTimePreparation) of the M0 volumes"))
        m0 = M0Source(
            kind="included", path=run.asl, volumes=idx, trs=tuple(tr[i] for i in idx),
            tis=None if times is None else tuple(times[i] for i in idx),
            te_ms=_echo_time_ms(meta, js, n, idx, "M0"),
            look_locker=look_locker,
            flip_angle=None if flip is None else tuple(flip[i] for i in idx),
            estimate=None, sidecar=js, slice_timing=slices, slice_axis=axis, metadata=meta,
        )
    elif m0_type == "Estimate":
        est = _scalar(meta, js, "M0Estimate", required=True, low=0.0, low_open=True,
                      unit="signal units", why=" (required with M0Type 'Estimate')")
        m0 = M0Source(kind="estimate", path=None, volumes=(), trs=(), tis=None, te_ms=te_ms,
                      look_locker=False, flip_angle=None, estimate=est, sidecar=js, metadata=meta)
    else:  # Absent
        if not allow_control_m0:
            raise BidsFieldError(
                f"{m0js}: field 'M0Type' = 'Absent': no M0 for calibration; provide an M0 "
                "scan, or allow the mean control image as M0 (allow_control_m0, "
                "--allow-control-m0; only without background suppression)",
                file=m0js, field="M0Type",
            )
        bs_req = _flag(meta, js, "BackgroundSuppression", required=True,
                       why=" (needed to use the control images as M0 with M0Type 'Absent')")
        if bs_req:
            # The run has no usable M0: 'M0Type' Absent is what is wrong (as without
            # allow_control_m0); BackgroundSuppression only rules out the fallback.
            bs_js = _src(meta, js, "BackgroundSuppression")
            raise BidsFieldError(
                f"{m0js}: field 'M0Type' = 'Absent' with field 'BackgroundSuppression' = true"
                + ("" if bs_js == m0js else f" (in {bs_js})")
                + ": background-suppressed control images are not an M0",
                file=m0js, field="M0Type",
            )
        idx = tuple(i for i, v in enumerate(volume_types) if v == "control")
        if not idx:
            raise BidsFieldError(
                f"{tsv}: column 'volume_type' has no 'control' volume to use "
                "as M0 (M0Type 'Absent')",
                file=tsv, field="volume_type",
            )
        m0 = M0Source(kind="control", path=run.asl, volumes=idx, trs=tuple(tr[i] for i in idx),
                      tis=None, te_ms=te_ms, look_locker=look_locker,
                      flip_angle=None if flip is None else tuple(flip[i] for i in idx),
                      estimate=None, sidecar=js, metadata=meta)

    return AslAcquisition(
        run=run, shape=shape, n_volumes=n, volume_types=volume_types, labeling_type=lab,
        alpha=alpha, m0_type=m0_type, m0=m0, tr=tr, te_ms=te_ms, field_strength=fs,
        magnetic_field_strength=fs_raw, look_locker=look_locker, flip_angle=flip,
        post_labeling_delay=pld, inversion_time=ti, labeling_duration=ld,
        background_suppression=bs, metadata=meta, aslcontext_file=tsv,
    )


def bolus_cutoff(acq: AslAcquisition) -> tuple[float, ...] | None:
    """``BolusCutOffDelayTime`` of a run whose ``BolusCutOffFlag`` is true, else None.

    One delay per bolus cut-off saturation pulse (Q2TIPS: the first and the last),
    non-negative and increasing; the first is the bolus duration TI1 of QUIPSS II /
    Q2TIPS.  A :class:`BidsFieldError` names the sidecar and the field when they make no
    sense.
    """
    js, meta = acq.run.sidecar, acq.metadata
    if not _flag(meta, js, "BolusCutOffFlag"):
        return None
    raw = _require(meta, js, "BolusCutOffDelayTime", " (required with BolusCutOffFlag true)")
    values = raw if isinstance(raw, list) and raw else [raw]
    out = tuple(_check_value(v, _src(meta, js, "BolusCutOffDelayTime"), "BolusCutOffDelayTime", low=0.0, low_open=False, high=MAX_DELAY_S,
                             unit="s") for v in values)
    if any(b < a for a, b in zip(out, out[1:])):
        js = _src(meta, js, "BolusCutOffDelayTime")
        raise BidsFieldError(f"{js}: field 'BolusCutOffDelayTime' = {raw!r}: expected increasing delays (s), "
                             "one per bolus cut-off pulse", file=js, field="BolusCutOffDelayTime")
    return out


def asl_slice_timing(acq: AslAcquisition) -> tuple[tuple[float, ...] | None, int]:
    """``SliceTiming`` of the ASL series by slice index along its slice axis (None: a 3-D
    readout), and that axis; a :class:`BidsFieldError` when it does not fit the image, or
    when it contradicts ``MRAcquisitionType`` (a 2-D readout without it, a 3-D one with it)."""
    used = [t for t, v in zip(acq.tr, acq.volume_types) if v in ("control", "label", "deltam", "cbf") and t > 0]
    return _slice_timing(acq.metadata, acq.run.sidecar, acq.shape, check_type=True,
                         hint="; or use --quantification calibration",
                         below=(min(used), "the repetition time (RepetitionTimePreparation) of the ASL volumes, "
                                "within which each is read") if used else None)


def _flip_angles(meta: dict, js: Path, n: int, look_locker: bool,
                 readout: frozenset[int] | None = None) -> tuple[float, ...] | None:
    """``FlipAngle`` per volume when ``LookLocker`` is true, else None (BIDS allows up to
    360 degrees and aslcal does not use the excitation angle of other readouts).  The
    volumes of the Look-Locker series aslcal fits (``readout``; None: all) must have a
    readout angle in (0, 90) degrees, the others one in (0, 360] (BIDS)."""
    if not look_locker:
        return None
    values = _per_volume(meta, js, "FlipAngle", n, required=True, low=0.0, low_open=True, unit="degrees",
                         why=" (required with LookLocker true)")
    assert values is not None
    where = _src(meta, js, "FlipAngle")
    shown = isinstance(meta["FlipAngle"], list)
    fitted_values = [v for i, v in enumerate(values) if readout is None or i in readout]
    if fitted_values and max(fitted_values) < 1.0:
        raise BidsFieldError(
            f"{where}: field 'FlipAngle' = {_shown(meta['FlipAngle'])}: Look-Locker readout angles below 1 "
            "degree; radians? BIDS FlipAngle is in degrees", file=where, field="FlipAngle")
    for i, v in enumerate(values):
        fitted = readout is None or i in readout
        if v >= 90.0 if fitted else v > 360.0:
            name = f"FlipAngle[{i}]" if shown else "FlipAngle"
            expected = ("a Look-Locker readout angle > 0 and < 90 (degrees)" if fitted
                        else "a number > 0 and <= 360 (degrees)")
            raise BidsFieldError(f"{where}: field {name!r} = {_shown(v)}: expected {expected}",
                                 file=where, field="FlipAngle")
    return values


def _aslcontext_file(run: AslRun) -> Path:
    """The ``_aslcontext.tsv`` that applies to the run: its own, else the lowest one in the
    hierarchy by the inheritance principle (as the sidecars); the run's own name when none
    exists (reading it then says it is missing)."""
    files = _applicable_sidecars(run.aslcontext, run)
    return files[-1] if files else run.aslcontext


def _separate_m0(run: AslRun, m0js: Path) -> M0Source:
    if run.m0scan is None or run.m0scan_sidecar is None:
        unreadable = _unreadable_m0scan_sidecars(run.asl.parent)
        if unreadable:
            # one of them may be the run's M0 (linked by its IntendedFor): it is what is wrong
            path, exc = unreadable[0]
            raise BidsFieldError(
                f"{path}: cannot read the m0scan JSON ({exc}); the run has no m0scan of its own name "
                f"({run.key}_m0scan.nii[.gz]), so this one's IntendedFor may name {run.asl.name} "
                f"(M0Type 'Separate' in {m0js.name})", file=path)
        raise BidsFieldError(
            f"{m0js}: field 'M0Type' = 'Separate' but the m0scan image "
            f"{run.key}_m0scan.nii[.gz] is missing in {run.asl.parent} (and no m0scan there names "
            f"{run.asl.name} in its IntendedFor)",
            file=m0js, field="M0Type",
        )
    if run.m0scan_duplicate is not None:
        raise BidsFieldError(
            f"{run.m0scan}: the run has two m0scan images, {run.m0scan.name} and "
            f"{run.m0scan_duplicate.name}; keep one", file=run.m0scan_duplicate,
        )
    js = run.m0scan_sidecar
    meta = _read_sidecar(js, run, "m0scan")
    if "IntendedFor" in meta:
        # BIDS: the m0scan is for the images IntendedFor names; one paired by name alone
        # that names another ASL image is not this run's M0
        where = _src(meta, js, "IntendedFor")
        targets = _intended_for(meta["IntendedFor"])
        if targets is None:
            raise BidsFieldError(
                f"{where}: field 'IntendedFor' = {_shown(meta['IntendedFor'])}: expected a path or BIDS URI, "
                "or a list of them", file=where, field="IntendedFor")
        rel = _asl_rel(run.subject, run.session, run.asl)
        if not any(_names_image(t, run.subject, rel) for t in targets):
            raise BidsFieldError(
                f"{where}: field 'IntendedFor' = {_shown(meta['IntendedFor'])} does not name {run.asl.name} "
                f"(bids::{rel}): this m0scan is meant for other images, not this run's M0",
                file=where, field="IntendedFor")
    if run.m0scan_others:
        other = run.m0scan_others[0]
        other_js = other.parent / (_M0SCAN_NAME.match(other.name).group("prefix") + "_m0scan.json")
        ours = (f"as {run.m0scan_sidecar.name} does" if run.m0scan_linked else
                f"whose m0scan by name is {run.m0scan.name}")
        raise BidsFieldError(
            f"{other_js}: field 'IntendedFor' names {run.asl.name}, {ours}: "
            "which m0scan is this run's M0 is unknown; keep one", file=other_js, field="IntendedFor",
        )
    shape, n = _n_volumes(run.m0scan, "m0scan")
    trs = _per_volume(meta, js, "RepetitionTimePreparation", n, required=True, low=0.0,
                      low_open=True, high=MAX_TR_S, unit="s")
    assert trs is not None
    te_ms = _echo_time_ms(meta, js, n)
    look_locker = bool(_flag(meta, js, "LookLocker"))
    flip = _flip_angles(meta, js, n, look_locker)
    tis = _per_volume(meta, js, "InversionTime", n, required=look_locker, high=MAX_DELAY_S, unit="s",
                      why=" (required with LookLocker true: the readout times)")
    if not look_locker:
        _not_look_locker(meta, js, n, tis)
    # the slice delays enter the fit of a recovery series only
    slices, axis = _slice_timing(meta, js, shape, check_type=look_locker or len(set(trs)) > 1,
                                 below=(max(trs), "the longest recovery time (RepetitionTimePreparation)"))
    return M0Source(kind="separate", path=run.m0scan, volumes=tuple(range(n)), trs=trs,
                    tis=tis, te_ms=te_ms, look_locker=look_locker, flip_angle=flip,
                    estimate=None, sidecar=js, slice_timing=slices, slice_axis=axis,
                    metadata=meta)


def _not_look_locker(meta: dict, js: Path, n: int, tis: tuple[float, ...] | None) -> None:
    """An m0scan that is not a Look-Locker series (``LookLocker`` false or absent) but whose
    volumes have different ``InversionTime`` or ``FlipAngle`` values contradicts itself: it
    is a Look-Locker readout whose flag is missing (converters often leave it out), and
    averaged as one M0 its readouts would give an M0a several times too low."""
    flips = None
    if isinstance(meta.get("FlipAngle"), list):
        flips = _per_volume(meta, js, "FlipAngle", n, required=False, low=0.0, low_open=True, unit="degrees")
    for name, values in (("InversionTime", tis), ("FlipAngle", flips)):
        if values is not None and len(set(values)) > 1:
            where = _src(meta, js, "LookLocker") if "LookLocker" in meta else js
            flag = f"'LookLocker' = {_shown(meta['LookLocker'])}" if "LookLocker" in meta else "no field 'LookLocker'"
            raise BidsFieldError(
                f"{where}: {flag}, but field {name!r} differs between the m0scan's volumes "
                f"({_shown(min(values))} to {_shown(max(values))}): a Look-Locker M0 series says "
                "\"LookLocker\": true and is fitted; a plain M0 has one value for all its volumes",
                file=where, field="LookLocker")


_SLICE_DIRECTIONS = ("i", "j", "k", "i-", "j-", "k-")


def _acquisition_type(meta: dict, js: Path) -> str | None:
    """``MRAcquisitionType`` as "2D" or "3D", None when absent; anything else is an error."""
    raw = meta.get("MRAcquisitionType")
    if raw is None:
        return None
    kind = raw.strip().upper() if isinstance(raw, str) else None
    if kind not in ("2D", "3D"):
        where = _src(meta, js, "MRAcquisitionType")
        raise BidsFieldError(f"{where}: field 'MRAcquisitionType' = {_shown(raw)}: expected '2D' or '3D'",
                             file=where, field="MRAcquisitionType")
    return kind


def _slice_timing(meta: dict, js: Path, shape: tuple[int, ...], *, check_type: bool = False,
                  hint: str = "", below: tuple[float, str] | None = None) -> tuple[tuple[float, ...] | None, int]:
    """``SliceTiming`` by slice index along the slice axis, and that axis (module docstring).

    ``check_type`` (the slice delays are used): ``SliceTiming`` must agree with
    ``MRAcquisitionType`` when that is given (BIDS: required for "2D", not allowed for
    "3D"); without ``MRAcquisitionType``, ``SliceTiming`` alone decides.  ``below``:
    ``(seconds, what)``, a time the slice times cannot reach -- an ASL volume's repetition
    time (its readout lies within it), or the longest recovery time of an M0 series (whose
    slices are read after the recovery time, one slice delay apart: a readout longer than
    the longest recovery is no multi-slice readout); milliseconds, most often.
    """
    direction = meta.get("SliceEncodingDirection", "k")
    if direction not in _SLICE_DIRECTIONS:
        js = _src(meta, js, "SliceEncodingDirection")
        raise BidsFieldError(
            f"{js}: field 'SliceEncodingDirection' = {direction!r}: expected one of "
            f"{', '.join(_SLICE_DIRECTIONS)}", file=js, field="SliceEncodingDirection",
        )
    axis = "ijk".index(direction[0])
    raw = meta.get("SliceTiming")
    kind = _acquisition_type(meta, js) if check_type else None
    if raw is None:
        if kind == "2D":
            # without the slice delays a 2-D readout would be taken as 3-D: every slice
            # after the first at the wrong delay (white-paper CBF -28 % in the top slices)
            type_js = _src(meta, js, "MRAcquisitionType")
            raise BidsFieldError(
                f"{js}: required field 'SliceTiming' is missing: 'MRAcquisitionType' is '2D'"
                f"{'' if type_js == js else f' (in {type_js})'} and BIDS requires the slice times of a "
                f"2-D readout (each slice is read that much later){hint}", file=js, field="SliceTiming")
        return None, axis
    js = _src(meta, js, "SliceTiming")
    if kind == "3D":
        type_js = _src(meta, js, "MRAcquisitionType")
        raise BidsFieldError(
            f"{js}: field 'SliceTiming' is given but 'MRAcquisitionType' is '3D'"
            f"{'' if type_js == js else f' (in {type_js})'}: "
            "BIDS does not allow SliceTiming for a 3-D readout, so one of the two is wrong "
            f"(slice delays or none){hint}", file=js, field="SliceTiming")
    ok = isinstance(raw, list) and all(is_number(t) and t >= 0 for t in raw)
    if not ok:
        raise BidsFieldError(
            f"{js}: field 'SliceTiming' = {raw!r}: expected a list of slice times in seconds (>= 0)",
            file=js, field="SliceTiming",
        )
    if len(raw) != shape[axis]:
        raise BidsFieldError(
            f"{js}: field 'SliceTiming' has {len(raw)} entries for {shape[axis]} slices along "
            f"axis {direction[0]} (SliceEncodingDirection {direction!r})", file=js, field="SliceTiming",
        )
    if below is not None and raw and max(raw) >= below[0]:
        late = max(raw)
        raise BidsFieldError(
            f"{js}: field 'SliceTiming' has slice times up to {_shown(late)} s, not below {below[1]} "
            f"{_shown(below[0])} s" + ("; milliseconds? BIDS times are in seconds" if late / 1000.0 < below[0] else "")
            + hint, file=js, field="SliceTiming")
    # A negative direction lists the slices from the highest index down (BIDS).
    times = [float(t) for t in (raw[::-1] if direction.endswith("-") else raw)]
    # BIDS: SliceTiming counts from the start of the volume, while the PLD (the recovery
    # time) runs until the first slice is excited: the delays are relative to that slice
    first = min(times, default=0.0)
    return tuple(t - first for t in times), axis
