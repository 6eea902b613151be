"""report.html: one self-contained file (inline CSS, inline SVG plots, no scripts, no network).

In:  the report dict (exactly what report.json holds), so the page can be rebuilt from the JSON.
Out: an HTML string: pass/fail banner, headline figures, the checks, per-output metrics, task
     metrics, error-distribution histograms, per-layer ranking, data, how each side was run,
     environment and hashes.

The plots are small hand-written SVG histograms: no plotting library is a dependency, and the
file stays a few tens of kB.
"""

from __future__ import annotations

import html
from typing import Any

from trtforge.parity.gate import condensed_checks, fmt_number
from trtforge.parity.options import METRICS

_CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:0 24px 40px}
.banner{padding:22px 24px;color:#fff;margin:0 0 18px}
.banner.pass{background:#1a7f37}.banner.fail{background:#cf222e}
.banner h1{margin:0 0 4px;font-size:26px}.banner p{margin:0;font-size:15px;opacity:.95}
section{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:14px 18px;margin:0 0 16px}
h2{font-size:17px;margin:0 0 10px}h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #eaeef2;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.bad td{background:#ffebe9}.ok{color:#1a7f37;font-weight:600}.ko{color:#cf222e;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;min-width:130px;background:#fff}
.card .k{font-size:12px;color:#59636e}.card .v{font-size:20px;font-weight:600}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.plot{border:1px solid #eaeef2;border-radius:6px;padding:6px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px;margin:0 0 8px}
.muted{color:#59636e}
td.text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;max-width:380px}
mark{background:#ffd8b5;padding:0}
"""


class Raw(str):
    """Markup built here (already escaped); everything else is escaped on output."""


def _e(x: Any) -> str:
    return x if isinstance(x, Raw) else html.escape(str(x), quote=True)


def _n(x: Any, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        s = str(x) if isinstance(x, int) else fmt_number(float(x))
        return f"{s}{(' ' + unit) if unit and unit != '%' else unit}"
    return _e(x)


def histogram_svg(hist: dict[str, Any], title: str, xlabel: str, color: str = "#0969da") -> str:
    """A histogram of log10 values as inline SVG (zeros = exact matches shown as a note)."""
    w, h, left, right, top, bottom = 380, 190, 46, 10, 26, 38
    pw, ph = w - left - right, h - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{_e(title)}">',
             f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{_e(title)}</text>']
    counts, edges = hist.get("counts") or [], hist.get("edges") or []
    zeros, total = hist.get("zeros", 0), hist.get("total", 0)
    if not counts:
        parts.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" font-size="13" fill="#1a7f37">'
                     f'no error: all {total} values identical</text></svg>')
        return "".join(parts)
    peak = max(counts) or 1
    lo, hi = edges[0], edges[-1]
    bw = pw / len(counts)
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#59636e"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#59636e"/>')
    for i, c in enumerate(counts):
        bh = ph * c / peak
        parts.append(f'<rect x="{left + i * bw + 0.5:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{bh:.1f}" fill="{color}"><title>10^{edges[i]:.2f}..10^{edges[i + 1]:.2f}: {c}</title></rect>')
    step = max(1, round((hi - lo) / 6))
    tick = int(lo)
    while tick <= hi:
        x = left + pw * (tick - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#59636e"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 15}" text-anchor="middle" font-size="10">1e{tick}</text>')
        tick += step
    parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" font-size="10">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + ph}" text-anchor="end" font-size="10">0</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 6}" text-anchor="middle" font-size="11" fill="#59636e">'
                 f'{_e(xlabel)} (log scale){f"; exact: {zeros}" if zeros else ""}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(items: list[tuple[str, float]], title: str, unit: str = "%") -> str:
    """Horizontal bars (per-layer error shares)."""
    rows = items[:15]
    w, row_h, left, top = 760, 20, 330, 26
    h = top + row_h * len(rows) + 10
    peak = max((v for _, v in rows), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
             f'aria-label="{_e(title)}"><text x="8" y="16" font-size="13" font-weight="600">{_e(title)}</text>']
    for i, (label, v) in enumerate(rows):
        y = top + i * row_h
        bw = (w - left - 70) * max(v, 0.0) / peak
        short = label if len(label) <= 48 else "…" + label[-47:]
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end" font-size="11">{_e(short)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{bw:.1f}" height="{row_h - 6}" fill="#bf3989"/>')
        parts.append(f'<text x="{left + bw + 4:.1f}" y="{y + 14}" font-size="11">{v:.1f}{_e(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(head: list[str], rows: list[list[str]], bad: list[bool] | None = None, num_from: int = 1) -> str:
    out = ["<table><thead><tr>", *(f"<th>{_e(x)}</th>" for x in head), "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = ' class="bad"' if bad and bad[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if j >= num_from else f"<td>{c}</td>" for j, c in enumerate(r))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[_e(k), _e(v)] for k, v in pairs], num_from=99)


def render_html(r: dict[str, Any]) -> str:
    ok = r["passed"]
    ref, cand, data, h = r["reference"], r["candidate"], r["data"], r["headline"]
    title = f"Parity {'PASSED' if ok else 'FAILED'}"
    body = [f'<div class="banner {"pass" if ok else "fail"}"><h1>{"✔" if ok else "✘"} {title}</h1>'
            f"<p>{_e(r['summary'])}</p><p>{_e(cand['precision'])} candidate vs {_e(ref['precision'])} reference · "
            f"{_e(r['task'])} · thresholds <b>{_e(r['thresholds']['name'])}</b> · {_e(r['created_at'])}</p></div><main>"]
    for w in r["warnings"]:
        body.append(f'<div class="warn">⚠ {_e(w)}</div>')

    cards = [("cosine (" + h["output"] + ")", _n(h["cosine_mean"])), ("SNR", _n(h["snr_db"], "dB")),
             ("max abs error", _n(h["max_abs_err"]))] if "output" in h else []
    if h.get("worst_category") is not None:
        cards.append((f"worst category: {h['worst_category']}", _n(h["worst_category_agreement"])))
    for key, label, unit in (("top1_agreement", "top-1 agreement", ""), ("kl_mean", "KL mean", "nats"),
                             ("ppl_change_pct", "perplexity change", "%"),
                             ("embedding_cosine_mean", "embedding cosine", "")):
        if key in h:
            cards.append((label, _n(h[key], unit)))
    body.append("<section><h2>Headline</h2><div class='cards'>" + "".join(
        f"<div class='card'><div class='k'>{_e(k)}</div><div class='v'>{v}</div></div>" for k, v in cards) + "</div></section>")

    def check_rows(checks: list[dict[str, Any]]) -> list[list[str]]:
        return [[_e(c["metric"]), _e(c["scope"]),
                 _n(c["value"], METRICS[c["metric"]].unit if c["metric"] in METRICS else ""),
                 ("≥ " if c["direction"] == "min" else "≤ ") + _n(c["limit"]), _n(c["margin"]),
                 '<span class="ok">pass</span>' if c["passed"] else '<span class="ko">FAIL</span>'] for c in checks]

    head = ["metric", "where", "value", "limit", "margin", ""]
    short = sorted(condensed_checks(r["checks"]), key=lambda c: c["passed"])
    every = sorted(r["checks"], key=lambda c: c["passed"])
    n_ok = sum(c["passed"] for c in r["checks"])
    body.append(f"<section><h2>Checks ({n_ok}/{len(r['checks'])} passed)</h2>"
                + _table(head, check_rows(short), [not c["passed"] for c in short], 2)
                + "<p class='muted'>One row per metric; metrics measured on every output show the output with the "
                  "least head-room. margin: head-room to the limit (negative: how far it is missed).</p>"
                + f"<details><summary>all {len(every)} checks</summary>"
                + _table(head, check_rows(every), [not c["passed"] for c in every], 2) + "</details></section>")

    if r.get("tasks"):
        body.append(_tasks(r["tasks"]))

    cols = ["max_abs_err", "mean_abs_err", "p99_abs_err", "rel_err_mean", "rel_err_p99", "cosine_mean", "cosine_min",
            "snr_db", "num_values", "nonfinite_candidate"]
    rows = [[f"<code>{_e(name)}</code>", *(_n(m.get(c)) for c in cols)] for name, m in r["outputs"].items()]
    if rows:
        body.append("<section><h2>Every output (valid positions only)</h2>"
                    + _table(["output", *cols], rows)
                    + "<p class='muted'>relative error = |c − r| / max(|r|, floor), floor = 1 % of the reference RMS; "
                      "cosine per row along the last axis; SNR = 10·log10(Σr² / Σ(c − r)²), capped at ±200 dB.</p></section>")

    task_rows = []
    if r.get("logits"):
        lg = r["logits"]
        task_rows += [("top-1 agreement", _n(lg["top1_agreement"])), ("top-5 overlap", _n(lg["top5_agreement"])),
                      ("KL mean / p99 / max (nats)", f"{_n(lg['kl_mean'])} / {_n(lg['kl_p99'])} / {_n(lg['kl_max'])}"),
                      ("rows compared", _n(lg["num_rows"]))]
    if r.get("perplexity"):
        p = r["perplexity"]
        task_rows += [("perplexity reference → candidate",
                       f"{_n(p['reference'])} → {_n(p['candidate'])} ({_n(p['ppl_change_pct'], '%')})"),
                      ("tokens scored", _n(p["num_tokens"]))]
    if r.get("embeddings"):
        e = r["embeddings"]
        task_rows += [("embedding cosine mean / min", f"{_n(e['embedding_cosine_mean'])} / {_n(e['embedding_cosine_min'])}"),
                      ("pooling", _e(e["pooling"])), ("sentences", _n(e["num_sentences"]))]
    if task_rows:
        body.append("<section><h2>Task metrics</h2>" + _table(["metric", "value"], [[_e(k), v] for k, v in task_rows])
                    + "</section>")

    plots = []
    for name, d in r["distributions"].get("outputs", {}).items():
        plots.append(histogram_svg(d["abs_err"], f"{name}: |candidate − reference|", "absolute error"))
        plots.append(histogram_svg(d["one_minus_cosine"], f"{name}: 1 − cosine per row", "1 − cosine", "#8250df"))
    if "kl" in r["distributions"]:
        plots.append(histogram_svg(r["distributions"]["kl"], "logits: KL per row", "KL (nats)", "#bc4c00"))
    if "one_minus_embedding_cosine" in r["distributions"]:
        plots.append(histogram_svg(r["distributions"]["one_minus_embedding_cosine"], "sentence embeddings: 1 − cosine",
                                   "1 − cosine", "#1a7f37"))
    if plots:
        body.append("<section><h2>Error distributions</h2><div class='plots'>"
                    + "".join(f"<div class='plot'>{p}</div>" for p in plots) + "</div></section>")

    pl = r.get("per_layer")
    if pl:
        body.append(_per_layer(pl))

    if data is not None:
        body.append(_data_section(data))
    for side, d in (("Reference", ref), ("Candidate", cand)):
        rt = d["runtime"]
        pairs = [("path", d["path"]), ("kind / stage", f"{d['kind']} / {d['stage']}"), ("precision", d["precision"]),
                 ("model sha256", Raw(f"<code>{_e(d['model_sha256'])}</code>")),
                 ("manifest sha256", Raw(f"<code>{_e(d['manifest_sha256'])}</code>")),
                 ("runner", rt.get("runner")), ("runtime", ", ".join(rt.get("providers", [])) or rt.get("engine"))]
        for k in ("model_dtype", "graph_optimization_level", "tensorrt", "gpu", "note"):
            if rt.get(k):
                pairs.append((k.replace("_", " "), rt[k]))
        if rt.get("session_config"):
            pairs.append(("session config", ", ".join(f"{k}={v}" for k, v in rt["session_config"].items())))
        ex = rt.get("execution") or {}
        if ex.get("summary") or ex.get("reason"):
            pairs.append(("how it was computed", ex.get("summary") or f"not analysed: {ex.get('reason')}"))
        if d.get("quantization"):
            qd = d["quantization"]
            pairs.append(("quantization", f"{qd.get('precision')} recipe {qd.get('recipe')}: "
                                          f"{qd.get('quantized_nodes')} GEMMs quantized, {qd.get('excluded_nodes')} excluded"))
        body.append(f"<section><h2>{side}</h2>{_kv(pairs)}</section>")

    env = r["environment"]
    vers = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    body.append("<section><h2>Environment</h2>" + _kv([
        ("platform", env["platform"]), ("CPU", f"{env['cpu']} ({env['cpu_count']} threads)"),
        ("GPUs", ", ".join(env["gpus"]) or "none"), ("ONNX Runtime providers", ", ".join(env["onnxruntime_providers"])),
        ("versions", vers), ("timings (s)", ", ".join(f"{k} {v}" for k, v in r["timings"].items())),
        ("report schema", f"{r['schema']} (version {r['schema_version']})"),
    ]) + "</section>")
    body.append("</main>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}: {_e(r['task'])}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def _per_layer(pl: dict[str, Any]) -> str:
    layers = pl.get("layers") or []
    parts = [f"<section><h2>Per-layer error ({_e(pl.get('method', ''))})</h2>"]
    if pl.get("note"):
        parts.append(f"<p class='muted'>{_e(pl['note'])}</p>")
    tr = pl.get("task_ranking")
    if tr:
        parts.append(f"<h3>By agreement on <b>{_e(tr['category'])}</b> ({_n(tr['num_prompts'])} prompts; "
                     f"{'chosen' if tr.get('chosen') else 'the worst category'})</h3>")
        parts.append(f"<p>float baseline agreement {_n(tr['baseline_agreement'])}, candidate "
                     f"{_n(tr['candidate_agreement'])}. <span class='muted'>{_e(tr.get('rule', ''))}</span></p>")
        if tr.get("note"):
            parts.append(f"<p class='muted'>{_e(tr['note'])}</p>")
        rows = [[str(x["rank"]), f"<code>{_e(x['node'])}</code>", _n(x["agreement"]), _n(x["agreement_lost"]),
                 _n(x["mean_tokens_before_divergence"]), _n(x["tokens_lost"])] for x in tr["layers"][:30]]
        if rows:
            parts.append(_table(["rank", "node", "agreement alone", "agreement lost", "tokens before divergence",
                                 "tokens lost"], rows, num_from=2))
    if layers:
        parts.append(bars_svg([(x["node"], x["share_pct"]) for x in layers], "share of the candidate's output error"))
        rows = [[str(x["rank"]), f"<code>{_e(x['node'])}</code>", f"<code>{_e(x.get('weight') or '')}</code>",
                 _n(x["share_pct"], "%"), _n(x["snr_db"], "dB"), _n(x.get("kl_mean")), _n(x["cosine_mean"])]
                for x in layers]
        parts.append(_table(["rank", "node", "weight", "share", "SNR alone", "KL alone", "cosine alone"], rows, num_from=3))
        ex = pl.get("suggested_exclusions") or []
        parts.append("<p><b>Suggested exclusions:</b> " + (", ".join(f"<code>{_e(n)}</code>" for n in ex) or "none")
                     + f" <span class='muted'>{_e(pl.get('suggestion_rule', ''))}</span></p>")
    parts.append("</section>")
    return "".join(parts)


def _text(text: str) -> str:
    """Model or prompt text, escaped, line breaks kept and shown."""
    return _e(text).replace("\n", "<span class='muted'>↵</span>\n")


def _continuation(text: str, prefix: str, agree: bool) -> str:
    """The continuation, escaped, with what follows the shared prefix highlighted."""
    if agree or not text.startswith(prefix):
        return _text(text)
    return _text(prefix) + f"<mark>{_text(text[len(prefix):])}</mark>"


def _tasks(t: dict[str, Any]) -> str:
    """Per-category table (worst first) and the prompts that flipped or diverged, side by side."""
    parts = [f"<section><h2>Tasks: {len(t['categories'])} categories, {t['prompts_file']['num_prompts']} prompts, "
             f"{_n(t['max_new_tokens'])} greedy tokens</h2>"]
    rows, bad = [], []
    for cat in t["order"]:
        c = t["categories"][cat]
        lo, hi = c["agreement_ci95"] or (None, None)
        acc = (f"{_n(100 * c['accuracy_reference'])} → {_n(100 * c['accuracy_candidate'])} %"
               if c["accuracy_reference"] is not None else "n/a")
        f = c.get("flips") or {}
        lim = ", ".join(f"{k} {'≥' if v['direction'] == 'min' else '≤'} {_n(v['limit'])}" for k, v in c["limits"].items())
        rows.append([_e(cat), _n(c["n"]), _n(c["agreement"]), f"[{_n(lo)}, {_n(hi)}]",
                     _n(c["mean_tokens_before_divergence"]), acc, _n(c["accuracy_drop"], "points"),
                     f"{f.get('right_to_wrong', 'n/a')} / {f.get('wrong_to_right', 'n/a')}", _n(c["mcnemar_p"]),
                     _e(lim or "none"), '<span class="ok">pass</span>' if c["passed"] else '<span class="ko">FAIL</span>'])
        bad.append(not c["passed"])
    parts.append(_table(["category", "n", "agreement", "95 % CI", "tokens before divergence", "accuracy ref → cand",
                         "drop", "flips r→w / w→r", "McNemar p", "limits", ""], rows, bad))
    notes = [f"<li><b>{_e(cat)}</b>: {_e(t['categories'][cat]['sample_size_note'])}</li>" for cat in t["order"]
             if t["categories"][cat].get("sample_size_note")]
    if notes:
        parts.append("<p class='muted'>Small samples (the gate applies its limits to the estimates):</p><ul class='muted'>"
                     + "".join(notes) + "</ul>")
    parts.append(f"<p class='muted'>agreement: the continuation is token-for-token the reference's; answer rule: "
                 f"{_e(t['answer_rule'])}; McNemar: exact two-sided binomial test on the flips.</p>")
    by_index = {p["index"]: p for p in t["prompts"]}
    for cat in t["order"]:
        c = t["categories"][cat]
        f = c.get("flips") or {}
        flipped = [("right → wrong", i) for i in f.get("right_to_wrong_prompts", [])] + [
            ("wrong → right", i) for i in f.get("wrong_to_right_prompts", [])]
        seen = {i for _, i in flipped}
        shown = flipped + [("diverged", i) for i in c["diverged"] if i not in seen]
        if not shown:
            continue
        rows = []
        for what, i in shown[:25]:
            p = by_index[i]
            answer = f"<br><span class='muted'>answer: {_e(p['answer'])}</span>" if p["answer"] else ""
            rows.append(f"<tr><td>{_e(what)}</td><td class='text'>{_text(p['prompt'])}{answer}</td>"
                        f"<td class='text'>{_continuation(p['reference'], p['common_prefix'], p['agree'])}</td>"
                        f"<td class='text'>{_continuation(p['candidate'], p['common_prefix'], p['agree'])}</td>"
                        f"<td class='num'>{_n(p['tokens_before_divergence'])}</td></tr>")
        more = f" (first 25 of {len(shown)})" if len(shown) > 25 else ""
        head = "".join(f"<th>{x}</th>" for x in ("", "prompt", "reference continuation", "candidate continuation",
                                                 "same tokens"))
        parts.append(f"<h3>{_e(cat)}: flipped and diverging prompts{more}</h3>"
                     f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def _data_section(data: dict[str, Any]) -> str:
    src = "<br>".join(f"<code>{_e(s['path'])}</code> sha256 <code>{_e(s['sha256'])}</code>" for s in data["sources"])
    ov = data.get("overlap") or {}
    if not ov.get("checked"):
        overlap = ov.get("note", "not checked")
    elif ov.get("overlaps"):
        overlap = "OVERLAPS: " + "; ".join(ov["reasons"])
    else:
        overlap = "none found" + (f" ({ov['note']})" if ov.get("note") else "")
    pairs = [("sources", Raw(src)), ("mode / seed", f"{data['mode']} / {data['seed']}"),
             ("texts / tokens", f"{data['num_samples']} / {data['num_tokens']}"),
             ("inputs sha256", Raw(f"<code>{_e(data['feeds_sha256'])}</code>")),
             ("saved inputs / outputs", f"{data.get('inputs_file')} / {data.get('outputs_file')}"),
             ("overlap with calibration", overlap)]
    cases = [[_e(c["name"]), _n(c["batch"]), _n(c["seq_len"]), _e(c["padding"]), _n(c["valid_tokens"]),
              "<br>".join(f"{_e(k)}: max {_n(v['max_abs_err'])}, SNR {_n(v['snr_db'], 'dB')}"
                          for k, v in list((c.get("outputs") or {}).items())[:3])]
             for c in data["cases"]]
    return ("<section><h2>Data</h2>" + _kv(pairs) + "<h3>Batches</h3>"
            + _table(["batch", "rows", "tokens", "padding", "valid tokens", "errors"], cases, num_from=1) + "</section>")
