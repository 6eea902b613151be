"""Greedy decoding through an exported ``causal-lm-with-past`` graph, and the same with PyTorch's
``generate()``, for tests and benchmarks that check the KV cache token by token.

``onnx_greedy`` drives an ONNX Runtime session the way a runtime would: one prefill with an
empty past, then one token per step, feeding every ``present.N.*`` back as ``past_key_values.N.*``
and growing ``attention_mask`` (positions from the mask, left padding aware). ``torch_greedy``
runs transformers' ``generate(do_sample=False)`` with its own cache (for Gemma 3, a sliding
cache that keeps only the last ``window - 1`` positions of the sliding layers), so agreement
says the exported cache layout computes what transformers computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtforge.inputs import pad_sequences, positions_from_mask

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Greedy:
    tokens: np.ndarray  # [batch, steps]: the generated ids
    logits: list[np.ndarray]  # per step, [batch, vocab] (float32)


def onnx_greedy(session, ids: np.ndarray, mask: np.ndarray, steps: int) -> Greedy:
    """``steps`` greedy tokens from ``session`` (an onnxruntime.InferenceSession of a with-past export)."""
    inputs = {i.name: i for i in session.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    out_names = [o.name for o in session.get_outputs()]
    b = ids.shape[0]
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
        "position_ids": positions_from_mask(mask, ids.shape[1]),
    }
    for n in past:  # [batch, kv_heads, 0, head_dim]
        shape = inputs[n].shape
        feeds[n] = np.zeros((b, int(shape[1]), 0, int(shape[3])), _NP[inputs[n].type])
    tokens, logits = [], []
    for _ in range(steps):
        out = dict(zip(out_names, session.run(out_names, feeds)))
        last = out["logits"][:, -1].astype(np.float32)
        tok = last.argmax(-1)
        tokens.append(tok)
        logits.append(last)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        feeds = {"input_ids": tok[:, None].astype(np.int64), "attention_mask": mask,
                 "position_ids": positions_from_mask(mask, 1)}
        for n in past:
            feeds[n] = out["present." + n[len("past_key_values."):]]
    return Greedy(np.stack(tokens, axis=1), logits)


def torch_greedy(model, ids: np.ndarray, mask: np.ndarray, steps: int, pad_token_id: int) -> Greedy:
    """``steps`` greedy tokens from transformers' ``generate()`` (its own cache, its own masks)."""
    import torch
    from transformers import GenerationConfig

    # No EOS: generation never stops early and no logits processor suppresses a token, so each
    # token is the argmax of the raw logits, as in onnx_greedy.
    cfg = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=pad_token_id,
                           output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        gen = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             generation_config=cfg)
    return Greedy(gen.sequences[:, ids.shape[1]:].numpy(), [t.float().numpy() for t in gen.logits])


# ------------------------------------------------------------------ the real-model check

GEMMA3_STEPS = 20
SHORT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Quantization makes neural networks")
LONG_PROMPT_TOKENS = 600  # past Gemma 3's 512-token window


def examples_data() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "data"


def gemma3_prompts(model_folder: str | Path, long_tokens: int = LONG_PROMPT_TOKENS) -> list[tuple[str, list[int]]]:
    """(name, token ids): the three short prompts, then the first ``long_tokens`` tokens of the
    held-out GPL text in examples/data (a prompt that runs past the sliding window)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_folder))
    prompts = [(f"short-{i}", list(tok(p)["input_ids"])) for i, p in enumerate(SHORT_PROMPTS)]
    text = (examples_data() / "eval-gpl-3.0.txt").read_text(encoding="utf-8")
    ids = list(tok(text)["input_ids"])[:long_tokens]
    if len(ids) < long_tokens:
        raise ValueError(f"examples/data/eval-gpl-3.0.txt gives only {len(ids)} tokens")
    prompts.append((f"long-{long_tokens}", ids))
    return prompts


def compare_greedy(artifact: str | Path, model_folder: str | Path, prompts: list[tuple[str, list[int]]],
                   steps: int) -> list[dict]:
    """Greedy tokens of the with-past export in ``artifact`` against ``generate()`` of the model in
    ``model_folder`` (FP32, eager attention), one prompt at a time, then the short ones (all but the
    last) as one left-padded batch. One dict per case: tokens identical, first differing step,
    the largest logit difference."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM


    sess = ort.InferenceSession(str(Path(artifact) / "model.onnx"), providers=["CPUExecutionProvider"])
    model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    pad = int(model.config.pad_token_id or 0)
    cases = [(name, [ids]) for name, ids in prompts]
    if len(prompts) > 2:
        cases.append(("short-batch-left-padded", [ids for _, ids in prompts[:-1]]))
    results = []
    for name, seqs in cases:
        ids, mask, _ = pad_sequences(seqs, "left", pad)
        got = onnx_greedy(sess, ids, mask, steps)
        want = torch_greedy(model, ids, mask, steps, pad)
        same = got.tokens == want.tokens
        diff_steps = np.nonzero(~same.all(axis=0))[0]
        results.append({
            "case": name,
            "batch": len(seqs),
            "prompt_tokens": max(len(s) for s in seqs),
            "steps": steps,
            "identical": bool(same.all()),
            "first_different_step": int(diff_steps[0]) if len(diff_steps) else None,
            "max_abs_logit_diff": float(max(np.abs(a - b).max() for a, b in zip(got.logits, want.logits))),
            "tokens": got.tokens.tolist(),
        })
    return results
