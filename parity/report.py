"""The parity report: report.json (versioned schema), report.md (a PR comment), report.html.

In:  the measured sections, the gate's checks, descriptions of both sides and of the data.
Out: the report dict (validated by ``report.schema.json`` in this package; ``SCHEMA_VERSION``
     changes whenever a field is renamed or removed, not when one is added) and the three files.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtforge.artifacts import library_versions, now_iso, write_json
from trtforge.env import cpu_name, gpus, ort_providers
from trtforge.parity.gate import Check, condensed_checks, failed, fmt_number, fmt_pair
from trtforge.parity.html import render_html, share_text
from trtforge.parity.options import METRICS, ParityOptions, Thresholds
from trtforge.vocab import Task

if TYPE_CHECKING:
    from trtforge.parity.data import EvalData
    from trtforge.parity.models import ModelSide

SCHEMA_VERSION = 1
SCHEMA_ID = "urn:trtforge:schema:parity-report:1"
SCHEMA_FILE = "report.schema.json"
FILES = {"json": "report.json", "html": "report.html", "markdown": "report.md"}


def schema() -> dict[str, Any]:
    """The JSON Schema of report.json (draft 2020-12)."""
    return json.loads(resources.files("trtforge.parity").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def environment() -> dict[str, Any]:
    cpu = cpu_name()
    return {
        "versions": library_versions(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpus": [f"{g.name} (compute capability {g.compute_capability})" for g in gpus()],
        "onnxruntime_providers": ort_providers(),
    }


def headline(task: str, sections: dict[str, Any]) -> dict[str, Any]:
    """The few figures a reviewer looks at first (also what --json prints). A prompts-only run
    (no text data) has only the task figures."""
    h: dict[str, Any] = {}
    if sections["outputs"]:
        primary = "last_hidden_state" if task == Task.FEATURE_EXTRACTION else "logits"
        if primary not in sections["outputs"]:
            primary = next(iter(sections["outputs"]))
        out = sections["outputs"][primary]
        h.update({"output": primary, "cosine_mean": out["cosine_mean"], "snr_db": out["snr_db"],
                  "max_abs_err": out["max_abs_err"]})
    t = sections.get("tasks")
    if t:
        worst = t["worst_category"]
        h["worst_category"] = worst
        if worst is not None:
            w = t["categories"][worst]
            h["worst_category_agreement"] = w["agreement"]
            h["worst_category_accuracy_drop"] = w["accuracy_drop"]
        h["task_agreement_min"] = min((c["agreement"] for c in t["categories"].values()), default=None)
    if sections.get("logits"):
        h.update({k: sections["logits"][k] for k in ("top1_agreement", "top5_agreement", "kl_mean")})
    if sections.get("perplexity"):
        p = sections["perplexity"]
        h.update({"ppl_reference": p["reference"], "ppl_candidate": p["candidate"], "ppl_change_pct": p["ppl_change_pct"]})
    if sections.get("embeddings"):
        h["embedding_cosine_mean"] = sections["embeddings"]["embedding_cosine_mean"]
        h["embedding_cosine_min"] = sections["embeddings"]["embedding_cosine_min"]
    return h


def build_report(
    *, passed: bool, checks: Sequence[Check], thresholds: Thresholds, ref: ModelSide, cand: ModelSide,
    ref_runtime: dict, cand_runtime: dict, data: EvalData, overlap: dict, sections: dict, distributions: dict,
    run_info: dict, options: ParityOptions, warnings: list[str], timings: dict[str, float],
) -> dict[str, Any]:
    """The content of report.json (see report.schema.json)."""
    failures = failed(checks)
    verdict = "pass" if passed else "fail"
    summary = (f"PASS: {len(checks)}/{len(checks)} checks within {thresholds.name} thresholds" if passed else
               f"FAIL: {len(failures)} of {len(checks)} checks outside {thresholds.name} thresholds; first: {failures[0].message}")
    tasks = sections.get("tasks")
    if tasks and not passed and tasks["worst_category"] is not None \
            and not tasks["categories"][tasks["worst_category"]]["passed"]:
        summary += f"; worst category: {tasks['worst_category']}"
    q = cand.quantization
    cand_desc = {**cand.describe(), "runtime": cand_runtime}
    if q:
        cand_desc["quantization"] = {
            "precision": q.precision.value,
            "recipe": q.recipe.get("name") if isinstance(q.recipe, dict) else q.recipe,
            "quantized_nodes": sum(1 for n in q.nodes if n.get("status") == "quantized"),
            "excluded_nodes": sum(1 for n in q.nodes if n.get("status") == "excluded"),
        }
        assignment = precision_assignment(q.precision.value, q.get("layers"), q.get("budget"))
        if assignment is not None:
            cand_desc["quantization"]["precision_assignment"] = assignment
    return {
        "schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
        "created_at": now_iso(),
        "passed": passed,
        "verdict": verdict,
        "summary": summary,
        "task": ref.task.value,
        "headline": headline(ref.task, sections),
        "thresholds": thresholds.to_json(),
        "checks": [c.to_json() for c in checks],
        "failures": [c.to_json() for c in failures],
        "reference": {**ref.describe(), "runtime": ref_runtime},
        "candidate": cand_desc,
        "data": None if data is None else {
            **data.description, "cases": data.cases, "overlap": overlap,
            "inputs_file": run_info["inputs_file"], "outputs_file": run_info["outputs_file"],
            "outputs_sample_file": run_info.get("outputs_sample_file")},
        "outputs": sections["outputs"],
        "logits": sections.get("logits"),
        "perplexity": sections.get("perplexity"),
        "embeddings": sections.get("embeddings"),
        "per_layer": sections.get("per_layer"),
        "tasks": sections.get("tasks"),
        "distributions": distributions,
        "environment": environment(),
        "options": options.to_json(),
        "timings": {k: round(v, 3) for k, v in timings.items()} | {
            f"{k}_inference_s": round(v, 3) for k, v in run_info["inference_s"].items()},
        "warnings": list(dict.fromkeys(warnings)),
        "files": {**FILES, "inputs": run_info["inputs_file"], "outputs": run_info["outputs_file"],
                  "outputs_sample": run_info.get("outputs_sample_file")},
    }


def precision_assignment(precision: str, layers: Any, budget: Any) -> dict[str, Any] | None:
    """What an accuracy budget decided (the quantize manifest's ``quantization.layers`` and
    ``quantization.budget``): the share of weights per precision, the layers kept off the recipe's
    precision with their reason, and the budget. None when the manifest has neither."""
    if not layers and not budget:
        return None
    rows = [x for x in (layers or []) if isinstance(x, dict)]
    total = sum(float(x.get("weight_bytes") or 0) for x in rows)
    by: dict[str, dict[str, Any]] = {}
    for x in rows:
        p = str(x.get("precision"))
        e = by.setdefault(p, {"layers": 0, "weight_bytes": 0})
        e["layers"] += 1
        e["weight_bytes"] += int(x.get("weight_bytes") or 0)
    for e in by.values():
        e["share_pct"] = 100.0 * e["weight_bytes"] / total if total else None
    kept = [{k: x.get(k) for k in ("name", "group", "precision", "sensitivity", "reason", "weight_bytes")}
            for x in rows if str(x.get("precision")) != precision]
    kept.sort(key=lambda x: -(x["sensitivity"] if isinstance(x["sensitivity"], (int, float)) else 0))
    return {"precision": precision, "layers": len(rows), "weight_bytes": int(total),
            "by_precision": dict(sorted(by.items(), key=lambda kv: -kv[1]["weight_bytes"])),
            "kept": kept, "budget": budget if isinstance(budget, dict) else None}


def write_report(folder: Path, content: dict[str, Any]) -> None:
    write_json(folder / FILES["json"], content)
    (folder / FILES["markdown"]).write_text(render_markdown(content), encoding="utf-8")
    (folder / FILES["html"]).write_text(render_html(content), encoding="utf-8")


# --------------------------------------------------------------------------- markdown


def _v(x: Any, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, float)):
        return f"{fmt_number(float(x))}{(' ' + unit) if unit and unit != '%' else unit}"
    return str(x)


def _pair(value: Any, limit: Any, unit: str) -> tuple[str, str]:
    """A check's value and limit with enough digits to tell them apart, with the unit."""
    if not isinstance(value, (int, float)) or not isinstance(limit, (int, float)):
        return _v(value, unit), _v(limit, unit)
    u = (" " + unit) if unit and unit != "%" else unit
    v, lim = fmt_pair(float(value), float(limit))
    return v + u, lim + u


