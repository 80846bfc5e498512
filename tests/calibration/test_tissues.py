"""Tissue tables per field strength, user overrides and user table files.

Expected numbers are the literature values written in calibration.md §3 (3 T) and in
the data files' citations (1.5 T, 7 T), typed here by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from aslcal.errors import InputError
from aslcal.physics.tissues import (
    FIELD_STRENGTHS,
    TissueParams,
    load_tissue_file,
    tissue_table,
    tissue_table_info,
)

# calibration.md §3: (T1 s, T2 ms, T2* ms, pc)
TABLE_3T = {
    "csf": (4.3, 750.0, 400.0, 1.15),
    "gm": (1.3, 100.0, 60.0, 0.98),
    "wm": (1.0, 50.0, 50.0, 0.82),
    "blood": (1.65, 150.0, 50.0, None),
}


def test_default_is_3t_and_matches_the_spec():
    table = tissue_table()
    assert set(table) == set(TABLE_3T)
    for name, (t1, t2, t2s, pc) in TABLE_3T.items():
        assert table[name] == TissueParams(t1=t1, t2=t2, t2star=t2s, pc=pc)
    assert tissue_table(3) == table


@pytest.mark.parametrize("fs", FIELD_STRENGTHS)
def test_every_table_has_the_same_schema_and_plausible_values(fs):
    info = tissue_table_info(fs)
    assert info["field_strength_T"] == fs
    assert info["units"] == {"t1": "s", "t2": "ms", "t2star": "ms", "pc": "ml/g"}
    assert info["sources"] and isinstance(info["notes"], str)
    table = tissue_table(fs)
    assert set(table) == {"csf", "gm", "wm", "blood"}
    for name, p in table.items():
        for v in (p.t1, p.t2, p.t2star):
            assert math.isfinite(v) and v > 0
        assert (p.pc is None) == (name == "blood")
        # physics sanity: T2* <= T2, T1 in seconds (0.5-5 s), T2 in ms (> 10)
        assert p.t2star <= p.t2
        assert 0.5 < p.t1 < 5.0 and p.t2 > 10.0
    # T1 of GM, WM, blood grows with the field; partition coefficients do not change
    assert table["gm"].t1 > table["wm"].t1
    assert {n: table[n].pc for n in ("csf", "gm", "wm")} == {"csf": 1.15, "gm": 0.98, "wm": 0.82}


def test_t1_grows_with_field_strength():
    t15, t3, t7 = (tissue_table(f) for f in (1.5, 3.0, 7.0))
    for name in ("gm", "wm", "blood"):
        assert t15[name].t1 < t3[name].t1 < t7[name].t1
    # white-paper blood T1 (Alsop 2015): 1.35 s at 1.5 T, 1.65 s at 3 T
    assert t15["blood"].t1 == 1.35 and t3["blood"].t1 == 1.65


@pytest.mark.parametrize("fs", [2.9, 0.0, -3.0, 9.4, math.nan, "3T", None, True])
def test_field_strength_must_match_a_table_exactly(fs):
    with pytest.raises(InputError, match="field_strength"):
        tissue_table(fs)


def test_overrides_replace_only_the_given_values():
    t = tissue_table(3.0, overrides={"csf": {"t1": 3.8}, "blood": {"t2": 154}})
    assert t["csf"] == TissueParams(t1=3.8, t2=750.0, t2star=400.0, pc=1.15)
    assert t["blood"].t2 == 154.0 and t["blood"].t1 == 1.65
    assert t["gm"] == tissue_table()["gm"]
    assert tissue_table(1.5, overrides={"gm": {"pc": np.float64(0.9)}})["gm"].pc == 0.9
    # the cached built-in table is not modified
    assert tissue_table()["csf"].t1 == 4.3


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"csf": {"t1": -1.0}}, "csf.t1"),
        ({"csf": {"t2": math.nan}}, "csf.t2"),
        ({"gm": {"t2star": math.inf}}, "gm.t2star"),
        ({"wm": {"pc": 0}}, "wm.pc"),
        ({"wm": {"pc": "0.8"}}, "wm.pc"),
        ({"wm": {"t1": True}}, "wm.t1"),
        ({"bone": {"t1": 1.0}}, "unknown tissue 'bone'"),
        ({"csf": {"t3": 1.0}}, "unknown parameter 't3'"),
        ({"blood": {"pc": 0.9}}, "blood has no partition coefficient"),
        ({"csf": 4.3}, "csf"),
        ([("csf", {})], "mapping"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(InputError, match=match):
        tissue_table(3.0, overrides=overrides)


def test_load_tissue_file_partial(tmp_path):
    path = tmp_path / "site.json"
    path.write_text(json.dumps({
        "field_strength_T": 3.0,
        "units": {"t1": "s", "t2": "ms"},
        "tissues": {"csf": {"t1": 3.9, "t2star": 300}, "blood": {"pc": None}},
        "sources": {"t1.csf": "measured at our site"},
        "notes": "partial table",
    }))
    over = load_tissue_file(path)
    assert over == {"csf": {"t1": 3.9, "t2star": 300.0}, "blood": {}}
    t = tissue_table(3.0, overrides=over)
    assert t["csf"] == TissueParams(t1=3.9, t2=750.0, t2star=300.0, pc=1.15)


def test_load_tissue_file_accepts_a_builtin_table(tmp_path):
    path = tmp_path / "t7.json"
    path.write_text(json.dumps(tissue_table_info(7.0)))
    assert tissue_table(3.0, overrides=load_tissue_file(path)) == tissue_table(7.0)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "'tissues'"),
        ('{"csf": {"t1": 4}}', "'tissues'"),
        ('{"tissues": {"csf": {"t1": 4}}, "extra": 1}', "unknown keys"),
        ('{"tissues": {"csf": {"t2": 0.75}}, "units": {"t2": "s"}}', "units"),
        ('{"tissues": {"csf": {"t1": -4}}}', "csf.t1"),
        # an integer beyond Python's int-parsing limit: named like any bad value
        ('{"tissues": {"csf": {"t1": ' + "7" * 5000 + "}}}", "csf.t1"),
    ],
)
def test_load_tissue_file_bad_content(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InputError, match=match):
        load_tissue_file(path)


def test_load_tissue_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"tissues": {"csf": {"t1": 3.9}}}')
    assert load_tissue_file(path) == {"csf": {"t1": 3.9}}


def test_load_tissue_file_missing(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_tissue_file(tmp_path / "nope.json")
