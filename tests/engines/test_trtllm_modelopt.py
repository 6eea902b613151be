"""Optional: our checkpoint's layout against NVIDIA Model Optimizer's export of the same tiny model.

Runs where ``modelopt`` imports in this interpreter, or with TRTFORGE_MODELOPT_PYTHON pointing at
an interpreter that has it (modelopt pins transformers and its [onnx] extra swaps onnxruntime for
onnxruntime-gpu, so it usually lives in a separate virtual environment); skipped otherwise.
Compared: hf_quant_config.json's quantization keys and values, and every tensor's name, dtype
and shape. Values differ by design (Model Optimizer calibrates its own way).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open

from trtforge.engines.trtllm import CheckpointOptions, export_checkpoint
from trtforge.engines.trtllm.reader import CheckpointReader

from ..conftest import DATA  # noqa: TID252

LLAMA128 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)

SCRIPT = textwrap.dedent(
    """
    import sys, warnings, torch
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM
    src, out = sys.argv[1:3]
    for cfg in sys.argv[3:]:
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).eval()
        ids = [torch.randint(0, m.config.vocab_size, (2, 32)) for _ in range(2)]
        def loop(model):
            with torch.no_grad():
                for x in ids:
                    model(input_ids=x)
        m = mtq.quantize(m, getattr(mtq, cfg), loop)
        export_hf_checkpoint(m, export_dir=f"{out}/{cfg}")
    """
)


def _modelopt_python() -> str | None:
    env = os.environ.get("TRTFORGE_MODELOPT_PYTHON")
    if env:
        return env
    return sys.executable if importlib.util.find_spec("modelopt") else None


def layout(folder) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names = h.keys()
            for k in names:
                s = h.get_slice(k)
                out[k] = (s.get_dtype(), list(s.get_shape()))
    return out


@pytest.mark.slow
def test_layout_matches_model_optimizer(tiny_model, exported, tmp_path):
    python = _modelopt_python()
    if python is None:
        pytest.skip("nvidia-modelopt is not importable (set TRTFORGE_MODELOPT_PYTHON to an interpreter that has it)")
    from trtforge.calibration import quantize
    from trtforge.recipes import load_quant_recipe

    src = tiny_model("llama", **LLAMA128)
    art = exported("llama", task="causal-lm-with-past", dtype="fp16", **LLAMA128)
    r = subprocess.run([python, "-c", SCRIPT, str(src), str(tmp_path / "mo"), "INT4_AWQ_CFG", "FP8_DEFAULT_CFG"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for recipe, sets, cfg in (("int4-awq", (), "INT4_AWQ_CFG"), ("fp8", ("weight_granularity=tensor",), "FP8_DEFAULT_CFG")):
        q = quantize(art, load_quant_recipe(recipe, ("num_samples=8", "seq_len=64", *sets)), tmp_path / f"q-{recipe}",
                     calib=[DATA / "calib-apache-2.0.txt"])
        ours = export_checkpoint(q, tmp_path / f"ours-{recipe}", CheckpointOptions(parity=False)).path
        theirs = tmp_path / "mo" / cfg
        a = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
        b = json.loads((theirs / "hf_quant_config.json").read_text())["quantization"]
        assert sorted(a.pop("exclude_modules")) == sorted(b.pop("exclude_modules"))
        assert a == b, (recipe, a, b)
        la, lb = layout(ours), layout(theirs)
        diff = {k: (la.get(k), lb.get(k)) for k in set(la) | set(lb) if la.get(k) != lb.get(k)}
        assert not diff, (recipe, sorted(diff.items())[:8])
        # embedding + final norm, 2 norms per layer, 14 Linears (FP8: weight, weight_scale, input_scale;
        # INT4: weight, weight_scale, and pre_quant_scale on o_proj/down_proj)
        assert len(la) == 2 + 4 + 14 * (3 if recipe == "fp8" else 2) + (0 if recipe == "fp8" else 4)
        CheckpointReader(theirs).check()  # our reader accepts Model Optimizer's checkpoint too
