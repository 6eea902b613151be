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

Every preset, both exports (issue 16): ``--quantized DIR`` reuses an artifact made elsewhere
(its recipe and export come from its manifest), ``--fp8-scheme rowwise`` picks TensorRT-LLM's
per-channel FP8, ``--case NAME`` names the row, and ``--merge-into FILE`` adds the row to a JSON
of rows keyed by case (a refusal or a failed gate is a row too, with its ``error:`` line):

    python bench/gemma3_checkpoint.py --quantized Q_FP8_PAST --fp8-scheme rowwise --case past-fp8-rowwise \
        --out /work/out/ck --merge-into docs/results/gemma3-checkpoints.json
    python bench/gemma3_checkpoint.py --table docs/results/gemma3-checkpoints.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, machine  # noqa: E402
from models import gemma3_270m  # noqa: E402

DEFAULT_EXPORT = Path("/work/artifacts/gemma3-fp32")


class StepFailed(Exception):
    def __init__(self, step: dict) -> None:
        super().__init__(step.get("error", ""))
        self.step = step


def timed(cmd: list[str]) -> dict:
    """Run cmd under /usr/bin/time -v; a failure raises StepFailed with its ``error:`` line and figures."""
    cmd = ["/usr/bin/time", "-v", *cmd]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    step = {"command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "peak_rss_mib": round(int(m.group(1)) / 1024) if m else None}
    if p.returncode:
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        step.update(exit_code=p.returncode, error=errors[-1] if errors else p.stderr[-1500:])
        raise StepFailed(step)
    return step


def table(path: Path) -> str:
    """The docs/trtllm.md table of a --merge-into file."""
    rows = json.loads(path.read_text())["cases"]
    out = ["| case | export | recipe | scheme / algo | ONNX vs FP32 ppl | checkpoint vs ONNX (cosine, top-1, ppl) | "
           "checkpoint vs FP32 ppl | gate | wall s, peak MiB |", "|---|---|---|---|---:|---|---:|---|---|"]
    for name, r in rows.items():
        st = r.get("steps", {}).get("export_checkpoint", {})
        cost = f"{st.get('wall_s')}, {st.get('peak_rss_mib')}"
        if "error" in r:
            out.append(f"| {name} | {r.get('task')} | {r.get('recipe')} | {r.get('fp8_scheme') or ''} | | "
                       f"refused: `{r['error'][:160]}` | | | {cost} |")
            continue
        par = r["parity"]
        ov, cv, co = par.get("onnx_vs_reference", {}), par.get("checkpoint_vs_reference", {}), par.get("checkpoint_vs_onnx", {})
        g = r["perplexity_gate"]
        out.append(f"| {name} | {r.get('task')} | {r['recipe']} | {r['checkpoint']['quant_algo']} | "
                   f"{ov.get('ppl_change_pct', float('nan')):+.2f}% | {co.get('cosine_mean', float('nan')):.4f}, "
                   f"{co.get('top1_agreement', float('nan')):.3f}, {co.get('ppl_change_pct', float('nan')):+.2f}% | "
                   f"{cv.get('ppl_change_pct', float('nan')):+.2f}% | {'passed' if g.get('passed') else 'FAILED'} "
                   f"(limit {g.get('limit')}%) | {cost} |")
    return "\n".join(out)


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
    ap.add_argument("--quantized", type=Path, help="use this quantized artifact (no quantize step)")
    ap.add_argument("--fp8-scheme", choices=("tensor", "rowwise"), default=None)
    ap.add_argument("--case", help="the row's name (default: recipe, task and scheme)")
    ap.add_argument("--merge-into", type=Path, help="add this case's row to a JSON of rows keyed by case")
    ap.add_argument("--table", type=Path, help="print the table of a --merge-into file, then exit")
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    q = a.quantized or a.out / f"gemma-{a.recipe}"
    model = a.model or _float_model(q if (q / "manifest.json").is_file() else a.export)
    steps: dict = {}
    if a.quantized is None and not (a.reuse and (q / "manifest.json").is_file()):
        steps["quantize"] = timed(["trtforge", "quantize", str(a.export), "--recipe", a.recipe, "-o", str(q), "--force",
                                   "--calib", str(DATA / "calib-apache-2.0.txt")])
    qm = json.loads((q / "manifest.json").read_text())
    recipe = (qm.get("quantization") or {}).get("recipe")
    recipe = recipe.get("name") if isinstance(recipe, dict) else recipe or a.recipe
    task = (qm.get("source") or {}).get("task") or qm.get("task")
    case = a.case or f"{task}-{recipe}" + (f"-{a.fp8_scheme}" if a.fp8_scheme else "")
    ck = a.out / f"{case}-trtllm"
    text = held_out(a.out, a.paragraphs)
    cmd = ["trtforge", "export-checkpoint", str(q), "-o", str(ck), "--force", "--reference", str(model), "--text", str(text)]
    if a.fp8_scheme:
        cmd += ["--fp8-scheme", a.fp8_scheme]
    head = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "quantized": str(q), "task": task,
            "recipe": recipe, "fp8_scheme": a.fp8_scheme, "paragraphs": a.paragraphs}
    try:
        steps["export_checkpoint"] = timed(cmd)
    except StepFailed as exc:
        steps["export_checkpoint"] = exc.step
        result = {**head, "steps": steps, "error": exc.step["error"]}
        print(json.dumps(result, indent=2))
        _merge(a.merge_into, case, result)
        return
    m = json.loads((ck / "manifest.json").read_text())
    v, f = m["verification"], m["format"]
    par = v["parity"]
    keep = ("cosine_mean", "top1_agreement", "top5_agreement", "kl_mean", "ppl_reference", "ppl_candidate", "ppl_change_pct")
    result = {
        **head,
        "export": str(a.export), "model": str(model),
        "steps": steps,
        "checkpoint": {"architecture": json.loads((ck / "config.json").read_text())["architectures"][0],
                       "quant_algo": f["quant_algo"], "dtype": f["dtype"], "tensor_mib": round(f["tensor_bytes"] / 2**20, 1),
                       "files": f["files"]},
        "weights": {k: v["weights"][k] for k in ("linears_quantized", "stored_identical", "served_max_rel_err",
                                                 "float_max_rel_err", "rescaled_by_loader")},
        "conversion": {k: v for k, v in m["conversion"].items() if k in ("fp8_requantized", "weight_granularity_in_onnx",
                                                                            "notes")},
        "parity": {"data": par["data"], "rows": par["rows"], "tokens": par["tokens"],
                   **{k: {x: par[k][x] for x in keep} for k in ("checkpoint_vs_onnx", "checkpoint_vs_reference",
                                                                "onnx_vs_reference") if k in par}},
        "perplexity_gate": v["perplexity_gate"],
    }
    print(json.dumps(result, indent=2))
    _merge(a.merge_into, case, result)
    shutil.rmtree(ck, ignore_errors=True)  # the figures are kept; the 400 MB checkpoint is not
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _float_model(art: Path) -> Path:
    """The float reference: TRTFORGE_GEMMA3_DIR, else the HF folder the artifact's manifest names
    (a quantized artifact's source is its export's), else bench/models.py's prepared copy. Without
    this a --quantized artifact's checkpoint was compared with bench/models.py's folder, which it
    prepares from a GGUF (Q4_K_M) when TRTFORGE_GEMMA3_DIR is unset: not the weights it was made from."""
    if os.environ.get("TRTFORGE_GEMMA3_DIR"):
        return Path(os.environ["TRTFORGE_GEMMA3_DIR"])
    src = Path((json.loads((art / "manifest.json").read_text()).get("source") or {}).get("path") or "")
    if src.name and (src / "model.safetensors").is_file():
        return src
    return gemma3_270m()


def _merge(path: Path | None, case: str, row: dict) -> None:
    if path is None:
        return
    doc = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    doc["cases"][case] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
