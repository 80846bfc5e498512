"""Reference-region M0a from a long-TR calibration image (calibration.md §4).

The corrections, in the order of §4 (the same tail serves satrecov mode):

1. S_ref = mean of C/s over the reference mask R (voxels whose value is finite and
   non-zero; the others are excluded and counted);
2. TR correction: M0_ref = S_ref / (1 − exp(−(TR − TAQ)/T1r));
3. T2 correction to TE = 0: M0_ref ← M0_ref / exp(−TE/T2r);
4. gain and partition coefficient: M0a ← M0_ref · cgain / pc;
5. blood T2 decay at the sequence TE: M0a ← M0a · exp(−TE/T2b).

Closed form::

    M0a = S_ref · cgain · exp(−TE/T2b) / (pc · (1 − exp(−(TR−TAQ)/T1r)) · exp(−TE/T2r))

Nothing is truncated (FSL's two-decimal truncation of M0a·cgain/pc is a bug).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..backend import array_namespace
from ..errors import InputError
from ..physics import tissues as _tissues
from ._common import CalibrationWarning, as_array, as_float, as_mask, count, is_array, masked_mean, number, safe_divide, spatial_image

__all__ = ["TISSREFS", "RefRegionM0", "m0_refregion"]

#: Reference tissues: ``none`` means no table defaults (t1r and pc must be given).
TISSREFS = ("csf", "wm", "gm", "none")

UNITS = {
    "te": "ms", "tr": "s", "taq": "s", "t1r": "s", "t2r": "ms", "t2b": "ms",
    "field_strength": "T", "m0a": "signal units", "m0_ref": "signal units", "s_ref": "signal units",
}


@dataclass
class RefRegionM0:
    """A reference-region M0a and every factor that made it (calibration.md §4).

    Attributes
    ----------
    m0a : float, signal units
        Equilibrium magnetisation of arterial blood.
    m0_ref : float, signal units
        Reference-tissue M0, fully relaxed and at TE = 0 (before cgain, pc, blood T2).
    s_ref : float, signal units
        Mean reference signal: of C/s (longtr), of the fitted M0t (satrecov).
    n_voxels : int
        Reference-mask voxels averaged.
    n_excluded : int
        Reference-mask voxels left out because their value was zero or non-finite.
    n_mask : int
        Voxels in the reference mask.
    tr_factor : float
        1 − exp(−(TR − TAQ)/T1r) (longtr); 1 in satrecov mode (M0t is fully relaxed).
    t2_factor : float
        exp(−TE/T2r) (1 when TE = 0).
    t2b_factor : float
        exp(−TE_blood/T2b) (1 when TE_blood = 0).
    tissref : str
        ``csf``, ``wm``, ``gm`` or ``none``.
    te : float, ms
        Echo time of the calibration image (its tissue T2 correction).
    te_blood : float, ms
        Echo time of the ASL data (the blood T2 decay of the labelled signal); equal to
        ``te`` unless the two were acquired with different echoes.
    tr, taq : float or None, s
        None in satrecov mode.
    t1r : float or None, s
        Reference-tissue T1 used (None where not needed).
    t2r, t2b : float or None, ms
        Reference-tissue and blood T2 (or T2*) used; None when TE = 0 and not given.
    pc : float, ml/g
    cgain : float
    t2star : bool
        Whether the T2 defaults came from the T2* column.
    field_strength : float, tesla
    sensitivity : bool
        Whether the signal was divided by a coil-sensitivity map.
    mode : str
        ``longtr`` or ``satrecov``.
    sources : dict of str to str
        Where t1r, t2r, t2b and pc came from: ``user``, ``image`` (mean of a user image
        inside the reference mask), ``default`` (tissue table; ``default (T2*)`` for the
        T2* column), ``unused``.
    table : str
        The tissue table the defaults came from (``built-in 3 T``, ``user``).
    image_voxels : dict of str to int
        For t1r/t2r given as images: voxels averaged.
    m0t_rel_se : float or None
        Satrecov mode, when the fit's standard errors were given: the median over the
        averaged reference voxels of the fitted M0t's relative standard error.  Above
        :data:`aslcal.calibration.satrecov.RELIABLE_REL_SE` the voxels' M0t are too noisy
        for their mean to be trusted (see :func:`~aslcal.calibration.satrecov.reliability_warning`).
    noise_floor_lift : float or None
        Satrecov mode, when the fit's design and maps were given: the mean lift of the
        fitted reference series by the magnitude (Rician) noise floor over its mean signal;
        above :data:`aslcal.calibration.satrecov.NOISE_FLOOR_LIMIT` M0a is biased high.
    """

    m0a: float
    m0_ref: float
    s_ref: float
    n_voxels: int
    n_excluded: int
    n_mask: int
    tr_factor: float
    t2_factor: float
    t2b_factor: float
    tissref: str
    te: float
    tr: float | None
    taq: float | None
    t1r: float | None
    t2r: float | None
    t2b: float | None
    pc: float
    cgain: float
    t2star: bool
    field_strength: float
    sensitivity: bool
    mode: str
    sources: dict[str, str] = field(default_factory=dict)
    table: str = ""
    image_voxels: dict[str, int] = field(default_factory=dict)
    te_blood: float = 0.0
    m0t_rel_se: float | None = None
    noise_floor_lift: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly provenance record: every value, factor and source, with units."""
        out = asdict(self)
        out["units"] = dict(UNITS)
        out["formula"] = (
            "M0a = S_ref * cgain * exp(-TE_blood/T2b) / (pc * tr_factor * exp(-TE/T2r)), "
            "tr_factor = 1 - exp(-(TR-TAQ)/T1r) (longtr) or 1 (satrecov); TE of the calibration "
            "image, TE_blood of the ASL data (the same TE unless they differ)"
        )
        return out


