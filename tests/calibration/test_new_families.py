"""SmoothQuant/AWQ folds for Gemma 3, Qwen3 and Phi-3 (issue 14), on tiny models built from configs.

Phi-3's fused ``qkv_proj`` is one GEMM whose output is sliced into q, k and v: its input factor
is one factor folded into the input norm, and o_proj's factor folds into the v columns only,
tied per value column under GQA (6 query / 2 KV heads). ``gate_up_proj`` is sliced into gate and
up: down_proj's factor folds into the up half only. With a KV cache the value fold would change
``present.*.value``, so o_proj then gets an explicit Mul. QK-norm (Qwen3, Gemma 3) sits between
q_proj/k_proj and RoPE: q/k/v's factor folds into the input norm and nothing touches q_norm/k_norm.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from trtforge.calibration import get_preset, quantize
from trtforge.calibration.patterns import find_groups
from trtforge.graph import GraphIndex

from .test_awq import _max_rel_change, _prepared  # noqa: TID252
from .test_quantize import CALIB, rel_error  # noqa: TID252

SMALL = dict(num_samples=8, seq_len=32)


def _groups(art):
    model = art.load()
    return model, {tuple(g.gemms): g for g in find_groups(model, art.manifest["dims"])}


def _layer0(groups, proj):
    return next(g for gemms, g in groups.items() if gemms == (f"/model/model/layers.0/{proj}/MatMul",))


@pytest.mark.parametrize("preset", ["phi3", "phi3-longrope"])
def test_phi3_fused_projections_fold_into_their_pieces(exported, preset):
    art = exported(preset, task="causal-lm")
    d = art.manifest["dims"]
    heads, kv, hd, hidden = d["num_heads"], d["num_kv_heads"], d["head_dim"], d["hidden_size"]
    assert (heads, kv, hidden) == (6, 2, 96)
    _, groups = _groups(art)
    qkv = _layer0(groups, "self_attn/qkv_proj")
    assert (qkv.role, qkv.fold) == ("attn-in", "norm")  # one GEMM, one factor, into input_layernorm
    o = _layer0(groups, "self_attn/o_proj")
    assert (o.role, o.fold, o.prev) == ("attn-out", "gemm", qkv.gemms[0])
    v_start = (heads + kv) * hd
    assert o.prev_cols.min() == v_start and o.prev_cols.max() == v_start + kv * hd - 1  # the v columns only
    assert np.bincount(o.prev_cols - v_start).tolist() == [heads // kv] * (kv * hd)  # 3 query heads per value
    gate_up = _layer0(groups, "mlp/gate_up_proj")
    assert (gate_up.role, gate_up.fold) == ("mlp-in", "norm")
    down = _layer0(groups, "mlp/down_proj")
    inter = down.channels
    assert (down.role, down.fold, down.prev) == ("mlp-out", "gemm", gate_up.gemms[0])
    assert down.prev_cols.tolist() == list(range(inter, 2 * inter))  # the up half, never gate


@pytest.mark.parametrize("recipe", ["int8-sq", "int4-awq"])
def test_phi3_smoothing_keeps_the_function_and_ties_gqa_value_columns(exported, recipe):
    art = exported("phi3", task="causal-lm")
    model, prep = _prepared(art, recipe)
    folds = {(sm.group.role, sm.group.fold) for sm in prep.smoothings.values()}
    assert {("attn-in", "norm"), ("attn-out", "gemm"), ("mlp-in", "norm"), ("mlp-out", "gemm")} <= folds
    d = art.manifest["dims"]
    for sm in prep.smoothings.values():
        if sm.group.role == "attn-out":
            for c in np.unique(sm.group.prev_cols):  # one factor per value column
                assert np.ptp(sm.s[sm.group.prev_cols == c]) == 0
            assert np.bincount(sm.group.prev_cols).max() == d["num_heads"] // d["num_kv_heads"]
    # the gate half of gate_up_proj only carries the mlp-in factor (rows), never down_proj's (columns)
    assert _max_rel_change(art, model, prep.model) < 1e-4


@pytest.mark.parametrize("preset,recipe", [("phi3", "int8-sq"), ("phi3", "int4-awq"), ("phi3-longrope", "int8-sq"),
                                           ("phi3-longrope", "int4-awq")])
def test_phi3_quantizes_with_folds_and_passes_the_equivalence_check(exported, tmp_path, preset, recipe):
    src = exported(preset, task="causal-lm")
    q = quantize(src, get_preset(recipe).replace(**SMALL), tmp_path / "q", calib=CALIB)
    info = q.manifest["quantization"]
    assert info["smoothing_check"]["max_rel_err"] < 1e-4
    by_role = {}
    for s in info["smoothing"]:
        by_role.setdefault(s["role"], set()).add(s["fold"])
    assert by_role["attn-in"] == {"norm"} and by_role["attn-out"] == {"gemm"} and by_role["mlp-out"] == {"gemm"}
    assert rel_error(src, q) < (0.08 if recipe == "int8-sq" else 0.15)


def test_phi3_with_a_kv_cache_smooths_o_proj_with_an_explicit_mul(exported, tmp_path):
    src = exported("phi3")  # causal-lm-with-past: v is also present.*.value
    q = quantize(src, get_preset("int8-sq").replace(**SMALL), tmp_path / "q", calib=CALIB)
    info = q.manifest["quantization"]
    assert info["smoothing_check"]["max_rel_err"] < 1e-4
    o = [s for s in info["smoothing"] if s["role"] == "attn-out"]
    assert o and all(s["fold"] == "mul" and "present" in s["why_not_folded"] for s in o)
    assert {s["fold"] for s in info["smoothing"] if s["role"] == "mlp-out"} == {"gemm"}


def _norm_weights(art, names):
    model = art.load()
    idx = GraphIndex(model)
    out = {}
    for t in model.graph.initializer:
        if any(n in t.name for n in names):
            out[t.name] = idx.array(t.name).copy() if idx.weights else numpy_helper.to_array(t).copy()
    return out


@pytest.mark.parametrize("preset", ["qwen3", "gemma3_text", "phi3"])
def test_int8_sq_quantizes_the_new_families_and_leaves_qk_norms_alone(exported, tmp_path, preset):
    src = exported(preset, task="causal-lm")
    q = quantize(src, get_preset("int8-sq").replace(**SMALL), tmp_path / "q", calib=CALIB)
    info = q.manifest["quantization"]
    assert info["smoothing_check"]["max_rel_err"] < 1e-4
    # random 2-4 layer models; Gemma's (4 layers, GELU, scaled embeddings) measured 0.13
    assert rel_error(src, q) < (0.2 if preset == "gemma3_text" else 0.08)
    folds = {(s["role"], s["fold"]) for s in info["smoothing"]}
    assert ("attn-in", "norm") in folds and ("mlp-out", "gemm") in folds
    qk = ("q_norm", "k_norm")
    before, after = _norm_weights(src, qk), _norm_weights(q, qk)
    if preset == "phi3":
        assert not before
        return
    assert before and before.keys() == after.keys()
    for name in before:  # the QK-norm is not where q/k's input factor goes
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    ln_before = _norm_weights(src, ("layers.0.input_layernorm",))
    ln_after = _norm_weights(q, ("layers.0.input_layernorm",))
    (name, w0), = ln_before.items()
    assert not np.allclose(w0, ln_after[name])  # ...it goes into the input norm


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3_text", "gpt2"])
def test_the_pattern_finder_gives_each_group_the_role_its_architecture_declares(exported, name):
    """calibration's roles come from the graph; the Architecture entry names the same groups by weight
    (Phi-3's fused qkv_proj was once labelled mlp-in: its output splits with Slices, not a Split)."""
    from trtforge.registry import ARCHITECTURES

    arch = ARCHITECTURES.get(name)
    art = exported(name, task="causal-lm")
    model = art.load()
    idx = GraphIndex(model)
    weight_of = {n.name: n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    seen = 0
    for g in find_groups(model, art.manifest["dims"], idx):
        roles = {arch.smoothing_group_of(weight_of[m]) for m in g.gemms}
        if roles == {None}:
            continue
        assert roles == {g.role}, (g.gemms, g.role, roles)
        seen += len(g.gemms)
    assert seen == art.manifest["dims"]["num_layers"] * sum(len(s) for s in arch.smoothing_groups.values())
