"""Calibration memory against depth: the same slim LLaMA shape with N and 2N layers (BF16 random
weights, fixed seed), exported in FP32 with external data, then calibrated (the range collection
of int8-sq: every GEMM input) whole-graph and layer by layer, each in its own process; with
``--quantize RECIPE``, the whole quantize stage instead (layer by layer: TRTFORGE_CALIB_LAYERWISE=1,
and whole-graph: =0), its peak RSS and its manifest's timings.

Shape: hidden 1024, MLP 2816, 16 query / 4 KV heads, vocabulary 8000 (the tokenizer's), untied;
44 MB of FP32 weights per layer. Peak RSS is the process's VmHWM; "above libraries" subtracts
the RSS after importing onnx, onnxruntime and trtforge.calibration.

    python bench/layerwise.py [--layers 6,12] [--windows 8 --seq-len 128] [--json docs/results/layerwise.json]
    python bench/layerwise.py --quantize int8-sq --layers 11,22 --json docs/results/layerwise-quantize.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, machine  # noqa: E402
from scale import BUILD, CHILD  # noqa: E402

OUT = Path(os.environ.get("TRTFORGE_SCALE_OUT", REPO / "bench" / "out" / "scale"))
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=8000, tie_word_embeddings=False)

CALIBRATE = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import onnx, onnxruntime, trtforge.calibration
from trtforge.artifacts import OnnxArtifact
from trtforge.calibration.collect import collect_ranges
from trtforge.onnx_io import load_graph
from trtforge.textdata import build_samples, load_tokenizer
src, calib, layerwise, n, seq = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
base = hwm()
art = OnnxArtifact.open(src)
model = load_graph(art.model_path)
dims = art.manifest["dims"]
watched = sorted({x.input[0] for x in model.graph.node if x.op_type == "MatMul"})
samples = build_samples([calib], load_tokenizer(art.path), mode="windows", num_samples=n, seq_len=seq, seed=0,
                        max_positions=dims["max_positions"], vocab_size=dims["vocab_size"], text_field="text")
t = time.perf_counter()
r = collect_ranges(model, watched, samples, dims, batch_size=4, base_dir=art.path, layerwise=layerwise)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": hwm(), "rss_after_imports_mib": base,
                  "tensors": len(r.tensors), "meta": r.meta}))
"""


QUANTIZE = r"""
import json, os, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
import onnx, onnxruntime, transformers, trtforge.calibration
from trtforge.calibration import get_preset, quantize
src, out, calib, recipe, n, seq = sys.argv[1:7]
base = hwm()
t = time.perf_counter()
art = quantize(src, get_preset(recipe).replace(num_samples=int(n), seq_len=int(seq)), out, calib=[calib], force=True)
q = art.manifest["quantization"]
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": hwm(), "rss_after_imports_mib": base,
                  "timings": art.manifest["timings"], "layer_by_layer": q["quick_check"].get("layer_by_layer"),
                  "quick_check_mean_cosine": q["quick_check"]["mean_cosine_vs_float"],
                  "quantized": q["counts"]["quantized"]}))
"""


def run(args: list[str], env: dict | None = None) -> dict:
    p = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="6,12")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "layerwise.json")
    ap.add_argument("--quantize", metavar="RECIPE", help="run the whole quantize stage with this recipe")
    ap.add_argument("--modes", default="whole,layers", help="whole graph and/or layer by layer")
    ap.add_argument("--hidden", type=int, help="another width: hidden size (MLP 2.75x, heads of 64, 4 KV heads)")
    args = ap.parse_args()
    shape = dict(SHAPE)
    if args.hidden:
        shape.update(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                     num_attention_heads=args.hidden // 64, num_key_value_heads=4)
    tag = f"slim{args.hidden}-" if args.hidden else "slim"
    rows = []
    for n in [int(x) for x in args.layers.split(",")]:
        src = OUT / f"{tag}{n}-slice-src"  # "slice": the export child writes external data
        if not (src / "config.json").exists():
            p = subprocess.run([sys.executable, "-c", BUILD, str(src), json.dumps({**shape, "num_hidden_layers": n})],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(p.stderr[-3000:])
        exp = OUT / f"{tag}{n}-fp32"
        if not (exp / "manifest.json").exists():
            run([CHILD, "export", str(src), str(exp), str(DATA / "calib-mpl-lgpl.txt")])
        weights = sum(f.stat().st_size for f in exp.glob("model.onnx*"))
        for lw in [m == "layers" for m in args.modes.split(",")]:
            if args.quantize:
                out = OUT / f"{tag}{n}-{args.quantize}-{'layers' if lw else 'whole'}"
                r = run([QUANTIZE, str(exp), str(out), str(DATA / "calib-mpl-lgpl.txt"), args.quantize,
                         str(args.windows), str(args.seq_len)], env={"TRTFORGE_CALIB_LAYERWISE": "1" if lw else "0"})
                shutil.rmtree(out, ignore_errors=True)
            else:
                r = run([CALIBRATE, str(exp), str(DATA / "calib-mpl-lgpl.txt"), "1" if lw else "0", str(args.windows),
                         str(args.seq_len)])
            r.update(layers=n, layerwise=lw, fp32_weights_mib=weights / 2**20,
                     above_libraries_mib=r["peak_rss_mib"] - r["rss_after_imports_mib"])
            rows.append(r)
            print(f"{n:3} layers  {'layer by layer' if lw else 'whole graph   '}  {r['seconds']:6.1f}s  peak RSS "
                  f"{r['peak_rss_mib']:6.0f} MiB ({r['above_libraries_mib']:5.0f} above libraries; weights "
                  f"{weights / 2**20:.0f} MiB)", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"machine": machine(), "shape": shape, "windows": args.windows,
                                             "seq_len": args.seq_len, "stage": args.quantize or "calibration",
                                             "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
