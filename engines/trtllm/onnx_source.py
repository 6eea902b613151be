"""Read a quantize-stage ONNX graph back in Hugging Face terms.

In:  the ModelProto of a ``trtforge quantize`` artifact (Q/DQ INT8/FP8, or INT4 weight-only).
Out: ``OnnxSource``: per HF module (``model.layers.0.self_attn.q_proj``) its GEMM in HF layout
     [out, in] -- the float weight, or the quantized values and scales behind the
     DequantizeLinear, the scale of the activation QuantizeLinear in front of it, the factor of a
     smoothing Mul (``<act>_SmoothMul``) on its input, its bias -- and every other initializer
     keyed by the modules whose nodes read it (norms, embeddings).

Modules come from node names (the exporter's scopes, ``/model/model/layers.0/self_attn/q_proj/MatMul``),
not from initializer names: the TorchScript exporter deduplicates equal initializers (a fresh
model's all-ones norms, all-zero biases share one tensor) and the quantize stage renames the
copies it makes private, so an initializer's name need not be its module's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trtforge.errors import InputError
from trtforge.graph import GraphIndex
from trtforge.vocab import Precision

WRAPPER = "model"  # the export wrapper holds the HF model as attribute ``model`` (exporter/export.py)
_PASS = ("Cast", "Identity")
_QTYPES = {TensorProto.INT4: Precision.INT4, TensorProto.INT8: Precision.INT8, TensorProto.FLOAT8E4M3FN: Precision.FP8}


def module_of(node_name: str) -> str:
    """``/model/model/layers.0/input_layernorm/Mul_1`` -> ``model.layers.0.input_layernorm``."""
    parts = [p for p in node_name.strip("/").split("/") if p]
    if parts and parts[0] == WRAPPER:
        parts = parts[1:]
    return ".".join(parts[:-1])


@dataclass
class LinearSource:
    """One GEMM, every array in HF layout ([out, in] weights)."""

    module: str
    node: str
    in_features: int
    out_features: int
    weight: np.ndarray | None = None  # float [out, in] (not quantized)
    q: np.ndarray | None = None  # int8 values (int4/int8) or float8_e4m3fn, [out, in]
    qtype: Precision | None = None  # INT4 | INT8 | FP8
    scale: np.ndarray | None = None  # [] per tensor, [out] per channel, [out, in/block] blocks
    block: int | None = None
    act_scale: float | None = None  # the activation QuantizeLinear's scale (INT8/FP8)
    act_qtype: Precision | str | None = None  # "uint8": an unsigned activation QuantizeLinear
    pre_scale: np.ndarray | None = None  # smoothing Mul factor on the input: GEMM(x * pre_scale)
    bias: np.ndarray | None = None
    float_dtype: str = "float32"  # the graph's float type (scales, smoothing factors)

    @property
    def quantized(self) -> bool:
        return self.q is not None

    def dequantized(self) -> np.ndarray:
        """float64 [out, in]: what the ONNX DequantizeLinear computes, before rounding to its output type."""
        if self.q is None:
            return np.asarray(self.weight, np.float64)
        q = self.q.astype(np.float64)
        s = np.asarray(self.scale, np.float64)
        if self.block:
            return q * np.repeat(s, self.block, axis=1)
        return q * (s if s.ndim == 0 else s[:, None])


@dataclass
class OnnxSource:
    linears: dict[str, LinearSource]
    # module -> initializer names its (non-GEMM-weight) nodes read
    module_tensors: dict[str, list[str]] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)

    def param(self, module: str, shape: tuple[int, ...]) -> np.ndarray:
        """The one initializer of ``shape`` read by ``module``'s nodes (equal copies count once)."""
        names = [n for n in self.module_tensors.get(module, []) if tuple(self.initializers[n].dims) == tuple(shape)]
        arrays: list[np.ndarray] = []
        for n in dict.fromkeys(names):
            a = numpy_helper.to_array(self.initializers[n])
            if not any(a.dtype == b.dtype and np.array_equal(a, b) for b in arrays):
                arrays.append(a)
        if not arrays:
            raise InputError(
                f"the ONNX artifact has no tensor of shape {list(shape)} for module {module}",
                "export-checkpoint needs a trtforge quantize artifact of an unmodified export",
            )
        if len(arrays) > 1:
            raise InputError(f"module {module} reads {len(arrays)} different tensors of shape {list(shape)} in the ONNX graph",
                             "export-checkpoint cannot tell which is the parameter; report this with the artifact")
        return arrays[0]


