"""Model Optimizer's PyTorch PTQ on the real Gemma 3 270M: the other tool on the same model and data.

    python bench/modelopt_torch.py --modelopt-python /work/venv-modelopt/bin/python \
        [--methods int8-sq,fp8,int4-awq,int4-rtn] [--calib-windows 45] [--eval-windows 29] \
        [--work DIR] [--json docs/results/modelopt-torch-gemma3.json]

Model Optimizer's ONNX PTQ does not finish on Gemma 3 here (its INT8 and FP8 runs were killed by
the out-of-memory killer at 14.1 GB; its INT4 awq_lite did not finish in 15 minutes even on
MiniLM: docs/benchmarks.md), so its best result on this model is its PyTorch path, the one
TensorRT-LLM's own quantization scripts use (``mtq.quantize`` with its preset configs, then
``export_tensorrt_llm_checkpoint`` / ``export_hf_checkpoint``). This script measures that path as
fake quantization in PyTorch on the CPU:

1. The parent (the project's environment) writes trtforge's calibration windows of the FP32
   export (bench/_baselines.py ``calib_feeds``: the same 256-token windows of calib-apache-2.0.txt
   + calib-mpl-lgpl.txt, seed 0, that trtforge and every other tool in bench/quantize.py see) and
   the evaluation windows (bench/quantize.py ``eval_windows``: 29 non-overlapping windows of
   eval-gpl-3.0.txt, <bos> + 255 tokens) to an .npz.
2. A child per method runs under ``--modelopt-python`` (Model Optimizer lives in a virtual
   environment of its own, bench/requirements-modelopt.txt): loads the HF folder in FP32
   (safetensors, never trust_remote_code, eager attention), scores FP32 on the evaluation windows,
   runs ``mtq.quantize(model, CFG, forward_loop)`` over the calibration windows, and scores the
   quantized model the same way (summed next-token NLL, float64 log-sum-exp, as
   bench/quantize.py's ``window_nll``; top-1 agreement with FP32). It prints one JSON line:
   perplexities, the per-window NLLs (for paired comparisons with trtforge's rows), quantize
   seconds and peak RSS (VmHWM) of the child.

Configs: int8-sq INT8_SMOOTHQUANT_CFG, fp8 FP8_DEFAULT_CFG, fp8-channel the same with per-channel
weights, int4-awq INT4_AWQ_CFG (awq_lite, block
128), int4-rtn INT4_BLOCKWISE_WEIGHT_ONLY_CFG (block 128). Model Optimizer's default configs leave
lm_head unquantized, as trtforge's presets do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# "+weight_axis0": the config with per-output-channel weight quantizers (FP8_DEFAULT_CFG's are per
# tensor), the granularity trtforge's fp8 preset stores
CONFIGS = {"int8-sq": "INT8_SMOOTHQUANT_CFG", "fp8": "FP8_DEFAULT_CFG", "fp8-channel": "FP8_DEFAULT_CFG+weight_axis0",
           "int4-awq": "INT4_AWQ_CFG", "int4-rtn": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

model_dir, data, cfg_name = sys.argv[1:4]
torch.manual_seed(0)
torch.set_grad_enabled(False)
z = np.load(data)
calib, windows = torch.from_numpy(z["calib_ids"]), torch.from_numpy(z["eval_ids"])
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                          trust_remote_code=False, use_safetensors=True).eval()

def score(m):  # summed next-token NLL per window (float64 log-sum-exp, as bench/quantize.py window_nll), top-1
    nll, tops = [], []
    for w in windows:
        logits = m(input_ids=w[None], attention_mask=torch.ones_like(w[None])).logits[0, :-1].double()
        lse = torch.logsumexp(logits, -1)
        nll.append(float((lse - logits[torch.arange(logits.shape[0]), w[1:]]).sum()))
        tops.append(logits.argmax(-1).numpy())
    return np.array(nll), np.concatenate(tops)

t = time.perf_counter()
nll32, top32 = score(model)
eval_s = time.perf_counter() - t
import modelopt.torch.quantization as mtq

def forward_loop(m):
    for ids in calib:
        m(input_ids=ids[None], attention_mask=torch.ones_like(ids[None]))

import copy
base, _, variant = cfg_name.partition("+")
cfg = copy.deepcopy(getattr(mtq, base))
if variant == "weight_axis0":
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"] = {**entry["cfg"], "axis": 0}
t = time.perf_counter()
model = mtq.quantize(model, cfg, forward_loop)
quant_s = time.perf_counter() - t
quantized = sum(1 for _, mod in model.named_modules()
                if getattr(getattr(mod, "weight_quantizer", None), "is_enabled", False))
nllq, topq = score(model)
pos = windows.shape[0] * (windows.shape[1] - 1)
ppl32, pplq = float(np.exp(nll32.sum() / pos)), float(np.exp(nllq.sum() / pos))
print(json.dumps({"config": cfg_name, "ppl_fp32": ppl32, "ppl": pplq, "ppl_change_pct": 100 * (pplq / ppl32 - 1),
                  "top1_agreement": float((topq == top32).mean()), "quantized_linears": quantized, "quantize_s": quant_s, "eval_s": eval_s,
                  "seconds": time.perf_counter() - t0, "peak_rss_mib": hwm_mib(),
                  "window_nll": nllq.tolist(), "window_nll_fp32": nll32.tolist(),
                  "modelopt": __import__("modelopt").__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__}))
"""


