"""Mistral (``model_type: mistral``): LLaMA's layout and module names (sliding window aside)."""

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

MISTRAL = ARCHITECTURES.register(Architecture(
    name="mistral",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.RMSNORM,
    padding_side="left",
    smoothing_groups=LLAMA_SMOOTHING,
    cache=CacheLayout(),
    checkpoint=Checkpoint("MistralForCausalLM", fused=dict(TRTLLM_FUSED)),
))
