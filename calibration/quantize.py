"""Quantize stage: export artifact + recipe + calibration data -> Q/DQ ONNX artifact.

In:  an ONNX artifact from ``trtforge export`` (FP32 or FP16), a QuantRecipe, calibration data
     (or saved ranges), an output folder.
Out: ``model.onnx`` with Q/DQ nodes (or INT4 weight-only DequantizeLinear), the tokenizer and
     config files, ``ranges.json`` (+ ``ranges.samples.npz``) for re-use, and ``manifest.json``
     listing every quantized and excluded GEMM with its scales and the reason for exclusion.

The passes are pure functions ``ModelProto -> ModelProto``: ``prepare`` (exclusions, smoothing
or AWQ scales), then ``finish`` (FP16 conversion of the rest, opset, Q/DQ insertion, weight
compression). ``quantize_model`` chains them and is what ``--per-layer`` parity calls.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from trtforge.calibration.awq import awq_clip, awq_scale
from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.patterns import Gemm, Group, find_gemms, find_groups
from trtforge.calibration.qdq import WeightPlan, ensure_opset, insert_activation_qdq, quantize_weights
from trtforge.calibration.recipe import Int4Method, Precision, QuantRecipe
from trtforge.calibration.smoothquant import Smoothing, apply_smoothing, choose_smoothing, weight_kn
from trtforge.calibration.stats import amax_from_rows, choose_amax
from trtforge.errors import QuantizationError
from trtforge.graph import GraphIndex, inline_identity_initializers
from trtforge.numerics import QMAX, block_size_for

log = logging.getLogger(__name__)
RANGES_FILE = "ranges.json"


@dataclass
class Decision:
    gemm: Gemm
    quantize: bool
    reason: str = ""
    block: int | None = None


@dataclass
class Prepared:
    model: onnx.ModelProto  # float, smoothed
    recipe: QuantRecipe
    ranges: ActivationRanges
    decisions: dict[str, Decision]
    groups: list[Group]
    smoothings: dict[str, Smoothing] = field(default_factory=dict)  # by group act
    dtype: str = "fp32"


def attention_bmm_inputs(model: onnx.ModelProto, idx: GraphIndex | None = None) -> dict[str, list[str]]:
    """Inputs of MatMuls whose operands are both activations (Q.K^T and P.V): {tensor: [nodes]}."""
    idx = idx or GraphIndex(model)
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and not any(idx.is_const(i) for i in n.input):
            for i in n.input:
                out.setdefault(i, []).append(n.name)
    return out


def watched_tensors(model: onnx.ModelProto) -> list[str]:
    """Every GEMM activation input and attention BMM input: ranges serve any later recipe."""
    idx = GraphIndex(model)
    names = {g.act for g in find_gemms(model, idx)} | set(attention_bmm_inputs(model, idx))
    return sorted(names)


def _decide(gemms: list[Gemm], recipe: QuantRecipe, only: set[str] | None) -> dict[str, Decision]:
    out = {}
    for g in gemms:
        d = Decision(g, True)
        pat = next((p for p in recipe.exclude if fnmatch.fnmatch(g.node, p) or fnmatch.fnmatch(g.weight, p)), None)
        if pat:
            d.quantize, d.reason = False, f"matches exclude pattern {pat!r}"
        elif only is not None and g.node not in only:
            d.quantize, d.reason = False, "not selected"
        elif recipe.precision == Precision.INT4:
            d.block = block_size_for(g.k, recipe.block_size)
            if d.block is None:
                d.quantize, d.reason = False, f"K={g.k} is not divisible by a block size of 16 or more"
            elif (g.k if g.trans_b else g.n) % 2:
                d.quantize, d.reason = False, "INT4 needs an even last dimension (TensorRT packs two values per byte)"
        out[g.node] = d
    return out


def _stats(ranges: ActivationRanges, name: str):
    st = ranges.tensors.get(name)
    if st is None:
        raise QuantizationError(f"the ranges have no statistics for {name}", "re-run calibration on this export")
    return st


def prepare(
    model: onnx.ModelProto, recipe: QuantRecipe, ranges: ActivationRanges, dims: dict, *, only: set[str] | None = None
) -> Prepared:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the passes edit in place; the caller's model stays untouched
    model = inline_identity_initializers(copy)
    idx = GraphIndex(model)
    gemms = find_gemms(model, idx)
    decisions = _decide(gemms, recipe, only)
    groups = find_groups(model, dims, idx)
    smoothings: dict[str, Smoothing] = {}
    for grp in groups:
        members = [decisions[n] for n in grp.gemms]
        if not any(d.quantize for d in members):
            continue
        st = _stats(ranges, grp.act)
        if recipe.precision in (Precision.INT8, Precision.FP8) and recipe.smoothquant:
            if grp.fold == "gemm" and grp.role == "attn-out" and not recipe.smooth_attention_output:
                continue
            if grp.fold == "gemm" and grp.role == "mlp-out" and not recipe.smooth_mlp_down:
                continue
            if grp.fold == "mul" and not recipe.smooth_with_mul:
                continue
            sm = choose_smoothing(grp, idx, st.channel_absmax, st.sample, recipe.precision, recipe.alpha, recipe.alpha_grid)
            smoothings[grp.act] = sm
        elif recipe.precision == Precision.INT4 and recipe.int4_method == Int4Method.AWQ:
            if st.sample is None:
                raise QuantizationError("AWQ needs the calibration rows (ranges.samples.npz)", "re-run calibration instead of --ranges")
            q = [d for d in members if d.quantize]
            if len({d.block for d in q}) != 1:
                continue
            ws = [weight_kn(idx, d.gemm) for d in q]
            s, ratio, err = awq_scale(st.sample, st.channel_absmean, ws, q[0].block, recipe.awq_grid)
            if ratio > 0:
                smoothings[grp.act] = Smoothing(grp, s, ratio, err)
    smoothed = apply_smoothing(model, list(smoothings.values())) if smoothings else model
    dtype = "fp16" if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer if len(t.dims) == 2) else "fp32"
    return Prepared(smoothed, recipe, ranges, decisions, groups, smoothings, dtype)


def finish(prep: Prepared, *, dtype: str) -> tuple[onnx.ModelProto, dict]:
    """FP16 conversion of the rest (if asked), opset, Q/DQ and weight compression."""
    recipe, precision = prep.recipe, prep.recipe.precision
    model = prep.model
    if dtype == "fp16" and prep.dtype == "fp32":
        from trtforge.fp16 import convert_to_fp16

        model = convert_to_fp16(model)
    model = ensure_opset(model, precision, fp16=dtype == "fp16" or prep.dtype == "fp16")
    idx = GraphIndex(model)
    current = {g.node: g for g in find_gemms(model, idx)}
    group_of = {n: grp for grp in prep.groups for n in grp.gemms}
    act_scales: dict[str, float] = {}
    act_info: dict[str, dict] = {}
    if precision in (Precision.INT8, Precision.FP8):
        acts: dict[str, tuple[float, list[str]]] = {}
        for name, d in prep.decisions.items():
            if not d.quantize:
                continue
            grp = group_of.get(name)
            sm = prep.smoothings.get(grp.act) if grp else None
            st = _stats(prep.ranges, d.gemm.act)
            tensor = current[name].act
            if tensor in acts:
                acts[tensor][1].append(name)
                continue
            amax, method = _act_amax(st, sm, recipe, precision)
            acts[tensor] = (amax, [name])
            act_info[tensor] = {"amax": amax, "method": method, "smoothed": sm is not None}
        if recipe.quantize_attention_bmm:
            for tensor, readers in attention_bmm_inputs(model, idx).items():
                st = prep.ranges.tensors.get(tensor)
                if st is None:
                    continue
                amax = choose_amax(st, recipe.calib_method.value, recipe.percentile, QMAX[precision])
                acts[tensor] = (amax, readers)
                act_info[tensor] = {"amax": amax, "method": recipe.calib_method.value, "smoothed": False, "bmm": True}
        act_scales = insert_activation_qdq(model, acts, precision)
    shared: dict[str, float] = {}
    if recipe.weight_granularity == "tensor" and precision != Precision.INT4:
        cur_idx = GraphIndex(model)
        for grp in prep.groups:
            members = [n for n in grp.gemms if prep.decisions[n].quantize]
            if len(members) > 1:
                amax = max(float(np.abs(weight_kn(cur_idx, current[n])).max()) for n in members)
                shared.update({n: amax for n in members})
    plans = []
    for name, d in prep.decisions.items():
        if not d.quantize:
            continue
        clip = None
        if precision == Precision.INT4 and recipe.int4_method == Int4Method.AWQ and recipe.awq_clip:
            st = _stats(prep.ranges, d.gemm.act)
            grp = group_of.get(name)
            sm = prep.smoothings.get(grp.act) if grp else None
            x = st.sample.astype(np.float32) / (sm.s[None, :] if sm else 1.0)
            clip = awq_clip(x, weight_kn(GraphIndex(model), current[name]), d.block, recipe.awq_clip_grid)
        plans.append(WeightPlan(current[name], d.block, clip, shared.get(name)))
    winfo = quantize_weights(model, plans, precision, per_tensor=recipe.weight_granularity == "tensor")
    nodes = []
    for name, d in prep.decisions.items():
        g = d.gemm
        entry = {"node": name, "weight": g.weight, "op": g.op, "k": g.k, "n": g.n,
                 "status": "quantized" if d.quantize else "excluded"}
        if not d.quantize:
            entry["reason"] = d.reason
        else:
            grp = group_of.get(name)
            sm = prep.smoothings.get(grp.act) if grp else None
            tensor = current[name].act
            if tensor in act_scales:
                entry["activation"] = {"tensor": tensor, "scale": act_scales[tensor], **act_info[tensor]}
            entry.update(winfo[name])
            if sm is not None:
                entry["smoothing"] = {"fold": grp.fold, "alpha": sm.alpha, "s_min": float(sm.s.min()), "s_max": float(sm.s.max())}
            if precision == Precision.INT4 and d.block != recipe.block_size:
                entry["block_note"] = f"K={g.k} is not divisible by {recipe.block_size}; used block {d.block}"
        nodes.append(entry)
    report = {
        "precision": precision.value,
        "nodes": nodes,
        "counts": {"quantized": sum(n["status"] == "quantized" for n in nodes),
                   "excluded": sum(n["status"] == "excluded" for n in nodes)},
        "smoothing": [
            {"gemms": sm.group.gemms, "role": sm.group.role, "fold": sm.group.fold, "alpha": sm.alpha,
             "error": sm.error, "why_not_folded": sm.group.why or None}
            for sm in prep.smoothings.values()
        ],
        "dtype": dtype,
    }
    return model, report


def _act_amax(st, sm: Smoothing | None, recipe: QuantRecipe, precision: Precision) -> tuple[float, str]:
    qmax = QMAX[precision]
    if sm is None:
        method = (recipe.unsmoothed_calib_method or recipe.calib_method).value
        if precision == Precision.FP8 and method != "percentile":
            method = "max"  # FP8's non-uniform grid: scales from amax/448, as the issue specifies
        return choose_amax(st, method, recipe.percentile, qmax), method
    method = recipe.calib_method.value
    exact_max = float(np.max(st.channel_absmax / sm.s))
    if method == "max" or st.sample is None:
        return exact_max, "max" if method == "max" else "max (no calibration rows saved)"
    rows = st.sample.astype(np.float32) / sm.s[None, :]
    return min(amax_from_rows(rows, method, recipe.percentile, qmax), exact_max), method


def quantize_model(
    model: onnx.ModelProto, recipe: QuantRecipe, ranges: ActivationRanges, *, dims: dict | None = None,
    only: set[str] | None = None, dtype: str | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Pure: float model + recipe + ranges -> (quantized model, report). ``only``: quantize just these GEMM nodes."""
    prep = prepare(model, recipe, ranges, dims or {}, only=only)
    return finish(prep, dtype=dtype or prep.dtype)