def render_markdown(content: dict[str, Any]) -> str:
    ok = content["passed"]
    h = content["headline"]
    ref, cand, data = content["reference"], content["candidate"], content["data"]
    tasks = content.get("tasks")
    lines = [
        f"### {'✅ Parity PASSED' if ok else '❌ Parity FAILED'} — {cand['precision']} candidate vs "
        f"{ref['precision']} reference ({content['task']}, `{content['thresholds']['name']}` thresholds)",
        "",
        content["summary"],
        "",
        "| metric | where | value | limit | |",
        "|---|---|---:|---:|:-:|",
    ]
    for c in sorted(condensed_checks(content["checks"]), key=lambda c: c["passed"]):
        unit = METRICS[c["metric"]].unit if c["metric"] in METRICS else ""
        op = ">=" if c["direction"] == "min" else "<="
        value, limit = _pair(c["value"], c["limit"], unit)
        lines.append(f"| {c['metric']} | {c['scope']} | {value} | {op} {limit} | "
                     f"{'✅' if c['passed'] else '❌'} |")
    lines.append("")
    if tasks:
        lines += _task_lines(tasks)
    if content.get("perplexity"):
        p = content["perplexity"]
        lines.append(f"Perplexity on {p['num_tokens']} held-out tokens: reference {_v(p['reference'])}, "
                     f"candidate {_v(p['candidate'])} ({_v(p['ppl_change_pct'], '%')} change).")
    if content.get("embeddings"):
        e = content["embeddings"]
        lines.append(f"Mean-pooled embedding cosine over {e['num_sentences']} sentences: mean "
                     f"{_v(e['embedding_cosine_mean'])}, min {_v(e['embedding_cosine_min'])}.")
    if "output" in h:
        lines.append(f"`{h['output']}`: cosine {_v(h['cosine_mean'])}, SNR {_v(h['snr_db'], 'dB')}, "
                     f"max abs error {_v(h['max_abs_err'])}.")
    pa = (cand.get("quantization") or {}).get("precision_assignment")
    if pa:
        shares = ", ".join(f"{share_text(e['share_pct'])} {p}" for p, e in pa["by_precision"].items())
        kept = ", ".join(f"`{x['name']}` ({x['precision']})" for x in pa["kept"][:5])
        n = len(pa["kept"])
        lines.append(f"Precision assignment: {shares} of the weights; {n} layer{'' if n == 1 else 's'} kept off "
                     f"{pa['precision']}{': ' + kept if kept else ''}{' ...' if len(pa['kept']) > 5 else ''}.")
        b = pa.get("budget")
        if b:
            bd = b.get("measured_bound")
            lines.append(f"Accuracy budget: {b.get('metric')} {_v(b.get('measured'))}"
                         + (f" (confidence bound {_v(bd)})" if bd is not None and bd != b.get("measured") else "")
                         + (f", expected from the KL divergence; the held-out text's own {_v(b.get('observed'))}"
                            if b.get("observed") is not None else "")
                         + " against a limit of "
                         f"{_v(b.get('limit'))} ({'met' if b.get('met') else 'NOT met'}; all quantized: "
                         f"{_v(b.get('measured_all_quantized'))}, {b.get('held_out_samples')} held-out samples).")
    pl = content.get("per_layer")
    if pl and pl.get("layers"):
        top = ", ".join(f"`{x['node']}` ({x['share_pct']:.0f} %)" for x in pl["layers"][:3])
        lines.append(f"Largest error contributors: {top}. Suggested exclusions: "
                     + (", ".join(f"`{n}`" for n in pl["suggested_exclusions"]) or "none") + ".")
    lines.append("")
    if data is not None:
        srcs = ", ".join(f"{Path(s['path']).name} ({s['sha256'][:12]})" for s in data["sources"])
        lines.append(f"Data: {data['num_samples']} texts, {data['num_tokens']} tokens in {len(data['cases'])} batches "
                     f"from {srcs}; inputs sha256 {data['feeds_sha256'][:12]}.")
    if tasks:
        pf = tasks["prompts_file"]
        lines.append(f"Prompts: {pf['num_prompts']} in {len(tasks['categories'])} categories from "
                     f"{Path(pf['path']).name} ({pf['sha256'][:12]}), {tasks['max_new_tokens']} greedy tokens each.")
    lines += [
        f"Reference: `{ref['path']}` sha256 {ref['model_sha256'][:12]} — {_runtime_line(ref['runtime'])}.",
        f"Candidate: `{cand['path']}` sha256 {cand['model_sha256'][:12]} — {_runtime_line(cand['runtime'])}.",
    ]
    for w in content["warnings"][:5]:
        lines.append(f"> ⚠️ {w}")
    lines.append("")
    lines.append("Full report: `report.html` (plots, per-output table, environment); machine-readable: `report.json`.")
    return "\n".join(lines) + "\n"


