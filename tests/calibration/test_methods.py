"""The QuantMethod registry: every entry is reachable from a preset, and prepare/finish dispatch
through the registry, so a new method (a test-only one here) needs no edit of them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from trtforge.calibration import PRESETS, get_preset, methods_for, needs_rows, prepare, quantize_model
from trtforge.calibration.methods.base import PlanContext, QuantMethod, Role, Stat
from trtforge.calibration.methods.rtn import RoundToNearest
from trtforge.calibration.smoothing import Smoothing
from trtforge.errors import QuantizationError
from trtforge.graph import GraphIndex
from trtforge.ort import session
from trtforge.registry import QUANT_METHODS

from .test_qdq_graph import _graph, _ranges  # noqa: TID252


def test_every_registered_method_is_reachable_from_a_preset():
    used = {name: methods_for(recipe).names() for name, recipe in PRESETS.items()}
    for method in QUANT_METHODS:
        assert any(method.name in names for names in used.values()), (method.name, used)
    assert {"ranges", "smoothquant", "rtn", "awq"} <= set(QUANT_METHODS.names())


def test_presets_get_the_methods_their_fields_ask_for():
    assert methods_for(get_preset("int8-sq")).names() == ["smoothquant", "ranges", "rtn"]
    assert methods_for(get_preset("fp8")).names() == ["ranges", "rtn"]
    assert methods_for(get_preset("int4-awq")).names() == ["awq"]
    assert methods_for(get_preset("int4-rtn")).names() == ["rtn"]
    # rows: automatic alpha (int8-sq) and AWQ need them; fixed alpha with max ranges does not
    assert [needs_rows(get_preset(p)) for p in ("int8-sq", "int8-sq-0.5", "int8", "fp8", "int4-awq", "int4-rtn")] == [
        True, False, False, False, True, False]


class HalfWeights(RoundToNearest):
    """A weight method that quantizes half of each weight (a stand-in for GPTQ's updated weights)."""

    name = "test-half-weights"
    fallback = False

    def selected(self, recipe):
        return recipe.name == "test-half-weights"

    def plan_weight(self, ctx, d, granularity, shared_amax):
        plan = super().plan_weight(ctx, d, granularity, shared_amax)
        plan.weight = 0.5 * ctx.weight(d.gemm.node)
        return plan


class DoubleSmoothing(QuantMethod):
    """A smoothing method with a constant factor of 2, on INT4 (where no built-in smooths)."""

    name = "test-double-smoothing"
    roles = frozenset({Role.SMOOTHING})

    def selected(self, recipe):
        return recipe.name == "test-double-smoothing"

    def statistics(self, recipe):
        return frozenset({Stat.ROWS})

    def smooth(self, ctx: PlanContext, group):
        return Smoothing(group, np.full(group.channels, 2.0), None)


@pytest.fixture
def registered(monkeypatch):
    QUANT_METHODS.names()  # load the built-in entries first
    for m in (HalfWeights(), DoubleSmoothing()):
        monkeypatch.setitem(QUANT_METHODS._entries, m.name, m)


def _dequantized_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weight name -> the float weight its DequantizeLinear gives, via ONNX Runtime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    wanted = [n.output[0] for n in probe.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    for name in wanted:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    x = np.zeros((1, 2, 96), np.float32)
    return dict(zip(wanted, session(probe.SerializeToString()).run(wanted, {"x": x})))


def test_a_new_weight_method_is_dispatched_without_editing_prepare_or_finish(registered):
    model = _graph()
    recipe = get_preset("int8").replace(name="test-half-weights", exclude=[])
    assert methods_for(recipe).weights.name == "test-half-weights"  # takes over from rtn (a fallback)
    q, report = quantize_model(model, recipe, _ranges(model))
    rtn, _ = quantize_model(model, get_preset("int8").replace(exclude=[]), _ranges(model))
    half, full = _dequantized_weights(q), _dequantized_weights(rtn)
    assert half.keys() == full.keys() and len(half) == 3
    for k in half:
        np.testing.assert_allclose(half[k], 0.5 * full[k], rtol=0.02, atol=1e-3)
    assert report["counts"]["quantized"] == 3


def test_a_new_smoothing_method_is_dispatched_without_editing_prepare_or_finish(registered):
    model = _graph()
    recipe = get_preset("int4-rtn").replace(name="test-double-smoothing", exclude=[], block_size=32)
    methods = methods_for(recipe)
    assert methods.smoothing.name == "test-double-smoothing" and methods.weights.name == "rtn"
    assert needs_rows(recipe)  # its statistics count
    prep = prepare(model, recipe, _ranges(model), None)
    assert prep.smoothings and all(np.all(sm.s == 2.0) for sm in prep.smoothings.values())
    x = np.random.default_rng(3).standard_normal((2, 5, 96)).astype(np.float32)
    a = session(model.SerializeToString()).run(None, {"x": x})[0]
    b = session(prep.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)  # the fold keeps the function
    _, report = quantize_model(model, recipe, _ranges(model))
    quantized = [n for n in report["nodes"] if n["status"] == "quantized"]
    assert report["smoothing"] and quantized and all(n["smoothing"]["fold"] == "norm" for n in quantized)


def test_two_methods_claiming_one_role_are_refused(monkeypatch):
    QUANT_METHODS.names()

    class Other(HalfWeights):
        name = "test-other-weights"

    monkeypatch.setitem(QUANT_METHODS._entries, "test-half-weights", HalfWeights())
    monkeypatch.setitem(QUANT_METHODS._entries, "test-other-weights", Other())
    with pytest.raises(QuantizationError, match="selects 2 weights methods"):
        methods_for(get_preset("int8").replace(name="test-half-weights"))


@pytest.mark.parametrize("preset", ["int8-sq", "int4-awq", "fp8"])
def test_one_graph_index_per_pass(monkeypatch, preset):
    """Built once in prepare and once in finish (plus inlining's own), not once per GEMM."""
    built = []
    init = GraphIndex.__init__

    def counting(self, model, *args, **kwargs):
        built.append(1)
        init(self, model, *args, **kwargs)

    monkeypatch.setattr(GraphIndex, "__init__", counting)
    model = _graph()
    recipe = get_preset(preset).replace(exclude=[], block_size=32)
    _, report = quantize_model(model, recipe, _ranges(model))
    assert len(built) == 3, len(built)
    assert report["counts"]["quantized"] >= 2
