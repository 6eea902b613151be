from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from trtforge.engines.build import build, prepare
from trtforge.engines.precision import check_target, detect_precision, tensorrt_qdq_problems
from trtforge.engines.targets import resolve_target
from trtforge.errors import TargetError

from .qdq import tiny_graph, tiny_manifest


@pytest.mark.parametrize("precision,needs", [
    ("int8", {"fp32", "int8"}),
    ("fp8", {"fp32", "fp8"}),
    ("int4-weight-only", {"fp32", "int4-weight-only"}),
    ("fp32", {"fp32"}),
])
def test_precision_from_the_graph_alone(precision, needs):
    man = tiny_manifest("fp32")  # no quantization entry: the graph must tell
    info = detect_precision(man, tiny_graph(precision))
    assert info.precision == precision and set(info.needs) == needs and info.source == "graph"


def test_fp16_graph_and_manifest_precision():
    info = detect_precision(tiny_manifest("int8"), tiny_graph("int8", dtype=np.float16))
    assert info.precision == "int8" and info.float_dtype == "fp16" and info.source == "manifest"
    assert detect_precision(tiny_manifest("fp32"), tiny_graph("fp32", dtype=np.float16)).precision == "fp16"


def test_graph_fp8_is_refused_on_ampere_even_if_the_manifest_says_int8():
    info = detect_precision(tiny_manifest("int8"), tiny_graph("fp8"))
    assert info.precision == "int8" and "fp8" in info.needs
    check_target(resolve_target("sm_89"), info)
    with pytest.raises(TargetError, match="cannot run fp8"):
        check_target(resolve_target("ampere"), info)


def _with_zero_point(model: onnx.ModelProto, value: np.ndarray) -> onnx.ModelProto:
    for i, t in enumerate(model.graph.initializer):
        if t.name == "a0_zp":
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, "a0_zp"))
    return model


def test_tensorrt_qdq_constraints():
    assert tensorrt_qdq_problems(tiny_graph("int8")) == []
    assert tensorrt_qdq_problems(tiny_graph("fp8")) == []
    assert tensorrt_qdq_problems(tiny_graph("int4-weight-only")) == []
    asym = tensorrt_qdq_problems(_with_zero_point(tiny_graph("int8"), np.array(3, np.int8)))
    assert asym and all("symmetric" in p for p in asym)
    unsigned = tensorrt_qdq_problems(_with_zero_point(tiny_graph("int8"), np.array(128, np.uint8)))
    assert unsigned and "unsigned zero point" in unsigned[0]


def test_refusals_happen_before_looking_for_tensorrt(tiny_art, tmp_path):
    # TensorRT is not installed here: a precision refusal must still be the error users see.
    with pytest.raises(TargetError, match="cannot run fp8"):
        build(tiny_art("fp8"), "ampere", tmp_path / "out")
    bad = tiny_art("int8", model=_with_zero_point(tiny_graph("int8"), np.array(5, np.int8)), name="asym")
    with pytest.raises(TargetError, match="TensorRT cannot build this graph.*symmetric"):
        build(bad, "sm_90", tmp_path / "out")
    with pytest.raises(TargetError, match="cannot run int4"):
        prepare(tiny_art("int4-weight-only"), "sm_75")
    assert not (tmp_path / "out").exists()


def test_asymmetric_graph_still_builds_for_cpu(tiny_art, tmp_path):
    bad = tiny_art("int8", model=_with_zero_point(tiny_graph("int8"), np.array(5, np.int8)), name="asym")
    art = build(bad, "cpu", tmp_path / "cpu")
    assert art.manifest["build"]["uint8_activation_groups"] == 1  # the symmetric second pair only


def test_quantized_tiny_llama_fp8_refused_for_ampere_and_planned_for_hopper(quantized):
    art = quantized("fp8")
    with pytest.raises(TargetError, match="int8-sq or int4-awq"):
        prepare(art, "ampere")
    _, plan = prepare(art, "hopper")
    assert plan.precision.precision == "fp8"


def test_quantize_without_zero_point_is_a_tensorrt_problem():
    model = tiny_graph("int8")
    for n in model.graph.node:
        if n.name == "a0_Q":
            del n.input[2]
        if n.name == "a0_DQ":
            del n.input[2]
    problems = tensorrt_qdq_problems(model)
    assert any("no zero point" in p for p in problems)
