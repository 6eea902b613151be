"""The symmetric INT8 -> UINT8 (zero point 128) rewrite changes no value."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtforge.engines.qdq_u8 import symmetric_int8_to_uint8

from .qdq import tiny_graph


def _run(model: onnx.ModelProto, feeds: dict, level: str = "ORT_DISABLE_ALL") -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _zero_points(model: onnx.ModelProto) -> dict[str, int]:
    inits = {t.name: t for t in model.graph.initializer}
    return {n.name: inits[n.input[2]].data_type for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rewrite_is_bit_identical(dtype):
    model = tiny_graph("int8", dtype=dtype)
    new, n = symmetric_int8_to_uint8(model)
    assert n == 2
    zps = _zero_points(new)
    assert zps["a0_Q"] == zps["a0_DQ"] == zps["a1_Q"] == TensorProto.UINT8
    assert not any(t.name == "a0_zp" for t in new.graph.initializer)  # the int8 zero points are gone
    inits = {t.name: t for t in new.graph.initializer}
    assert inits["w0_q"].data_type == TensorProto.INT8  # weights stay signed behind their DequantizeLinear
    onnx.checker.check_model(new)
    rng = np.random.default_rng(0)
    # normal values, values that saturate both ends, exact half steps (rounding ties)
    x = np.concatenate([rng.standard_normal((64, 64)) * 2, rng.standard_normal((8, 64)) * 50,
                        np.tile((np.arange(64) - 32.5) * (4.0 / 127), (4, 1))]).astype(dtype)
    before, after = _run(model, {"x": x}), _run(new, {"x": x})
    assert np.array_equal(before[0], after[0])
    # the quantized activations themselves: (q_u8 - 128) == q_s8 for every element
    for m in (model, new):
        m.graph.output.append(helper.make_empty_tensor_value_info("a0_q"))
    q_s8, q_u8 = _run(model, {"x": x})[1], _run(new, {"x": x})[1]
    assert q_s8.dtype == np.int8 and q_u8.dtype == np.uint8
    assert np.array_equal(q_u8.astype(np.int16) - 128, q_s8.astype(np.int16))


def test_optimized_outputs_stay_within_float_rounding():
    model = tiny_graph("int8")
    new, _ = symmetric_int8_to_uint8(model)
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    ref = _run(model, {"x": x})[0]
    fused = _run(new, {"x": x}, "ORT_ENABLE_ALL")[0]
    assert np.allclose(fused, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp8", "int4-weight-only"])
def test_fp8_and_int4_are_untouched(precision):
    model = tiny_graph(precision)
    new, n = symmetric_int8_to_uint8(model)
    assert n == 0 and new.SerializeToString() == model.SerializeToString()


def test_pairs_that_are_not_plain_qdq_are_untouched():
    model = tiny_graph("int8")
    # a0_q also read by another node: not a plain Q->DQ pair, so it must keep its type
    model.graph.node.append(helper.make_node("Cast", ["a0_q"], ["a0_cast"], to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("a0_cast", TensorProto.FLOAT, None))
    # a nonzero zero point: asymmetric, never rewritten
    for i, t in enumerate(model.graph.initializer):
        if t.name == "a1_zp":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.array(3, np.int8), "a1_zp"))
    new, n = symmetric_int8_to_uint8(model)
    assert n == 0 and _zero_points(new)["a0_Q"] == TensorProto.INT8


def test_real_quantized_llama_is_bit_identical(quantized):
    art = quantized("int8")
    model = art.load()
    new, n = symmetric_int8_to_uint8(model)
    assert n == sum(1 for x in model.graph.node if x.op_type == "QuantizeLinear") > 0
    from .qdq import llama_feeds

    feeds = llama_feeds(2, 12, art.manifest["dims"]["vocab_size"], n=1, seed=3)[0]
    assert np.array_equal(_run(model, feeds)[0], _run(new, feeds)[0])
