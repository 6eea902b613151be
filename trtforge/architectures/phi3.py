"""Phi-3 (``model_type: phi3``; Phi-3, Phi-3.5-mini and Phi-4-mini): fused projections.

Attention reads one fused ``self_attn.qkv_proj`` GEMM whose output is sliced into q, k and v
(q first, then k, then v: ``[heads*hd | kv_heads*hd | kv_heads*hd]``); the MLP reads one fused
``mlp.gate_up_proj`` GEMM whose output is split in half (gate first, then up) and combined as
``up * silu(gate)``. Each is one GEMM reading one norm, so each smoothing group is one weight.
Partial rotary embeddings (Phi-4-mini: 0.75 of head_dim), ``longrope`` scaling (a traceable
equivalent of transformers' in-place frequency switch, exporter/_torch.py) and a config
``sliding_window`` (the window as a mask in the graph, cache at full length) are exported as
transformers computes them.
"""

from __future__ import annotations

from trtforge.architectures.base import DECODER_TASKS, Architecture, CacheLayout, Checkpoint, NormKind
from trtforge.registry import ARCHITECTURES
from trtforge.vocab import Family

PHI3 = ARCHITECTURES.register(Architecture(
    name="phi3",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.RMSNORM,
    padding_side="left",
    smoothing_groups={"attn-in": ("qkv_proj",), "mlp-in": ("gate_up_proj",)},
    cache=CacheLayout(),
    # TensorRT-LLM's PyTorch backend has Phi3ForCausalLM and reads qkv_proj / gate_up_proj as
    # they are (already one GEMM each: nothing for its loader to fuse); not written yet
    checkpoint=Checkpoint("Phi3ForCausalLM", fused={}, writable=False),
    notes="fused qkv_proj (q|k|v) and gate_up_proj (gate|up); partial rotary",
))
