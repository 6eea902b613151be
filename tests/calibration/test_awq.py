"""AWQ's scales fold exactly under grouped-query attention (issue 15).

Without a KV cache AWQ folds the o_proj factor into v_proj's output columns. With GQA several
query heads read one value head, so one v_proj column feeds several o_proj input channels and
can carry only one factor: the factor must be tied across those channels, as SmoothQuant's is.
"""

from __future__ import annotations

import numpy as np
import pytest

from trtforge.calibration import get_preset, prepare, quantize
from trtforge.calibration.collect import collect_ranges
from trtforge.calibration.patterns import attention_bmm_inputs, find_gemms, watched_tensors
from trtforge.calibration.smoothing import Smoothing, apply_smoothing
from trtforge.calibration.stage import _run
from trtforge.errors import QuantizationError
from trtforge.graph import GraphIndex
from trtforge.textdata import build_samples, load_tokenizer

from .test_quantize import CALIB, _eval_feeds, rel_error  # noqa: TID252

# SmolLM-135M's layer shape (hidden 576, MLP 1536, 9 query / 3 KV heads of 64, tied embeddings)
# with 2 layers and a small vocabulary: the real model failed int4-awq's check at 9e-2.
SMOL = dict(num_hidden_layers=2, vocab_size=1000, max_position_embeddings=256)
SHAPES = {"llama-6q2kv": ("llama", {}), "smollm-9q3kv": ("llama-100m", SMOL)}


def _prepared(art, recipe: str):
    model = art.load()
    d = art.manifest["dims"]
    samples = build_samples(CALIB, load_tokenizer(art.path), mode="windows", num_samples=8, seq_len=32, seed=0,
                            max_positions=d["max_positions"], vocab_size=d["vocab_size"])
    r = collect_ranges(model, watched_tensors(model), samples, d, per_tensor=set(attention_bmm_inputs(model)))
    return model, prepare(model, get_preset(recipe), r, d)


def _max_rel_change(art, a_model, b_model) -> float:
    feeds, _ = _eval_feeds(art)
    a, b = _run(a_model, [feeds])[0], _run(b_model, [feeds])[0]
    return max(float(np.abs(b[k] - a[k].astype(np.float64)).max() / np.abs(a[k]).max()) for k in a)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_awq_scales_fold_exactly_through_gqa_values(exported, shape):
    preset, kw = SHAPES[shape]
    art = exported(preset, task="causal-lm", **kw)
    model, prep = _prepared(art, "int4-awq")
    v_to_o = [sm for sm in prep.smoothings.values() if sm.group.role == "attn-out" and sm.group.fold == "gemm"]
    assert v_to_o, "no v -> o_proj fold was chosen: the test would prove nothing"
    d = art.manifest["dims"]
    assert d["num_heads"] > d["num_kv_heads"]
    for sm in v_to_o:
        cols = sm.group.prev_cols
        assert np.bincount(cols).max() == d["num_heads"] // d["num_kv_heads"]
        for c in np.unique(cols):  # one factor per value column
            assert np.ptp(sm.s[cols == c]) == 0, (sm.group.gemms, c)
    # before the fix: 5.0e-4 (6q/2kv, head_dim 16) and 8.4e-3 (9q/3kv, head_dim 64); after ~1e-6
    assert _max_rel_change(art, model, prep.model) < 1e-4


def test_a_factor_that_cannot_fold_exactly_is_refused_naming_the_group(exported):
    art = exported("llama", task="causal-lm")
    model, prep = _prepared(art, "int4-awq")
    sm = next(sm for sm in prep.smoothings.values() if sm.group.role == "attn-out" and sm.group.fold == "gemm")
    untied = Smoothing(sm.group, sm.s * np.linspace(0.9, 1.1, sm.s.size), sm.alpha)
    idx = GraphIndex(model)
    with pytest.raises(QuantizationError, match=sm.group.gemms[0]):
        apply_smoothing(model, [untied], idx, {g.node: g for g in find_gemms(model, idx)})


@pytest.mark.slow
def test_int4_awq_on_the_smollm_shape_passes_the_check_and_beats_rtn(exported, tmp_path):
    """The user's command on the real model's shape: ``quantize --recipe int4-awq`` of a causal-lm export."""
    src = exported("llama-100m", task="causal-lm", **SMOL)
    small = dict(num_samples=16, seq_len=64)
    awq = quantize(src, get_preset("int4-awq").replace(**small), tmp_path / "awq", calib=CALIB)
    rtn = quantize(src, get_preset("int4-rtn").replace(**small), tmp_path / "rtn", calib=CALIB)
    q = awq.manifest["quantization"]
    assert q["smoothing_check"]["max_rel_err"] < 1e-4
    assert any(s["role"] == "attn-out" and s["fold"] == "gemm" for s in q["smoothing"])
    assert rel_error(src, awq) < rel_error(src, rtn)
