"""Build targets as data: which precisions TensorRT runs natively per compute capability.

Sources (checked 2026-11, see docs/engines.md for quotes):
* FP8 (E4M3) Q/DQ needs SM 8.9+: TensorRT fails Ampere builds with "Networks with FP8 Q/DQ
  layers require hardware with FP8 support" (NVIDIA/Model-Optimizer#70); TensorRT-RTX docs:
  "FP8 is only supported for matrix multiplications (GEMM) on Ada and later architectures
  (compute capability 8.9 or later)"; Model Optimizer support matrix: FP8 "Ada and Later".
* INT8 Q/DQ: TensorRT supports SM 7.5+ (Turing); Model Optimizer lists INT8 for Ampere and
  later. We offer it from SM 7.5.
* INT4 weight-only (W4A16, block-quantized DequantizeLinear): Model Optimizer support matrix
  "W4A16 (INT4 Weights Only) ... Ampere and Later"; TensorRT-RTX lists INT4 WoQ GEMM on 8.6+,
  not on 7.5. We offer it from SM 8.0.
* BF16 needs SM 8.0+ (TransformerEngine support matrix). FP16 on every supported GPU
  (TensorRT 10 deprecated SM 7.0; 7.5 is the practical floor).
* FP4 (NVFP4) needs SM 10.0+ (TensorRT-RTX quantized-types page); trtforge does not emit FP4.
GPU names per compute capability: https://developer.nvidia.com/cuda-gpus

Each :class:`Target` names the backend that builds for it (``tensorrt``, ``cpu-ort``,
``trtllm-checkpoint``; trtforge.backend); each backend claims its target names, so
:func:`resolve_target` and the precision checks ask the backends instead of branching.
"""

from __future__ import annotations

from dataclasses import dataclass

from trtforge import env
from trtforge.backend import resolve_target as _backend_target
from trtforge.backend import target_names
from trtforge.errors import InputError, TargetError
from trtforge.registry import BACKENDS
from trtforge.vocab import QUANTIZED, Precision  # noqa: F401  (QUANTIZED re-exported)

# Short names for the one vocabulary (trtforge.vocab.Precision), used by the tables below.
FP32, FP16, BF16, INT8, FP8, INT4, FP4 = (Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8,
                                          Precision.FP8, Precision.INT4, Precision.FP4)

# minimum SM (major*10+minor) for each precision TensorRT runs natively
MIN_SM = {FP32: 75, FP16: 75, BF16: 80, INT8: 75, INT4: 80, FP8: 89, FP4: 100}
# ONNX Runtime's CPU provider runs every Q/DQ flavour trtforge writes
CPU_PRECISIONS = (FP32, FP16, INT8, FP8, INT4)
TENSORRT, CPU_ORT, TRTLLM = "tensorrt", "cpu-ort", "trtllm-checkpoint"  # BACKENDS names


@dataclass(frozen=True)
class Target:
    name: str
    sm: int | None  # None: no GPU of its own (the CPU, a TensorRT-LLM checkpoint)
    arch: str
    example_gpus: str
    backend: str = TENSORRT  # the BACKENDS entry that builds for it

    @property
    def compute_capability(self) -> str | None:
        return None if self.sm is None else f"{self.sm // 10}.{self.sm % 10}"

    def precisions(self) -> list[str]:
        return BACKENDS.get(self.backend).precisions(self)

    def supports(self, precision: str) -> bool:
        return precision in self.precisions()

    def to_json(self) -> dict:
        return {"name": self.name, "sm": self.sm, "compute_capability": self.compute_capability,
                "arch": self.arch, "example_gpus": self.example_gpus}


