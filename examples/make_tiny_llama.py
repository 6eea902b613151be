"""Write a small LLaMA (random weights, real tokenizer) built from a config, for the decoder examples.

    python examples/make_tiny_llama.py examples/models/llama-tiny

Grouped-query attention (6 query / 2 KV heads), tied embeddings and a hidden size of 96 that
128 does not divide: the shapes real small models have. The weights carry LLM-like activation
outliers (trtforge.testing.tinymodels.inject_outliers) so quantization recipes behave as on real LLMs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trtforge.testing.tinymodels import make_model

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "models" / "llama-tiny")
    make_model("llama", out, outliers=True)
    print(out)
