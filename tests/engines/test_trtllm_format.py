"""The unified-checkpoint format on its own: INT4 packing, the quant configs, option parsing."""

from __future__ import annotations

import numpy as np
import pytest

from trtforge.engines.trtllm.checks import shard_size
from trtforge.engines.trtllm.formats import (
    CheckpointFormat,
    fused_group,
    is_modelopt_inline,
    read_quant_config,
)
from trtforge.engines.trtllm.onnx_source import module_of
from trtforge.engines.trtllm.pack import pack_int4, requantize_fp8_per_tensor, unpack_int4
from trtforge.errors import InputError


def modelopt_pack(q: np.ndarray) -> np.ndarray:
    """Model Optimizer 0.47's pack_int4_in_uint8 (2-D branch), transcribed with numpy."""
    out_dim, in_dim = q.shape
    reshaped = q.T.reshape(in_dim, out_dim // 2, 2)
    val0, val1 = reshaped[..., 0] & 0x0F, reshaped[..., 1] & 0x0F
    return (val0 | (val1 << 4)).astype(np.uint8).T.copy()


def test_int4_packing_matches_model_optimizer_and_round_trips():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (64, 256)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (32, 256)
    assert np.array_equal(packed, modelopt_pack(q))
    assert np.array_equal(unpack_int4(packed), q)
    # the loader casts uint8 to int8 bit-for-bit; unpacking int8 gives the same integers
    assert np.array_equal(unpack_int4(packed.view(np.int8)), q)
    # even output row in the low nibble: rows 0 and 1 of column 0
    assert packed[0, 0] == (int(q[0, 0]) & 0xF) | ((int(q[1, 0]) & 0xF) << 4)


def test_int4_packing_refuses_odd_rows_and_out_of_range():
    with pytest.raises(ValueError, match="even"):
        pack_int4(np.zeros((3, 8), np.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.full((2, 8), 9, np.int8))


def test_fp8_requantization_shares_one_scale():
    rng = np.random.default_rng(1)
    ws = [rng.standard_normal((8, 16)) * 0.1, rng.standard_normal((4, 16))]
    qs, scale = requantize_fp8_per_tensor(ws)
    assert scale == np.float32(max(np.abs(w).max() for w in ws) / 448.0)
    for w, q in zip(ws, qs):
        err = np.abs(q.astype(np.float64) * float(scale) - w)
        assert err.max() <= 2**-4 * np.abs(w).max() + 2**-9 * float(scale)  # one E4M3 rounding


def test_quant_configs_in_both_layouts_read_back_alike():
    fmt = CheckpointFormat("W4A16_AWQ", 128, ("lm_head", "model.embed_tokens"))
    nested, flat = fmt.hf_quant_config(), fmt.inline_config()
    assert nested["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 128,
                                      "has_zero_point": False, "pre_quant_scale": True,
                                      "exclude_modules": ["lm_head", "model.embed_tokens"]}
    assert flat["quant_method"] == "modelopt" and flat["group_size"] == 128 and is_modelopt_inline(flat)
    a, b = read_quant_config(nested), read_quant_config(flat)
    for key in ("quant_algo", "group_size", "exclude_modules", "kv_cache_quant_algo"):
        assert a[key] == b[key], key
    fp8 = CheckpointFormat("FP8", None, ("lm_head",))
    assert "group_size" not in fp8.hf_quant_config()["quantization"]
    assert read_quant_config({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": [],
                              "kv_cache_scheme": {"type": "float", "num_bits": 8}})["kv_cache_quant_algo"] == "FP8"
    assert not is_modelopt_inline({"quant_method": "gptq"})
    with pytest.raises(ValueError):
        CheckpointFormat("W8A8_SQ_PER_CHANNEL")


def test_names_and_sizes():
    assert module_of("/model/model/layers.0/self_attn/q_proj/MatMul") == "model.layers.0.self_attn.q_proj"
    assert module_of("/model/lm_head/MatMul") == "lm_head"
    assert fused_group("model.layers.3.mlp.up_proj") == ("model.layers.3.mlp", "gate_up", "up_proj")
    assert fused_group("model.layers.3.mlp.down_proj") is None
    assert shard_size("5GB") == 5 * 10**9 and shard_size("2GiB") == 2 * 2**30 and shard_size("1000") == 1000
    for bad in ("five", "-1GB", "3XB"):
        with pytest.raises(InputError):
            shard_size(bad)
