"""Where FP8 (or INT8) loses accuracy on a real model, GEMM by GEMM, from saved calibration rows.

    python bench/fp8_probe.py EXPORT_DIR RANGES_JSON [--precision fp8|int8] [--json FILE] [--top 20]

For every GEMM of the float export, on the calibration rows saved beside RANGES_JSON
(ranges.samples.npz: up to 512 token rows per tensor, seeded reservoir), the relative output error
||Y_q - Y||^2 / ||Y||^2 of Y = X W with:
  act       activations quantized per tensor with amax = the calibrated absmax, weights float
  act_tok   activations quantized per token (dynamic absmax per row; TensorRT-LLM's FP8 rowwise)
  w_ch      weights per output channel, activations float
  w_t       weights per tensor
  both      act + w_ch (what the fp8 preset's ONNX graph computes); both_t: act + w_t
  sq        both after SmoothQuant with the alpha (from the grid) minimizing it
and the tensor's statistics: absmax, the largest channel max over the median channel max (the
outlier ratio), and the share of |x| that lands in FP8's subnormal range (below 2^-6 of the
scale) or flushes to zero. Prints the GEMMs ranked by ``both``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.methods.smoothquant import smooth_factor
from trtforge.calibration.patterns import find_gemms
from trtforge.graph import GraphIndex, inline_identity_initializers
from trtforge.numerics import QMAX, as_scale, fake_quant, weight_scales
from trtforge.onnx_io import Weights, load_graph
from trtforge.vocab import Precision

GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.square(a - ref).sum() / max(np.square(ref).sum(), 1e-30))


def probe_gemm(x: np.ndarray, w: np.ndarray, amax: float, cmax: np.ndarray, p: Precision) -> dict:
    qmax = QMAX[p]
    ref = x @ w
    sa = as_scale(amax, qmax, np.float32)
    xq = fake_quant(x, sa, p)
    tok = as_scale(np.abs(x).max(axis=1, keepdims=True), qmax, np.float32)
    xq_tok = fake_quant(x, tok, p)
    wq_ch = fake_quant(w, weight_scales(w, p, np.float32)[None, :], p)
    wq_t = fake_quant(w, as_scale(np.abs(w).max(), qmax, np.float32), p)
    out = {"act": rel(xq @ w, ref), "act_tok": rel(xq_tok @ w, ref), "w_ch": rel(x @ wq_ch, ref),
           "w_t": rel(x @ wq_t, ref), "both": rel(xq @ wq_ch, ref), "both_t": rel(xq @ wq_t, ref),
           "both_tok": rel(xq_tok @ wq_ch, ref)}
    best = None
    wmax = np.abs(w).max(axis=1)
    for a in GRID:
        s = smooth_factor(cmax, wmax, a)
        xs = x / s[None, :]
        ws = w * s[:, None]
        am = float(np.max(cmax / s))
        e = rel(fake_quant(xs, as_scale(am, qmax, np.float32), p) @ fake_quant(ws, weight_scales(ws, p, np.float32)[None, :], p), ref)
        if best is None or e < best[1]:
            best = (a, e)
    out["sq"], out["sq_alpha"] = best[1], best[0]
    a = np.abs(x)
    out["absmax"] = float(amax)
    med = float(np.median(cmax)) or 1e-30
    out["outlier_ratio"] = float(cmax.max() / med)
    if p == Precision.FP8:
        out["subnormal_share"] = float(((a / sa) < 2.0**-6).mean())
        out["zero_share"] = float((((a / sa) < 2.0**-10) & (a > 0)).mean())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("ranges", type=Path)
    ap.add_argument("--precision", default="fp8", choices=["fp8", "int8"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    p = Precision(args.precision)
    model = load_graph(args.export / "model.onnx")
    weights = Weights(model, args.export)
    inline_identity_initializers(model, weights)
    idx = GraphIndex(model, weights)
    r = ActivationRanges.load(args.ranges)
    rows = []
    for g in find_gemms(model, idx):
        st = r.tensors.get(g.act)
        if st is None or st.sample is None or "lm_head" in g.node:
            continue
        x = st.sample.astype(np.float32)
        w = g.weight_kn(idx)
        res = probe_gemm(x, w, st.absmax, st.channel_absmax.astype(np.float64), p)
        rows.append({"node": g.node, **res})
        print(f"{g.node:60} both {res['both']:.2e} act {res['act']:.2e} w_ch {res['w_ch']:.2e} sq {res['sq']:.2e}"
              f"@{res['sq_alpha']} tok {res['both_tok']:.2e} amax {res['absmax']:.3g} out {res['outlier_ratio']:.0f}",
              file=sys.stderr, flush=True)
    rows.sort(key=lambda d: -d["both"])
    keys = ("both", "act", "act_tok", "w_ch", "w_t", "both_t", "both_tok", "sq")
    print("mean over GEMMs: " + ", ".join(f"{k} {np.mean([d[k] for d in rows]):.3e}" for k in keys))
    for d in rows[: args.top]:
        print(f"{d['node']:60} " + " ".join(f"{k} {d[k]:.2e}" for k in keys) + f" alpha {d['sq_alpha']} amax {d['absmax']:.3g} "
              f"outlier {d['outlier_ratio']:.0f}" + (f" sub {d['subnormal_share']:.3f}" if "subnormal_share" in d else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