def main() -> int:
    sys.path.insert(0, str(HERE))
    from _baselines import calib_feeds
    from _common import machine
    from models import gemma3_270m
    from quantize import CALIB, GEMMA3_ARTIFACT, eval_windows

    from trtforge.textdata import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelopt-python", required=True, help="the interpreter of Model Optimizer's virtual environment")
    ap.add_argument("--model", type=Path, default=None, help="Gemma 3 270M HF folder (default: bench/models.py)")
    ap.add_argument("--export", type=Path, default=GEMMA3_ARTIFACT, help="its FP32 causal-lm export (for trtforge's windows)")
    ap.add_argument("--methods", default="int8-sq,fp8,fp8-channel,int4-awq,int4-rtn")
    ap.add_argument("--calib-windows", type=int, default=45)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--work", type=Path, default=HERE / "out" / "modelopt-torch")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", type=Path, default=HERE.parent / "docs" / "results" / "modelopt-torch-gemma3.json")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in CONFIGS:
            raise SystemExit(f"error: unknown method {m}; choose from {', '.join(CONFIGS)}")
    model = args.model or gemma3_270m()
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "windows.npz"
    feeds, info = calib_feeds(args.export, CALIB, args.calib_windows)
    windows = eval_windows(load_tokenizer(args.export), args.eval_windows)
    np.savez(data, calib_ids=np.concatenate([f["input_ids"] for f in feeds]), eval_ids=windows)
    results = json.loads(args.json.read_text()) if args.json.exists() else {"rows": {}}
    results.update(machine=machine(), model=str(model), calibration={**info, "files": [p.name for p in CALIB]},
                   evaluation=f"{len(windows)} non-overlapping windows of eval-gpl-3.0.txt, <bos> + 255 tokens")
    for m in methods:
        t = time.perf_counter()
        try:
            p = subprocess.run([args.modelopt_python, "-c", CHILD, str(model), str(data), CONFIGS[m]],
                               capture_output=True, text=True, timeout=args.timeout)
            row = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                   {"error": "\n".join(p.stderr.strip().splitlines()[-8:])})
        except subprocess.TimeoutExpired:
            row = {"error": f"did not finish within --timeout {args.timeout:.0f} s"}
        row["wall_s"] = time.perf_counter() - t
        row["machine"] = results["machine"]  # the file merges rows of several sessions
        results["rows"][m] = row
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"modelopt-torch {m:9} " + (f"ppl {row['ppl']:.3f} ({row['ppl_change_pct']:+.2f}%), top-1 "
              f"{row['top1_agreement']:.3f}, quantize {row['quantize_s']:.0f} s, peak {row['peak_rss_mib']:.0f} MiB"
              if "ppl" in row else f"FAILED: {row['error']}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
