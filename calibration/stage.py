"""The quantize stage as a command runs it: artifacts in, artifact out (see quantize.py)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from trtforge.artifacts import OnnxArtifact, copy_side_files, sha256_file
from trtforge.calibration.budget import rounding_lever, split_held_out
from trtforge.calibration.budget import search as budget_search
from trtforge.calibration.budget_spec import Measured, check_applies, parse_budget
from trtforge.calibration.collect import ActivationRanges, collect_ranges, model_key
from trtforge.calibration.layerwise import run_by_blocks, wants_layerwise
from trtforge.calibration.methods.base import needs_hessians
from trtforge.calibration.quantize import (
    RANGES_FILE,
    attention_bmm_inputs,
    finish,
    needs_rows,
    prepare,
    watched_tensors,
)
from trtforge.calibration.recipe import QuantRecipe
from trtforge.env import available_bytes
from trtforge.errors import InputError, OptionError, QuantizationError, ValidationError
from trtforge.graph import GraphIndex, describe_io, inline_identity_initializers
from trtforge.inputs import make_feeds
from trtforge.manifest import MANIFEST, ModelDims, ModelFile, QuantizationInfo, TensorInfo, Upstream
from trtforge.onnx_io import (
    DATA_FILE,
    MODEL_FILE,
    DataFile,
    Weights,
    check_onnx,
    has_external_data,
    load_graph,
    load_model,
    needs_external,
    weight_bytes,
    write_model,
)
from trtforge.ort import NO_PREPACKING, calibration_device, graph_session, release_memory, session
from trtforge.sample_text import SENTENCES
from trtforge.stage import StageOutput
from trtforge.textdata import build_samples, load_tokenizer
from trtforge.vocab import Family, Precision

log = logging.getLogger(__name__)
STAGE = "quantize"

__all__ = ["needs_rows", "quantize"]


def quantize(
    export: str | Path | OnnxArtifact,
    recipe: QuantRecipe,
    out: str | Path,
    *,
    calib: list[str | Path] | None = None,
    ranges: str | Path | None = None,
    force: bool = False,
    providers: list[str] | None = None,
) -> OnnxArtifact:
    """``providers``: ONNX Runtime providers for calibration's sessions, in place of the recipe's
    calib_device (the checks of the written model run on the CPU either way)."""
    # before any work: calib_device = cuda where ONNX Runtime has no CUDA provider is an error
    device = calibration_device(recipe.calib_device)
    providers = list(providers or device.providers)
    art = export if isinstance(export, OnnxArtifact) else OnnxArtifact.open(export)
    src = art.manifest
    if src.quantization is not None:
        raise InputError(f"{art.path} is already quantized ({art.precision})", "quantize the export artifact instead")
    if src.stage != "export":
        raise InputError(f"{art.path} is a {src.stage} artifact", "quantize the folder written by 'trtforge export'")
    # not --ranges: quantize --ranges Q/ranges.json -o Q --force re-quantizes from saved ranges
    output = StageOutput(out, stage=STAGE, kind="onnx", force=force,
                         inputs=[art.path, *(("calibration data", Path(p)) for p in (calib or ()) if Path(p).exists())])
    dtype = art.dtype if recipe.dtype == "auto" else recipe.dtype
    if recipe.budget_granularity == "auto":  # on its own, quantize writes for TensorRT: each GEMM alone
        recipe = recipe.replace(budget_granularity="gemm")
    if art.dtype == Precision.FP16 and dtype == Precision.FP32:
        raise InputError("an FP16 export cannot be quantized into an FP32 graph",
                         "export in fp32, or set the recipe's dtype to auto or fp16")
    if not calib and not ranges:
        raise OptionError("no calibration data", "pass calib (text, JSONL or .npz files) or ranges (saved by an earlier quantize)",
                          fields=("calib", "ranges"))
    dims = art.dims
    timings = output.manifest.timings
    budget = parse_budget(recipe.budget) if recipe.budget else None
    if budget is not None:
        check_applies(budget, src.source.task)
        if ranges:
            raise OptionError("a budget is measured on held-out calibration samples, and reused ranges bring none",
                              "pass calib instead of ranges with a budget", fields=("budget", "ranges"))
    held = None

    t = time.perf_counter()
    # The graph without its weights: they stay in the export's files (its external data, or
    # model.onnx itself) and are read tensor by tensor (onnx_io.Weights); nothing below copies
    # or serializes the model with its weights.
    model = load_graph(art.model_path)
    weights = Weights(model, art.path)
    inline_identity_initializers(model, weights)
    idx = GraphIndex(model, weights)
    watched = watched_tensors(model, idx)
    key = model_key(model, watched)
    timings["load_s"] = time.perf_counter() - t
    wbytes = weight_bytes(model)
    if budget is not None:
        _warn_budget_memory(wbytes, budget.text)
    t = time.perf_counter()
    # layer by layer (a model too big to hold whole): calibration and the float checks run a
    # decoder layer at a time, so memory holds one layer's weights, not the model's
    layerwise = has_external_data(model) and wants_layerwise(wbytes)
    if ranges:
        r = ActivationRanges.load(ranges)
        if r.model_key != key:
            raise InputError(f"the ranges in {ranges} were collected on another model",
                             "calibrate this export again instead of reusing these ranges")
        if needs_rows(recipe) and not r.has_samples:
            raise InputError(f"recipe {recipe.name} needs the calibration rows saved beside {ranges}",
                             "keep ranges.samples.npz next to it, or recalibrate")
        if needs_hessians(recipe) and not r.hessians:
            raise InputError(f"recipe {recipe.name} needs the GEMM inputs' Hessians (ranges.hessians.npz beside {ranges}), "
                             "which only a GPTQ recipe's calibration saves",
                             "calibrate again with this recipe (--calib) instead of reusing these ranges")
        samples_info = {**r.calibration, "reused_from": str(Path(ranges).resolve())}
        # no session ran the calibration here: the device that produced the reused ranges
        ran = {"requested": device.requested.value, "reused_ranges": True,
               **{k: r.meta[k] for k in ("device", "providers", "nodes_by_provider") if k in r.meta}}
    else:
        tok = load_tokenizer(art.path)
        mode = recipe.calib_mode if recipe.calib_mode != "auto" else (
            "windows" if src.source.family == Family.DECODER else "sentences")
        samples = build_samples(
            calib, tok, mode=mode, num_samples=recipe.num_samples, seq_len=recipe.seq_len, seed=recipe.seed,
            max_positions=dims.max_positions, vocab_size=dims.vocab_size, text_field=recipe.text_field,
        )
        timings["tokenize_s"] = time.perf_counter() - t
        bmm = set(attention_bmm_inputs(model, idx))
        # a budget whose recipe has a GPTQ rounding lever collects the Hessians in this one pass too
        # (the search tries that lever first; calibration/budget.py)
        wants = needs_hessians(recipe) or (budget is not None and rounding_lever(recipe) is not None)
        hessians = {name for name in watched if name not in bmm} if wants else None
        if budget is not None:  # ranges from one part, the budget measured on the other
            samples, held = split_held_out(samples)
        with output.timed("calibrate_s"):
            r = collect_ranges(model, watched, samples, dims, batch_size=recipe.batch_size,
                               bins=recipe.histogram_bins, keep=recipe.keep_tokens, seed=recipe.seed,
                               providers=providers, per_tensor=bmm, base_dir=art.path, hessians=hessians,
                               layerwise=layerwise)
        samples_info = r.calibration
        ran = {**device.describe(), **{k: r.meta[k] for k in ("device", "providers", "nodes_by_provider") if k in r.meta}}
        log.info("calibration ran on %s (%s)", ran.get("device"), ", ".join(ran.get("providers", [])))
        if held is not None:
            samples_info = {**samples_info, "held_out": {**held.describe(), "use": "budget measurement only, never ranges"}}
    del idx
    # a forced-external export stays external; a big one is external anyway
    external = art.manifest.model.external_data is not None or needs_external(weight_bytes(model))

    checks = _Reference(art, dims, layerwise)
    with output.open() as tmp:
        search = None
        if budget is not None:
            with output.timed("budget_search_s"):
                search = budget_search(art, recipe, r, held, dims, dtype, budget, tmp / "_budget", providers=providers)
            shutil.rmtree(tmp / "_budget", ignore_errors=True)
        plain = recipe
        while True:
            recipe = search.recipe(plain) if search is not None else plain
            data = weights.out = DataFile(tmp / DATA_FILE) if external else None
            try:
                with output.timed("prepare_s"):  # the search's smoothing factors, not searched again
                    prep = prepare(model, recipe, r, dims, weights=weights,
                                   smoothings=search.smoothings if search is not None else None)
                smooth_check = None
                if prep.smoothings:
                    with output.timed("smoothing_check_s"):
                        smooth_check = _check_same_function(art, prep.model, weights, tmp, checks)
                with output.timed("quantize_s"):
                    qmodel, report = finish(prep, dtype=dtype)
                with output.timed("write_s"):
                    write_model(qmodel, tmp / MODEL_FILE, weights, external=external, data=data)
            finally:
                if data is not None:
                    data.close()
            del qmodel, prep, model, weights
            with output.timed("check_s"):
                check_onnx(tmp / MODEL_FILE, stage=STAGE)
                quick = _quick_check(tmp / MODEL_FILE, art, checks)
            if search is None:
                break
            with output.timed("budget_verify_s"):  # the final graph itself, not the search's estimate
                value = search.verify(tmp / MODEL_FILE)
            if budget.met(value):
                log.info("budget %s: the written model measures %s on %d held-out samples (judged by %s)%s", budget.text,
                         budget.show(value), value.samples, ("the point estimate" if value.quantile == 0 else
                         f"the one-sided {100 * recipe.budget_confidence:g}% bound, t = {value.quantile:.3f}")
                         + (" of the expected change (KL)" if value.observed is not None else ""),
                         "" if value.observed is None else
                         f"; the held-out text's own perplexity change {budget.show(Measured(value.observed, value.observed_bound))}")
                report["layers"], report["budget"] = search.records(report)
                break
            if not search.more():
                raise QuantizationError(f"the quantized model measures {budget.metric.name} {budget.show(value)} on "
                                        f"the held-out samples, outside budget {budget.text}, with every group kept",
                                        "this is a trtforge bug; quantize without a budget meanwhile")
            log.warning("budget %s: the written model measures %s; keeping one more group", budget.text, budget.show(value))
            model = load_graph(art.model_path)
            weights = Weights(model, art.path)
            inline_identity_initializers(model, weights)
        if r.hessians and not needs_hessians(recipe):  # kept only for a lever the search did not use
            r.hessians = {}
            r.meta.pop("hessians", None)
        r.save(tmp / RANGES_FILE)
        copy_side_files(art.path, tmp)
        _write_manifest(output, art, tmp, recipe, dtype, external, samples_info, smooth_check, quick, report, ran)
    _log_block_fallbacks(report, recipe)
    log.info("quantized %s with %s: %d GEMMs quantized, %d excluded, in %.1fs; calibration on %s (%s)", art.path.name,
             recipe.name, report["counts"]["quantized"], report["counts"]["excluded"], timings["total_s"],
             ran.get("device", "?"), ", ".join(ran.get("providers", [])) + (", reused ranges" if ranges else ""))
    return OnnxArtifact.open(output.path)


# The budget search's sessions hold each quantized GEMM's float weight beside its dequantized
# copy: 2.49x the FP32 weight bytes on TinyLlama-1.1B's width (docs/benchmarks.md, "The budget
# search at size"); it does not go layer by layer as the plain quantize does.
BUDGET_MEMORY_FACTOR = 2.5


def _warn_budget_memory(weights: int, text: str) -> None:
    """Say before any work when the budget search will likely not fit in the memory available."""
    free = available_bytes()
    need = BUDGET_MEMORY_FACTOR * weights
    if free is not None and need > free:
        log.warning("budget %s: the search needs about %.1f GiB (%.1fx the export's %.1f GiB of weights) and %.1f GiB "
                    "is available; quantize without a budget (it goes layer by layer), or on a machine with more memory",
                    text, need / 2**30, BUDGET_MEMORY_FACTOR, weights / 2**30, free / 2**30)


def _log_block_fallbacks(report: dict, recipe: QuantRecipe) -> None:
    """INT4 GEMMs whose K the recipe's block does not divide got a smaller one: say so (issue 16:
    the mix was silent and only the TensorRT-LLM checkpoint writer noticed)."""
    odd: dict[tuple[int, int], int] = {}
    for n in report["nodes"]:
        if n["status"] == "quantized" and n.get("block_note"):
            odd[(n["k"], n["block_size"])] = odd.get((n["k"], n["block_size"]), 0) + 1
    if odd:
        log.info("INT4 block size %d does not divide every GEMM's input size: %s; a TensorRT-LLM checkpoint of this "
                 "artifact uses group size %d for every layer (export-checkpoint repeats the larger blocks' scales, exactly)",
                 recipe.block_size, ", ".join(f"K={k} uses block {b} ({c} GEMMs)" for (k, b), c in sorted(odd.items())),
                 min(b for _, b in odd))


def _write_manifest(output: StageOutput, art: OnnxArtifact, tmp: Path, recipe: QuantRecipe, dtype: str,
                    external: bool, samples_info: dict, smooth_check: dict | None, quick: dict, report: dict,
                    ran: dict) -> None:
    """Typed sections: source, dims and io (with the quantized graph's inputs/outputs) from the
    export, the model file, the quantization record and the upstream link (twice: top level and,
    as schema 1 has it, under quantization)."""
    src = art.manifest
    m = output.manifest
    m.source, m.dims = src.source, src.dims
    qgraph = load_model(tmp / MODEL_FILE, load_external_data=False)
    m.io = dataclasses.replace(src.io, inputs=_tensors(qgraph.graph.input), outputs=_tensors(qgraph.graph.output))
    m.set("tokenizer", src.section("tokenizer"))
    m.model = ModelFile(
        file=MODEL_FILE,
        external_data=DATA_FILE if external else None,
        opset=next(o.version for o in qgraph.opset_import if o.domain in ("", "ai.onnx")),
        dtype=dtype,
        size_bytes=sum(p.stat().st_size for p in tmp.glob("model.onnx*")),
        extra={"upstream_size_bytes": sum(p.stat().st_size for p in art.path.glob("model.onnx*"))},
    )
    record = dict(report)
    record.pop("precision")  # the typed field
    m.quantization = QuantizationInfo(
        precision=recipe.precision,
        recipe=recipe.to_dict(),
        calibration=samples_info,
        upstream=Upstream(path=str(art.path), sha256=art.sha256, dtype=art.dtype),
        extra={"ranges_file": RANGES_FILE, "smoothing_check": smooth_check, "quick_check": quick,
               "calibration_device": ran, **record},
    )
    m.upstream = Upstream(path=str(art.path), stage=src.stage, model_sha256=art.sha256, dtype=art.dtype,
                          manifest_sha256=sha256_file(art.path / MANIFEST))


def _tensors(values) -> list[TensorInfo]:
    return [TensorInfo(t["name"], t["dtype"], t["shape"]) for t in describe_io(values)]


def _check_cases(art: OnnxArtifact, dims: ModelDims) -> list[dict]:
    """A few held-out real sentences (never calibration text), one per row, unpadded."""
    tok = load_tokenizer(art.path)
    names = [i.name for i in art.inputs]
    float16 = any(i.dtype == "float16" for i in art.inputs)
    cases = []
    for text in SENTENCES[5:9]:
        if tok is not None:
            enc = tok(text)
            ids = np.asarray([enc["input_ids"]], np.int64)
            tt = np.asarray([enc["token_type_ids"]], np.int64) if "token_type_ids" in enc else None
        else:
            ids, tt = np.random.default_rng(len(text)).integers(0, dims.vocab_size, (1, 12)), None
        cases.append(make_feeds(ids, names, dims, np.float16 if float16 else np.float32, tt))
    return cases


def _run(model_or_path, cases: list[dict], base_dir: Path | None = None) -> list[dict[str, np.ndarray]]:
    """Run a model file, or an in-memory graph (``base_dir``: where its external data is)."""
    if isinstance(model_or_path, onnx.ModelProto):
        sess = graph_session(model_or_path, base_dir, config=NO_PREPACKING)
    else:
        sess = session(model_or_path, config=NO_PREPACKING)
    names = [o.name for o in sess.get_outputs()]
    want = {i.name: i.type for i in sess.get_inputs()}

    def adapt(feeds: dict) -> dict:  # the FP16 rest of a quantized FP32 export takes FP16 inputs
        out = {}
        for k, v in feeds.items():
            if v.dtype.kind == "f":
                v = v.astype(np.float16 if want.get(k) == "tensor(float16)" else np.float32)
            out[k] = v
        return out

    outs = [dict(zip(names, sess.run(None, adapt(c)))) for c in cases]
    del sess
    release_memory()  # one model in memory at a time: this one is gone before the next opens
    return outs


class _Reference:
    """The held-out check cases and the export's outputs on them, run once for both checks."""

    def __init__(self, art: OnnxArtifact, dims: ModelDims, layerwise: bool = False) -> None:
        self.art, self.cases, self.layerwise = art, _check_cases(art, dims), layerwise
        self._outputs: list[dict[str, np.ndarray]] | None = None

    def outputs(self) -> list[dict[str, np.ndarray]]:
        if self._outputs is None:
            self._outputs = self.run(self.art.model_path, self.cases)
        return self._outputs

    def run(self, float_model: Path, cases: list[dict]) -> list[dict[str, np.ndarray]]:
        """A float model's outputs: whole, or layer by layer (run_by_blocks) when the stage is."""
        if self.layerwise:
            return run_by_blocks(load_graph(float_model), cases, base_dir=float_model.parent)
        return _run(float_model, cases)


def _check_same_function(art: OnnxArtifact, smoothed: onnx.ModelProto, weights: Weights, tmp: Path,
                         reference: _Reference) -> dict:
    """Smoothing must not change the float function; a difference here is a trtforge bug.

    The smoothed float graph is written to a scratch folder in the output (its rescaled weights
    only; the untouched ones through a hard link of the export's data file) and run after the
    export, one session at a time."""
    cases = reference.cases[:2]
    a = reference.outputs()[:2]
    scratch = tmp / "_smoothed"
    scratch.mkdir()
    try:
        write_model(smoothed, scratch / MODEL_FILE, weights, external=has_external_data(smoothed), link=True)
        b = reference.run(scratch / MODEL_FILE, cases)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    worst = 0.0
    for ra, rb in zip(a, b):
        for k in ra:
            ref = ra[k].astype(np.float64)
            worst = max(worst, float(np.abs(rb[k] - ref).max() / max(np.abs(ref).max(), 1e-6)))
    tol = 1e-3 if art.dtype == Precision.FP32 else 2e-2
    if worst > tol:
        raise ValidationError(
            f"smoothing changed the float model's outputs by {worst:.2e} (relative, tolerance {tol:g})",
            "this is a trtforge bug for this architecture; report it, and quantize without smoothing meanwhile",
        )
    return {"max_rel_err": worst, "tolerance": tol, "cases": len(cases), "layer_by_layer": reference.layerwise}


def _quick_check(qpath: Path, art: OnnxArtifact, reference: _Reference) -> dict:
    """The quantized file loads and runs in ONNX Runtime; rough agreement with the float model
    (the export, run after it: one model in memory at a time)."""
    cases = reference.cases
    try:
        if reference.layerwise:  # the quantized model a layer at a time too (its weights grow with depth)
            qgraph = load_graph(qpath)
            want = {i.name: i.type.tensor_type.elem_type for i in qgraph.graph.input}
            cases = [{k: v.astype(np.float16) if v.dtype.kind == "f" and want.get(k) == onnx.TensorProto.FLOAT16 else v
                      for k, v in c.items()} for c in cases]
            got = run_by_blocks(qgraph, cases, base_dir=qpath.parent, desc="quick check (layer by layer)")
        else:
            got = _run(qpath, cases)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise QuantizationError(f"the quantized model does not run in ONNX Runtime: {str(exc).splitlines()[0]}",
                                "report this with the recipe and the export's manifest") from exc
    ref = reference.outputs()
    out_name = art.outputs[0].name
    cos = []
    for rr, gg in zip(ref, got):
        a = rr[out_name].astype(np.float64).reshape(-1, rr[out_name].shape[-1])
        b = gg[out_name].astype(np.float64).reshape(-1, a.shape[-1])
        if not np.isfinite(b).all():
            raise QuantizationError(f"the quantized model produces non-finite {out_name}", "exclude the failing layers or use another recipe")
        num = (a * b).sum(-1)
        den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        cos += list(num / np.maximum(den, 1e-12))
    return {"output": out_name, "mean_cosine_vs_float": float(np.mean(cos)), "min_cosine_vs_float": float(np.min(cos)),
            "rows": len(cos), "data": "built-in held-out sentences", "layer_by_layer": reference.layerwise}
