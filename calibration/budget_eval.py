"""Measuring for the accuracy budget (calibration/budget.py): the held-out samples and the budget metric.

In:  the calibration samples (split into a ranges part and a held-out part), a session of the
     float export or of a switched / written quantized graph.
Out: the budget metric of a session on the held-out part (perplexity change over the float
     export, or mean embedding cosine), and the last hidden state per batch for the per-group
     sensitivities.

Two estimators of a decoder's perplexity change (recipe key ``budget_estimator``):

* ``kl`` (default): exp(mean KL(p_float || p_quant)) - 1 over the held-out next-token
  distributions: exactly the perplexity increase the quantized model shows on text the float
  model itself would write. On other text a token's NLL rises by the KL plus the label term
  sum_y (1[y = label] - p_float(y)) * (log p_float(y) - log p_quant(y)): noise whose sign changes
  per token, and a systematic part where the quantization shifts the model's confidence and the
  text disagrees with the float model (on Gemma 3's eval text the observed change was at or
  below the KL in 6 of 7 measured models, 1.1 points below with FP8 SmoothQuant; bench/kl_vs_nll.py,
  docs/quantization.md). The KL is the fidelity to the float model, without that noise: its
  bound sits close to its point and successive search steps are ordered by their error, not by
  which tokens happened to gain.
* ``nll``: the *observed* change of the held-out text's own perplexity (exp(mean NLL difference) - 1).

Both are computed on every measurement; the other one is recorded beside the one judged by. The KL
keeps the float export's ``KL_TOP`` (1024) most probable tokens per held-out position and the rest of
its probability as one bucket (a coarse-graining, so a lower bound of the full KL; the kept mass
and the difference are measured in bench/kl_vs_nll.py).
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
# held out: at most 32 samples, or more where they are short: as many as fit in 8192 tokens (32
# windows of 256). An encoder's sentences average ~40 tokens, so a flat 32 held out ~1.3k tokens
# and left the bound loose: all-MiniLM-L6-v2 fp8 at 304 calibration sentences holds out 61, not 32
MAX_HELD_OUT = 32
MAX_HELD_OUT_TOKENS = 8192
RANK_TOKENS = 512  # held-out tokens the per-group sensitivities are measured on
OUTPUT_BYTES = 256 << 20  # a batch's output (logits) kept under this
# the float export's most probable tokens kept per held-out position for the KL (fewer where the
# held-out part has so many positions that they would pass KL_TOP_BYTES). On Gemma 3 270M fp8
# (29 eval windows, bench/kl_vs_nll.py) the top 1024 hold 98.8% of the probability and the
# truncated KL is 2% under the full one (+2.762% against +2.821%; top 256: 96.1%, 6% under)
KL_TOP = 1024
KL_TOP_BYTES = 512 << 20
ESTIMATORS = ("kl", "nll")
FLAG = "trtforge_budget_"  # the switched graph's boolean inputs start with it


def split_held_out(samples: Samples) -> tuple[Samples, Samples]:
    """(ranges part, held-out part): every 1/HELD_OUT_SHARE-th sample held out, at most MAX_HELD_OUT
    or, where the samples are short, as many as MAX_HELD_OUT_TOKENS hold."""
    n = len(samples.ids)
    if n < 2:
        raise CalibrationError(f"an accuracy budget needs at least 2 calibration samples, and the data gives {n}",
                               "pass more calibration text: part of it is held out to measure the budget")
    mean_tokens = max(1.0, sum(len(a) for a in samples.ids) / max(n, 1))
    h = min(max(MAX_HELD_OUT, int(MAX_HELD_OUT_TOKENS // mean_tokens)), max(1, round(n * HELD_OUT_SHARE)))
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
                 providers: list | None = None, confidence: float = DEFAULT_CONFIDENCE, estimator: str = "kl") -> None:
        self.held, self.dims, self.task, self.budget = held, dims, task, budget
        self.estimator = estimator  # decoders: which perplexity estimate the budget is judged by (module docstring)
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
        self.reference_top: list[tuple[np.ndarray, np.ndarray]] | None = None  # per batch: top-K ids, log-probs
        self.rank_reference_top: list[tuple[np.ndarray, np.ndarray]] | None = None  # the same, ranking batches
        self.rank_reference: np.ndarray | None = None  # encoders: pooled embeddings of the ranking batches
        positions = max(1, sum(max(0, len(a) - 1) for a in held.ids))
        self.kl_top = max(16, min(KL_TOP, KL_TOP_BYTES // (8 * positions)))
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
            if self.reference is None:
                raise RuntimeError("set_reference first")
            nll, kl, count = self._decoder(sess, flags)
            # per sample, the mean difference against the float export; the point estimate is their
            # token-weighted mean (the pooled perplexity ratio, as over all held-out tokens)
            observed = self._measured((nll - np.asarray(self.reference)) / np.maximum(count, 1), count)
            if self.estimator == "nll":
                return observed
            expected = self._measured(kl / np.maximum(count, 1), count)
            return Measured(expected.point, expected.bound, expected.se, expected.quantile, expected.samples,
                            observed=observed.point, observed_bound=observed.bound, observed_se=observed.se)
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

    def _measured(self, per_sample: np.ndarray, count: np.ndarray) -> Measured:
        d, se = bound(per_sample, count)
        return Measured(_pct(d), _pct(d + self.quantile * se) if se is not None else _pct(d), se,
                        self.quantile if se is not None else 0.0, len(per_sample))

    def _decoder(self, sess, flags, keep_top: bool = False, rank: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per held-out sample (``rank``: per sample of the ranking tokens): summed next-token NLL,
        summed KL against the reference's top tokens (zeros without a reference), positions; with
        ``keep_top`` the session's own top tokens become the reference's."""
        which = self.rank_batches if rank else self.batches
        ref_top = self.rank_reference_top if rank else self.reference_top
        sums, kls, counts, tops = [], [], [], []
        for b, (feeds, logits) in enumerate(self.outputs(sess, flags, self.output, which)):
            top = ref_top[b] if ref_top is not None and not keep_top else None
            s, k, n, t = _decoder_rows(logits, feeds["input_ids"], top, self.kl_top if keep_top else 0)
            sums.append(s)
            kls.append(k)
            counts.append(n)
            tops.append(t)
        if keep_top:
            if rank:
                self.rank_reference_top = tops
            else:
                self.reference_top = tops
        return np.concatenate(sums), np.concatenate(kls), np.concatenate(counts).astype(np.float64)

    @property
    def ranks_by_metric(self) -> bool:
        """Whether the per-group sensitivities are the budget's own metric (a decoder judged by the
        KL: its mean KL; an encoder: one minus its mean embedding cosine) rather than the last
        hidden state's noise power (a decoder judged by the observed perplexity, whose label term
        is noise at one group's size)."""
        return not self.decoder or self.estimator == "kl"

    def rank_error(self, sess, flags: dict[str, bool]) -> float:
        """The budget metric's error of ``sess`` with ``flags`` on the ranking tokens: mean KL
        (nats per token) from the float export for decoders, 1 - mean embedding cosine for encoders."""
        if self.decoder:
            _, kl, count = self._decoder(sess, flags, rank=True)
            return float(kl.sum() / max(count.sum(), 1.0))
        pooled = np.concatenate([mean_pool(h, f["attention_mask"]) for f, h in
                                 self.outputs(sess, flags, self.output, self.rank_batches)])
        if self.rank_reference is None:
            self.rank_reference = pooled
            return 0.0
        return float(1.0 - np.mean(row_cosine(self.rank_reference, pooled)))

    def set_reference(self, export_model: Path) -> None:
        sess = mapped_session(export_model, self.providers)
        if self.decoder:
            self.reference = self._decoder(sess, None, keep_top=self.estimator == "kl")[0]
            if self.ranks_by_metric:
                self._decoder(sess, None, keep_top=True, rank=True)
        else:
            self.reference = self.value(sess)
            self.rank_reference = None
            self.rank_error(sess, {})  # sets rank_reference
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


