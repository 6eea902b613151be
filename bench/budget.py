"""Quantizing under an accuracy budget (issue 17): the plain recipe beside the same recipe with --budget.

For each case: the plain recipe and the budgeted one, each quantized in its own process (time
and peak RSS are its own), then both measured on held-out text that no calibration saw
(examples/data/eval-gpl-3.0.txt): perplexity change over the FP32 export for decoders (256-token
windows), mean cosine of mean-pooled sentence embeddings for encoders. Reported: the budget's
own held-out measurement (from the manifest), the eval-text figure, the share of the GEMM
weights the plain recipe quantizes that stay quantized, and the search time against the plain
recipe's time.

    python bench/budget.py [--only gemma3-fp8,minilm-fp8,...] [--json docs/results/budget.json]
    python bench/budget.py --table docs/results/budget.json   # the markdown table of docs/benchmarks.md
    python bench/budget.py --sensitivities OUT/gemma3-fp8-budget/manifest.json   # where the error sits
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
from _common import DATA, REPO, cosine, machine, mean_pool, minilm_dir, sentences  # noqa: E402,I001

OUT = Path(os.environ.get("TRTFORGE_BENCH_OUT", REPO / "bench" / "out")) / "budget"
GEMMA = Path(os.environ.get("TRTFORGE_GEMMA3_EXPORT", "/work/artifacts/gemma3-fp32"))
CALIB = [DATA / "calib-apache-2.0.txt", DATA / "calib-mpl-lgpl.txt"]
EVAL = DATA / "eval-gpl-3.0.txt"

# name -> (export, recipe, budget, eval kind)
CASES = {
    "gemma3-fp8": ("gemma3", "fp8", "perplexity=1%"),
    "gemma3-int4-awq": ("gemma3", "int4-awq", "perplexity=10%"),
    "gemma3-int8-sq": ("gemma3", "int8-sq", "perplexity=2%"),
    "gemma3-fp8-sq": ("gemma3", str(Path(__file__).resolve().parent / "recipes" / "fp8-sq.toml"), "perplexity=1%"),
    "gemma3-fp8-group": ("gemma3", str(Path(__file__).resolve().parent / "recipes" / "fp8-group.toml"), "perplexity=1%"),
    "minilm-fp8": ("minilm", "fp8", "embedding_cosine=0.999"),
    "minilm-int8-sq": ("minilm", "int8-sq", "embedding_cosine=0.999"),
    "minilm-fp8-0.998": ("minilm", "fp8", "embedding_cosine=0.998"),
    "minilm-fp8-group": ("minilm", str(Path(__file__).resolve().parent / "recipes" / "fp8-group.toml"), "embedding_cosine=0.999"),
    "minilm-fp8-n304": ("minilm", str(Path(__file__).resolve().parent / "recipes" / "fp8-n304.toml"), "embedding_cosine=0.999"),
    "minilm-fp8-point": ("minilm", str(Path(__file__).resolve().parent / "recipes" / "fp8-point.toml"), "embedding_cosine=0.999"),
}


def export_minilm() -> Path:
    out = OUT / "minilm-export"
    if not (out / "manifest.json").exists():
        from trtforge.exporter import ExportOptions, export_onnx

        export_onnx(minilm_dir(), out, ExportOptions(), force=True)
    return out


def source(kind: str) -> Path:
    return GEMMA if kind == "gemma3" else export_minilm()


def child(src: Path, recipe: str, budget: str | None, out: Path) -> dict:
    """Quantize in this process (called as a child); prints the result as JSON."""
    from trtforge.calibration import quantize
    from trtforge.recipes import load_quant_recipe

    rec = load_quant_recipe(recipe)
    if budget:
        rec = rec.replace(budget=budget)
    t = time.perf_counter()
    art = quantize(src, rec, out, calib=CALIB, force=True)
    wall = time.perf_counter() - t
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: wall times on a shared machine are inflated
    q = art.manifest.quantization
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": hwm, "timings": art.manifest.timings,
            "size_mib": art.manifest.model.size_bytes / 2**20,
            "quantized": {n["node"]: n["k"] * n["n"] for n in q.nodes if n["status"] == "quantized"},
            "budget": q.extra.get("budget")}


RESUME = False  # --resume: a child whose result file and manifest exist is not run again


def run_child(src: Path, recipe: str, budget: str | None, out: Path) -> dict:
    done = out.parent / f"{out.name}.result.json"  # the child's figures, kept should a later step fail
    if RESUME and done.is_file() and (out / "manifest.json").is_file():
        return json.loads(done.read_text())
    cmd = [sys.executable, __file__, "--child", str(src), recipe, budget or "", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    (out.parent / f"{out.name}.log").write_text(p.stderr)  # the child's log, kept for a failed run
    if p.returncode:
        sys.stderr.write(p.stderr[-3000:])
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": f"exit {p.returncode}: {last}" if p.returncode < 0 else last}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps(res, indent=1, default=float))
    return res


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    v = logits.shape[-1]
    rows, tgt = logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1)
    total = 0.0
    for k in range(0, rows.shape[0], 64):
        x = rows[k : k + 64].astype(np.float64)
        m = x.max(1, keepdims=True)
        total += float((m[:, 0] + np.log(np.exp(x - m).sum(1)) - x[np.arange(len(x)), tgt[k : k + 64]]).sum())
    return total, rows.shape[0]


def eval_decoder(paths: list[Path], seq: int = 256) -> tuple[list[float], int, list[float]]:
    """Mean NLL per model on every non-overlapping window of the eval text, each <bos> + 255 text
    tokens (bench/quantize.py's windows: the calibration windows start with the tokenizer's BOS too),
    and each later model's mean KL from the first (the expected change, bench/kl_vs_nll.py)."""
    from kl_vs_nll import log_softmax
    from kl_vs_nll import run as run_window
    from quantize import eval_windows

    from trtforge.ort import NO_PREPACKING, session
    from trtforge.textdata import load_tokenizer

    wins = eval_windows(load_tokenizer(paths[0]), None, seq)
    sessions = [session(p / "model.onnx", config=NO_PREPACKING) for p in paths]
    nll, kl, n = np.zeros(len(paths)), np.zeros(len(paths)), 0
    for w in wins:
        ref = None
        for j, sess in enumerate(sessions):
            lp = log_softmax(run_window(sess, w))
            nll[j] -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
            if ref is None:
                ref = lp
            else:
                kl[j] += float((np.exp(ref) * (ref - lp)).sum())
            del lp
        n += len(w) - 1
    return list(nll / n), len(wins), list(kl[1:] / n)


