"""Render docs/results/quantize.json and export.json into docs/benchmarks.md (between markers).

    python bench/render.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
RES = REPO / "docs" / "results"


def _machine(m: dict) -> str:
    return f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, Python {m.get('python')}, {m.get('date')}"


def quantize_section(q: dict) -> str:
    out = ["## Quantization quality, time, memory and size", "",
           "Written by `python bench/quantize.py` (then `python bench/render.py`). Every recipe runs in its own "
           "process; time and peak RSS (VmHWM) are that process's, including library imports.", ""]
    if "minilm" in q:
        m = q["minilm"]
        out += ["### all-MiniLM-L6-v2 (encoder, real weights)", "",
                f"Machine: {_machine(q['machine']['minilm'])}. Calibration: {m['calibration']}; evaluation: "
                f"{m['evaluation']}; metric: cosine similarity of mean-pooled sentence embeddings to the FP32 model. "
                f"FP32 model file {m['fp32_size_mib']:.1f} MiB.", "",
                "| method | mean cos | min cos | quantize s | peak RSS MiB | file MiB |", "|---|---|---|---|---|---|"]
        for r in m["rows"]:
            if "error" in r:
                out.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | |")
            else:
                out.append(f"| {r['method']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['seconds']:.1f} | "
                           f"{r['peak_rss_mib']:.0f} | {r['size_mib']:.1f} |")
        out.append("")
    if "decoder" in q:
        d = q["decoder"]
        mi = d["model"]
        out += ["### A small LLaMA trained here (decoder)", "",
                f"Machine: {_machine(q['machine']['decoder'])}. Model: `bench/_decoder.py`, {mi['params']:,} parameters "
                f"(hidden 320, 4 layers, GQA 5/1, tied embeddings), trained {mi['steps']} steps ({mi['tokens_seen']:,} tokens, "
                f"{mi['seconds']:.0f} s) on {d['corpus']['source']}; final training loss {mi['final_train_loss']:.2f}. "
                f"Evaluation: {d['evaluation']}. Calibration: {d['calibration']}. \"trained+outliers\" is the same function "
                "with four hidden channels scaled 20-60x at every norm output (and the GEMM rows divided), the activation "
                "outliers real LLMs have (`trtforge.testing.tinymodels.inject_outliers`).", ""]
        for variant in ("trained", "trained+outliers"):
            if variant not in d:
                continue
            out += [f"**{variant}**", "", "| method | perplexity | change | top-1 vs FP32 | quantize s | peak RSS MiB | file MiB |",
                    "|---|---|---|---|---|---|---|"]
            for r in d[variant]:
                if "error" in r:
                    out.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | |")
                elif r["method"] == "FP32":
                    out.append(f"| FP32 | {r['ppl']:.3f} | | 1.000 | | | |")
                else:
                    out.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['top1_agreement']:.3f} | "
                               f"{r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['size_mib']:.1f} |")
            out.append("")
    if "calibration_memory" in q:
        c = q["calibration_memory"]
        out += ["### Calibration memory as samples grow", "",
                f"Machine: {_machine(q['machine']['memory'])}. {c['recipe']} on the {c['model']}, one process per run.", "",
                "| samples x tokens | peak RSS MiB | seconds |", "|---|---|---|"]
        for r in c["rows"]:
            out.append(f"| {r['num_samples']} x {r['seq_len']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} |")
        out.append("")
    return "\n".join(out)


def export_section(e: dict) -> str:
    out = ["## Export time and memory", "",
           f"Written by `python bench/export.py`. Machine: {_machine(e['machine'])}. Each export (validation included) "
           "runs in its own process; \"above libraries\" is the peak RSS minus the RSS after importing torch, "
           "transformers, onnx and onnxruntime, in units of the weights' size.", "",
           "| model | dtype | weights MiB | seconds | peak RSS MiB | above libraries | validation error |", "|---|---|---|---|---|---|---|"]
    for r in e["rows"]:
        out.append(f"| {r['model']} | {r['dtype']} | {r['weights_mib']:.0f} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                   f"{r['peak_over_weights']:.2f}x | {r['validation_err']:.1e} |")
    out.append("")
    return "\n".join(out)


def replace_section(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def main() -> int:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if (RES / "quantize.json").exists():
        text = replace_section(text, "quantize", quantize_section(json.loads((RES / "quantize.json").read_text())))
    if (RES / "export.json").exists():
        text = replace_section(text, "export", export_section(json.loads((RES / "export.json").read_text())))
    DOC.write_text(text)
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
