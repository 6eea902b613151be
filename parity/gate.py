"""The gate: compare measured metrics with the thresholds, say what failed and by how much.

In:  the metric sections of a report (``outputs``, ``logits``, ``perplexity``, ``embeddings``)
     and :class:`~trtforge.parity.options.Thresholds`.
Out: a list of :class:`Check` (one per metric and output), each passed or failed with its margin.
     Besides the configurable limits, every output is checked for NaN/Inf on valid positions.
     Task metrics (``--prompts``) give one check per category (scope ``tasks.<category>``), each
     against that category's limit (its ``[tasks.<category>]`` override, else the flat limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trtforge.parity.options import METRICS, TASK_METRICS, Direction, Scope, Thresholds
from trtforge.parity.tasks import sample_size_note


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
        value, limit = fmt_pair(self.value, self.limit)
        text = f"{self.scope} {self.metric} = {value}{u} {op} {limit}{u}"
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


def fmt_pair(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` with enough digits that their comparison reads true: 0.99497 against
    0.995 is ``0.99497`` and ``0.995``, never ``0.995 < 0.995``."""
    v, lim = fmt_number(value), _tidy(fmt_number(limit))  # a limit is a round number: 40, not 40.00
    if value == limit or _tidy(v) != lim:
        return v, lim
    for digits in range(3, 17):
        v, lim = (f"{x:.{digits}g}" for x in (value, limit))
        if v != lim:
            break
    return _tidy(v), _tidy(lim)


def _tidy(text: str) -> str:
    """Drop trailing zeros of a fixed-point number (never the exponent's)."""
    if "e" in text or "." not in text:
        return text
    return text.rstrip("0").rstrip(".")


def _check(metric: str, scope: str, value: float | None, limit: float, direction: Direction) -> Check:
    if value is None:
        return Check(metric, scope, None, limit, direction, False)
    ok = value >= limit if direction == Direction.MIN else value <= limit
    return Check(metric, scope, float(value), float(limit), direction, bool(ok))


# Per-output metrics that are reported but not gated on a decoder's logits. The worst row's cosine
# of a 262,144-wide logit vector does not tell a healthy artifact from a broken one: on the real
# Gemma 3 270M healthy int8-sq measures 0.446 and the same artifact with one up_proj zeroed 0.482
# (docs/results/parity-gates-gemma3-decoder.json). A decoder's logits are gated by top-1/top-5
# agreement, KL, perplexity, mean cosine and SNR instead.
NOT_ON_LOGITS = frozenset({"cosine_min"})


def evaluate(sections: dict[str, Any], thresholds: Thresholds) -> list[Check]:
    """One Check per (limit, output) that applies to this task's report sections."""
    checks: list[Check] = []
    outputs: dict[str, dict] = sections.get("outputs") or {}
    for name, m in outputs.items():
        checks.append(_check("nonfinite_candidate", name, m["nonfinite_candidate"], 0, Direction.MAX))
    if sections.get("tasks"):
        checks += evaluate_tasks(sections["tasks"], thresholds)
    for key, limit in thresholds.limits.items():
        spec = METRICS[key]
        if spec.scope == Scope.TASKS:
            continue  # per category, above
        if spec.scope == Scope.OUTPUT:
            for name, m in outputs.items():
                if key in NOT_ON_LOGITS and name == "logits" and sections.get("logits"):
                    continue  # reported, not gated: see NOT_ON_LOGITS
                checks.append(_check(key, name, m.get(key), limit, spec.direction))
            continue
        section = sections.get(spec.scope.value)
        if not section:
            continue  # not this task's metric (e.g. perplexity for an encoder)
        if key == "top5_agreement" and section.get(key) is None:
            continue  # five or fewer classes: top-5 says nothing
        checks.append(_check(key, spec.scope.value, section.get(key), limit, spec.direction))
    return checks


TASK_FIELDS = {"task_agreement": "agreement", "task_accuracy_drop": "accuracy_drop"}


def evaluate_tasks(tasks: dict[str, Any], thresholds: Thresholds) -> list[Check]:
    """One check per (task metric, category) that has a limit; fills in each category's
    ``limits``, ``passed`` and ``sample_size_note``, then ``order`` (worst first: failed
    categories, then the lowest agreement, then the largest accuracy drop) and ``worst_category``.
    Checks come back in that order."""
    per_cat: dict[str, list[Check]] = {}
    for cat, st in tasks["categories"].items():
        cat_checks = []
        limits: dict[str, Any] = {}
        for key in TASK_METRICS:
            limit = thresholds.task_limit(cat, key)
            if limit is None:
                continue
            value = st.get(TASK_FIELDS[key])
            if key == "task_accuracy_drop" and not st.get("n_with_answer"):
                continue  # no answers in this category: accuracy is not measured
            limits[key] = {"limit": limit, "direction": METRICS[key].direction.value}
            cat_checks.append(_check(key, f"tasks.{cat}", value, limit, METRICS[key].direction))
        st["limits"] = limits
        st["passed"] = all(c.passed for c in cat_checks)
        st["sample_size_note"] = sample_size_note(
            st["n"], st.get("n_with_answer") or 0, thresholds.task_limit(cat, "task_agreement"),
            thresholds.task_limit(cat, "task_accuracy_drop"))
        per_cat[cat] = cat_checks

    def severity(cat: str) -> tuple:
        st = tasks["categories"][cat]
        agreement = st["agreement"] if st["agreement"] is not None else 1.0
        drop = st["accuracy_drop"] if st.get("accuracy_drop") is not None else -math.inf
        return (st["passed"], agreement, -drop)

    order = sorted(tasks["categories"], key=severity)  # stable: ties keep the file's order
    tasks["order"] = order
    tasks["worst_category"] = order[0] if order else None
    return [c for cat in order for c in per_cat[cat]]


# per-batch figures (data.cases[].outputs) and the limits they are held to
CASE_METRICS = ("cosine_mean", "snr_db", "top1_agreement")


def flag_cases(cases: list[dict[str, Any]], thresholds: Thresholds) -> int:
    """Set each batch's ``missed_limits``: the messages of the limits one of its outputs misses
    on that batch alone (``cosine_mean``, ``snr_db``, logits ``top1_agreement``). A batch that
    misses a limit the whole run meets points at the inputs that break the model (a length,
    the padding). Returns how many batches miss one."""
    flagged = 0
    for case in cases:
        missed = []
        for output, figs in (case.get("outputs") or {}).items():
            for key in CASE_METRICS:
                limit = thresholds.limits.get(key)
                if limit is None or figs.get(key) is None:
                    continue
                c = _check(key, output, figs[key], limit, METRICS[key].direction)
                if not c.passed:
                    missed.append(c.message)
        case["missed_limits"] = missed
        flagged += bool(missed)
    return flagged


def failed(checks: list[Check] | tuple[Check, ...]) -> list[Check]:
    """Failed checks, what a user of the model would notice first: the task categories (worst
    first, as evaluate_tasks orders them), then the other task-level metrics (logits,
    perplexity, embeddings), then per-output failures."""

    def group(c: Check) -> int:
        if c.metric not in METRICS:
            return 2
        return {Scope.TASKS: 0, Scope.OUTPUT: 2}.get(METRICS[c.metric].scope, 1)

    return sorted((c for c in checks if not c.passed), key=group)


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
