"""Gemma 3 270M, real weights: an FP8 TensorRT-LLM checkpoint, read back and gated.

    python bench/gemma3_checkpoint.py [--export DIR] [--model DIR] [--out DIR] [--recipe fp8]
                                      [--json docs/results/gemma3-checkpoint.json]

1. ``trtforge quantize EXPORT --recipe fp8 --calib examples/data/calib-apache-2.0.txt`` of the FP32
   ``causal-lm`` export (default /work/artifacts/gemma3-fp32), under ``/usr/bin/time -v``.
2. ``trtforge export-checkpoint`` of it (Gemma3ForCausalLM, bfloat16: the family's default for an
   FP32 source) with the float model as ``--reference`` and held-out text (``--paragraphs``
   paragraphs of examples/data/eval-gpl-3.0.txt, one per line, each cut at 128 tokens by the
   writer), under ``/usr/bin/time -v``. The writer reads the
   checkpoint back the way TensorRT-LLM's loader does (Gemma's norms as w + 1), builds a
   fake-quantized PyTorch model from it and compares its logits with ONNX Runtime running the
   quantized ONNX artifact and with the float model; the perplexity gate (3% for FP8) decides.

The figures are the checkpoint manifest's ``verification`` section; wall time and peak RSS per step.
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
from _common import DATA, machine  # noqa: E402
from models import gemma3_270m  # noqa: E402

DEFAULT_EXPORT = Path("/work/artifacts/gemma3-fp32")


def timed(cmd: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-v", *cmd]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "peak_rss_mib": round(rss_kb / 1024)}


def held_out(out: Path, n: int = 16) -> Path:
    paras = [" ".join(p.split()) for p in (DATA / "eval-gpl-3.0.txt").read_text(encoding="utf-8").split("\n\n")]
    paras = [p for p in paras if len(p) > 200][:n]
    path = out / "eval-gpl-paragraphs.txt"
    path.write_text("\n".join(paras) + "\n", encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=DEFAULT_EXPORT, help="FP32 causal-lm export of Gemma 3 270M")
    ap.add_argument("--model", type=Path, default=None, help="the HF folder (default TRTFORGE_GEMMA3_DIR or bench/models.py)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/gemma3-checkpoint"))
    ap.add_argument("--recipe", default="fp8")
    ap.add_argument("--json", type=Path, default=None)
    # parity holds three sets of logits (checkpoint, ONNX, float) of rows x 128 x 262,144 float32:
    # 16 paragraphs need ~6.4 GB for them alone; 6 paragraphs about 2.4 GB
    ap.add_argument("--paragraphs", type=int, default=6)
    ap.add_argument("--reuse", action="store_true", help="keep an existing quantized artifact in OUT")
    a = ap.parse_args()
    model = a.model or (Path(os.environ["TRTFORGE_GEMMA3_DIR"]) if os.environ.get("TRTFORGE_GEMMA3_DIR") else gemma3_270m())
    a.out.mkdir(parents=True, exist_ok=True)
    q, ck = a.out / f"gemma-{a.recipe}", a.out / f"gemma-{a.recipe}-trtllm"
    text = held_out(a.out, a.paragraphs)
    steps = {}
    if not (a.reuse and (q / "manifest.json").is_file()):
        steps["quantize"] = timed(["trtforge", "quantize", str(a.export), "--recipe", a.recipe, "-o", str(q), "--force",
                                   "--calib", str(DATA / "calib-apache-2.0.txt")])
    steps["export_checkpoint"] = timed(["trtforge", "export-checkpoint", str(q), "-o", str(ck), "--force",
                                        "--reference", str(model), "--text", str(text)])
    m = json.loads((ck / "manifest.json").read_text())
    v, f = m["verification"], m["format"]
    par = v["parity"]
    keep = ("cosine_mean", "top1_agreement", "top5_agreement", "kl_mean", "ppl_reference", "ppl_candidate", "ppl_change_pct")
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "export": str(a.export), "model": str(model), "recipe": a.recipe,
        "steps": steps,
        "checkpoint": {"architecture": json.loads((ck / "config.json").read_text())["architectures"][0],
                       "quant_algo": f["quant_algo"], "dtype": f["dtype"], "tensor_mib": round(f["tensor_bytes"] / 2**20, 1),
                       "files": f["files"]},
        "weights": {k: v["weights"][k] for k in ("linears_quantized", "stored_identical", "served_max_rel_err",
                                                 "float_max_rel_err", "rescaled_by_loader")},
        "fp8_requantized": m["conversion"]["fp8_requantized"],
        "parity": {"data": par["data"], "rows": par["rows"], "tokens": par["tokens"],
                   **{k: {x: par[k][x] for x in keep} for k in ("checkpoint_vs_onnx", "checkpoint_vs_reference",
                                                                "onnx_vs_reference") if k in par}},
        "perplexity_gate": v["perplexity_gate"],
    }
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
