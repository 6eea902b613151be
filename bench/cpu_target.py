"""Where does the CPU target's error come from? Per-GEMM comparison of the optimized vs the input model.

    python bench/cpu_target.py QDQ_ARTIFACT [--fp32 EXPORT] [--work DIR] [--json OUT]

For a quantized artifact (e.g. Gemma 3 270M int8-sq / fp8 / int4-awq), without the build's
end-to-end gate in the way:

1. stages and optimizes it exactly as ``trtforge build --target cpu`` does (engines/cpu.py: UINT8
   rewrite, folds, ORT_ENABLE_EXTENDED), with and without the UINT8 weights (U8U8 vs U8S8);
2. **local**: every integer GEMM of the optimized graph on the activations it sees, against exact
   float64 math of its own integers and scales (engines/cpu_gemm.py, what the build checks);
3. **propagated**: every GEMM output of the optimized model against the same tensor of the input
   model (ORT_DISABLE_ALL, plain ONNX semantics), in graph order: where the difference starts and
   how it grows; on the build's synthetic inputs and on held-out text;
4. with ``--fp32``: the float model's logits on the same text, so the optimized model and its
   input are each compared with it (relative RMS, top-1 agreement): is the CPU artifact as close
   to the float model as the Q/DQ graph it was built from?
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, machine  # noqa: E402


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / max(float((b ** 2).mean()), 1e-30)))


def text_feeds(art: Path, manifest: dict, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Held-out text (eval-gpl-3.0.txt) as ``batch`` rows of ``seq`` tokens, other inputs synthetic."""
    from tokenizers import Tokenizer

    from trtforge.engines.feeds import synthetic_feeds

    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    ids = tok.encode(" ".join((DATA / "eval-gpl-3.0.txt").read_text(encoding="utf-8").split())).ids
    rows = np.array([ids[i * seq:(i + 1) * seq] for i in range(batch)], np.int64)
    sizes = {"batch": batch, "sequence": seq, "past_sequence": 0}
    feeds = synthetic_feeds(manifest, sizes, seed=0)
    feeds["input_ids"] = rows
    return feeds


def with_outputs(src: Path, names: list[str], work: Path) -> Path:
    """A copy of the graph at src with ``names`` added as outputs (weights through a hard link)."""
    from trtforge.onnx_io import Weights, load_graph, write_model

    model = load_graph(src)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "exposed.onnx"
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    write_model(model, out, Weights(model, src.parent), external=external, link=True)
    return out


def run(path: Path, feeds: dict, *, runtime=None, level: str | None = None) -> dict[str, np.ndarray]:
    from trtforge.engines.cpu import CpuRuntime, session

    rt = runtime or CpuRuntime({"session.qdq_matmulnbits_accuracy_level": "0"})
    s = session(path, rt, level=level)
    names = [o.name for o in s.get_outputs()]
    out = dict(zip(names, s.run(names, feeds), strict=True))
    del s
    return out


def gemm_outputs(model: onnx.ModelProto) -> list[str]:
    """Outputs of MatMul/Gemm and fused GEMM nodes, graph order."""
    ops = {"MatMul", "Gemm", "MatMulIntegerToFloat", "MatMulNBits", "MatMulInteger"}
    return [n.output[0] for n in model.graph.node if n.op_type in ops]


def optimize(art: Path, work: Path, *, uint8_weights: bool) -> tuple[Path, object, dict]:
    """Stage + optimize as the build does (no gate); the optimized model, its runtime, counts."""
    import trtforge.engines.cpu as cpu
    from trtforge.artifacts import OnnxArtifact
    from trtforge.engines.precision import detect_precision
    from trtforge.engines.profiles import derive_profile
    from trtforge.onnx_io import load_graph

    a = OnnxArtifact.open(art)
    model = load_graph(a.model_path)
    info = detect_precision(a.manifest, model)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    del model
    profile = derive_profile(a.manifest)
    (work / "stage").mkdir(parents=True, exist_ok=True)
    saved = cpu.int8_weights_to_uint8
    if not uint8_weights:
        cpu.int8_weights_to_uint8 = lambda model, weights=None: (model, 0)
    try:
        staged, counts = cpu._stage(a.model_path, a.manifest, work / "stage", info, profile, external=external,
                                    float_weights=set())
    finally:
        cpu.int8_weights_to_uint8 = saved
    runtime = cpu.runtime_for(info)
    dest = work / "opt" / "model.onnx"
    cpu._optimize(staged, dest, runtime, external=external)
    shutil.rmtree(work / "stage", ignore_errors=True)
    return dest, runtime, {"info": info, "profile": profile, **{k: v for k, v in counts.items() if k != "before"}}


