"""Tissue parameter tables (T1, T2, T2*, partition coefficient) per field strength.

The numbers live in data files (``tissues_<B0>T.json``, for 1.5 T, 3 T and 7 T) next to
this module, each with its citations and notes on the values that are not well
established; code never hard-codes them.  Units: T1 in seconds, T2 and T2* in
milliseconds, partition coefficient in ml/g.

A user table (:func:`load_tissue_file`) has the same schema and may be partial: only
the values it gives replace the defaults (``tissue_table(..., overrides=...)``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from ..errors import InputError

__all__ = [
    "FIELD_STRENGTHS",
    "PARAMS",
    "TISSUES",
    "TissueParams",
    "load_tissue_file",
    "tissue_table",
    "tissue_table_info",
]

#: Tissues of every table (``blood`` has no partition coefficient).
TISSUES = ("csf", "gm", "wm", "blood")
#: Field strengths (tesla) with a built-in table; the default is 3 T.
FIELD_STRENGTHS = (1.5, 3.0, 7.0)
#: Parameters of a tissue and their units.
PARAMS = {"t1": "s", "t2": "ms", "t2star": "ms", "pc": "ml/g"}


@dataclass(frozen=True)
class TissueParams:
    """Relaxation and partition parameters of one tissue.

    Attributes
    ----------
    t1 : float, seconds
    t2 : float, milliseconds
    t2star : float, milliseconds
    pc : float or None, ml/g (partition coefficient; None for blood)
    """

    t1: float
    t2: float
    t2star: float
    pc: float | None

    def as_dict(self) -> dict[str, float | None]:
        """The parameters by name (JSON-friendly)."""
        return asdict(self)


def _check_field_strength(field_strength: Any) -> float:
    if isinstance(field_strength, bool):
        fs = math.nan
    else:
        try:
            fs = float(field_strength)
        except (TypeError, ValueError):
            fs = math.nan
    if fs not in FIELD_STRENGTHS:
        avail = ", ".join(f"{f:g}" for f in FIELD_STRENGTHS)
        raise InputError(
            f"field_strength={field_strength!r}: no tissue table for this field; expected one of "
            f"{avail} (tesla), or give every value (t1r, t2r, t2b, pc)"
        )
    return fs


@lru_cache(maxsize=None)
def _load(field_strength: float) -> dict:
    name = f"tissues_{field_strength:g}T.json"
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return json.loads(text)


def _check_value(where: str, tissue: str, param: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(
            f"{where}: {tissue}.{param}={value!r}: expected a number ({PARAMS[param]})"
        )
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InputError(
            f"{where}: {tissue}.{param}={value!r}: expected a positive finite number ({PARAMS[param]})"
        )
    return v


def _check_overrides(overrides: Any, where: str) -> dict[str, dict[str, float]]:
    """Validate a partial table ``{tissue: {param: value}}``; return a clean copy."""
    if not isinstance(overrides, Mapping):
        raise InputError(
            f"{where}: expected a mapping like {{'csf': {{'t1': 4.3}}}}, got {type(overrides).__name__}"
        )
    out: dict[str, dict[str, float]] = {}
    for tissue, vals in overrides.items():
        if tissue not in TISSUES:
            raise InputError(f"{where}: unknown tissue {tissue!r}: expected one of {', '.join(TISSUES)}")
        if not isinstance(vals, Mapping):
            raise InputError(
                f"{where}: {tissue}: expected a mapping of parameters ({', '.join(PARAMS)}), got {vals!r}"
            )
        clean: dict[str, float] = {}
        for param, value in vals.items():
            if param not in PARAMS:
                raise InputError(
                    f"{where}: {tissue}: unknown parameter {param!r}: expected one of {', '.join(PARAMS)}"
                )
            if tissue == "blood" and param == "pc":
                if value is None:
                    continue
                raise InputError(f"{where}: blood.pc={value!r}: blood has no partition coefficient")
            clean[param] = _check_value(where, tissue, param, value)
        out[tissue] = clean
    return out


def tissue_table(
    field_strength: float = 3.0, overrides: Mapping[str, Mapping[str, float]] | None = None
) -> dict[str, TissueParams]:
    """Return the tissue parameters at ``field_strength``, with optional overrides.

    Parameters
    ----------
    field_strength : float, tesla
        1.5, 3 or 7 (exactly; 3 T is the default).  Any other value is an error rather
        than the nearest table, since T1 changes strongly with the field.
    overrides : mapping, optional
        A partial table ``{tissue: {param: value}}`` (tissues ``csf``, ``gm``, ``wm``,
        ``blood``; parameters ``t1`` in s, ``t2`` and ``t2star`` in ms, ``pc`` in ml/g),
        e.g. from :func:`load_tissue_file`.  Only the values given replace the defaults.

    Returns
    -------
    dict of str to TissueParams
        ``csf``, ``gm``, ``wm`` and ``blood``.

    Raises
    ------
    InputError
        A field strength without a table, or an override that is not a positive finite
        number, names an unknown tissue or parameter, or gives blood a partition
        coefficient.
    """
    fs = _check_field_strength(field_strength)
    raw = _load(fs)["tissues"]
    table = {name: dict(vals) for name, vals in raw.items()}
    if overrides is not None:
        for tissue, vals in _check_overrides(overrides, "overrides").items():
            table[tissue].update(vals)
    return {name: TissueParams(**vals) for name, vals in table.items()}


def tissue_table_info(field_strength: float = 3.0) -> dict[str, Any]:
    """The built-in table at ``field_strength`` with its units, sources and notes (provenance).

    Parameters
    ----------
    field_strength : float, tesla
        1.5, 3 or 7.
    """
    fs = _check_field_strength(field_strength)
    return json.loads(json.dumps(_load(fs)))


def load_tissue_file(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Read a user tissue table (JSON, the schema of the built-in ``tissues_3T.json``).

    The file holds ``{"tissues": {tissue: {param: value}}}``, partial tables allowed
    (only the values given override the defaults).  Optional keys: ``units`` (if given,
    it must state the units aslcal uses: ``{"t1": "s", "t2": "ms", "t2star": "ms",
    "pc": "ml/g"}``, a guard against T2 in seconds), ``field_strength_T``, ``sources``
    and ``notes`` (kept for the user's records, not used).

    Parameters
    ----------
    path : path
        The JSON file.

    Returns
    -------
    dict
        The validated overrides ``{tissue: {param: value}}``, for
        :func:`tissue_table`'s ``overrides``.

    Raises
    ------
    InputError
        A file that cannot be read or parsed, has no ``tissues`` mapping, unknown keys,
        units other than aslcal's, or values that are not positive finite numbers.
    """
    where = f"tissue table {os.fspath(path)!r}"
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a byte-order mark is no part of the JSON
            # an integer too long for Python's int parsing is kept as a float (inf): the value
            # checks below then name it, instead of a parser error without a key
            data = json.load(fh, parse_int=lambda s: int(s) if len(s) <= 4000 else float(s))
    except OSError as exc:
        raise InputError(f"{where}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: json.JSONDecodeError
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, Mapping) or "tissues" not in data:
        raise InputError(
            f"{where}: expected a JSON object with a 'tissues' entry, e.g. "
            '{"tissues": {"csf": {"t1": 4.3}}}'
        )
    allowed = {"tissues", "units", "field_strength_T", "sources", "notes"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}: expected {sorted(allowed)}")
    units = data.get("units")
    if units is not None:
        if not isinstance(units, Mapping):
            raise InputError(f"{where}: 'units' must be a mapping like {PARAMS}")
        wrong = {k: v for k, v in units.items() if PARAMS.get(k) != v}
        if wrong:
            raise InputError(
                f"{where}: units {wrong} are not aslcal's: expected {PARAMS} (T1 in s, T2 and T2* in ms)"
            )
    return _check_overrides(data["tissues"], where)
