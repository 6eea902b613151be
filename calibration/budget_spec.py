"""Accuracy budgets: ``perplexity=1%`` (decoders), ``embedding_cosine=0.999`` (encoders).

In:  the text of a budget (``--budget``, the recipe key ``budget``).
Out: a :class:`Budget` (metric, limit, which models it applies to), or an OptionError naming the
     ``budget`` field with an example; :func:`check_applies` refuses a metric the model cannot
     be measured by (an encoder metric on a decoder) before any work.

Kept apart from the search (calibration/budget.py) so that the recipe can check the text when
it is loaded, without importing what the search needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trtforge.errors import OptionError
from trtforge.vocab import Task

EXAMPLE = "e.g. budget perplexity=1% (decoders) or embedding_cosine=0.999 (encoders)"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    unit: str  # "%" for a relative change, "" for an absolute value
    decoder: bool  # True: causal LMs (logits); False: encoders (last_hidden_state)
    description: str


METRICS: dict[str, Metric] = {
    "perplexity": Metric("perplexity", False, "%", True,
                         "next-token perplexity increase over the float export, in percent"),
    "embedding_cosine": Metric("embedding_cosine", True, "", False,
                               "mean cosine of mean-pooled sentence embeddings against the float export"),
}


@dataclass(frozen=True)
class Budget:
    metric: Metric
    limit: float
    text: str

    def met(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.limit if self.metric.higher_is_better else value <= self.limit

    def show(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:+.3f}%" if self.metric.unit == "%" else f"{value:.8f}"

    def to_json(self) -> dict:
        return {"metric": self.metric.name, "limit": self.limit, "unit": self.metric.unit, "text": self.text}


def parse_budget(text: str) -> Budget:
    """``METRIC=VALUE``: ``perplexity=1%`` (or ``=1``: percent), ``embedding_cosine=0.999``."""
    s = str(text).strip()
    name, sep, value = s.partition("=")
    name, value = name.strip().lower(), value.strip()
    if not sep or not name or not value:
        raise OptionError(f"budget {text!r} is not METRIC=VALUE", EXAMPLE, fields=("budget",))
    metric = METRICS.get(name)
    if metric is None:
        raise OptionError(f"budget {text!r}: unknown metric {name!r} (known: {', '.join(METRICS)})", EXAMPLE,
                          fields=("budget",))
    raw = value[:-1].strip() if metric.unit == "%" and value.endswith("%") else value
    try:
        limit = float(raw)
    except ValueError:
        raise OptionError(f"budget {text!r}: {value!r} is not a number", EXAMPLE, fields=("budget",)) from None
    if not math.isfinite(limit):
        raise OptionError(f"budget {text!r}: {value!r} is not a finite number", EXAMPLE, fields=("budget",))
    if metric.unit == "%" and limit < 0:
        raise OptionError(f"budget {text!r}: a perplexity increase limit cannot be negative",
                          "e.g. budget perplexity=1%", fields=("budget",))
    if metric.unit == "" and not 0.0 < limit <= 1.0:
        raise OptionError(f"budget {text!r}: a cosine limit must be in (0, 1]", "e.g. budget embedding_cosine=0.999",
                          fields=("budget",))
    return Budget(metric, limit, f"{metric.name}={value}")


def check_applies(budget: Budget, task: Task) -> None:
    """An encoder metric on a decoder (or the reverse) is refused before any work."""
    if budget.metric.decoder and not task.is_decoder:
        raise OptionError(f"budget {budget.text!r} measures a causal LM's perplexity, and this model is a {task} model",
                          "for encoders use e.g. budget embedding_cosine=0.999", fields=("budget",))
    if not budget.metric.decoder and task != Task.FEATURE_EXTRACTION:
        raise OptionError(f"budget {budget.text!r} compares sentence embeddings, and this model is a {task} model",
                          "for causal LMs use e.g. budget perplexity=1%" if task.is_decoder
                          else "export with --task feature-extraction to measure embeddings", fields=("budget",))
