"""Range collection: run the float ONNX model on calibration samples, keep streaming statistics.

In:  an ONNX file, the names of the tensors to watch (GEMM inputs), calibration Samples.
Out: ActivationRanges, saved as ``ranges.json`` (statistics) plus ``ranges.samples.npz`` (the
     bounded token-row reservoirs; numpy arrays, no pickle) and, when a recipe asked for them
     (GPTQ), ``ranges.hessians.npz``: X^T X / rows of each GEMM input, accumulated batch by batch
     in float32 (K^2 floats per distinct input; GEMMs reading one input share it; layer by layer,
     each layer's are spilled to disk when its block is done: calibration/hessians.py). Reusable
     with ``--ranges`` to re-quantize without running calibration again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from trtforge.artifacts import read_json, sha256_json, write_json
from trtforge.calibration.hessians import Hessians
from trtforge.calibration.layerwise import layer_stats, wants_layerwise
from trtforge.calibration.spill import RowsOnDisk, SpillFolder
from trtforge.calibration.stats import TensorStats, count_batch
from trtforge.errors import CalibrationError, InputError
from trtforge.graph import needed_subgraph, tensor_types
from trtforge.inputs import make_feeds
from trtforge.manifest import ModelDims
from trtforge.onnx_io import has_external_data, weight_bytes
from trtforge.ort import NO_PREPACKING, graph_session, log_fallback, ran_on, release_memory
from trtforge.progress import Progress
from trtforge.textdata import Samples

log = logging.getLogger(__name__)
RANGES_VERSION = 1
# The probe returns every watched activation of a batch at once; batches are cut to keep that
# under this (a 1.1B LLaMA returns 580 MB for one 256-token sequence, GEMM and attention inputs).
OUTPUT_BUDGET = 256 << 20


@dataclass
class ActivationRanges:
    model_key: str  # identifies the graph the statistics belong to (tensor names + shapes)
    tensors: dict[str, TensorStats]
    calibration: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # X^T X / rows per GEMM input (float32 [K, K]), only when the recipe reads them (GPTQ);
    # a Hessians store (on disk, read one at a time) or a plain dict
    hessians: Mapping[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        hess_file, hess_index = None, {}
        if self.hessians:
            hess = path.with_suffix(".hessians.npz")
            tmp = hess.with_name(f".{hess.name}.tmp.npz")
            store = self.hessians if isinstance(self.hessians, Hessians) else Hessians(dict(self.hessians))
            hess_index = store.save_npz(tmp)  # one at a time; dense floats: no compression
            tmp.replace(hess)
            hess_file = hess.name
        arrays = {f"t{i}": s.sample for i, s in enumerate(self.tensors.values()) if s.sample is not None}
        names = {f"t{i}": n for i, (n, s) in enumerate(self.tensors.items()) if s.sample is not None}
        if arrays:
            npz = path.with_suffix(".samples.npz")
            tmp = npz.with_name(f".{npz.name}.tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(npz)
        write_json(path, {
            "version": RANGES_VERSION,
            "model_key": self.model_key,
            "calibration": self.calibration,
            "meta": self.meta,
            "samples_file": path.with_suffix(".samples.npz").name if arrays else None,
            "samples_index": names,
            "hessians_file": hess_file,
            "hessians_index": hess_index,
            "tensors": [s.to_json() for s in self.tensors.values()],
        })
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationRanges:
        path = Path(path)
        d = read_json(path, "ranges file")
        if not isinstance(d, dict) or d.get("version") != RANGES_VERSION or "tensors" not in d:
            raise InputError(f"{path} is not a trtforge ranges file (version {RANGES_VERSION})", "re-run calibration to write one")
        samples: dict[str, np.ndarray] = {}
        if d.get("samples_file"):
            npz = path.parent / d["samples_file"]
            if npz.exists():
                with np.load(npz, allow_pickle=False) as z:
                    samples = {d["samples_index"][k]: z[k] for k in z.files}
        hessians: Mapping[str, np.ndarray] = {}
        if d.get("hessians_file") and (path.parent / d["hessians_file"]).exists():  # read when GPTQ asks, one at a time
            hessians = Hessians.from_npz(path.parent / d["hessians_file"], d["hessians_index"])
        tensors = {t["name"]: TensorStats.from_json(t, samples.get(t["name"])) for t in d["tensors"]}
        return cls(d["model_key"], tensors, d.get("calibration", {}), d.get("meta", {}), hessians)

    @property
    def has_samples(self) -> bool:
        return any(s.sample is not None for s in self.tensors.values())


def model_key(model: onnx.ModelProto, watched: list[str]) -> str:
    """A key that changes when the watched tensors or the graph's inputs change."""
    return sha256_json({
        "watched": sorted(watched),
        "inputs": [(i.name, str(i.type)) for i in model.graph.input],
        "nodes": len(model.graph.node),
    })


