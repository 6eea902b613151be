"""Recipe variants on the real Gemma 3 270M from one set of saved ranges, scored on held-out text.

    python bench/recipe_sweep.py --ranges Q/ranges.json [--gemma3 EXPORT] \
        --recipe int8-sq --recipe 'int8-sq:calib_method="mse"' ... [--eval-windows N] \
        [--work DIR] [--json FILE]

Each ``--recipe`` is a preset with optional overrides (``NAME:key=JSON,key=JSON``; a value that is
not JSON is taken as a string), quantized by trtforge in its own process from the ranges of an
earlier run (``--ranges``: the same statistics and kept rows, no calibration pass; GPTQ recipes
need a ranges file saved by a GPTQ run; where ``--ranges`` does not exist yet, the first recipe
calibrates on ``--calib-windows`` windows of bench/quantize.py's calibration text and keeps its
ranges there), then scored exactly as bench/quantize.py scores its
Gemma rows (its ``eval_windows``: non-overlapping windows of examples/data/eval-gpl-3.0.txt, <bos>
+ 255 tokens; perplexity and top-1 agreement with FP32; the FP32 reference cached as there).
Per-window NLL differences against the first recipe give a paired standard error, so two
variants can be told apart on the same windows. The quantized folders are deleted after scoring
(``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from quantize import CALIB, GEMMA3_ARTIFACT, OUT, eval_windows, run_child, window_nll  # noqa: E402,I001

CHILD = r"""
import json, sys, time
t = time.perf_counter()
def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from pathlib import Path
src, out, ranges, recipe, over, calib = sys.argv[1:7]
from trtforge.calibration import get_preset, quantize
r = get_preset(recipe).replace(**json.loads(over))
if calib != "-":  # calibrate (num_samples in the overrides), keep the ranges for the next variants
    import shutil
    quantize(src, r, out, calib=json.loads(calib), force=True)
    Path(ranges).parent.mkdir(parents=True, exist_ok=True)
    for f in Path(out).glob("ranges.*"):
        shutil.copy(f, Path(ranges).parent / f.name)
else:
    quantize(src, r, out, ranges=ranges, force=True)
m = json.loads((Path(out) / "manifest.json").read_text())
print(json.dumps({"path": str(Path(out) / "model.onnx"), "seconds": time.perf_counter() - t,
                  "peak_rss_mib": hwm_mib(), "call": {"recipe": recipe, **json.loads(over)},
                  "smoothing": [{k: s[k] for k in ("gemms", "alpha", "error")} for s in m["quantization"]["smoothing"]],
                  "activations": {n["node"]: n["activation"] for n in m["quantization"]["nodes"] if "activation" in n}}))
"""


def parse_spec(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    over: dict = {}
    depth, cur, items = 0, "", []
    for ch in rest:  # split on commas outside brackets
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    for item in filter(None, (s.strip() for s in items)):
        k, _, v = item.partition("=")
        try:
            over[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            over[k.strip()] = v.strip()
    return name, over


def window_eval(path: Path, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-window summed NLL and top-1 predictions: bench/quantize.py's decoder_eval, per window."""
    from trtforge.ort import session

    t = time.perf_counter()
    s = session(path)
    names = {i.name for i in s.get_inputs()}
    L = windows.shape[1]
    nll, tops = [], []
    for w in windows:
        w = w[None]
        feeds = {"input_ids": w, "attention_mask": np.ones_like(w), "position_ids": np.arange(L)[None]}
        logits = s.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0, :-1]
        nll.append(window_nll(logits, w[0]))
        tops.append(logits.argmax(-1))
        del logits
    del s
    return np.asarray(nll), np.concatenate(tops), time.perf_counter() - t


def main() -> int:
    from trtforge.textdata import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemma3", type=Path, default=GEMMA3_ARTIFACT)
    ap.add_argument("--ranges", type=Path, required=True,
                    help="ranges.json of an earlier run; where it does not exist, the first recipe calibrates and keeps it there")
    ap.add_argument("--calib-windows", type=int, default=45, help="calibration windows when calibrating (default 45: all)")
    ap.add_argument("--recipe", action="append", required=True)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--work", type=Path, default=OUT / "sweep")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(load_tokenizer(args.gemma3), args.eval_windows)
    ref = args.work / f"fp32-ref-windows-{len(windows)}.npz"
    if ref.exists() and np.array_equal(np.load(ref)["windows"], windows):
        z = np.load(ref)
        nll32, top32 = z["nll"], z["top1"]
    else:
        nll32, top32, secs = window_eval(args.gemma3 / "model.onnx", windows)
        np.savez(ref, windows=windows, nll=nll32, top1=top32)
        print(f"FP32 ppl {np.exp(nll32.sum() / top32.size):.4f} on {len(windows)} windows ({secs:.0f}s)", flush=True)
    tokens = top32.size
    ppl32 = float(np.exp(nll32.sum() / tokens))
    res = {"machine": machine(), "model": str(args.gemma3), "ranges": str(args.ranges),
           "evaluation": f"{len(windows)} windows of eval-gpl-3.0.txt, <bos> + 255 tokens, {tokens} scored positions",
           "fp32_ppl": ppl32, "rows": []}
    first = None
    for spec in args.recipe:
        name, over = parse_spec(spec)
        out = args.work / "q"
        calib = "-"
        if not args.ranges.exists():  # the first variant calibrates; the others reuse its ranges
            if args.ranges.name != "ranges.json":
                raise SystemExit("error: --ranges must name a ranges.json (an existing one, or where to keep new ones)")
            over = {"num_samples": args.calib_windows, **over}
            calib = json.dumps([str(c) for c in CALIB])
        row = run_child([sys.executable, "-c", CHILD, str(args.gemma3), str(out), str(args.ranges), name, json.dumps(over),
                         calib], args.work / "q.log")
        if calib != "-":
            row["calibrated"] = f"{args.calib_windows} windows of {', '.join(c.name for c in CALIB)}"
        row["spec"] = spec
        if "path" in row:
            nll, top, es = window_eval(Path(row["path"]), windows)
            ppl = float(np.exp(nll.sum() / tokens))
            row.update(ppl=ppl, ppl_change_pct=100 * (ppl / ppl32 - 1), top1_agreement=float((top == top32).mean()),
                       eval_s=es, window_nll=nll.tolist())
            if first is None:
                first = nll
            else:  # paired: the same windows, the difference in mean NLL per token (and its SE) against the first
                d = (nll - first) / windows[0, 1:].size
                row["vs_first"] = {"mean_nll_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        res["rows"].append(row)
        print(f"{spec:60} ppl {row.get('ppl_change_pct', row.get('error'))} top1 {row.get('top1_agreement')} "
              f"{row.get('vs_first', '')} q {row.get('seconds', 0):.0f}s", flush=True)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
