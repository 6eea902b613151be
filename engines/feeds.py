"""Synthetic inputs for an artifact, shaped from its manifest: for self-checks, timing and benchmarks.

In:  the manifest's ``io.inputs`` (names, dtypes, symbolic shapes), ``dims`` and concrete sizes
     for the symbols (``{"batch": 8, "sequence": 128}``).
Out: ``{name: np.ndarray}`` feeds: token ids in the vocabulary, all-ones attention masks, position
     ids that continue after the past, random KV-cache tensors and random floats elsewhere.
"""

from __future__ import annotations

import numpy as np

from trtforge.engines.profiles import BATCH, PAST, SEQ, TOTAL
from trtforge.manifest import Manifest


def concrete_shape(shape: list, sizes: dict[str, int]) -> tuple[int, ...]:
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif d == TOTAL and TOTAL not in sizes:
            out.append(sizes.get(SEQ, 1) + sizes.get(PAST, 0))
        else:
            out.append(int(sizes[d]))
    return tuple(out)


def synthetic_feeds(manifest: Manifest | dict, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for every input a manifest (typed, or its JSON form) lists."""
    rng = np.random.default_rng(seed)
    if isinstance(manifest, Manifest):
        vocab = int(manifest.dims.vocab_size if manifest.dims else 100)
        inputs = [(t.name, t.dtype, t.shape) for t in (manifest.io.inputs if manifest.io else [])]
    else:  # the JSON form (tests, scripts)
        doc = manifest
        vocab = int((doc.get("dims") or {}).get("vocab_size") or 100)
        inputs = [(t["name"], t["dtype"], t["shape"]) for t in doc["io"]["inputs"]]
    past = int(sizes.get(PAST, 0))
    feeds: dict[str, np.ndarray] = {}
    for name, dt, shp in inputs:
        dtype = np.dtype(dt) if dt != "bfloat16" else np.dtype(np.float32)
        shape = concrete_shape(shp, sizes)
        if name == "input_ids":
            a = rng.integers(1, max(2, vocab), shape)
        elif name == "attention_mask":
            a = np.ones(shape)
        elif name == "position_ids":
            a = np.broadcast_to(np.arange(past, past + shape[-1]), shape)
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            a = np.zeros(shape)
        else:
            a = rng.standard_normal(shape)
        feeds[name] = np.ascontiguousarray(a.astype(dtype))
    return feeds


def opt_sizes(profile_symbols: dict[str, list[int]]) -> dict[str, int]:
    """Symbol sizes at a profile's opt point (``{"batch": [1, 8, 32]}`` -> ``{"batch": 8}``)."""
    return {k: v[1] for k, v in profile_symbols.items()}


__all__ = ["BATCH", "concrete_shape", "opt_sizes", "synthetic_feeds"]
