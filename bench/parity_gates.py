"""Parity gates from real-model measurements (issue 16): what healthy quantized artifacts of real
models score on the preset metrics, and what a planted fault scores.

Models: Gemma 3 270M (the FP32 ``causal-lm-with-past`` export, ``TRTFORGE_GEMMA3_PAST_DIR`` or
/work/artifacts/gemma3-fp32-past) and all-MiniLM-L6-v2 (exported here from its PyPI package).
Calibration: calib-apache-2.0.txt + calib-mpl-lgpl.txt. Evaluation: eval-gpl-3.0.txt (held out)
and, for decoders, examples/prompts/tasks.jsonl (task agreement per category).
Reference: the FP32 export (ONNX Runtime CPU, both sides).

Candidates: today's presets (int8-sq, fp8, int4-awq) as ``trtforge quantize`` makes them, and
planted faults made from a healthy artifact by editing one initializer of its Q/DQ graph:

* ``wscale8``: one GEMM's weight scale multiplied by 8 (a wrong weight scale: that GEMM's output is
  8x too large);
* ``range8``: one GEMM's activation scale divided by 8 (a wrong range: that input is clipped to an
  eighth of its calibrated range);
* ``wscale4-gate`` (decoders): one MLP's gate_proj weight scale multiplied by 4. Gemma 3 normalizes
  each MLP's output and each head's q/k (RMSNorm is scale-invariant), so a wrong scale on
  down/up/v/o/q/k_proj is divided out; the gate goes through GELU and is not;
* ``zero-up`` (decoders): one MLP's up_proj weight scale set to 0 (its weights dequantize to zero:
  a layer's MLP lost).

``--artifact RECIPE=DIR`` reuses a quantized artifact made elsewhere (of the same reference).

Each candidate's parity run is ``trtforge parity`` in its own process; the figures come from its
report.json. Every candidate is checked against every preset's limits, so the table shows which
presets it passes.

    python bench/parity_gates.py --model gemma3 --recipes int8-sq --out /work/out/reports/gates \
        --json docs/results/parity-gates-gemma3-int8.json        # + faults planted in the first recipe
    python bench/parity_gates.py --model gemma3 --recipes fp8 --faults wscale8 ...
    python bench/parity_gates.py --model minilm --json docs/results/parity-gates-minilm.json
    python bench/parity_gates.py --table docs/results/parity-gates-*.json   # the table of docs/parity.md
    python bench/parity_gates.py --size-of REPORT_DIR    # folder size, outputs.json it would need, page height

Parity runs use 16 texts of at most 64 tokens in batches of 1 and 4 (--num-samples, --max-len,
--batch-sizes): a 262k-vocabulary model's logits in float64 otherwise take the run past 6 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, machine, minilm_dir  # noqa: E402,I001

PROMPTS = REPO / "examples" / "prompts" / "tasks.jsonl"
CALIB = [DATA / "calib-apache-2.0.txt", DATA / "calib-mpl-lgpl.txt"]
EVAL = DATA / "eval-gpl-3.0.txt"
RECIPES = ("int8-sq", "fp8", "int4-awq")
# the GEMM a fault is planted in: an MLP projection in the middle of the network
FAULT_NODE = {"gemma3": "layers.9/mlp/down_proj", "minilm": "layer.3/output/dense"}
# fault -> (GEMM per model, which scale, factor)
FAULTS = {
    "wscale8": (FAULT_NODE, "weight", 8.0),
    "range8": (FAULT_NODE, "activation", 1 / 8),
    "wscale4-gate": ({"gemma3": "layers.9/mlp/gate_proj"}, "weight", 4.0),
    "zero-up": ({"gemma3": "layers.9/mlp/up_proj"}, "weight", 0.0),
}


def sh(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run cmd, its output in log; (exit code, seconds, peak RSS of the child in MiB)."""
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB %M", *cmd], stdout=f, stderr=subprocess.STDOUT)
    rss = next((int(line.split()[1]) / 1024 for line in log.read_text().splitlines() if line.startswith("PEAK_RSS_KB")), 0.0)
    return p.returncode, time.perf_counter() - t, rss


