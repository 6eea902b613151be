"""How time and memory grow with model size: LLaMA models built from configs (BF16 safetensors,
random weights, fixed seed) through export, quantize and the CPU build, each stage in its own
process.

Models (``--models``, comma-separated):
  tiny        2 layers of hidden 64 (a smoke test of the script itself)
  135m        SmolLM-135M's shape: hidden 576, 30 layers, 9/3 heads, MLP 1536, vocab 49152, tied
  1.1b-slice  TinyLlama-1.1B's shape with 4 of its 22 layers (0.38B parameters)
  1.1b        TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32/4 heads, MLP 5632, vocab 49152 (1.17B)
  1.1b-44     the same shape with 44 layers (2.3B parameters): memory against depth at the real width
  8b-layers   2 of Llama-3.1-8B's 32 layers with the tokenizer's 8,000-token vocabulary (0.5B parameters):
              the cost of its layers, the 128k-token embedding and lm_head aside
  8b-slice    Llama-3.1-8B's shape with 4 of its 32 layers: hidden 4096, 32/8 heads, MLP 14336,
              vocab 128256 (2.3B parameters; extrapolate per layer)

Slices are exported with external data, as their full models (over 2 GB) are.

Stages (``--stages``): export (FP32), export-fp16, int8-sq, fp8, int4-awq (each quantizes the FP32
export with 16 calibration windows of 256 tokens), fp8-budget (fp8 with ``--budget
perplexity=0.000001%``: a limit only the unquantized graph meets, so the search runs every step
on the size under test: the switched graph, the GPTQ lever's second one, one ranking run per
group, the prefix runs, the written model and its re-measurement), build-cpu (of the int8-sq
artifact).

Peak RSS is the stage process's high-water mark (VmHWM, libraries included), reported in units of
the model's FP32 weight bytes (the issue's bar: 1.25x). "above libraries" subtracts the RSS after
importing what the stage imports (onnx, onnxruntime; torch and transformers for the export,
transformers for the calibration tokenizer).

    python bench/scale.py --models 135m,1.1b-slice [--stages ...] [--json docs/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, machine  # noqa: E402

OUT = Path(os.environ.get("TRTFORGE_SCALE_OUT", REPO / "bench" / "out" / "scale"))  # sources and stage outputs
CALIB = DATA / "calib-mpl-lgpl.txt"

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=8000, tie_word_embeddings=False),  # smoke test of this script
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1.1b-slice": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    "1.1b-44": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=44, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    "8b-layers": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False, rope_theta=500000.0),
    "8b-slice": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
STAGES = ("export", "export-fp16", "int8-sq", "fp8", "int4-awq", "fp8-budget", "build-cpu")

BUILD = r"""
import json, sys
import torch, transformers
from trtforge.testing.tinymodels import make_tokenizer
out, cfg = sys.argv[1], json.loads(sys.argv[2])
tok = make_tokenizer("bpe", vocab_size=8000)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # initialised in BF16: no FP32 copy while building
config = transformers.LlamaConfig(max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, torch_dtype="bfloat16", **cfg)
model = transformers.LlamaForCausalLM(config).eval()
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
"""

CHILD = r"""
import json, sys, time

def hwm_mib():  # VmHWM: this process's peak RSS
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

stage, src, out, calib = sys.argv[1:5]
trace_path = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
if trace_path:  # where time and memory go: RSS sampled twice a second, every trtforge log line stamped
    import cProfile, logging, threading
    t0, trace, samples = time.perf_counter(), [], []
    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    def sample():  # the trace is rewritten every 10 s, so a run stopped early leaves what it measured
        k = 0
        while True:
            samples.append((round(time.perf_counter() - t0, 1), rss_mib()))
            time.sleep(0.5)
            k += 1
            if k % 20 == 0:
                with open(trace_path + ".partial", "w") as f:
                    json.dump({"log": trace, "rss": samples[::4], "peak_sampled_mib": max(r for _, r in samples)}, f)
    threading.Thread(target=sample, daemon=True).start()
    class Stamp(logging.Handler):
        def emit(self, record):
            trace.append({"t": round(time.perf_counter() - t0, 1), "rss_mib": round(rss_mib()), "msg": record.getMessage()})
    lg = logging.getLogger("trtforge")
    lg.setLevel(logging.INFO)
    lg.addHandler(Stamp())
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    lg.addHandler(h)
    prof = cProfile.Profile()
