"""The two estimators of a quantized decoder's perplexity change, side by side on the same windows.

* observed (label-based): the mean next-token NLL difference against the float export on the text,
  exp(mean) - 1. What a perplexity on that text shows; its noise is mostly the first-order term
  sum_y (1[y = label] - p_float(y)) * (log p_float(y) - log p_quant(y)), whose sign is random per token.
* expected (KL): the mean KL(p_float || p_quant) of the next-token distributions, exp(mean) - 1. To
  second order in the logit error both have the same expectation for any text (the Hessian of
  log-softmax does not depend on the label), and the KL has no label term, so it varies less.

Also the truncated KL the budget search keeps (the float export's top-K probabilities per position
and the rest as one bucket: a lower bound of the full KL) for a few K, against the full one.

    python bench/kl_vs_nll.py FLOAT_EXPORT QUANTIZED [QUANTIZED ...] [--windows N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402,I001

TOPS = (64, 256, 1024)


def windows(tok_dir: Path, seq: int = 256) -> np.ndarray:
    """bench/quantize.py's windows of the eval text (<bos> + 255 tokens, non-overlapping)."""
    from quantize import eval_windows

    from trtforge.textdata import load_tokenizer

    return eval_windows(load_tokenizer(tok_dir), None, seq)


def run(sess, w: np.ndarray) -> np.ndarray:
    """One window's logits; a causal-lm-with-past export gets an empty cache (trtforge's make_feeds)."""
    from trtforge.inputs import make_feeds

    ins = sess.get_inputs()
    past = next((i for i in ins if i.name.startswith("past_key_values.")), None)
    dims = {"num_kv_heads": past.shape[1], "head_dim": past.shape[3]} if past is not None else {}
    dtype = np.float16 if past is not None and "float16" in past.type else np.float32
    feeds = make_feeds(w[None], [i.name for i in ins], dims, dtype)
    return sess.run(["logits"], feeds)[0][0, :-1].astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(1, keepdims=True)))


def compare(ref_lp: np.ndarray, lq: np.ndarray, tgt: np.ndarray) -> dict:
    p = np.exp(ref_lp)
    out = {"dnll": float((ref_lp[np.arange(len(tgt)), tgt] - lq[np.arange(len(tgt)), tgt]).sum()),
           "kl": float((p * (ref_lp - lq)).sum())}
    for k in TOPS:
        idx = np.argpartition(-ref_lp, k, axis=1)[:, :k]
        pk, qk = np.take_along_axis(p, idx, 1), np.exp(np.take_along_axis(lq, idx, 1))
        pr, qr = np.clip(1 - pk.sum(1), 0, 1), np.clip(1 - qk.sum(1), 1e-30, 1)
        tail = np.where(pr > 0, pr * (np.log(np.maximum(pr, 1e-30)) - np.log(qr)), 0.0)
        out[f"kl_top{k}"] = float((pk * (np.log(np.maximum(pk, 1e-300)) - np.log(np.maximum(qk, 1e-300)))).sum() + tail.sum())
        out[f"mass_top{k}"] = float(pk.sum())
    return out


def stats(per: list[dict], key: str, n: list[int]) -> dict:
    x = np.array([r[key] / c for r, c in zip(per, n, strict=True)])
    w = np.asarray(n, np.float64)
    mean = float((w * x).sum() / w.sum())
    se = math.sqrt(len(x) / (len(x) - 1) * float((w**2 * (x - mean) ** 2).sum()) / w.sum() ** 2)
    return {"pct": 100 * (math.exp(mean) - 1), "mean_nats": mean, "se_nats": se}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("float_export", type=Path)
    ap.add_argument("quantized", type=Path, nargs="+")
    ap.add_argument("--windows", type=int, default=0, help="first N windows only (0: all)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from trtforge.ort import NO_PREPACKING, session

    wins = windows(a.float_export)
    if a.windows:
        wins = wins[: a.windows]
    ref = session(a.float_export / "model.onnx", config=NO_PREPACKING)
    qs = [session(q / "model.onnx", config=NO_PREPACKING) for q in a.quantized]
    per: list[list[dict]] = [[] for _ in qs]
    counts = []
    for i, w in enumerate(wins):
        lp = log_softmax(run(ref, w))
        counts.append(len(w) - 1)
        for j, s in enumerate(qs):
            per[j].append(compare(lp, log_softmax(run(s, w)), w[1:]))
        print(f"window {i + 1}/{len(wins)}", file=sys.stderr, flush=True)
    res = {"machine": machine(), "text": "eval-gpl-3.0", "windows": len(wins), "tokens": int(sum(counts)), "models": []}
    for q, rows in zip(a.quantized, per, strict=True):
        row = {"model": str(q), **{k: stats(rows, k, counts) for k in ["dnll", "kl", *(f"kl_top{k}" for k in TOPS)]},
               "mass": {k: float(np.mean([r[f"mass_top{k}"] / c for r, c in zip(rows, counts, strict=True)])) for k in TOPS}}
        d = np.array([r["dnll"] / c for r, c in zip(rows, counts, strict=True)])
        kl = np.array([r["kl"] / c for r, c in zip(rows, counts, strict=True)])
        row["window_corr"] = float(np.corrcoef(d, kl)[0, 1]) if len(d) > 2 else None
        res["models"].append(row)
        print(f"{q.name}: observed {row['dnll']['pct']:+.3f}% (SE {row['dnll']['se_nats']:.4f} nats), "
              f"expected (KL) {row['kl']['pct']:+.3f}% (SE {row['kl']['se_nats']:.4f}); truncated KL "
              + ", ".join(f"top{k} {row[f'kl_top{k}']['pct']:+.3f}% (mass {row['mass'][k]:.3f})" for k in TOPS))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
