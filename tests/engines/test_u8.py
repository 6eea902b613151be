"""The symmetric INT8 -> UINT8 (zero point 128) rewrites change no value, and make ONNX Runtime's
integer GEMMs exact (U8U8) on every x86-64 CPU, with or without VNNI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtforge.engines.qdq_u8 import int8_weights_to_uint8, symmetric_int8_to_uint8

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


def _unsigned(model: onnx.ModelProto) -> onnx.ModelProto:
    new, _ = symmetric_int8_to_uint8(model)
    return int8_weights_to_uint8(new)[0]


def test_weights_become_uint8_plus_128_with_the_same_values():
    model = tiny_graph("int8")
    acts, _ = symmetric_int8_to_uint8(model)
    new, n = int8_weights_to_uint8(acts)
    assert n == 2
    onnx.checker.check_model(new)
    inits = {t.name: t for t in new.graph.initializer}
    old_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "w0_q" not in inits and "w1_q" not in inits  # the int8 copies are gone
    for n_ in new.graph.node:
        if n_.op_type == "DequantizeLinear" and n_.name.startswith("w"):
            w, zp = numpy_helper.to_array(inits[n_.input[0]]), numpy_helper.to_array(inits[n_.input[2]])
            assert w.dtype == np.uint8 and zp.dtype == np.uint8 and np.all(zp == 128)
            assert zp.shape == numpy_helper.to_array(inits[n_.input[1]]).shape == (w.shape[1],)  # per channel
            assert np.array_equal(w.astype(np.int16) - 128, old_inits[n_.name[:2] + "_q"].astype(np.int16))
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32) * 3
    assert np.array_equal(_run(model, {"x": x})[0], _run(new, {"x": x})[0])


def test_weights_read_elsewhere_or_not_by_a_gemm_stay_int8():
    model = tiny_graph("int8")
    # w0's dequantized value also feeds an Add: not only a GEMM weight, so it is left alone
    model.graph.node.append(helper.make_node("Add", ["w0", "w0"], ["w0_twice"]))
    model.graph.output.append(helper.make_tensor_value_info("w0_twice", TensorProto.FLOAT, None))
    new, n = int8_weights_to_uint8(model)
    assert n == 1
    types = {t.name: t.data_type for t in new.graph.initializer}
    assert types["w0_q"] == TensorProto.INT8 and types["w1_q_u8"] == TensorProto.UINT8
    for precision in ("fp8", "int4-weight-only"):
        m = tiny_graph(precision)
        assert int8_weights_to_uint8(m)[1] == 0


def test_integer_kernels_of_this_cpu():
    """U8U8 is exact on every CPU; U8S8 is exact only with VNNI (recorded, not asserted: CPU-dependent)."""
    from trtforge.engines.cpu import cpu_flags, probe_int8_gemm

    probe = probe_int8_gemm()
    assert probe["u8u8_max_rel_err"] == 0.0
    flags = cpu_flags()
    if flags is not None and "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags):
        # x86 without VNNI: vpmaddubsw saturates the probe's 255 * 127 + 255 * 127 pair sums
        assert probe["u8s8_max_rel_err"] > 0.1, probe


def test_optimized_outputs_stay_within_float_rounding():
    model = tiny_graph("int8")
    new = _unsigned(model)
    rng = np.random.default_rng(1)
    # typical values, and values that saturate the quantizers (u8 255 x large weights: what
    # overflows U8S8's int16 pair sums on CPUs without VNNI)
    x = np.concatenate([rng.standard_normal((16, 64)), rng.standard_normal((16, 64)) * 20]).astype(np.float32)
    ref = _run(model, {"x": x})[0]
    fused = _run(new, {"x": x}, "ORT_ENABLE_ALL")[0]
    assert np.abs(fused - ref).max() <= 1e-5 * np.abs(ref).max()


def test_signed_weights_would_saturate_without_vnni():
    """What the weight rewrite fixes, on the tiny graph: U8S8 error where the CPU has no VNNI."""
    from trtforge.engines.cpu import cpu_flags

    flags = cpu_flags()
    if flags is None or "avx2" not in flags or {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags):
        pytest.skip("needs an x86 CPU without VNNI (U8S8 is exact with VNNI)")
    model = tiny_graph("int8")
    acts_only, _ = symmetric_int8_to_uint8(model)
    x = (np.random.default_rng(1).standard_normal((16, 64)) * 20).astype(np.float32)
    ref = _run(model, {"x": x})[0]
    err = np.abs(_run(acts_only, {"x": x}, "ORT_ENABLE_ALL")[0] - ref).max() / np.abs(ref).max()
    assert err > 1e-3, err


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
