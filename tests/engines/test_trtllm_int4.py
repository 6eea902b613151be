"""INT4 TensorRT-LLM checkpoints from every INT4 preset, on SmolLM-135M's shape (issue 16).

Hidden 576 and intermediate 1536: block 128 does not divide 576, so quantize uses block 64 there
and keeps 128 for K=1536. The default int4-awq artifact of such a model was refused ("mixed
block sizes"); W4A16 takes one group size, and a block of 128 is two groups of 64 with the same
scale, so the checkpoint is written with group 64 and must hold exactly the ONNX artifact's
weights, read back within the perplexity gate.
"""

from __future__ import annotations

import pytest

from trtforge.engines.trtllm import CheckpointOptions, export_checkpoint
from trtforge.engines.trtllm.checks import common_group_size, preflight
from trtforge.engines.trtllm.reader import CheckpointReader
from trtforge.errors import QuantizationError
from trtforge.vocab import Precision

from ..conftest import DATA  # noqa: TID252

# SmolLM-135M's layer shape (9 query / 3 KV heads of 64, tied embeddings), 2 layers, small vocab
SMOL = dict(num_hidden_layers=2, vocab_size=1000, max_position_embeddings=256)
FAST = ("num_samples=8", "seq_len=64")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol(exported, tmp_path_factory):
    from trtforge.calibration import quantize
    from trtforge.recipes import load_quant_recipe

    src = exported("llama-100m", task="causal-lm-with-past", dtype="fp16", **SMOL)
    root = tmp_path_factory.mktemp("int4-ck")
    cache: dict = {}

    def get(recipe: str):
        if recipe not in cache:
            art = quantize(src, load_quant_recipe(recipe, FAST), root / f"q-{recipe}", calib=[DATA / "calib-apache-2.0.txt"])
            ck = export_checkpoint(art, root / f"ck-{recipe}", CheckpointOptions(max_samples=3))
            cache[recipe] = (art, ck)
        return cache[recipe]

    return get


def test_common_group_size():
    assert common_group_size({64, 128}) == 64
    assert common_group_size({128}) == 128
    assert common_group_size({32, 128}) is None  # the kernels have no group 32
    assert common_group_size(set()) is None


@pytest.mark.parametrize("recipe", ["int4-awq", "int4-gptq", pytest.param("int4-rtn", marks=pytest.mark.slow),
                                    pytest.param("int4-awq-gptq", marks=pytest.mark.slow)])
