"""export-checkpoint: quantize-stage ONNX artifact -> quantized checkpoint TensorRT-LLM loads.

In:  a folder written by ``trtforge quantize`` (recipe fp8 or int4-awq/int4-rtn) of an export of a
     family whose Architecture entry says the checkpoint is writable (LLaMA, Mistral, Qwen2, Qwen3,
     Gemma 3; Phi-3 in FP8 per tensor), CheckpointOptions, an output folder.
Out: OUT_DIR, a Hugging Face checkpoint in NVIDIA Model Optimizer's unified format:
     ``config.json`` (architectures, dtype, ``quantization_config`` with group_size),
     ``hf_quant_config.json``, ``model.safetensors`` (or shards + ``model.safetensors.index.json``),
     ``generation_config.json``, the tokenizer files, and ``manifest.json`` (source hashes, the
     recipe, the format and the TensorRT-LLM versions it targets, conversion notes, and the
     verification figures). The folder appears only after the checkpoint was read back the way
     TensorRT-LLM reads it and verified; any failure leaves nothing behind, and so does a
     perplexity change over the float model above the limit (``max_ppl_change_pct``, by default
     parity's preset for the precision: 5% FP8, 25% INT4; checks.MAX_PPL_CHANGE_PCT).

Every tensor comes from the ONNX artifact (same calibration, same recipe), so the two artifacts
agree by construction; verify.py measures how exactly.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from trtforge.artifacts import (
    HF_SIDE_FILES,
    CheckpointArtifact,
    OnnxArtifact,
    hash_files,
    read_json,
    sha256_file,
    write_json,
)
from trtforge.engines.trtllm import verify
from trtforge.engines.trtllm.checks import (
    CheckpointOptions,
    Plan,
    ResourceError,
    check_parity_inputs,
    free_disk,
    human,
    plan,
)
from trtforge.engines.trtllm.convert import convert
from trtforge.engines.trtllm.formats import SOURCES, TARGET, CheckpointFormat, checkpoint_of, loader_config
from trtforge.engines.trtllm.onnx_source import read_source
from trtforge.engines.trtllm.reader import CheckpointReader, torch_adapter
from trtforge.errors import InputError
from trtforge.manifest import MANIFEST, Upstream
from trtforge.stage import StageOutput

log = logging.getLogger(__name__)
MANIFEST_KIND = "trtllm-checkpoint"
STAGE = "export-checkpoint"
HARDWARE = {
    "FP8": "GPUs with FP8 GEMMs: SM 8.9+ (Ada, Hopper, Blackwell)",
    "FP8_PER_CHANNEL_PER_TOKEN": "Hopper (TensorRT-LLM's quantization docs mark FP8 rowwise for Hopper only)",
    "W4A16_AWQ": "SM 8.0+ (fine-grained W4A16 kernels; the docs matrix lists Ampere, Ada, Hopper)",
}
__all__ = ["CheckpointArtifact", "export_checkpoint", "summary_line"]  # CheckpointArtifact: trtforge.artifacts


def export_checkpoint(
    quantized: str | Path | OnnxArtifact, out: str | Path, options: CheckpointOptions = CheckpointOptions(), *,
    force: bool = False,
) -> CheckpointArtifact:
    """Write and verify the checkpoint; see the module docstring."""
    art = quantized if isinstance(quantized, OnnxArtifact) else OnnxArtifact.open(quantized)
    # the output is neither the quantized artifact nor the float reference and holds neither
    stage = StageOutput(out, stage=STAGE, kind=MANIFEST_KIND, force=force,
                        inputs=[art.path, *([("float reference", options.reference)] if options.reference else []),
                                *([("held-out text", options.text)] if options.text else [])])
    out = stage.path
    p = plan(art, options)
    hashes = _source_hashes(art)
    reference, ref_note = _reference(art, options)
    check_parity_inputs(options)
    disk = free_disk(out.parent if out.parent.exists() else Path.cwd())
    if disk is not None and disk < p.memory["onnx_bytes"] * 1.2:
        raise ResourceError(f"the checkpoint needs about {human(p.memory['onnx_bytes'])} of disk but {human(disk)} is free "
                            f"under {out.parent}", "free disk space or choose another -o")
    for note in p.notes:
        log.warning("%s", note)

    adapter = torch_adapter()
    with stage.timed("convert_s"):
        cfg = read_json(art.path / "config.json", "config")
        layout = adapter.hf_layout(cfg)
        proto = art.load()
        src = read_source(proto)
        del proto
        conv = convert(src, layout, quant_algo=p.quant_algo, group_size=p.group_size, dtype=p.dtype, fused=p.fused,
                       checkpoint=checkpoint_of(art.manifest.source.model_type))
        fmt = CheckpointFormat(p.quant_algo, p.group_size, tuple(p.exclude_modules))

    m = stage.manifest
    q_precision = art.manifest.quantization.precision
    with stage.open() as tmp:
        with stage.timed("write_s"):
            saved = adapter.save_tensors(conv.tensors, tmp, options.max_shard_bytes)
            conv.tensors.clear()
            _write_configs(tmp, art, cfg, fmt, p, p.architecture or layout.architecture)

        with stage.timed("verify_weights_s"):
            reader = CheckpointReader(tmp)
            reader.check()
            weights = verify.compare_weights(reader, src, requantized=conv.requantized is not None)
            del src  # parity needs the memory
        with stage.timed("parity_s"):
            if options.parity:
                par = verify.parity(reader, art, reference=reference, reference_note=ref_note, text=options.text,
                                    max_samples=options.max_samples)
            else:
                par = {"skipped": "--no-parity"}
            # above the limit this raises and the temporary folder goes: no checkpoint is left
            ppl_gate = verify.gate_perplexity(par, q_precision, *options.ppl_limit(q_precision))

        q = art.manifest.quantization
        # "source" of a checkpoint names the quantized artifact (untyped for this kind, see trtforge.manifest)
        m.sections["source"] = {
            "path": str(art.path),
            **hashes,
            "manifest_sha256": sha256_file(art.path / MANIFEST),
            "precision": q.precision.value,
            "upstream_export": q.upstream.to_json() if q.upstream is not None else None,
            "model": art.manifest.source.to_json(),
            "calibration": q.calibration,
        }
        m.set("recipe", q.recipe)
        m.set("format", {
            "name": TARGET["format"], "quant_algo": p.quant_algo, "group_size": p.group_size, "dtype": p.dtype,
            "exclude_modules": p.exclude_modules, "hf_quant_config": fmt.hf_quant_config(),
            "files": saved["files"], "tensors": saved["tensors"], "tensor_bytes": saved["total_bytes"],
        })
        m.set("tensorrt_llm", {**TARGET, "hardware": HARDWARE[p.quant_algo], "loader_sources": SOURCES})
        m.set("conversion", {"notes": p.notes, "fp8_requantized": conv.requantized,
                             "weight_granularity_in_onnx": p.weight_granularity, "linears": conv.linears})
        m.set("verification", {
            "reader": "trtforge.engines.trtllm.reader: TensorRT-LLM's PyTorch-backend loading rules (linear.py), re-implemented",
            "quant_config_source": reader.quant_source,
            "warnings": reader.warnings,
            "weights": weights,
            "parity": par,
            "perplexity_gate": ppl_gate,
            "tensorrt_llm_load": "not run by export-checkpoint; tests/engines/test_trtllm_gpu.py loads the checkpoint "
                                 "with tensorrt_llm.LLM where a GPU and tensorrt_llm are present",
        })
        m.set("memory", p.memory)
        m.set("options", options.to_json())
        # the one upstream link every derived artifact has (trtforge.manifest)
        m.upstream = Upstream(path=str(art.path), stage=art.manifest.stage, sha256=hashes.get("model_sha256"),
                              manifest_sha256=m.sections["source"]["manifest_sha256"])
    log.info("wrote %s (%s, %s) in %.1fs", out, p.quant_algo, p.dtype, m.timings["total_s"])
    return CheckpointArtifact.open(out)


def _write_configs(tmp: Path, art: OnnxArtifact, cfg: dict, fmt: CheckpointFormat, p: Plan, arch: str) -> None:
    # the flat RoPE keys TensorRT-LLM's transformers 4.x reads, beside transformers 5's rope_parameters
    config = loader_config(cfg, checkpoint_of(art.manifest.source.model_type if art.manifest.source else None))
    config["architectures"] = [arch]
    # transformers >= 4.56 reads "dtype"; older releases only "torch_dtype": write both
    config["dtype"] = p.dtype
    config["torch_dtype"] = p.dtype
    config["quantization_config"] = fmt.inline_config()
    write_json(tmp / "config.json", config)
    write_json(tmp / "hf_quant_config.json", fmt.hf_quant_config())
    if (art.path / "generation_config.json").is_file():
        shutil.copy2(art.path / "generation_config.json", tmp / "generation_config.json")
    else:
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        write_json(tmp / "generation_config.json", gen)
    for name in HF_SIDE_FILES:
        if name not in ("config.json", "generation_config.json") and (art.path / name).is_file():
            shutil.copy2(art.path / name, tmp / name)


def _source_hashes(art: OnnxArtifact) -> dict[str, str]:
    """sha256 of the ONNX files, checked against the quantize manifest (the checkpoint must come
    from exactly the artifact the manifest describes)."""
    out = {}
    table = art.manifest.files
    for f in sorted(art.path.glob("model.onnx*")):
        got = sha256_file(f)
        want = table.get(f.name)
        if want is not None and got != want:
            raise InputError(f"{f.name} in {art.path} changed since trtforge quantize wrote it (sha256 differs from its manifest)",
                             "quantize the export again")
        out["model_sha256" if f.name == art.manifest.model.file else f"{f.name}_sha256"] = got
    return out


def _reference(art: OnnxArtifact, options: CheckpointOptions) -> tuple[Path | None, str]:
    """The float model parity compares with: --reference, else the source recorded in the manifest
    when it is still there and unchanged (weights hash)."""
    if not options.parity:
        return None, "parity disabled"
    if options.reference is not None:
        ref = Path(options.reference).expanduser().resolve()
        if not (ref / "config.json").is_file() or not list(ref.glob("*.safetensors")):
            raise InputError(f"reference {ref} is not a Hugging Face model folder with safetensors weights",
                             "pass the float model folder the export was made from (pickle weights are never loaded)")
        return ref, "given with --reference"
    src = art.manifest.source
    folder = Path(src.path or "") if src is not None else Path()
    files = [folder / f for f in (src.weight_files if src is not None else [])]
    if src is None or not src.path or not folder.is_dir() or not files or not all(f.is_file() for f in files):
        return None, f"the source model folder {folder} is not there; pass --reference to compare with the float model"
    if not all(f.suffix == ".safetensors" for f in files):
        return None, "the source model's weights are not safetensors (pickle files are never loaded)"
    if hash_files(files) != src.weights_sha256:
        return None, f"the weights in {folder} changed since the export (sha256 differs); pass --reference"
    return folder, "the export's source model, weights sha256 unchanged"


def summary_line(ck: CheckpointArtifact) -> str:
    """One line for the CLI: format, files, agreement figures."""
    f, v = ck.manifest.section("format"), ck.manifest.section("verification")
    w, par = v["weights"], v["parity"]
    parts = [f"{ck.path}  {f['quant_algo']}" + (f" group {f['group_size']}" if f["group_size"] else "") + f" {f['dtype']}",
             f"{len(f['files'])} safetensors file(s), {f['tensor_bytes'] / 2**20:.1f} MiB",
             f"weights: {w['stored_identical']}/{w['linears_quantized']} stored identical to the ONNX artifact, "
             f"served max rel err {w['served_max_rel_err']:.2e}"]
    if "checkpoint_vs_onnx" in par:
        c = par["checkpoint_vs_onnx"]
        parts.append(f"logits vs ONNX: cosine {c['cosine_mean']:.4f}, top-1 {c['top1_agreement']:.3f}")
    if "checkpoint_vs_reference" in par:
        c = par["checkpoint_vs_reference"]
        pc = c["ppl_change_pct"]
        gate = v.get("perplexity_gate") or {}
        limit = f" (limit {gate['limit']:g}%)" if gate.get("checked") else ""
        parts.append(f"vs float: cosine {c['cosine_mean']:.4f}, top-1 {c['top1_agreement']:.3f}"
                     + (f", perplexity {pc:+.2f}%{limit}" if pc is not None else ""))
    elif par.get("reference", "").startswith("skipped") or par.get("skipped"):
        parts.append(f"parity vs float {par.get('reference') or par.get('skipped')}")
    return "; ".join(parts)
