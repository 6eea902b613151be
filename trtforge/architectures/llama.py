"""LLaMA (``model_type: llama``): pre-RMSNorm decoder, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

from trtforge.architectures.base import (
    DECODER_TASKS,
    LLAMA_SMOOTHING,
    TRTLLM_FUSED,
    Architecture,
    CacheLayout,
    Checkpoint,
    NormKind,
)
from trtforge.registry import ARCHITECTURES
from trtforge.vocab import Family

LLAMA = ARCHITECTURES.register(Architecture(
    name="llama",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.RMSNORM,
    padding_side="left",
    smoothing_groups=LLAMA_SMOOTHING,
    cache=CacheLayout(),
    checkpoint=Checkpoint("LlamaForCausalLM", fused=dict(TRTLLM_FUSED)),
))
