"""Check an exported graph against the PyTorch model it came from.

In: the torch wrapper, the ONNX file, real-token cases. Out: per case and output the max and
mean absolute error on valid (unpadded) positions, the largest reference magnitude, and pass
or fail against a tolerance scaled by that magnitude.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtforge.errors import ValidationError
from trtforge.inputs import valid_mask_for
from trtforge.onnx_io import load_graph
from trtforge.ort import NO_PREPACKING, graph_session
from trtforge.vocab import Precision

# Tolerance on max|ort - torch| / max(1, max|torch|), on valid positions.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class Case:
    name: str
    feeds: dict[str, np.ndarray]


def masked_errors(ref: np.ndarray, got: np.ndarray, valid: np.ndarray | None) -> dict[str, float]:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    if ref.shape != got.shape:
        raise ValidationError(f"output shape {got.shape} differs from PyTorch's {ref.shape}", "report this export bug")
    diff = np.abs(ref - got)
    if valid is not None:
        valid = np.broadcast_to(valid, ref.shape)
        diff = diff[valid]
        ref = ref[valid]
    if diff.size == 0:
        return {"max_abs_err": 0.0, "mean_abs_err": 0.0, "max_abs_ref": 0.0, "finite": True}
    finite = bool(np.isfinite(got if valid is None else got[np.broadcast_to(valid, got.shape)]).all())
    return {
        "max_abs_err": float(np.nanmax(diff)) if finite else float("inf"),
        "mean_abs_err": float(np.nanmean(diff)) if finite else float("inf"),
        "max_abs_ref": float(np.abs(ref).max()),
        "finite": finite,
    }


def _session(path: Path, dtype: str):
    """A CPU session that holds the weights about once: the graph is read without its weights
    (those in model.onnx itself become references into it, like external data), so ONNX Runtime
    maps or reads each tensor from its file instead of parsing the whole file and copying every
    tensor out of it; no prepacked second copy of the GEMM weights. For an FP16 graph, ONNX
    Runtime's CPU kernels need FP32 for most ops and its constant folding would keep an FP32 copy
    of every weight beside the FP16 one: without graph optimizations the casts run per call and
    their outputs are freed (no memory arena)."""
    half = dtype == Precision.FP16
    return graph_session(load_graph(path), base_dir=path.parent, config=NO_PREPACKING,
                         optimization="ORT_DISABLE_ALL" if half else None, arena=not half)


def validate(
    onnx_path: Path,
    cases: list[Case],
    expected: dict[int, dict[str, np.ndarray]] | Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    output_names: list[str],
    dtype: str,
    tolerance: float | None = None,
) -> dict:
    """Compare ONNX Runtime (CPU) with PyTorch's outputs on each case; raise ValidationError beyond tolerance.

    ``expected``: PyTorch's outputs by ``id(case.feeds)`` (computed before the model was freed),
    or a function computing them.
    """
    tol = tolerance if tolerance is not None else TOLERANCE[dtype]
    t0 = time.perf_counter()
    sess = _session(Path(onnx_path), dtype)
    float_in = {i.name: i.type for i in sess.get_inputs()}
    report: dict = {"tolerance": tol, "metric": "max_abs_err / max(1, max_abs_ref) on valid positions", "cases": []}
    worst = 0.0
    for case in cases:
        feeds = {
            k: (v.astype(np.float16) if float_in.get(k) == "tensor(float16)" else v) for k, v in case.feeds.items()
        }
        got = dict(zip(output_names, sess.run(output_names, feeds)))
        ref = expected[id(case.feeds)] if isinstance(expected, dict) else expected(case.feeds)
        outs = {}
        for name in output_names:
            valid = valid_mask_for(name, ref[name].shape, case.feeds)
            e = masked_errors(ref[name], got[name], valid)
            e["normalized_err"] = e["max_abs_err"] / max(1.0, e["max_abs_ref"])
            worst = max(worst, e["normalized_err"])
            outs[name] = e
        report["cases"].append(
            {"name": case.name, "shapes": {k: list(v.shape) for k, v in case.feeds.items()}, "outputs": outs}
        )
    report["max_normalized_err"] = worst
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["passed"] = bool(worst <= tol)
    if not report["passed"]:
        bad = [
            (c["name"], n, o["normalized_err"])
            for c in report["cases"]
            for n, o in c["outputs"].items()
            if not o["normalized_err"] <= tol
        ]
        case, out, err = bad[0]
        raise ValidationError(
            f"exported graph differs from PyTorch: output {out!r} in case {case!r} has normalized error {err:.3g} "
            f"(tolerance {tol:g})",
            "this is an export bug for this architecture; report it with config.json, or pass --no-validate to keep the file anyway",
        )
    return report
