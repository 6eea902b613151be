"""Task-level parity: both models continue categorized prompts greedily; compare per category.

In:  a :class:`~trtforge.parity.prompts.PromptSet`, both sides' Polygraphy runners (through
     :mod:`trtforge.parity.decode`), the reference's tokenizer, ParityOptions.
Out: the ``tasks`` section of report.json. Per category (``tasks.categories.<name>``):

* ``n``; ``agreement``: share of prompts whose continuation is token-for-token the reference's
  (both cut at the first end-of-sequence token), with ``agreement_ci95`` (Wilson score interval);
  ``mean_tokens_before_divergence`` (a prompt that agrees counts its whole continuation);
* with answers (``n_with_answer`` > 0): ``accuracy_reference`` / ``accuracy_candidate``
  (:func:`~trtforge.parity.prompts.answer_correct`), ``accuracy_drop`` in points
  (100 x (reference - candidate)), ``flips`` right-to-wrong and wrong-to-right, and
  ``mcnemar_p``: the exact McNemar test of the paired difference (a two-sided binomial test on
  the discordant pairs, so it is exact for small n);
* ``sample_size_note`` when the category is too small for its limits to mean much (below);
* ``passed`` and ``limits``, filled in by the gate (:func:`trtforge.parity.gate.evaluate_tasks`).

``prompts`` lists every prompt with both continuations (text and token ids), whether they agree
and where they diverge, and, with an answer, whether each side got it; the HTML report shows
the flipped and diverging ones side by side.

Sample size: with n prompts all agreeing, the Wilson lower bound is n / (n + z^2); it reaches
the agreement limit t only when n >= z^2 t / (1 - t) (73 prompts for t = 0.95). An exact McNemar
test needs at least ``MIN_SIGNIFICANT_FLIPS`` = 6 one-way flips for p < 0.05, and a drop of d
points over n prompts is d n / 100 net flips, so a drop the size of the limit is detectable
only with n >= 600 / d. Below either, the category gets a note (the gate still applies its limit
to the point estimate; the note says how much weight the verdict can bear).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from trtforge.errors import InputError
from trtforge.parity.decode import DecodeLimits, budget, greedy
from trtforge.parity.prompts import PromptSet, answer_correct

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
ALPHA = 0.05
MIN_SIGNIFICANT_FLIPS = 6  # smallest k with 2 * 0.5**k < 0.05


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion; None for n = 0."""
    if n <= 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact at the ends: the interval of 0/n starts at 0, of n/n ends at 1
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == n else min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: the binomial test of
    min(b, c) successes in b + c trials at p = 1/2 (doubled, capped at 1; 1.0 when b + c = 0)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def agreement_prompts_needed(limit: float, z: float = Z95) -> int | None:
    """Smallest n whose perfect agreement has a Wilson lower bound >= limit (None: any n, or never)."""
    if limit <= 0 or limit >= 1:
        return None
    return math.ceil(z * z * limit / (1 - limit) - 1e-12)


def accuracy_prompts_needed(drop_points: float) -> int | None:
    """Smallest n on which a drop of ``drop_points`` can reach significance (exact McNemar, 5 %)."""
    if drop_points <= 0:
        return None
    return math.ceil(100 * MIN_SIGNIFICANT_FLIPS / drop_points - 1e-9)


def sample_size_note(n: int, n_answers: int, agreement_limit: float | None, drop_limit: float | None) -> str | None:
    """Why this category is too small for its limits, or None."""
    parts = []
    need = agreement_prompts_needed(agreement_limit) if agreement_limit is not None else None
    if need and n < need:
        lo = n / (n + Z95 * Z95)
        parts.append(f"with n = {n} even full agreement has a 95 % lower bound of {lo:.2f}, under the limit "
                     f"{agreement_limit:g} ({need} prompts needed)")
    need = accuracy_prompts_needed(drop_limit) if drop_limit is not None and n_answers else None
    if need and n_answers < need:
        parts.append(f"with {n_answers} answered prompts one flip moves accuracy by {100 / n_answers:.1f} points and an "
                     f"accuracy drop of {drop_limit:g} points cannot reach significance ({need} needed)")
    return "; ".join(parts) or None


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def eos_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple, set)) else {int(ids)}


