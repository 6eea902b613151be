"""Will this artifact load here? The engine manifest checked against the current machine.

In:  a build-stage artifact (a TensorRT engine folder, or a CPU-target ONNX folder) and a
     :class:`Machine` (TensorRT version, GPUs, ONNX Runtime version; read from this machine by
     default, passed in by tests).
Out: a :class:`LoadReport` with one entry per check (file hash, TensorRT version, GPU compute
     capability and model, ONNX Runtime version) and the verdict ``loads``.

TensorRT rules (support-policies and engine-compatibility docs): a plan loads only in the exact
TensorRT version that built it unless it was built version-compatible (then in the same or a
later runtime; TensorRT 10 version-compatible plans also in TensorRT 11); without hardware
compatibility only on the compute capability it was built for (another GPU model of the same
compute capability loads, with a TensorRT warning that it may be slower); AMPERE_PLUS on any
SM 8.0+ GPU.

CPU artifacts: the ONNX Runtime version, and the integer GEMM kernel: an artifact whose fused
INT8 GEMMs read signed weights (built before trtforge stored them as UINT8 + 128) runs ONNX
Runtime's U8S8 kernel, which saturates int16 pair sums on x86 CPUs without VNNI; it loads, but
``inspect`` warns that its outputs can be wrong on such a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import metadata

from trtforge.artifacts import EngineArtifact, OnnxArtifact, sha256_file
from trtforge.engines.cpu import VNNI_FLAGS, cpu_flags
from trtforge.env import Gpu, gpus, tensorrt_status


@dataclass(frozen=True)
class Machine:
    tensorrt_version: str | None
    gpus: tuple[Gpu, ...]
    onnxruntime_version: str | None
    cpu_flags: tuple[str, ...] | None = None  # the INT8-relevant x86 flags (engines.cpu.INT8_CPU_FLAGS); None: unknown

    @classmethod
    def here(cls) -> Machine:
        trt = tensorrt_status()
        try:
            ort_version = metadata.version("onnxruntime")
        except metadata.PackageNotFoundError:
            try:
                ort_version = metadata.version("onnxruntime-gpu")
            except metadata.PackageNotFoundError:
                ort_version = None
        return cls(trt.get("version") if trt["available"] else None, tuple(gpus()), ort_version, cpu_flags())

    def to_json(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "gpus": [asdict(g) for g in self.gpus],
                "onnxruntime_version": self.onnxruntime_version,
                "cpu_flags": list(self.cpu_flags) if self.cpu_flags is not None else None}


@dataclass(frozen=True)
class Check:
    what: str
    ok: bool
    detail: str
    warning: bool = False  # ok, but worth saying

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadReport:
    artifact: str
    kind: str
    checks: tuple[Check, ...] = field(default_factory=tuple)
    machine: Machine | None = None

    @property
    def loads(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {"artifact": self.artifact, "kind": self.kind, "loads_here": self.loads,
                "checks": [c.to_json() for c in self.checks], "machine": self.machine.to_json() if self.machine else None}

    def text(self) -> str:
        lines = [f"{self.artifact} ({self.kind})"]
        for c in self.checks:
            mark = "ok  " if c.ok and not c.warning else "warn" if c.ok else "FAIL"
            lines.append(f"  [{mark}] {c.what}: {c.detail}")
        lines.append("will load here" if self.loads else "will NOT load here")
        return "\n".join(lines)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def tensorrt_version_check(built: str, here: str | None, version_compatible: bool) -> Check:
    if here is None:
        return Check("TensorRT", False, f"not importable here (engine built with {built}); pip install 'trtforge[gpu]'")
    if here == built:
        return Check("TensorRT", True, f"{here}, the version that built the engine")
    b, h = _version_tuple(built), _version_tuple(here)
    if version_compatible and h >= b:
        return Check("TensorRT", True, f"{here} runs version-compatible plans built with {built} "
                     "(needs runtime.engine_host_code_allowed)", warning=True)
    if version_compatible:
        return Check("TensorRT", False, f"{here} is older than {built}; plans never load in an older runtime")
    return Check("TensorRT", False, f"{here} here, engine built with {built}; a plan loads only in the exact version "
                 "that built it (rebuild, or build with --version-compatible)")


def gpu_check(built_cc: str, built_name: str, hw_compat: str, gpus: tuple[Gpu, ...]) -> Check:
    if not gpus:
        return Check("GPU", False, "no NVIDIA GPU found (nvidia-smi)")
    g = gpus[0]
    sm_built = int(built_cc.replace(".", ""))
    if hw_compat == "ampere-plus":
        ok = g.sm >= 80
        return Check("GPU", ok, f"{g.name} (compute capability {g.compute_capability}); engine is Ampere+ "
                     f"hardware-compatible{'' if ok else ', needs SM 8.0 or newer'}")
    if g.sm != sm_built:
        return Check("GPU", False, f"{g.name} has compute capability {g.compute_capability}, engine was built for "
                     f"{built_cc} ({built_name}); rebuild on this GPU or build with --hardware-compatibility")
    if g.name != built_name and hw_compat == "none":
        return Check("GPU", True, f"{g.name}, same compute capability {built_cc} as {built_name} but another model: "
                     "loads, TensorRT warns it may run slower", warning=True)
    return Check("GPU", True, f"{g.name} (compute capability {g.compute_capability})")


def _hash_check(path, expected: str | None, label: str) -> Check:
    if not expected:
        return Check(f"{label} hash", False, "the manifest records no sha256 for it")
    got = sha256_file(path)
    if got != expected:
        return Check(f"{label} hash", False, f"{path.name} changed since the build (sha256 {got[:12]}..., manifest "
                     f"{expected[:12]}...)")
    return Check(f"{label} hash", True, f"{path.name} matches the manifest")


def check_engine(art: EngineArtifact, machine: Machine) -> LoadReport:
    m = art.manifest
    eng = m.section("engine") or {}
    plan_cfg = ((m.section("plan") or {}).get("config")) or {}
    checks = [
        _hash_check(art.engine_path, eng.get("sha256"), "engine"),
        tensorrt_version_check((m.section("tensorrt") or {}).get("version", "?"), machine.tensorrt_version,
                               bool(plan_cfg.get("version_compatible"))),
        gpu_check((m.section("gpu") or {}).get("compute_capability", "0.0"), (m.section("gpu") or {}).get("name", "?"),
                  plan_cfg.get("hardware_compatibility_level", "none"), machine.gpus),
    ]
    return LoadReport(str(art.path), "tensorrt engine", tuple(checks), machine)


def check_cpu(art: OnnxArtifact, machine: Machine) -> LoadReport:
    m = art.manifest
    checks = [_hash_check(art.model_path, m.files.get(m.model.file), "model")]
    built = m.versions.get("onnxruntime") or "?"
    here = machine.onnxruntime_version
    if here is None:
        checks.append(Check("ONNX Runtime", False, f"not installed here (artifact optimized by {built}); "
                            "pip install onnxruntime"))
    elif _version_tuple(here)[:2] < _version_tuple(built)[:2]:
        checks.append(Check("ONNX Runtime", False, f"{here} here is older than {built}, which optimized the graph; "
                            "its fused contrib operators may not exist here (upgrade onnxruntime or rebuild)"))
    else:
        checks.append(Check("ONNX Runtime", True, f"{here} (artifact optimized by {built})",
                            warning=_version_tuple(here)[:2] != _version_tuple(built)[:2]))
    kernel = int8_kernel_check(m.section("build") or {}, machine.cpu_flags)
    if kernel is not None:
        checks.append(kernel)
    return LoadReport(str(art.path), "onnx runtime (cpu target)", tuple(checks), machine)


def int8_kernel_check(build: dict, flags: tuple[str, ...] | None) -> Check | None:
    """Which MLAS integer GEMM the artifact's fused INT8 GEMMs take, and whether it is exact on this CPU."""
    types = (build.get("int8_gemm") or {}).get("weight_types_after")
    if types is None:  # built before the record existed: fused GEMMs then read int8 weights
        types = {"int8": build["ops_after"]["MatMulIntegerToFloat"]} if (build.get("ops_after") or {}).get(
            "MatMulIntegerToFloat") else {}
    if not types:
        return None
    signed = types.get("int8", 0)
    if not signed:
        return Check("INT8 GEMM kernel", True, f"U8U8 ({sum(types.values())} GEMMs, uint8 weights): exact on every CPU")
    if flags is None or "avx2" not in flags:
        return Check("INT8 GEMM kernel", True, f"{signed} GEMMs read signed INT8 weights (U8S8); this CPU's flags "
                     "are unknown: on x86 without VNNI U8S8 saturates (rebuild with this trtforge for U8U8)",
                     warning=True)
    if set(flags) & set(VNNI_FLAGS):
        return Check("INT8 GEMM kernel", True, f"{signed} GEMMs read signed INT8 weights (U8S8): exact here (VNNI)")
    return Check("INT8 GEMM kernel", True, f"{signed} GEMMs read signed INT8 weights (U8S8), which saturates int16 "
                 "pair sums on this CPU (no VNNI): outputs can be wrong; rebuild with this trtforge (U8U8 weights)",
                 warning=True)
