"""Gemma 3 270M, real weights: export time and memory, and greedy decoding through the export.

    python bench/gemma3_decode.py [--model DIR] [--out DIR] [--json docs/results/gemma3-decode.json]

1. ``trtforge export MODEL -o OUT/gemma-past`` (causal-lm-with-past, the default for a decoder),
   ``--task causal-lm`` and ``--dtype fp16`` (with past), each under ``/usr/bin/time -v``: wall time and peak RSS of the CLI
   process (validation against PyTorch included: it is part of every export).
2. 20 greedy tokens through the with-past ONNX graph (ONNX Runtime CPU, the cache fed back step by
   step) against PyTorch's ``generate()`` (FP32, eager attention, transformers' own sliding-window
   cache), for three short prompts, a ~600-token prompt (past the 512-token window; the start of
   the held-out GPL text in examples/data) and the short prompts as one left-padded batch; the
   same for the FP16 export (reported, not gated: FP16 rounding may flip a near-tie).

The model folder: --model, else TRTFORGE_GEMMA3_DIR, else bench/models.py's default (prepared
on first use). The test ``test_real_gemma3_270m_decodes_like_generate`` (marker ``real``) runs
step 2 when TRTFORGE_GEMMA3_DIR is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from models import gemma3_270m  # noqa: E402

from trtforge.testing.decode import GEMMA3_STEPS, compare_greedy, gemma3_prompts  # noqa: E402


def timed_export(model: Path, out: Path, task: str | None, dtype: str = "fp32") -> dict:
    """Run the CLI export under /usr/bin/time -v; wall seconds, peak RSS, the manifest's figures."""
    cmd = ["/usr/bin/time", "-v", "trtforge", "export", str(model), "-o", str(out), "--force", "--dtype", dtype]
    if task:
        cmd += ["--task", task]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    m = json.loads((out / "manifest.json").read_text())
    files = {n: (out / n).stat().st_size for n in ("model.onnx", "model.onnx.data") if (out / n).exists()}
    return {
        "task": m["source"]["task"],
        "dtype": dtype,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(rss_kb / 1024),
        "timings": m["timings"],
        "weights": m["model"].get("weights"),
        "validation_max_normalized_err": m["validation"].get("max_normalized_err"),
        "onnx_mib": round(sum(files.values()) / 2**20),
    }


def _print(results: list[dict], dtype: str) -> None:
    for r in results:
        print(f"{dtype} {r['case']:26} batch {r['batch']}  prompt {r['prompt_tokens']:4} tokens  "
              f"{'identical' if r['identical'] else 'DIFFERENT from step ' + str(r['first_different_step'])}  "
              f"max |logit diff| {r['max_abs_logit_diff']:.2e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/tmp/g14"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-export", action="store_true", help="reuse OUT/gemma-past")
    args = ap.parse_args()
    model = args.model or gemma3_270m(Path(os.environ["TRTFORGE_GEMMA3_DIR"]) if os.environ.get("TRTFORGE_GEMMA3_DIR")
                                      else None)
    weights_mib = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
    report: dict = {"model": str(model), "weights_mib": round(weights_mib), "machine": machine(), "exports": []}
    if not args.skip_export:
        for name, task, dtype in (("gemma-past", None, "fp32"), ("gemma-nopast", "causal-lm", "fp32"),
                                  ("gemma-past-fp16", None, "fp16")):
            r = timed_export(model, args.out / name, task, dtype)
            report["exports"].append(r)
            print(f"export {r['task']:20} {dtype} {r['wall_s']:6.1f}s  peak RSS {r['peak_rss_mib']} MiB "
                  f"({r['peak_rss_mib'] / weights_mib:.1f}x the {weights_mib:.0f} MiB of weights)  "
                  f"validation {r['validation_max_normalized_err']:.2g}", flush=True)
    t = time.perf_counter()
    results = compare_greedy(args.out / "gemma-past", model, gemma3_prompts(model), GEMMA3_STEPS)
    report["decode"] = {"steps": GEMMA3_STEPS, "seconds": round(time.perf_counter() - t, 1), "cases": results}
    _print(results, "fp32")
    # FP16 export (norms, softmax and rotary kept FP32): reported, not gated; identical is not promised
    if (args.out / "gemma-past-fp16" / "model.onnx").exists():
        fp16 = compare_greedy(args.out / "gemma-past-fp16", model, gemma3_prompts(model), GEMMA3_STEPS)
        report["decode_fp16"] = {"steps": GEMMA3_STEPS, "cases": fp16}
        _print(fp16, "fp16")
    report["all_identical"] = all(r["identical"] for r in results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if report["all_identical"] else 1)


if __name__ == "__main__":
    main()