def _decoder_rows(logits: np.ndarray, ids: np.ndarray, top: tuple[np.ndarray, np.ndarray] | None = None,
                  keep: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Per row of unpadded rows: (summed next-token negative log-likelihood, summed KL from the
    reference ``top`` (its top-K token ids and log-probabilities per position, the rest of its
    mass one bucket), positions, this batch's own top-``keep`` ids and log-probabilities or None)."""
    b, s, v = logits.shape
    nll, kl = np.zeros(b, np.float64), np.zeros(b, np.float64)
    k_keep = min(keep, v - 1) if keep else 0
    own = (np.zeros((b, s - 1, k_keep), np.int32), np.zeros((b, s - 1, k_keep), np.float32)) if k_keep else None
    for r in range(b):
        for k in range(0, s - 1, 64):
            e = min(k + 64, s - 1)
            x = logits[r, k:e].astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
            nll[r] += float((lse - x[np.arange(x.shape[0]), ids[r, k + 1 : e + 1]]).sum())
            if own is not None:
                idx = np.argpartition(-x, k_keep - 1, axis=1)[:, :k_keep]
                own[0][r, k:e] = idx
                own[1][r, k:e] = np.take_along_axis(x, idx, 1) - lse[:, None]
            if top is not None:
                lp = top[1][r, k:e].astype(np.float64)
                lq = np.take_along_axis(x, top[0][r, k:e].astype(np.int64), 1) - lse[:, None]
                p = np.exp(lp)
                rest_p = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
                rest_q = np.clip(1.0 - np.exp(lq).sum(axis=1), 1e-300, 1.0)
                tail = np.where(rest_p > 0, rest_p * (np.log(np.maximum(rest_p, 1e-300)) - np.log(rest_q)), 0.0)
                kl[r] += float((p * (lp - lq)).sum() + tail.sum())
    return nll, kl, np.full(b, s - 1, np.int64), own


def noise_power(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r).sum()) for r in ref)
    noise = sum(float(np.square(g - r).sum()) for r, g in zip(ref, got, strict=True))
    return noise / max(signal, 1e-30)
