"""Greedy decoding through a Polygraphy runner: the continuations task-level parity compares.

In:  an activated Polygraphy runner (``OnnxrtRunner`` for ONNX artifacts, ``TrtRunner`` for
     engines: whatever the artifact's backend gives, ``parity.models.make_runner``), the side it
     runs (task, I/O, dims, pad token), the prompts' token ids, and how many tokens to generate.
Out: per prompt, the generated token ids (greedy: the arg-max of the last position's logits),
     cut after the first end-of-sequence token.

Two ways, chosen by the artifact's task:

* ``causal-lm-with-past``: one prefill with an empty past, then one token per step, each
  ``present.N.*`` fed back as ``past_key_values.N.*`` and ``attention_mask`` grown by one; the
  way a runtime decodes, so the cache layout is part of what is compared.
* ``causal-lm``: the whole sequence again at every step (recomputation), ``O(steps x length)``.

Prompts are decoded in batches of similar length, left-padded with the pad token (positions
from the mask, as ``generate()`` computes them). Each input is cast to the dtype the runner
declares for it, so an FP16 and an FP32 model get the same values. Rows that have finished keep
being fed (their extra tokens are dropped) until every row of the batch has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trtforge.errors import ParityError
from trtforge.inputs import pad_sequences, positions_from_mask
from trtforge.vocab import Task

PAST, PRESENT = "past_key_values.", "present."


@dataclass(frozen=True)
class DecodeLimits:
    """What the runtime accepts: rows per batch, tokens per sequence (prompt + generated) and,
    for a KV-cache engine, tokens in one call (the prefill)."""

    max_batch: int | None = None
    max_total: int | None = None
    max_prompt: int | None = None


def budget(max_new_tokens: int, max_positions: int, limits: DecodeLimits) -> tuple[int, int, list[str]]:
    """(tokens to generate, most prompt tokens kept, notes) within the model's positions and the limits."""
    total = min(max_positions, limits.max_total or max_positions)
    notes = []
    steps = max_new_tokens
    if steps >= total:
        steps = max(1, total // 2)
        notes.append(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {total} positions; "
                     f"generated {steps}")
    return steps, min(total - steps, limits.max_prompt or total), notes


def _np_dtype(dt: Any) -> np.dtype:
    to_numpy = getattr(dt, "numpy", None)  # a Polygraphy DataType
    return np.dtype(to_numpy() if callable(to_numpy) else dt)


def input_dtypes(runner: Any) -> dict[str, np.dtype]:
    """The dtype the (active) runner declares for each input."""
    meta = runner.get_input_metadata(use_numpy_dtypes=False)  # DataTypes (NumPy ones are deprecated)
    return {name: _np_dtype(m.dtype) for name, m in meta.items()}


def _cast(feeds: dict[str, np.ndarray], dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.astype(dtypes[k], copy=False)) for k, v in feeds.items() if k in dtypes}


def _cut(tokens: Sequence[int], eos: set[int]) -> list[int]:
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(int(t))
    return out


def greedy(
    runner: Any,
    side: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: set[int],
    batch_size: int,
    limits: DecodeLimits = DecodeLimits(),
) -> list[list[int]]:
    """The greedy continuation of every prompt (module docstring); ``runner`` must be active."""
    with_past = side.task == Task.CAUSAL_LM_WITH_PAST
    names = side.input_names
    past_names = [n for n in names if n.startswith(PAST)]
    if with_past and not past_names:
        raise ParityError(f"the {side.role} is a {side.task} artifact without past_key_values inputs",
                          "re-export it with --task causal-lm-with-past")
    dtypes = input_dtypes(runner)
    missing = sorted(set(names) - set(dtypes))
    if missing:
        raise ParityError(f"the {side.role} runner lacks input(s) {', '.join(missing)}",
                          "compare artifacts written by trtforge")
    size = max(1, min(batch_size, limits.max_batch or batch_size))
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))  # similar lengths pad less
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        tokens = _batch(runner, side, [list(prompts[i]) for i in rows], max_new_tokens, eos, dtypes, past_names,
                        with_past)
        for i, toks in zip(rows, tokens, strict=True):
            results[i] = _cut(toks, eos)
    return results


def _batch(runner: Any, side: Any, seqs: list[list[int]], steps: int, eos: set[int], dtypes: dict[str, np.dtype],
           past_names: list[str], with_past: bool) -> list[list[int]]:
    ids, mask, _ = pad_sequences(seqs, "left", side.pad_token_id)
    b = ids.shape[0]
    dims = side.dims
    generated = np.zeros((b, 0), np.int64)
    done = np.zeros(b, bool)
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask,
                                    "position_ids": positions_from_mask(mask, ids.shape[1])}
    for n in past_names:  # prefill: an empty past [batch, kv_heads, 0, head_dim]
        feeds[n] = np.zeros((b, dims.num_kv_heads, 0, dims.head_dim), dtypes[n])
    for _ in range(steps):
        out = runner.infer(_cast(feeds, dtypes))
        logits = np.asarray(out["logits"])
        tok = logits[:, -1].astype(np.float32).argmax(-1).astype(np.int64)
        generated = np.concatenate([generated, tok[:, None]], axis=1)
        done |= np.isin(tok, list(eos)) if eos else False
        if done.all():
            break
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        if with_past:
            feeds = {"input_ids": tok[:, None], "attention_mask": mask, "position_ids": positions_from_mask(mask, 1)}
            for n in past_names:  # runners may reuse their output buffers: copy what is fed back
                feeds[n] = np.array(out[PRESENT + n[len(PAST):]], copy=True)
        else:
            ids = np.concatenate([ids, tok[:, None]], axis=1)
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, ids.shape[1])}
    return [list(map(int, row)) for row in generated]
