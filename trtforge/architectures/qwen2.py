"""Qwen2 (``model_type: qwen2``): LLaMA's layout with biases on q/k/v."""

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

QWEN2 = ARCHITECTURES.register(Architecture(
    name="qwen2",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.RMSNORM,
    padding_side="left",
    smoothing_groups=LLAMA_SMOOTHING,
    cache=CacheLayout(),
    checkpoint=Checkpoint("Qwen2ForCausalLM", fused=dict(TRTLLM_FUSED)),
))