def test_every_int4_preset_writes_a_checkpoint_on_the_smollm_shape(smol, recipe):
    art, ck = smol(recipe)
    nodes = [n for n in art.manifest["quantization"]["nodes"] if n["status"] == "quantized"]
    assert {n["block_size"] for n in nodes} == {64, 128}  # the mix the issue reports
    m = ck.manifest
    reader = CheckpointReader(ck.path)
    reader.check()
    assert reader.quant["quant_algo"] == "W4A16_AWQ" and reader.quant["group_size"] == 64
    assert any("group_size 64 for every layer" in n for n in m["conversion"]["notes"])
    down = reader.tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert tuple(down.shape) == (576, 1536 // 64)
    w = m["verification"]["weights"]
    assert w["stored_identical"] == w["linears_quantized"]  # the ONNX integers, unchanged
    assert w["served_max_rel_err"] < 1e-6  # regrouped scales serve the same weights
    gate = m["verification"]["perplexity_gate"]
    assert gate["checked"] and gate["passed"], gate
    assert m["verification"]["parity"]["checkpoint_vs_onnx"]["cosine_mean"] > 0.999


def test_preflight_accepts_the_fallback_the_checkpoint_can_hold_and_refuses_the_rest():
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
    preflight(precision=Precision.INT4, model_type="llama", recipe={"block_size": 128}, config=cfg)
    with pytest.raises(QuantizationError, match=r"hidden_size \(96\), where quantize would use block size 32"):
        preflight(precision=Precision.INT4, model_type="llama", recipe={"block_size": 128},
                  config={**cfg, "hidden_size": 96})


def test_a_per_gemm_budget_is_refused_before_any_work():
    """A budget switching each GEMM alone may split q/k/v or gate/up, which the checkpoint fuses."""
    for precision in (Precision.FP8, Precision.INT4):
        with pytest.raises(QuantizationError, match="budget_granularity = gemm") as exc:
            preflight(precision=precision, model_type="llama",
                      recipe={"budget": "perplexity=1%", "budget_granularity": "gemm", "budget_int8": False})
        assert "budget_granularity = group" in exc.value.hint
    preflight(precision=Precision.FP8, model_type="llama", recipe={"budget": "perplexity=1%", "budget_granularity": "group"})
    preflight(precision=Precision.FP8, model_type="llama", recipe={"budget_granularity": "gemm"})  # no budget: no split
    # auto (the default): 'trtforge run' resolves it to group where a target is trtllm
    preflight(precision=Precision.FP8, model_type="llama", recipe={"budget": "perplexity=1%", "budget_granularity": "auto"})
    preflight(precision=Precision.FP8, model_type="llama", recipe={"budget": "perplexity=1%"})


def test_a_split_group_names_the_fix_that_fits_how_it_was_split():
    """An artifact whose budget (switching each GEMM alone) kept v_proj in float beside a quantized
    q_proj and k_proj: the refusal says to quantize with budget_granularity=group or build a
    TensorRT engine; without a budget (a hand-written exclude list) to exclude all or none."""
    from trtforge.engines.trtllm.checks import _check_fused
    from trtforge.engines.trtllm.formats import TRTLLM_FUSED

    attn = "model.layers.1.self_attn"
    by_module = {f"{attn}.{p}_proj": {"status": "quantized"} for p in "qk"}
    by_module[f"{attn}.v_proj"] = {"status": "excluded"}
    by_module[f"{attn}.o_proj"] = {"status": "quantized"}
    for budgeted, fix in ((True, "--set budget_granularity=group"), (False, "exclude all of them or none")):
        with pytest.raises(QuantizationError, match=rf"{attn}: q_proj, k_proj quantized but v_proj not") as exc:
            _check_fused(by_module, TRTLLM_FUSED, budgeted=budgeted)
        assert fix in exc.value.hint
    by_module[f"{attn}.v_proj"] = {"status": "quantized"}
    _check_fused(by_module, TRTLLM_FUSED, budgeted=True)  # the whole group quantized: nothing to refuse


def test_int8_weight_only_fallback_is_refused_in_one_line(exported, tmp_path):
    """TensorRT-LLM reads per-layer W8A16 only from a MIXED_PRECISION checkpoint, which trtforge does not
    write: an artifact with INT8 weight-only GEMMs, or a recipe whose budget may make them, is refused."""
    from click.testing import CliRunner

    from trtforge.calibration import get_preset, quantize
    from trtforge.cli import main

    from ..conftest import one_line_error  # noqa: TID252

    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "head_dim": 64}
    with pytest.raises(QuantizationError, match="MIXED_PRECISION checkpoint, which trtforge does not write"):
        preflight(precision=Precision.INT4, model_type="llama", recipe={"block_size": 128, "budget": "perplexity=10%"},
                  config=cfg)
    preflight(precision=Precision.INT4, model_type="llama", config=cfg,
              recipe={"block_size": 128, "budget": "perplexity=10%", "budget_int8": False})
    src = exported("llama", task="causal-lm-with-past")
    recipe = get_preset("int4-rtn").replace(num_samples=4, seq_len=32, block_size=64, weight_only_int8=["*down_proj*"])
    art = quantize(src, recipe, tmp_path / "q", calib=[DATA / "calib-apache-2.0.txt"])
    out = tmp_path / "ck"
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(out), "--no-parity"])
    line = one_line_error(r, "stores 2 GEMMs as INT8 weight-only (model.layers.0.mlp.down_proj, ...)", "W4A16_AWQ",
                          "budget_int8")
    assert "trtforge build" in line and not out.exists()


def test_quantize_says_in_its_log_which_block_sizes_the_checkpoint_will_use(exported, tmp_path, caplog):
    """Issue 16: the 64/128 mix was silent at quantize time. The log names each fallback K and the
    one group size a TensorRT-LLM checkpoint of the artifact takes; a model whose every K the
    block divides (Gemma 3 270M: 640, 1024, 2048) gets no such line."""
    import logging

    from trtforge.calibration import get_preset, quantize

    src = exported("llama-100m", task="causal-lm-with-past", dtype="fp16", **SMOL)
    recipe = get_preset("int4-rtn").replace(num_samples=2, seq_len=32)
    with caplog.at_level(logging.INFO, logger="trtforge"):
        quantize(src, recipe, tmp_path / "q", calib=[DATA / "calib-apache-2.0.txt"])
    lines = [r.getMessage() for r in caplog.records if "does not divide every GEMM" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records][-5:]
    assert "K=576 uses block 64" in lines[0] and "uses group size 64 for every layer" in lines[0], lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trtforge"):
        quantize(src, recipe.replace(block_size=64), tmp_path / "q64", calib=[DATA / "calib-apache-2.0.txt"])
    assert not [r for r in caplog.records if "does not divide every GEMM" in r.getMessage()]
