"""engines/cpu_gemm.py: the exact reference of each fused integer GEMM the CPU target checks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtforge.engines.cpu_gemm import exact_matmul_integer_to_float, exact_matmul_nbits, summary


def _run(node, inputs, inits, out_shape):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("with_zp", [False, True])
def test_matmul_nbits_reference_matches_onnx_runtime(with_zp):
    rng = np.random.default_rng(0)
    k, n, block = 96, 24, 32  # K not a multiple of 64: the last block is partial for block 64 below too
    nb = k // block
    q = rng.integers(0, 16, (n, nb * block)).astype(np.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, nb, block // 2)
    scales = rng.uniform(0.01, 0.1, n * nb).astype(np.float32)
    inits = {"b": packed, "s": scales}
    ins = ["a", "b", "s"]
    if with_zp:
        z = rng.integers(0, 16, (n, nb + nb % 2)).astype(np.uint8)
        inits["z"] = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=0)
    a = rng.standard_normal((5, k)).astype(np.float32)
    y = _run(node, [("a", TensorProto.FLOAT, [5, k])], inits, [5, n]).run(None, {"a": a})[0]
    ref = exact_matmul_nbits(node, a, inits.__getitem__)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


def test_matmul_integer_to_float_reference_matches_onnx_runtime():
    rng = np.random.default_rng(1)
    k, n = 64, 16
    inits = {"b": rng.integers(0, 256, (k, n)).astype(np.uint8), "sa": np.array(0.02, np.float32),
             "sb": rng.uniform(0.001, 0.01, n).astype(np.float32), "za": np.array(128, np.uint8),
             "zb": np.full(n, 128, np.uint8), "bias": rng.standard_normal(n).astype(np.float32)}
    node = helper.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb", "za", "zb", "bias"], ["y"], domain="com.microsoft")
    a = rng.integers(0, 256, (3, 7, k)).astype(np.uint8)
    y = _run(node, [("a", TensorProto.UINT8, [3, 7, k])], inits, [3, 7, n]).run(None, {"a": a})[0]
    ref = exact_matmul_integer_to_float(node, a, inits.__getitem__)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-6  # U8U8 sums exactly


def test_summary_names_the_failed_and_the_worst():
    recs = [{"node": "a", "op": "MatMulIntegerToFloat", "max_rel_err": 1e-7, "passed": True},
            {"node": "b", "op": "MatMulIntegerToFloat", "max_rel_err": 0.2, "passed": False}]
    s = summary(recs)
    assert s["checked"] == 2 and s["worst"]["node"] == "b" and [r["node"] for r in s["failed"]] == ["b"]
