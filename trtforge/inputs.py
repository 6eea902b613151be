"""Input names, dynamic axes, dummy inputs and real-token validation batches for an export."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trtforge.errors import InputError
from trtforge.manifest import ModelDims
from trtforge.vocab import Task

# One symbol per meaning, shared by every input and output that has that axis.
BATCH, SEQ, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


@dataclass
class IOSpec:
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    past_names: list[str] = field(default_factory=list)
    present_names: list[str] = field(default_factory=list)


def io_spec(task: Task, dims: ModelDims, with_token_type_ids: bool) -> IOSpec:
    if not task.is_decoder:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_type_ids else [])
        out = "last_hidden_state" if task == Task.FEATURE_EXTRACTION else "logits"
        axes = {n: {0: BATCH, 1: SEQ} for n in names}
        axes[out] = {0: BATCH, 1: SEQ} if task == Task.FEATURE_EXTRACTION else {0: BATCH}
        return IOSpec(names, [out], axes)
    names = ["input_ids", "attention_mask", "position_ids"]
    axes = {"input_ids": {0: BATCH, 1: SEQ}, "position_ids": {0: BATCH, 1: SEQ}, "logits": {0: BATCH, 1: SEQ}}
    if task == Task.CAUSAL_LM:
        axes["attention_mask"] = {0: BATCH, 1: SEQ}
        return IOSpec(names, ["logits"], axes)
    axes["attention_mask"] = {0: BATCH, 1: TOTAL}
    past = [f"past_key_values.{i}.{kv}" for i in range(dims.num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(dims.num_layers) for kv in ("key", "value")]
    for n in past:
        axes[n] = {0: BATCH, 2: PAST}
    for n in present:
        axes[n] = {0: BATCH, 2: TOTAL}
    return IOSpec(names + past, ["logits", *present], axes, past, present)


def dummy_inputs(task: Task, dims: ModelDims, io: IOSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs to trace with. Batch, sequence and past lengths differ so the tracer cannot
    confuse one dynamic axis with another."""
    rng = np.random.default_rng(seed)
    b, s, p = 2, 5, 3
    vocab = max(2, min(dims.vocab_size, 1000))
    feeds: dict[str, np.ndarray] = {"input_ids": rng.integers(1, vocab, (b, s), dtype=np.int64)}
    if not task.is_decoder:
        feeds["attention_mask"] = np.ones((b, s), np.int64)
        if "token_type_ids" in io.input_names:
            feeds["token_type_ids"] = np.zeros((b, s), np.int64)
        return feeds
    total = s + (p if task == Task.CAUSAL_LM_WITH_PAST else 0)
    feeds["attention_mask"] = np.ones((b, total), np.int64)
    feeds["position_ids"] = np.tile(np.arange(total - s, total, dtype=np.int64), (b, 1))
    for n in io.past_names:
        feeds[n] = rng.standard_normal((b, dims.num_kv_heads, p, dims.head_dim)).astype(np.float32)
    return feeds


def positions_from_mask(mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids the way transformers' generate() computes them (left padding aware)."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, 1, pos)
    return pos[:, -seq_len:].astype(np.int64)


def tokenize_batch(
    tokenizer, texts: list[str], padding_side: str, max_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tokenize and pad by hand (so padding side and pad id never depend on tokenizer config)."""
    seqs = []
    types = []
    for t in texts:
        enc = tokenizer(t, truncation=True, max_length=max_length)
        seqs.append(list(enc["input_ids"]))
        types.append(list(enc.get("token_type_ids", [0] * len(enc["input_ids"]))))
    return pad_sequences(seqs, padding_side, pad_id, types)


def pad_sequences(
    seqs: list[list[int]], padding_side: str, pad_id: int, types: list[list[int]] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n), pad_id, np.int64)
    mask = np.zeros((len(seqs), n), np.int64)
    tt = np.zeros((len(seqs), n), np.int64) if types is not None else None
    for i, s in enumerate(seqs):
        sl = slice(n - len(s), n) if padding_side == "left" else slice(0, len(s))
        ids[i, sl] = s
        mask[i, sl] = 1
        if tt is not None:
            tt[i, sl] = types[i]
    return ids, mask, tt


def encoder_feeds(ids: np.ndarray, mask: np.ndarray, tt: np.ndarray | None, io: IOSpec) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in io.input_names:
        feeds["token_type_ids"] = tt if tt is not None else np.zeros_like(ids)
    return feeds


def decoder_prefill_feeds(
    ids: np.ndarray, mask: np.ndarray, io: IOSpec, dims: ModelDims, float_dtype=np.float32
) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, ids.shape[1])}
    for n in io.past_names:
        feeds[n] = np.zeros((ids.shape[0], dims.num_kv_heads, 0, dims.head_dim), float_dtype)
    return feeds


def valid_mask_for(output: str, shape: tuple[int, ...], feeds: dict[str, np.ndarray]) -> np.ndarray | None:
    """Boolean mask over an output's leading axes marking the unpadded positions, or None (all valid)."""
    mask = feeds.get("attention_mask")
    if mask is None:
        return None
    mask = mask.astype(bool)
    if output.startswith("present."):
        # [batch, heads, total, head_dim]: valid along the total-sequence axis
        return mask[:, None, :, None] if mask.shape[1] == shape[2] else None
    if len(shape) >= 2 and shape[:2] == (mask.shape[0], feeds["input_ids"].shape[1]):
        cur = mask[:, -shape[1] :]
        return cur.reshape(cur.shape + (1,) * (len(shape) - 2))
    return None


def make_feeds(ids: np.ndarray, input_names: list[str], dims: dict, float_dtype, token_type_ids=None) -> dict:
    """Unpadded feeds for one batch of equal-length samples."""
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64)}
    for name in input_names:
        if name == "token_type_ids":
            feeds[name] = token_type_ids if token_type_ids is not None else np.zeros_like(ids)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(s, dtype=np.int64), (b, 1))
        elif name.startswith("past_key_values."):
            feeds[name] = np.zeros((b, dims["num_kv_heads"], 0, dims["head_dim"]), float_dtype)
    unknown = set(input_names) - set(feeds)
    if unknown:
        raise InputError(f"cannot build calibration inputs for {sorted(unknown)}", "calibrate a trtforge export")
    return {k: feeds[k] for k in input_names}
