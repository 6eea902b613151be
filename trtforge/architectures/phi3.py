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
    # TensorRT-LLM's PyTorch backend: Phi3ForCausalLM.load_weights (tensorrt_llm/_torch/models/modeling_phi3.py)
    # reads qkv_proj and gate_up_proj fused as stored, slices them by rows into q/k/v (q = the first
    # hidden_size rows) and gate/up (intermediate_size rows each) and gives every shard the layer's one
    # weight_scale / input_scale: each is a fused layer of one module here.
    checkpoint=Checkpoint("Phi3ForCausalLM", fused={"qkv": ("qkv_proj",), "gate_up": ("gate_up_proj",)},
                          q_rows_are_hidden=True, refuse={
        "W4A16_AWQ": "TensorRT-LLM's Phi3ForCausalLM.load_weights (modeling_phi3.py) slices qkv_proj and gate_up_proj "
                     "at rows of the stored weight and splits weight_scale only when its first dimension equals the "
                     "weight's: a packed INT4 weight has out/2 rows and its [out, in/group] scale out, so the shards get "
                     "the wrong rows and the whole scale",
        "FP8_PER_CHANNEL_PER_TOKEN": "TensorRT-LLM's Phi3ForCausalLM.load_weights (modeling_phi3.py) slices a fused "
                                     "layer's weight_scale as weight_scale[:n, :], which a per-channel FP8 scale "
                                     "(one dimension, [out]) does not have",
    }),
    notes="fused qkv_proj (q|k|v) and gate_up_proj (gate|up); partial rotary",
))
