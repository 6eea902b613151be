"""FP8 and INT8 accuracy on a real decoder (Gemma 3 270M): perplexity and top-1 agreement.

    python bench/fp8_real.py [--fp32 /work/artifacts/gemma3-fp32] [--out DIR] [--json FILE]
                             [--recipe NAME[:key=value,...]] ... [--ranges FILE] [--windows N]

Each ``--recipe`` is a preset, optionally with recipe overrides (``fp8:alpha=0.5,smoothquant=true``;
values are TOML: ``null``, ``true``, numbers, ``"strings"``), written as a recipe file with
``base = NAME`` and quantized with ``trtforge quantize`` (a CLI process under ``/usr/bin/time -v``:
wall time and peak RSS are its own), calibrated on examples/data/calib-apache-2.0.txt +
calib-mpl-lgpl.txt (the whole text: 45 windows of 256 tokens for Gemma's tokenizer), or on the
ranges of an earlier run (``--ranges``: the same statistics and rows, no calibration time).

Evaluation: examples/data/eval-gpl-3.0.txt (never calibrated on) cut into non-overlapping
256-token windows as trtforge cuts calibration and parity data (trtforge.textdata.build_samples,
documents separated by EOS), each run through ONNX Runtime CPU with trtforge's emulation session
options (trtforge.ort.session: Q/DQ run as DequantizeLinear + float GEMM, exactly what the graph
says). Perplexity as trtforge.metrics.perplexity computes it (window_nll); top-1 agreement of every position's argmax
with the FP32 export's. The FP32 figures are cached in OUT/fp32-eval.npz.

``--checkpoint`` also writes the TensorRT-LLM checkpoint of each FP8 artifact
(``trtforge export-checkpoint``, both schemes with ``--checkpoint both``), records the figures its
verification measured (agreement with the ONNX artifact, perplexity vs the float model on 16
held-out lines), and scores the checkpoint on the same windows as the ONNX artifacts: a PyTorch
model built from the files as TensorRT-LLM's loader reads them (verify.py's fake-quantized model).
``--checkpoint-only`` skips quantizing and the ONNX evaluation (folders from an earlier run).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, machine  # noqa: E402

CALIB = [DATA / "calib-apache-2.0.txt", DATA / "calib-mpl-lgpl.txt"]
EVAL = DATA / "eval-gpl-3.0.txt"
SEQ = 256


def parse_recipe(spec: str) -> tuple[str, str, dict]:
    """'fp8:alpha=0.5,smoothquant=true' -> (label, base, {key: TOML value text})."""
    base, _, rest = spec.partition(":")
    over = {}
    for item in filter(None, (s.strip() for s in re.split(r",(?![^\[]*\])", rest))):
        k, _, v = item.partition("=")
        over[k.strip()] = v.strip()
    return spec, base, over


def write_recipe(path: Path, base: str, over: dict) -> Path:
    lines = ["[quantize]", f'base = "{base}"'] + [f"{k} = {v}" for k, v in over.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def quantize(fp32: Path, out: Path, base: str, over: dict, ranges: Path | None) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(out.parent / f"{out.name}.toml", base, over)
    cmd = ["/usr/bin/time", "-v", "trtforge", "quantize", str(fp32), "--recipe", str(recipe), "-o", str(out), "--force"]
    cmd += ["--ranges", str(ranges)] if ranges else [a for c in CALIB for a in ("--calib", str(c))]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    (out.parent / f"{out.name}.log").write_text(p.stderr)
    if p.returncode:
        return {"error": next((ln for ln in p.stderr.splitlines() if ln.startswith("error:")), p.stderr[-400:])}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {"quantize_wall_s": round(wall, 1), "quantize_peak_rss_mib": round(int(rss.group(1)) / 1024) if rss else None,
            "calibrated": "reused ranges" if ranges else "calibrated"}


def eval_windows(folder: Path, limit: int | None) -> list[np.ndarray]:
    from trtforge.artifacts import OnnxArtifact
    from trtforge.textdata import build_samples, load_tokenizer

    art = OnnxArtifact.open(folder)
    tok = load_tokenizer(art.path)
    s = build_samples([EVAL], tok, mode="windows", num_samples=10**6, seq_len=SEQ, seed=0,
                      max_positions=art.dims.max_positions, vocab_size=art.dims.vocab_size)
    return s.ids[:limit] if limit else s.ids


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of one window: what trtforge.metrics.perplexity sums, in one float32
    exp pass (a 256 x 262,144 window in float64, twice, is most of the evaluation time here)."""
    x = logits[:-1]
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, dtype=np.float64)) + m[:, 0]
    return float((lse - x[np.arange(x.shape[0]), ids[1:]]).sum())


def evaluate(folder: Path, windows: list[np.ndarray]) -> dict:
    """Per-window NLL sums and argmaxes of one artifact (ONNX Runtime CPU, emulation options)."""
    from trtforge.artifacts import OnnxArtifact
    from trtforge.inputs import make_feeds
    from trtforge.ort import release_memory, session

    art = OnnxArtifact.open(folder)
    sess = session(art.model_path, arena=False)
    names = [i.name for i in sess.get_inputs()]
    f16 = any(i.type == "tensor(float16)" for i in sess.get_inputs())
    out_name = art.outputs[0].name
    nll, top1, t = [], [], time.perf_counter()
    for w in windows:
        ids = w.reshape(1, -1)
        feeds = make_feeds(ids, names, art.dims, np.float16 if f16 else np.float32)
        logits = sess.run([out_name], feeds)[0][0].astype(np.float32)
        nll.append(window_nll(logits, w))
        top1.append(logits.argmax(-1).astype(np.int32))
        del logits
    del sess
    release_memory()
    return {"nll": np.asarray(nll), "top1": np.stack(top1), "eval_s": time.perf_counter() - t}


