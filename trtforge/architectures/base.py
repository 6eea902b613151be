"""What one model family is, as data: everything family-specific in one object.

An :class:`Architecture` entry lives in ``trtforge/architectures/<family>.py`` and registers
itself in :data:`trtforge.registry.ARCHITECTURES`. The stages read it and nothing else:

* export: the transformers class per task, the export wrapper (``wrapper``: a name the exporter
  maps to one of its torch wrappers) and the KV-cache layout of ``causal-lm-with-past``;
* calibration: the normalization pattern the SmoothQuant/AWQ folds look for, and the GEMM groups
  that share one smoothing factor (q/k/v after the attention norm, gate/up after the MLP norm),
  by the state-dict leaf names of their weights;
* checkpoints: the TensorRT-LLM model class and module names, and the fused groups its loader
  rescales together (None: the family cannot be written as a TensorRT-LLM checkpoint).

Adding a family is one new module here (and a tiny-model preset for its tests).
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


@dataclass(frozen=True)
class Checkpoint:
    """What TensorRT-LLM's PyTorch-backend loader expects of this family."""

    architecture: str  # the HF class name the loader maps (e.g. LlamaForCausalLM)
    # groups the loader fuses into one GEMM and re-scales with one FP8/INT4 scale
    fused: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")})
    writable: bool = True  # trtforge writes it (False: TensorRT-LLM has the class, trtforge's names differ)


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json model_type
    family: Family
    tasks: tuple[Task, ...]  # the first is the default
    norm: NormKind
    padding_side: str  # how batches are padded: right for encoders, left for decoders
    # transformers Auto class per task
    auto_class: dict[Task, str] = field(default_factory=dict)
    # GEMM groups that share one smoothing factor, by weight leaf name (state-dict names)
    smoothing_groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cache: CacheLayout | None = None
    checkpoint: Checkpoint | None = None
    notes: str = ""

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


ENCODER_TASKS = (Task.FEATURE_EXTRACTION, Task.SEQUENCE_CLASSIFICATION)
DECODER_TASKS = (Task.CAUSAL_LM_WITH_PAST, Task.CAUSAL_LM)
AUTO_CLASS = {
    Task.FEATURE_EXTRACTION: "AutoModel",
    Task.SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.CAUSAL_LM: "AutoModelForCausalLM",
    Task.CAUSAL_LM_WITH_PAST: "AutoModelForCausalLM",
}
