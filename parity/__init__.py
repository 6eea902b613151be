"""Parity stage: the FP16 reference vs a candidate on real held-out inputs, through Polygraphy.

``check_parity(reference, candidate, data, thresholds, out)`` runs both artifacts with
Polygraphy's runners and Comparator, measures padding-aware errors and task metrics (logits
agreement and KL, perplexity, pooled-embedding cosine), gates them against per-precision
thresholds, and writes report.json / report.html / report.md. With ``prompts=`` (a JSONL file
of categorized prompts) both models also continue every prompt greedily, and agreement and
answer accuracy are compared and gated per category (task-level parity). See docs/parity.md.
"""

from __future__ import annotations

from trtforge.parity.check import ParityReport, check_parity
from trtforge.parity.gate import Check
from trtforge.parity.options import METRICS, ParityOptions, Preset, Thresholds, load_thresholds
from trtforge.parity.prompts import Prompt, PromptSet, load_prompts

__all__ = [
    "METRICS",
    "Check",
    "ParityOptions",
    "ParityReport",
    "Preset",
    "Prompt",
    "PromptSet",
    "Thresholds",
    "check_parity",
    "load_prompts",
    "load_thresholds",
]
