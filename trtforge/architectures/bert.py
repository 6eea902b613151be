"""BERT (``model_type: bert``): post-norm encoder, e.g. all-MiniLM-L6-v2."""

from __future__ import annotations

from trtforge.architectures.base import ENCODER_TASKS, Architecture, NormKind
from trtforge.registry import ARCHITECTURES
from trtforge.vocab import Family

# Post-norm: the LayerNorm output that q/k/v (and the MLP's first GEMM) read is also the
# residual, so calibration folds their factor into an inserted Mul, not into the norm.
# ``dense`` alone names three GEMMs per layer; the MLP input is ``intermediate.dense``.
BERT_SMOOTHING = {"attn-in": ("query", "key", "value"), "mlp-in": ("intermediate.dense",)}

BERT = ARCHITECTURES.register(Architecture(
    name="bert",
    family=Family.ENCODER,
    tasks=ENCODER_TASKS,
    norm=NormKind.LAYERNORM,
    padding_side="right",
    smoothing_groups=BERT_SMOOTHING,
))
