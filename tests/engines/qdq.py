"""Q/DQ graphs in the quantize stage's format, for testing the build stage on its own.

The quantize stage (``trtforge.calibration``) is written separately; until its ``quantize()``
is available these helpers produce what it is specified to produce, so the build stage can be
tested against that contract:

* activations: ``QuantizeLinear(x, scale, zero_point=int8 0 | float8e4m3fn 0) -> DequantizeLinear
  -> MatMul input 0`` (per-tensor scale from max calibration);
* weights: INT8/FP8 initializer -> ``DequantizeLinear(axis=1)`` (output channel of ``W[K, N]``)
  -> MatMul input 1;
* INT4 weight-only: INT4 initializer -> ``DequantizeLinear(axis=0, block_size=B)`` -> MatMul
  (opset 21); activations stay float.

Scales have the graph's float type (fp16 in fp16 graphs). ``tiny_graph`` builds a two-GEMM graph
with onnx.helper; ``quantize_artifact`` quantizes every 2-D-weight MatMul of an export artifact
and writes a folder with a quantize-stage manifest.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FP8_MAX = 448.0


def _np_float(elem: int):
    return np.float16 if elem == TensorProto.FLOAT16 else np.float32


def _act_zero_point(precision: str, name: str) -> onnx.TensorProto:
    if precision == "fp8":
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, [], [0.0])
    return numpy_helper.from_array(np.array(0, np.int8), name)


def _quant_weight(w: np.ndarray, precision: str, name: str, block: int = 32):
    """(quantized initializer, scale initializer, DQ attributes) for W[K, N]."""
    wf = w.astype(np.float32)
    if precision == "int4-weight-only":
        k, n = wf.shape
        assert k % block == 0, (k, block)
        blocks = wf.reshape(k // block, block, n)
        scale = np.maximum(np.abs(blocks).max(axis=1) / 7.0, 1e-8)  # [K/B, N]
        q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).reshape(k, n).astype(np.int8)
        qt = helper.make_tensor(name, TensorProto.INT4, [k, n], q.flatten().tolist())
        return qt, scale.astype(w.dtype), {"axis": 0, "block_size": block}
    amax = np.maximum(np.abs(wf).max(axis=0), 1e-8)  # per output channel N
    if precision == "fp8":
        scale = amax / FP8_MAX
        q = (wf / scale).astype(ml_dtypes.float8_e4m3fn)
        qt = helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(w.shape), q.view(np.uint8).flatten().tobytes(), raw=True)
    else:
        scale = amax / 127.0
        q = np.clip(np.round(wf / scale), -127, 127).astype(np.int8)
        qt = numpy_helper.from_array(q, name)
    return qt, scale.astype(w.dtype), {"axis": 1}


def tiny_graph(precision: str = "int8", *, dtype=np.float32, opset: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 64] -> (Q/DQ) -> MatMul(W1 64x48) -> Relu -> (Q/DQ) -> MatMul(W2 48x32) -> y."""
    rng = np.random.default_rng(seed)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    w1 = (rng.standard_normal((64, 48)) * 0.2).astype(dtype)
    w2 = (rng.standard_normal((48, 32)) * 0.2).astype(dtype)
    nodes, inits = [], []
    x = "x"
    for i, (w, act_scale) in enumerate(((w1, 4.0 / 127), (w2, 3.0 / 127))):
        a = x
        if precision in ("int8", "fp8"):
            s = act_scale * (127 / FP8_MAX if precision == "fp8" else 1.0)
            inits += [numpy_helper.from_array(np.array(s, dtype), f"a{i}_scale"), _act_zero_point(precision, f"a{i}_zp")]
            nodes += [
                helper.make_node("QuantizeLinear", [x, f"a{i}_scale", f"a{i}_zp"], [f"a{i}_q"], name=f"a{i}_Q"),
                helper.make_node("DequantizeLinear", [f"a{i}_q", f"a{i}_scale", f"a{i}_zp"], [f"a{i}_dq"], name=f"a{i}_DQ"),
            ]
            a = f"a{i}_dq"
        if precision in ("int8", "fp8", "int4-weight-only"):
            qt, scale, attrs = _quant_weight(w, precision, f"w{i}_q", block=16)
            inits += [qt, numpy_helper.from_array(scale, f"w{i}_scale")]
            nodes.append(helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_scale"], [f"w{i}"], name=f"w{i}_DQ", **attrs))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [a, f"w{i}"], [out if i == 1 else f"m{i}"], name=f"mm{i}"))
        if i == 0:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name="relu"))
        x = out
    graph = helper.make_graph(
        nodes, "tiny_qdq",
        [helper.make_tensor_value_info("x", elem, ["batch", 64])],
        [helper.make_tensor_value_info("y", elem, ["batch", 32])],
        inits,
    )
    opset = opset or (21 if precision == "int4-weight-only" else 19)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def tiny_manifest(precision: str, *, batch_max: int | None = None) -> dict:
    """A manifest for ``tiny_graph`` in the format export/quantize write."""
    m = {
        "schema_version": 1, "kind": "onnx", "stage": "quantize" if precision not in ("fp32", "fp16") else "export",
        "source": {"path": "tiny", "architecture": "Tiny", "model_type": "tiny", "task": "feature-extraction",
                   "family": "encoder"},
        "model": {"file": "model.onnx", "external_data": None, "opset": 19, "dtype": "fp32"},
        "dims": {"num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": 64, "hidden_size": 64,
                 "vocab_size": 100, "max_positions": 64},
        "io": {
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}],
        },
    }
    if precision not in ("fp32", "fp16"):
        m["quantization"] = {"precision": precision, "recipe": {"name": "test"}, "nodes": []}
    return m


