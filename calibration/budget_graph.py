"""The budget search's switched graph (calibration/budget.py, step 1 of its method).

In:  the export artifact, a recipe, the ranges, dims, the float type of the unquantized rest, a
     scratch folder, and optionally the smoothing factors already searched for that recipe's
     smoothing method (so a second graph of the same recipe with another weight rounding does
     not search them again).
Out: a :class:`Switched`: ``model.onnx`` in the scratch folder (its new tensors in the folder's
     own data file, the export's weights read where they are), the groups with their boolean
     switch inputs, the tensor the sensitivities read, and the smoothing factors used.

The recipe quantizes the whole graph (``prepare`` + ``finish``, the stage's own passes), and
every quantized GEMM input gets ``Where(keep_g, float, ...)`` on its weight (the smoothed float
weight, in the rest's type) and on its activation, and for INT4 recipes ``Where(int8_g,
int8_dequantized, int4_dequantized)`` inside it: setting a group's switch computes what the
graph with that group excluded (or in INT8 weight-only) computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from trtforge.calibration.budget_eval import FLAG
from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.qdq import insert_before
from trtforge.calibration.quantize import finish, prepare
from trtforge.calibration.recipe import QuantRecipe
from trtforge.calibration.smoothing import Smoothing
from trtforge.errors import QuantizationError
from trtforge.graph import GraphIndex, inline_identity_initializers
from trtforge.manifest import ModelDims
from trtforge.numerics import quantize, weight_scales
from trtforge.onnx_io import DATA_FILE, MODEL_FILE, DataFile, Weights, load_graph, write_model
from trtforge.ort import release_memory
from trtforge.vocab import Precision

__all__ = ["SwitchGroup", "Switched", "build_switched"]


@dataclass
class SwitchGroup:
    name: str
    role: str
    members: list[str]  # quantized GEMM nodes
    elements: int  # weight elements of the members
    flag: str = ""  # keep in float
    flag8: str = ""  # INT8 weight-only (INT4 recipes)
    sensitivity: float | None = None  # only this group in the recipe's precision
    sensitivity_int8: float | None = None  # only this group in INT8 weight-only


def _groups(prep, quantized: list[str], int8: bool, per_gemm: bool = False) -> list[SwitchGroup]:
    """One switch group per GEMM group (the GEMMs sharing one input), or with ``per_gemm`` (recipe
    ``budget_granularity = "gemm"``) one per GEMM, named by its node."""
    seen: set[str] = set()
    out: list[SwitchGroup] = []
    gemms = {n: d.gemm for n, d in prep.decisions.items()}
    for grp in prep.groups:
        members = [n for n in grp.gemms if n in quantized and n not in seen]
        if members:
            seen.update(members)
            if per_gemm and len(members) > 1:
                out.extend(SwitchGroup(n, grp.role, [n], gemms[n].k * gemms[n].n) for n in members)
            else:
                out.append(SwitchGroup(grp.act, grp.role, members, sum(gemms[n].k * gemms[n].n for n in members)))
    for n in quantized:  # a GEMM in no group: a group of its own
        if n not in seen:
            out.append(SwitchGroup(gemms[n].act, "other", [n], gemms[n].k * gemms[n].n))
    for i, g in enumerate(out):
        g.flag = f"{FLAG}keep_{i}"
        g.flag8 = f"{FLAG}int8_{i}" if int8 else ""
    return out


def _add_switches(model: onnx.ModelProto, weights: Weights, floats: dict[str, onnx.TensorProto],
                  int8s: dict[str, onnx.TensorProto], groups: list[SwitchGroup]) -> None:
    """``Where(keep, float, Where(int8, int8_dequantized, dequantized))`` on each quantized GEMM's
    weight and ``Where(keep, float, dequantized)`` on its activation (module docstring, 1);
    ``floats`` / ``int8s``: each GEMM's float / INT8-dequantized weight as a tensor already
    written (:meth:`Weights.put`), in the type of the unquantized rest."""
    idx = GraphIndex(model, weights)
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    inserts: dict[str, list[onnx.NodeProto]] = {}
    for g in groups:
        for flag in filter(None, (g.flag, g.flag8)):
            model.graph.input.append(helper.make_tensor_value_info(flag, onnx.TensorProto.BOOL, []))
        for name in g.members:
            node = nodes[name]
            dq = producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                raise QuantizationError(f"the budget search cannot find {name}'s dequantized weight",
                                        "this is a trtforge bug; quantize without --budget meanwhile")
            w = floats[name]
            if w.data_type != inits[dq.input[1]].data_type:  # the rest's float type is the scales' type
                raise QuantizationError(f"the budget search planned {name}'s float weight in the wrong type",
                                        "this is a trtforge bug; quantize without --budget meanwhile")
            new: list[onnx.NodeProto] = []
            quantized = node.input[1]
            if g.flag8:
                model.graph.initializer.append(int8s[name])
                out8 = idx.unique(f"{name}_budget_weight_int8")
                new.append(helper.make_node("Where", [g.flag8, int8s[name].name, quantized], [out8],
                                            name=idx.unique(f"{name}_budget_w8")))
                quantized = out8
            model.graph.initializer.append(w)
            out = idx.unique(f"{name}_budget_weight")
            new.append(helper.make_node("Where", [g.flag, w.name, quantized], [out], name=idx.unique(f"{name}_budget_w")))
            node.input[1] = out
            adq = producer.get(node.input[0])
            q = producer.get(adq.input[0]) if adq is not None and adq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                out = idx.unique(f"{name}_budget_act")
                new.append(helper.make_node("Where", [g.flag, q.input[0], node.input[0]], [out],
                                            name=idx.unique(f"{name}_budget_a")))
                node.input[0] = out
            inserts[name] = new
    insert_before(model, inserts)


def _hidden_tensor(model: onnx.ModelProto, output: str) -> str:
    """The lm_head's input (walking back from the logits through elementwise ops), else ``output``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    t = output
    for _ in range(16):
        n = producer.get(t)
        if n is None:
            break
        if n.op_type in ("MatMul", "Gemm"):
            return n.input[0]
        t = n.input[0]
    return output



