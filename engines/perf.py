"""Engine latency records and the "quantized engine slower than FP16" check.

In:  the latency this build measured (median over N runs at the profile's opt shapes) and,
     optionally, the manifest of an FP16 engine of the same model (``--reference-engine``).
Out: a comparison for the manifest and, when the quantized engine is slower than the FP16 one
     on the same GPU and TensorRT version, a warning: the most common complaint about Q/DQ
     tools, usually Q/DQ placement that blocks TensorRT's fusions.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from trtforge.engines.targets import QUANTIZED
from trtforge.vocab import FLOATS, Precision


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    iterations: int
    shapes: dict[str, list[int]]

    @classmethod
    def from_samples(cls, samples_ms: list[float], shapes: dict[str, list[int]]) -> Latency:
        s = sorted(samples_ms)
        p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
        return cls(round(statistics.median(s), 4), round(p90, 4), len(s), shapes)

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "iterations": self.iterations, "shapes": self.shapes}


def _why_not_comparable(candidate: dict, reference: dict) -> str | None:
    ref_perf = reference.get("performance") or {}
    if "latency" not in ref_perf:
        return "the reference engine's manifest has no latency measurement"
    if Precision.lookup((reference.get("precision") or {}).get("precision")) not in FLOATS:
        return "the reference engine is not an unquantized (FP16) engine"
    c_src, r_src = candidate.get("source") or {}, reference.get("source") or {}
    if c_src.get("weights_sha256") and r_src.get("weights_sha256") and c_src["weights_sha256"] != r_src["weights_sha256"]:
        return "the reference engine was built from another model (different weights hash)"
    cg, rg = candidate.get("gpu") or {}, reference.get("gpu") or {}
    if (cg.get("name"), cg.get("compute_capability")) != (rg.get("name"), rg.get("compute_capability")):
        return f"the reference engine was timed on {rg.get('name')}, this build on {cg.get('name')}"
    if (candidate.get("tensorrt") or {}).get("version") != (reference.get("tensorrt") or {}).get("version"):
        return "the reference engine was built with another TensorRT version"
    if ref_perf["latency"].get("shapes") != candidate["performance"]["latency"].get("shapes"):
        return "the engines were timed at different shapes (different profiles)"
    return None


def compare_with_reference(candidate: dict, reference: dict, tolerance: float = 0.05) -> dict:
    """Compare two engine manifests' latencies; ``warning`` is set when the quantized one is slower.

    ``candidate`` needs ``precision``, ``performance.latency``, ``gpu``, ``tensorrt``, ``source``
    (the same keys an engine manifest has).
    """
    why = _why_not_comparable(candidate, reference)
    if why:
        return {"comparable": False, "reason": why, "warning": None}
    c = candidate["performance"]["latency"]["median_ms"]
    r = reference["performance"]["latency"]["median_ms"]
    ratio = c / r if r > 0 else float("inf")
    prec = (candidate.get("precision") or {}).get("precision")
    out = {"comparable": True, "reference_median_ms": r, "median_ms": c, "speedup_vs_reference": round(r / c, 3) if c else None,
           "warning": None}
    if prec in QUANTIZED and ratio > 1 + tolerance:
        c_shapes = candidate["performance"]["latency"].get("shapes") or {}
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(c_shapes.items())) or "the opt shapes"
        out["warning"] = (
            f"the {prec} engine is {ratio:.2f}x slower than the FP16 engine of the same model on "
            f"{(candidate.get('gpu') or {}).get('name')} ({c:.3f} ms vs {r:.3f} ms at {shapes}): Q/DQ placement is "
            "probably blocking TensorRT's fusions (Q/DQ on residual adds, around normalizations or softmax, or on GEMM "
            "outputs); compare layers.json of both engines"
        )
    return out
