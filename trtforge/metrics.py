"""Metrics Polygraphy does not compute: padding-aware errors and the task-level figures.

In:  per batch, the reference's and the candidate's outputs (numpy, any float dtype) and the
     feeds (attention_mask, input_ids), as Polygraphy's Comparator returns them.
Out: plain dicts of floats for report.json:

- every output, on valid (unpadded) positions only: max / mean / p99 absolute error, relative
  error |c - r| / max(|r|, floor) with floor = FLOOR_FRACTION x RMS(reference), per-row cosine
  similarity (rows along the last axis; mean and min), SNR in dB (capped at SNR_CAP_DB);
- logits: top-1 agreement, top-5 overlap, KL(reference || candidate) of the softmax;
- causal LMs: perplexity of both on the next token of the held-out text, and the change in %;
- feature extraction: cosine of mask-aware mean-pooled sentence embeddings
  (the pooling sentence-transformers uses);
- histograms (log10 of errors) for the report's plots.

Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from trtforge.errors import ParityError
from trtforge.inputs import valid_mask_for

FLOOR_FRACTION = 1e-2
SNR_CAP_DB = 200.0
SAMPLE_PER_BATCH = 20_000  # values kept per batch for percentiles and histograms
HIST_BINS = 32
ROW_CHUNK = 256  # rows of logits per softmax block (bounds memory for large vocabularies)


def valid_for(output: str, shape: tuple[int, ...], feeds: dict[str, np.ndarray], task: str) -> np.ndarray | None:
    """Boolean mask broadcastable to ``shape`` marking unpadded positions (None: all valid)."""
    if task == "sequence-classification" and output == "logits":
        return None  # one row per sequence: every row is valid
    return valid_mask_for(output, shape, feeds)


def valid_rows(a: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Rows along the last axis at valid positions, as [n, d] float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    flat = a.reshape(-1, a.shape[-1])
    if valid is None:
        return flat
    rows = np.broadcast_to(valid, a.shape)[..., 0].reshape(-1)
    return flat[rows]


def row_cosine(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cosine per row; 1 where both rows are zero, 0 where only one is."""
    nr = np.linalg.norm(r, axis=-1)
    nc = np.linalg.norm(c, axis=-1)
    dot = np.einsum("ij,ij->i", r, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (nr * nc)
    cos = np.where((nr == 0) & (nc == 0), 1.0, np.where((nr == 0) | (nc == 0), 0.0, cos))
    return np.clip(cos, -1.0, 1.0)


def snr_db(signal_power: float, noise_power: float) -> float:
    if noise_power <= 0:
        return SNR_CAP_DB
    if signal_power <= 0:
        return -SNR_CAP_DB
    return float(max(-SNR_CAP_DB, min(SNR_CAP_DB, 10.0 * math.log10(signal_power / noise_power))))


def histogram_log10(values: np.ndarray, lowest: float = -9.0) -> dict[str, Any]:
    """Histogram of log10(values) for values > 0; zeros (exact matches) are counted apart."""
    values = np.asarray(values, dtype=np.float64)
    pos = values[values > 0]
    zeros = int(values.size - pos.size)
    if pos.size == 0:
        return {"log10": True, "edges": [], "counts": [], "zeros": zeros, "total": int(values.size)}
    logs = np.maximum(np.log10(pos), lowest)
    lo, hi = math.floor(float(logs.min())), math.ceil(float(logs.max()))
    if hi <= lo:
        hi = lo + 1
    counts, edges = np.histogram(logs, bins=HIST_BINS, range=(lo, hi))
    return {"log10": True, "edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts],
            "zeros": zeros, "total": int(values.size)}


def output_metrics(
    name: str, refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], valids: Sequence[np.ndarray | None],
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Error metrics of one output over all batches; returns (metrics, distributions)."""
    sel_r, sel_c = [], []
    for r, c, v in zip(refs, cands, valids, strict=True):
        if r.shape != c.shape:
            raise ParityError(
                f"output {name!r} has shape {list(r.shape)} in the reference but {list(c.shape)} in the candidate",
                "compare artifacts of the same model and task",
            )
        if v is None:
            sel_r.append(np.asarray(r, np.float64).reshape(-1))
            sel_c.append(np.asarray(c, np.float64).reshape(-1))
        else:
            m = np.broadcast_to(v, r.shape)
            sel_r.append(np.asarray(r, np.float64)[m])
            sel_c.append(np.asarray(c, np.float64)[m])
    ref_bad = sum(int((~np.isfinite(x)).sum()) for x in sel_r)
    cand_bad = sum(int((~np.isfinite(x)).sum()) for x in sel_c)
    finite = [np.isfinite(r) & np.isfinite(c) for r, c in zip(sel_r, sel_c, strict=True)]
    n = int(sum(int(f.sum()) for f in finite))
    if n == 0:
        raise ParityError(f"output {name!r} has no finite values on valid positions in both models",
                          "check the inputs: every position may be padding, or a model produces NaN everywhere")
    sum_sq = sum(float(np.square(r[f]).sum()) for r, f in zip(sel_r, finite, strict=True))
    floor = max(FLOOR_FRACTION * math.sqrt(sum_sq / n), np.finfo(np.float64).tiny)
    max_abs = max_rel = sum_abs = sum_rel = noise = 0.0
    abs_sample, rel_sample = [], []
    for r, c, f in zip(sel_r, sel_c, finite, strict=True):
        d = np.abs(c[f] - r[f])
        rel = d / np.maximum(np.abs(r[f]), floor)
        if d.size:
            max_abs, max_rel = max(max_abs, float(d.max())), max(max_rel, float(rel.max()))
        sum_abs += float(d.sum())
        sum_rel += float(rel.sum())
        noise += float(np.square(d).sum())
        if d.size > SAMPLE_PER_BATCH:
            idx = rng.choice(d.size, SAMPLE_PER_BATCH, replace=False)
            d, rel = d[idx], rel[idx]
        abs_sample.append(d)
        rel_sample.append(rel)
    cos_parts = []
    for r, c, v in zip(refs, cands, valids, strict=True):
        rr, cc = valid_rows(r, v), valid_rows(c, v)
        ok = np.isfinite(rr).all(axis=1) & np.isfinite(cc).all(axis=1)
        cos_parts.append(row_cosine(rr[ok], cc[ok]))
    cos = np.concatenate(cos_parts) if cos_parts else np.ones(1)
    abs_all, rel_all = np.concatenate(abs_sample), np.concatenate(rel_sample)
    metrics = {
        "num_values": n,
        "num_rows": int(cos.size),
        "max_abs_err": max_abs,
        "mean_abs_err": sum_abs / n,
        "p99_abs_err": float(np.quantile(abs_all, 0.99)) if abs_all.size else 0.0,
        "max_abs_ref": max(float(np.abs(r[f]).max()) if f.any() else 0.0 for r, f in zip(sel_r, finite, strict=True)),
        "rel_err_floor": floor,
        "rel_err_mean": sum_rel / n,
        "rel_err_p99": float(np.quantile(rel_all, 0.99)) if rel_all.size else 0.0,
        "rel_err_max": max_rel,
        "cosine_mean": float(cos.mean()) if cos.size else 1.0,
        "cosine_min": float(cos.min()) if cos.size else 1.0,
        "snr_db": snr_db(sum_sq, noise),
        "nonfinite_candidate": cand_bad,
        "nonfinite_reference": ref_bad,
    }
    dist = {"abs_err": histogram_log10(abs_all), "one_minus_cosine": histogram_log10(1.0 - cos)}
    return metrics, dist


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logits_metrics(
    refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], valids: Sequence[np.ndarray | None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Arg-max agreement, top-5 overlap and KL divergence over valid rows of the logits."""
    top1, overlap, kls = [], [], []
    vocab = int(refs[0].shape[-1])
    k = min(5, vocab)
    for r, c, v in zip(refs, cands, valids, strict=True):
        rr, cc = valid_rows(r, v), valid_rows(c, v)
        ok = np.isfinite(rr).all(axis=1) & np.isfinite(cc).all(axis=1)
        rr, cc = rr[ok], cc[ok]
        for s in range(0, rr.shape[0], ROW_CHUNK):
            a, b = rr[s : s + ROW_CHUNK], cc[s : s + ROW_CHUNK]
            top1.append(a.argmax(axis=1) == b.argmax(axis=1))
            if vocab > 5:
                ta = np.argpartition(-a, k - 1, axis=1)[:, :k]
                tb = np.argpartition(-b, k - 1, axis=1)[:, :k]
                overlap.append(np.array([len(set(x) & set(y)) / k for x, y in zip(ta.tolist(), tb.tolist(), strict=True)]))
            la, lb = _log_softmax(a), _log_softmax(b)
            kls.append(np.maximum((np.exp(la) * (la - lb)).sum(axis=1), 0.0))
    t1 = np.concatenate(top1) if top1 else np.zeros(0, bool)
    kl = np.concatenate(kls) if kls else np.zeros(0)
    if t1.size == 0:
        raise ParityError("no finite logits rows to compare", "a model produces NaN or Inf logits everywhere")
    metrics = {
        "num_rows": int(t1.size),
        "vocab_size": vocab,
        "top1_agreement": float(t1.mean()),
        "top5_agreement": float(np.concatenate(overlap).mean()) if overlap else None,
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
    }
    return metrics, {"kl": histogram_log10(kl)}


def perplexity(
    refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], feeds: Sequence[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Next-token perplexity of both models where position t and its target t+1 are real tokens."""
    nll_r = nll_c = 0.0
    count = 0
    for r, c, f in zip(refs, cands, feeds, strict=True):
        ids = f["input_ids"]
        seq = ids.shape[1]
        mask = f["attention_mask"][:, -seq:].astype(bool) if "attention_mask" in f else np.ones_like(ids, bool)
        pair = mask[:, :-1] & mask[:, 1:]
        b_idx, t_idx = np.nonzero(pair)
        targets = ids[b_idx, t_idx + 1]
        for s in range(0, b_idx.size, ROW_CHUNK):
            sl = slice(s, s + ROW_CHUNK)
            lr = _log_softmax(np.asarray(r[b_idx[sl], t_idx[sl]], np.float64))
            lc = _log_softmax(np.asarray(c[b_idx[sl], t_idx[sl]], np.float64))
            rows = np.arange(lr.shape[0])
            nll_r -= float(lr[rows, targets[sl]].sum())
            nll_c -= float(lc[rows, targets[sl]].sum())
        count += int(b_idx.size)
    if count == 0:
        raise ParityError("no text of two tokens or more to measure perplexity on", "pass longer held-out text")

    def _ppl(nll: float) -> float | None:
        v = nll / count
        return math.exp(v) if math.isfinite(v) and v < 700 else None

    pr, pc = _ppl(nll_r), _ppl(nll_c)
    change = (pc / pr - 1.0) * 100.0 if pr and pc else None
    return {"num_tokens": count, "reference": pr, "candidate": pc,
            "nll_reference": nll_r / count if math.isfinite(nll_r) else None,
            "nll_candidate": nll_c / count if math.isfinite(nll_c) else None,
            "ppl_change_pct": change}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: sum of real-token vectors / max(count, 1e-9)."""
    m = mask.astype(np.float64)[:, :, None]
    return (np.asarray(hidden, np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def embedding_metrics(
    refs: Sequence[np.ndarray], cands: Sequence[np.ndarray], feeds: Sequence[dict[str, np.ndarray]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    cos = np.concatenate([
        row_cosine(mean_pool(r, f["attention_mask"]), mean_pool(c, f["attention_mask"]))
        for r, c, f in zip(refs, cands, feeds, strict=True)
    ])
    ok = np.isfinite(cos)
    if not ok.any():
        raise ParityError("no finite sentence embeddings to compare", "a model produces NaN or Inf everywhere")
    cos = cos[ok]
    metrics = {"pooling": "mean (attention-mask aware)", "num_sentences": int(cos.size),
               "embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min())}
    return metrics, {"one_minus_embedding_cosine": histogram_log10(1.0 - cos)}