# the libraries the stage itself imports (quantize and build never import torch)
import onnx, onnxruntime
if stage.startswith("export"):
    import torch, transformers, trtforge.exporter
elif stage == "build-cpu":
    import trtforge.engines.build
else:
    import transformers, trtforge.calibration  # transformers: the calibration tokenizer
base = hwm_mib()
t = time.perf_counter()
if trace_path:
    prof.enable()
if stage.startswith("export"):
    from trtforge.exporter import DType, ExportOptions, Task, export_onnx
    dtype = DType.FP16 if stage == "export-fp16" else DType.FP32
    external = "slice" in src or "layers" in src  # it stands for its full model, whose export is external (> 2 GB)
    art = export_onnx(src, out, ExportOptions(dtype=dtype, task=Task("causal-lm"), external_data=external), force=True)
elif stage == "build-cpu":
    from trtforge.engines.build import build
    art = build(src, "cpu", out, force=True)
else:
    from trtforge.calibration import get_preset, quantize
    if stage == "fp8-budget":  # a budget no quantized GEMM meets: every step of the search runs (module docstring)
        recipe = get_preset("fp8").replace(num_samples=16, seq_len=256, budget="perplexity=0.000001%")
    else:
        recipe = get_preset(stage).replace(num_samples=16, seq_len=256)
    art = quantize(src, recipe, out, calib=[calib], force=True)
seconds = time.perf_counter() - t
if trace_path:
    prof.disable()
    import io, pstats
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    # between two log lines: the highest RSS sampled (what each step peaks at)
    for k, e in enumerate(trace):
        end = trace[k + 1]["t"] if k + 1 < len(trace) else 1e18
        e["peak_until_next_mib"] = round(max([r for s, r in samples if e["t"] <= s < end] or [e["rss_mib"]]))
    with open(trace_path, "w") as f:
        json.dump({"log": trace, "rss": samples[::4]}, f, indent=1)
    with open(trace_path + ".prof.txt", "w") as f:
        f.write(text.getvalue())
q = art.manifest["quantization"] if art.manifest.stage == "quantize" else None
print(json.dumps({"seconds": seconds, "peak_rss_mib": hwm_mib(), "rss_after_imports_mib": base,
                  "timings": art.manifest.timings if hasattr(art.manifest, "timings") else art.manifest["timings"],
                  "external_data": art.manifest["model"]["external_data"],
                  "layer_by_layer": q["quick_check"].get("layer_by_layer") if q else None,
                  "quick_check_mean_cosine": q["quick_check"]["mean_cosine_vs_float"] if q else None}))
