"""Qwen3 (``model_type: qwen3``): LLaMA's layout without q/k/v biases, plus QK-norm.

q and k each pass an RMSNorm over head_dim (weights ``self_attn.q_norm`` / ``k_norm``) before
RoPE. Optional sliding-window layers (``use_sliding_window``, off in the released models) are
exported like Gemma 3's: full-length cache, the window as a mask in the graph.
"""

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

QWEN3 = ARCHITECTURES.register(Architecture(
    name="qwen3",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.RMSNORM,
    padding_side="left",
    smoothing_groups=LLAMA_SMOOTHING,
    cache=CacheLayout(),
    # TensorRT-LLM's PyTorch backend: Qwen3ForCausalLM reads the HF names through its generic weight
    # mapper (q/k/v and gate/up fused as for llama; self_attn.q_norm / k_norm as they are, plain RMSNorm)
    checkpoint=Checkpoint("Qwen3ForCausalLM", fused=dict(TRTLLM_FUSED)),
    notes="QK-norm (RMSNorm over head_dim on q and k before RoPE)",
))
