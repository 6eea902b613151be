"""Build options and the build plan: everything TensorRT will be told, as data.

In:  :class:`BuildOptions` (what the user chose), the resolved target, the artifact's precision
     and its :class:`ShapeProfile`.
Out: :class:`BuildPlan`, a JSON-able record of the network flags, builder config settings,
     profiles, timing cache and portability options, each with its documented cost. The plan
     is written into the engine manifest and printed by ``trtforge build --dry-run``; the
     TensorRT adapter (``_trt.py``) reads nothing else.

Strongly typed networks only: TensorRT 11 removed the precision builder flags (FP16/INT8/FP8...)
and the implicit-quantization calibrators, and 10.12 deprecated weak typing; precision comes
from the graph (FP16 casts and initializers, Q/DQ nodes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from trtforge.backend import backend_for_target
from trtforge.engines.cpu_lm_head import CHOICES as CPU_LM_HEAD_CHOICES
from trtforge.engines.precision import PrecisionInfo
from trtforge.engines.profiles import DimOverride, ShapeProfile
from trtforge.engines.targets import Target
from trtforge.errors import OptionError


class HardwareCompatibility(str, Enum):
    NONE = "none"
    AMPERE_PLUS = "ampere-plus"
    SAME_COMPUTE_CAPABILITY = "same-compute-capability"


class Layout(str, Enum):
    PLAIN = "plain"
    TRITON = "triton"


# Performance cost of each portability option, quoted from NVIDIA's documentation.
COSTS = {
    HardwareCompatibility.AMPERE_PLUS: (
        "TensorRT docs (HardwareCompatibilityLevel.AMPERE_PLUS): limits driver-reserved plus kernel shared memory "
        "to 48 KiB, may reduce the tactics available for each layer and prevent some fusions, which can decrease "
        "performance (especially for tf32); disables cuDNN, cuBLAS and cuBLASLt tactics; the build GPU must be "
        "Ampere or newer"
    ),
    HardwareCompatibility.SAME_COMPUTE_CAPABILITY: (
        "TensorRT docs (HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY): may decrease performance compared "
        "to an engine with no compatibility; build GPU must be Turing or newer"
    ),
    "version_compatible": (
        "TensorRT docs (version compatibility): version-compatible engines can be slower than engines built "
        "for a specific runtime version (restricted to lean-runtime operators); loading needs "
        "engine_host_code_allowed"
    ),
    "exclude_lean_runtime": (
        "the lean runtime is not embedded in the plan: the deployment must ship a matching lean runtime library"
    ),
    "workspace": "a smaller workspace limit can rule out faster tactics that need scratch memory",
    "optimization_level": (
        "builder_optimization_level below 3 (the default) builds faster but may pick slower kernels; "
        "4-5 search longer for faster ones (TensorRT docs: valid levels 0-5)"
    ),
}


@dataclass(frozen=True)
class BuildOptions:
    """What ``trtforge build`` was asked for; validated by :meth:`check`."""

    profile: tuple[DimOverride, ...] = ()
    optimization_level: int = 3
    workspace_mib: int | None = None  # None: TensorRT's default (all device memory)
    timing_cache: Path | None = None  # None: a per-user cache keyed by TensorRT version and GPU
    use_timing_cache: bool = True
    hardware_compatibility: HardwareCompatibility = HardwareCompatibility.NONE
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    layout: Layout = Layout.PLAIN
    model_name: str | None = None  # Triton model name; default from the artifact
    reference_engine: Path | None = None  # an FP16 engine folder to compare latency with
    benchmark_iterations: int = 50
    slower_tolerance: float = 0.05  # warn when a quantized engine is >5% slower than FP16
    cpu_lm_head: str = "float"  # cpu target: "int8" runs a decoder's float lm_head as an INT8 GEMM (cpu_lm_head.py)

    def check(self, target: Target) -> None:
        """Refuse values no build takes, then what ``target``'s backend does not take (OptionError
        naming the fields; the CLI and recipe layers say which flag or key set them)."""
        if not 0 <= self.optimization_level <= 5:
            raise OptionError(f"optimization_level {self.optimization_level} is out of range",
                              "use 0-5 (TensorRT's default is 3)", fields=("optimization_level",))
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise OptionError(f"workspace_mib {self.workspace_mib} MiB is not positive", "give a size in MiB, e.g. 4096",
                              fields=("workspace_mib",))
        if self.exclude_lean_runtime and not self.version_compatible:
            raise OptionError("exclude_lean_runtime needs version_compatible",
                              "add version_compatible or drop exclude_lean_runtime",
                              fields=("exclude_lean_runtime", "version_compatible"))
        if self.benchmark_iterations < 1:
            raise OptionError("benchmark_iterations must be at least 1", "e.g. 50", fields=("benchmark_iterations",))
        if self.cpu_lm_head not in CPU_LM_HEAD_CHOICES:
            raise OptionError(f"cpu_lm_head {self.cpu_lm_head!r} is not one of {', '.join(CPU_LM_HEAD_CHOICES)}",
                              "use 'float' (the default) or 'int8'", fields=("cpu_lm_head",))
        if self.model_name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.model_name):
            raise OptionError(f"model_name {self.model_name!r} has characters Triton does not accept in a folder name",
                              "use letters, digits, '.', '_' and '-'", fields=("model_name",))
        backend_for_target(target).check_options(target, self)

    def tensorrt_only(self) -> list[str]:
        """The fields set away from their default that only TensorRT builds use."""
        return [name for name, on in (
            ("hardware_compatibility", self.hardware_compatibility != HardwareCompatibility.NONE),
            ("version_compatible", self.version_compatible),
            ("reference_engine", self.reference_engine is not None),
            ("timing_cache", self.timing_cache is not None),
            ("optimization_level", self.optimization_level != 3),
            ("workspace_mib", self.workspace_mib is not None),
        ) if on]

    def cpu_only(self) -> list[str]:
        """The fields set away from their default that only the cpu target uses."""
        return ["cpu_lm_head"] if self.cpu_lm_head != "float" else []

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> BuildOptions:
        """From a run recipe's [build] table (keys are field names; ValueError names the bad value)."""
        profile = tuple(DimOverride.parse(p) for p in (table.get("profile") or []))
        for p in profile:  # the rest is checked against the model when the build stage runs
            if not p.range.min <= p.range.opt <= p.range.max:
                raise OptionError(f"profile {p} is not ordered min <= opt <= max",
                                  "write SYMBOL=MIN:OPT:MAX, e.g. batch=1:8:32", fields=("profile",))
        return cls(
            profile=profile,
            optimization_level=table.get("optimization_level", 3), workspace_mib=table.get("workspace_mib"),
            layout=Layout(table.get("layout", "plain")),
            hardware_compatibility=HardwareCompatibility(table.get("hardware_compatibility", "none")),
            version_compatible=table.get("version_compatible", False),
            cpu_lm_head=table.get("cpu_lm_head", "float"),
        )

    def to_json(self) -> dict:
        return {
            "profile": [str(p) for p in self.profile],
            "optimization_level": self.optimization_level,
            "workspace_mib": self.workspace_mib,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "use_timing_cache": self.use_timing_cache,
            "hardware_compatibility": self.hardware_compatibility.value,
            "version_compatible": self.version_compatible,
            "exclude_lean_runtime": self.exclude_lean_runtime,
            "layout": self.layout.value,
            "model_name": self.model_name,
            "reference_engine": str(self.reference_engine) if self.reference_engine else None,
            "benchmark_iterations": self.benchmark_iterations,
            "cpu_lm_head": self.cpu_lm_head,
        }


