"""`trtforge run` with the TensorRT-LLM checkpoint as a target: alone and next to the CPU target,
cached like the other stages, its export-checkpoint refusals raised before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import trtforge
from trtforge.cli import main
from trtforge.errors import TrtforgeError

from ..conftest import DATA, REPO  # noqa: TID252

LLAMA128 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny GEMMs: a second OpenMP thread only adds contention on a loaded 2-core runner."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe(folder: Path, model: Path, quant: str, targets: list[str], extra: str = "") -> Path:
    p = folder / f"{quant}-{'-'.join(targets)}.toml"
    p.write_text(f"""
[model]
path = "{model}"

[calibration]
data = ["{DATA / 'calib-apache-2.0.txt'}"]
num_samples = 8
seq_len = 64

[quantize]
recipe = "{quant}"
{extra}

[build]
targets = {json.dumps(targets)}

[checkpoint]
max_samples = 3

[parity]
data = ["{DATA / 'eval-gpl-3.0.txt'}"]
""")
    return p


def statuses(m: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in m["stages"]}


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama", **LLAMA128)


def test_fp8_checkpoint_is_a_cached_stage(llama, tmp_path):
    r = recipe(tmp_path, llama, "fp8", ["trtllm"], "weight_granularity = \"tensor\"")
    out = tmp_path / "out"
    m = trtforge.run(r, out)
    st = statuses(m)
    assert m["verdict"] == "passed", m
    assert st == {"export/fp32": "done", "export/fp16": "done", "quantized/fp8": "done", "engines/trtllm": "done",
                  "reports/fp8": "done"}  # no parity report of its own: verified when written
    ck = out / "engines" / "trtllm"
    man = json.loads((ck / "manifest.json").read_text())
    assert man["kind"] == "trtllm-checkpoint" and man["format"]["quant_algo"] == "FP8"
    assert json.loads((ck / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    assert man["verification"]["weights"]["stored_identical"] == man["verification"]["weights"]["linears_quantized"]
    assert man["source"]["path"] == str(out / "quantized" / "fp8")
    stage = next(s for s in m["stages"] if s["name"] == "engines/trtllm")
    assert "FP8" in stage["summary"] and "logits vs ONNX" in stage["summary"]
    assert m["artifacts"]["engines/trtllm"]["files"]["model.safetensors"]
    again = trtforge.run(r, out)
    assert set(statuses(again).values()) == {"cached"}
    # `trtforge inspect` checks it through its backend: files and the GPU its FP8 kernels need
    res = CliRunner().invoke(main, ["inspect", str(ck), "--load", "--json"])
    rep = json.loads(res.stdout)
    assert {c["what"]: c["ok"] for c in rep["checks"]}["files hash"] is True
    gpu_ok = {c["what"]: c["ok"] for c in rep["checks"]}["GPU"]
    assert res.exit_code == (0 if gpu_ok else 1) and rep["kind"] == "tensorrt-llm checkpoint"


def test_int4_awq_next_to_the_cpu_target_shares_one_quantization(llama, tmp_path):
    r = recipe(tmp_path, llama, "int4-awq", ["cpu", "trtllm"])
    m = trtforge.run(r, tmp_path / "out")
    st = statuses(m)
    assert m["verdict"] == "passed", m["reports"]
    assert st["engines/cpu"] == st["engines/trtllm"] == "done" and list(st).count("quantized/int4-awq") == 1
    assert set(m["reports"]) == {"int4-awq", "int4-awq-cpu"}
    man = json.loads((tmp_path / "out" / "engines" / "trtllm" / "manifest.json").read_text())
    assert man["format"]["quant_algo"] == "W4A16_AWQ" and man["format"]["group_size"] == 128
    # the shared artifact is FP16 because the checkpoint wants it (the CPU alone would get FP32)
    q = json.loads((tmp_path / "out" / "quantized" / "int4-awq" / "manifest.json").read_text())
    assert q["model"]["dtype"] == "fp16"


@pytest.mark.parametrize("quant,extra,model_kw,match", [
    ("int8-sq", "", LLAMA128, r"W8A8 SmoothQuant.*--recipe fp8"),
    ("int4-awq", "block_size = 32", LLAMA128, r"group size of 64 or 128.*block_size is 32"),
    ("int4-awq", "", {}, r"group size of 64 or 128.*does not divide the model's hidden_size \(96\)"),
    ("fp8", "exclude = []", LLAMA128, r"quantizes lm_head"),
])
def test_export_checkpoint_refusals_come_before_any_work(tiny_model, tmp_path, quant, extra, model_kw, match):
    r = recipe(tmp_path, tiny_model("llama", **model_kw), quant, ["cpu", "trtllm"], extra)
    with pytest.raises(TrtforgeError, match=match) as info:
        trtforge.run(r, tmp_path / "out")
    assert "\n" not in info.value.one_line()
    assert not (tmp_path / "out").exists()


def test_a_family_without_a_checkpoint_is_refused_before_any_work(tiny_model, tmp_path):
    r = recipe(tmp_path, tiny_model("gpt2"), "fp8", ["trtllm"])
    with pytest.raises(TrtforgeError, match=r"GPT2LMHeadModel cannot be written.*LlamaForCausalLM"):
        trtforge.run(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_options_are_checked_with_their_recipe_key(llama, tmp_path):
    r = recipe(tmp_path, llama, "fp8", ["trtllm"])
    with pytest.raises(TrtforgeError, match=r"\[checkpoint\] 'float32' is not a valid CkptDType"):
        trtforge.run(r, tmp_path / "out", sets=["checkpoint.dtype=float32"])
    with pytest.raises(TrtforgeError, match=r"unknown key checkpoint\.shards"):
        trtforge.run(r, tmp_path / "out", sets=["checkpoint.shards=2"])
    assert not (tmp_path / "out").exists()


def test_skipped_targets_are_listed_with_their_reason(llama, tmp_path, monkeypatch):
    import trtforge.env as env

    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": False, "reason": "ModuleNotFoundError: tensorrt"})
    r = recipe(tmp_path, llama, "fp8", ["sm_90", "sm_89"])
    m = trtforge.run(r, tmp_path / "out", sets=["parity.reports=quantized"], skip_unavailable_targets=True)
    assert m["verdict"] == "passed"
    assert m["skipped"] == [{"stage": "engines/sm_90", "target": "sm_90", "why": "TensorRT is not importable"},
                            {"stage": "engines/sm_89", "target": "sm_89", "why": "TensorRT is not importable"}]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == m["skipped"]


def test_the_trtllm_example_runs_on_cpu(tmp_path):
    d = REPO / "examples" / "models" / "llama-tiny"
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "examples" / "make_tiny_llama.py"), str(d)], check=True)
    m = trtforge.run(REPO / "examples" / "llama-trtllm-fp8.toml", tmp_path / "o", skip_unavailable_targets=True,
                     sets=["calibration.num_samples=16", "checkpoint.max_samples=3"])
    assert m["verdict"] == "passed", m["reports"]
    assert statuses(m)["engines/trtllm"] == "done"
    assert all(s["target"] == "sm_90" and s["why"] for s in m["skipped"])  # skipped where TensorRT is missing


def test_the_trtllm_target_fails_a_checkpoint_above_its_perplexity_limit(llama, tmp_path, monkeypatch):
    from trtforge.engines.trtllm import verify

    real = verify.parity

    def inflated(*a, **k):
        out = real(*a, **k)
        out["checkpoint_vs_reference"]["ppl_change_pct"] = 66.41
        return out

    monkeypatch.setattr(verify, "parity", inflated)
    r = recipe(tmp_path, llama, "fp8", ["trtllm"], "weight_granularity = \"tensor\"")
    res = CliRunner().invoke(main, ["-q", "run", str(r), "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "+66.41%, above the 5% limit for fp8" in res.stderr, res.output
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["verdict"] == "failed" and "66.41" in m["error"]
    assert not (tmp_path / "out" / "engines" / "trtllm").exists()
    m = trtforge.run(r, tmp_path / "out", sets=["checkpoint.max_ppl_change_pct=70"])
    assert m["verdict"] == "passed" and statuses(m)["engines/trtllm"] == "done"
    with pytest.raises(TrtforgeError, match=r"\[checkpoint\] max_ppl_change_pct -1\.0 is not a percentage"):
        trtforge.run(r, tmp_path / "o2", sets=["checkpoint.max_ppl_change_pct=-1"])


def test_auto_budget_granularity_follows_the_targets():
    """budget_granularity "auto": group (q/k/v and gate/up switched together) where any target is
    TensorRT-LLM, which fuses them; each GEMM alone for TensorRT engines and the CPU."""
    from trtforge.backend import resolve_target
    from trtforge.calibration import get_preset
    from trtforge.pipeline import quant_for_targets

    r = get_preset("fp8").replace(budget="perplexity=1%")
    assert r.budget_granularity == "auto"
    for names, granularity, dtype in ((["cpu"], "gemm", "fp32"), (["hopper"], "gemm", "fp16"),
                                      (["trtllm"], "group", "fp16"), (["cpu", "trtllm"], "group", "fp16")):
        q = quant_for_targets(r, [resolve_target(n) for n in names])
        assert (q.budget_granularity, q.dtype) == (granularity, dtype), names
    # an explicit choice stays as written
    assert quant_for_targets(r.replace(budget_granularity="group"), [resolve_target("cpu")]).budget_granularity == "group"


def test_a_budget_next_to_the_trtllm_target_switches_groups_and_the_checkpoint_loads(llama, tmp_path):
    """[quantize] budget with cpu and trtllm targets: one quantization whose manifest records group
    granularity (no q/k/v or gate/up split), which export-checkpoint accepts; an explicit
    budget_granularity = "gemm" is refused before any work."""
    r = recipe(tmp_path, llama, "fp8", ["cpu", "trtllm"], 'budget = "perplexity=1%"\nweight_granularity = "tensor"')
    m = trtforge.run(r, tmp_path / "out")
    assert m["verdict"] == "passed", m
    q = json.loads((tmp_path / "out" / "quantized" / "fp8" / "manifest.json").read_text())
    assert q["quantization"]["recipe"]["budget_granularity"] == "group"
    assert statuses(m)["engines/trtllm"] == "done"
    bad = recipe(tmp_path, llama, "fp8", ["cpu", "trtllm"], 'budget = "perplexity=1%"\nbudget_granularity = "gemm"')
    with pytest.raises(TrtforgeError, match="budget_granularity = gemm"):
        trtforge.run(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
