"""Quantize stage: export artifact + recipe + calibration data -> Q/DQ ONNX artifact.

In:  an ONNX artifact from ``trtforge export`` (FP32 or FP16), a QuantRecipe, calibration data
     (or saved ranges), an output folder.
Out: ``model.onnx`` with Q/DQ nodes (or INT4 weight-only DequantizeLinear), the tokenizer and
     config files, ``ranges.json`` (+ ``ranges.samples.npz``) for re-use, and ``manifest.json``
     listing every quantized and excluded GEMM with its scales and the reason for exclusion.

The passes are pure functions ``ModelProto -> ModelProto``: ``prepare`` (exclusions, smoothing
or AWQ scales), then ``finish`` (FP16 conversion of the rest, opset, Q/DQ insertion, weight
compression). ``quantize_model`` chains them and is what ``--per-layer`` parity calls. What is
planned how is the business of the recipe's QuantMethods (calibration/methods/, chosen by
:func:`~trtforge.calibration.methods.base.methods_for`); these passes only call their hooks.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.methods.base import Decision, Methods, PlanContext, methods_for, needs_rows
from trtforge.calibration.patterns import (
    Gemm,
    Group,
    attention_bmm_inputs,
    find_gemms,
    find_groups,
    watched_tensors,
)
from trtforge.calibration.qdq import WeightPlan, ensure_opset, insert_activation_qdq, quantize_weights
from trtforge.calibration.recipe import QuantRecipe
from trtforge.calibration.smoothing import Smoothing, apply_smoothing
from trtforge.fp16 import convert_to_fp16
from trtforge.graph import GraphIndex, inline_identity_initializers
from trtforge.manifest import ModelDims
from trtforge.onnx_io import Weights
from trtforge.progress import progress
from trtforge.vocab import Precision

log = logging.getLogger(__name__)
RANGES_FILE = "ranges.json"
_MAX16 = float(np.finfo(np.float16).max)

__all__ = [
    "RANGES_FILE", "Decision", "Prepared", "attention_bmm_inputs", "finish", "needs_rows", "prepare",
    "quantize_model", "watched_tensors",
]


@dataclass
class Prepared:
    model: onnx.ModelProto  # float, smoothed
    recipe: QuantRecipe
    ranges: ActivationRanges
    decisions: dict[str, Decision]
    groups: list[Group]
    smoothings: dict[str, Smoothing] = field(default_factory=dict)  # by group act
    dtype: str = Precision.FP32.value
    methods: Methods | None = None
    weights: Weights | None = None  # the model's initializer values (external data, recorded edits)


def _decide(gemms: list[Gemm], recipe: QuantRecipe, only: set[str] | None, methods: Methods) -> dict[str, Decision]:
    out = {}
    for g in gemms:
        d = Decision(g, True)
        pat = next((p for p in recipe.exclude if fnmatch.fnmatch(g.node, p) or fnmatch.fnmatch(g.weight, p)), None)
        if pat:
            d.quantize, d.reason = False, f"matches exclude pattern {pat!r}"
        elif only is not None and g.node not in only:
            d.quantize, d.reason = False, "not selected"
        elif (pat := next((p for p in recipe.weight_only_int8
                           if fnmatch.fnmatch(g.node, p) or fnmatch.fnmatch(g.weight, p)), None)):
            d.quantize, d.fallback = False, Precision.INT8
            d.reason = f"INT8 weight-only: matches weight_only_int8 pattern {pat!r}"
        else:
            d.block, reason = methods.weights.check(g, recipe)
            if reason:
                d.quantize, d.reason = False, reason
        out[g.node] = d
    return out


def prepare(
    model: onnx.ModelProto, recipe: QuantRecipe, ranges: ActivationRanges, dims: ModelDims | dict | None,
    *, only: set[str] | None = None, weights: Weights | None = None,
    smoothings: dict[str, Smoothing] | None = None,
) -> Prepared:
    """Exclusions and the smoothing method's factors, folded into the float model.

    ``smoothings`` (by group act): what this recipe's smoothing method already found for this
    model with the same or more GEMMs quantized (the budget search's first graph): applied to
    the groups that still have a quantized GEMM, a group absent from it left unsmoothed, nothing
    searched again.

    Without ``weights``, into a copy of ``model`` (an in-memory model the caller keeps: parity's
    per-layer ranking quantizes it once per GEMM). With ``weights`` (bound to ``model``: the
    quantize stage's graph, loaded without its external data), ``model`` itself is edited and
    its weights stay where they are: rescaled weights are recorded edits (onnx_io.Weights)."""
    methods = methods_for(recipe)
    if weights is None:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the passes edit in place; the caller's model stays untouched
        model, weights = copy, Weights(copy)
    elif weights.model is not model:
        raise ValueError("prepare: weights must belong to the model being prepared")
    model = inline_identity_initializers(model, weights)
    idx = GraphIndex(model, weights)
    gemms = find_gemms(model, idx)
    decisions = _decide(gemms, recipe, only, methods)
    groups = find_groups(model, dims or {}, idx)
    ctx = PlanContext(model, idx, recipe, ranges, {g.node: g for g in gemms}, decisions, groups)
    known = smoothings
    smoothings = {}
    if methods.smoothing is not None:
        todo = [grp for grp in groups if any(decisions[n].quantize for n in grp.gemms)]
        if known is not None:  # found before: reused (a group the earlier search left alone stays so)
            smoothings = {grp.act: dataclasses.replace(known[grp.act], group=grp) for grp in todo if grp.act in known}
            todo = []
        for grp in progress(todo, len(todo), f"{methods.smoothing.name} search (groups)"):
            sm = methods.smoothing.smooth(ctx, grp)
            if sm is not None:
                smoothings[grp.act] = sm
    if smoothings:
        model = apply_smoothing(model, list(smoothings.values()), idx, ctx.gemms)
    f16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer if len(t.dims) == 2)
    dtype = (Precision.FP16 if f16 else Precision.FP32).value
    return Prepared(model, recipe, ranges, decisions, groups, smoothings, dtype, methods, weights)


def _to_fp16(weights: Weights):
    """convert_to_fp16's initializer cast, through the weights (recorded for external data)."""
    def cast(t: onnx.TensorProto) -> None:
        weights.transform(t, lambda a: np.clip(a, -_MAX16, _MAX16), np.float16)
    return cast


def finish(prep: Prepared, *, dtype: str) -> tuple[onnx.ModelProto, dict]:
    """FP16 conversion of the rest (if asked), opset, Q/DQ and weight compression.

    Quantized weights go through ``prep.weights.put``: straight to the output's data file when
    the stage opened one, so they are written as they are produced and never held together."""
    recipe, precision = prep.recipe, prep.recipe.precision
    methods = prep.methods or methods_for(recipe)
    model = prep.model
    weights = prep.weights or Weights(model)
    if dtype == Precision.FP16 and prep.dtype == Precision.FP32:
        model = convert_to_fp16(model, initializer_to16=_to_fp16(weights))
    model = ensure_opset(model, precision, fp16=Precision.FP16 in (dtype, prep.dtype))
    weights.rebind(model)
    idx = GraphIndex(model, weights)  # the one index of this pass: planning reads it, insertion names with it
    current = {g.node: g for g in find_gemms(model, idx)}
    ctx = PlanContext(model, idx, recipe, prep.ranges, current, prep.decisions, prep.groups, prep.smoothings)
    plans = methods.weights.plan_weights(ctx)  # reads the weights, which activation Q/DQ leaves alone
    act_scales: dict[str, float] = {}
    act_info: dict[str, dict] = {}
    if methods.activations is not None:
        acts, act_info = methods.activations.plan_activations(ctx)
        act_scales = insert_activation_qdq(model, acts, precision, idx)
    winfo = quantize_weights(model, plans, precision, idx)
    # the INT4 recipe's INT8 fallback: per-output-channel weight-only, activations stay float
    fallback = [WeightPlan(current[n]) for n, d in prep.decisions.items() if d.fallback == Precision.INT8]
    if fallback:
        winfo.update(quantize_weights(model, fallback, Precision.INT8, idx))
    return model, _report(ctx, prep, act_scales, act_info, winfo, dtype)


def _report(ctx: PlanContext, prep: Prepared, act_scales: dict[str, float], act_info: dict[str, dict],
            winfo: dict[str, dict], dtype: str) -> dict:
    recipe = prep.recipe
    nodes = []
    for name, d in prep.decisions.items():
        g = d.gemm
        entry = {"node": name, "weight": g.weight, "op": g.op, "k": g.k, "n": g.n,
                 "status": "quantized" if d.quantize else "fallback" if d.fallback else "excluded"}
        if d.fallback is not None:  # stored in another precision than the recipe's (weight-only INT8)
            entry.update(reason=d.reason, precision=d.fallback.value, **winfo[name])
        elif not d.quantize:
            entry["reason"] = d.reason
        else:
            grp = ctx.group_of(name)
            sm = ctx.smoothing_of(name)
            tensor = ctx.gemms[name].act
            if tensor in act_scales:
                entry["activation"] = {"tensor": tensor, "scale": act_scales[tensor], **act_info[tensor]}
            entry.update(winfo[name])
            if sm is not None:
                entry["smoothing"] = {"fold": grp.fold, "alpha": sm.alpha, "s_min": float(sm.s.min()), "s_max": float(sm.s.max())}
            if d.block is not None and d.block != recipe.block_size:
                entry["block_note"] = f"K={g.k} is not divisible by {recipe.block_size}; used block {d.block}"
        nodes.append(entry)
    return {
        "precision": recipe.precision.value,
        "nodes": nodes,
        "counts": {"quantized": sum(n["status"] == "quantized" for n in nodes),
                   "excluded": sum(n["status"] == "excluded" for n in nodes),
                   **({"fallback": k} if (k := sum(n["status"] == "fallback" for n in nodes)) else {})},
        "smoothing": [
            {"gemms": sm.group.gemms, "role": sm.group.role, "fold": sm.group.fold, "alpha": sm.alpha,
             "error": sm.error, "why_not_folded": sm.group.why or None}
            for sm in prep.smoothings.values()
        ],
        "dtype": dtype,
    }


def quantize_model(
    model: onnx.ModelProto, recipe: QuantRecipe, ranges: ActivationRanges, *, dims: ModelDims | dict | None = None,
    only: set[str] | None = None, dtype: str | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Pure: float model + recipe + ranges -> (quantized model, report). ``only``: quantize just these GEMM nodes."""
    prep = prepare(model, recipe, ranges, dims, only=only)
    return finish(prep, dtype=dtype or prep.dtype)