def _task_lines(tasks: dict[str, Any]) -> list[str]:
    """One line per category, worst first (the first eight: the comment stays short)."""
    out = []
    for cat in tasks["order"][:8]:
        c = tasks["categories"][cat]
        lo, hi = c["agreement_ci95"] or (None, None)
        text = (f"- {'✅' if c['passed'] else '❌'} **{cat}** (n={c['n']}): agreement {_v(c['agreement'])} "
                f"[{_v(lo)}, {_v(hi)}], {_v(c['mean_tokens_before_divergence'])} tokens before divergence")
        if c["accuracy_reference"] is not None:
            f = c["flips"]
            text += (f"; accuracy {_v(100 * c['accuracy_reference'])} → {_v(100 * c['accuracy_candidate'])} % "
                     f"({_v(c['accuracy_drop'])} points drop; flips {f['right_to_wrong']} right→wrong, "
                     f"{f['wrong_to_right']} wrong→right; McNemar p = {_v(c['mcnemar_p'])})")
        if c.get("sample_size_note"):
            text += " — small sample"
        out.append(text)
    if len(tasks["order"]) > 8:
        out.append(f"- ... and {len(tasks['order']) - 8} more categories (report.html)")
    return ["Tasks (worst first):", *out, ""]


def _runtime_line(rt: dict[str, Any]) -> str:
    if rt.get("engine") == "tensorrt":
        return f"TensorRT {rt.get('tensorrt')} on {rt.get('gpu')}"
    text = f"ONNX Runtime {', '.join(rt.get('providers', []))}, {rt.get('model_dtype')} graph"
    ex = rt.get("execution") or {}
    if ex.get("fp32_compute_nodes"):
        text += f"; {ex['fp32_compute_nodes']} FP16 ops computed in FP32 via inserted casts"
    if ex.get("quantized_kernels"):
        text += "; integer kernels " + ", ".join(f"{k} x{v}" for k, v in ex["quantized_kernels"].items())
    elif ex.get("qdq_nodes_left"):
        text += "; Q/DQ emulated in float"
    return text
