"""What one model family is, as data: everything family-specific in one object.

An :class:`Architecture` entry lives in ``trtforge/architectures/<family>.py`` and registers
itself in :data:`trtforge.registry.ARCHITECTURES`. The stages read it and nothing else:

* export: the tasks (the first is the default), the transformers Auto class per task, the export
  wrapper (``wrapper``: a name the exporter maps to one of its torch wrappers: ``encoder`` or
  ``causal-lm``), how batches are padded, and the KV-cache layout of ``causal-lm-with-past``;
* calibration: the normalization pattern the SmoothQuant/AWQ folds look for, and the GEMM groups
  that share one smoothing factor (q/k/v after the attention norm, gate/up after the MLP norm),
  by role (``attn-in``, ``mlp-in``: the roles calibration's pattern finder gives its groups) and
  the module-name suffixes of their weights (``q_proj``; ``intermediate.dense`` where the last
  name alone is ambiguous); :meth:`Architecture.smoothing_group_of` matches a weight to its group;
* checkpoints: the TensorRT-LLM model class and module names, and the fused groups its loader
  rescales together (None: the family cannot be written as a TensorRT-LLM checkpoint).

Adding a family is one new module here, registered with ``ARCHITECTURES.register(...)`` and
named in trtforge/registry.py's built-in list, plus a tiny-model preset for its tests
(trtforge/testing/tinymodels.py); tests/test_architecture_registry.py checks every entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trtforge.vocab import Family, StrEnum, Task


class NormKind(StrEnum):
    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"
    RMSNORM_PLUS_ONE = "rmsnorm-plus-one"  # Gemma: x * (1 + w)


@dataclass(frozen=True)
class CacheLayout:
    """How ``causal-lm-with-past`` exports carry the KV cache."""

    # past_key_values.{layer}.{key|value}, each (batch, kv_heads, past_sequence, head_dim)
    input_pattern: str = "past_key_values.{layer}.{kv}"
    output_pattern: str = "present.{layer}.{kv}"
    kv_names: tuple[str, str] = ("key", "value")

    def inputs(self, num_layers: int) -> list[str]:
        return [self.input_pattern.format(layer=i, kv=kv) for i in range(num_layers) for kv in self.kv_names]

    def outputs(self, num_layers: int) -> list[str]:
        return [self.output_pattern.format(layer=i, kv=kv) for i in range(num_layers) for kv in self.kv_names]


@dataclass(frozen=True)
class Checkpoint:
    """What TensorRT-LLM's PyTorch-backend loader expects of this family."""

    architecture: str  # the HF class name the loader maps (e.g. LlamaForCausalLM)
    # groups the loader fuses into one GEMM and re-scales with one FP8/INT4 scale; a group of one
    # module (Phi-3's qkv_proj) is a layer stored fused, which the loader splits into shards that
    # share its one scale
    fused: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TRTLLM_FUSED))
    writable: bool = True  # trtforge writes it (False: TensorRT-LLM has the class, trtforge's names differ)
    # the Hugging Face weight of every norm (a module whose name contains "norm") is the ONNX
    # graph's scale minus this: Gemma's x * (1 + w) is exported with the sum 1 + w as its scale,
    # and TensorRT-LLM's Gemma3HfWeightMapper.handle_manual_copy adds 1 back to every "norm" module
    norm_offset: float = 0.0
    # quant_algo -> why the family's loader cannot read it (export-checkpoint refuses with this line)
    refuse: dict[str, str] = field(default_factory=dict)
    # per-layer-type rope_parameters (transformers 5) -> the flat config keys TensorRT-LLM's pinned
    # transformers 4.x reads, e.g. Gemma 3: full_attention -> rope_theta, sliding -> rope_local_base_freq
    rope_keys: dict[str, str] = field(default_factory=dict)
    # the checkpoint dtype when the source is FP32 and none is asked for ("float16" unless the
    # family overflows in it: Gemma's activations exceed FP16's range, it is trained in bfloat16)
    auto_dtype: str = "float16"
    # the loader slices qkv_proj at q = hidden_size rows, head_dim = hidden_size // heads (Phi-3):
    # a config with heads * head_dim != hidden_size loads wrongly and is refused
    q_rows_are_hidden: bool = False


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json model_type
    family: Family
    tasks: tuple[Task, ...]  # the first is the default
    norm: NormKind
    padding_side: str  # how batches are padded: right for encoders, left for decoders
    # transformers Auto class per task
    auto_class: dict[Task, str] = field(default_factory=dict)
    # GEMM groups that share one smoothing factor: role -> module-name suffixes of their weights
    smoothing_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cache: CacheLayout | None = None
    checkpoint: Checkpoint | None = None
    notes: str = ""
    wrapper: str = ""  # the exporter's torch wrapper; "" = the family's (encoder / causal-lm)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"architecture {self.name!r} lists no tasks")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"architecture {self.name!r}: padding_side must be 'left' or 'right'")
        if not self.wrapper:
            object.__setattr__(self, "wrapper", "causal-lm" if self.is_decoder else "encoder")
        if not self.auto_class:  # the usual transformers Auto class per task
            object.__setattr__(self, "auto_class", auto_classes(self.tasks))
        missing = [str(t) for t in self.tasks if t not in self.auto_class]
        if missing:
            raise ValueError(f"architecture {self.name!r} has no auto class for {', '.join(missing)}")
        if self.is_decoder and Task.CAUSAL_LM_WITH_PAST in self.tasks and self.cache is None:
            raise ValueError(f"architecture {self.name!r} exports causal-lm-with-past but has no cache layout")

    @property
    def default_task(self) -> Task:
        return self.tasks[0]

    @property
    def is_decoder(self) -> bool:
        return self.family == Family.DECODER

    def task_for(self, architectures: list[str] | None) -> Task:
        """The task a config's ``architectures`` entry implies (BertForSequenceClassification -> ...)."""
        for arch in architectures or []:
            if arch.endswith("ForSequenceClassification") and Task.SEQUENCE_CLASSIFICATION in self.tasks:
                return Task.SEQUENCE_CLASSIFICATION
            if (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")) and self.is_decoder:
                return Task.CAUSAL_LM_WITH_PAST
        return self.default_task

    def smoothing_group_of(self, weight: str) -> str | None:
        """The smoothing group (role) of a weight or module name, e.g.
        ``model.layers.0.self_attn.k_proj.weight`` -> ``attn-in``; None when it is in none."""
        module = weight[: -len(".weight")] if weight.endswith(".weight") else weight
        for role, suffixes in self.smoothing_groups.items():
            if any(module == s or module.endswith("." + s) for s in suffixes):
                return role
        return None


ENCODER_TASKS = (Task.FEATURE_EXTRACTION, Task.SEQUENCE_CLASSIFICATION)
DECODER_TASKS = (Task.CAUSAL_LM_WITH_PAST, Task.CAUSAL_LM)
AUTO_CLASS = {
    Task.FEATURE_EXTRACTION: "AutoModel",
    Task.SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.CAUSAL_LM: "AutoModelForCausalLM",
    Task.CAUSAL_LM_WITH_PAST: "AutoModelForCausalLM",
}
# LLaMA-style decoders (llama, mistral, qwen2): q/k/v read the attention norm, gate/up the MLP norm.
LLAMA_SMOOTHING = {"attn-in": ("q_proj", "k_proj", "v_proj"), "mlp-in": ("gate_proj", "up_proj")}
# TensorRT-LLM's loader fuses these modules (load_weights_fused_qkv_helper / _gate_up_helper) and
# gives a fused FP8 layer one scale: engines/trtllm/formats.py FUSED_ORDER.
TRTLLM_FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def auto_classes(tasks: tuple[Task, ...]) -> dict[Task, str]:
    return {t: AUTO_CLASS[t] for t in tasks}
