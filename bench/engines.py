"""Build stage benchmark: CPU-target latency and throughput of every precision, side by side.

    python bench/engines.py                      # LLaMA-like 100M model, batch 1 and 8, sequence 128
    python bench/engines.py --preset llama --runs 10 --no-append

In one run: export FP32 and FP16, quantize INT8 (SmoothQuant), FP8 and INT4 weight-only with
``trtforge.calibration.quantize`` (or, where that stage is missing, the test suite's max-calibrated
Q/DQ emulation), build every one with ``--target cpu`` and time them with the session options
each build recorded. Three extra rows run quantize-stage graphs directly: "int8, signed
activations" shows what the UINT8 rewrite buys, "int8, U8S8" what the CPU target's UINT8 weights
(the U8U8 kernel, exact on CPUs without VNNI, where U8S8 saturates) cost in speed, and "int4,
accuracy level 4" what it leaves on the table by keeping INT4 activations in float. Variants are
timed round-robin (one run of each in turn) so a busy machine slows them alike; the median of N runs is reported.
Results are appended to docs/benchmarks.md under "Build stage: CPU target latency". Exit code 1
if the INT8 CPU artifact is not faster than FP32.

A real model (e.g. Gemma 3 270M) instead of a tinymodels preset:

    python bench/engines.py --export /work/artifacts/gemma3-fp32 \
        --artifact int8=Q_INT8 --artifact fp8=Q_FP8 --artifact int4=Q_INT4 --batches 1,4 --runs 7

``--export`` is the FP32 export, each ``--artifact NAME=DIR`` a quantized artifact of it (``trtforge
quantize``) or its CPU build (``trtforge build --target cpu``, used as it is). Every quantized
artifact and the export are built for the CPU target (into ``--work``) unless already built; the
extra rows above are not run (they load a whole model into one ModelProto). Inputs are
synthetic token ids shaped by the export's manifest; the peak RSS of the run is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"
DOC = REPO / "docs" / "benchmarks.md"
HEADING = "## Build stage: CPU target latency"


def machine(threads: int) -> dict:
    from trtforge.env import cpu_name

    cpu = cpu_name()
    import onnxruntime

    try:
        load = round(os.getloadavg()[0], 1)
    except OSError:
        load = None
    from trtforge.engines.cpu import cpu_flags

    flags = cpu_flags()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "onnxruntime": onnxruntime.__version__,
            "int8_flags": ", ".join(flags) if flags else "unknown",
            "python": platform.python_version(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d"),
            "load_avg_1min_at_start": load}


def _helper_quantizer():
    """tests/engines/qdq.py: the quantize stage's output format, max calibration (fallback only)."""
    spec = importlib.util.spec_from_file_location("trtforge_test_qdq", REPO / "tests" / "engines" / "qdq.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_artifacts(preset: str, work: Path, seq: int) -> tuple[dict[str, Path], str]:
    """name -> ONNX artifact folder (exports and quantized), and which quantizer made them."""
    from trtforge.exporter import DType, ExportOptions, Task, export_onnx
    from trtforge.testing.tinymodels import make_model

    src = make_model(preset, work / "model")
    arts = {}
    for dt in ("fp32", "fp16"):
        arts[dt] = export_onnx(src, work / f"export-{dt}", ExportOptions(task=Task("causal-lm"), dtype=DType(dt)),
                               force=True).path
    try:
        from trtforge.calibration import get_preset, quantize
    except ImportError:
        quantize = None
    if quantize is not None:
        for name, recipe in (("int8", "int8-sq"), ("fp8", "fp8"), ("int4", "int4-rtn")):
            r = get_preset(recipe).replace(num_samples=16, seq_len=min(seq, 128))
            arts[name] = quantize(arts["fp32"], r, work / f"q-{name}", calib=[DATA / "calib-apache-2.0.txt"], force=True).path
        return arts, "trtforge.calibration.quantize (int8-sq, fp8, int4-rtn; 16 calibration windows)"
    from trtforge.artifacts import OnnxArtifact

    qdq = _helper_quantizer()
    fp32 = OnnxArtifact.open(arts["fp32"])
    feeds = qdq.llama_feeds(2, min(seq, 128), fp32.manifest["dims"]["vocab_size"], n=4)
    for name, prec in (("int8", "int8"), ("fp8", "fp8"), ("int4", "int4-weight-only")):
        arts[name] = qdq.quantize_artifact(fp32, work / f"q-{name}", prec, feeds).path
    return arts, "tests/engines/qdq.py (max calibration on random tokens; quantize stage not available)"


def sessions(arts: dict[str, Path], work: Path, threads: int) -> dict[str, tuple[object, str]]:
    from trtforge.artifacts import OnnxArtifact
    from trtforge.engines.build import build
    from trtforge.ort import session

    out = {}
    for name, path in arts.items():
        built = build(path, "cpu", work / f"cpu-{name}", force=True)
        rt = built.manifest["runtime"]
        desc = ", ".join(f"{k} {v}" for k, v in built.manifest["build"]["ops_after"].items())
        label = {"fp32": "fp32 (export)", "fp16": "fp16 reference (export)"}.get(name, name)
        out[label] = (session(built.model_path, config=rt["session_config"], optimization=rt["graph_optimization_level"],
                              threads=threads), desc)
        PATHS[label] = built.path
    raw = OnnxArtifact.open(arts["int8"])
    out["int8, signed activations as quantized (no UINT8 rewrite)"] = (
        session(raw.model_path, optimization="ORT_ENABLE_ALL", threads=threads), "ORT online optimization")
    # what the UINT8 weights cost: UINT8 activations only, signed weights (U8S8; saturates without VNNI)
    from trtforge.engines.qdq_u8 import symmetric_int8_to_uint8

    u8s8, _ = symmetric_int8_to_uint8(raw.load())
    out["int8, U8S8 (signed weights; inexact without VNNI, not used)"] = (
        session(u8s8.SerializeToString(), optimization="ORT_ENABLE_ALL", threads=threads), "ORT online optimization")
    del u8s8
    # what the CPU target does not do: MatMulNBits accuracy level 4 (activations quantized to int8)
    raw4 = OnnxArtifact.open(arts["int4"])
    out["int4, accuracy level 4 (W4A8, not used)"] = (
        session(raw4.model_path, optimization="ORT_ENABLE_ALL", threads=threads,
                config={"session.qdq_matmulnbits_accuracy_level": "4"}), "ORT online optimization")
    return out


def real_sessions(export: Path, artifacts: list[str], work: Path, threads: int,
                  int8_lm_head: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Sessions of the CPU builds of a real FP32 export and its quantized artifacts (module docstring);
    each name in ``int8_lm_head`` is built a second time with ``--cpu-lm-head int8``."""
    from trtforge.artifacts import OnnxArtifact
    from trtforge.engines.build import build
    from trtforge.engines.plan import BuildOptions
    from trtforge.ort import session

    arts = {"fp32": export}
    for spec in artifacts:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--artifact {spec!r}: expected NAME=DIR (e.g. int8=out/gemma-int8-sq)")
        arts[name] = Path(path)
    for name in int8_lm_head:
        if name not in arts:
            raise SystemExit(f"--int8-lm-head {name}: no --artifact of that name")
        arts[f"{name} + int8 lm_head"] = arts[name]
    from trtforge.errors import TrtforgeError

    out, made, failed = {}, [], []
    for name, path in arts.items():
        art = OnnxArtifact.open(path)
        lm8 = name.endswith(" + int8 lm_head")
        if art.manifest.get("stage") == "build":
            built = art
        else:
            dest = work / f"cpu-{name.replace(' + int8 lm_head', '-lmh8')}"
            opts = BuildOptions(cpu_lm_head="int8") if lm8 else None
            try:
                built = OnnxArtifact.open(dest) if (dest / "manifest.json").exists() else \
                    build(path, "cpu", dest, opts, force=True)
            except TrtforgeError as exc:  # a build the CPU target refuses is a result too
                print(f"{name}: build --target cpu failed: {exc}", file=sys.stderr, flush=True)
                failed.append(f"{name}: {exc}")
                continue
            made.append(name)
        rt = built.manifest["runtime"]
        b = built.manifest["build"]
        desc = ", ".join(f"{k} {v}" for k, v in b["ops_after"].items())
        fb = ((b.get("int8_gemm") or {}).get("float_fallback")) or []
        if fb:
            desc += f" ({len(fb)} GEMMs fell back to float)"
        q = built.manifest.get("quantization") or {}
        label = "fp32 (export)" if name == "fp32" else name
        if q.get("recipe"):
            base = name.replace(" + int8 lm_head", "")
            label = f"{base} ({q['recipe'] if isinstance(q['recipe'], str) else q['recipe'].get('name', '')})".replace(" ()", "")
            label += " + int8 lm_head" if lm8 else ""
        out[label] = (session(built.model_path, config=rt["session_config"], optimization=rt["graph_optimization_level"],
                              threads=threads), desc)
        PATHS[label] = built.path
    note = f"given artifacts ({', '.join(f'{k}: {v}' for k, v in arts.items())}); built here: {', '.join(made) or 'none'}"
    if failed:
        note += "; NOT BUILT: " + "; ".join(failed)
    return out, note


PATHS: dict[str, Path] = {}  # label -> CPU artifact folder (real-model mode)


def real_feeds(manifest: dict, batch: int, seq: int, past: int = 0) -> dict[str, np.ndarray]:
    from trtforge.engines.feeds import synthetic_feeds

    return synthetic_feeds(manifest, {"batch": batch, "sequence": seq, "past_sequence": past}, seed=batch)


def perplexities(sess: dict) -> dict[str, float]:
    """Perplexity of every (causal-lm) CPU artifact on every <bos> + 255-token window of the held-out
    text (bench/quantize.py's windows), run with the artifact's own session."""
    from budget import _nll
    from quantize import eval_windows

    from trtforge.textdata import load_tokenizer

    wins = eval_windows(load_tokenizer(next(iter(PATHS.values()))), None, 256)
    out = {}
    for label, (s, _) in sess.items():
        names = [i.name for i in s.get_inputs()]
        if any("past" in n for n in names):
            continue
        nll = n = 0
        for w in wins:
            feeds = {"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64),
                     "position_ids": np.arange(len(w), dtype=np.int64)[None]}
            a, c = _nll(s.run(["logits"], {k: feeds[k] for k in names})[0], w[None])
            nll, n = nll + a, n + c
        out[label] = float(np.exp(nll / n))
        print(f"perplexity {label}: {out[label]:.3f} ({len(wins)} windows)", file=sys.stderr, flush=True)
    return out


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def feeds_for(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {"input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1))}


def time_round_robin(sess: dict, feeds: dict, runs: int, warmup: int = 2) -> dict[str, list[float]]:
    for s, _ in sess.values():
        for _ in range(warmup):
            s.run(["logits"], feeds)
    samples: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(runs):
        for name, (s, _) in sess.items():
            t = time.perf_counter()
            s.run(["logits"], feeds)
            samples[name].append((time.perf_counter() - t) * 1000)
    return samples


def table(results: dict, batch: int, seq: int, past: int = 0) -> list[str]:
    base = statistics.median(results["fp32 (export)"])
    lines = [f"batch {batch}, sequence {seq}" + (f" new tokens after {past} past (a decode step)" if past else "") + ":", "",
             "| variant | median ms | p90 ms | sequences/s | tokens/s | vs fp32 |", "|---|---|---|---|---|---|"]
    for name, xs in results.items():
        med = statistics.median(xs)
        p90 = sorted(xs)[int(round(0.9 * (len(xs) - 1)))]
        lines.append(f"| {name} | {med:.1f} | {p90:.1f} | {batch * 1000 / med:.1f} | {batch * seq * 1000 / med:.0f} "
                     f"| {base / med:.2f}x |")
    return lines + [""]


def append_doc(section: list[str]) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    block = "\n".join(section).rstrip() + "\n"
    if HEADING not in text:
        text = text.rstrip() + f"\n\n{HEADING}\n\nWritten by `python bench/engines.py`; newest run last.\n\n" + block
    else:
        start = text.index(HEADING)
        nxt = text.find("\n## ", start + len(HEADING))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:end].rstrip() + "\n\n" + block + ("\n" + text[end:] if nxt >= 0 else "")
    DOC.write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-100m", help="trtforge.testing.tinymodels preset (default llama-100m)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "engines")
    ap.add_argument("--no-append", action="store_true", help="print only; do not touch docs/benchmarks.md")
    ap.add_argument("--export", type=Path, help="a real FP32 export instead of --preset (module docstring)")
    ap.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR",
                    help="with --export: a quantized artifact of it, or its CPU build (repeatable)")
    ap.add_argument("--int8-lm-head", default="", metavar="NAME,...",
                    help="with --export: also build these --artifact names with --cpu-lm-head int8")
    ap.add_argument("--past", type=int, default=0,
                    help="with a causal-lm-with-past --export: time decode steps (--seq new tokens, this many past)")
    ap.add_argument("--perplexity", action="store_true",
                    help="with a causal-lm --export: each artifact's perplexity on examples/data/eval-gpl-3.0.txt")
    args = ap.parse_args()

    mach = machine(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.export is not None:
        if not any(a.startswith("int8=") for a in args.artifact):
            raise SystemExit("--export needs --artifact int8=DIR (the INT8 artifact the verdict is about)")
        sess, quantizer = real_sessions(args.export, args.artifact, args.work, args.threads,
                                        tuple(x for x in args.int8_lm_head.split(",") if x))
        manifest = json.loads((args.export / "manifest.json").read_text())
        title = f"{manifest['source'].get('model_type', args.export.name) if isinstance(manifest.get('source'), dict) else args.export.name} (export {args.export})"
        int8_key = next((k for k in sess if k.startswith("int8")), None)
        if int8_key is None or "fp32 (export)" not in sess:
            print(quantizer, file=sys.stderr)
            return 1
    else:
        arts, quantizer = make_artifacts(args.preset, args.work, args.seq)
        sess = sessions(arts, args.work, args.threads)
        manifest = json.loads((arts["fp32"] / "manifest.json").read_text())
        title, int8_key = args.preset, "int8"
    vocab = manifest["dims"]["vocab_size"]
    lines = [f"### {mach['date']}: {title}, {mach['cpu']} ({mach['int8_flags']}), {mach['cores']} cores, "
             f"{args.threads} threads",
             "", f"ONNX Runtime {mach['onnxruntime']}, Python {mach['python']}, {mach['platform']}; "
             f"1-min load average at start {mach['load_avg_1min_at_start']}. Quantized with {quantizer}. "
             f"Median of {args.runs} runs per variant, timed round-robin after 2 warm-ups.", ""]
    verdict = True
    for b in (int(x) for x in args.batches.split(",")):
        feeds = real_feeds(manifest, b, args.seq, args.past) if args.export is not None else feeds_for(b, args.seq, vocab)
        res = time_round_robin(sess, feeds, args.runs)
        lines += table(res, b, args.seq, args.past)
        faster = statistics.median(res[int8_key]) < statistics.median(res["fp32 (export)"])
        verdict &= faster
    if args.perplexity and args.export is not None:
        ppl = perplexities(sess)
        fp = ppl.get("fp32 (export)")
        lines.append("Perplexity on examples/data/eval-gpl-3.0.txt (every <bos> + 255-token window): " + "; ".join(
            f"{k} {v:.3f}" + (f" ({100 * (v / fp - 1):+.2f}%)" if fp and k != "fp32 (export)" else "")
            for k, v in ppl.items()) + ".")
        lines.append("")
    lines.append("Fused operators per CPU artifact: " + "; ".join(f"{k}: {d}" for k, (_, d) in sess.items()) + ".")
    lines.append("")
    lines.append(f"INT8 CPU artifact faster than FP32 at every batch size: {'yes' if verdict else 'NO'}. "
                 f"(bench wall time {time.time() - t0:.0f} s, peak RSS {peak_rss_mib():.0f} MiB, CPU time "
                 f"{time.process_time():.0f} s)")
    print("\n".join(lines))
    if not args.no_append:
        append_doc(lines)
        print(f"appended to {DOC}", file=sys.stderr)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
