"""GPT-2 (``model_type: gpt2``): pre-norm decoder with fused attention and Conv1D GEMMs."""

from __future__ import annotations

from trtforge.architectures.base import DECODER_TASKS, Architecture, CacheLayout, NormKind
from trtforge.registry import ARCHITECTURES
from trtforge.vocab import Family

GPT2 = ARCHITECTURES.register(Architecture(
    name="gpt2",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.LAYERNORM,
    padding_side="left",
    # one fused c_attn GEMM (split into q, k, v after it) reads ln_1; c_fc reads ln_2.
    # Conv1D stores weights [in, out], so the ONNX GEMM reads them untransposed.
    smoothing_groups={"attn-in": ("c_attn",), "mlp-in": ("c_fc",)},
    cache=CacheLayout(),
    # TensorRT-LLM's PyTorch backend has no GPT2LMHeadModel (engines/trtllm/formats.py
    # TRTLLM_ARCHITECTURES), so no checkpoint is written for it.
    checkpoint=None,
))