# --------------------------------------------------------------------------------------
# Tissue parameters: user values, images and table defaults
# --------------------------------------------------------------------------------------


def _check_tissref(tissref: Any) -> str:
    if not isinstance(tissref, str) or tissref.lower() not in TISSREFS:
        raise InputError(f"tissref={tissref!r}: expected one of {', '.join(TISSREFS)}")
    return tissref.lower()


def _check_table(table: Any, needed: list[str]) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise InputError(
            f"tissue_table: expected a mapping of tissue name to TissueParams "
            f"(from aslcal.physics.tissues.tissue_table), got {type(table).__name__}"
        )
    for name in needed:
        p = table.get(name)
        if p is None or not all(hasattr(p, a) for a in ("t1", "t2", "t2star", "pc")):
            raise InputError(f"tissue_table: no entry {name!r} with t1, t2, t2star and pc")
    return table


def _image_or_value(name: str, value: Any, unit: str, mask: Any, xp) -> tuple[float, int | None]:
    """A scalar parameter, or the mean of an image inside ``mask`` (finite, non-zero voxels)."""
    if is_array(value) and value.ndim > 0:
        img = as_array(name, value)
        if tuple(img.shape) != tuple(mask.shape):
            raise InputError(
                f"{name}: image of shape {tuple(img.shape)} does not match the reference mask {tuple(mask.shape)}"
            )
        mean, n_used, _, _ = masked_mean(xp, as_float(img), mask)
        if n_used == 0:
            raise InputError(
                f"{name}: the image is zero or non-finite in every voxel of the reference mask; "
                f"expected {unit} values there"
            )
        if not mean > 0:
            raise InputError(f"{name}: mean inside the reference mask is {mean:g}; expected > 0 ({unit})")
        return mean, n_used
    return number(name, value, unit), None


