"""Verify a written checkpoint against the ONNX artifact it came from, as a server would read it.

In:  a CheckpointReader of the new checkpoint, the OnnxSource and OnnxArtifact of the quantize
     artifact, optionally the float source model folder and held-out text.
Out: plain dicts for the manifest.
* ``compare_weights``: per Linear, the stored integers / FP8 values against the ONNX artifact's
  (identical or not), and the weight TensorRT-LLM computes with after loading (``ServerLinear``)
  against the ONNX path's dequantized weight (max error relative to max|W|); the scales,
  pre_quant_scale and input_scale; every float tensor against its ONNX initializer. Raises
  ValidationError when an error exceeds what the declared rounding steps allow: that is a bug.
* ``parity``: logits of a fake-quantized PyTorch model built from the checkpoint (dequantized
  weights, x * pre_quant_scale, FP8 activation quantization with input_scale) against ONNX
  Runtime running the quantized ONNX artifact and against the float reference model (weights
  rounded to the checkpoint dtype), on held-out text: cosine, top-1/top-5 agreement, KL and the
  perplexity change (trtforge.metrics).
* ``gate_perplexity``: the perplexity change against the float model must stay within the limit
  (CheckpointOptions.ppl_limit: ``max_ppl_change_pct``, else the precision's default, parity's
  preset); above it the write fails with one line naming the figure and the limit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from trtforge.artifacts import OnnxArtifact
from trtforge.engines.trtllm.onnx_source import OnnxSource
from trtforge.engines.trtllm.reader import CheckpointReader, torch_adapter
from trtforge.errors import InputError, ValidationError
from trtforge.inputs import make_feeds
from trtforge.metrics import logits_metrics, perplexity, row_cosine
from trtforge.ort import session
from trtforge.sample_text import SENTENCES
from trtforge.textdata import load_tokenizer

log = logging.getLogger(__name__)
# Largest relative change one rounding to the checkpoint dtype makes (half an ulp, with margin).
DTYPE_ROUNDING = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-22}
FP8_ROUNDING = 2.0**-4 + 2.0**-7  # half an E4M3 ulp (3 mantissa bits), plus the loader's bf16 step
# The fake-quantized checkpoint and ONNX Runtime compute the same quantized function; below
# this their logits do not describe the same model and the writer is wrong.
MIN_COSINE_VS_ONNX = 0.98


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max(initial=0.0) / max(float(np.abs(b).max(initial=0.0)), 1e-30))


def _as_stored(scale: np.ndarray, shape: tuple) -> np.ndarray:
    """The ONNX scale in the checkpoint's shape: broadcast (per tensor/channel), or INT4 block
    scales repeated where the checkpoint's group is a fraction of the ONNX block (convert._int4)."""
    scale = np.asarray(scale)
    if scale.ndim == 2 and len(shape) == 2 and scale.shape != tuple(shape) and scale.shape[1] and shape[1] % scale.shape[1] == 0:
        scale = np.repeat(scale, shape[1] // scale.shape[1], axis=1)
    return np.broadcast_to(scale, shape)


def compare_weights(reader: CheckpointReader, src: OnnxSource, *, requantized: bool) -> dict:
    dtype = reader.dtype
    rows, floats = [], []
    for s in reader.iter_linears():
        module = s.module
        o = src.linears[module]
        ref = o.dequantized()
        if not s.quantized:
            rows.append({"module": module, "quantized": False, "rel_err": _rel(s.weight, ref)})
            continue
        row = {"module": module, "quantized": True,
               "stored_identical": bool(np.array_equal(s.stored_q, o.q.astype(np.float64))),
               "served_identical": bool(np.array_equal(s.weight, ref)),
               "served_rel_err": _rel(s.weight, ref),
               "scale_rel_err": None if requantized or s.rescaled else _rel(s.scale, _as_stored(o.scale, np.shape(s.scale))),
               "rescaled_by_loader": s.rescaled}
        if s.input_scale is not None and o.act_scale is not None:
            row["input_scale_rel_err"] = abs(s.input_scale - o.act_scale) / o.act_scale
        if s.pre_quant_scale is not None:
            want = o.pre_scale if o.pre_scale is not None else np.ones(o.in_features)
            row["pre_quant_scale_rel_err"] = _rel(s.pre_quant_scale, want)
        rows.append(row)
    for name, arr in reader.float_params().items():
        module, _, leaf = name.rpartition(".")
        lin = src.linears.get(module)
        if lin is not None:
            want = lin.bias if leaf == "bias" else lin.dequantized()
        else:
            want = src.param(module, arr.shape) - reader.norm_offset(name)  # Gemma's norms: the file holds (1 + w) - 1
        floats.append({"tensor": name, "rel_err": _rel(arr, want)})
    q = [r for r in rows if r["quantized"]]
    summary = {
        "quant_algo": reader.quant_algo,
        "linears_quantized": len(q),
        "linears_float": len(rows) - len(q),
        "stored_identical": sum(r["stored_identical"] for r in q),
        "served_identical": sum(r["served_identical"] for r in q),
        "served_max_rel_err": max((r["served_rel_err"] for r in q), default=0.0),
        "rescaled_by_loader": sorted(r["module"] for r in q if r["rescaled_by_loader"]),
        "input_scale_max_rel_err": max((r.get("input_scale_rel_err", 0.0) for r in q), default=0.0),
        "pre_quant_scale_max_rel_err": max((r.get("pre_quant_scale_rel_err", 0.0) for r in q), default=0.0),
        "float_tensors": len(floats) + len(rows) - len(q),
        "float_max_rel_err": max([r["rel_err"] for r in floats] + [r["rel_err"] for r in rows if not r["quantized"]],
                                 default=0.0),
        "what": "stored = the file's integers/FP8 values vs the ONNX initializers; served = the weight after "
                "TensorRT-LLM's loader (scale casts, fused FP8 re-scaling) vs the ONNX DequantizeLinear, "
                "max error / max|W| per layer",
        "layers": rows,
    }
    _gate(summary, q, dtype, requantized)
    return summary


def _gate(summary: dict, q: list[dict], dtype: str, requantized: bool) -> None:
    algo = summary["quant_algo"]
    rounding = DTYPE_ROUNDING.get(dtype, 2.0**-7)
    problems = []
    if not requantized and summary["stored_identical"] != len(q):
        bad = next(r["module"] for r in q if not r["stored_identical"])
        problems.append(f"{bad} stores other quantized values than the ONNX artifact")
    served_bound = rounding if algo == "W4A16_AWQ" else (FP8_ROUNDING if requantized or summary["rescaled_by_loader"] else 1e-7)
    if summary["served_max_rel_err"] > served_bound:
        problems.append(f"the served weights differ from the ONNX artifact's by {summary['served_max_rel_err']:.2e} "
                        f"(bound {served_bound:.2e})")
    if summary["input_scale_max_rel_err"] > 1e-6:
        problems.append(f"input_scale differs by {summary['input_scale_max_rel_err']:.2e}")
    if summary["pre_quant_scale_max_rel_err"] > rounding or summary["float_max_rel_err"] > rounding:
        problems.append(f"float tensors differ by {max(summary['pre_quant_scale_max_rel_err'], summary['float_max_rel_err']):.2e}"
                        f" (bound {rounding:.2e} for {dtype})")
    if problems:
        raise ValidationError(f"the checkpoint does not match the ONNX artifact: {problems[0]}",
                              "this is a trtforge bug; report it with both manifests")


# --------------------------------------------------------------------------- parity


def held_out_rows(art: OnnxArtifact, text: Path | None, max_samples: int) -> tuple[list[np.ndarray], str]:
    """Token rows (one text each, unpadded) and a description of where they came from."""
    if text is not None:
        try:
            texts = [ln.strip() for ln in Path(text).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read held-out text {text}: {exc}", "pass a UTF-8 text file, one sample per line") from None
        if not texts:
            raise InputError(f"held-out text {text} is empty", "pass a UTF-8 text file, one sample per line")
        what = f"{Path(text).name} ({min(len(texts), max_samples)} lines)"
    else:
        texts, what = list(SENTENCES), f"trtforge's built-in held-out sentences ({min(len(SENTENCES), max_samples)})"
    texts = texts[:max_samples]
    dims = art.manifest.dims
    limit = min(int(dims.max_positions or 128), 128)
    tok = load_tokenizer(art.path)
    if tok is None:
        rng = np.random.default_rng(0)
        return [rng.integers(0, int(dims.vocab_size), 24) for _ in texts], "random token ids (no tokenizer in the artifact)"
    rows = [np.asarray(tok(t)["input_ids"][:limit], np.int64) for t in texts]
    return [r for r in rows if r.size >= 2], what


def onnx_logits(art: OnnxArtifact, rows: list[np.ndarray]) -> list[np.ndarray]:
    sess = session(art.model_path)
    names = [i.name for i in sess.get_inputs()]
    f16 = any(i.type == "tensor(float16)" for i in sess.get_inputs())
    out = art.outputs[0].name
    dims = art.manifest.dims
    return [np.asarray(sess.run([out], make_feeds(r.reshape(1, -1), names, dims, np.float16 if f16 else np.float32))[0],
                       np.float32) for r in rows]


def compare_logits(refs: list[np.ndarray], cands: list[np.ndarray], rows: list[np.ndarray]) -> dict:
    lm, _ = logits_metrics(refs, cands, [None] * len(refs))
    ppl = perplexity(refs, cands, [{"input_ids": r.reshape(1, -1)} for r in rows])
    cos = np.concatenate([row_cosine(np.asarray(a, np.float64).reshape(-1, a.shape[-1]),
                                     np.asarray(b, np.float64).reshape(-1, b.shape[-1])) for a, b in zip(refs, cands)])
    return {"rows": lm["num_rows"], "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": lm["top1_agreement"], "top5_agreement": lm["top5_agreement"], "kl_mean": lm["kl_mean"],
            "ppl_reference": ppl["reference"], "ppl_candidate": ppl["candidate"], "ppl_change_pct": ppl["ppl_change_pct"]}


def parity(reader: CheckpointReader, art: OnnxArtifact, *, reference: Path | None, reference_note: str,
           text: Path | None, max_samples: int) -> dict:
    t = torch_adapter()
    rows, data = held_out_rows(art, text, max_samples)
    specs = ((s.module, t.LinearSpec(s.weight, s.bias, s.pre_quant_scale, s.act, s.input_scale))
             for s in reader.iter_linears() if s.quantized)
    model = t.build_model(reader.config, reader.served_float_params(), specs)
    cand = t.logits(model, rows)
    del model
    onnx = onnx_logits(art, rows)
    out: dict = {"data": data, "rows": len(rows), "tokens": int(sum(r.size for r in rows)),
                 "candidate": "fake-quantized PyTorch model built from the checkpoint as TensorRT-LLM loads it (float32 compute)",
                 "checkpoint_vs_onnx": compare_logits(onnx, cand, rows)}
    if reference is not None:
        ref_model = t.load_reference(reference, reader.dtype)
        ref = t.logits(ref_model, rows)
        del ref_model
        out["reference"] = f"{reference} ({reference_note}; weights rounded to {reader.dtype}, float32 compute)"
        out["checkpoint_vs_reference"] = compare_logits(ref, cand, rows)
        out["onnx_vs_reference"] = compare_logits(ref, onnx, rows)
    else:
        out["reference"] = f"skipped: {reference_note}"
    c = out["checkpoint_vs_onnx"]["cosine_mean"]
    if c < MIN_COSINE_VS_ONNX:
        raise ValidationError(f"the checkpoint's fake-quantized model and the ONNX artifact disagree (logits cosine {c:.4f} "
                              f"< {MIN_COSINE_VS_ONNX})", "this is a trtforge bug; report it with both manifests")
    return out


def gate_perplexity(par: dict, precision: str, limit: float, limit_source: str) -> dict:
    """The perplexity gate over ``parity``'s figures; returns its record for the manifest, raises
    ValidationError above the limit. Without a float reference (or with parity off) there is no
    figure to gate: the record says so."""
    c = par.get("checkpoint_vs_reference") or {}
    value = c.get("ppl_change_pct")
    rec: dict = {"metric": "ppl_change_pct", "what": "perplexity increase of the checkpoint over the float model (%)",
                 "limit": limit, "limit_source": limit_source, "value": value}
    if value is None:
        rec["checked"] = False
        rec["why"] = par.get("skipped") or par.get("reference") or "no perplexity figure (not a language model output)"
        return rec
    rec["checked"] = True
    rec["passed"] = bool(value <= limit)  # NaN fails
    if not rec["passed"]:
        suggest = f"{math.ceil(value) + 1}" if math.isfinite(value) else "inf"
        raise ValidationError(
            f"the checkpoint's perplexity vs the float model is {value:+.2f}%, above the {limit:g}% limit for "
            f"{precision} ({limit_source}); no checkpoint was written",
            f"quantize more gently (int4-awq rather than int4-rtn, or exclude the layers 'trtforge parity --per-layer' "
            f"ranks worst), or accept it with --max-ppl-change-pct {suggest} ([checkpoint] max_ppl_change_pct in a run "
            "recipe)")
    return rec
