"""The one JSON-safe converter: summaries of task arguments, configs, JSON columns, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math

import pytest

from provscope import jsonsafe


class Hostile:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")

    def __len__(self) -> int:
        raise RuntimeError("no len either")


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


def test_tensors_and_arrays_are_summarised_by_shape_and_dtype():
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    t = jsonsafe.summarise(torch.zeros(4, 3, dtype=torch.float16))
    assert t == {"type": "torch.Tensor", "shape": [4, 3], "dtype": "torch.float16",
                 "device": "cpu", "numel": 12}
    a = jsonsafe.summarise(np.ones((2, 5)))
    assert a["shape"] == [2, 5] and a["dtype"] == "float64" and a["numel"] == 10
    assert jsonsafe.summarise(torch.tensor(1.5)) == 1.5  # 0-d: its value
    assert jsonsafe.summarise(np.int64(7)) == 7
    assert jsonsafe.summarise(np.float64("nan")) == "nan"


def test_huge_containers_and_strings_become_small_descriptions():
    big = jsonsafe.summarise(list(range(1_000_000)))
    assert big == {"type": "list", "len": 1_000_000, "first": [0, 1, 2]}
    d = jsonsafe.summarise({f"k{i}": i for i in range(10_000)})
    assert d["len"] == 10_000 and d["first_keys"][:2] == ["k0", "k1"]
    s = jsonsafe.summarise("x" * 100_000)
    assert s == {"type": "str", "len": 100_000, "head": "x" * 64}
    assert jsonsafe.summarise(b"\0" * 10) == {"type": "bytes", "len": 10}
    assert len(json.dumps([big, d, s])) < 2000


def test_open_files_odd_objects_and_non_finite_floats_never_fail(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("x")
    with open(path) as fh:
        assert jsonsafe.summarise(fh) == {"type": "_io.TextIOWrapper", "name": str(path),
                                          "mode": "r"}
    assert jsonsafe.summarise(Hostile())["type"].endswith("Hostile")
    assert jsonsafe.summarise(Opaque()) == {"type": f"{__name__}.Opaque", "repr": "<Opaque>"}
    assert [jsonsafe.jsonable(v) for v in (math.nan, math.inf, -math.inf)] == \
        ["nan", "inf", "-inf"]
    nested = jsonsafe.summarise({"a": [1, {"b": (2, 3)}], "p": tmp_path})
    assert nested == {"a": [1, {"b": [2, 3]}], "p": str(tmp_path)}
    json.dumps(nested, allow_nan=False)


def test_whole_keeps_big_and_deep_values_that_a_summary_cuts():
    deep: dict = {"leaf": 1}
    for i in range(10):
        deep = {f"l{i}": deep}
    value = {"items": list(range(1000)), "text": "y" * 10_000, "deep": deep}
    assert jsonsafe.jsonable(value) == value
    cut = jsonsafe.summarise(value)
    assert cut["items"]["len"] == 1000 and cut["text"]["len"] == 10_000
    assert jsonsafe.jsonable(list(range(200)), jsonsafe.CONFIG) == list(range(200))


def test_self_referencing_containers_stop_at_the_depth_guard():
    loop: list = []
    loop.append(loop)
    out = jsonsafe.jsonable(loop)
    json.dumps(out)  # finite: the innermost level is a description, not the list again


def test_dates_sets_dataclasses_pydantic_and_namespaces_become_plain_json():
    pd = pytest.importorskip("pandas")
    from pydantic import BaseModel

    @dataclasses.dataclass
    class Opt:
        lr: float = 0.1
        tags: frozenset = frozenset({"b", "a"})

    class Model(BaseModel):
        depth: int = 3

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert jsonsafe.jsonable(when) == "2026-01-02T03:04:05+00:00"
    assert jsonsafe.jsonable(dt.date(2026, 1, 2)) == "2026-01-02"
    assert jsonsafe.jsonable(pd.Timestamp("2026-01-02")) == "2026-01-02T00:00:00"
    assert jsonsafe.jsonable(pd.NaT) is None
    assert jsonsafe.jsonable({3, 1, 2}) == [1, 2, 3]
    assert jsonsafe.jsonable(Opt()) == {"lr": 0.1, "tags": ["a", "b"]}
    assert jsonsafe.jsonable(Model()) == {"depth": 3}
    assert jsonsafe.jsonable(argparse.Namespace(x=1)) == {"x": 1}


def test_dumps_is_compact_json_and_converts_only_what_json_rejects():
    assert jsonsafe.dumps({"a": [1, 2.5], "é": None}) == '{"a":[1,2.5],"\\u00e9":null}'
    text = jsonsafe.dumps({"obj": Opaque(), "inf": math.inf, "ok": 1})
    assert json.loads(text) == {"obj": {"type": f"{__name__}.Opaque", "repr": "<Opaque>"},
                                "inf": "inf", "ok": 1}