def resolve_tissue(
    *,
    tissref: str,
    te: float,
    t1r: Any,
    t2r: Any,
    t2b: Any,
    pc: Any,
    t2star: bool,
    field_strength: Any,
    tissue_table: Mapping[str, Any] | None,
    mask: Any,
    xp,
    need_t1r: bool,
    te_blood: float | None = None,
) -> dict[str, Any]:
    """Resolve t1r, t2r, t2b and pc from user values, images and the tissue table.

    t2b is needed when the blood echo time ``te_blood`` (default ``te``) is > 0.

    Returns a dict with the four values (None where unused), ``sources``, ``table``
    and ``image_voxels``.  Missing values for ``tissref='none'``
    raise one :class:`InputError` naming every missing option.
    """
    if not isinstance(t2star, bool):
        raise InputError(f"t2star={t2star!r}: expected True or False")
    col = "t2star" if t2star else "t2"
    tag = "default (T2*)" if t2star else "default"
    state: dict[str, Any] = {"table": None}

    def table():
        if state["table"] is None:
            needed = ["blood"] + ([tissref] if tissref != "none" else [])
            if tissue_table is not None:
                state["table"] = _check_table(tissue_table, needed)
                state["name"] = "user"
            else:
                state["table"] = _tissues.tissue_table(field_strength)
                state["name"] = f"built-in {float(field_strength):g} T"
        return state["table"]

    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    image_voxels: dict[str, int] = {}
    missing: list[str] = []

    def user(name: str, value: Any, unit: str) -> None:
        v, n = _image_or_value(name, value, unit, mask, xp)
        out[name] = v
        sources[name] = "image" if n is not None else "user"
        if n is not None:
            image_voxels[name] = n

    # T1 of the reference tissue (s)
    if t1r is not None:
        user("t1r", t1r, "s")
    elif not need_t1r:
        out["t1r"], sources["t1r"] = None, "unused"
    elif tissref != "none":
        out["t1r"], sources["t1r"] = float(table()[tissref].t1), "default"
    else:
        missing.append("t1r (s)")
    # partition coefficient (ml/g)
    if pc is not None:
        out["pc"], sources["pc"] = number("pc", pc, "ml/g"), "user"
    elif tissref != "none":
        out["pc"], sources["pc"] = float(table()[tissref].pc), "default"
    else:
        missing.append("pc")
    # T2 (or T2*) of the reference tissue (ms): needed only when TE > 0
    if t2r is not None:
        user("t2r", t2r, "ms")
    elif te > 0 and tissref != "none":
        out["t2r"], sources["t2r"] = float(getattr(table()[tissref], col)), tag
    elif te > 0:
        missing.append("t2r (ms; needed because te > 0)")
    else:
        out["t2r"], sources["t2r"] = None, "unused"
    # T2 (or T2*) of arterial blood (ms)
    if t2b is not None:
        v = number("t2b", t2b, "ms")
        out["t2b"], sources["t2b"] = v, "user"
    elif (te if te_blood is None else te_blood) > 0:
        if not missing:
            out["t2b"], sources["t2b"] = float(getattr(table()["blood"], col)), tag
    else:
        out["t2b"], sources["t2b"] = None, "unused"
    if missing:
        raise InputError(
            f"tissref='none' has no tissue defaults: give {', '.join(missing)}"
        )
    _unit_hints(te, out)
    out["sources"] = sources
    out["image_voxels"] = image_voxels
    out["table"] = state.get("name", "not used")
    return out


def _unit_hints(te: float, values: Mapping[str, Any]) -> None:
    """Warn about values that look like the wrong unit (TE and T2 in ms, T1 in s)."""
    hints = []
    if 0 < te < 1.0:
        hints.append(f"te={te:g} ms looks like seconds (TE is in milliseconds)")
    elif te > 500.0:
        hints.append(f"te={te:g} ms is longer than any ASL or M0 echo time (TE is in milliseconds)")
    for name in ("t2r", "t2b"):
        v = values.get(name)
        if v is not None and v < 1.0:
            hints.append(f"{name}={v:g} ms looks like seconds (T2 is in milliseconds)")
    t1 = values.get("t1r")
    if t1 is not None and t1 > 30.0:
        hints.append(f"t1r={t1:g} s looks like milliseconds (T1 is in seconds)")
    if hints:
        warnings.warn("; ".join(hints), CalibrationWarning, stacklevel=4)