def encode_prompts(tokenizer: Any, prompts: PromptSet, max_prompt_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt (the tokenizer's special tokens included, as generate() gets
    them); prompts longer than ``max_prompt_tokens`` keep their last tokens, with a note."""
    seqs, cut = [], []
    for p in prompts.prompts:
        ids = [int(t) for t in tokenizer(p.prompt)["input_ids"]]
        if not ids:
            raise InputError(f"{prompts.path}:{p.line}: the prompt tokenizes to no tokens", "give the prompt some text")
        if len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
            cut.append(f"{prompts.path.name}:{p.line}")
        seqs.append(ids)
    notes = []
    if cut:
        notes.append(f"{len(cut)} prompt(s) longer than {max_prompt_tokens} tokens kept only their last tokens "
                     f"(the model's positions less --max-new-tokens): {', '.join(cut[:5])}"
                     + (" ..." if len(cut) > 5 else ""))
    return seqs, notes


def decode_both(runners: Sequence[Any], sides: Sequence[Any], seqs: list[list[int]], *, max_new_tokens: int,
                eos: set[int], batch_size: int, limits: DecodeLimits) -> list[list[list[int]]]:
    """Each side's continuations; each runner is activated for its own pass."""
    out = []
    for runner, side in zip(runners, sides, strict=True):
        with runner:
            out.append(greedy(runner, side, seqs, max_new_tokens=max_new_tokens, eos=eos, batch_size=batch_size,
                              limits=limits))
    return out


def task_section(prompts: PromptSet, ref_tokens: list[list[int]], cand_tokens: list[list[int]], tokenizer: Any, *,
                 max_new_tokens: int, notes: list[str]) -> dict[str, Any]:
    """The ``tasks`` section before gating (module docstring)."""
    rows = []
    for p, r, c in zip(prompts.prompts, ref_tokens, cand_tokens, strict=True):
        div = first_divergence(r, c)
        rt = tokenizer.decode(r, skip_special_tokens=True)
        ct = tokenizer.decode(c, skip_special_tokens=True)
        row: dict[str, Any] = {"index": p.index, "line": p.line, "id": p.id, "category": p.category,
                               "prompt": p.prompt, "answer": p.answer, "agree": div is None,
                               "tokens_before_divergence": len(r) if div is None else div,
                               "reference": rt, "candidate": ct, "reference_ids": r, "candidate_ids": c,
                               "common_prefix": rt if div is None else tokenizer.decode(r[:div], skip_special_tokens=True),
                               "reference_correct": None, "candidate_correct": None}
        if p.answer is not None:
            row["reference_correct"] = answer_correct(rt, p.answer)
            row["candidate_correct"] = answer_correct(ct, p.answer)
        rows.append(row)
    categories = {cat: category_stats([x for x in rows if x["category"] == cat]) for cat in prompts.categories}
    return {"prompts_file": prompts.describe(), "max_new_tokens": max_new_tokens, "decoding": "greedy",
            "answer_rule": "the continuation contains the answer, both lower-cased with whitespace collapsed",
            "categories": categories, "order": list(categories), "worst_category": None, "notes": notes,
            "prompts": rows}


def category_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one category (module docstring); the gate adds limits and passed."""
    n = len(rows)
    agree = sum(x["agree"] for x in rows)
    answered = [x for x in rows if x["reference_correct"] is not None]
    ci = wilson_interval(agree, n)
    stats: dict[str, Any] = {
        "n": n, "agreement": agree / n if n else None, "agreement_ci95": list(ci) if ci else None,
        "mean_tokens_before_divergence": sum(x["tokens_before_divergence"] for x in rows) / n if n else None,
        "diverged": [x["index"] for x in rows if not x["agree"]],
        "n_with_answer": len(answered), "accuracy_reference": None, "accuracy_candidate": None, "accuracy_drop": None,
        "accuracy_reference_ci95": None, "accuracy_candidate_ci95": None,
        "flips": None, "mcnemar_p": None, "sample_size_note": None, "limits": {}, "passed": True,
    }
    if answered:
        m = len(answered)
        ref_ok = sum(x["reference_correct"] for x in answered)
        cand_ok = sum(x["candidate_correct"] for x in answered)
        lost = [x["index"] for x in answered if x["reference_correct"] and not x["candidate_correct"]]
        gained = [x["index"] for x in answered if not x["reference_correct"] and x["candidate_correct"]]
        stats.update(accuracy_reference=ref_ok / m, accuracy_candidate=cand_ok / m,
                     accuracy_drop=100.0 * (ref_ok - cand_ok) / m,
                     accuracy_reference_ci95=list(wilson_interval(ref_ok, m) or ()),
                     accuracy_candidate_ci95=list(wilson_interval(cand_ok, m) or ()),
                     flips={"right_to_wrong": len(lost), "wrong_to_right": len(gained),
                            "right_to_wrong_prompts": lost, "wrong_to_right_prompts": gained},
                     mcnemar_p=mcnemar_exact(len(lost), len(gained)))
    return stats


def run_tasks(prompts: PromptSet, runners: Sequence[Any], sides: Sequence[Any], tokenizer: Any, *,
              max_new_tokens: int, batch_size: int, limits: DecodeLimits, max_positions: int) -> dict[str, Any]:
    """Decode every prompt with both sides and build the ``tasks`` section (not yet gated)."""
    steps, max_prompt, notes = budget(max_new_tokens, max_positions, limits)
    seqs, more = encode_prompts(tokenizer, prompts, max_prompt)
    notes += more
    eos = eos_ids(tokenizer)
    ref_tokens, cand_tokens = decode_both(runners, sides, seqs, max_new_tokens=steps, eos=eos,
                                          batch_size=batch_size, limits=limits)
    for n in notes:
        log.warning(n)
    return task_section(prompts, ref_tokens, cand_tokens, tokenizer, max_new_tokens=steps, notes=notes)
