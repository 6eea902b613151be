"""TensorRT timing caches, saved after a build and reused by the next one.

In:  a cache path (``--timing-cache`` or the per-user default), the TensorRT version and the
     GPU of this build.
Out: the cache bytes to hand to ``config.create_timing_cache`` (empty for a fresh cache) and a
     status for the manifest; after the build, the new cache written with a sidecar
     ``<cache>.json`` recording the TensorRT version and GPU it belongs to.

A timing cache is valid only for the TensorRT version that wrote it ("version numbers must
match across major, minor, patch, and build versions", TensorRT support policies) and the
device it was measured on (``set_timing_cache`` fails on a CUDA device mismatch). A cache of
another version or GPU, or one without a sidecar, is ignored with a warning, never an error:
it only costs build time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from trtforge.artifacts import now_iso, sha256_bytes

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "trtforge-timing-cache/1"


@dataclass(frozen=True)
class CacheLoad:
    data: bytes  # b"" means: start a new cache
    status: str  # "loaded" | "new" | "ignored" | "disabled"
    reason: str | None = None

    def to_json(self, path: Path | None) -> dict:
        return {"path": str(path) if path else None, "status": self.status, "reason": self.reason,
                "bytes_loaded": len(self.data)}


def default_cache_dir() -> Path:
    root = os.environ.get("TRTFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "trtforge")
    return Path(root) / "timing-caches"


def default_cache_path(tensorrt_version: str, compute_capability: str) -> Path:
    """One cache per TensorRT version and compute capability, so they never collide."""
    return default_cache_dir() / f"trt-{tensorrt_version}-sm_{compute_capability.replace('.', '')}.cache"


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_timing_cache(path: Path | None, tensorrt_version: str, compute_capability: str) -> CacheLoad:
    """Cache bytes if ``path`` holds a cache of this TensorRT version and GPU, else b"" with a reason."""
    if path is None:
        return CacheLoad(b"", "disabled")
    path = Path(path)
    if not path.exists():
        return CacheLoad(b"", "new")

    def ignore(reason: str) -> CacheLoad:
        log.warning("timing cache %s ignored: %s; building with a new cache", path, reason)
        return CacheLoad(b"", "ignored", reason)

    side = sidecar(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ignore(f"it has no {side.name} recording the TensorRT version that wrote it")
    except (OSError, ValueError) as exc:
        return ignore(f"{side.name} is unreadable ({exc})")
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        return ignore(f"{side.name} is not a trtforge timing-cache record")
    if meta.get("tensorrt_version") != tensorrt_version:
        return ignore(f"it was written by TensorRT {meta.get('tensorrt_version')}, this is TensorRT {tensorrt_version} "
                      "(caches are valid only for the exact version)")
    if meta.get("compute_capability") != compute_capability:
        return ignore(f"it was measured on compute capability {meta.get('compute_capability')}, this GPU is "
                      f"{compute_capability}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ignore(f"it cannot be read ({exc.strerror or exc})")
    if sha256_bytes(data) != meta.get("sha256"):
        return ignore("its contents do not match the sha256 in its record (changed or truncated)")
    return CacheLoad(data, "loaded")


def save_timing_cache(path: Path, data: bytes, tensorrt_version: str, compute_capability: str, gpu_name: str) -> dict:
    """Write cache and sidecar (each via a temporary file and rename); returns the sidecar record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": SIDECAR_FORMAT,
        "tensorrt_version": tensorrt_version,
        "compute_capability": compute_capability,
        "gpu": gpu_name,
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "saved_at": now_iso(),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    stmp = sidecar(path).with_name(f".{sidecar(path).name}.tmp-{os.getpid()}")
    stmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(stmp, sidecar(path))
    return meta