def fp32_export(model: str, out: Path) -> Path:
    if model == "gemma3":
        return Path(os.environ.get("TRTFORGE_GEMMA3_PAST_DIR", "/work/artifacts/gemma3-fp32-past"))
    dst = out / "minilm-fp32"
    if not (dst / "manifest.json").exists():
        rc, _, _ = sh(["trtforge", "export", str(minilm_dir()), "-o", str(dst), "--force"], out / "minilm-fp32.log")
        assert rc == 0, (out / "minilm-fp32.log").read_text()[-2000:]
    return dst


def quantize(src: Path, recipe: str, dst: Path) -> dict:
    if (dst / "manifest.json").exists():
        return {"reused": True}
    cmd = ["trtforge", "quantize", str(src), "--recipe", recipe, "-o", str(dst), "--force"]
    for c in CALIB:
        cmd += ["--calib", str(c)]
    rc, s, rss = sh(cmd, dst.with_suffix(".log"))
    if rc != 0:
        raise SystemExit(f"quantize {recipe} failed: {dst.with_suffix('.log').read_text()[-2000:]}")
    return {"seconds": round(s, 1), "peak_rss_mib": round(rss)}


def plant_fault(src: Path, dst: Path, kind: str, node_part: str) -> dict:
    """A copy of the quantized artifact src with one scale of one GEMM changed (module docstring).
    Only model.onnx is rewritten (scales are small initializers in it); other files are hard links."""
    import onnx
    from onnx import numpy_helper

    from trtforge.artifacts import file_table, sha256_file

    if (dst / "manifest.json").exists():
        return json.loads((dst / "fault.json").read_text())
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    target = None
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm") and node_part in n.name:
            target = n
            break
    if target is None:
        raise SystemExit(f"no GEMM named like {node_part!r} in {src}")
    # weight side: the DequantizeLinear whose data input is an initializer; activation side: the
    # DequantizeLinear fed by a QuantizeLinear of a graph tensor
    dq_w = dq_a = None
    for inp in target.input:
        p = producers.get(inp)
        while p is not None and p.op_type not in ("DequantizeLinear",):
            p = producers.get(p.input[0]) if p.op_type in ("Transpose", "Reshape", "Cast") else None
        if p is None:
            continue
        if p.input[0] in inits:
            dq_w = p
        elif producers.get(p.input[0]) is not None and producers[p.input[0]].op_type == "QuantizeLinear":
            dq_a = p
    if kind not in FAULTS:
        raise SystemExit(f"unknown fault {kind}; choose from {', '.join(FAULTS)}")
    _, side, factor = FAULTS[kind]
    if side == "weight":
        if dq_w is None:
            raise SystemExit(f"{target.name} has no quantized weight")
        names = [dq_w.input[1]]
    else:
        if dq_a is None:
            raise SystemExit(f"{target.name} has no quantized activation (weight-only recipe)")
        q = producers[dq_a.input[0]]
        names = sorted({q.input[1], dq_a.input[1]})
    from trtforge.onnx_io import Weights

    weights = Weights(model, src)  # a scale may sit in the external data file
    for name in names:
        t = inits[name]
        arr = weights.array(t)
        t.CopyFrom(numpy_helper.from_array((arr * factor).astype(arr.dtype), name))
    onnx.save(model, str(tmp / "model.onnx"))
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.onnx", "manifest.json"):
            os.link(f, tmp / f.name)
    man = json.loads((src / "manifest.json").read_text())
    man["files"] = file_table(tmp)
    if isinstance(man.get("model"), dict) and "sha256" in man["model"]:
        man["model"]["sha256"] = sha256_file(tmp / "model.onnx")
    man["planted_fault"] = {"kind": kind, "node": target.name, "initializers": names, "factor": factor}
    info = {"kind": kind, "node": target.name, "initializers": names, "factor": factor}
    (tmp / "fault.json").write_text(json.dumps(info))
    man["files"] = file_table(tmp)
    (tmp / "manifest.json").write_text(json.dumps(man, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return info


def parity(ref: Path, cand: Path, out: Path, decoder: bool, a: argparse.Namespace, *, prompts: bool = True,
           save_outputs: bool = False) -> dict:
    rep = out / "report.json"
    cmd = ["trtforge", "parity", "--reference", str(ref), "--candidate", str(cand), "--data", str(EVAL),
           "-o", str(out), "--force", "--json", "--num-samples", str(a.num_samples), "--max-len", str(a.max_len),
           "--batch-sizes", a.batch_sizes]
    if decoder and prompts:
        cmd += ["--prompts", str(PROMPTS)]
    if save_outputs:
        cmd.append("--save-outputs")
    rc, s, rss = sh(cmd, out.with_suffix(".log"))
    if not rep.exists():
        raise SystemExit(f"parity failed ({rc}): {out.with_suffix('.log').read_text()[-2000:]}")
    r = json.loads(rep.read_text())
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"exit_code": rc, "seconds": round(s, 1), "peak_rss_mib": round(rss), "report_bytes": size,
            "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
            "html_height_px": html_height(out / "report.html"), "figures": figures(r)}


def html_height(path: Path) -> int | None:
    """The page's height in px at 1280 px wide, in headless Chromium (None without it): the
    document's scrollHeight, written into the title of a copy (in a temporary folder) and read
    back with --dump-dom."""
    import re
    import tempfile

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(path.read_text(encoding="utf-8").replace(
            "</body>", "<script>document.title='H='+document.documentElement.scrollHeight</script></body>"),
            encoding="utf-8")
        p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                            "--disable-background-networking", f"--user-data-dir={tmp}/profile", "--window-size=1280,1000",
                            "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"<title>H=(\d+)</title>", p.stdout)
    return int(m.group(1)) if m else None


BEFORE = "cc77eba"  # the last commit with the old report layout (issue 16)


def html_before_after(report_dir: Path) -> dict:
    """The page's height (px at 1280 wide) and size as report.html is rendered now and as commit
    BEFORE rendered the same report.json (its parity/html.py, loaded from git)."""
    import importlib.util
    import tempfile

    r = json.loads((report_dir / "report.json").read_text())
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:parity/html.py"], capture_output=True, text=True,
                         check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        mod_path = Path(tmp) / "html_before.py"
        mod_path.write_text(src)
        spec = importlib.util.spec_from_file_location("html_before", mod_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        old = Path(tmp) / "report-before.html"
        old.write_text(mod.render_html(r), encoding="utf-8")
        new = report_dir / "report.html"
        return {"before": {"html_bytes": old.stat().st_size, "height_px": html_height(old), "svgs": old.read_text().count("<svg")},
                "after": {"html_bytes": new.stat().st_size, "height_px": html_height(new), "svgs": new.read_text().count("<svg"),
                          "svgs_outside_details": _svgs_outside_details(new.read_text())}}


def _svgs_outside_details(html: str) -> int:
    """Histograms a reader sees without opening a collapsed section."""
    import re

    depth, n = 0, 0
    for m in re.finditer(r"<details|</details>|<svg", html):
        tag = m.group(0)
        depth += 1 if tag == "<details" else -1 if tag == "</details>" else 0
        n += tag == "<svg" and depth == 0
    return n


def full_outputs_bytes(report_dir: Path) -> dict:
    """What outputs.json (--save-outputs) would hold for this report's batches: both models' outputs,
    float32, base64 in Polygraphy's JSON (4/3 of the raw bytes). Measured directly it cannot be on
    this machine: the run that writes it is killed at 10.6-11 GB RSS for Gemma 3 270M."""
    r = json.loads((report_dir / "report.json").read_text())
    man = json.loads((Path(r["reference"]["path"]) / "manifest.json").read_text())
    dims = man["dims"]
    vocab = r["logits"]["vocab_size"] if r.get("logits") else dims["hidden_size"]
    kv = any(n.startswith("present.") for n in r["outputs"])
    values = 0
    for c in r["data"]["cases"]:
        rows = c["batch"] * c["seq_len"]
        values += rows * vocab
        if kv:  # prefill: present.* holds [batch, kv_heads, seq, head_dim] per layer, key and value
            values += 2 * dims["num_layers"] * c["batch"] * dims["num_kv_heads"] * c["seq_len"] * dims["head_dim"]
    raw = 2 * 4 * values  # two runners, float32
    return {"values_per_runner": values, "raw_bytes": raw, "json_bytes_estimate": int(raw * 4 / 3)}


def figures(r: dict) -> dict:
    """The preset metrics of a report (the worst output for per-output metrics)."""
    out: dict = {}
    outs = r["outputs"]
    primary = "logits" if "logits" in outs else "last_hidden_state"
    for k in ("cosine_mean", "cosine_min", "snr_db"):
        out[k] = min(m[k] for m in outs.values())
        out[f"{primary}_{k}"] = outs[primary][k]
    if r.get("logits"):
        for k in ("top1_agreement", "top5_agreement", "kl_mean"):
            out[k] = r["logits"][k]
    if r.get("perplexity"):
        out["ppl_change_pct"] = r["perplexity"]["ppl_change_pct"]
        out["ppl_reference"] = r["perplexity"]["reference"]
    if r.get("embeddings"):
        out["embedding_cosine_mean"] = r["embeddings"]["embedding_cosine_mean"]
        out["embedding_cosine_min"] = r["embeddings"]["embedding_cosine_min"]
    if r.get("tasks"):
        cats = r["tasks"]["categories"]
        out["task_agreement"] = min(c["agreement"] for c in cats.values())
        out["task_agreement_by_category"] = {k: c["agreement"] for k, c in cats.items()}
        drops = [c["accuracy_drop"] for c in cats.values() if c["accuracy_drop"] is not None]
        out["task_accuracy_drop"] = max(drops) if drops else None
        out["task_accuracy_drop_by_category"] = {k: c["accuracy_drop"] for k, c in cats.items()}
    out["gate"] = {"thresholds": r["thresholds"]["name"], "passed": r["passed"],
                   "failures": [f["message"] for f in r["failures"]]}
    return out


def verdicts(fig: dict) -> dict:
    """Which presets' limits these figures meet (each preset's own metrics)."""
    from trtforge.parity.gate import NOT_ON_LOGITS
    from trtforge.parity.options import METRICS, Direction, Preset, Thresholds

    res = {}
    for p in Preset:
        limits = Thresholds.preset(p).limits
        missed = []
        for k, lim in limits.items():
            v = fig.get(k)
            if v is None:
                continue
            if k in NOT_ON_LOGITS and "logits_cosine_mean" in fig and fig.get(f"logits_{k}") == v:
                continue  # the gate reports it on a decoder's logits but does not gate it (parity/gate.py)
            ok = v >= lim if METRICS[k].direction == Direction.MIN else v <= lim
            if not ok:
                missed.append(k)
        res[p.value] = {"passed": not missed, "missed": missed}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("gemma3", "minilm"))
    ap.add_argument("--out", type=Path, default=Path("/work/out/reports/gates"))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--faults", default="wscale8,range8", help="faults planted in the first recipe's artifact")
    ap.add_argument("--num-samples", type=int, default=None, help="default 16 (MiniLM), 8 (Gemma 3)")
    ap.add_argument("--max-len", type=int, default=None, help="default 64 (MiniLM), 48 (Gemma 3)")
    ap.add_argument("--artifact", action="append", default=[], metavar="RECIPE=DIR",
                    help="reuse this quantized artifact for RECIPE instead of quantizing (repeatable)")
    ap.add_argument("--fault-layer", type=int, help="the layer faults are planted in (default 9 Gemma 3, 3 MiniLM)")
    ap.add_argument("--no-prompts", action="store_true", help="decoders: no task prompts (logits metrics only)")
    ap.add_argument("--batch-sizes", default="1,4", help="parity's --batch-sizes (1,4 keeps a 262k-vocab run under 6 GB)")
    ap.add_argument("--reference", type=Path, help="the FP32 export (default: the model's, module docstring)")
    ap.add_argument("--size-of", type=Path, help="only report a report folder's size and page before/after, then exit")
    ap.add_argument("--table", type=Path, nargs="+", help="print the evidence table of these result files, then exit")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return
    if a.size_of:
        files = {p.name: p.stat().st_size for p in sorted(a.size_of.iterdir()) if p.is_file()}
        res = {"report_dir": str(a.size_of), "files": files, "report_bytes": sum(files.values()),
               "full_outputs": full_outputs_bytes(a.size_of), "html": html_before_after(a.size_of), "machine": machine()}
        res["before_bytes_estimate"] = res["report_bytes"] - files.get("outputs-sample.npz", 0) \
            + res["full_outputs"]["json_bytes_estimate"]
        text = json.dumps(res, indent=2)
        print(text)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(text + "\n")
        return
    if a.model is None:
        ap.error("--model is required (unless --table or --size-of)")
    # a 262k-vocabulary decoder: 16 texts of 64 tokens were killed at 7.1 GB on this machine
    a.num_samples = a.num_samples or (8 if a.model == "gemma3" else 16)
    a.max_len = a.max_len or (48 if a.model == "gemma3" else 64)
    given = dict(x.split("=", 1) for x in a.artifact)
    out = a.out / a.model
    out.mkdir(parents=True, exist_ok=True)
    decoder = a.model == "gemma3"
    ref = a.reference or fp32_export(a.model, out)
    rows: list[dict] = []
    recipes = [r for r in a.recipes.split(",") if r]
    for recipe in recipes:
        q = Path(given[recipe]) if recipe in given else out / f"q-{recipe}"
        cands: list[tuple[str, Path, dict]] = [(recipe, q, {"quantize": {"reused": str(q)} if recipe in given
                                                            else quantize(ref, recipe, q)})]
        if recipe == recipes[0]:
            for fault in [f for f in a.faults.split(",") if f]:
                f = out / f"q-{recipe}-{fault}"
                try:
                    node = FAULTS.get(fault, ({},))[0].get(a.model, "")
                    if a.fault_layer is not None:
                        node = node.replace("layers.9/", f"layers.{a.fault_layer}/").replace("layer.3/", f"layer.{a.fault_layer}/")
                    cands.append((f"{recipe} + {fault}", f, {"fault": plant_fault(q, f, fault, node)}))
                except SystemExit as exc:
                    rows.append({"candidate": f"{recipe} + {fault}", "error": str(exc)})
        for name, cand, extra in cands:
            res = parity(ref, cand, out / f"parity-{name.replace(' + ', '-')}", decoder, a, prompts=not a.no_prompts)
            res.update(extra, candidate=name, verdicts=verdicts(res["figures"]))
            rows.append(res)
            fg = res["figures"]
            print(f"{a.model} {name:24} " + ", ".join(
                f"{k} {fg.get(k):.4g}" for k in ("cosine_mean", "snr_db", "top1_agreement", "kl_mean", "ppl_change_pct",
                                                  "task_agreement", "embedding_cosine_mean") if fg.get(k) is not None),
                flush=True)
            if a.json:
                _write(a, rows, ref)
    if a.json:
        _write(a, rows, ref)


COLUMNS = (("primary_cosine_mean", "cosine (logits / hidden state)"), ("cosine_min", "cosine min (worst output)"),
           ("snr_db", "SNR dB (worst output)"), ("top1_agreement", "top-1"), ("top5_agreement", "top-5"),
           ("kl_mean", "KL nats"), ("ppl_change_pct", "ppl %"), ("task_agreement", "task agreement (worst category)"),
           ("task_accuracy_drop", "accuracy drop pts (worst)"), ("embedding_cosine_mean", "emb. cosine"),
           ("embedding_cosine_min", "emb. cosine min"))


def table(paths: list[Path]) -> str:
    """The evidence table of docs/parity.md from result files: one row per candidate, the preset
    metrics, and the presets whose limits it meets (today's limits, re-evaluated here)."""
    rows = []
    for path in paths:
        res = json.loads(path.read_text())
        for r in res["rows"]:
            if "figures" in r:
                rows.append((f"{res['model']} ({res.get('num_samples')} x {res.get('max_len')})", r))
    used = [(k, h) for k, h in COLUMNS if k == "primary_cosine_mean" or any(r["figures"].get(k) is not None
                                                                         for _, r in rows)]
    out = ["| model (texts x tokens) | candidate | " + " | ".join(h for _, h in used) + " | meets presets |",
           "|---|---|" + "---:|" * len(used) + "---|"]
    for model, r in rows:
        f = {**r["figures"]}
        f["primary_cosine_mean"] = f.get("logits_cosine_mean", f.get("last_hidden_state_cosine_mean"))
        cells = []
        for k, _ in used:
            v = f.get(k)
            cells.append("" if v is None else f"{v:.4f}" if k.endswith(("cosine_mean", "cosine_min")) or k.startswith(
                ("top", "task_agreement")) else f"{v:.3g}")
        meets = ", ".join(p for p, v in verdicts(f).items() if v["passed"]) or "none"
        out.append(f"| {model} | {r['candidate']} | " + " | ".join(cells) + f" | {meets} |")
    return "\n".join(out)


def _write(a: argparse.Namespace, rows: list, ref: Path) -> None:
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"model": a.model, "reference": str(ref), "machine": machine(),
                                  "calibration": [c.name for c in CALIB], "evaluation": EVAL.name,
                                  "prompts": PROMPTS.name if a.model == "gemma3" else None,
                                  "num_samples": a.num_samples, "max_len": a.max_len, "batch_sizes": a.batch_sizes,
                                  "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
