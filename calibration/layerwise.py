"""Layer-by-layer calibration: the float graph cut into blocks of decoder layers, each run as a
session of its own on every calibration batch, fed with the previous blocks' outputs.

In:  the same arguments as :func:`trtforge.calibration.collect.collect_ranges` (a graph loaded
     without its weights' data, its folder), ``layers_per_block``.
Out: the same ActivationRanges: every watched tensor sees the same batches in the same order, so
     the statistics equal the whole-graph probe's (up to float rounding of ONNX Runtime's fusions,
     which cannot cross a cut).

Memory: one block's weights (memory-mapped by its session, unmapped when the session goes) plus
one batch's activations; what later blocks need (the hidden state, the mask and rotary tables)
is spilled to a temporary folder on disk between blocks, so the peak does not grow with depth.
A node belongs to the layer its name says (``/layers.N/``, ``/h.N/``, ``/layer.N/``); a node
without one to the latest block among its inputs' producers (the embedding before the first
layer, the final norm after the last).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from trtforge.calibration.stats import TensorStats, count_batch
from trtforge.env import available_bytes
from trtforge.errors import CalibrationError
from trtforge.graph import needed_nodes, tensor_types
from trtforge.inputs import make_feeds
from trtforge.manifest import ModelDims
from trtforge.onnx_io import copy_fields
from trtforge.ort import (
    CPU_EP,
    NO_PREPACKING,
    graph_session,
    log_fallback,
    nodes_by_provider,
    ran_on,
    release_memory,
)
from trtforge.progress import Progress
from trtforge.textdata import Samples
from trtforge.vocab import CalibDevice

_LAYER = re.compile(r"/(?:layers|h|layer|blocks)\.(\d+)/")


def node_layers(model: onnx.ModelProto) -> list[int]:
    """Layer of every node (-1: before the first layer), never below its inputs' producers'.

    A node that reads no activation (only weights and constants: a quantized weight's
    DequantizeLinear, a Constant) and whose name names no layer goes with its first reader, so
    that a layer's weights are dequantized in that layer's block, not carried to it from the
    embedding block."""
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    producer_layer: dict[str, int] = {}
    named: list[int | None] = []
    floating: list[bool] = []
    live: set[str] = set(graph_inputs)  # tensors that depend on a graph input
    out = []
    for node in g.node:
        m = _LAYER.search(node.name or "")
        named.append(int(m.group(1)) if m else None)
        ins = [i for i in node.input if i]
        floating.append(named[-1] is None and not any(i in live for i in ins))
        if not floating[-1]:
            live.update(node.output)
        layer = max([named[-1] if named[-1] is not None else -1] + [producer_layer.get(i, -1) for i in ins])
        out.append(layer)
        for o in node.output:
            producer_layer[o] = layer
    if any(floating):
        readers: dict[str, list[int]] = {}
        for k, node in enumerate(g.node):
            for i in node.input:
                if i:
                    readers.setdefault(i, []).append(k)
        for k in range(len(g.node) - 1, -1, -1):  # readers first: chains of weight-only nodes follow theirs
            if floating[k]:
                later = [out[r] for o in g.node[k].output for r in readers.get(o, ())]
                if later:
                    out[k] = min(later)
    return out


def plan_blocks(model: onnx.ModelProto, watched: list[str], layers_per_block: int = 1) -> list[list[int]]:
    """Node indices of each block, in order; only nodes the watched tensors need."""
    need = needed_nodes(model, watched)
    layers = node_layers(model)
    blocks: dict[int, list[int]] = {}
    for k in sorted(need):
        b = -1 if layers[k] < 0 else layers[k] // max(1, layers_per_block)
        blocks.setdefault(b, []).append(k)
    return [blocks[b] for b in sorted(blocks)]


def _block_model(model: onnx.ModelProto, nodes: list[int], inputs: list[str], outputs: list[str],
                 types: dict[str, int]) -> onnx.ModelProto:
    g = model.graph
    sub = onnx.ModelProto()
    copy_fields(model, sub, skip="graph")
    sub.graph.name = g.name
    picked = [g.node[k] for k in nodes]
    sub.graph.node.extend(picked)
    used = {i for n in picked for i in n.input}
    sub.graph.initializer.extend(t for t in g.initializer if t.name in used)  # references, for external data
    graph_inputs = {i.name: i for i in g.input}
    for name in inputs:
        sub.graph.input.append(graph_inputs.get(name) or helper.make_tensor_value_info(name, types.get(name, 1), None))
    for name in outputs:
        sub.graph.output.append(helper.make_tensor_value_info(name, types.get(name, 1), None))
    return sub


# Above this, quantize goes layer by layer even where the model would fit: a whole-graph probe
# maps every weight (1x) beside a batch's activations and the libraries, which is already the
# issue's 1.25x bar on a 1.17B model; layer by layer holds one layer.
LAYERWISE_ABOVE = 2 << 30


def wants_layerwise(weight_bytes: int) -> bool:
    """Whether calibration (and quantize's float checks) go layer by layer:
    ``TRTFORGE_CALIB_LAYERWISE=1`` (or ``0``) decides; otherwise when the weights exceed 2 GiB
    (LAYERWISE_ABOVE: models kept in external data) or 60% of the memory available now
    (``MemAvailable``)."""
    forced = os.environ.get("TRTFORGE_CALIB_LAYERWISE", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if weight_bytes > LAYERWISE_ABOVE:
        return True
    avail = available_bytes()
    return avail is not None and weight_bytes > 0.6 * avail


def run_blocks(
    model: onnx.ModelProto,
    targets: list[str],
    batches: int,
    feeds_for,
    on_output,
    *,
    base_dir: str | Path | None = None,
    providers: list[str] | None = None,
    layers_per_block: int = 1,
    spill_dir: str | Path | None = None,
    block_done=None,
    desc: str = "layer by layer",
    where=None,
    ran: dict | None = None,
) -> int:
    """Run ``model`` block by block of decoder layers on ``batches`` batches, computing ``targets``.

    ``feeds_for(i)``: batch i's graph inputs (a dict; called once per block that reads them);
    ``on_output(i, name, x)``: each target's value for batch i, as its block computes it;
    ``block_done(names)``: after a block has run every batch, with the targets it computed;
    ``where(i)``: batch i's part of the progress line; ``ran``: filled with what the block
    sessions ran on (:func:`trtforge.ort.ran_on`, nodes summed over blocks). What later blocks read is spilled to a
    folder on disk (``spill_dir``, default a temporary one, emptied as they are read for the
    last time). Returns the number of blocks."""
    g = model.graph
    types = tensor_types(model)
    inits = {t.name for t in g.initializer}
    graph_inputs = {i.name for i in g.input}
    blocks = plan_blocks(model, targets, layers_per_block)
    last_use: dict[str, int] = {}
    block_inputs: list[list[str]] = []
    for b, nodes in enumerate(blocks):
        own = {o for k in nodes for o in g.node[k].output}
        ins = []
        for k in nodes:
            for i in g.node[k].input:
                if i and i not in own and i not in inits and i not in ins:
                    ins.append(i)
                    last_use[i] = b
        block_inputs.append(ins)
    target_set = set(targets)
    own_spill = spill_dir is None
    spill = Path(tempfile.mkdtemp(prefix="trtforge-layers-")) if own_spill else Path(spill_dir)
    spill.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[int, str], Path] = {}
    spilled = 0
    # one step per block and batch: a large model's line says which layer and batch it is at
    bar = Progress(len(blocks) * batches, desc)
    try:
        for b, nodes in enumerate(blocks):
            own = [o for k in nodes for o in g.node[k].output]
            carried = [o for o in own if last_use.get(o, -1) > b]
            outs = [o for o in own if o in target_set] + [o for o in carried if o not in target_set]
            if not outs:
                for _ in range(batches):
                    bar.step(f"layer block {b + 1}/{len(blocks)}")
                continue
            sess = graph_session(_block_model(model, nodes, block_inputs[b], outs, types), base_dir,
                                 providers=providers, arena=False, config=NO_PREPACKING)
            if ran is not None:
                _record_device(ran, sess)
            for bi in range(batches):
                feeds = {}
                base = None
                for name in block_inputs[b]:
                    if name in graph_inputs:
                        if base is None:
                            base = feeds_for(bi)
                        feeds[name] = base[name]
                    else:
                        feeds[name] = np.load(files[(bi, name)])
                results = sess.run(outs, feeds)
                feeds = base = None
                for name, x in zip(outs, results):
                    if name in carried:
                        spilled += 1  # a new name each time: files of finished tensors are deleted
                        path = spill / f"{bi}-{spilled}.npy"
                        np.save(path, x)
                        files[(bi, name)] = path
                    if name in target_set:
                        on_output(bi, name, x)
                results = None
                bar.step(f"layer block {b + 1}/{len(blocks)}" + (f", {where(bi)}" if where else ""))
            sess = None
            if block_done is not None:
                block_done([o for o in outs if o in target_set])
            for key in [k for k in files if last_use.get(k[1], -1) <= b]:  # no later block reads these
                files.pop(key).unlink(missing_ok=True)
            release_memory()
    finally:
        bar.close()
        if own_spill:
            shutil.rmtree(spill, ignore_errors=True)
    return len(blocks)


def _record_device(ran: dict, sess) -> None:
    counts = dict(ran.get("nodes_by_provider") or {})
    for k, v in (nodes_by_provider(sess) or {}).items():
        counts[k] = counts.get(k, 0) + v
    ran.clear()
    ran.update(ran_on(sess, counts))


def run_by_blocks(model: onnx.ModelProto, cases: list[dict[str, np.ndarray]], *, base_dir: str | Path | None,
                  outputs: list[str] | None = None, providers: list[str] | None = None,
                  desc: str = "float reference (layer by layer)") -> list[dict[str, np.ndarray]]:
    """The graph's ``outputs`` (default: all of them) on each feed dict of ``cases``, computed block
    by block (:func:`run_blocks`): one layer's weights in memory, not the model's."""
    names = outputs or [o.name for o in model.graph.output]
    got: list[dict[str, np.ndarray]] = [{} for _ in cases]

    def keep(i, name, x):
        got[i][name] = x

    run_blocks(model, names, len(cases), lambda i: cases[i], keep, base_dir=base_dir, providers=providers,
               desc=desc, where=lambda i: f"case {i + 1}/{len(cases)}")
    return [{n: g[n] for n in names} for g in got]


def layer_stats(
    model: onnx.ModelProto,
    watched: list[str],
    samples: Samples,
    dims: ModelDims | dict,
    *,
    groups: list[list[int]],
    bins: int = 2048,
    keep: int = 512,
    seed: int = 0,
    providers: list[str] | None = None,
    per_tensor: set[str] | None = None,
    base_dir: str | Path | None = None,
    layers_per_block: int = 1,
    spill_dir: str | Path | None = None,
    observe=None,
    block_done=None,
):
    """Statistics of every watched tensor and the run's meta (see the module docstring);
    ``groups``: the sample indices of each batch (the whole-graph probe's batches, so that the
    statistics are the same); ``observe(name, x)``, when given, sees every watched batch output
    after it is counted (GPTQ's Hessians); ``block_done(names, stats)`` is called when a block
    has seen every batch, with the watched tensors it produced (their statistics are final)."""
    if not samples.ids:
        raise CalibrationError("no calibration samples", "pass calibration text")
    g = model.graph
    graph_inputs = [i.name for i in g.input]
    float_dtype = np.float16 if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in g.input) else np.float32
    stats: dict[str, TensorStats] = {}
    starts = np.cumsum([0] + [len(idx) for idx in groups])

    def feeds_for(bi):
        idx = groups[bi]
        ids = np.stack([samples.ids[i] for i in idx])
        tt = np.stack([samples.token_type_ids[i] for i in idx]) if samples.token_type_ids else None
        return make_feeds(ids, graph_inputs, dims, float_dtype, tt)

    def count(bi, name, x):
        count_batch(stats, name, x, bi, per_tensor=per_tensor, bins=bins, keep=keep, seed=seed)
        if observe is not None:
            observe(name, x)

    ran: dict = {}
    nblocks = run_blocks(model, watched, len(groups), feeds_for, count, base_dir=base_dir, providers=providers,
                         layers_per_block=layers_per_block, spill_dir=spill_dir, ran=ran,
                         block_done=(lambda names: block_done(names, stats)) if block_done is not None else None,
                         desc="calibration (layer by layer)",
                         where=lambda bi: f"windows {starts[bi] + 1}-{starts[bi + 1]}/{starts[-1]}")
    missing = [w for w in watched if w not in stats]
    if missing:
        raise CalibrationError(f"layer-wise calibration did not reach {missing[0]}", "report this with the model")
    meta = {"batches": len(groups), "layer_blocks": nblocks, "layers_per_block": layers_per_block,
            "histogram_bins": bins, "kept_rows_per_tensor": keep,
            **(ran or {"device": CalibDevice.CPU.value, "providers": [CPU_EP]})}  # no block session: nothing ran
    log_fallback("layer-by-layer calibration", meta)
    return {w: stats[w] for w in watched}, meta