@dataclass(frozen=True)
class BuildPlan:
    """Everything the TensorRT adapter does, as data (see module docstring)."""

    onnx_path: Path
    target: Target
    precision: PrecisionInfo
    profile: ShapeProfile
    options: BuildOptions
    timing_cache_path: Path | None

    @property
    def network_flags(self) -> list[str]:
        # STRONGLY_TYPED: required on TensorRT 10, ignored (always on) on 11. Never EXPLICIT_BATCH
        # (ignored on 10, removed on 11).
        return ["STRONGLY_TYPED"]

    @property
    def builder_flags(self) -> list[str]:
        flags = []
        if self.options.version_compatible:
            flags.append("VERSION_COMPATIBLE")
        if self.options.exclude_lean_runtime:
            flags.append("EXCLUDE_LEAN_RUNTIME")
        return flags

    def costs(self) -> list[str]:
        o = self.options
        out = []
        if o.hardware_compatibility != HardwareCompatibility.NONE:
            out.append(COSTS[o.hardware_compatibility])
        if o.version_compatible:
            out.append(COSTS["version_compatible"])
        if o.exclude_lean_runtime:
            out.append(COSTS["exclude_lean_runtime"])
        if o.workspace_mib is not None:
            out.append(COSTS["workspace"])
        if o.optimization_level != 3:
            out.append(COSTS["optimization_level"])
        return out

    def to_json(self) -> dict:
        o = self.options
        return {
            "onnx": str(self.onnx_path),
            "target": self.target.to_json(),
            "precision": self.precision.to_json(),
            "network": {"flags": self.network_flags, "strongly_typed": True, "parser": "OnnxParser.parse_from_file"},
            "config": {
                "builder_optimization_level": o.optimization_level,
                "workspace_bytes": o.workspace_mib * (1 << 20) if o.workspace_mib else None,
                "profiling_verbosity": "DETAILED",  # the engine inspector needs it for per-layer precisions
                "hardware_compatibility_level": o.hardware_compatibility.value,
                "version_compatible": o.version_compatible,
                "exclude_lean_runtime": o.exclude_lean_runtime,
                "builder_flags": self.builder_flags,
                "precision_flags": [],  # never: precision comes from the strongly typed graph
            },
            "profiles": [self.profile.to_json()],
            "timing_cache": str(self.timing_cache_path) if self.timing_cache_path else None,
            "costs": self.costs(),
        }
