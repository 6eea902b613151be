"""Q/DQ structure on small graphs built with onnx.helper: placement, dtypes, axes, INT4 packing."""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtforge.calibration import ActivationRanges, Precision, get_preset, quantize_model
from trtforge.calibration.stats import TensorStats
from trtforge.ort import session

K, N = 96, 40


def _graph(dtype=np.float32) -> onnx.ModelProto:
    """x -> LN -> {MatMul A, MatMul B} -> Add -> Softmax -> MatMul C -> + x (residual)."""
    rng = np.random.default_rng(0)
    et = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    init = [
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(K)).astype(dtype), "ln.weight"),
        numpy_helper.from_array((0.1 * rng.standard_normal(K)).astype(dtype), "ln.bias"),
        numpy_helper.from_array((0.1 * rng.standard_normal((K, N))).astype(dtype), "a.weight"),
        numpy_helper.from_array((0.1 * rng.standard_normal((K, N))).astype(dtype), "b.weight"),
        numpy_helper.from_array((0.1 * rng.standard_normal((N, K))).astype(dtype), "c.weight"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["ln"], name="/ln/LayerNormalization", axis=-1),
        helper.make_node("MatMul", ["ln", "a.weight"], ["a"], name="/a/MatMul"),
        helper.make_node("MatMul", ["ln", "b.weight"], ["b"], name="/b/MatMul"),
        helper.make_node("Add", ["a", "b"], ["ab"], name="/Add"),
        helper.make_node("Softmax", ["ab"], ["p"], name="/Softmax", axis=-1),
        helper.make_node("MatMul", ["p", "c.weight"], ["c"], name="/c/MatMul"),
        helper.make_node("Add", ["c", "x"], ["y"], name="/residual/Add"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", et, ["batch", "seq", K])],
                          [helper.make_tensor_value_info("y", et, ["batch", "seq", K])], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ranges(model: onnx.ModelProto, n: int = 6) -> ActivationRanges:
    """Statistics of ln and p from running the float graph on random inputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    et = model.graph.input[0].type.tensor_type.elem_type
    for t in ("ln", "p"):
        probe.graph.output.append(helper.make_tensor_value_info(t, et, None))
    sess = session(probe.SerializeToString())
    rng = np.random.default_rng(1)
    stats = {"ln": TensorStats("ln", K, keep=64), "p": TensorStats("p", N, keep=64)}
    dt = np.float16 if et == TensorProto.FLOAT16 else np.float32
    for _ in range(n):
        ln, p = sess.run(["ln", "p"], {"x": rng.standard_normal((2, 7, K)).astype(dt)})
        stats["ln"].update(ln)
        stats["p"].update(p)
    return ActivationRanges("test", stats)


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_qdq_only_on_gemm_inputs_with_quantized_weights(precision, dtype):
    model = _graph(dtype)
    recipe = get_preset("int8" if precision == "int8" else "fp8").replace(exclude=[], weight_granularity="channel")
    q, report = quantize_model(model, recipe, _ranges(model))
    onnx.checker.check_model(q, full_check=True)
    ops = _ops(q)
    # one shared pair for ln (A and B), one for p (C); three weight DQs
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 5
    prod = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.op_type in ("Add", "Softmax", "LayerNormalization"):
            assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in n.input), n.name
        if n.op_type == "MatMul":
            assert prod[n.input[0]].op_type == "DequantizeLinear" and prod[n.input[1]].op_type == "DequantizeLinear"
    inits = {t.name: t for t in q.graph.initializer}
    assert not {"a.weight", "b.weight", "c.weight"} & set(inits), "float weights must be replaced"
    want_w = TensorProto.INT8 if precision == "int8" else TensorProto.FLOAT8E4M3FN
    want_s = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # weights
            assert inits[n.input[0]].data_type == want_w
            assert helper.get_attribute_value(n.attribute[0]) == 1  # axis: output channel of [K, N]
            assert inits[n.input[1]].data_type == want_s and len(inits[n.input[1]].dims) == 1
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[1]].data_type == want_s and list(inits[n.input[1]].dims) == []
            zp = numpy_helper.to_array(inits[n.input[2]])
            assert float(np.asarray(zp, np.float32)) == 0.0
    assert report["counts"] == {"quantized": 3, "excluded": 0}
    # runs in ONNX Runtime and stays close to float
    x = np.random.default_rng(5).standard_normal((2, 7, K)).astype(dtype)
    ref = session(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float32)
    got = session(q.SerializeToString()).run(None, {"x": x})[0].astype(np.float32)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


def test_weights_dequantize_to_within_half_a_step():
    model = _graph()
    q, report = quantize_model(model, get_preset("int8").replace(exclude=[]), _ranges(model))
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "a.weight"))
    qw, s = inits["a.weight_quantized"], inits["a.weight_scale"]
    assert qw.dtype == np.int8 and s.shape == (N,)
    assert np.all(np.abs(qw * s[None, :] - w) <= s[None, :] / 2 + 1e-7)


def test_gemm_trans_b_quantizes_along_axis_0():
    rng = np.random.default_rng(0)
    w = (0.1 * rng.standard_normal((N, K))).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "bias"], ["y"], name="/fc/Gemm", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(N, np.float32), "bias")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    st = TensorStats("x", K, keep=16)
    st.update(rng.standard_normal((32, K)).astype(np.float32))
    q, _ = quantize_model(model, get_preset("int8").replace(exclude=[]), ActivationRanges("t", {"x": st}))
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized")
    assert helper.get_attribute_value(dq.attribute[0]) == 0
    assert [t for t in q.graph.initializer if t.name == "w_scale"][0].dims == [N]


def test_int4_blocks_fallback_packing_and_exclusion():
    model = _graph()
    recipe = get_preset("int4-rtn").replace(exclude=[], block_size=128)
    q, report = quantize_model(model, recipe, _ranges(model))
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain == "") == 21
    nodes = {n["node"]: n for n in report["nodes"]}
    # K = 96: 128 does not divide it, 64 does not, 32 does -> block 32, recorded
    assert nodes["/a/MatMul"]["block_size"] == 32 and "used block 32" in nodes["/a/MatMul"]["block_note"]
    # K = 40: no power-of-two block >= 16 divides it -> excluded with the reason
    assert nodes["/c/MatMul"]["status"] == "excluded" and "not divisible" in nodes["/c/MatMul"]["reason"]
    inits = {t.name: t for t in q.graph.initializer}
    t = inits["a.weight_quantized"]
    assert t.data_type == TensorProto.INT4 and list(t.dims) == [K, N]
    assert len(t.raw_data) == K * N // 2  # two values per byte
    vals = numpy_helper.to_array(t).astype(np.int8)
    assert vals.min() >= -8 and vals.max() <= 7
    raw = np.frombuffer(t.raw_data, np.uint8)
    low = (raw & 0x0F).astype(np.int8)
    low[low > 7] -= 16
    np.testing.assert_array_equal(low, vals.reshape(-1)[0::2])  # first element in the low nibble
    scale = numpy_helper.to_array(inits["a.weight_scale"])
    assert scale.shape == (K // 32, N)
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "a.weight_quantized")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    # no activation quantization in weight-only mode
    assert _ops(q)["QuantizeLinear"] == 0
    x = np.random.default_rng(5).standard_normal((2, 7, K)).astype(np.float32)
    ref = session(model.SerializeToString()).run(None, {"x": x})[0]
    got = session(q.SerializeToString()).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05
    assert ml_dtypes.int4 is not None


def test_int4_odd_output_dimension_is_excluded():
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/odd/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 33])],
        [numpy_helper.from_array(rng.standard_normal((64, 33)).astype(np.float32), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    st = TensorStats("x", 64, keep=8)
    st.update(rng.standard_normal((8, 64)).astype(np.float32))
    _, report = quantize_model(model, get_preset("int4-rtn").replace(exclude=[]), ActivationRanges("t", {"x": st}))
    assert report["nodes"][0]["status"] == "excluded" and "even last dimension" in report["nodes"][0]["reason"]


def test_exclusion_globs_and_only():
    model = _graph()
    r = _ranges(model)
    _, rep = quantize_model(model, get_preset("int8").replace(exclude=["/c/*"]), r)
    st = {n["node"]: n for n in rep["nodes"]}
    assert st["/c/MatMul"]["status"] == "excluded" and "'/c/*'" in st["/c/MatMul"]["reason"]
    _, rep = quantize_model(model, get_preset("int8").replace(exclude=[]), r, only={"/b/MatMul"})
    assert [n["node"] for n in rep["nodes"] if n["status"] == "quantized"] == ["/b/MatMul"]


def test_fp8_weights_are_e4m3_and_saturate():
    model = _graph()
    q, _ = quantize_model(model, get_preset("fp8").replace(exclude=[]), _ranges(model))
    t = next(t for t in q.graph.initializer if t.name == "a.weight_quantized")
    arr = numpy_helper.to_array(t)
    assert arr.dtype == ml_dtypes.float8_e4m3fn
    assert np.abs(arr.astype(np.float32)).max() == 448.0  # per-channel amax maps to the top of the range
    assert Precision.FP8.value == "fp8"


def test_per_tensor_weight_scales_option():
    model = _graph()
    q, rep = quantize_model(model, get_preset("fp8").replace(exclude=[], weight_granularity="tensor"), _ranges(model))
    onnx.checker.check_model(q, full_check=True)
    assert all(n["scale_shape"] == [] for n in rep["nodes"])
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert dq and all(not n.attribute for n in dq)  # no axis: one scale per tensor
    inits = {t.name: t for t in q.graph.initializer}
    assert all(list(inits[n.input[1]].dims) == [] for n in dq)  # a 0-d scale, not [1]
    # A and B read the same input: one shared scale (what TensorRT-LLM's fused QKV loader needs)
    sa = numpy_helper.to_array(inits["a.weight_scale"])
    sb = numpy_helper.to_array(inits["b.weight_scale"])
    assert sa == sb
