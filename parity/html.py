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

from trtforge.parity.decode import PRESENT
from trtforge.parity.gate import condensed_checks, fmt_number, fmt_pair
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
th{background:#f6f8fa;font-weight:600}th.num{text-align:right}
table.kv th{background:none;width:230px;color:#59636e;font-weight:400}
summary{cursor:pointer}summary h2{display:inline-block;margin:0}details>summary{margin:4px 0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
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


def _table(head: list[str], rows: list[list[str]], bad: list[bool] | None = None, num_from: int = 1,
           num_to: int | None = None) -> str:
    """A table; columns ``num_from`` to ``num_to`` (exclusive; None: the last) are numbers,
    right-aligned, their headers too (so each header sits over its column)."""
    def num(j: int) -> bool:
        return j >= num_from and (num_to is None or j < num_to)

    out = ["<table><thead><tr>",
           *(f'<th class="num">{_e(x)}</th>' if num(j) else f"<th>{_e(x)}</th>" for j, x in enumerate(head)),
           "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = ' class="bad"' if bad and bad[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if num(j) else f"<td>{c}</td>" for j, c in enumerate(r))
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv(pairs: list[tuple[str, Any]]) -> str:
    """Label / value rows: no header row (an empty one shows as a grey bar)."""
    rows = "".join(f"<tr><th scope='row'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table class='kv'><tbody>{rows}</tbody></table>"


def _unit(metric: str) -> str:
    return METRICS[metric].unit if metric in METRICS else ""


def _is_cache(name: str) -> bool:
    return name.startswith(PRESENT)


def _check_rows(checks: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in checks:
        unit = _unit(c["metric"])
        if isinstance(c["value"], (int, float)) and isinstance(c["limit"], (int, float)):
            u = (" " + unit) if unit and unit != "%" else unit
            value, limit = (x + u for x in fmt_pair(float(c["value"]), float(c["limit"])))
        else:
            value, limit = _n(c["value"], unit), _n(c["limit"], unit)
        rows.append([_e(c["metric"]), _e(c["scope"]), value, ("≥ " if c["direction"] == "min" else "≤ ") + limit,
                     _n(c["margin"], unit),
                     '<span class="ok">pass</span>' if c["passed"] else '<span class="ko">FAIL</span>'])
    return rows


def render_html(r: dict[str, Any]) -> str:
    """The page, most important first: verdict, headline, failed checks, task metrics (logits,
    perplexity, KL), prompts by category with the worst outputs, then the tensors (the KV cache
    folded into one row), plots, per-layer, data (batches that miss a limit flagged), both
    sides (with the candidate's precision assignment) and the environment; details collapsed."""
    ok = r["passed"]
    ref, cand, data, h = r["reference"], r["candidate"], r["data"], r["headline"]
    title = f"Parity {'PASSED' if ok else 'FAILED'}"
    body = [f'<div class="banner {"pass" if ok else "fail"}"><h1>{"✔" if ok else "✘"} {title}</h1>'
            f"<p>{_e(r['summary'])}</p><p>{_e(cand['precision'])} candidate vs {_e(ref['precision'])} reference · "
            f"{_e(r['task'])} · thresholds <b>{_e(r['thresholds']['name'])}</b> · {_e(r['created_at'])}</p></div><main>"]
    warns = r["warnings"]
    for w in warns[:3]:
        body.append(f'<div class="warn">⚠ {_e(w)}</div>')
    if len(warns) > 3:
        body.append(f"<details class='warn'><summary>{len(warns) - 3} more warnings</summary>"
                    + "".join(f"<p>⚠ {_e(w)}</p>" for w in warns[3:]) + "</details>")

    cards = []
    for key, label, unit in (("top1_agreement", "top-1 agreement", ""), ("kl_mean", "KL mean", "nats"),
                             ("ppl_change_pct", "perplexity change", "%"),
                             ("embedding_cosine_mean", "embedding cosine", "")):
        if key in h:
            cards.append((label, _n(h[key], unit)))
    if h.get("worst_category") is not None:
        cards.append((f"worst category: {h['worst_category']}", _n(h["worst_category_agreement"])))
    if "output" in h:
        cards += [("cosine (" + h["output"] + ")", _n(h["cosine_mean"])), ("SNR (" + h["output"] + ")", _n(h["snr_db"], "dB"))]
    body.append("<section><h2>Headline</h2><div class='cards'>" + "".join(
        f"<div class='card'><div class='k'>{_e(k)}</div><div class='v'>{v}</div></div>" for k, v in cards) + "</div></section>")

    head = ["metric", "where", "value", "limit", "margin", ""]
    short = sorted(condensed_checks(r["checks"]), key=lambda c: c["passed"])
    every = sorted(r["checks"], key=lambda c: c["passed"])
    n_ok = sum(c["passed"] for c in r["checks"])
    body.append(f"<section><h2>Checks ({n_ok}/{len(r['checks'])} passed)</h2>"
                + _table(head, _check_rows(short), [not c["passed"] for c in short], 2, 5)
                + "<p class='muted'>Failures first; one row per metric (metrics measured on every output show the "
                  "output with the least head-room). margin: head-room to the limit (negative: how far it is missed), "
                  "in the metric's unit.</p>"
                + f"<details><summary>all {len(every)} checks</summary>"
                + _table(head, _check_rows(every), [not c["passed"] for c in every], 2, 5) + "</details></section>")

    body.append(_task_metrics(r))
    if r.get("tasks"):
        body.append(_tasks(r["tasks"]))
    body.append(_outputs(r))

    pl = r.get("per_layer")
    if pl:
        body.append(_per_layer(pl))

    if data is not None:
        body.append(_data_section(data))
    for side, d in (("Reference", ref), ("Candidate", cand)):
        body.append(_side(side, d))

    env = r["environment"]
    vers = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    body.append("<section><details><summary><h2>Environment</h2></summary>" + _kv([
        ("platform", env["platform"]), ("CPU", f"{env['cpu']} ({env['cpu_count']} threads)"),
        ("GPUs", ", ".join(env["gpus"]) or "none"), ("ONNX Runtime providers", ", ".join(env["onnxruntime_providers"])),
        ("versions", vers), ("timings (s)", ", ".join(f"{k} {v}" for k, v in r["timings"].items())),
        ("report schema", f"{r['schema']} (version {r['schema_version']})"),
    ]) + "</details></section>")
    body.append("</main>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}: {_e(r['task'])}</title><style>{_CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def _task_metrics(r: dict[str, Any]) -> str:
    """Logits (top-1, top-5, KL), perplexity, embeddings, with the KL / embedding histograms."""
    rows = []
    if r.get("logits"):
        lg = r["logits"]
        rows += [("top-1 agreement", _n(lg["top1_agreement"])), ("top-5 overlap", _n(lg["top5_agreement"])),
                 ("KL mean / p99 / max", f"{_n(lg['kl_mean'])} / {_n(lg['kl_p99'])} / {_n(lg['kl_max'])} nats"),
                 ("rows compared", _n(lg["num_rows"]))]
    if r.get("perplexity"):
        p = r["perplexity"]
        rows += [("perplexity reference → candidate",
                  f"{_n(p['reference'])} → {_n(p['candidate'])} ({_n(p['ppl_change_pct'], '%')})"),
                 ("tokens scored", _n(p["num_tokens"]))]
    if r.get("embeddings"):
        e = r["embeddings"]
        rows += [("embedding cosine mean / min", f"{_n(e['embedding_cosine_mean'])} / {_n(e['embedding_cosine_min'])}"),
                 ("pooling", _e(e["pooling"])), ("sentences", _n(e["num_sentences"]))]
    plots = []
    dist = r["distributions"]
    if "kl" in dist:
        plots.append(histogram_svg(dist["kl"], "logits: KL per row", "KL (nats)", "#bc4c00"))
    if "one_minus_embedding_cosine" in dist:
        plots.append(histogram_svg(dist["one_minus_embedding_cosine"], "sentence embeddings: 1 − cosine",
                                   "1 − cosine", "#1a7f37"))
    if not rows and not plots:
        return ""
    return ("<section><h2>Task metrics</h2>" + (_kv(rows) if rows else "")
            + ("<div class='plots'>" + "".join(f"<div class='plot'>{p}</div>" for p in plots) + "</div>" if plots else "")
            + "</section>")


_OUT_COLS = ["snr_db", "cosine_mean", "cosine_min", "max_abs_err", "mean_abs_err", "p99_abs_err", "rel_err_mean",
             "rel_err_p99", "num_values", "nonfinite_candidate"]


def _outputs(r: dict[str, Any]) -> str:
    """Every output, worst SNR first; the KV cache (``present.*``) folded into one summary row
    (its worst value per column) with the full table and its histograms collapsed."""
    outs = r["outputs"]
    if not outs:
        return ""
    limits = r["thresholds"]["limits"]

    def misses(m: dict[str, Any]) -> bool:
        for k, spec in limits.items():
            v = m.get(k)
            if k in _OUT_COLS and isinstance(v, (int, float)) and (
                    (v < spec["limit"]) if spec["direction"] == "min" else (v > spec["limit"])):
                return True
        return bool(m.get("nonfinite_candidate"))

    def row(label: str, m: dict[str, Any]) -> list[str]:
        return [label, *(_n(m.get(c), "dB" if c == "snr_db" else "") for c in _OUT_COLS)]

    by_snr = sorted(outs.items(), key=lambda kv: kv[1].get("snr_db") if kv[1].get("snr_db") is not None else -1e9)
    main = [(n, m) for n, m in by_snr if not _is_cache(n)]
    cache = [(n, m) for n, m in by_snr if _is_cache(n)]
    rows = [row(f"<code>{_e(n)}</code>", m) for n, m in main]
    bad = [misses(m) for _, m in main]
    if cache:
        worst: dict[str, Any] = {}
        for c in _OUT_COLS:
            vals = [m.get(c) for _, m in cache if isinstance(m.get(c), (int, float))]
            if not vals:
                continue
            higher_is_worse = c not in ("snr_db", "cosine_mean", "cosine_min")
            worst[c] = sum(vals) if c in ("num_values", "nonfinite_candidate") else (max(vals) if higher_is_worse else min(vals))
        n_bad = sum(misses(m) for _, m in cache)
        label = (f"KV cache: {len(cache)} tensors (worst of each; worst SNR <code>{_e(cache[0][0])}</code>"
                 + (f"; <b>{n_bad} miss a limit</b>" if n_bad else "") + ")")
        rows.append(row(label, worst))
        bad.append(n_bad > 0)
    parts = ["<section><h2>Outputs (valid positions only, worst SNR first)</h2>", _table(["output", *_OUT_COLS], rows, bad)]
    if cache:
        parts.append(f"<details><summary>the {len(cache)} KV-cache tensors</summary>"
                     + _table(["output", *_OUT_COLS], [row(f"<code>{_e(n)}</code>", m) for n, m in cache],
                              [misses(m) for _, m in cache]) + "</details>")
    parts.append("<p class='muted'>relative error = |c − r| / max(|r|, floor), floor = 1 % of the reference RMS; "
                 "cosine per row along the last axis; SNR = 10·log10(Σr² / Σ(c − r)²), capped at ±200 dB.</p>")
    dists = r["distributions"].get("outputs", {})

    def plots(names: list[str]) -> str:
        ps = []
        for name in names:
            d = dists.get(name)
            if d:
                ps.append(histogram_svg(d["abs_err"], f"{name}: |candidate − reference|", "absolute error"))
                ps.append(histogram_svg(d["one_minus_cosine"], f"{name}: 1 − cosine per row", "1 − cosine", "#8250df"))
        return "<div class='plots'>" + "".join(f"<div class='plot'>{p}</div>" for p in ps) + "</div>" if ps else ""

    main_plots = plots([n for n, _ in main])
    if main_plots:
        parts.append("<h3>Error distributions</h3>" + main_plots)
    cache_plots = plots([n for n, _ in cache])
    if cache_plots:
        parts.append(f"<details><summary>error distributions of the {len(cache)} KV-cache tensors</summary>"
                     + cache_plots + "</details>")
    parts.append("</section>")
    return "".join(parts)


def _side(side: str, d: dict[str, Any]) -> str:
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
    qd = d.get("quantization")
    if qd:
        pairs.append(("quantization", f"{qd.get('precision')} recipe {qd.get('recipe')}: "
                                      f"{qd.get('quantized_nodes')} GEMMs quantized, {qd.get('excluded_nodes')} excluded"))
    extra = _precision_assignment(qd["precision_assignment"]) if qd and qd.get("precision_assignment") else ""
    return f"<section><h2>{side}</h2>{_kv(pairs)}{extra}</section>"


def share_text(pct: float | None) -> str:
    """A share of the weights: ``70 %``, ``0.4 %`` (small shares keep a decimal)."""
    if pct is None:
        return "n/a"
    return f"{pct:.0f} %" if pct >= 9.5 or pct == 0 else f"{pct:.1f} %"


def _precision_assignment(pa: dict[str, Any]) -> str:
    """The accuracy budget's decision, collapsed: weights per precision, kept layers and why."""
    shares = ", ".join(f"{share_text(e['share_pct'])} {_e(p)}" for p, e in pa["by_precision"].items())
    rows = [[_e(p), _n(e["layers"]), _n(e["weight_bytes"] / 2**20, "MiB"), share_text(e["share_pct"])]
            for p, e in pa["by_precision"].items()]
    n = len(pa["kept"])
    parts = [f"<details><summary>precision assignment: {shares} of the weights; {n} layer{'' if n == 1 else 's'} kept off "
             f"{_e(pa['precision'])}</summary>",
             _table(["precision", "layers", "weights", "share of weights"], rows)]
    b = pa.get("budget")
    if b:
        parts.append("<h3>Accuracy budget</h3>" + _kv([
            ("metric", b.get("metric")), ("limit", _n(b.get("limit"))), ("measured", _n(b.get("measured"))),
            *((("judged by", b["judged_by"]),) if b.get("judged_by") else ()),
            *((("the held-out text's own change", _n(b["observed"])),) if b.get("observed") is not None else ()),
            ("measured with every layer quantized", _n(b.get("measured_all_quantized"))),
            ("held-out samples", _n(b.get("held_out_samples"))),
            ("met", Raw('<span class="ok">yes</span>' if b.get("met") else '<span class="ko">NO</span>')),
            *((("weight rounding (GPTQ, no extra byte)", b["rounding"]["reason"]),)
              if isinstance(b.get("rounding"), dict) and b["rounding"].get("reason") else ())]))
    if pa["kept"]:
        kept = [[f"<code>{_e(x['name'])}</code>", _e(x.get("group") or ""), _e(x.get("precision")), _e(x.get("reason") or ""),
                 _n(x.get("sensitivity")), _n((x.get("weight_bytes") or 0) / 2**20, "MiB")] for x in pa["kept"]]
        parts.append("<h3>Layers kept in higher precision</h3>"
                     + _table(["layer", "group", "precision", "reason", "sensitivity", "weights"], kept, num_from=4))
    parts.append("</details>")
    return "".join(parts)


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
        lim = ", ".join(f"{k} {'≥' if v['direction'] == 'min' else '≤'} {_n(v['limit'], _unit(k))}"
                        for k, v in c["limits"].items())
        rows.append([_e(cat), _n(c["n"]), _n(c["agreement"]), f"[{_n(lo)}, {_n(hi)}]",
                     _n(c["mean_tokens_before_divergence"]), acc, _n(c["accuracy_drop"], "points"),
                     f"{f.get('right_to_wrong', 'n/a')} / {f.get('wrong_to_right', 'n/a')}", _n(c["mcnemar_p"]),
                     _e(lim or "none"), '<span class="ok">pass</span>' if c["passed"] else '<span class="ko">FAIL</span>'])
        bad.append(not c["passed"])
    parts.append(_table(["category", "n", "agreement", "95 % CI", "tokens before divergence", "accuracy ref → cand",
                         "drop", "flips r→w / w→r", "McNemar p", "limits", ""], rows, bad, 1, 9))
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
        shown = shown[:25]
        more = f" (first 25 of {len(flipped) + len(c['diverged']) - len(seen & set(c['diverged']))})" \
            if len(shown) == 25 else ""
        # what changed an answer is shown; prompts that only diverged (no answer, or the same verdict)
        # are collapsed, except in the worst category when nothing flipped there
        open_items = [x for x in shown if x[0] != "diverged"] or (shown[:3] if cat == t["order"][0] else [])
        rest = [x for x in shown if x not in open_items]
        parts.append(f"<h3>{_e(cat)}: flipped and diverging prompts{more}</h3>")
        if open_items:
            parts.append(_prompt_table(open_items, by_index))
        if rest:
            parts.append(f"<details><summary>{len(rest)} {'more ' if open_items else ''}prompts whose continuation "
                         f"diverged</summary>{_prompt_table(rest, by_index)}</details>")
    parts.append("</section>")
    return "".join(parts)


def _prompt_table(items: list[tuple[str, int]], by_index: dict[int, dict[str, Any]]) -> str:
    """Prompts with both continuations side by side, what follows the shared prefix highlighted."""
    head = "".join(f"<th>{x}</th>" for x in ("", "prompt", "reference continuation", "candidate continuation"))
    rows = []
    for what, i in items:
        p = by_index[i]
        answer = f"<br><span class='muted'>answer: {_e(p['answer'])}</span>" if p["answer"] else ""
        rows.append(f"<tr><td>{_e(what)}</td><td class='text'>{_text(p['prompt'])}{answer}</td>"
                    f"<td class='text'>{_continuation(p['reference'], p['common_prefix'], p['agree'])}</td>"
                    f"<td class='text'>{_continuation(p['candidate'], p['common_prefix'], p['agree'])}</td>"
                    f"<td class='num'>{_n(p['tokens_before_divergence'])}</td></tr>")
    return (f"<table><thead><tr>{head}<th class='num'>same tokens</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


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
             ("saved inputs / outputs", f"{data.get('inputs_file')} / "
              + (data.get("outputs_file") or (f"{data['outputs_sample_file']} (a sample; --save-outputs for all)"
                                              if data.get("outputs_sample_file") else "not saved"))),
             ("overlap with calibration", overlap)]
    cases, bad = [], []
    for c in data["cases"]:
        outs = c.get("outputs") or {}
        shown = sorted(outs.items(), key=lambda kv: (_is_cache(kv[0]), kv[1].get("snr_db", 0.0)))[:3]
        missed = c.get("missed_limits") or []
        cases.append([_e(c["name"]), _e(c["padding"]), _n(c["batch"]), _n(c["seq_len"]), _n(c["valid_tokens"]),
                      "<br>".join(_case_figures(k, v) for k, v in shown),
                      "<br>".join(_e(m) for m in missed[:4]) + (f"<br>… {len(missed) - 4} more" if len(missed) > 4 else "")
                      or '<span class="ok">none</span>'])
        bad.append(bool(missed))
    n_bad = sum(bad)
    return ("<section><h2>Data</h2>" + _kv(pairs)
            + f"<h3>Batches{f' ({n_bad} miss a limit on their own)' if n_bad else ''}</h3>"
            + _table(["batch", "padding", "rows", "tokens", "valid tokens", "worst outputs", "limits missed"], cases, bad,
                     num_from=2, num_to=5)
            + "<p class='muted'>Each batch against the output limits (cosine_mean, snr_db, top1_agreement) on its "
              "own: a batch that misses one while the run passes points at the inputs that break the model.</p>"
            + "</section>")


def _case_figures(name: str, v: dict[str, Any]) -> str:
    text = f"{_e(name)}: SNR {_n(v.get('snr_db'), 'dB')}"
    if v.get("cosine_mean") is not None:
        text += f", cosine {_n(v['cosine_mean'])}"
    if v.get("top1_agreement") is not None:
        text += f", top-1 {_n(v['top1_agreement'])}"
    return text + f", max {_n(v.get('max_abs_err'))}"
