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

Everything is computed in float64, a block of rows at a time (BLOCK_ELEMENTS values of one
sequence): a batch's outputs are never converted whole, so a 262k-token vocabulary's logits cost
one block of float64 temporaries, and outputs may be arrays read from disk block by block
(``parity.run.SpilledArray``: anything with ``shape``, ``dtype`` and basic slicing). Every figure is
the one the whole-batch computation gives (sums in another order aside: 1e-15 relative).
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
ROW_CHUNK = 256  # rows of logits per softmax block at most
BLOCK_ELEMENTS = 1 << 22  # values per float64 block (32 MiB; a 262k vocabulary: 16 rows)


def blocks(shape: tuple[int, ...], max_elements: int = 0) -> list[tuple]:
    """Index tuples covering an array of ``shape`` in C order, each a slab of at most about
    ``max_elements`` values (default BLOCK_ELEMENTS): one sequence (axis 0), cut along axis 1.
    Concatenating ``a[blk]`` (or ``a[blk][mask[blk]]``) over the blocks gives ``a`` flattened
    (``a[mask]``), in the same order."""
    max_elements = max_elements or BLOCK_ELEMENTS
    if len(shape) < 2:
        return [(slice(None),)] if shape else [()]
    inner = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    step = max(1, max_elements // max(inner, 1))
    return [(b, slice(t, t + step)) for b in range(shape[0]) for t in range(0, shape[1], step)]


def _mask(valid: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    return None if valid is None else np.broadcast_to(valid, shape)


def _values(r, c, valid: np.ndarray | None):
    """(r, c) at valid positions as float64 1-D blocks, in the order of ``r[valid]``."""
    m = _mask(valid, r.shape)
    for blk in blocks(r.shape):
        rb, cb = np.asarray(r[blk]), np.asarray(c[blk])
        if m is not None:
            mb = m[blk]
            rb, cb = rb[mb], cb[mb]
        yield rb.astype(np.float64).reshape(-1), cb.astype(np.float64).reshape(-1)


def row_blocks(a, valid: np.ndarray | None, max_elements: int = 0):
    """Rows along the last axis at valid positions, as float64 [n, d] blocks in row order
    (what :func:`valid_rows` returns, a block at a time; a block never cuts a row)."""
    max_elements = max_elements or BLOCK_ELEMENTS
    shape = tuple(a.shape)
    m = _mask(valid, shape)
    if len(shape) < 2:
        keys = [None]
    elif len(shape) == 2:
        step = max(1, max_elements // max(shape[1], 1))
        keys = [(slice(b, b + step),) for b in range(0, shape[0], step)]
    else:
        keys = blocks(shape, max_elements)  # cuts axis 1 at most: rows stay whole
    for blk in keys:
        if blk is None:
            ab, mb = np.asarray(a)[None, :], (None if m is None else m[None, :])
        else:
            ab, mb = np.asarray(a[blk]), (None if m is None else m[blk])
        flat = ab.reshape(-1, ab.shape[-1])
        if mb is not None:
            flat = flat[mb[..., 0].reshape(-1)]
        yield flat.astype(np.float64)


def column(outputs, name: str):
    """``[o[name] for o in outputs]``, read when indexed: outputs spilled to disk stay there."""
    return _Column(outputs, name)


class _Column:
    def __init__(self, outputs, name: str) -> None:
        self._outputs, self._name = outputs, name

    def __len__(self) -> int:
        return len(self._outputs)

    def __getitem__(self, i: int):
        return self._outputs[i][self._name]

    def __iter__(self):
        return (self._outputs[i][self._name] for i in range(len(self._outputs)))


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
    """Error metrics of one output over all batches; returns (metrics, distributions).

    Two passes over the batches, a block at a time: the reference's RMS (the relative error's
    floor), then the errors. Each batch keeps at most SAMPLE_PER_BATCH of its values, drawn
    from all of them, for percentiles and histograms."""
    ref_bad = cand_bad = n = 0
    sum_sq = max_abs_ref = 0.0
    counts = []
    for r, c, v in zip(refs, cands, valids, strict=True):
        if tuple(r.shape) != tuple(c.shape):
            raise ParityError(
                f"output {name!r} has shape {list(r.shape)} in the reference but {list(c.shape)} in the candidate",
                "compare artifacts of the same model and task",
            )
        k = 0
        for rs, cs in _values(r, c, v):
            fr, fc = np.isfinite(rs), np.isfinite(cs)
            ref_bad += int((~fr).sum())
            cand_bad += int((~fc).sum())
            f = fr & fc
            k += int(f.sum())
            rf = rs[f]
            sum_sq += float(np.square(rf).sum())
            if rf.size:
                max_abs_ref = max(max_abs_ref, float(np.abs(rf).max()))
        counts.append(k)
        n += k
    if n == 0:
        raise ParityError(f"output {name!r} has no finite values on valid positions in both models",
                          "check the inputs: every position may be padding, or a model produces NaN everywhere")
    floor = max(FLOOR_FRACTION * math.sqrt(sum_sq / n), np.finfo(np.float64).tiny)
    max_abs = max_rel = sum_abs = sum_rel = noise = 0.0
    abs_sample, rel_sample, cos_parts = [], [], []
    for (r, c, v), k in zip(zip(refs, cands, valids, strict=True), counts, strict=True):
        pick = np.sort(rng.choice(k, SAMPLE_PER_BATCH, replace=False)) if k > SAMPLE_PER_BATCH else None
        off = 0
        for rs, cs in _values(r, c, v):
            f = np.isfinite(rs) & np.isfinite(cs)
            d = np.abs(cs[f] - rs[f])
            rel = d / np.maximum(np.abs(rs[f]), floor)
            if d.size:
                max_abs, max_rel = max(max_abs, float(d.max())), max(max_rel, float(rel.max()))
            sum_abs += float(d.sum())
            sum_rel += float(rel.sum())
            noise += float(np.square(d).sum())
            if pick is not None:
                lo, hi = np.searchsorted(pick, [off, off + d.size])
                d, rel = d[pick[lo:hi] - off], rel[pick[lo:hi] - off]
            off += int(f.sum())
            abs_sample.append(d)
            rel_sample.append(rel)
        for rr, cc in zip(row_blocks(r, v), row_blocks(c, v), strict=True):
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
        "max_abs_ref": max_abs_ref,
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
    rows = max(1, min(ROW_CHUNK, BLOCK_ELEMENTS // max(vocab, 1)))
    for r, c, v in zip(refs, cands, valids, strict=True):
        for a, b in zip(row_blocks(r, v, rows * vocab), row_blocks(c, v, rows * vocab), strict=True):
            ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
            a, b = a[ok], b[ok]
            top1.append(a.argmax(axis=1) == b.argmax(axis=1))
            if vocab > 5:
                ta = np.argpartition(-a, k - 1, axis=1)[:, :k]
                tb = np.argpartition(-b, k - 1, axis=1)[:, :k]
                overlap.append(np.array([len(set(x) & set(y)) / k for x, y in zip(ta.tolist(), tb.tolist(), strict=True)]))
            la, lb = _log_softmax(a), _log_softmax(b)
            kls.append(np.maximum((np.exp(la) * (la - lb)).sum(axis=1), 0.0))
            del a, b, la, lb
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
        chunk = max(1, min(ROW_CHUNK, BLOCK_ELEMENTS // max(int(r.shape[-1]), 1)))
        for b in np.unique(b_idx):  # one sequence at a time: a spilled output reads that sequence only
            rows_b = np.nonzero(b_idx == b)[0]
            rb, cb = np.asarray(r[int(b)]), np.asarray(c[int(b)])
            for s in range(0, rows_b.size, chunk):
                sel = rows_b[s : s + chunk]
                lr = _log_softmax(np.asarray(rb[t_idx[sel]], np.float64))
                lc = _log_softmax(np.asarray(cb[t_idx[sel]], np.float64))
                rows = np.arange(lr.shape[0])
                nll_r -= float(lr[rows, targets[sel]].sum())
                nll_c -= float(lc[rows, targets[sel]].sum())
            del rb, cb
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
    return np.concatenate([(np.asarray(hidden[b : b + 1], np.float64) * m[b : b + 1]).sum(axis=1)
                           for b in range(hidden.shape[0])]) / np.maximum(m.sum(axis=1), 1e-9)


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
