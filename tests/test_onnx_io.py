from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.onnx_io import save_streaming


def test_streaming_save_writes_the_same_model(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), f"w{i}") for i in range(5)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["y0"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["n", 32])], inits,
                          doc_string="graph doc")
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="t", doc_string="doc")
    helper.set_model_props(m, {"k": "v"})
    save_streaming(m, tmp_path / "m.onnx")
    back = onnx.load(str(tmp_path / "m.onnx"))
    assert back == m
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def test_export_attaches_weights_from_the_module(exported):
    art = exported("llama")
    assert art.manifest["model"]["weights"] == "attached from the module"
    names = {t.name for t in art.load().graph.initializer}
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names  # tied: both present