def write_artifact(folder: Path, model: onnx.ModelProto, manifest: dict) -> Path:
    """Write ``model.onnx`` + ``manifest.json`` (with a files table) like a stage does."""
    from trtforge.artifacts import file_table, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"))
    manifest = copy.deepcopy(manifest)
    manifest["files"] = file_table(folder)
    write_json(folder / "manifest.json", manifest)
    return folder


# --------------------------------------------------------------------------- real exports


def _calibrate(model: onnx.ModelProto, tensors: list[str], feeds: list[dict]) -> dict[str, float]:
    """Max |x| of each tensor over the feeds (max calibration)."""
    import onnxruntime as ort

    m = copy.deepcopy(model)
    known = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in known:
            m.graph.output.append(helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(tensors, 0.0)
    for f in feeds:
        outs = sess.run(tensors, f)
        for t, v in zip(tensors, outs, strict=True):
            amax[t] = max(amax[t], float(np.abs(v.astype(np.float32)).max()))
    return amax


def quantize_model(model: onnx.ModelProto, precision: str, feeds: list[dict], *, block: int = 32,
                   exclude: tuple[str, ...] = ("lm_head",)) -> tuple[onnx.ModelProto, list[dict]]:
    """Q/DQ every MatMul with a 2-D initializer weight (except names containing ``exclude``)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    fp16 = any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    # FP8 Q/DQ and fp16 scales need opset 19, blocked INT4 DequantizeLinear opset 21
    need = max(opset, 21 if precision == "int4-weight-only" else 19 if precision == "fp8" or fp16 else opset)
    if need > opset:
        from onnx import version_converter

        model = version_converter.convert_version(model, need)
    model = copy.deepcopy(model)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    targets = [n for n in g.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
               and not any(e in n.name or e in n.input[1] for e in exclude)]
    if precision == "int4-weight-only":
        targets = [n for n in targets if inits[n.input[1]].dims[0] % block == 0]
    acts = sorted({n.input[0] for n in targets})
    amax = _calibrate(model, acts, feeds) if precision in ("int8", "fp8") else {}
    new_nodes, new_inits, records, act_map = [], [], [], {}
    for a in acts if precision in ("int8", "fp8") else []:
        qmax = FP8_MAX if precision == "fp8" else 127.0
        elem = None
        for t in targets:
            if t.input[0] == a:
                elem = inits[t.input[1]].data_type
        s = max(amax[a], 1e-6) / qmax
        base = a.strip("/").replace("/", "_")
        new_inits += [numpy_helper.from_array(np.array(s, _np_float(elem)), f"{base}_scale"),
                      _act_zero_point(precision, f"{base}_zp")]
        new_nodes += [
            helper.make_node("QuantizeLinear", [a, f"{base}_scale", f"{base}_zp"], [f"{base}_q"], name=f"{base}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"], [f"{base}_dq"],
                             name=f"{base}_DequantizeLinear"),
        ]
        act_map[a] = f"{base}_dq"
    remove = set()
    for n in targets:
        w = inits[n.input[1]]
        qt, scale, attrs = _quant_weight(numpy_helper.to_array(w), precision, w.name + "_quantized", block)
        new_inits += [qt, numpy_helper.from_array(scale, w.name + "_scale")]
        new_nodes.append(helper.make_node("DequantizeLinear", [qt.name, w.name + "_scale"], [w.name + "_dq"],
                                          name=w.name + "_DequantizeLinear", **attrs))
        remove.add(w.name)
        n.input[1] = w.name + "_dq"
        if n.input[0] in act_map:
            n.input[0] = act_map[n.input[0]]
        records.append({"node": n.name, "weight": w.name, "precision": precision})
    keep = [t for t in g.initializer if t.name not in remove]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    g.node.extend(new_nodes)
    from trtforge.graph import topological_sort

    topological_sort(model)
    if precision in ("fp8", "int4-weight-only"):
        model.ir_version = max(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model, records


def quantize_artifact(art, out: Path, precision: str, feeds: list[dict], **kw):
    """An export artifact -> a quantize-stage artifact folder (model.onnx + manifest.json)."""
    from trtforge.artifacts import OnnxArtifact

    model, records = quantize_model(art.load(), precision, feeds, **kw)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in art.path.iterdir():
        if p.is_file() and p.suffix in (".json", ".txt", ".model", ".jinja") and p.name != "manifest.json":
            shutil.copy2(p, out / p.name)
    manifest = json.loads((art.path / "manifest.json").read_text())
    manifest["stage"] = "quantize"
    manifest["model"]["opset"] = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    manifest["quantization"] = {"precision": precision, "recipe": {"name": f"test-{precision}", "calibration": "max"},
                                "nodes": records}
    write_artifact(out, model, manifest)
    return OnnxArtifact.open(out)


def llama_feeds(batch: int, seq: int, vocab: int, n: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append({
            "input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
        })
    return out
