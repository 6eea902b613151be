"""Folding constant weight DequantizeLinear nodes gives exactly the values the nodes compute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trtforge.engines.qdq_fold import fold_weight_dequantize

from .qdq import tiny_graph


def _dq_outputs(model: onnx.ModelProto, names: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_empty_tensor_value_info(n))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), np.float16 if model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32)
    return sess.run(names, {"x": x})


@pytest.mark.parametrize("precision,elem,dtype", [
    ("fp8", TensorProto.FLOAT8E4M3FN, np.float32),
    ("fp8", TensorProto.FLOAT8E4M3FN, np.float16),
    ("int8", TensorProto.INT8, np.float16),
    ("int8", TensorProto.INT8, np.float32),
])
def test_folded_weights_equal_what_onnx_runtime_dequantizes(precision, elem, dtype):
    model = tiny_graph(precision, dtype=dtype)
    folded, n = fold_weight_dequantize(model, {elem})
    assert n == 2
    assert [x.op_type for x in folded.graph.node].count("DequantizeLinear") == 2  # the activation DQs stay
    assert not any(t.name in ("w0_q", "w1_q", "w0_scale") for t in folded.graph.initializer)
    onnx.checker.check_model(folded)
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    for name, ref in zip(("w0", "w1"), _dq_outputs(model, ["w0", "w1"]), strict=True):
        assert inits[name].dtype == ref.dtype and np.array_equal(inits[name], ref), name


def test_other_types_and_blocked_int4_are_left_alone():
    for precision in ("int8", "int4-weight-only"):
        model = tiny_graph(precision)
        same, n = fold_weight_dequantize(model, {TensorProto.FLOAT8E4M3FN})
        assert n == 0 and same.SerializeToString() == model.SerializeToString()
    int4 = tiny_graph("int4-weight-only")
    assert fold_weight_dequantize(int4, {TensorProto.INT4})[1] == 0  # blocked: MatMulNBits fuses it