TARGETS: dict[str, Target] = {
    "sm_75": Target("sm_75", 75, "Turing", "T4, RTX 20xx"),
    "sm_80": Target("sm_80", 80, "Ampere", "A100, A30"),
    "sm_86": Target("sm_86", 86, "Ampere", "A10, A40, RTX A6000, RTX 30xx"),
    "sm_87": Target("sm_87", 87, "Ampere", "Jetson AGX Orin"),
    "sm_89": Target("sm_89", 89, "Ada", "L4, L40S, RTX 6000 Ada, RTX 40xx"),
    "sm_90": Target("sm_90", 90, "Hopper", "H100, H200, GH200"),
    "sm_100": Target("sm_100", 100, "Blackwell", "B200, GB200"),
    "sm_120": Target("sm_120", 120, "Blackwell", "RTX PRO 6000 Blackwell, RTX 50xx"),
    "cpu": Target("cpu", None, "CPU", "any x86-64 or Arm CPU (ONNX Runtime)", CPU_ORT),
}
# The TensorRT-LLM checkpoint: a target of `trtforge run` (written alone by `trtforge export-checkpoint`).
TRTLLM_TARGET = Target("trtllm", None, "TensorRT-LLM", "TensorRT-LLM 1.x PyTorch backend (FP8: SM 8.9+, W4A16: SM 8.0+)",
                       TRTLLM)
ALIASES = {"turing": "sm_75", "ampere": "sm_80", "ada": "sm_89", "hopper": "sm_90", "blackwell": "sm_100"}
# what `trtforge build --target` takes (the TensorRT and CPU backends)
TARGET_CHOICES = sorted(TARGETS) + sorted(ALIASES) + ["auto"]


def resolve_target(name: str, gpus=None) -> Target:
    """``hopper`` -> sm_90; ``auto`` -> the first GPU of this machine; ``cpu``; ``trtllm``. Each
    backend claims its names (trtforge.backend.resolve_target); unknown names are errors."""
    if isinstance(name, Target):
        return name
    t = _backend_target(name, gpus)
    if t is None:
        raise InputError(f"unknown target {name!r}", f"use one of: {', '.join(target_names())}")
    return t


def resolve_gpu_target(key: str, gpus=None) -> Target | None:
    """The TensorRT backend's names: sm_XX, the architecture aliases and ``auto``."""
    key = ALIASES.get(key, key)
    if key == "auto":
        found = env.gpus() if gpus is None else gpus
        if not found:
            raise TargetError("--target auto found no NVIDIA GPU on this machine", "name a target (e.g. sm_90) or use --target cpu")
        g = found[0]
        for t in TARGETS.values():
            if t.sm == g.sm:
                return t
        return Target(f"sm_{g.sm}", g.sm, "unknown", g.name)
    if key.startswith("sm_") and key not in TARGETS and key[3:].isdigit():
        return Target(key, int(key[3:]), "unknown", "")
    t = TARGETS.get(key)
    return t if t is not None and t.backend == TENSORRT else None


def tensorrt_precisions(target: Target) -> list[str]:
    return [p for p, m in MIN_SM.items() if (target.sm or 0) >= m]


# What to suggest when a target cannot run a precision.
_ALTERNATIVE = {
    FP8: "use the int8-sq or int4-awq recipe for this GPU, or build for sm_89/sm_90 (Ada/Hopper)",
    BF16: "export with --dtype fp16 for this GPU",
    INT4: "use the int8-sq recipe for this GPU, or build for sm_80+ (Ampere or newer)",
    INT8: "use the fp16 export for this GPU",
    FP4: "use the fp8 recipe (Ada/Hopper) or build for sm_100+ (Blackwell)",
}


def refuse_unsupported(target: Target, precision: str) -> None:
    """The TensorRT and CPU refusal: ``target``'s precision table lacks ``precision``."""
    if target.supports(precision):
        return
    need = MIN_SM.get(precision)
    raise TargetError(
        f"{target.name} ({target.arch}, {target.example_gpus or 'unknown GPU'}) cannot run {precision} "
        f"{'(needs SM ' + str(need // 10) + '.' + str(need % 10) + '+)' if need else ''}".strip(),
        _ALTERNATIVE.get(precision, "choose another recipe or target"),
    )


def check_supported(target: Target, precision: str) -> None:
    """Refuse at once, naming the alternative, when ``target`` cannot run ``precision``."""
    BACKENDS.get(target.backend).check_precision(target, precision)


def possible_targets(gpus, tensorrt_available: bool) -> list[dict]:
    """What this machine can build, backend by backend (``trtforge doctor``: trtforge.env.doctor)."""
    return [row for b in BACKENDS for row in b.doctor(gpus, tensorrt_available)]