def eval_encoder(paths: list[Path]) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    from trtforge.ort import session

    tok = AutoTokenizer.from_pretrained(str(paths[0]), local_files_only=True)
    texts = sentences(EVAL)
    out = []
    for p in paths:
        sess = session(p / "model.onnx")
        names = [i.name for i in sess.get_inputs()]
        embs = []
        for i in range(0, len(texts), 16):
            enc = tok(texts[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="np")
            feeds = {k: enc[k].astype(np.int64) for k in names}
            h = sess.run(["last_hidden_state"], feeds)[0]
            embs.append(mean_pool(h, enc["attention_mask"]))
        out.append(np.concatenate(embs))
    return out


def case(name: str, old: dict | None = None) -> dict:
    """``old``: an earlier result of this case whose plain run is reused (--reuse-plain)."""
    kind, recipe, budget = CASES[name]
    src = source(kind)
    reuse = bool(old) and "error" not in old.get("plain", {"error": 1})
    # a decoder's plain run and its eval figures (FP32 and plain) taken from the results file as they are, when its
    # folder is gone: only the budgeted model is evaluated (the plain recipe's code unchanged since; say so)
    from_file = reuse and kind == "gemma3" and "eval" in old and not (OUT / f"{name}-plain" / "manifest.json").exists()
    if reuse and (from_file or (OUT / f"{name}-plain" / "manifest.json").exists()):
        plain = old["plain"]
    else:
        plain = run_child(src, recipe, None, OUT / f"{name}-plain")
    budgeted = run_child(src, recipe, budget, OUT / f"{name}-budget")
    res = {"case": name, "recipe": recipe, "budget": budget, "plain": plain, "budgeted": budgeted}
    if "error" in plain or "error" in budgeted:
        return res
    paths = [src, OUT / f"{name}-plain", OUT / f"{name}-budget"]
    if kind == "gemma3" and from_file:
        (ref, b), nwin, (kb,) = eval_decoder([paths[0], paths[2]])
        res["eval"] = {**old["eval"], "budgeted": 100 * (np.exp(b - ref) - 1), "budgeted_kl": 100 * np.expm1(kb),
                       "reused": "plain figures from the earlier run in this file; FP32 and the budgeted model measured now"}
        res["plain_reused"] = True
    elif kind == "gemma3":
        (ref, a, b), nwin, (ka, kb) = eval_decoder(paths)
        res["eval"] = {"metric": f"perplexity change % (eval-gpl-3.0, all {nwin} windows of <bos> + 255 tokens)",
                       "ppl_fp32": float(np.exp(ref)),
                       "plain": 100 * (np.exp(a - ref) - 1), "budgeted": 100 * (np.exp(b - ref) - 1),
                       # the expected change on the same windows: exp(mean KL from FP32) - 1 (bench/kl_vs_nll.py)
                       "plain_kl": 100 * np.expm1(ka), "budgeted_kl": 100 * np.expm1(kb)}
    else:
        ref, a, b = eval_encoder(paths)
        res["eval"] = {"metric": f"mean embedding cosine (eval-gpl-3.0, {len(ref)} sentences)",
                       "plain": float(cosine(ref, a).mean()), "budgeted": float(cosine(ref, b).mean())}
    pq, bq = plain["quantized"], budgeted["quantized"]
    res["share_kept_quantized"] = sum(v for k, v in bq.items() if k in pq) / max(1, sum(pq.values()))
    res["time_ratio"] = budgeted["wall_s"] / plain["wall_s"]
    if plain.get("cpu_s") and budgeted.get("cpu_s"):
        res["cpu_ratio"] = budgeted["cpu_s"] / plain["cpu_s"]
    return res


def table(results: dict) -> str:
    rows = ["| case | budget | held-out calib (plain -> budget; its confidence bound) | GPTQ rounding (every GEMM quantized, held-out) | "
            "eval text: plain | eval text: budget | GEMM weights still quantized | groups kept | time plain / budget (x) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results["cases"]:
        if "eval" not in r:
            rows.append(f"| {r['case']} | {r['budget']} | failed: {r['budgeted'].get('error') or r['plain'].get('error')} ||||||")
            continue
        b = r["budgeted"]["budget"]
        pct = b["unit"] == "%"
        fmt = (lambda v: f"{v:+.2f}%") if pct else (lambda v: f"{v:.5f}")
        e = r["eval"]
        rnd = b.get("rounding") or {}
        lever = ("not in this run" if not rnd else rnd["reason"].partition(":")[0] if not rnd.get("tried")
                 else f"{rnd['lever']}: {fmt(rnd['measured_plain'])} -> {fmt(rnd['measured'])}, "
                 + ("used" if rnd["used"] else "not used"))
        plain_all = rnd.get("measured_plain", b["measured_all_quantized"])
        held = fmt(b["measured"]) + (f" (bound {fmt(b['measured_bound'])})" if b.get("measured_bound") not in
                                     (None, b["measured"]) else "")
        rows.append(f"| {r['case']} | {r['budget']} | {fmt(plain_all)} -> {held} | {lever} | "
                    f"{fmt(e['plain'])} | {fmt(e['budgeted'])} | {100 * r['share_kept_quantized']:.1f}% | "
                    f"{b['groups_kept']} of {b['groups']}" + (f" ({b['groups_int8']} INT8)" if b.get("groups_int8") else "")
                    + f" | {r['plain']['wall_s']:.0f}s / {r['budgeted']['wall_s']:.0f}s ({r['time_ratio']:.1f}x"
                    + (f"; CPU {r['cpu_ratio']:.1f}x" if r.get("cpu_ratio") else "") + ") |")
    return "\n".join(rows)


def sensitivities(manifest: Path) -> str:
    """Where a budgeted model's error sits (its manifest's per-group sensitivities): the groups by
    sensitivity per weight element, the share of the summed sensitivity per role and per layer, and
    the share of the quantized weights that carries each fraction of it (a flat distribution needs
    many weights kept for a given error reduction; a peaked one few)."""
    import re

    q = json.loads(manifest.read_text())["quantization"]
    groups: dict[str, dict] = {}
    for ly in q["layers"]:
        if ly.get("sensitivity") is None:
            continue
        g = groups.setdefault(ly["group"], {"role": ly["role"], "sens": ly["sensitivity"], "elems": 0,
                                            "precision": set(), "name": ly["name"]})
        g["elems"] += ly["weight_bytes"] / {"fp32": 4, "fp16": 2, "int4-weight-only": 0.5}.get(ly["precision"], 1)
        g["precision"].add(ly["precision"])
    total = sum(g["sens"] for g in groups.values()) or 1.0
    elems = sum(g["elems"] for g in groups.values()) or 1.0
    rows = sorted(groups.values(), key=lambda g: -g["sens"] / g["elems"])
    out = [f"{len(rows)} groups; summed sensitivity {total:.3e}"]
    acc = e = 0.0
    marks = iter((0.25, 0.5, 0.75, 0.9))
    mark = next(marks)
    for g in rows:
        acc, e = acc + g["sens"], e + g["elems"]
        while mark is not None and acc / total >= mark:
            out.append(f"  {100 * mark:.0f}% of the summed sensitivity in the first {100 * e / elems:.1f}% of the weights")
            mark = next(marks, None)
    by_role: dict[str, float] = {}
    by_layer: dict[str, float] = {}
    for g in rows:
        by_role[g["role"]] = by_role.get(g["role"], 0.0) + g["sens"] / total
        m = re.search(r"layers?[._](\d+)", g["name"])
        key = m.group(1) if m else "other"
        by_layer[key] = by_layer.get(key, 0.0) + g["sens"] / total
    out.append("  by role: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])))
    out.append("  by layer: " + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in sorted(
        by_layer.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 1 << 30)))
    out.append("  top groups (sensitivity per element, share, precision):")
    for g in rows[:10]:
        out.append(f"    {g['name']}: {g['sens'] / g['elems']:.2e} {100 * g['sens'] / total:.1f}% {'/'.join(sorted(g['precision']))}")
    ev = q.get("budget", {}).get("evaluations") or []
    out.append("  budget runs (moves taken -> value): " + ", ".join(f"{e['moves']} -> {e['value']:.4g}" for e in ev))
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "budget.json")
    ap.add_argument("--table", type=Path)
    ap.add_argument("--sensitivities", type=Path, metavar="MANIFEST", help="where a budgeted model's error sits")
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--reuse-plain", action="store_true", help="keep the plain runs of the results file")
    ap.add_argument("--resume", action="store_true",
                    help="reuse each quantize run whose result file (OUT/<run>.result.json) and folder exist")
    a = ap.parse_args()
    global RESUME
    RESUME = a.resume
    if a.child:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        src, recipe, budget, out = a.child
        print(json.dumps(child(Path(src), recipe, budget or None, Path(out))))
        return 0
    if a.sensitivities:
        print(sensitivities(a.sensitivities))
        return 0
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "cases": []}
    before: dict = {}
    if a.json.exists():
        old = json.loads(a.json.read_text())
        before = {c["case"]: c for c in old.get("cases", [])}
        # each row keeps the machine it ran on: the file merges runs of several sessions
        results["cases"] = [{"machine": old.get("machine"), **c} for c in old.get("cases", [])
                            if c["case"] not in a.only.split(",")]
    for name in a.only.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        results["cases"].append({"machine": results["machine"], **case(name, before.get(name) if a.reuse_plain else None)})
        results["cases"].sort(key=lambda c: list(CASES).index(c["case"]))
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1, default=float))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