"""


def build_source(name: str) -> tuple[Path, int]:
    src = OUT / f"{name}-src"
    meta = src / "bench.json"
    if not meta.exists():
        shutil.rmtree(src, ignore_errors=True)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", BUILD, str(src), json.dumps(MODELS[name])],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr)
        params = int(p.stdout.strip().splitlines()[-1])
        meta.write_text(json.dumps({"params": params, "config": MODELS[name], "build_s": time.perf_counter() - t}))
    return src, json.loads(meta.read_text())["params"]


def run_stage(stage: str, src: Path, out: Path, trace: Path | None = None) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, stage, str(src), str(out), str(CALIB), str(trace or "")],
                       stdout=subprocess.PIPE, stderr=None if trace else subprocess.PIPE, text=True)
    if p.returncode:
        tail = "\n".join((p.stderr or "see stderr").strip().splitlines()[-15:])
        return {"stage": stage, "error": tail, "wall_s": time.perf_counter() - t}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["stage"] = stage
    r["wall_s"] = time.perf_counter() - t
    return r


def table(results: dict) -> str:
    """The markdown table of docs/benchmarks.md from a results file."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['date']}.", "",
             "| model | parameters | FP32 weights MiB | stage | layer by layer | seconds | peak RSS MiB | "
             "peak / FP32 weights | above libraries / FP32 weights |", "|---|---|---|---|---|---|---|---|---|"]
    order = {name: k for k, name in enumerate(MODELS)}
    for r in sorted(results["rows"], key=lambda r: (order.get(r["model"], 99), STAGES.index(r["stage"]),
                                                    not r.get("layer_by_layer"))):
        lw = {True: "yes", False: "no"}.get(r.get("layer_by_layer"), "")
        if "error" in r:
            lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['fp32_weights_mib']:.0f} | {r['stage']} | "
                         f"{lw} | failed | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['fp32_weights_mib']:.0f} | {r['stage']} | {lw} | "
                     f"{r['seconds']:.0f} | {r['peak_rss_mib']:.0f} | {r['peak_over_fp32']:.2f}x | "
                     f"{r['above_libraries_over_fp32']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="135m,1.1b-slice")
    ap.add_argument("--stages", default="export,int8-sq,int4-awq,build-cpu")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "scale.json")
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs (bench/out/scale)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --json and exit")
    ap.add_argument("--trace", action="store_true",
                    help="profile each stage (cProfile) and trace its RSS against trtforge's log lines: "
                         "bench/out/scale/MODEL-STAGE.trace.json and .trace.json.prof.txt; logs on stderr")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(args.json.read_text())))
        return 0
    stages = args.stages.split(",")
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s}; choose from {', '.join(STAGES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    results["machine"] = machine()
    # a row per model, stage and calibration mode (TRTFORGE_CALIB_LAYERWISE=0/1 picks the mode)
    forced = {"1": True, "0": False}.get(os.environ.get("TRTFORGE_CALIB_LAYERWISE", "").strip())
    rerun = {(m, st) for m in args.models.split(",") for st in stages}
    rows = [r for r in results.get("rows", []) if (r.get("model"), r.get("stage")) not in rerun
            or (forced is not None and r.get("layer_by_layer") not in (None, forced))]
    for name in args.models.split(","):
        src, params = build_source(name)
        fp32_mib = params * 4 / 2**20
        export = OUT / f"{name}-fp32"
        for stage in stages:
            inp = {"build-cpu": OUT / f"{name}-int8-sq"}.get(stage, export if stage not in ("export", "export-fp16") else src)
            out = OUT / f"{name}-{stage}" if stage != "export" else export
            r = run_stage(stage, inp, out, OUT / f"{name}-{stage}.trace.json" if args.trace else None)
            r.update(model=name, params=params, fp32_weights_mib=fp32_mib)
            if "error" not in r:
                r["peak_over_fp32"] = r["peak_rss_mib"] / fp32_mib
                r["above_libraries_over_fp32"] = (r["peak_rss_mib"] - r["rss_after_imports_mib"]) / fp32_mib
                print(f"{name:11} {stage:12} {r['seconds']:7.1f}s  peak RSS {r['peak_rss_mib']:7.0f} MiB = "
                      f"{r['peak_over_fp32']:.2f}x the {fp32_mib:.0f} MiB of FP32 weights "
                      f"({r['above_libraries_over_fp32']:.2f}x above libraries)", flush=True)
            else:
                print(f"{name:11} {stage:12} FAILED\n{r['error']}", flush=True)
            rows.append(r)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**results, "rows": rows}, indent=2))
        if not args.keep:
            for p in OUT.glob(f"{name}-*"):
                if p.name != f"{name}-src":
                    shutil.rmtree(p, ignore_errors=True)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