def finish_m0a(
    *,
    mode: str,
    s_ref: float,
    n_voxels: int,
    n_excluded: int,
    n_mask: int,
    tr_factor: float,
    tr: float | None,
    taq: float | None,
    te: float,
    cgain: float,
    tissref: str,
    t2star: bool,
    field_strength: Any,
    sensitivity: bool,
    tissue: Mapping[str, Any],
    te_blood: float | None = None,
) -> RefRegionM0:
    """Steps 2–5 of §4 from the mean reference signal and the resolved parameters.

    ``te_blood`` (ms; default ``te``): the ASL data's echo time, for the blood T2 decay of
    step 5 when it differs from the calibration image's.
    """
    te_blood = te if te_blood is None else te_blood
    if 0 < te_blood < 1.0 and te_blood != te:
        warnings.warn(f"te_blood={te_blood:g} ms looks like seconds (TE is in milliseconds)",
                      CalibrationWarning, stacklevel=3)
    t2_factor = math.exp(-te / tissue["t2r"]) if te > 0 else 1.0
    t2b_factor = math.exp(-te_blood / tissue["t2b"]) if te_blood > 0 else 1.0
    for name, echo, factor in (("t2r", te, t2_factor), ("t2b", te_blood, t2b_factor)):
        if factor == 0.0:
            raise InputError(
                f"te={echo:g} ms is so long against {name}={tissue[name]:g} ms that no signal is left "
                f"(exp(-TE/{name}) underflows); check the units (TE and T2 in milliseconds)"
            )
    m0_ref = s_ref / tr_factor / t2_factor
    m0a = m0_ref * cgain / tissue["pc"] * t2b_factor
    if not (m0a > 0 and math.isfinite(m0a)):
        raise InputError(
            f"M0a = {m0a:g} is not positive: the mean reference signal over the {n_voxels} reference "
            f"voxels is {s_ref:g}; check the calibration image (sign, scaling: a magnitude image is "
            "positive) and the reference mask"
        )
    return RefRegionM0(
        m0a=m0a,
        m0_ref=m0_ref,
        s_ref=s_ref,
        n_voxels=n_voxels,
        n_excluded=n_excluded,
        n_mask=n_mask,
        tr_factor=tr_factor,
        t2_factor=t2_factor,
        t2b_factor=t2b_factor,
        tissref=tissref,
        te=te,
        te_blood=te_blood,
        tr=tr,
        taq=taq,
        t1r=tissue["t1r"],
        t2r=tissue["t2r"],
        t2b=tissue["t2b"],
        pc=tissue["pc"],
        cgain=cgain,
        t2star=t2star,
        field_strength=float(field_strength),
        sensitivity=sensitivity,
        mode=mode,
        sources=dict(tissue["sources"]),
        table=tissue["table"],
        image_voxels=dict(tissue["image_voxels"]),
    )


def empty_mask_error(name: str) -> InputError:
    return InputError(
        f"{name}: the reference mask is empty (no non-zero voxel): check the mask (an automatic "
        "one: the brain extraction and segmentation it came from)"
    )


def no_usable_voxel_error(name: str, n_mask: int, what: str) -> InputError:
    return InputError(
        f"{name}: none of the {n_mask} reference-mask voxels has a usable value ({what} is zero "
        "or non-finite in all of them): check the mask and its alignment with the calibration "
        "image (an automatic mask: the brain extraction it came from)"
    )


def check_field_strength(field_strength: Any) -> float:
    if isinstance(field_strength, bool):
        raise InputError(f"field_strength={field_strength!r}: expected a number (tesla)")
    return number("field_strength", field_strength, "tesla")


# --------------------------------------------------------------------------------------
# Public entry point: long-TR mode
# --------------------------------------------------------------------------------------


