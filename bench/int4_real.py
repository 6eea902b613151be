"""INT4 weight-only recipes on a real decoder: perplexity, quantize time and peak RSS.

    python bench/int4_real.py [--export /work/artifacts/gemma3-fp32] [--out /work/out/gptq/int4]
                              [--recipes int4-rtn,int4-awq,int4-gptq,int4-awq-gptq] [--set k=v]
                              [--windows N] [--reuse] [--json docs/results/int4_real.json]

Each recipe: ``trtforge quantize EXPORT --recipe R --calib calib-apache-2.0.txt --calib
calib-mpl-lgpl.txt`` under ``/usr/bin/time -v`` (wall time and peak RSS of the CLI process,
calibration included), then perplexity of the FP32 export and of each artifact on the held-out
``examples/data/eval-gpl-3.0.txt`` (never calibrated on): the text tokenized without special
tokens, cut into non-overlapping 256-token windows, one window per ONNX Runtime CPU run (the
first ``--windows`` of them, default all: 29), and top-1 next-token agreement with FP32.
``--reuse``: an artifact already in OUT (with its quantize.json) is evaluated, not re-made.
``--ranges``: quantize from an earlier run's saved statistics (no calibration pass; its time is
then not in the figure).
Evaluation runs in its own process per model so that one model is in memory at a time. Results
are merged into the JSON file (one row per recipe).
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
WINDOW = 256

EVAL_CHILD = r"""
import json, sys
import numpy as np
from trtforge.ort import session
from trtforge.textdata import load_tokenizer
model, export, window, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[6])
from pathlib import Path
tok = load_tokenizer(Path(export))
ids = np.asarray(tok(open(sys.argv[5], encoding="utf-8").read(), add_special_tokens=False)["input_ids"], np.int64)
windows = ids[: (len(ids) // window) * window].reshape(-1, window)
windows = windows[:limit] if limit > 0 else windows
s = session(model)
names = {i.name for i in s.get_inputs()}
nll, count, top, per = 0.0, 0, [], []
for w in windows:
    w = w[None]
    feeds = {"input_ids": w, "attention_mask": np.ones_like(w), "position_ids": np.arange(window)[None]}
    logits = s.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0].astype(np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    per.append(-float(lp[np.arange(window - 1), w[0, 1:]].sum()))
    nll += per[-1]
    count += window - 1
    top.append(logits.argmax(-1).astype(np.int32))
np.save(out, np.concatenate(top))
print(json.dumps({"ppl": float(np.exp(nll / count)), "tokens": count, "windows": len(windows), "window_nll": per}))
"""


def quantize(export: Path, recipe: str, out: Path, sets: list[str], ranges: Path | None = None) -> dict:
    cmd = ["/usr/bin/time", "-v", "trtforge", "quantize", str(export), "--recipe", recipe, "-o", str(out), "--force"]
    if ranges is not None:  # statistics (and Hessians) of an earlier run on the same data: no calibration pass
        cmd += ["--ranges", str(ranges)]
    else:
        for c in CALIB:
            cmd += ["--calib", str(c)]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    (out / "quantize.stderr.txt").write_text(p.stderr)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    blocks = sorted({n.get("block_size") for n in q["nodes"] if n["status"] == "quantized"})
    return {"quantize_wall_s": round(wall, 1), "quantize_peak_rss_mib": round(rss_kb / 1024),
            "timings": {k: round(v, 1) for k, v in m["timings"].items()},
            "quantized": q["counts"]["quantized"], "excluded": q["counts"]["excluded"], "block_sizes": blocks,
            "size_mib": round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 2**20)}


def evaluate(model: Path, export: Path, top_file: Path, windows: int) -> dict:
    cmd = [sys.executable, "-c", EVAL_CHILD, str(model), str(export), str(WINDOW), str(top_file), str(EVAL), str(windows)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", type=Path, default=Path("/work/artifacts/gemma3-fp32"))
    ap.add_argument("--out", type=Path, default=Path("/work/out/gptq/int4"))
    ap.add_argument("--recipes", default="int4-rtn,int4-awq,int4-gptq,int4-awq-gptq")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="recipe override for every recipe")
    ap.add_argument("--label", default="", help="suffix of the result rows' names (with --set)")
    ap.add_argument("--windows", type=int, default=0, help="evaluate the first N windows (0: all)")
    ap.add_argument("--ranges", type=Path, default=None,
                    help="quantize from these saved ranges (e.g. OUT/int4-gptq/ranges.json) instead of calibrating")
    ap.add_argument("--reuse", action="store_true", help="evaluate artifacts already in --out instead of re-making them")
    ap.add_argument("--json", type=Path, default=Path("docs/results/int4_real.json"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.json.read_text()) if a.json.exists() else {}
    results.update(machine=machine(), export=str(a.export), calibration=[c.name for c in CALIB],
                   evaluation=f"{EVAL.name}, non-overlapping {WINDOW}-token windows"
                              f"{f' (the first {a.windows})' if a.windows else ''}, ONNX Runtime CPU")
    rows = results.setdefault("rows", {})
    ref_top = a.out / f"fp32.w{a.windows}.top1.npy"
    if rows.get("fp32", {}).get("windows_asked") != a.windows or not ref_top.exists():
        rows["fp32"] = {**evaluate(a.export / "model.onnx", a.export, ref_top, a.windows), "windows_asked": a.windows}
        print("fp32", rows["fp32"]["ppl"], flush=True)
    top32 = np.load(ref_top)
    for recipe in a.recipes.split(","):
        name = recipe + (f" {a.label}" if a.label else "")
        out = a.out / name.replace(" ", "_")
        made = out / "quantize.json"
        if a.reuse and made.exists():
            q = json.loads(made.read_text())
        else:
            q = quantize(a.export, recipe, out, a.sets, a.ranges)
            if a.ranges is not None:
                q["ranges_reused"] = str(a.ranges)
            if "error" not in q:
                made.write_text(json.dumps(q, indent=2) + "\n")
        row = {"recipe": recipe, "set": a.sets, **q}
        if "error" not in row:
            ev = evaluate(out / "model.onnx", a.export, out / "top1.npy", a.windows)
            row.update(ev, ppl_change_pct=round(100 * (ev["ppl"] / rows["fp32"]["ppl"] - 1), 2),
                       top1_agreement=round(float((np.load(out / "top1.npy") == top32).mean()), 4))
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