def batches(samples: Samples, batch_size: int, sample_bytes=None):
    """Group equal-length samples so no batch needs padding (statistics never see pad tokens).

    ``sample_bytes(length)``: what the probe returns for one sample of that length; batches are
    cut so that a batch's outputs stay under OUTPUT_BUDGET (big models: one sequence at a time)."""
    by_len: dict[int, list[int]] = {}
    for i, a in enumerate(samples.ids):
        by_len.setdefault(len(a), []).append(i)
    out = []
    for length in sorted(by_len):
        idx = by_len[length]
        size = batch_size
        if sample_bytes is not None:
            size = max(1, min(batch_size, int(OUTPUT_BUDGET // max(sample_bytes(length), 1))))
        for k in range(0, len(idx), size):
            out.append(idx[k : k + size])
    return out


def _output_bytes(run, ids: np.ndarray):
    """``bytes(length)`` of the probe's outputs for one sample, fitted as ``a L + c L^2`` (the
    attention scores grow with L^2) on two short prefixes of a calibration sample; the runs only
    measure and are not counted. None where the prefixes cannot run."""
    n = len(ids)
    l1, l2 = max(1, min(4, n // 2)), max(1, min(8, n))
    try:
        b1 = sum(x.nbytes for x in run(ids[None, :l1]))
        b2 = sum(x.nbytes for x in run(ids[None, :l2])) if l2 > l1 else b1
    except Exception:  # noqa: BLE001 - onnxruntime's own types; the budget is only an optimisation
        return None
    if l2 <= l1:
        return lambda length: b1 * length / l1
    c = max((b2 / l2 - b1 / l1) / (l2 - l1), 0.0)
    a = b1 / l1 - c * l1
    return lambda length: max(a * length + c * length * length, b2 * length / l2)


def _probe_session(model: onnx.ModelProto, watched: list[str], types: dict[str, int],
                   base_dir: str | Path | None, providers: list[str] | None):
    """ONNX Runtime on the model with the watched tensors as its only outputs, weights read where
    they are (memory-mapped, no packed copy), no memory arena to keep a batch's outputs.

    A graph with external data gets a probe of its own holding only the nodes and the weight
    references the watched tensors need: its own outputs (logits, the KV cache) and what only they
    read (the lm_head GEMM and its weight) are left out, and the probe is a few megabytes however
    large the model. A graph holding its weights is probed as itself (its outputs swapped for the
    watched tensors while ONNX Runtime loads it), never copied."""
    def outputs(into, known):
        for name in watched:
            into.append(known.get(name) or helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))

    kw = {"providers": providers, "arena": False, "config": NO_PREPACKING}
    if has_external_data(model) and base_dir is not None:
        return graph_session(needed_subgraph(model, watched, outputs), base_dir, **kw)
    graph_outputs = model.graph.output
    saved = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph_outputs]
    del graph_outputs[:]
    outputs(graph_outputs, {o.name: o for o in saved})
    try:
        return graph_session(model, base_dir, **kw)
    finally:
        del graph_outputs[:]
        graph_outputs.extend(saved)


def _collect_layerwise(model, watched, samples, dims, *, batch_size, hessians=None, **kw) -> ActivationRanges:
    """collect_ranges layer block by layer block (calibration/layerwise.py); same batches, and
    the same Hessians (GPTQ) accumulated from each block's outputs. A block's Hessians and kept
    rows are final when it is done (every batch has run through it): they are spilled to a
    temporary folder (calibration/spill.py, hessians.py) and their memory freed, so memory holds
    one block's, not the model's (Hessians: 22 GB at 7B)."""
    groups = batches(samples, batch_size)
    hess: dict[str, np.ndarray] = {}
    store = Hessians.spilled() if hessians else Hessians()
    rows = SpillFolder("trtforge-rows-")
    observe = None
    if hessians:
        def observe(name, x):
            if name in hessians:
                _add_hessian(hess, name, x)

    def block_done(names, stats):
        for name in names:
            st = stats[name]
            if st.sample is not None and not isinstance(st.sample, RowsOnDisk):  # final: read back when searched
                st.sample = RowsOnDisk(rows, st.sample)
            h = hess.pop(name, None)
            if h is not None:
                h /= max(st.count, 1)
                store.put(name, h)
                del h
    stats, meta = layer_stats(model, watched, samples, dims, groups=groups, observe=observe,
                              block_done=block_done, **kw)
    meta["batch_size"] = batch_size
    _describe_hessians(store, meta)
    return ActivationRanges(model_key(model, watched), stats, samples.describe(), meta, store)


def collect_ranges(
    model: onnx.ModelProto,
    watched: list[str],
    samples: Samples,
    dims: ModelDims | dict,
    *,
    batch_size: int = 8,
    bins: int = 2048,
    keep: int = 512,
    seed: int = 0,
    providers: list[str] | None = None,
    per_tensor: set[str] | None = None,
    base_dir: str | Path | None = None,
    hessians: set[str] | None = None,
    layerwise: bool | None = None,
    layers_per_block: int = 1,
) -> ActivationRanges:
    """``per_tensor`` tensors (attention BMM inputs, whose last axis may be the sequence) get
    per-tensor statistics only and no kept rows. ``base_dir``: where the model's external data
    is (a graph loaded without it); the probe reads the weights from there, never copying them.
    ``hessians``: GEMM inputs whose X^T X to accumulate (GPTQ), one float32 [K, K] each.
    ``layerwise`` (None: :func:`.layerwise.wants_layerwise` decides, for graphs whose weights
    stay in their files): calibrate block by block of ``layers_per_block`` decoder layers, so
    that memory holds one block's weights, not the model's."""
    if not samples.ids:
        raise CalibrationError("no calibration samples", "pass calibration text")
    if base_dir is not None and has_external_data(model) and (
            wants_layerwise(weight_bytes(model)) if layerwise is None else layerwise):
        return _collect_layerwise(model, watched, samples, dims, batch_size=batch_size, bins=bins, keep=keep,
                                  seed=seed, providers=providers, per_tensor=per_tensor, base_dir=base_dir,
                                  layers_per_block=layers_per_block, hessians=hessians)
    types = tensor_types(model)
    sess = _probe_session(model, watched, types, base_dir, providers)
    where = ran_on(sess)
    log_fallback("calibration", where)
    input_names = [i.name for i in model.graph.input]
    float_dtype = np.float16 if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input) else np.float32
    stats: dict[str, TensorStats] = {}
    hess: dict[str, np.ndarray] = {}

    def run(ids: np.ndarray, tt: np.ndarray | None = None) -> list[np.ndarray]:
        return sess.run(watched, make_feeds(ids, input_names, dims, float_dtype, tt))

    cost = _output_bytes(run, np.asarray(samples.ids[0])) if len(samples.ids) > 1 and batch_size > 1 else None
    groups = batches(samples, batch_size, cost)
    total_windows = sum(len(idx) for idx in groups)
    bar = Progress(len(groups), "calibration")
    done_windows = 0
    for bi, idx in enumerate(groups):
        ids = np.stack([samples.ids[i] for i in idx])
        tt = np.stack([samples.token_type_ids[i] for i in idx]) if samples.token_type_ids else None
        outs = run(ids, tt)
        for k, name in enumerate(watched):
            x, outs[k] = outs[k], None  # each batch output freed once counted
            count_batch(stats, name, x, bi, per_tensor=per_tensor, bins=bins, keep=keep, seed=seed)
            if hessians and name in hessians:
                _add_hessian(hess, name, x)
        done_windows += len(idx)
        bar.step(f"windows {done_windows}/{total_windows}")
    bar.close()
    # no timings here: ranges.json is content, identical for identical inputs (timings go to manifests)
    meta = {
        "batches": len(groups),
        "batch_size": batch_size,
        "histogram_bins": bins,
        "kept_rows_per_tensor": keep,
        **where,  # which device produced these statistics (not part of model_key)
    }
    sess = run = None  # noqa: F841 - the session goes now, not when the caller is done
    release_memory()  # the probe's weights and activations, back to the system before the next step
    _finish_hessians(hess, stats, meta)
    return ActivationRanges(model_key(model, watched), stats, samples.describe(), meta, hess)


def _finish_hessians(hess: dict[str, np.ndarray], stats: dict, meta: dict) -> None:
    """Accumulated X^T X divided by the rows counted, and their size in the meta."""
    for name, h in hess.items():
        h /= max(stats[name].count, 1)
    _describe_hessians(hess, meta)


def _describe_hessians(hess: Mapping[str, np.ndarray], meta: dict) -> None:
    if hess:
        nbytes = hess.nbytes() if isinstance(hess, Hessians) else sum(h.nbytes for h in hess.values())
        meta["hessians"] = {"tensors": len(hess), "mib": round(nbytes / 2**20, 1),
                            "dtype": "float32", "what": "X^T X / rows of each GEMM input"}


def _add_hessian(hess: dict[str, np.ndarray], name: str, x: np.ndarray) -> None:
    """X^T X of one batch's rows into the tensor's float32 accumulator (one sgemm per batch)."""
    rows = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    h = hess.get(name)
    if h is None:
        hess[name] = rows.T @ rows
    else:
        h += rows.T @ rows
