"""export-checkpoint end to end on tiny models: layouts, agreement with the ONNX artifact, refusals, CLI.

The ONNX initializers are read here with onnx.numpy_helper and packed with Model Optimizer's
formula (test_trtllm_format.modelopt_pack), independently of the writer's own reading code.
"""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors import safe_open

from trtforge.engines.trtllm import CheckpointOptions, Fp8Scheme, export_checkpoint
from trtforge.engines.trtllm.reader import CheckpointReader
from trtforge.errors import TrtforgeError, ValidationError

from ..conftest import DATA, leftovers, one_line_error  # noqa: TID252
from .test_trtllm_format import modelopt_pack

LLAMA128 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
FAST = ("num_samples=8", "seq_len=64")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny GEMMs: OpenMP's second thread only adds contention (80x slower on a loaded 2-core runner)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def q_art(exported, tmp_path_factory):
    """q_art("int4-awq", "block_size=64", preset=..., task=..., dtype=...) -> quantize artifact (cached)."""
    from trtforge.calibration import quantize
    from trtforge.recipes import load_quant_recipe

    cache: dict = {}
    root = tmp_path_factory.mktemp("trtllm-q")

    def get(recipe: str, *sets: str, preset: str = "llama", task: str = "causal-lm-with-past", dtype: str = "fp16",
            model_kw: dict | None = None):
        kw = LLAMA128 if model_kw is None else model_kw
        key = (recipe, sets, preset, task, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            art = exported(preset, task=task, dtype=dtype, **kw)
            name = f"{preset}-{task}-{dtype}-{recipe}-{len(cache)}"
            cache[key] = quantize(art, load_quant_recipe(recipe, FAST + sets), root / name,
                                  calib=[DATA / "calib-apache-2.0.txt"])
        return cache[key]

    return get


@pytest.fixture(scope="module")
def ckpt(q_art, tmp_path_factory):
    cache: dict = {}
    root = tmp_path_factory.mktemp("trtllm-ck")

    def get(recipe: str, *sets: str, options: CheckpointOptions | None = None, **art_kw):
        opts = options or CheckpointOptions(max_samples=3)
        key = (recipe, sets, opts, tuple(sorted(art_kw.items(), key=str)))
        if key not in cache:
            cache[key] = export_checkpoint(q_art(recipe, *sets, **art_kw), root / f"ck-{len(cache)}", opts)
        return cache[key]

    return get


def tensors(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names = h.keys()  # a safetensors handle, not a dict
            out.update({k: h.get_tensor(k) for k in names})
    return out


def onnx_inits(art) -> dict[str, np.ndarray]:
    m = onnx.load(str(art.model_path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_int4_awq_layout_and_exact_agreement(q_art, ckpt):
    art, ck = q_art("int4-awq"), ckpt("int4-awq")
    files = {p.name for p in ck.path.iterdir()}
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "manifest.json"} <= files
    hq = json.loads((ck.path / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "W4A16_AWQ" and hq["group_size"] == 128 and hq["pre_quant_scale"] is True
    assert hq["has_zero_point"] is False and hq["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    cfg = json.loads((ck.path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float16"
    assert cfg["quantization_config"]["quant_method"] == "modelopt" and cfg["quantization_config"]["group_size"] == 128

    t, ref = tensors(ck.path), onnx_inits(art)
    assert "lm_head.weight" not in t  # tied to the embedding, written once
    for mod, (out_f, in_f) in {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128),
                               "self_attn.o_proj": (128, 128), "mlp.down_proj": (128, 256)}.items():
        name = f"model.layers.0.{mod}"
        w, s = t[f"{name}.weight"], t[f"{name}.weight_scale"]
        assert str(w.dtype) == "torch.uint8" and list(w.shape) == [out_f // 2, in_f]
        assert str(s.dtype) == "torch.float32" and list(s.shape) == [out_f, in_f // 128]
        q_onnx = ref[f"{name}.weight_quantized"].astype(np.int8)  # [in, out] as MatMul reads it
        assert np.array_equal(w.numpy(), modelopt_pack(q_onnx.T)), name  # the same integers
        assert np.array_equal(s.numpy(), ref[f"{name}.weight_scale"].astype(np.float32).T), name
    assert "model.layers.0.self_attn.q_proj.pre_quant_scale" not in t  # fused: folded into the norm
    # o_proj in a KV-cache graph: the AWQ scale is an explicit Mul in ONNX, pre_quant_scale here
    inv = next(v for k, v in ref.items() if k.endswith("_smooth_inv") and "layers.0/self_attn" in k)
    assert np.array_equal(t["model.layers.0.self_attn.o_proj.pre_quant_scale"].numpy(), inv)
    # down_proj: AWQ folded into up_proj's columns; the loader still needs the tensor -> ones
    assert np.all(t["model.layers.0.mlp.down_proj.pre_quant_scale"].numpy() == 1.0)

    v = ck.manifest["verification"]
    w = v["weights"]
    assert w["stored_identical"] == w["served_identical"] == w["linears_quantized"] == 14
    assert w["served_max_rel_err"] == 0.0 and w["float_max_rel_err"] == 0.0
    par = v["parity"]
    assert par["checkpoint_vs_onnx"]["cosine_mean"] > 0.9999
    assert par["checkpoint_vs_reference"]["cosine_mean"] > 0.95 and par["onnx_vs_reference"]["ppl_change_pct"] is not None
    assert ck.manifest["tensorrt_llm"]["tensorrt_llm"] == ">=1.0" and ck.manifest["tensorrt_llm"]["backend"] == "pytorch"
    assert ck.manifest["source"]["model_sha256"] == art.sha256 and ck.manifest["recipe"]["name"] == "int4-awq"
    assert set(ck.manifest["files"]) == files - {"manifest.json"}


def test_fp8_per_tensor_keeps_the_onnx_values(q_art, ckpt):
    art, ck = q_art("fp8", "weight_granularity=tensor"), ckpt("fp8", "weight_granularity=tensor")
    t, ref = tensors(ck.path), onnx_inits(art)
    man = json.loads((art.path / "manifest.json").read_text())["quantization"]["nodes"]
    act = {n["weight"]: n["activation"]["scale"] for n in man if n["status"] == "quantized"}
    for name, scale in act.items():
        base = name[: -len(".weight")]
        w = t[f"{base}.weight"]
        assert str(w.dtype) == "torch.float8_e4m3fn" and w.dim() == 2
        onnx_q = ref[f"{name}_quantized"].view(np.uint8).T  # [out, in]
        assert np.array_equal(w.view(dtype=__import__("torch").uint8).numpy(), onnx_q), base
        assert list(t[f"{base}.weight_scale"].shape) == [] and list(t[f"{base}.input_scale"].shape) == []
        assert float(t[f"{base}.weight_scale"]) == float(ref[f"{name}_scale"].reshape(()))
        assert float(t[f"{base}.input_scale"]) == scale
    w = ck.manifest["verification"]["weights"]
    assert w["stored_identical"] == 14
    # q/k/v (gate/up) share one per-tensor weight scale (calibration/quantize.py), so the loader's
    # fused re-scaling changes nothing: what it serves is exactly what the ONNX artifact holds
    assert not w["rescaled_by_loader"] and w["served_max_rel_err"] <= 1e-6
    assert not ck.manifest["conversion"]["notes"]


def test_fp8_per_channel_is_requantized_with_one_scale_per_fused_group(ckpt):
    ck = ckpt("fp8", "weight_granularity=channel")
    t = tensors(ck.path)
    qkv = {float(t[f"model.layers.1.self_attn.{p}_proj.weight_scale"]) for p in "qkv"}
    assert len(qkv) == 1  # shared, so the loader's fused re-scaling changes nothing
    conv = ck.manifest["conversion"]
    note = next(n for n in conv["notes"] if "re-quantized" in n)
    assert "weight_granularity=tensor" in note and "--fp8-scheme rowwise" in note  # both ways out of the second rounding
    assert 0 < conv["fp8_requantized"]["max_rel_err"] <= 2**-4
    w = ck.manifest["verification"]["weights"]
    assert w["rescaled_by_loader"] == [] and w["served_max_rel_err"] <= 2**-4
    assert ck.manifest["verification"]["parity"]["checkpoint_vs_onnx"]["cosine_mean"] > 0.99


def test_fp8_rowwise_keeps_per_channel_values(ckpt, q_art):
    ck = ckpt("fp8", options=CheckpointOptions(fp8_scheme=Fp8Scheme.ROWWISE, parity=False))
    t = tensors(ck.path)
    assert json.loads((ck.path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert list(t["model.layers.0.mlp.gate_proj.weight_scale"].shape) == [256]
    assert not any(k.endswith("input_scale") for k in t)
    w = ck.manifest["verification"]["weights"]
    assert w["stored_identical"] == 14 and w["served_max_rel_err"] == 0.0
    assert ck.manifest["verification"]["parity"] == {"skipped": "--no-parity"}


def test_qwen2_fp32_without_cache_biases_and_deduplicated_initializers(ckpt):
    # qwen2's zero q/k/v biases share one ONNX initializer; o_proj's AWQ scale folds into v_proj
    ck = ckpt("int4-awq", preset="qwen2", task="causal-lm", dtype="fp32", options=CheckpointOptions(max_samples=2))
    t = tensors(ck.path)
    assert str(t["model.layers.1.self_attn.v_proj.bias"].dtype) == "torch.float16"
    assert np.all(t["model.layers.0.self_attn.o_proj.pre_quant_scale"].numpy() == 1.0)
    w = ck.manifest["verification"]["weights"]
    assert w["stored_identical"] == 14
    assert 0 < w["served_max_rel_err"] <= 2**-10  # fp32 ONNX scales, cast to float16 by the loader
    assert ck.manifest["verification"]["parity"]["checkpoint_vs_onnx"]["cosine_mean"] > 0.999


def test_shards_read_back_like_one_file(ckpt):
    one = ckpt("int4-awq", options=CheckpointOptions(parity=False))
    many = ckpt("int4-awq", options=CheckpointOptions(parity=False, max_shard_bytes=200_000))
    index = json.loads((many.path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in many.path.glob("*.safetensors"))
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    a, b = CheckpointReader(one.path), CheckpointReader(many.path)
    names = a.keys()
    assert names == b.keys()
    for k in names:
        assert np.array_equal(a.array(k), b.array(k)), k


def _rewrite(folder, drop: str | None = None) -> None:
    import torch  # noqa: F401 - safetensors.torch needs it
    from safetensors.torch import save_file

    t = tensors(folder)
    if drop:
        del t[drop]
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_reader_refuses_what_the_loader_refuses(ckpt, tmp_path):
    src = ckpt("int4-awq", options=CheckpointOptions(parity=False)).path
    broken = tmp_path / "no-pqs"
    shutil.copytree(src, broken)
    _rewrite(broken, drop="model.layers.1.mlp.down_proj.pre_quant_scale")
    with pytest.raises(ValidationError, match="pre_quant_scale is missing"):
        CheckpointReader(broken).check()
    bad_group = tmp_path / "group"
    shutil.copytree(src, bad_group)
    hq = json.loads((bad_group / "hf_quant_config.json").read_text())
    hq["quantization"]["group_size"] = 32
    (bad_group / "hf_quant_config.json").write_text(json.dumps(hq))
    r = CheckpointReader(bad_group)
    assert any("differs" in w for w in r.warnings)  # config.json still says 128
    with pytest.raises(ValidationError, match="group_size 64 or 128"):
        r.check()
    # without hf_quant_config.json the loader falls back to config.json, which carries group_size
    (bad_group / "hf_quant_config.json").unlink()
    r = CheckpointReader(bad_group)
    assert r.quant_source == "config.json" and r.quant["group_size"] == 128
    r.check()


@pytest.mark.parametrize("case", ["int8", "gpt2", "block32", "fp8-mul", "fused-partial", "lm-head"])
def test_refusals_before_any_work(q_art, tmp_path, case):
    args, match = {
        "int8": (("int8", "calib_method=max"), r"W8A8 SmoothQuant.*linear\.py.*--recipe fp8"),
        "gpt2": (("fp8",), r"GPT2LMHeadModel.*Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, "
                 r"Qwen2ForCausalLM, Qwen3ForCausalLM"),
        "block32": (("int4-rtn", "block_size=32"), r"group size of 64 or 128.*block size 32"),
        "fp8-mul": (("fp8", "smoothquant=true", "smooth_attention_output=true", "smooth_with_mul=true", "alpha=0.5"), r"pre_quant_scale.*smooth_with_mul=false"),
        "fused-partial": (("fp8", 'exclude=["*lm_head*", "*layers.0.self_attn.k_proj*"]'), r"k_proj not.*fuses"),
        "lm-head": (("fp8", "exclude=[]"), r"quantizes lm_head"),
    }[case]
    kw = {"preset": "gpt2", "task": "causal-lm", "dtype": "fp32", "model_kw": {}} if case == "gpt2" else {}
    art = q_art(*args, **kw)
    with pytest.raises(TrtforgeError, match=match) as info:
        export_checkpoint(art, tmp_path / "out", CheckpointOptions(parity=False))
    assert "\n" not in info.value.one_line() and info.value.hint
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_too_large_for_memory_says_how_much(q_art, tmp_path, monkeypatch):
    from trtforge.engines.trtllm import checks

    monkeypatch.setattr(checks, "available_bytes", lambda: 50 * 2**20)
    with pytest.raises(checks.ResourceError, match=r"needs about 1\.\d GiB of memory but only 50 MiB") as info:
        export_checkpoint(q_art("int4-awq"), tmp_path / "out")
    assert "--no-parity" in info.value.hint and not (tmp_path / "out").exists()


def test_not_quantized_and_existing_output(exported, q_art, tmp_path):
    with pytest.raises(TrtforgeError, match="not a quantized one"):
        export_checkpoint(exported("llama", task="causal-lm-with-past", dtype="fp16", **LLAMA128), tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(TrtforgeError, match="already exists"):
        export_checkpoint(q_art("int4-awq"), tmp_path / "b", CheckpointOptions(parity=False))


def test_a_failed_verification_leaves_nothing(q_art, tmp_path, monkeypatch):
    from trtforge.engines.trtllm import verify

    def boom(*a, **k):
        raise ValidationError("the checkpoint does not match the ONNX artifact: injected", "test")

    monkeypatch.setattr(verify, "compare_weights", boom)
    with pytest.raises(ValidationError, match="injected"):
        export_checkpoint(q_art("int4-awq"), tmp_path / "out", CheckpointOptions(parity=False))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_json_and_one_line_errors(q_art, tmp_path):
    from trtforge.cli import main

    art = q_art("int4-awq")
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(tmp_path / "ck"), "--no-parity", "--json",
                                  "--max-shard-size", "300KB"])
    assert r.exit_code == 0, r.output
    man = json.loads(r.stdout)
    assert man["kind"] == "trtllm-checkpoint" and man["format"]["quant_algo"] == "W4A16_AWQ" and len(man["format"]["files"]) > 1
    from trtforge.engines.trtllm.writer import CheckpointArtifact

    assert CheckpointArtifact.open(tmp_path / "ck").manifest == man
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(tmp_path / "ck"), "--no-parity"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: output folder")
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(tmp_path / "x"), "--dtype", "float32"])
    assert r.exit_code == 2


def test_bf16_checkpoint_rounds_only_what_it_must(ckpt):
    from trtforge.engines.trtllm import CkptDType

    ck = ckpt("int4-awq", options=CheckpointOptions(dtype=CkptDType.BFLOAT16, parity=False))
    t = tensors(ck.path)
    assert str(t["model.norm.weight"].dtype) == "torch.bfloat16"
    w = ck.manifest["verification"]["weights"]
    assert w["stored_identical"] == 14 and 0 < w["served_max_rel_err"] <= 2**-7  # scales cast to bfloat16 at load
    assert ml_dtypes.bfloat16  # the dtype numpy writes through


def test_both_gates_catch_a_wrong_nibble_order(q_art, ckpt, tmp_path):
    """The classic INT4 packing bug (odd/even rows swapped) fails the weight check and the parity check."""
    import torch
    from safetensors.torch import save_file

    from trtforge.engines.trtllm.onnx_source import read_source
    from trtforge.engines.trtllm.verify import compare_weights, parity

    art = q_art("int4-awq")
    bad = tmp_path / "swapped"
    shutil.copytree(ckpt("int4-awq", options=CheckpointOptions(parity=False)).path, bad)
    t = tensors(bad)
    for k, w in list(t.items()):
        if w.dtype == torch.uint8:
            t[k] = ((w >> 4) | (w << 4)).contiguous()
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    reader = CheckpointReader(bad)
    reader.check()  # the layout is still valid: only the values are wrong
    with pytest.raises(ValidationError, match="stores other quantized values"):
        compare_weights(reader, read_source(onnx.load(str(art.model_path))), requantized=False)
    with pytest.raises(ValidationError, match=r"disagree \(logits cosine 0\.\d+ < 0\.98\)"):
        parity(reader, art, reference=None, reference_note="none", text=None, max_samples=3)


def test_parity_inputs_checked_first_and_a_missing_source_is_recorded(q_art, tmp_path):
    from dataclasses import replace

    from trtforge.artifacts import OnnxArtifact
    from trtforge.engines.trtllm.writer import CheckpointArtifact, _reference

    art = q_art("int4-awq")
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text("{}")
    (tmp_path / "ref" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(TrtforgeError, match="safetensors weights"):
        export_checkpoint(art, tmp_path / "a", CheckpointOptions(reference=tmp_path / "ref"))
    with pytest.raises(TrtforgeError, match="does not exist"):
        export_checkpoint(art, tmp_path / "b", CheckpointOptions(text=tmp_path / "missing.txt"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    moved = OnnxArtifact(art.path, replace(art.manifest, source=replace(art.manifest.source, path=str(tmp_path / "gone"))))
    ref, why = _reference(moved, CheckpointOptions())
    assert ref is None and "not there" in why and "--reference" in why
    ref, why = _reference(art, CheckpointOptions())
    assert str(ref) == art.manifest["source"]["path"] and "sha256 unchanged" in why
    ref, why = _reference(art, replace(CheckpointOptions(), parity=False))
    assert ref is None
    with pytest.raises(TrtforgeError, match="not a checkpoint written by trtforge"):
        CheckpointArtifact.open(art.path)


def test_a_changed_onnx_file_is_refused(q_art, tmp_path):
    copy = tmp_path / "q"
    shutil.copytree(q_art("fp8", "weight_granularity=tensor").path, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(TrtforgeError, match="changed since trtforge quantize wrote it"):
        export_checkpoint(copy, tmp_path / "out", CheckpointOptions(parity=False))


@pytest.fixture
def ppl_66(monkeypatch):
    """The parity check reports what the new user saw: perplexity +66.41% vs the float model."""
    from trtforge.engines.trtllm import verify

    real = verify.parity

    def inflated(*a, **k):
        out = real(*a, **k)
        if "checkpoint_vs_reference" in out:
            out["checkpoint_vs_reference"]["ppl_change_pct"] = 66.41
        return out

    monkeypatch.setattr(verify, "parity", inflated)


def test_a_checkpoint_far_off_the_float_model_fails_unless_the_limit_is_raised(q_art, tmp_path, ppl_66):
    from trtforge.cli import main

    art = q_art("int4-awq")
    out = tmp_path / "ck"
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(out)])
    line = one_line_error(r, "+66.41%", "25% limit for int4", "--max-ppl-change-pct 68")
    assert "no checkpoint was written" in line
    assert not out.exists() and leftovers(tmp_path) == []
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(out), "--max-ppl-change-pct", "70", "--json"])
    assert r.exit_code == 0, r.output
    gate = json.loads(r.stdout)["verification"]["perplexity_gate"]
    assert gate == {**gate, "checked": True, "passed": True, "value": 66.41, "limit": 70.0, "limit_source": "max_ppl_change_pct"}
    r = CliRunner().invoke(main, ["export-checkpoint", str(art.path), "-o", str(tmp_path / "n"), "--max-ppl-change-pct", "-1"])
    one_line_error(r, "--max-ppl-change-pct -1.0 is not a percentage")


def test_the_perplexity_gate_defaults_and_what_it_records(ckpt):
    from trtforge.engines.trtllm.checks import MAX_PPL_CHANGE_PCT
    from trtforge.parity import Thresholds
    from trtforge.parity.options import preset_for_precision
    from trtforge.vocab import Precision

    # the same limits as parity's presets for these precisions (copied, not imported, by engines)
    for p in (Precision.FP8, Precision.INT4):
        assert MAX_PPL_CHANGE_PCT[p] == Thresholds.preset(preset_for_precision(p)).limits["ppl_change_pct"]
    gate = ckpt("int4-awq").manifest["verification"]["perplexity_gate"]
    assert gate["checked"] and gate["passed"] and gate["limit"] == 25.0 and gate["limit_source"] == "the int4-weight-only default"
    skipped = ckpt("int4-awq", options=CheckpointOptions(parity=False)).manifest["verification"]["perplexity_gate"]
    assert skipped["checked"] is False and skipped["why"] == "--no-parity"
