"""Gemma 3 text (``model_type: gemma3_text``, Gemma3ForCausalLM), e.g. Gemma 3 270M / 1B.

What sets it apart from LLaMA, and how the export handles it:

* RMSNorm computes ``x / rms(x) * (1 + w)`` (weights stored centred on 0), and every layer has
  four of them: input, post-attention, pre-feedforward, post-feedforward. The TorchScript export
  writes the scale as ``Add(1, w)`` (folded into one constant by constant folding, so the graph
  holds ``1 + w`` as the Mul's initializer); trtforge.graph reports the norm as
  ``rmsnorm-plus-one`` when it can still see the Add.
* QK-norm: q and k each pass a (1 + w) RMSNorm over head_dim before RoPE.
* Embeddings are scaled by sqrt(hidden_size) (a Mul after the Gather).
* Attention scale is ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``.
* Layers interleave sliding-window attention (Gemma 3: 5 of every 6, window 512) and global
  attention, each kind with its own RoPE base (10k local, 1M global).

KV cache: every layer, sliding or global, is exported at full length (past_sequence grows by one
each step) and the window is applied as a mask inside the graph (keys older than ``window - 1``
positions are masked out), exactly what transformers computes. transformers' own cache keeps only
the last ``window - 1`` positions of a sliding layer, which is the same attention: a runtime may
trim, but must then also trim attention_mask, and trtforge's exports never do.
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

GEMMA3 = ARCHITECTURES.register(Architecture(
    name="gemma3_text",
    family=Family.DECODER,
    tasks=DECODER_TASKS,
    norm=NormKind.RMSNORM_PLUS_ONE,
    padding_side="left",
    # q/k/v read input_layernorm, gate/up read pre_feedforward_layernorm (post_attention_layernorm
    # normalizes the attention output before the residual add: no GEMM reads it).
    smoothing_groups=LLAMA_SMOOTHING,
    cache=CacheLayout(),
    # TensorRT-LLM's PyTorch backend: Gemma3ForCausalLM (tensorrt_llm/_torch/models/modeling_gemma3.py) reads
    # the HF names (q/k/v and gate/up fused as for llama; self_attn.q_norm / k_norm); its weight
    # mapper (checkpoints/hf/gemma3_weight_mapper.py) adds 1 to every "norm" module's weight, so the
    # checkpoint holds w = (1 + w) - 1, and skips lm_head when tie_word_embeddings. Its config is read
    # by transformers 4.57 (rope_theta for global layers, rope_local_base_freq for sliding ones).
    checkpoint=Checkpoint("Gemma3ForCausalLM", fused=dict(TRTLLM_FUSED), norm_offset=1.0,
                          rope_keys={"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"},
                          auto_dtype="bfloat16"),
    notes="(1 + w) RMSNorm x4 per layer, QK-norm, scaled embeddings, sliding/global layers with per-kind RoPE; "
          "full-length KV cache for every layer, window applied as a mask in the graph",
))
