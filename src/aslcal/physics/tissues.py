"""Tissue parameter tables (T1, T2, T2*, partition coefficient) per field strength.

The numbers live in data files (``tissues_<B0>T.json``) next to this module, each with
its citations; code never hard-codes them.  Units: T1 in seconds, T2 and T2* in
milliseconds, partition coefficient in ml/g.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ..errors import InputError

__all__ = ["TissueParams", "tissue_table", "TISSUES"]

TISSUES = ("csf", "gm", "wm", "blood")


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


@lru_cache(maxsize=None)
def _load(field_strength: float) -> dict:
    name = f"tissues_{field_strength:g}T.json"
    try:
        text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"field_strength={field_strength:g} T: no tissue table; available: 3 T"
        ) from None
    return json.loads(text)


def tissue_table(field_strength: float = 3.0) -> dict[str, TissueParams]:
    """Return the default tissue parameters at ``field_strength`` (tesla)."""
    raw = _load(float(field_strength))["tissues"]
    return {name: TissueParams(**vals) for name, vals in raw.items()}
