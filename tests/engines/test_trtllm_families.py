"""export-checkpoint for Gemma 3, Qwen3 and Phi-3 (issue 14) on tiny models: names, configs, read-back, gate.

What TensorRT-LLM's PyTorch backend expects of each family (formats.SOURCES; docs/trtllm.md):
Gemma3ForCausalLM's weight mapper adds 1 to every norm weight, so the file holds the Hugging Face
``w`` of ``x * (1 + w)`` (the ONNX graph holds ``1 + w``); Qwen3's and Gemma's QK-norms keep their HF
names; Phi3ForCausalLM slices the fused qkv_proj / gate_up_proj by rows and gives every shard the
layer's one scale, which loads FP8 per tensor but neither packed INT4 nor per-channel FP8 scales.
config.json carries the flat RoPE keys TensorRT-LLM's transformers 4.57 reads beside rope_parameters.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors import safe_open

from trtforge.engines.trtllm import CheckpointOptions, Fp8Scheme, export_checkpoint
from trtforge.engines.trtllm.formats import CkptDType, loader_config
from trtforge.engines.trtllm.reader import CheckpointReader
from trtforge.errors import TrtforgeError, ValidationError
from trtforge.registry import ARCHITECTURES

from ..conftest import DATA, leftovers  # noqa: TID252

# hidden 128 so INT4's group size 128 divides every GEMM input; GQA 4 query / 2 KV heads
SHAPE = {
    "gemma3_text": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, query_pre_attn_scalar=32),
    "qwen3": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "phi3": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
}
FAST = ("num_samples=8", "seq_len=64")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def q_art(exported, tmp_path_factory):
    from trtforge.calibration import quantize
    from trtforge.recipes import load_quant_recipe

    cache: dict = {}
    root = tmp_path_factory.mktemp("families-q")

    def get(preset: str, recipe: str, *sets: str):
        key = (preset, recipe, sets)
        if key not in cache:
            art = exported(preset, task="causal-lm-with-past", dtype="fp16", **SHAPE[preset])
            cache[key] = quantize(art, load_quant_recipe(recipe, FAST + sets), root / f"{preset}-{recipe}-{len(cache)}",
                                  calib=[DATA / "calib-apache-2.0.txt"])
        return cache[key]

    return get


def tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names = h.keys()
            out.update({k: h.get_tensor(k) for k in names})
    return out


def _norm_scales(art) -> dict[str, np.ndarray]:
    """The ONNX graph's norm scales by module (the initializer each norm's scale Mul reads)."""
    from trtforge.engines.trtllm.onnx_source import read_source

    src = read_source(onnx.load(str(art.model_path)))
    return {m: numpy_helper.to_array(src.initializers[n]).astype(np.float32)
            for m, names in src.module_tensors.items() if "norm" in m for n in names[:1]}


@pytest.mark.parametrize("preset,recipe", [("gemma3_text", "fp8"), ("gemma3_text", "int4-awq"), ("qwen3", "fp8"),
                                           ("qwen3", "int4-awq"), ("phi3", "fp8")])
def test_new_families_write_read_back_and_pass_the_gate(q_art, tmp_path, preset, recipe):
    art = q_art(preset, recipe, "weight_granularity=tensor") if recipe == "fp8" else q_art(preset, recipe)
    # float16 like the ONNX artifact, so the read-back agrees with it to rounding (Gemma's default is
    # bfloat16: test_gemma_dtype_defaults_to_bfloat16_from_an_fp32_export)
    ck = export_checkpoint(art, tmp_path / "ck", CheckpointOptions(max_samples=3, dtype=CkptDType.FLOAT16))
    arch = ARCHITECTURES.get(json.loads((art.path / "config.json").read_text())["model_type"])
    cfg = json.loads((ck.path / "config.json").read_text())
    assert cfg["architectures"] == [arch.checkpoint.architecture]
    t = tensors(ck.path)
    names = set(t)
    if preset == "phi3":  # stored fused, as the HF model and Phi3ForCausalLM.load_weights name them
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
        assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
        assert list(t["model.layers.0.self_attn.qkv_proj.weight_scale"].shape) == []  # one scale, every shard
        assert "lm_head.weight" in names  # untied
    else:
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= names
        assert "lm_head.weight" not in names  # tied: the loader skips lm_head
    rd = CheckpointReader(ck.path)
    rd.check()
    v = ck.manifest["verification"]
    w = v["weights"]
    assert w["stored_identical"] == w["linears_quantized"] > 0
    assert w["float_max_rel_err"] <= 2**-7  # norms and embeddings read back as the ONNX graph's, offsets included
    # FP8 activations round at run time: a last-bit difference upstream flips some roundings (as for llama)
    assert v["parity"]["checkpoint_vs_onnx"]["cosine_mean"] > (0.99 if recipe == "fp8" else 0.999)
    assert v["perplexity_gate"]["checked"] and v["perplexity_gate"]["passed"]
    if preset == "gemma3_text":
        scales = _norm_scales(art)
        for mod in ("model.layers.0.input_layernorm", "model.layers.0.self_attn.q_norm", "model.norm"):
            stored = t[f"{mod}.weight"].float().numpy()
            # the checkpoint holds w; TensorRT-LLM's Gemma3HfWeightMapper loads w + 1 = the graph's scale
            np.testing.assert_allclose(stored + 1.0, scales[mod], rtol=0, atol=2**-7 * np.abs(scales[mod]).max())
            assert abs(float(np.mean(stored))) < 0.5  # centred on 0, not on 1
        assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    if preset == "qwen3":
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]


def test_gemma_dtype_defaults_to_bfloat16_from_an_fp32_export(exported, tmp_path):
    from trtforge.calibration import quantize
    from trtforge.recipes import load_quant_recipe

    src = exported("gemma3_text", task="causal-lm", dtype="fp32", **SHAPE["gemma3_text"])
    q = quantize(src, load_quant_recipe("fp8", FAST), tmp_path / "q", calib=[DATA / "calib-apache-2.0.txt"])
    ck = export_checkpoint(q, tmp_path / "ck", CheckpointOptions(max_samples=2))
    # FP16 overflows Gemma's activations (trained in bfloat16): an FP32 source defaults to bfloat16
    assert json.loads((ck.path / "config.json").read_text())["dtype"] == "bfloat16"
    v = ck.manifest["verification"]
    assert v["parity"]["checkpoint_vs_onnx"]["cosine_mean"] > 0.98  # bfloat16 norms/embeddings vs an FP32 graph
    assert v["perplexity_gate"]["passed"]
    # the read-back model holds the norms as TensorRT-LLM does: w + 1 computed in bfloat16
    # (Gemma3HfWeightMapper: p.data.copy_(w + 1)), one rounding more than HF's 1 + w.float()
    import ml_dtypes

    rd = CheckpointReader(ck.path)
    stored, served = rd.float_params(), rd.served_float_params()
    name = "model.layers.0.input_layernorm.weight"
    want = (stored[name] + np.float32(1)).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(served[name] + np.float32(1), want)
    assert not np.array_equal(served[name], stored[name])  # the second rounding is real on these weights
    np.testing.assert_array_equal(served["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])


# Phi-4-mini's rotary on head_dim 32: 0.75 of it rotated, 12 long/short factors, switching at 32 positions
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 32, "long_factor": [1.0 + 0.5 * i for i in range(12)],
            "short_factor": [1.0 + 0.05 * i for i in range(12)]}


def test_phi4_mini_longrope_config_is_written_for_the_loader(tmp_path):
    from trtforge.calibration import quantize
    from trtforge.exporter import ExportOptions, export_onnx
    from trtforge.recipes import load_quant_recipe
    from trtforge.testing.tinymodels import make_model

    hf = make_model("phi3-longrope", tmp_path / "hf", rope_parameters=LONGROPE, original_max_position_embeddings=32,
                    **SHAPE["phi3"])
    art = export_onnx(hf, tmp_path / "onnx", ExportOptions())
    q = quantize(art, load_quant_recipe("fp8", FAST), tmp_path / "q", calib=[DATA / "calib-apache-2.0.txt"])
    ck = export_checkpoint(q, tmp_path / "ck", CheckpointOptions(max_samples=2))
    cfg = json.loads((ck.path / "config.json").read_text())
    rp = cfg["rope_parameters"]
    # Phi3Config 4.x takes exactly type/long_factor/short_factor and a top-level original_max_position_embeddings
    assert cfg["rope_scaling"] == {"type": "longrope", "long_factor": rp["long_factor"], "short_factor": rp["short_factor"]}
    assert cfg["original_max_position_embeddings"] == rp["original_max_position_embeddings"] == 32
    assert cfg["partial_rotary_factor"] == 0.75 and cfg["rope_theta"] == rp["rope_theta"]
    CheckpointReader(ck.path).check()
    assert ck.manifest["verification"]["perplexity_gate"]["passed"]


@pytest.mark.parametrize("recipe,options,match", [
    ("int4-awq", CheckpointOptions(parity=False), r"Phi3ForCausalLM cannot be written as a W4A16_AWQ.*packed INT4"),
    ("fp8", CheckpointOptions(parity=False, fp8_scheme=Fp8Scheme.ROWWISE), r"FP8_PER_CHANNEL_PER_TOKEN.*weight_scale\[:n, :\]"),
])
def test_phi3_refuses_what_its_loader_cannot_split(q_art, tmp_path, recipe, options, match):
    art = q_art("phi3", recipe)
    with pytest.raises(TrtforgeError, match=match) as info:
        export_checkpoint(art, tmp_path / "out", options)
    assert "\n" not in info.value.one_line() and info.value.hint
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_preflight_refuses_phi3_int4_before_any_export():
    from trtforge.engines.trtllm.checks import preflight
    from trtforge.vocab import Precision

    with pytest.raises(TrtforgeError, match="W4A16_AWQ"):
        preflight(precision=Precision.INT4, model_type="phi3", architecture="Phi3ForCausalLM",
                  config={"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24})
    with pytest.raises(TrtforgeError, match="first hidden_size rows"):
        preflight(precision=Precision.FP8, model_type="phi3", architecture="Phi3ForCausalLM",
                  config={"hidden_size": 96, "num_attention_heads": 6, "head_dim": 32})
    preflight(precision=Precision.FP8, model_type="phi3", architecture="Phi3ForCausalLM",
              config={"hidden_size": 3072, "num_attention_heads": 24, "head_dim": 128})


def test_reader_refuses_a_checkpoint_without_the_flat_rope_keys(q_art, tmp_path):
    ck = export_checkpoint(q_art("qwen3", "fp8"), tmp_path / "ck", CheckpointOptions(parity=False))
    broken = tmp_path / "broken"
    shutil.copytree(ck.path, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["rope_theta"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValidationError, match="rope_theta"):
        CheckpointReader(broken).check()


def test_loader_config_maps_rope_parameters_per_family():
    gemma = ARCHITECTURES.get("gemma3_text").checkpoint
    cfg = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    out = loader_config(cfg, gemma)
    assert out["rope_theta"] == 1e6 and out["rope_local_base_freq"] == 1e4
    assert out["rope_scaling"] == {"factor": 8.0, "rope_type": "linear"}  # Gemma 3 4B+: global layers only
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    out = loader_config(llama3, ARCHITECTURES.get("llama").checkpoint)
    assert out["rope_theta"] == 5e5 and out["rope_scaling"]["rope_type"] == "llama3"
    assert loader_config({"rope_theta": 1.0}, None) == {"rope_theta": 1.0}  # transformers 4 configs untouched
