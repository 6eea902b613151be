"""Measuring for the accuracy budget (calibration/budget.py): the held-out samples and the budget metric.

In:  the calibration samples (split into a ranges part and a held-out part), a session of the
     float export or of a switched / written quantized graph.
Out: the budget metric of a session on the held-out part (perplexity change over the float
     export, or mean embedding cosine), and the last hidden state per batch for the per-group
     sensitivities.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trtforge.calibration.budget_spec import DEFAULT_CONFIDENCE, Budget, Measured, t_quantile
from trtforge.calibration.collect import batches
from trtforge.errors import CalibrationError
from trtforge.inputs import make_feeds
from trtforge.manifest import ModelDims
from trtforge.metrics import mean_pool, row_cosine
from trtforge.onnx_io import load_graph
from trtforge.ort import NO_PREPACKING, graph_session, release_memory
from trtforge.textdata import Samples
from trtforge.vocab import Task

HELD_OUT_SHARE = 0.2  # of the calibration samples, spread evenly over them
MAX_HELD_OUT = 32
RANK_TOKENS = 512  # held-out tokens the per-group sensitivities are measured on
OUTPUT_BYTES = 256 << 20  # a batch's output (logits) kept under this
FLAG = "trtforge_budget_"  # the switched graph's boolean inputs start with it


def split_held_out(samples: Samples) -> tuple[Samples, Samples]:
    """(ranges part, held-out part): every 1/HELD_OUT_SHARE-th sample held out, at most MAX_HELD_OUT."""
    n = len(samples.ids)
    if n < 2:
        raise CalibrationError(f"an accuracy budget needs at least 2 calibration samples, and the data gives {n}",
                               "pass more calibration text: part of it is held out to measure the budget")
    h = min(MAX_HELD_OUT, max(1, round(n * HELD_OUT_SHARE)))
    held = sorted({min(n - 1, int((i + 0.5) * n / h)) for i in range(h)})
    rest = [i for i in range(n) if i not in set(held)]

    def pick(idx: list[int]) -> Samples:
        tt = samples.token_type_ids
        return Samples([samples.ids[i] for i in idx], samples.mode, samples.sources, list(samples.notes),
                       [tt[i] for i in idx] if tt else None, samples.files)

    return pick(rest), pick(held)


class HeldOut:
    """The held-out batches, the float export's result on them, and the budget metric of a session."""

    def __init__(self, held: Samples, dims: ModelDims, task: Task, budget: Budget, vocab: int, hidden_size: int,
                 providers: list | None = None, confidence: float = DEFAULT_CONFIDENCE) -> None:
        self.held, self.dims, self.task, self.budget = held, dims, task, budget
        self.providers = providers  # the calibration device's (trtforge.ort.calibration_device)
        # the one-sided confidence of the bound the budget is judged by (budget_spec.DEFAULT_CONFIDENCE)
        self.confidence = confidence
        m = len(held.ids)
        self.quantile = t_quantile(confidence, m - 1) if confidence > 0 and m >= 2 else 0.0
        self.decoder = task.is_decoder
        self.output = "logits" if self.decoder else "last_hidden_state"
        width = vocab if self.decoder else hidden_size
        longest = max(len(a) for a in held.ids)
        size = max(1, min(8, OUTPUT_BYTES // max(1, longest * width * 4)))
        self.batches = batches(held, size)
        self.rank_batches = self._first_tokens(RANK_TOKENS)
        self.reference: float | np.ndarray | None = None
        self.runs = 0

    def _first_tokens(self, limit: int) -> list[list[int]]:
        """The shortest held-out samples up to ``limit`` tokens, in batches of up to 8 of one length:
        each run dequantizes every weight of the switched graph, so few runs cost less than many."""
        chosen, tokens = [], 0
        for b in batches(self.held, 1):
            n = len(self.held.ids[b[0]])
            if chosen and tokens + n > limit:
                break
            chosen.append(b[0])
            tokens += n
        by_len: dict[int, list[int]] = {}
        for i in chosen:
            by_len.setdefault(len(self.held.ids[i]), []).append(i)
        return [idx[k : k + 8] for idx in by_len.values() for k in range(0, len(idx), 8)]

    @property
    def rank_tokens(self) -> int:
        return sum(len(self.held.ids[i]) for b in self.rank_batches for i in b)

    def _feeds(self, sess, idx: list[int], flags: dict[str, bool] | None) -> dict[str, np.ndarray]:
        types = {i.name: i.type for i in sess.get_inputs()}
        names = [n for n in types if not n.startswith(FLAG)]
        f16 = any(types[n] == "tensor(float16)" for n in names)
        ids = np.stack([self.held.ids[i] for i in idx])
        tt = np.stack([self.held.token_type_ids[i] for i in idx]) if self.held.token_type_ids else None
        feeds = make_feeds(ids, names, self.dims, np.float16 if f16 else np.float32, tt)
        for n in types:
            if n.startswith(FLAG):
                feeds[n] = np.asarray(bool(flags and flags.get(n)), np.bool_)
        return feeds

    def outputs(self, sess, flags: dict[str, bool] | None, tensor: str, which: list[list[int]]):
        """(feeds, output) per batch."""
        self.runs += 1
        for idx in which:
            feeds = self._feeds(sess, idx, flags)
            yield feeds, sess.run([tensor], feeds)[0]

    def value(self, sess, flags: dict[str, bool] | None = None) -> Measured:
        """The budget metric of ``sess`` (with ``flags``) against the float export's reference:
        the point estimate and its confidence bound (:func:`bound`)."""
        if self.decoder:
            sums, counts = [], []
            for feeds, logits in self.outputs(sess, flags, self.output, self.batches):
                s, n = _nll_rows(logits, feeds["input_ids"])
                sums.append(s)
                counts.append(n)
            nll, count = np.concatenate(sums), np.concatenate(counts).astype(np.float64)
            if self.reference is None:
                return nll  # type: ignore[return-value]
            ref = np.asarray(self.reference)
            # per sample, the mean NLL difference against the float export; the point estimate is
            # their token-weighted mean (the pooled perplexity ratio, as over all held-out tokens)
            d, se = bound((nll - ref) / np.maximum(count, 1), count)
            return Measured(_pct(d), _pct(d + self.quantile * se) if se is not None else _pct(d), se,
                            self.quantile if se is not None else 0.0, len(nll))
        pooled = np.concatenate([mean_pool(h, f["attention_mask"]) for f, h in
                                 self.outputs(sess, flags, self.output, self.batches)])
        if self.reference is None:
            return pooled  # type: ignore[return-value]
        cos = row_cosine(np.asarray(self.reference), pooled)
        if not np.isfinite(cos).all():
            return Measured(-math.inf, -math.inf, None, 0.0, len(cos))
        c, se = bound(np.asarray(cos, np.float64), np.ones(len(cos)))
        return Measured(c, c - self.quantile * se if se is not None else c, se,
                        self.quantile if se is not None else 0.0, len(cos))

    def set_reference(self, export_model: Path) -> None:
        sess = mapped_session(export_model, self.providers)
        self.reference = self.value(sess)
        del sess
        release_memory()

    def hidden(self, sess, flags: dict[str, bool], tensor: str) -> list[np.ndarray]:
        return [np.asarray(h, np.float64) for _, h in self.outputs(sess, flags, tensor, self.rank_batches)]


def mapped_session(path: Path, providers: list | None = None):
    """A session whose weights ONNX Runtime reads from their file (a model held in one file
    included: its graph is loaded without them), never parsed into this process whole."""
    return graph_session(load_graph(path), path.parent, config=NO_PREPACKING, providers=providers)


def bound(values: np.ndarray, weights: np.ndarray) -> tuple[float, float | None]:
    """(weighted mean, its standard error) of per-sample values: the ratio estimator's
    SE^2 = m / (m - 1) * sum(w_i^2 (x_i - mean)^2) / (sum w_i)^2, which for equal weights is
    the sample variance (ddof 1) over m; None with fewer than two samples."""
    w = np.asarray(weights, np.float64)
    x = np.asarray(values, np.float64)
    mean = float((w * x).sum() / max(w.sum(), 1e-300))
    m = len(x)
    if m < 2:
        return mean, None
    var = m / (m - 1) * float((w**2 * (x - mean) ** 2).sum()) / float(w.sum()) ** 2
    return mean, math.sqrt(max(var, 0.0))


def _pct(d: float) -> float:
    """A mean NLL difference (nats) as a perplexity change in percent."""
    return 100.0 * (math.exp(d) - 1.0) if math.isfinite(d) and d < 700 else math.inf


def _nll_rows(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of unpadded rows: (summed next-token negative log-likelihood, positions)."""
    b, s, v = logits.shape
    out = np.zeros(b, np.float64)
    for r in range(b):
        for k in range(0, s - 1, 64):
            x = logits[r, k : min(k + 64, s - 1)].astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
            out[r] += float((lse - x[np.arange(x.shape[0]), ids[r, k + 1 : k + 1 + x.shape[0]]]).sum())
    return out, np.full(b, s - 1, np.int64)


def noise_power(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r).sum()) for r in ref)
    noise = sum(float(np.square(g - r).sum()) for r, g in zip(ref, got, strict=True))
    return noise / max(signal, 1e-30)
