"""What this machine can do: library versions, ONNX Runtime providers, TensorRT, GPUs."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from trtforge.manifest import library_versions
from trtforge.registry import BACKENDS


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "9.0"

    @property
    def sm(self) -> int:
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)


def gpus() -> list[Gpu]:
    """GPUs from nvidia-smi (no CUDA library needed); empty without a driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[2].replace(".", "").isdigit():
            found.append(Gpu(int(parts[0]), parts[1], parts[2]))
    return found


def available_bytes() -> int | None:
    """Memory this process can still use: psutil if installed, else /proc/meminfo MemAvailable;
    None where neither says."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for reports and benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def tensorrt_status() -> dict:
    """Whether ``import tensorrt`` works here, and its version or the reason it fails."""
    try:
        import tensorrt as trt  # noqa: F401  (only probing)
    except Exception as exc:  # ImportError, or the bindings' OSError when the libs are missing
        return {"available": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    return {"available": True, "version": getattr(trt, "__version__", "unknown")}


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except Exception:
        return []
    return list(ort.get_available_providers())


def doctor() -> dict:
    """Versions, providers, TensorRT, GPUs, and per backend the targets it can build here."""
    gs = gpus()
    trt = tensorrt_status()
    return {
        "versions": library_versions(),
        "onnxruntime_providers": ort_providers(),
        "tensorrt": trt,
        "gpus": [asdict(g) | {"sm": g.sm} for g in gs],
        "build_targets": [row for b in BACKENDS for row in b.doctor(gs, trt["available"])],
    }