def evaluate_checkpoint(folder: Path, windows: list[np.ndarray]) -> dict:
    """The same figures for a TensorRT-LLM checkpoint, computed as export-checkpoint's verification
    computes it (engines/trtllm/verify.py parity): a PyTorch model built from the files as the
    loader reads them (dequantized weights, FP8 activation quantization with input_scale or per
    token), float32 compute, on the same windows."""
    import torch

    from trtforge.engines.trtllm.reader import CheckpointReader, torch_adapter

    t = torch_adapter()
    reader = CheckpointReader(folder)
    specs = ((s.module, t.LinearSpec(s.weight, s.bias, s.pre_quant_scale, s.act, s.input_scale))
             for s in reader.iter_linears() if s.quantized)
    model = t.build_model(reader.config, reader.float_params(), specs)
    nll, top1, t0 = [], [], time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            ids = torch.from_numpy(np.asarray(w, np.int64)).reshape(1, -1)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().numpy()
            nll.append(window_nll(logits, w))
            top1.append(logits.argmax(-1).astype(np.int32))
            del logits
    return {"nll": np.asarray(nll), "top1": np.stack(top1), "eval_s": time.perf_counter() - t0}


def summary(ev: dict, ref: dict) -> dict:
    tokens = ref["top1"].shape[0] * (ref["top1"].shape[1] - 1)
    ppl = float(np.exp(ev["nll"].sum() / tokens))
    ppl32 = float(np.exp(ref["nll"].sum() / tokens))
    return {"ppl": ppl, "ppl_change_pct": 100 * (ppl / ppl32 - 1),
            "top1_agreement": float((ev["top1"] == ref["top1"]).mean()), "eval_s": round(ev["eval_s"], 1)}


def checkpoint(q: Path, out: Path, scheme: str, windows: list[np.ndarray], ref: dict) -> dict:
    """``trtforge export-checkpoint`` (its own verification on 16 held-out lines), then the
    checkpoint's perplexity and top-1 on the benchmark's windows."""
    cmd = ["trtforge", "export-checkpoint", str(q), "-o", str(out), "--force", "--fp8-scheme", scheme,
           "--text", str(EVAL), "--json", "--max-ppl-change-pct", "1000"]  # measured here, not gated
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"scheme": scheme, "error": next((ln for ln in p.stderr.splitlines() if ln.startswith("error:")), p.stderr[-400:])}
    m = json.loads((out / "manifest.json").read_text())
    ver = m.get("verification", {})
    par = ver.get("parity", {})
    row = {"scheme": scheme, "wall_s": round(time.perf_counter() - t, 1)}
    for k in ("checkpoint_vs_onnx", "checkpoint_vs_reference", "onnx_vs_reference"):
        if k in par:
            row[k] = {x: par[k][x] for x in ("cosine_mean", "top1_agreement", "ppl_change_pct") if x in par[k]}
    conv = m.get("conversion", {})
    row["requantized"] = conv.get("fp8_requantized") or conv.get("requantized")
    row["windows"] = summary(evaluate_checkpoint(out, windows), ref)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, default=Path("/work/artifacts/gemma3-fp32"))
    ap.add_argument("--out", type=Path, default=Path("/work/out/fp8/bench"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--recipe", action="append", default=None)
    ap.add_argument("--ranges", type=Path, default=None, help="reuse these ranges (ranges.json of an earlier run)")
    ap.add_argument("--windows", type=int, default=None, help="evaluate on the first N windows only")
    ap.add_argument("--checkpoint", choices=["tensor", "rowwise", "both"], default=None)
    ap.add_argument("--reuse", action="store_true", help="keep quantized folders that exist")
    ap.add_argument("--checkpoint-only", action="store_true", help="only the checkpoints of existing folders")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(args.fp32, None)
    cache = args.out / f"fp32-eval-{len(windows)}.npz"  # FP32 figures of every window, sliced below
    if cache.exists():
        z = np.load(cache)
        ref = {"nll": z["nll"], "top1": z["top1"], "eval_s": float(z["eval_s"])}
    else:
        ref = evaluate(args.fp32, windows)
        np.savez(cache, **ref)
    if args.windows:
        windows = windows[: args.windows]
        ref = {"nll": ref["nll"][: args.windows], "top1": ref["top1"][: args.windows], "eval_s": ref["eval_s"]}
    base = summary(ref, ref)
    results = {"machine": machine(), "model": str(args.fp32), "calibration": [str(c.name) for c in CALIB],
               "evaluation": f"{EVAL.name}: {len(windows)} non-overlapping windows of {SEQ} tokens",
               "fp32": base, "rows": []}
    print(f"FP32 ppl {base['ppl']:.4f} on {len(windows)} windows", flush=True)
    for spec in args.recipe or ["fp8", "int8-sq", "int8"]:
        label, name, over = parse_recipe(spec)
        folder = args.out / re.sub(r"[^A-Za-z0-9._=-]+", "_", label)
        row: dict = {"recipe": label}
        if not ((args.reuse or args.checkpoint_only) and (folder / "manifest.json").exists()):
            row.update(quantize(args.fp32, folder, name, over, args.ranges))
        if "error" not in row and not args.checkpoint_only:
            row.update(summary(evaluate(folder, windows), ref))
        if "error" not in row and args.checkpoint:
            schemes = ["tensor", "rowwise"] if args.checkpoint == "both" else [args.checkpoint]
            row["checkpoint"] = [checkpoint(folder, args.out / f"{folder.name}-ckpt-{s}", s, windows, ref) for s in schemes]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
