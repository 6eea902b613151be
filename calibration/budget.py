"""Quantize under an accuracy budget: the fewest weight bytes kept unquantized until it holds.

In:  the export artifact, the recipe (its ``budget``), the ranges collected on the *ranges part*
     of the calibration samples, the *held-out part* (never used for ranges), dims, the float
     type of the unquantized rest, a scratch folder.
Out: a :class:`Search`: the GEMMs to keep unquantized (``keep``), every GEMM's group and
     measured sensitivity, the budget record; ``Search.verify(path)`` measures a written model
     on the held-out part (the stage re-measures its final graph with it).

Method (one calibration pass, statistics reused):

1. The recipe quantizes the whole graph once (``prepare`` + ``finish``, the stage's own
   passes), and every quantized GEMM input gets a switch: ``Where(keep_g, float, dequantized)``
   on its weight (the smoothed float weight, in the rest's type) and on its activation, one
   boolean graph input per *group* (the GEMMs sharing one input and one smoothing factor: q/k/v,
   gate/up). Setting a group's switch computes exactly what the graph with that group excluded
   computes (smoothing folds are exact in float), so every candidate assignment is one run of
   one session, never a re-quantization.
2. The unquantized graph (every switch on) is measured first: if even it misses the budget, the
   search stops with one error saying what it measures. Then the fully quantized graph: if it
   meets the budget, nothing is kept.
3. Sensitivity of each group: the relative noise power of the last hidden state (the lm_head's
   input for decoders, ``last_hidden_state`` for encoders) with only that group quantized,
   against the unquantized graph, on the first ``RANK_TOKENS`` held-out tokens (a pruned copy of
   the graph without the lm_head: a 262k vocabulary is most of a small model's compute).
4. Groups ordered by sensitivity per weight byte (cost-aware: a small sensitive layer before a
   large one of the same error); the shortest prefix that meets the budget, measured on the
   whole held-out part (exponential then binary search over the prefix length).

The stage then quantizes with those GEMMs excluded and measures its written model on the same
held-out samples; should that miss the budget, the next group in the order is kept and the
stage quantizes again (:meth:`Search.more`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from trtforge.calibration.budget_spec import Budget
from trtforge.calibration.collect import ActivationRanges, batches
from trtforge.calibration.quantize import finish, prepare
from trtforge.calibration.recipe import QuantRecipe
from trtforge.errors import CalibrationError, QuantizationError
from trtforge.graph import GraphIndex, inline_identity_initializers, needed_subgraph, tensor_types
from trtforge.inputs import make_feeds
from trtforge.manifest import ModelDims
from trtforge.metrics import mean_pool, row_cosine
from trtforge.onnx_io import DATA_FILE, MODEL_FILE, DataFile, Weights, load_graph, write_model
from trtforge.ort import NO_PREPACKING, graph_session, release_memory
from trtforge.progress import progress
from trtforge.textdata import Samples
from trtforge.vocab import Precision, Task

log = logging.getLogger(__name__)

HELD_OUT_SHARE = 0.2  # of the calibration samples, spread evenly over them
MAX_HELD_OUT = 32
RANK_TOKENS = 512  # held-out tokens the per-group sensitivities are measured on
OUTPUT_BYTES = 256 << 20  # a batch's output (logits) kept under this
FLAG = "trtforge_budget_keep_"
BYTES = {Precision.FP32: 4.0, Precision.FP16: 2.0, Precision.BF16: 2.0, Precision.INT8: 1.0, Precision.FP8: 1.0,
         Precision.INT4: 0.5}


def split_held_out(samples: Samples) -> tuple[Samples, Samples]:
    """(ranges part, held-out part): every 1/HELD_OUT_SHARE-th sample held out, at most MAX_HELD_OUT."""
    n = len(samples.ids)
    if n < 2:
        raise CalibrationError(f"an accuracy budget needs at least 2 calibration samples, and the data gives {n}",
                               "pass more calibration text: part of it is held out to measure the budget")
    h = min(MAX_HELD_OUT, max(1, round(n * HELD_OUT_SHARE)))
    held = sorted({min(n - 1, int((i + 0.5) * n / h)) for i in range(h)})
    rest = [i for i in range(n) if i not in set(held)]

    def pick(idx: list[int]) -> Samples:
        tt = samples.token_type_ids
        return Samples([samples.ids[i] for i in idx], samples.mode, samples.sources, list(samples.notes),
                       [tt[i] for i in idx] if tt else None, samples.files)

    return pick(rest), pick(held)


# --------------------------------------------------------------------------- measuring


class _Eval:
    """The held-out batches, the float export's result on them, and the budget metric of a session."""

    def __init__(self, held: Samples, dims: ModelDims, task: Task, budget: Budget, vocab: int, hidden_size: int) -> None:
        self.held, self.dims, self.task, self.budget = held, dims, task, budget
        self.decoder = task.is_decoder
        self.output = "logits" if self.decoder else "last_hidden_state"
        width = vocab if self.decoder else hidden_size
        longest = max(len(a) for a in held.ids)
        size = max(1, min(8, OUTPUT_BYTES // max(1, longest * width * 4)))
        self.batches = batches(held, size)
        self.rank_batches = self._first_tokens(RANK_TOKENS)
        self.reference: float | np.ndarray | None = None
        self.runs = 0

    def _first_tokens(self, limit: int) -> list[list[int]]:
        out, tokens = [], 0
        for b in batches(self.held, 1):
            if out and tokens + len(self.held.ids[b[0]]) > limit:
                break
            out.append(b)
            tokens += len(self.held.ids[b[0]])
        return out

    @property
    def rank_tokens(self) -> int:
        return sum(len(self.held.ids[b[0]]) for b in self.rank_batches)

    def _feeds(self, sess, idx: list[int], flags: dict[str, bool] | None) -> dict[str, np.ndarray]:
        types = {i.name: i.type for i in sess.get_inputs()}
        names = [n for n in types if not n.startswith(FLAG)]
        f16 = any(types[n] == "tensor(float16)" for n in names)
        ids = np.stack([self.held.ids[i] for i in idx])
        tt = np.stack([self.held.token_type_ids[i] for i in idx]) if self.held.token_type_ids else None
        feeds = make_feeds(ids, names, self.dims, np.float16 if f16 else np.float32, tt)
        for n in types:
            if n.startswith(FLAG):
                feeds[n] = np.asarray(bool(flags and flags.get(n)), np.bool_)
        return feeds

    def outputs(self, sess, flags: dict[str, bool] | None, tensor: str, which: list[list[int]]):
        """(feeds, output) per batch."""
        self.runs += 1
        for idx in which:
            feeds = self._feeds(sess, idx, flags)
            yield feeds, sess.run([tensor], feeds)[0]

    def value(self, sess, flags: dict[str, bool] | None = None) -> float:
        """The budget metric of ``sess`` (with ``flags``) against the float export's reference."""
        if self.decoder:
            nll, count = 0.0, 0
            for feeds, logits in self.outputs(sess, flags, self.output, self.batches):
                s, n = _nll(logits, feeds["input_ids"])
                nll, count = nll + s, count + n
            mean = nll / max(count, 1)
            if self.reference is None:
                return mean
            d = mean - float(self.reference)
            return 100.0 * (math.exp(d) - 1.0) if math.isfinite(d) and d < 700 else math.inf
        pooled = np.concatenate([mean_pool(h, f["attention_mask"]) for f, h in
                                 self.outputs(sess, flags, self.output, self.batches)])
        if self.reference is None:
            return pooled  # type: ignore[return-value]
        cos = row_cosine(np.asarray(self.reference), pooled)
        return float(np.mean(cos)) if np.isfinite(cos).all() else -math.inf

    def set_reference(self, export_model: Path) -> None:
        sess = _mapped_session(export_model)
        self.reference = self.value(sess)
        del sess
        release_memory()

    def hidden(self, sess, flags: dict[str, bool], tensor: str) -> list[np.ndarray]:
        return [np.asarray(h, np.float64) for _, h in self.outputs(sess, flags, tensor, self.rank_batches)]


def _mapped_session(path: Path):
    """A session whose weights ONNX Runtime reads from their file (a model held in one file
    included: its graph is loaded without them), never parsed into this process whole."""
    return graph_session(load_graph(path), path.parent, config=NO_PREPACKING)


def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over every position of unpadded rows."""
    b, s, v = logits.shape
    rows = logits[:, :-1].reshape(-1, v)
    targets = ids[:, 1:].reshape(-1)
    total = 0.0
    for k in range(0, rows.shape[0], 64):
        x = rows[k : k + 64].astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
        total += float((lse - x[np.arange(x.shape[0]), targets[k : k + 64]]).sum())
    return total, int(rows.shape[0])


def _noise(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    signal = sum(float(np.square(r).sum()) for r in ref)
    noise = sum(float(np.square(g - r).sum()) for r, g in zip(ref, got, strict=True))
    return noise / max(signal, 1e-30)


# --------------------------------------------------------------------------- the switched graph


@dataclass
class _Group:
    name: str
    role: str
    members: list[str]  # quantized GEMM nodes
    elements: int  # weight elements of the members
    flag: str = ""
    sensitivity: float | None = None


def _groups(prep, quantized: list[str]) -> list[_Group]:
    seen: set[str] = set()
    out: list[_Group] = []
    gemms = {n: d.gemm for n, d in prep.decisions.items()}
    for grp in prep.groups:
        members = [n for n in grp.gemms if n in quantized and n not in seen]
        if members:
            seen.update(members)
            out.append(_Group(grp.act, grp.role, members, sum(gemms[n].k * gemms[n].n for n in members)))
    for n in quantized:  # a GEMM in no group: a group of its own
        if n not in seen:
            out.append(_Group(gemms[n].act, "other", [n], gemms[n].k * gemms[n].n))
    for i, g in enumerate(out):
        g.flag = f"{FLAG}{i}"
    return out


def _add_switches(model: onnx.ModelProto, weights: Weights, floats: dict[str, onnx.TensorProto],
                  groups: list[_Group]) -> None:
    """``Where(flag, float, dequantized)`` on each quantized GEMM input (module docstring, 1);
    ``floats``: each GEMM's float weight as a tensor already written (:meth:`Weights.put`)."""
    idx = GraphIndex(model, weights)
    producer = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    inserts: dict[str, list[onnx.NodeProto]] = {}
    for g in groups:
        model.graph.input.append(helper.make_tensor_value_info(g.flag, onnx.TensorProto.BOOL, []))
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
            wname = w.name
            model.graph.initializer.append(w)
            out = idx.unique(f"{name}_budget_weight")
            new = [helper.make_node("Where", [g.flag, wname, node.input[1]], [out], name=idx.unique(f"{name}_budget_w"))]
            node.input[1] = out
            adq = producer.get(node.input[0])
            q = producer.get(adq.input[0]) if adq is not None and adq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                out = idx.unique(f"{name}_budget_act")
                new.append(helper.make_node("Where", [g.flag, q.input[0], node.input[0]], [out],
                                            name=idx.unique(f"{name}_budget_a")))
                node.input[0] = out
            inserts[name] = new
    order = []
    for node in model.graph.node:
        order += inserts.get(node.name, [])
        order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)


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


# --------------------------------------------------------------------------- the search


@dataclass
class Search:
    budget: Budget
    eval: _Eval
    groups: list[_Group]
    order: list[int]  # group indices, best error reduction per byte first
    kept: int  # the first ``kept`` groups of ``order`` stay unquantized
    rest_precision: str
    quant_precision: str
    unquantized: float = 0.0
    all_quantized: float = 0.0
    searched: float | None = None  # the switched graph's value with the chosen groups kept
    measured: float | None = None  # the written model's value (Search.verify)
    evaluations: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    gemm_elements: dict[str, int] = field(default_factory=dict)

    def keep(self) -> list[str]:
        return [n for gi in self.order[: self.kept] for n in self.groups[gi].members]

    def more(self) -> bool:
        """Keep the next group of the order (the written model missed the budget); False when none is left."""
        if self.kept >= len(self.order):
            return False
        self.kept += 1
        return True

    def recipe(self, recipe: QuantRecipe) -> QuantRecipe:
        """``recipe`` with the kept GEMMs excluded (their exact node names as patterns)."""
        return recipe.replace(exclude=[*recipe.exclude, *(_glob_escape(n) for n in self.keep())])

    def verify(self, model_path: Path) -> float:
        sess = _mapped_session(model_path)
        self.measured = self.eval.value(sess)
        del sess
        release_memory()
        return self.measured

    def records(self, report: dict) -> tuple[list[dict], dict]:
        """The manifest's ``layers`` and ``budget`` (see docs/quantization.md)."""
        kept = set(self.keep())
        group_of = {n: g for g in self.groups for n in g.members}
        rank = {gi: r for r, gi in enumerate(self.order, 1)}
        layers, elems = [], {}
        for entry in report["nodes"]:
            name, k, n = entry["node"], entry["k"], entry["n"]
            g = group_of.get(name)
            quantized = entry["status"] == "quantized"
            prec = self.quant_precision if quantized else self.rest_precision
            if quantized:
                reason = "quantized: within the budget"
            elif name in kept:
                gi = self.groups.index(g)
                reason = (f"kept in {self.rest_precision} by the budget {self.budget.text}: group rank {rank[gi]} of "
                          f"{len(self.order)} by sensitivity per weight byte")
                entry["reason"] = reason
            else:
                reason = entry.get("reason") or "excluded by the recipe"
            layers.append({"name": name, "group": g.name if g else None, "role": g.role if g else None,
                           "precision": prec, "sensitivity": g.sensitivity if g else None, "reason": reason,
                           "weight_bytes": int(k * n * BYTES.get(Precision.parse(prec), 4.0))})
            elems[prec] = elems.get(prec, 0) + k * n
        total = max(1, sum(elems.values()))
        planned = sum(g.elements for g in self.groups)
        budget = {
            **self.budget.to_json(),
            "measured": self.measured if self.measured is not None else self.searched,
            "measured_all_quantized": self.all_quantized,
            "measured_unquantized": self.unquantized,
            "measured_search": self.searched,
            "held_out_samples": len(self.eval.held.ids),
            "held_out_tokens": self.eval.held.num_tokens,
            "held_out_sha256": self.eval.held.sha256,
            "ranking_tokens": self.eval.rank_tokens if any(g.sensitivity is not None for g in self.groups) else 0,
            "met": self.budget.met(self.measured if self.measured is not None else self.searched),
            "groups": len(self.groups),
            "groups_kept": self.kept,
            "weight_share": {p: e / total for p, e in elems.items()},
            "kept_share_of_planned": (sum(self.groups[gi].elements for gi in self.order[: self.kept]) / planned
                                      if planned else 0.0),
            "expected_gemm_weight_bytes": sum(x["weight_bytes"] for x in layers),
            "evaluations": self.evaluations,
            "search_s": self.seconds,
            "sensitivity": ("relative noise power of the last hidden state with only the group quantized, "
                            "against the unquantized graph"),
        }
        return layers, budget


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def search(art, recipe: QuantRecipe, ranges: ActivationRanges, held: Samples, dims: ModelDims, dtype: str,
           budget: Budget, scratch: Path) -> Search:
    """The assignment (module docstring); raises QuantizationError when no assignment meets the budget."""
    t0 = time.perf_counter()
    task = art.manifest.source.task
    model = load_graph(art.model_path)
    weights = Weights(model, art.path)
    inline_identity_initializers(model, weights)
    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / MODEL_FILE
    # every new tensor (the float copies, the quantized weights) goes to the scratch data file as
    # it is made, and ONNX Runtime maps it from there: nothing of the model is held twice
    data = weights.out = DataFile(scratch / DATA_FILE)
    try:
        prep = prepare(model, recipe, ranges, dims, weights=weights)
        quantized = [n for n, d in prep.decisions.items() if d.quantize]
        if not quantized:
            raise QuantizationError(f"recipe {recipe.name} quantizes no GEMM of this model, so there is nothing to budget",
                                    "quantize without --budget, or loosen the recipe's exclude patterns")
        idx = GraphIndex(prep.model, weights)
        by_name = {n.name: n for n in prep.model.graph.node}
        rest = np.float16 if (dtype == Precision.FP16 or prep.dtype == Precision.FP16) else np.float32
        floats = {}
        for n in quantized:  # the smoothed float weight, in the type of the unquantized rest
            w = idx.array(by_name[n].input[1]).astype(np.float32)
            w = np.clip(w, -65504.0, 65504.0).astype(rest) if rest == np.float16 else w
            floats[n] = weights.put(w, idx.unique(f"{n}_budget_float_weight"))
            del w
        del idx
        groups = _groups(prep, quantized)
        qmodel, _ = finish(prep, dtype=dtype)
        _add_switches(qmodel, weights, floats, groups)
        del floats
        output = "logits" if task.is_decoder else "last_hidden_state"
        hidden = _hidden_tensor(qmodel, output)
        write_model(qmodel, path, weights, external=True, data=data, link=True)
    finally:
        data.close()
    del qmodel, prep, model, weights
    release_memory()

    vocab = int(dims.vocab_size or 0)
    ev = _Eval(held, dims, task, budget, vocab, int(dims.hidden_size or 0))
    ev.set_reference(art.model_path)
    s = Search(budget, ev, groups, [], 0, dtype, recipe.precision.value)
    s.gemm_elements = {g.name: g.elements for g in groups}
    everything = {g.flag: True for g in groups}

    sess = _mapped_session(path)
    s.unquantized = ev.value(sess, everything)
    s.evaluations.append({"kept_groups": len(groups), "value": s.unquantized})
    if not budget.met(s.unquantized):
        raise QuantizationError(
            f"budget {budget.text} cannot be met: with no GEMM quantized ({dtype} rest) the graph itself measures "
            f"{budget.metric.name} {budget.show(s.unquantized)} on {len(held.ids)} held-out calibration samples",
            "loosen the budget, or keep the unquantized rest in fp32 (recipe dtype = fp32)")
    s.all_quantized = ev.value(sess, {})
    s.evaluations.append({"kept_groups": 0, "value": s.all_quantized})
    log.info("budget %s: unquantized %s, every GEMM quantized %s", budget.text, budget.show(s.unquantized),
             budget.show(s.all_quantized))
    if budget.met(s.all_quantized):
        s.searched = s.all_quantized
        s.order = list(range(len(groups)))
        s.seconds = time.perf_counter() - t0
        return s
    del sess
    release_memory()

    # sensitivities, on a copy of the switched graph without the lm_head
    light = load_graph(path)
    htype = tensor_types(light).get(hidden, onnx.TensorProto.FLOAT)
    sub = needed_subgraph(light, [hidden], lambda into, known: into.append(
        known.get(hidden) or helper.make_tensor_value_info(hidden, htype, None)))
    rsess = graph_session(sub, scratch, config=NO_PREPACKING)
    del light, sub
    ref = ev.hidden(rsess, everything, hidden)
    for g in progress(groups, len(groups), "budget sensitivity (groups)"):
        g.sensitivity = _noise(ref, ev.hidden(rsess, {**everything, g.flag: False}, hidden))
    del rsess, ref
    release_memory()
    s.order = sorted(range(len(groups)), key=lambda i: -(groups[i].sensitivity or 0.0) / max(groups[i].elements, 1))

    sess = _mapped_session(path)
    cache: dict[int, float] = {0: s.all_quantized, len(groups): s.unquantized}

    def at(k: int) -> float:
        if k not in cache:
            flags = {groups[i].flag: True for i in s.order[:k]}
            cache[k] = ev.value(sess, flags)
            s.evaluations.append({"kept_groups": k, "value": cache[k]})
            log.info("budget %s: %d of %d groups kept -> %s", budget.text, k, len(groups), budget.show(cache[k]))
        return cache[k]

    lo, hi, k = 0, len(groups), 1
    while k < len(groups) and not budget.met(at(k)):  # exponential, then binary search of the prefix
        lo, k = k, k * 2
    hi = min(k, len(groups))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if budget.met(at(mid)):
            hi = mid
        else:
            lo = mid
    s.kept, s.searched = hi, at(hi)
    del sess
    release_memory()
    s.seconds = time.perf_counter() - t0
    return s
