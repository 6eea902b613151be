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


def _fail(r: dict) -> str | None:
    for k, what in (("skipped", "skipped"), ("error", "failed"), ("eval_error", "quantized; evaluation failed")):
        if k in r:
            return f"{what}: {r[k][:160]}"
    return None


def _cpu(r: dict) -> str:
    return f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else ""


def _call(r: dict) -> str:
    c = r.get("call") or {}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in c.items())


def _ratios(rows: list[dict], ratios: list[dict]) -> list[str]:
    if not ratios:
        return []
    out = ["Time and memory of trtforge over each other tool of the same precision, same run (below 1: trtforge "
           "faster / smaller):", "", "| trtforge | other tool | wall time ratio | CPU time ratio | peak RSS ratio |", "|---|---|---|---|---|"]
    for x in ratios:
        note = "" if x.get("same_invocation", True) else " (separate invocations)"
        cpu = f"{x['cpu_ratio']:.2f}x" if x.get("cpu_ratio") else ""
        out.append(f"| {x['trtforge']} | {x['baseline']}{note} | {x['time_ratio']:.2f}x | {cpu} | {x['rss_ratio']:.2f}x |")
    return out + [""]


def _calls(rows: list[dict]) -> list[str]:
    out = ["<details><summary>Exact call of each tool</summary>", "", "| method | call |", "|---|---|"]
    for r in rows:
        if r.get("call"):
            out.append(f"| {r['method']} | `{_call(r)}` |")
    return out + ["", "</details>", ""]


def quantize_section(q: dict) -> str:
    out = ["## Quantization quality, time, memory and size", "",
           "Written by `python bench/quantize.py` (then `python bench/render.py`). Every method runs in its own "
           "process; time and peak RSS (VmHWM) are that process's, including library imports, on a shared machine "
           "(the load average at the start is given: other jobs ran beside it, so absolute times are high; the "
           "ratios compare runs of the same session).", ""]
    if "gemma3" in q:
        g = q["gemma3"]
        m = q["machine"]["gemma3"]
        c = g["calibration"]
        out += ["### Gemma 3 270M (decoder, real weights)", "",
                f"Machine: {_machine(m)}, load average at start {m.get('load_average_at_start', ['?'])[0]:.1f}. "
                f"Model: {g['model']['source']} ({g['model']['params_note']}), the FP32 `causal-lm` export every tool "
                f"reads. Evaluation: {g['evaluation']}. Calibration (every tool, the same): {c['samples']} windows of "
                f"{c['tokens_per_sample']} tokens of {' + '.join(c['files'])} (trtforge's windows, seed 0). "
                f"Scope for the other tools: the {g['scope']['quantized_gemms']} weight GEMMs trtforge quantizes; the "
                f"LM head and the attention BMMs ({g['scope']['excluded']} MatMuls) stay in float for every tool.", "",
                "| method | perplexity | change | top-1 vs FP32 | quantize s (wall) | CPU s | peak RSS MiB | file MiB |",
                "|---|---|---|---|---|---|---|---|"]
        for r in g["rows"]:
            f = _fail(r)
            if r["method"] == "FP32":
                out.append(f"| FP32 | {r['ppl']:.3f} | | 1.000 | | | | {r['size_mib']:.0f} |")
            elif f and "ppl" not in r:
                t = f"{r['seconds']:.0f} | {_cpu(r)} | {r['peak_rss_mib']:.0f} | {r['size_mib']:.0f}" if "seconds" in r else (
                    f" | {_cpu(r)} | {r['peak_rss_mib']:.0f} when stopped | " if "peak_rss_mib" in r else " | | ")
                out.append(f"| {r['method']} | {f} | | | {t} |")
            else:
                out.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['top1_agreement']:.3f} | "
                           f"{r['seconds']:.0f} | {_cpu(r)} | {r['peak_rss_mib']:.0f} | {r['size_mib']:.0f} |")
        out.append("")
        out += _ratios(g["rows"], g.get("ratios", [])) + _calls(g["rows"])
    if "minilm" in q:
        m = q["minilm"]
        out += ["### all-MiniLM-L6-v2 (encoder, real weights)", "",
                f"Machine: {_machine(q['machine']['minilm'])}. Calibration: {m['calibration']}; evaluation: "
                f"{m['evaluation']}; metric: cosine similarity of mean-pooled sentence embeddings to the FP32 model. "
                f"FP32 model file {m['fp32_size_mib']:.1f} MiB.", "",
                "| method | mean cos | min cos | quantize s (wall) | CPU s | peak RSS MiB | file MiB |", "|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            f = _fail(r)
            if f and "mean_cos" not in r:
                out.append(f"| {r['method']} | {f} | | | | | |")
            else:
                out.append(f"| {r['method']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['seconds']:.1f} | {_cpu(r)} | "
                           f"{r['peak_rss_mib']:.0f} | {r['size_mib']:.1f} |")
        out.append("")
        out += _ratios(m["rows"], m.get("ratios", [])) + _calls(m["rows"])
    if "toy_decoder" in q:
        d = q["toy_decoder"]
        out += ["### Toy decoder (smoke test only)", "",
                f"`bench/quantize.py --only toy`: the 4-layer LLaMA trained here (`bench/_decoder.py`), {d['evaluation']}. "
                "Its figures say nothing about real models.", "",
                "| method | perplexity | change | top-1 vs FP32 |", "|---|---|---|---|"]
        for r in d["rows"]:
            f = _fail(r)
            if r["method"] == "FP32":
                out.append(f"| FP32 | {r['ppl']:.3f} | | 1.000 |")
            elif f and "ppl" not in r:
                out.append(f"| {r['method']} | {f} | | |")
            else:
                out.append(f"| {r['method']} | {r['ppl']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['top1_agreement']:.3f} |")
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
