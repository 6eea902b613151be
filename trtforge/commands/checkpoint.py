"""`trtforge export-checkpoint`: quantize artifact -> quantized HF checkpoint for TensorRT-LLM."""

from __future__ import annotations

from pathlib import Path

import click

from trtforge.commands.base import emit, field_flags
from trtforge.engines.trtllm import CheckpointOptions, CkptDType, Fp8Scheme
from trtforge.engines.trtllm import export_checkpoint as run
from trtforge.engines.trtllm.checks import shard_size
from trtforge.engines.trtllm.writer import summary_line


@field_flags(max_shard_bytes="--max-shard-size", parity="--no-parity")
@click.command("export-checkpoint")
@click.argument("quantized_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Float type of the checkpoint (auto: the source model's float16/bfloat16, else float16).")
@click.option("--fp8-scheme", type=click.Choice(["tensor", "rowwise"]), default="tensor", show_default=True,
              help="FP8: per-tensor weights + static activation scales (FP8), or per-channel weights + dynamic "
                   "per-token activations (FP8_PER_CHANNEL_PER_TOKEN, Hopper).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file, e.g. 5GB or 500MB.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Float HF model folder for the parity check (default: the source recorded in the manifests).")
@click.option("--text", type=click.Path(path_type=Path), help="Held-out text for the parity check, one sample per line.")
@click.option("--no-parity", is_flag=True, help="Skip the PyTorch parity check (the weight comparison still runs).")
@click.option("--max-ppl-change-pct", type=float, metavar="PCT",
              help="Largest perplexity increase over the float model, in percent (default: 3 for FP8, 10 for INT4, "
                   "parity's presets). Above it no checkpoint is written and the command exits 1.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_checkpoint(quantized_dir: Path, out: Path, dtype: str, fp8_scheme: str, max_shard_size: str,
                      reference: Path | None, text: Path | None, no_parity: bool, max_ppl_change_pct: float | None,
                      force: bool, as_json: bool) -> None:
    """Write a quantized checkpoint that TensorRT-LLM (1.0+, PyTorch backend) loads, from a quantize artifact.

    The checkpoint is NVIDIA Model Optimizer's unified Hugging Face format (FP8 or W4A16 AWQ);
    its tensors come from the ONNX artifact, so both agree. It is read back the way TensorRT-LLM
    reads it and compared with the ONNX artifact before the folder appears; a perplexity increase
    over the float model above --max-ppl-change-pct fails it (exit 1, nothing written).
    """
    opts = CheckpointOptions(dtype=CkptDType(dtype), fp8_scheme=Fp8Scheme(fp8_scheme), max_shard_bytes=shard_size(max_shard_size),
                             parity=not no_parity, reference=reference, text=text,
                             max_ppl_change_pct=max_ppl_change_pct)
    ck = run(quantized_dir, out, opts, force=force)
    emit(ck.manifest, as_json, summary_line(ck))


COMMANDS = [export_checkpoint]
