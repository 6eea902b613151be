"""On a GPU with TensorRT-LLM: the checkpoint loads in ``tensorrt_llm.LLM`` and generates text.

Skipped without an NVIDIA GPU (the ``gpu`` marker, tests/conftest.py) and without an importable
``tensorrt_llm`` (1.0 or later, PyTorch backend). Never run in this project so far: see
docs/trtllm.md, "What was verified where".
"""

from __future__ import annotations

import numpy as np
import pytest

from trtforge.engines.trtllm import CheckpointOptions, export_checkpoint

from ..conftest import DATA  # noqa: TID252

LLAMA128 = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
PROMPT = "The build step turns a trained model into"


def _sm() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return major * 10 + minor


@pytest.mark.gpu
@pytest.mark.trtllm
@pytest.mark.slow
@pytest.mark.parametrize("recipe,sets,min_sm", [("int4-awq", (), 80), ("fp8", ("weight_granularity=tensor",), 89)])
def test_tensorrt_llm_loads_and_generates(exported, tmp_path, recipe, sets, min_sm):
    tllm = pytest.importorskip("tensorrt_llm", reason="pip install tensorrt_llm (1.0+) on a GPU machine")
    if _sm() < min_sm:
        pytest.skip(f"{recipe} needs compute capability {min_sm / 10:.1f}+")
    from trtforge.calibration import quantize
    from trtforge.engines.trtllm._torch import LinearSpec, build_model, logits
    from trtforge.engines.trtllm.reader import CheckpointReader
    from trtforge.recipes import load_quant_recipe

    art = exported("llama", task="causal-lm-with-past", dtype="fp16", **LLAMA128)
    q = quantize(art, load_quant_recipe(recipe, ("num_samples=8", "seq_len=64", *sets)), tmp_path / "q",
                 calib=[DATA / "calib-apache-2.0.txt"])
    ck = export_checkpoint(q, tmp_path / "ck", CheckpointOptions(parity=False))

    llm = tllm.LLM(model=str(ck.path))  # the PyTorch backend reads hf_quant_config.json
    out = llm.generate([PROMPT], tllm.SamplingParams(max_tokens=8, temperature=0.0))
    ids = list(out[0].outputs[0].token_ids)
    assert len(ids) > 0 and isinstance(out[0].outputs[0].text, str)

    # TensorRT-LLM's greedy first token is among the top 5 of our fake-quantized model of the checkpoint
    from transformers import AutoTokenizer

    prompt = np.asarray(AutoTokenizer.from_pretrained(str(ck.path))(PROMPT)["input_ids"], np.int64)
    reader = CheckpointReader(ck.path)
    specs = ((s.module, LinearSpec(s.weight, s.bias, s.pre_quant_scale, s.act, s.input_scale))
             for s in reader.iter_linears() if s.quantized)
    ours = logits(build_model(reader.config, reader.float_params(), specs), [prompt])[0][0, -1]
    assert ids[0] in np.argsort(-ours)[:5]
