"""GPTQ (issue 15): INT4 weights with error feedback through each GEMM input's Hessian.

The Hessians come from the streaming calibration pass (X^T X / rows per GEMM input); the plan
must store exactly the integers GPTQ chose as a block DequantizeLinear, beat round-to-nearest
on the output error it minimises and on the model's outputs, and with AWQ's scales work on
the scaled weights (H / s s^T).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from trtforge.calibration import get_preset, quantize
from trtforge.calibration.methods.base import methods_for
from trtforge.calibration.methods.gptq import gptq_fixed_scales, gptq_quantize, proxy_loss
from trtforge.errors import InputError, RecipeError
from trtforge.numerics import QMAX, as_scale, fake_quant, int4_fake, weight_scales
from trtforge.vocab import Precision

from .test_quantize import CALIB, rel_error  # noqa: TID252

SMALL = dict(num_samples=16, seq_len=64)


def _problem(k=256, n=48, t=1024, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(t, k)) @ (np.eye(k) + 0.2 * rng.normal(size=(k, k)))
    x[:, 5] *= 25.0  # an outlier channel, as real decoders have
    w = rng.normal(size=(k, n)).astype(np.float32)
    return w, x.T @ x / t


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_gptq_lowers_the_output_error_and_stores_exact_integers(block, act_order):
    w, h = _problem()
    q, scales, info = gptq_quantize(w, h, block, act_order=act_order)
    assert scales.shape == (w.shape[0] // block, w.shape[1])
    ints = q / np.repeat(scales.astype(np.float32), block, axis=0)
    assert np.abs(ints - np.rint(ints)).max() < 1e-4 and np.rint(ints).min() >= -8 and np.rint(ints).max() <= 7
    assert proxy_loss(w, q, h) < 0.6 * proxy_loss(w, int4_fake(w, block), h)
    assert info["act_order"] is act_order and info["damp"] == 0.01


def test_dead_inputs_and_a_singular_hessian_are_handled():
    w, h = _problem(k=128)
    h[7, :] = h[:, 7] = 0.0  # an input channel never active in calibration
    q, _, info = gptq_quantize(w, h, 64)
    assert info["dead_inputs"] == 1 and np.all(q[7] == 0)
    rank1 = np.outer(np.arange(1.0, 129.0), np.arange(1.0, 129.0))  # PSD, rank 1: dampening makes it PD
    q, _, info = gptq_quantize(w, rank1, 64)
    assert np.isfinite(q).all()


def test_recipes_select_gptq_and_check_their_options():
    assert methods_for(get_preset("int4-gptq")).names() == ["gptq"]
    m = methods_for(get_preset("int4-awq-gptq"))
    assert m.weights.name == "gptq" and m.smoothing.name == "gptq"
    assert methods_for(get_preset("int4-awq")).weights.name == "awq"
    with pytest.raises(RecipeError, match="gptq_damp"):
        get_preset("int4-gptq").replace(gptq_damp=0.0)


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    src = exported("llama", task="causal-lm", outliers=True)
    out = tmp_path_factory.mktemp("gptq")
    arts = {r: quantize(src, get_preset(r).replace(**SMALL), out / r, calib=CALIB)
            for r in ("int4-rtn", "int4-gptq", "int4-awq", "int4-awq-gptq")}
    return src, arts


def test_gptq_artifact_is_block_dequantize_and_beats_rtn(quantized):
    src, arts = quantized
    art = arts["int4-gptq"]
    model = onnx.load(str(art.model_path))
    onnx.checker.check_model(model)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in model.graph.initializer}
    assert dq and all(len(n.input) == 2 for n in dq)  # symmetric: no zero point
    for n in dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4
        assert {a.name for a in n.attribute} >= {"axis", "block_size"}
    q = art.manifest["quantization"]
    nodes = [n for n in q["nodes"] if n["status"] == "quantized"]
    assert nodes and all("gptq" in n for n in nodes)
    assert all(n["gptq"]["error_vs_rtn"] <= 1.0 for n in nodes)
    assert np.median([n["gptq"]["error_vs_rtn"] for n in nodes]) < 0.8
    assert (art.path / "ranges.hessians.npz").exists()
    assert rel_error(src, art) < rel_error(src, arts["int4-rtn"])
    # the stored scales are the plan's: one per (block, output channel)
    n0 = nodes[0]
    scale = numpy_helper.to_array(inits[next(d.input[1] for d in dq if d.input[0].startswith(n0["weight"]))])
    assert list(scale.shape) == n0["scale_shape"]


def test_awq_then_gptq_uses_awq_scales_and_beats_awq_alone(quantized):
    src, arts = quantized
    q = arts["int4-awq-gptq"].manifest["quantization"]
    assert q["smoothing"] and q["smoothing_check"]["max_rel_err"] < 1e-3
    assert all("gptq" in n for n in q["nodes"] if n["status"] == "quantized")
    assert rel_error(src, arts["int4-awq-gptq"]) < rel_error(src, arts["int4-rtn"])


def test_reused_ranges_without_hessians_are_refused(quantized, tmp_path):
    src, arts = quantized
    with pytest.raises(InputError, match="Hessians"):
        quantize(src, get_preset("int4-gptq"), tmp_path / "x", ranges=arts["int4-awq"].path / "ranges.json")
    again = quantize(src, get_preset("int4-gptq").replace(**SMALL), tmp_path / "y",
                     ranges=arts["int4-gptq"].path / "ranges.json")
    a = onnx.load(str(arts["int4-gptq"].model_path))
    b = onnx.load(str(again.model_path))
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("precision", [Precision.FP8, Precision.INT8])
def test_gptq_on_the_8bit_grid_lowers_the_output_error_with_rtn_scales(precision, per_tensor):
    w, h = _problem()
    h[7, :] = h[:, 7] = 0.0  # a dead input keeps its weights, rounded to nearest (not zeroed)
    scales = (as_scale(np.abs(w).max(), QMAX[precision], np.float32) if per_tensor
              else weight_scales(w, precision, np.float32))
    q, info = gptq_fixed_scales(w, h, scales, precision)
    rtn = fake_quant(w, scales, precision)
    assert np.array_equal(fake_quant(q, scales, precision), q)  # on the grid: the stored values are exact
    assert proxy_loss(w, q, h) < 0.7 * proxy_loss(w, rtn, h)
    assert info["dead_inputs"] == 1 and np.array_equal(q[7], rtn[7])


@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
def test_gptq_weight_rounding_on_fp8_and_int8_artifacts(exported, tmp_path, recipe):
    src = exported("llama", task="causal-lm", outliers=True)
    base = get_preset(recipe).replace(**SMALL)
    rtn = quantize(src, base, tmp_path / "rtn", calib=CALIB)
    art = quantize(src, base.replace(weight_rounding="gptq"), tmp_path / "gptq", calib=CALIB)
    assert methods_for(base.replace(weight_rounding="gptq")).weights.name == "gptq8"
    nodes = [n for n in art.manifest["quantization"]["nodes"] if n["status"] == "quantized"]
    assert nodes and all(n["gptq"]["error_vs_rtn"] <= 1.0 for n in nodes)
    assert np.median([n["gptq"]["error_vs_rtn"] for n in nodes]) < 0.9
    assert rel_error(src, art) < rel_error(src, rtn)
    # the same Q/DQ layout as rounding to nearest: per-channel 8-bit weights, same scales
    a = {t.name: t for t in onnx.load(str(rtn.model_path)).graph.initializer}
    b = {t.name: t for t in onnx.load(str(art.model_path)).graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].data_type == b[k].data_type
        if k.endswith("_scale"):
            assert np.array_equal(numpy_helper.to_array(a[k]), numpy_helper.to_array(b[k]))