def compare(art: Path, fp32: Path | None, work: Path, *, uint8_weights: bool, seq: int) -> dict:
    from trtforge.artifacts import OnnxArtifact
    from trtforge.engines.cpu import _self_check_sizes
    from trtforge.engines.cpu_gemm import check_gemms, summary
    from trtforge.engines.feeds import synthetic_feeds
    from trtforge.onnx_io import load_graph

    a = OnnxArtifact.open(art)
    t0 = time.perf_counter()
    opt, runtime, counts = optimize(art, work, uint8_weights=uint8_weights)
    from trtforge.engines.cpu import session

    synth = synthetic_feeds(a.manifest, _self_check_sizes(counts["profile"]), seed=1)
    text = text_feeds(art, a.manifest, 2, seq)
    local = check_gemms(opt, lambda p: session(p, runtime), text, work / "gemm")
    res: dict = {"artifact": str(art), "uint8_weights": uint8_weights, "optimize_s": round(time.perf_counter() - t0, 1),
                 "local": summary(local),
                 "local_errors": {r["node"]: r["max_rel_err"] for r in local}}
    ref_names = gemm_outputs(load_graph(a.model_path))
    opt_names = set(gemm_outputs(load_graph(opt)))
    shared = [n for n in ref_names if n in opt_names]
    res["gemm_outputs"] = {"input": len(ref_names), "optimized": len(opt_names), "shared": len(shared)}
    for tag, feeds in (("synthetic", synth), ("text", text)):
        ref = run(with_outputs(a.model_path, shared, work / "ref"), feeds, level="ORT_DISABLE_ALL")
        got = run(with_outputs(opt, shared, work / "got"), feeds, runtime=runtime)
        per = [(n, rel_rms(got[n], ref[n])) for n in shared]
        first = next(((n, e) for n, e in per if e > 1e-4), None)
        res[tag] = {"logits_rel_rms": rel_rms(got["logits"], ref["logits"]),
                    "logits_top1_agreement": float((got["logits"].argmax(-1) == ref["logits"].argmax(-1)).mean()),
                    "first_gemm_over_1e-4": first, "per_gemm_rel_rms": per}
        if fp32 is not None and tag == "text":
            f = run(fp32 / "model.onnx", feeds, level="ORT_DISABLE_ALL")["logits"]
            res["vs_fp32"] = {side: {"logits_rel_rms": rel_rms(x, f),
                                     "top1_agreement": float((x.argmax(-1) == f.argmax(-1)).mean())}
                              for side, x in (("input_qdq", ref["logits"]), ("optimized", got["logits"]))}
            del f
        del ref, got
        shutil.rmtree(work / "ref", ignore_errors=True)
        shutil.rmtree(work / "got", ignore_errors=True)
    shutil.rmtree(work / "opt", ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--fp32", type=Path, help="the FP32 export the artifact was quantized from")
    ap.add_argument("--work", type=Path, default=Path("bench/out/cpu-target"))
    ap.add_argument("--seq", type=int, default=32, help="tokens per row of held-out text (2 rows)")
    ap.add_argument("--u8s8", action="store_true", help="also the signed-weight (U8S8) variant")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "variants": []}
    for u8 in (True, False) if a.u8s8 else (True,):
        r = compare(a.artifact, a.fp32, a.work / ("u8u8" if u8 else "u8s8"), uint8_weights=u8, seq=a.seq)
        out["variants"].append(r)
        brief = {k: r[k] for k in ("uint8_weights", "gemm_outputs")}
        brief["local_worst"] = r["local"]["worst"] and {k: r["local"]["worst"][k] for k in ("node", "max_rel_err")}
        brief["local_failed"] = len(r["local"]["failed"])
        for tag in ("synthetic", "text"):
            brief[tag] = {k: r[tag][k] for k in ("logits_rel_rms", "logits_top1_agreement", "first_gemm_over_1e-4")}
        brief["vs_fp32"] = r.get("vs_fp32")
        print(json.dumps(brief, indent=1), flush=True)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