def m0_refregion(
    calib: Any,
    refmask: Any,
    *,
    tissref: str = "csf",
    te: float = 0.0,
    te_blood: float | None = None,
    tr: float = 3.2,
    taq: float = 0.0,
    t1r: Any = None,
    t2r: Any = None,
    t2b: float | None = None,
    pc: float | None = None,
    t2star: bool = False,
    cgain: float = 1.0,
    sensitivity: Any = None,
    field_strength: float = 3.0,
    tissue_table: Mapping[str, Any] | None = None,
) -> RefRegionM0:
    """M0 of arterial blood from the mean long-TR calibration signal in a reference region.

    ``M0a = S_ref · cgain · exp(−TE/T2b) / (pc · (1 − exp(−(TR−TAQ)/T1r)) · exp(−TE/T2r))``
    with S_ref the mean of C/s over the reference-mask voxels whose value is finite and
    non-zero (calibration.md §4).

    Parameters
    ----------
    calib : array of shape ``spatial`` or ``spatial + (n,)``, signal units
        The calibration image C (NumPy or CuPy); a series is averaged over its last axis.
    refmask : array of shape ``spatial``
        Reference region (non-zero = inside), e.g. the lateral ventricles for CSF.
    tissref : {"csf", "wm", "gm", "none"}
        Reference tissue: selects the defaults of t1r, t2r, pc (and ``none``: no
        defaults, t1r and pc must be given, and t2r when te > 0).
    te : float, milliseconds
        Echo time of the calibration (and ASL) acquisition.
    te_blood : float, milliseconds, optional
        Echo time of the ASL data when it differs from the calibration image's: the blood
        T2 decay of step 5 uses it, the tissue T2 correction keeps ``te``.
    tr : float, seconds
        Repetition time of the calibration image (default 3.2).
    taq : float, seconds
        Acquisition time of a 2-D multi-slice readout: the recovery time is TR − TAQ.
    t1r : float (seconds) or array of shape ``spatial``, optional
        T1 of the reference tissue; an image gives its mean inside the reference mask
        (finite, non-zero voxels).  Default: the tissue table.
    t2r : float (milliseconds) or array of shape ``spatial``, optional
        T2 (or T2*) of the reference tissue, value or image as ``t1r``.
    t2b : float, milliseconds, optional
        T2 (or T2*) of arterial blood.  Default: the tissue table.
    pc : float, ml/g, optional
        Partition coefficient of the reference tissue.  Default: the tissue table.
    t2star : bool
        Take the defaults of t2r and t2b from the T2* column (gradient-echo readout);
        user values are used as given.
    cgain : float
        Gain of the ASL data relative to the calibration image; M0a is multiplied by it.
    sensitivity : array of shape ``spatial``, optional
        Coil-sensitivity map s; C is divided by it (voxels where s is not finite and
        > 0 are excluded and counted).
    field_strength : float, tesla
        Selects the tissue table (1.5, 3 or 7).  Default 3.
    tissue_table : mapping of str to TissueParams, optional
        A table to take the defaults from instead (e.g.
        ``aslcal.physics.tissues.tissue_table(3, overrides=load_tissue_file(path))``).

    Returns
    -------
    RefRegionM0
        M0a and every factor, value, count and source (``as_dict()`` for provenance).
        The reported scalars are Python floats (one scalar transfer per reduction on the
        GPU; no image leaves the device).

    Raises
    ------
    InputError
        Shapes that do not match, an empty reference mask or one without a usable voxel
        (the message says to check the brain extraction or supply a mask), an unknown
        tissref, missing values for ``tissref='none'``, TR <= TAQ, or a value that is not
        a positive finite number in its unit.
    """
    calib_a = as_array("calib", calib)
    mask_a = as_array("refmask", refmask)
    arrays = [calib_a, mask_a] + [v for v in (sensitivity, t1r, t2r) if is_array(v)]
    xp = array_namespace(*arrays)
    tissref = _check_tissref(tissref)
    te = number("te", te, "ms", allow_min=True)
    te_blood = None if te_blood is None else number("te_blood", te_blood, "ms", allow_min=True)
    tr = number("tr", tr, "s")
    taq = number("taq", taq, "s", allow_min=True)
    if tr <= taq:
        raise InputError(
            f"tr={tr:g} s <= taq={taq:g} s: the recovery time TR - TAQ must be > 0 (both in seconds)"
        )
    cgain = number("cgain", cgain, "ratio")
    if tr > 100.0:
        warnings.warn(f"tr={tr:g} s looks like milliseconds (TR is in seconds)", CalibrationWarning, stacklevel=2)
    fs = check_field_strength(field_strength)
    mask = as_mask("refmask", mask_a, xp)
    spatial = tuple(int(s) for s in mask.shape)
    c = spatial_image("calib", calib_a, spatial, "refmask", xp)
    if sensitivity is not None:
        s = spatial_image("sensitivity", as_array("sensitivity", sensitivity), spatial, "refmask", xp,
                          allow_series=False)
        c = safe_divide(xp, c, s)
    n_mask = count(xp, mask)
    if n_mask == 0:
        raise empty_mask_error("refmask")
    tissue = resolve_tissue(
        tissref=tissref, te=te, t1r=t1r, t2r=t2r, t2b=t2b, pc=pc, t2star=t2star,
        field_strength=fs, tissue_table=tissue_table, mask=mask, xp=xp, need_t1r=True, te_blood=te_blood,
    )
    tr_factor = -math.expm1(-(tr - taq) / tissue["t1r"])
    if not tr_factor > 0:
        raise InputError(
            f"(tr - taq)/t1r = {(tr - taq) / tissue['t1r']:g}: no recovery, the TR correction is undefined"
        )
    s_ref, n_used, n_excl, _ = masked_mean(xp, c, mask)
    if n_used == 0:
        raise no_usable_voxel_error("calib", n_mask, "the calibration image" + (" / sensitivity" if sensitivity is not None else ""))
    return finish_m0a(
        mode="longtr", s_ref=s_ref, n_voxels=n_used, n_excluded=n_excl, n_mask=n_mask,
        tr_factor=tr_factor, tr=tr, taq=taq, te=te, cgain=cgain, tissref=tissref,
        t2star=t2star, field_strength=fs, sensitivity=sensitivity is not None, tissue=tissue,
        te_blood=te_blood,
    )
