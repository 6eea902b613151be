"""Backend ``trtllm-checkpoint``: the ``trtllm`` target, a checkpoint TensorRT-LLM 1.x loads.

In:  a quantize-stage OnnxArtifact (FP8 or INT4 AWQ/RTN of a family whose Architecture entry has
     a writable ``checkpoint``), CheckpointOptions, an output folder.
Out: a CheckpointArtifact (manifest ``kind: trtllm-checkpoint``, ``stage: export-checkpoint``):
     NVIDIA Model Optimizer's unified Hugging Face format, written and verified by engines/trtllm
     (the same code as ``trtforge export-checkpoint``).

Parity: no Polygraphy runner (``runs_parity`` is False). The checkpoint is checked when it is
written: read back by TensorRT-LLM's loading rules, its weights compared with the ONNX
artifact's, and a fake-quantized PyTorch model of it compared with ONNX Runtime on the ONNX
artifact and with the float model (manifest ``verification``); a disagreement fails the write.
Its figures are what ``trtforge run`` records for the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtforge.artifacts import Artifact, CheckpointArtifact, OnnxArtifact, sha256_file
from trtforge.backend import BuildIntent
from trtforge.engines.check import Check, LoadReport, Machine
from trtforge.engines.targets import FP8, INT4, INT8, TRTLLM, TRTLLM_TARGET, Target
from trtforge.engines.trtllm import checks
from trtforge.engines.trtllm.checks import CheckpointOptions, Plan, shard_size
from trtforge.engines.trtllm.formats import SQ_HINT, SQ_REFUSAL, CkptDType, Fp8Scheme
from trtforge.engines.trtllm.reader import CheckpointReader
from trtforge.engines.trtllm.writer import export_checkpoint, summary_line
from trtforge.errors import OptionError, ParityError, QuantizationError, TargetError, TrtforgeError
from trtforge.registry import BACKENDS
from trtforge.vocab import Precision

# the compute capability each quant_algo's kernels need (formats: writer.HARDWARE)
MIN_SM = {"FP8": 89, "FP8_PER_CHANNEL_PER_TOKEN": 90, "W4A16_AWQ": 80}
OPTION_KEYS = ("dtype", "fp8_scheme", "max_shard_size", "parity", "reference", "text", "max_samples", "max_ppl_change_pct")


class TrtllmCheckpointBackend:
    name = TRTLLM
    kind = "trtllm-checkpoint"
    stage = "export-checkpoint"
    command = "export-checkpoint"
    options_table = "checkpoint"
    float_dtype = "fp16"  # the checkpoint's float16 (or the source's bfloat16) GEMMs
    runs_parity = False
    fuses_gemms = True  # its loader fuses q/k/v and gate/up (checks.py, _check_fused)

    # ------------------------------------------------------------------ targets
    def resolve(self, name: str, gpus: Any = None) -> Target | None:
        return TRTLLM_TARGET if name == TRTLLM_TARGET.name else None

    def target_names(self) -> list[str]:
        return [TRTLLM_TARGET.name]

    def owns(self, artifact: Artifact) -> bool:
        return artifact.manifest.kind == self.kind

    def precisions(self, target: Target) -> list[str]:
        return [FP8, INT4]

    def check_precision(self, target: Target, precision: str) -> None:
        p = Precision.parse(precision)
        if p == INT8:
            raise QuantizationError(SQ_REFUSAL, SQ_HINT)
        if p not in self.precisions(target):
            raise TargetError(f"{target.name} ({target.arch}) cannot take {p}: a TensorRT-LLM checkpoint is FP8 or "
                              "INT4 weight-only", "quantize with the fp8 or int4-awq recipe")

    def unavailable(self, target: Target) -> str | None:
        return None  # written with torch, transformers and safetensors, which trtforge always has

    def doctor(self, gpus: Any, tensorrt_available: bool) -> list[dict]:
        return [{"target": TRTLLM_TARGET.name, "precisions": self.precisions(TRTLLM_TARGET), "ready": True}]

    # ------------------------------------------------------------------ options and checks
    def default_options(self) -> CheckpointOptions:
        return CheckpointOptions()

    def parse_options(self, table: Mapping[str, Any]) -> CheckpointOptions:
        """From a run recipe's [checkpoint] table: dtype, fp8_scheme, max_shard_size, parity, reference, text,
        max_samples, max_ppl_change_pct (the export-checkpoint options)."""
        kw: dict[str, Any] = {}
        if "dtype" in table:
            kw["dtype"] = CkptDType(table["dtype"])
        if "fp8_scheme" in table:
            kw["fp8_scheme"] = Fp8Scheme(table["fp8_scheme"])
        if "max_shard_size" in table:
            kw["max_shard_bytes"] = shard_size(str(table["max_shard_size"]))
        if "parity" in table:
            kw["parity"] = bool(table["parity"])
        for key in ("reference", "text"):
            if table.get(key):
                kw[key] = Path(table[key])
        if "max_samples" in table:
            kw["max_samples"] = int(table["max_samples"])
        if table.get("max_ppl_change_pct") is not None:
            kw["max_ppl_change_pct"] = float(table["max_ppl_change_pct"])
        return CheckpointOptions(**kw)

    def check_options(self, target: Target, options: Any) -> None:
        if not isinstance(options, CheckpointOptions):
            raise OptionError(f"the {target.name} target takes checkpoint options, not {type(options).__name__}",
                              "pass CheckpointOptions (trtforge.engines.trtllm)")
        if options.max_samples < 1:
            raise OptionError("max_samples must be at least 1", "e.g. 16", fields=("max_samples",))

    def preflight(self, intent: BuildIntent, target: Target, options: CheckpointOptions) -> None:
        self.check_options(target, options)
        checks.preflight(precision=intent.precision, model_type=intent.model_type, architecture=intent.architecture,
                         task=intent.task, recipe=intent.recipe, config=intent.config, options=options)

    def check(self, artifact: Artifact, target: Target, options: CheckpointOptions) -> Plan:
        self.check_options(target, options)
        art = artifact if isinstance(artifact, OnnxArtifact) else OnnxArtifact.open(artifact)
        return checks.plan(art, options)

    # ------------------------------------------------------------------ build
    def build(self, artifact: Artifact | str | Path, target: Target, options: CheckpointOptions, out: str | Path, *,
              force: bool = False) -> CheckpointArtifact:
        self.check_options(target, options)
        return export_checkpoint(artifact, out, options, force=force)

    def model_file(self, artifact: Artifact) -> Path:
        files = (artifact.manifest.section("format") or {}).get("files") or ["model.safetensors"]
        return artifact.path / files[0]

    def summary(self, artifact: Artifact) -> str:
        return summary_line(artifact)

    # ------------------------------------------------------------------ load check
    def load_check(self, artifact: Artifact, machine: Machine, *, load: bool = False) -> LoadReport:
        """File hashes, the GPU the format's kernels need; with ``load``, the checkpoint read back by
        TensorRT-LLM's loading rules (engines/trtllm/reader.py; TensorRT-LLM itself is not run)."""
        m = artifact.manifest
        changed = [name for name, want in m.files.items()
                   if not (artifact.path / name).is_file() or sha256_file(artifact.path / name) != want]
        out = [Check("files hash", not changed, f"{len(m.files)} files match the manifest" if not changed
                     else f"{changed[0]} changed since the checkpoint was written" + (f" (+{len(changed) - 1} more)"
                                                                                      if len(changed) > 1 else ""))]
        algo = (m.section("format") or {}).get("quant_algo", "?")
        need = MIN_SM.get(algo)
        if not machine.gpus:
            out.append(Check("GPU", False, f"no NVIDIA GPU found (nvidia-smi); {algo} needs SM "
                             f"{need // 10}.{need % 10}+" if need else "no NVIDIA GPU found (nvidia-smi)"))
        else:
            g = machine.gpus[0]
            ok = need is None or g.sm >= need
            out.append(Check("GPU", ok, f"{g.name} (compute capability {g.compute_capability})"
                             + ("" if ok else f"; {algo} kernels need SM {need // 10}.{need % 10}+")))
        if load:
            try:
                CheckpointReader(artifact.path).check()
                out.append(Check("load", True, "read back by TensorRT-LLM's loading rules (trtforge's reader)"))
            except TrtforgeError as exc:
                out.append(Check("load", False, exc.problem))
        return LoadReport(str(artifact.path), "tensorrt-llm checkpoint", tuple(out), machine)

    # ------------------------------------------------------------------ parity
    def parity_runner(self, side: Any) -> tuple[Any, dict[str, Any]]:
        raise ParityError(
            f"the {side.role} is a TensorRT-LLM checkpoint, which parity does not run; its writer compared it with the "
            "ONNX artifact and the float model (manifest verification.parity)",
            "compare the quantize artifact it came from, or a TensorRT or CPU build of it")


TRTLLM_BACKEND = BACKENDS.register(TrtllmCheckpointBackend())
