"""TensorRT-LLM target: quantized Hugging Face checkpoints in NVIDIA Model Optimizer's unified format.

TensorRT-LLM 1.x (PyTorch backend) loads Hugging Face checkpoints directly, including quantized
ones with ``hf_quant_config.json``; it does not load engines built from ONNX by plain TensorRT.
``export_checkpoint`` turns a quantize-stage ONNX artifact (FP8 or INT4 AWQ) into such a
checkpoint, then reads it back as the loader would and checks it against the ONNX artifact.

Modules: formats.py (what the loader reads, with sources), checks.py (refusals, memory),
onnx_source.py (the ONNX graph in HF terms), convert.py and pack.py (tensor layouts), writer.py
(the stage), reader.py (the loader's view), verify.py (agreement figures), _torch.py (the only
module importing torch/transformers/safetensors at import). Family facts (the TensorRT-LLM class,
the fused groups, whether trtforge writes the family) come from the Architecture registry. The
``trtllm`` target of ``trtforge run`` is this code behind engines/backends/trtllm_checkpoint.py.
See docs/trtllm.md.
"""

from __future__ import annotations

from trtforge.engines.trtllm.checks import CheckpointOptions
from trtforge.engines.trtllm.formats import CkptDType, Fp8Scheme
from trtforge.engines.trtllm.writer import CheckpointArtifact, export_checkpoint

__all__ = ["CheckpointArtifact", "CheckpointOptions", "CkptDType", "Fp8Scheme", "export_checkpoint"]
