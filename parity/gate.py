"""The gate: compare measured metrics with the thresholds, say what failed and by how much.

In:  the metric sections of a report (``outputs``, ``logits``, ``perplexity``, ``embeddings``)
     and :class:`~trtforge.parity.options.Thresholds`.
Out: a list of :class:`Check` (one per metric and output), each passed or failed with its margin.
     Besides the configurable limits, every output is checked for NaN/Inf on valid positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trtforge.parity.options import METRICS, Direction, Scope, Thresholds


@dataclass(frozen=True)
class Check:
    metric: str
    scope: str  # an output name, or "logits" / "perplexity" / "embeddings"
    value: float | None
    limit: float
    direction: Direction
    passed: bool

    @property
    def margin(self) -> float | None:
        """Head-room (positive) or shortfall (negative) in the metric's own unit."""
        if self.value is None:
            return None
        return self.value - self.limit if self.direction == Direction.MIN else self.limit - self.value

    @property
    def message(self) -> str:
        unit = METRICS[self.metric].unit if self.metric in METRICS else ""
        u = f" {unit}" if unit and unit != "%" else unit
        if self.value is None:
            return f"{self.scope} {self.metric} could not be computed (non-finite values)"
        op = (">=" if self.direction == Direction.MIN else "<=") if self.passed else (
            "<" if self.direction == Direction.MIN else ">")
        text = f"{self.scope} {self.metric} = {fmt_number(self.value)}{u} {op} {fmt_number(self.limit)}{u}"
        if not self.passed:
            word = "short by" if self.direction == Direction.MIN else "over by"
            text += f" ({word} {fmt_number(abs(self.margin or 0.0))}{u})"
        return text

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "scope": self.scope, "value": self.value, "limit": self.limit,
                "direction": self.direction.value, "passed": self.passed, "margin": self.margin,
                "message": self.message}


def fmt_number(x: float) -> str:
    """Short, readable number: 3 significant digits for tiny or huge values."""
    if x == 0:
        return "0"
    a = abs(x)
    if 0.99 <= a < 1:  # similarities close to 1: show digits up to where they differ from 1
        digits = min(10, math.floor(-math.log10(1 - a) + 1e-9) + 2)
        return f"{x:.{digits}f}".rstrip("0")
    if a >= 1e6 or a < 1e-3:
        return f"{x:.3g}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 10:
        return f"{x:.2f}"
    return f"{x:.4g}"


def _check(metric: str, scope: str, value: float | None, limit: float, direction: Direction) -> Check:
    if value is None:
        return Check(metric, scope, None, limit, direction, False)
    ok = value >= limit if direction == Direction.MIN else value <= limit
    return Check(metric, scope, float(value), float(limit), direction, bool(ok))


def evaluate(sections: dict[str, Any], thresholds: Thresholds) -> list[Check]:
    """One Check per (limit, output) that applies to this task's report sections."""
    checks: list[Check] = []
    outputs: dict[str, dict] = sections.get("outputs") or {}
    for name, m in outputs.items():
        checks.append(_check("nonfinite_candidate", name, m["nonfinite_candidate"], 0, Direction.MAX))
    for key, limit in thresholds.limits.items():
        spec = METRICS[key]
        if spec.scope == Scope.OUTPUT:
            for name, m in outputs.items():
                checks.append(_check(key, name, m.get(key), limit, spec.direction))
            continue
        section = sections.get(spec.scope.value)
        if not section:
            continue  # not this task's metric (e.g. perplexity for an encoder)
        if key == "top5_agreement" and section.get(key) is None:
            continue  # five or fewer classes: top-5 says nothing
        checks.append(_check(key, spec.scope.value, section.get(key), limit, spec.direction))
    return checks


def failed(checks: list[Check] | tuple[Check, ...]) -> list[Check]:
    """Failed checks, task-level ones (logits, perplexity, embeddings) first: they say what a
    user of the model would notice; per-output failures follow."""
    return sorted((c for c in checks if not c.passed),
                  key=lambda c: c.metric not in METRICS or METRICS[c.metric].scope == Scope.OUTPUT)


def condensed_checks(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: per-output metrics collapse to their worst output."""
    rows: dict[str, dict[str, Any]] = {}
    for c in checks:
        key = c["metric"]
        n = sum(1 for x in checks if x["metric"] == key)
        prev = rows.get(key)
        worse = prev is None or (c["margin"] is None) or (prev["margin"] is not None and c["margin"] < prev["margin"])
        if worse:
            scope = c["scope"] if n == 1 else f"{c['scope']} (worst of {n})"
            rows[key] = {**c, "scope": scope}
    return list(rows.values())
