"""RoBERTa (``model_type: roberta``): BERT's layout and module names, another embedding."""

from __future__ import annotations

from trtforge.architectures.base import ENCODER_TASKS, Architecture, NormKind
from trtforge.architectures.bert import BERT_SMOOTHING
from trtforge.registry import ARCHITECTURES
from trtforge.vocab import Family

ROBERTA = ARCHITECTURES.register(Architecture(
    name="roberta",
    family=Family.ENCODER,
    tasks=ENCODER_TASKS,
    norm=NormKind.LAYERNORM,
    padding_side="right",
    smoothing_groups=BERT_SMOOTHING,
))