def _int8_dequantized(w: np.ndarray, trans_b: bool, rest) -> np.ndarray:
    """What the INT8 weight-only fallback computes for a weight: per-output-channel symmetric
    INT8, dequantized in the rest's float type (calibration/qdq.py's rule)."""
    w_kn = w.T if trans_b else w
    s = weight_scales(w_kn, Precision.INT8, rest)
    deq = quantize(w_kn, s[None, :], Precision.INT8).astype(np.float32) * s[None, :].astype(np.float32)
    return np.ascontiguousarray((deq.T if trans_b else deq).astype(rest))


@dataclass
class Switched:
    path: Path  # the switched model.onnx
    groups: list[SwitchGroup]
    hidden: str  # the lm_head's input (decoders), else the output the budget reads
    smoothings: dict[str, Smoothing]  # by group act, as the recipe's smoothing method found them


def build_switched(art, recipe: QuantRecipe, ranges: ActivationRanges, dims: ModelDims, dtype: str, scratch: Path,
                   *, smoothings: dict[str, Smoothing] | None = None) -> Switched:
    """The recipe's fully quantized graph with a switch per group (module docstring), written to
    ``scratch``; every new tensor (the float copies, the quantized weights) goes to the scratch
    data file as it is made, and ONNX Runtime maps it from there: nothing of the model is held
    twice. ``smoothings``: factors searched earlier for this recipe's smoothing method (reused,
    not searched again)."""
    task = art.manifest.source.task
    int8 = recipe.precision == Precision.INT4 and recipe.budget_int8  # the INT8 weight-only tier
    model = load_graph(art.model_path)
    weights = Weights(model, art.path)
    inline_identity_initializers(model, weights)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / MODEL_FILE
    data = weights.out = DataFile(scratch / DATA_FILE)
    try:
        prep = prepare(model, recipe, ranges, dims, weights=weights, smoothings=smoothings)
        quantized = [n for n, d in prep.decisions.items() if d.quantize]
        if not quantized:
            raise QuantizationError(f"recipe {recipe.name} quantizes no GEMM of this model, so there is nothing to budget",
                                    "quantize without --budget, or loosen the recipe's exclude patterns")
        idx = GraphIndex(prep.model, weights)
        by_name = {n.name: n for n in prep.model.graph.node}
        rest = np.float16 if (dtype == Precision.FP16 or prep.dtype == Precision.FP16) else np.float32
        floats, int8s = {}, {}
        for n in quantized:  # the smoothed float weight, in the type of the unquantized rest
            w = idx.array(by_name[n].input[1]).astype(np.float32)
            if int8:
                int8s[n] = weights.put(_int8_dequantized(w, prep.decisions[n].gemm.trans_b, rest),
                                       idx.unique(f"{n}_budget_int8_weight"))
            w = np.clip(w, -65504.0, 65504.0).astype(rest) if rest == np.float16 else w
            floats[n] = weights.put(w, idx.unique(f"{n}_budget_float_weight"))
            del w
        del idx
        groups = _groups(prep, quantized, int8, recipe.budget_granularity == "gemm")
        found = dict(prep.smoothings)
        qmodel, _ = finish(prep, dtype=dtype)
        _add_switches(qmodel, weights, floats, int8s, groups)
        del floats, int8s
        hidden = _hidden_tensor(qmodel, "logits" if task.is_decoder else "last_hidden_state")
        write_model(qmodel, path, weights, external=True, data=data, link=True)
    finally:
        data.close()
    del qmodel, prep, model, weights
    release_memory()
    return Switched(path, groups, hidden, found)
