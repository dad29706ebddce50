"""Evaluate a provisioned Grafana alert rule the way Grafana's alerting does, against a
real InfluxDB: each InfluxQL query runs with ``$timeFilter`` replaced by the absolute
window of its ``relativeTimeRange`` (as the InfluxDB datasource does), each series
becomes one labelled item (labels = its tags), then the server-side expressions run:

- ``reduce`` (``last``, ``min``, ``max``, ``mean``, ``sum``, ``count``; ``dropNN`` drops
  null and NaN points; an item left with no point reduces to NaN),
- ``threshold`` (``gt``, ``lt``, ``within_range``, ``outside_range``: 1 or 0),
- ``math`` with ``$REF``, numbers, ``> < >= <= == !=``, ``&&``, ``||`` and brackets; two
  sets are joined by labels as Grafana's ``union`` does (equal labels, or one set of
  labels containing the other; an item without a partner is dropped, except that one
  item on each side with no match are joined with no labels).

The rule fires for every item of its condition whose value is neither 0 nor NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

Labels = frozenset[tuple[str, str]]
Items = dict[Labels, float]


def run_influxql(query: str, window: dict[str, int], now_ms: int,
                 execute: Callable[[str], dict]) -> dict[Labels, list[float | None]]:
    """One InfluxQL data query: label set -> the values of its series (oldest first)."""
    start, end = now_ms - window["from"] * 1000, now_ms - window["to"] * 1000
    q = query.replace("$timeFilter", f"time >= {start}ms and time <= {end}ms")
    assert "$" not in q, f"macro left in {q!r}"
    result = execute(q)["results"][0]
    assert "error" not in result, (q, result)
    out: dict[Labels, list[float | None]] = {}
    for series in result.get("series", []):
        labels = frozenset((series.get("tags") or {}).items())
        for row in series["values"]:
            for value in row[1:]:  # Grafana makes one frame per value column
                out.setdefault(labels, []).append(value)
    return out


_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "last": lambda v: v[-1], "min": min, "max": max, "sum": sum,
    "mean": lambda v: sum(v) / len(v), "count": lambda v: float(len(v)),
}


def reduce(series: dict[Labels, list[float | None]], reducer: str, mode: str) -> Items:
    out: Items = {}
    for labels, values in series.items():
        kept = [float(v) for v in values if v is not None and not math.isnan(float(v))] \
            if mode == "dropNN" else [math.nan if v is None else float(v) for v in values]
        if reducer == "count":
            out[labels] = float(len(kept))
        else:
            out[labels] = _REDUCERS[reducer](kept) if kept else math.nan
    return out


def threshold(items: Items, evaluator: dict[str, Any]) -> Items:
    kind, params = evaluator["type"], evaluator["params"]
    tests: dict[str, Callable[[float], bool]] = {
        "gt": lambda v: v > params[0], "lt": lambda v: v < params[0],
        "within_range": lambda v: params[0] < v < params[1],
        "outside_range": lambda v: v < params[0] or v > params[1],
    }
    return {k: (0.0 if math.isnan(v) else float(tests[kind](v))) for k, v in items.items()}


def union(a: Items, b: Items) -> list[tuple[Labels, float, float]]:
    """Grafana's label join of two sets of numbers."""
    out: list[tuple[Labels, float, float]] = []
    if not a or not b:
        return out
    for la, va in a.items():
        for lb, vb in b.items():
            if la == lb or not la or not lb:
                labels = la or lb
            elif len(la) == len(lb):
                continue
            elif la >= lb:
                labels = la
            elif lb >= la:
                labels = lb
            else:
                continue
            out.append((labels, va, vb))
    if not out and len(a) == 1 and len(b) == 1:
        out.append((frozenset(), next(iter(a.values())), next(iter(b.values()))))
    return out


_OPS: dict[str, Callable[[float, float], float]] = {
    ">": lambda x, y: float(x > y), "<": lambda x, y: float(x < y),
    ">=": lambda x, y: float(x >= y), "<=": lambda x, y: float(x <= y),
    "==": lambda x, y: float(x == y), "!=": lambda x, y: float(x != y),
    "&&": lambda x, y: float(bool(x) and bool(y)), "||": lambda x, y: float(bool(x) or bool(y)),
}
_TOKEN = re.compile(r"\s*(\$[A-Za-z]\w*|\d+(?:\.\d*)?|&&|\|\||>=|<=|==|!=|[<>()])")


def math_expr(expression: str, refs: dict[str, Items]) -> Items:
    tokens = []
    pos = 0
    while pos < len(expression.rstrip()):
        m = _TOKEN.match(expression, pos)
        assert m, f"cannot read {expression[pos:]!r}"
        tokens.append(m.group(1))
        pos = m.end()
    it = iter([*tokens, None])
    tok = [next(it)]

    def take() -> str:
        t = tok[0]
        tok[0] = next(it)
        return t

    def binary(x: Items | float, y: Items | float, op: str) -> Items | float:
        f = _OPS[op]
        if isinstance(x, float) and isinstance(y, float):
            return f(x, y)
        if isinstance(x, float):
            return {k: f(x, v) for k, v in y.items()}  # type: ignore[union-attr]
        if isinstance(y, float):
            return {k: f(v, y) for k, v in x.items()}
        return {lab: f(va, vb) for lab, va, vb in union(x, y)}

    def atom() -> Items | float:
        t = take()
        if t == "(":
            v = disj()
            assert take() == ")"
            return v
        if t.startswith("$"):
            return dict(refs[t[1:]])
        return float(t)

    def comparison() -> Items | float:
        v = atom()
        while tok[0] in (">", "<", ">=", "<=", "==", "!="):
            op = take()
            v = binary(v, atom(), op)
        return v

    def conj() -> Items | float:
        v = comparison()
        while tok[0] == "&&":
            take()
            v = binary(v, comparison(), "&&")
        return v

    def disj() -> Items | float:
        v = conj()
        while tok[0] == "||":
            take()
            v = binary(v, conj(), "||")
        return v

    value = disj()
    assert tok[0] is None, f"left over in {expression!r}"
    return value if isinstance(value, dict) else {frozenset(): value}


def evaluate(rule: dict[str, Any], now_ms: int,
             execute: Callable[[str], dict]) -> tuple[Items, dict[str, Any]]:
    """Run a provisioned rule; returns (the condition's items, every refId's result)."""
    results: dict[str, Any] = {}
    for q in rule["data"]:
        model = q["model"]
        if q["datasourceUid"] != "__expr__":
            results[q["refId"]] = run_influxql(model["query"], q["relativeTimeRange"],
                                               now_ms, execute)
        elif model["type"] == "reduce":
            results[q["refId"]] = reduce(results[model["expression"]], model["reducer"],
                                         model.get("settings", {}).get("mode", ""))
        elif model["type"] == "threshold":
            results[q["refId"]] = threshold(results[model["expression"]],
                                            model["conditions"][0]["evaluator"])
        elif model["type"] == "math":
            results[q["refId"]] = math_expr(model["expression"], results)
        else:
            raise AssertionError(f"expression type {model['type']!r} not handled")
    return results[rule["condition"]], results


def firing(items: Items) -> list[dict[str, str]]:
    """Label sets of the items that fire (value neither 0 nor NaN), sorted."""
    out = [dict(k) for k, v in items.items() if v and not math.isnan(v)]
    return sorted(out, key=lambda d: sorted(d.items()))
