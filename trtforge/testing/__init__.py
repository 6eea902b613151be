"""Test helpers: not part of trtforge's API, and nothing in the product imports them.

``trtforge.testing.tinymodels`` builds tiny random Hugging Face models with real tokenizers
from configs in code (fixed seed), for the tests, the examples and the benchmarks; every
registered architecture has a preset there. It is installed with trtforge so that the examples
and benchmarks run from a plain install, and it needs torch, transformers and tokenizers only
when a model is built.
"""
