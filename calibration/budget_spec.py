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
from statistics import NormalDist

from trtforge.errors import OptionError
from trtforge.vocab import Task

EXAMPLE = "e.g. budget perplexity=1% (decoders) or embedding_cosine=0.999 (encoders)"

# The budget is judged by a one-sided confidence bound of the held-out measurement, not by its
# point estimate (recipe key ``budget_confidence``; 0: the point estimate). The held-out part is
# a few samples (9 windows of Gemma 3's 45), and the search stops at the first assignment whose
# measurement crosses the limit: a point estimate just under the limit is, about half the time,
# above it on text the search did not see (Gemma 3 fp8: +0.90% held out, +1.11% on the eval text).
# The bound is the point estimate plus t * the standard error of the per-sample paired difference
# against the float export (per-window mean NLL difference for perplexity, per-sentence cosine for
# embeddings), Student's t with samples - 1 degrees of freedom: the margin follows the spread the
# measurement itself shows, so a model whose held-out samples agree keeps little extra and a noisy
# one keeps more, with no constant tuned to a model. It covers sampling noise between windows of
# one kind of text, not a shift to another kind of text.
DEFAULT_CONFIDENCE = 0.95


# written here rather than scipy.stats.t.ppf: scipy is not a dependency of trtforge (pyproject.toml),
# and one quantile does not justify adding it; tests/calibration/test_budget.py checks table values
def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile (``p`` in [0.5, 1)): exact for 1 and 2 degrees of freedom, the
    Cornish-Fisher expansion in the normal quantile beyond (for p <= 0.99: within 0.4% at 3,
    1e-4 from 8 degrees of freedom)."""
    if p == 0.5:
        return 0.0
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    v = float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


@dataclass(frozen=True)
class Measured:
    """One measurement on the held-out part: the point estimate (the metric over all held-out
    tokens or sentences), the confidence bound the budget is judged by (above the point for a
    perplexity increase, below it for a cosine; the point itself at confidence 0 or with one
    sample), the standard error of the per-sample paired difference (nats, or cosine), the
    quantile applied to it and the number of samples."""

    point: float
    bound: float
    se: float | None = None
    quantile: float = 0.0
    samples: int = 0
    # decoders judged by the expected (KL) perplexity change: the held-out text's observed change
    # beside it (budget_eval.py's module docstring), its bound and standard error
    observed: float | None = None
    observed_bound: float | None = None
    observed_se: float | None = None

    def to_json(self) -> dict:
        out = {"value": self.point, "bound": self.bound, "standard_error": self.se}
        if self.observed is not None:
            out.update(observed=self.observed, observed_bound=self.observed_bound, observed_standard_error=self.observed_se)
        return out


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

    def met(self, value: float | Measured | None) -> bool:
        """Whether ``value`` (a Measured: its confidence bound) is within the limit."""
        if isinstance(value, Measured):
            value = value.bound
        if value is None or not math.isfinite(value):
            return False
        return value >= self.limit if self.metric.higher_is_better else value <= self.limit

    def error(self, value: float | Measured) -> float:
        """``value`` (a Measured: its bound) on a scale where the quantization errors of separate
        groups add up, 0 for the float export: a perplexity change in percent -> nats per token
        (log(1 + p / 100), what a KL sum or an NLL difference is in); a cosine -> 1 - cosine.
        The prefix search (calibration/budget.py) interpolates on it; inf where not finite."""
        if isinstance(value, Measured):
            value = value.bound
        if value is None or not math.isfinite(value):
            return math.inf
        if self.metric.unit == "%":
            return math.log1p(value / 100.0) if value > -100.0 else -math.inf
        return 1.0 - value if self.metric.higher_is_better else value

    def show(self, value: float | Measured | None) -> str:
        if isinstance(value, Measured):
            if value.bound == value.point:
                return self.show(value.point)
            side = "upper" if not self.metric.higher_is_better else "lower"
            return f"{self.show(value.point)} ({side} bound {self.show(value.bound)})"
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