def read_source(model: onnx.ModelProto) -> OnnxSource:
    idx = GraphIndex(model)
    inits = idx.initializers
    linears: dict[str, LinearSource] = {}
    used: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        lin = _linear(idx, node, used)
        if lin is None:
            continue
        if lin.module in linears:
            raise InputError(f"two GEMMs belong to module {lin.module} ({linears[lin.module].node}, {node.name})",
                             "export-checkpoint reads graphs written by trtforge export; report this with the artifact")
        linears[lin.module] = lin
    module_tensors: dict[str, list[str]] = defaultdict(list)
    for name in inits:
        if name in used:
            continue
        for mod in _reader_modules(idx, name):
            module_tensors[mod].append(name)
    return OnnxSource(linears, dict(module_tensors), inits)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _reader_modules(idx: GraphIndex, tensor: str) -> set[str]:
    """Modules of the nodes reading ``tensor`` (looking through Cast/Identity)."""
    out: set[str] = set()
    frontier, seen = [tensor], set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for c in idx.consumers.get(t, []):
            if c.op_type in _PASS:
                frontier.extend(c.output)
            elif c.name:
                out.add(module_of(c.name))
    return out


def _float_name(elem: int) -> str:
    return {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}.get(elem, "float32")


def _linear(idx: GraphIndex, node: onnx.NodeProto, used: set[str]) -> LinearSource | None:
    w = node.input[1]
    trans_b = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0):
        return None
    lin = LinearSource(module_of(node.name), node.name, 0, 0)
    if w in idx.initializers:
        t = idx.initializers[w]
        if len(t.dims) != 2 or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return None
        arr = numpy_helper.to_array(t)
        lin.weight = arr if trans_b else arr.T
        lin.float_dtype = _float_name(t.data_type)
        used.add(w)
    else:
        dq = idx.producer.get(w)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in idx.initializers:
            return None  # attention BMM (both operands are activations)
        qt = idx.initializers[dq.input[0]]
        st = idx.initializers.get(dq.input[1])
        if st is None or len(qt.dims) != 2 or qt.data_type not in _QTYPES:
            return None
        lin.qtype = _QTYPES[qt.data_type]
        q = numpy_helper.to_array(qt)
        q = q.astype(np.int8) if lin.qtype in (Precision.INT4, Precision.INT8) else q
        s = numpy_helper.to_array(st)
        lin.float_dtype = _float_name(st.data_type)
        axis, block = _attr(dq, "axis", 1), _attr(dq, "block_size", 0)
        # stored [K, N] for MatMul (axis 1 = N per channel, axis 0 + block along K), [N, K] for Gemm transB
        if block:
            lin.block = int(block)
            lin.q, lin.scale = (q, s) if trans_b else (q.T, s.T)
        else:
            lin.q = q if trans_b else q.T
            # per tensor: a scalar, or a one-element vector (the quantize stage writes shape [1])
            lin.scale = s.reshape(()) if s.size == 1 else s
            if lin.scale.ndim == 1 and lin.scale.shape[0] != lin.q.shape[0]:
                raise InputError(f"{node.name}: weight scale of {lin.scale.shape[0]} values along axis {axis} does not match "
                                 f"{lin.q.shape[0]} output channels", "re-run trtforge quantize")
        lin.q = np.ascontiguousarray(lin.q)
        lin.scale = np.array(lin.scale, order="C")  # ascontiguousarray would turn a scalar into shape [1]
        used.update({dq.input[0], dq.input[1]})
    shape = lin.weight.shape if lin.weight is not None else lin.q.shape
    lin.out_features, lin.in_features = int(shape[0]), int(shape[1])
    _bias(idx, node, lin, used)
    _activation(idx, node, lin, used)
    return lin


def _bias(idx: GraphIndex, node: onnx.NodeProto, lin: LinearSource, used: set[str]) -> None:
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in idx.initializers:
        lin.bias = numpy_helper.to_array(idx.initializers[node.input[2]])
        used.add(node.input[2])
        return
    c = idx.single_consumer(node.output[0])
    if c is not None and c.op_type == "Add":
        other = c.input[0] if c.input[1] == node.output[0] else c.input[1]
        t = idx.initializers.get(other)
        if t is not None and list(t.dims) == [lin.out_features]:
            lin.bias = numpy_helper.to_array(t)
            used.add(other)


def _activation(idx: GraphIndex, node: onnx.NodeProto, lin: LinearSource, used: set[str]) -> None:
    """The activation Q/DQ pair and the smoothing Mul in front of the GEMM, if any."""
    x = node.input[0]
    dq = idx.producer.get(x)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = idx.producer.get(dq.input[0])
        s = idx.const_value(dq.input[1])
        if q is None or q.op_type != "QuantizeLinear" or s is None or s.size != 1:
            raise InputError(f"{node.name}: its activation DequantizeLinear is not fed by a per-tensor QuantizeLinear",
                             "export-checkpoint reads graphs written by trtforge quantize")
        lin.act_scale = float(np.asarray(s, np.float64).reshape(()))
        zp = idx.initializers.get(dq.input[2]) if len(dq.input) > 2 else None
        lin.act_qtype = _QTYPES.get(zp.data_type, Precision.INT8) if zp is not None else "uint8"
        x = q.input[0]
    mul = idx.producer.get(x)
    if mul is not None and mul.op_type == "Mul" and mul.name.endswith("_SmoothMul"):
        const = [i for i in mul.input if i in idx.initializers]
        if len(const) == 1:
            f = numpy_helper.to_array(idx.initializers[const[0]])
            if f.shape == (lin.in_features,):
                lin.pre_scale = f
                used.add(const[0])
