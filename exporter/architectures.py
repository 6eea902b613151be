"""Which Hugging Face architectures trtforge exports, and how, as data."""

from __future__ import annotations

from dataclasses import dataclass

from trtforge.vocab import Task

# transformers Auto class used to load each task
AUTO_CLASS = {
    Task.FEATURE_EXTRACTION: "AutoModel",
    Task.SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    Task.CAUSAL_LM: "AutoModelForCausalLM",
    Task.CAUSAL_LM_WITH_PAST: "AutoModelForCausalLM",
}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    family: str  # "encoder" | "decoder"
    tasks: tuple[Task, ...]
    norm: str  # "layernorm" | "rmsnorm"
    padding_side: str  # how batches are padded for this family: right for encoders, left for decoders

    @property
    def default_task(self) -> Task:
        return self.tasks[0]


_ENC = (Task.FEATURE_EXTRACTION, Task.SEQUENCE_CLASSIFICATION)
_DEC = (Task.CAUSAL_LM_WITH_PAST, Task.CAUSAL_LM)

SUPPORTED: dict[str, ArchSpec] = {
    "bert": ArchSpec("bert", "encoder", _ENC, "layernorm", "right"),
    "roberta": ArchSpec("roberta", "encoder", _ENC, "layernorm", "right"),
    "gpt2": ArchSpec("gpt2", "decoder", _DEC, "layernorm", "left"),
    "llama": ArchSpec("llama", "decoder", _DEC, "rmsnorm", "left"),
    "mistral": ArchSpec("mistral", "decoder", _DEC, "rmsnorm", "left"),
    "qwen2": ArchSpec("qwen2", "decoder", _DEC, "rmsnorm", "left"),
}


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED))


def task_from_architectures(spec: ArchSpec, architectures: list[str] | None) -> Task:
    """The task a config's ``architectures`` entry implies (BertForSequenceClassification -> ...)."""
    for arch in architectures or []:
        if arch.endswith("ForSequenceClassification") and Task.SEQUENCE_CLASSIFICATION in spec.tasks:
            return Task.SEQUENCE_CLASSIFICATION
        if (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")) and spec.family == "decoder":
            return Task.CAUSAL_LM_WITH_PAST
    return spec.default_task
