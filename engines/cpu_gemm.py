"""CPU target: every integer GEMM of the optimized model checked on its own, against exact math.

In:  the optimized model ONNX Runtime wrote (``MatMulIntegerToFloat``, ``MatMulNBits`` nodes), the
     session options it is loaded with, the self-check's inputs and a scratch folder.
Out: one record per integer GEMM: its weight, shape, the largest difference between what ONNX
     Runtime's kernel returned and the exact result of the same integers and scales (float64),
     relative to the largest exact output, and whether it is within the tolerance.

Why per GEMM: the end-to-end self-check compares outputs after 18-24 layers, where a 1e-7
difference that moves one activation across a rounding boundary of a later QuantizeLinear grows
into a few percent (docs/engines.md, "rounding flips"): it cannot tell a kernel that saturates
(MLAS's U8S8 on CPUs without VNNI, the 12.8% of issue 16) from flips. Fed the activations it
actually sees, a GEMM that sums exactly is off by float32 rounding only (~1e-7 of its output
range), one that saturates by percent; so the build falls back to a float GEMM for exactly the
GEMMs whose kernel cannot be trusted on this model (engines/cpu.py).

How: a copy of the optimized graph (weights read through a hard link of its data file, never
loaded whole) with each GEMM's activation input and output added as graph outputs, run once with
the artifact's own session options; then each GEMM's exact output is computed in numpy from the
node's integer weights, zero points and scales, one weight at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from trtforge.onnx_io import Weights, load_graph, write_model

# largest error of a kernel that sums exactly: float32 rounding of the result (integer GEMMs,
# one multiply after an exact int32 sum) or of a K-term float sum (MatMulNBits, float activations)
TOLERANCE = {"MatMulIntegerToFloat": 1e-4, "MatMulNBits": 1e-3}
CHECKED_OPS = tuple(TOLERANCE)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def integer_gemms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The optimized graph's fused integer GEMMs whose weights are constant (the ones a kernel runs)."""
    inits = {t.name for t in model.graph.initializer}
    k = {"MatMulIntegerToFloat": 1, "MatMulNBits": 1}
    return [n for n in model.graph.node if n.op_type in k and len(n.input) > k[n.op_type] and n.input[k[n.op_type]] in inits]


def _opt(node: onnx.NodeProto, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def exact_matmul_integer_to_float(node: onnx.NodeProto, a: np.ndarray, value) -> np.ndarray:
    """``(A - za)·sa @ (B - zb)·sb + bias`` in float64 (``value(name)`` reads an initializer)."""
    b = value(node.input[1]).astype(np.float64)
    sa = value(node.input[2]).astype(np.float64)
    sb = value(node.input[3]).astype(np.float64)
    za = value(n).astype(np.float64) if (n := _opt(node, 4)) else 0.0
    zb = value(n).astype(np.float64) if (n := _opt(node, 5)) else 0.0
    y = (a.astype(np.float64) - za) @ (b - zb)
    y = y * (sa * sb)
    if (n := _opt(node, 6)) is not None:
        y = y + value(n).astype(np.float64)
    return y


def dequantize_nbits(node: onnx.NodeProto, value) -> np.ndarray:
    """The float [K, N] weight a MatMulNBits node (4 bits, blocked) holds, in float64."""
    at = _attrs(node)
    k, n, bits, block = int(at["K"]), int(at["N"]), int(at.get("bits", 4)), int(at["block_size"])
    if bits != 4:
        raise ValueError(f"MatMulNBits with {bits} bits is not checked")
    blob = value(node.input[1]).reshape(n, -1).astype(np.uint8)
    q = np.empty((n, blob.shape[1] * 2), np.float64)
    q[:, 0::2] = blob & 0x0F
    q[:, 1::2] = blob >> 4
    nblocks = -(-k // block)
    q = q[:, : nblocks * block].reshape(n, nblocks, block)
    scales = value(node.input[2]).astype(np.float64).reshape(n, nblocks)
    zp_name = _opt(node, 3)
    if zp_name is None:
        zp = np.full((n, nblocks), 8.0)
    else:
        z = value(zp_name)
        if z.dtype == np.uint8:
            z = z.reshape(n, -1)
            zp = np.empty((n, z.shape[1] * 2), np.float64)
            zp[:, 0::2] = z & 0x0F
            zp[:, 1::2] = z >> 4
            zp = zp[:, :nblocks]
        else:  # float zero points: already in the weight's scale
            zp = z.astype(np.float64).reshape(n, nblocks)
    w = (q - zp[:, :, None]) * scales[:, :, None]
    return w.reshape(n, nblocks * block)[:, :k].T


def exact_matmul_nbits(node: onnx.NodeProto, a: np.ndarray, value) -> np.ndarray:
    if _opt(node, 4) is not None:  # g_idx (act order): not produced by trtforge's INT4 graphs
        raise ValueError("MatMulNBits with g_idx is not checked")
    y = a.astype(np.float64) @ dequantize_nbits(node, value)
    if (n := _opt(node, 5)) is not None:
        y = y + value(n).astype(np.float64)
    return y


EXACT = {"MatMulIntegerToFloat": exact_matmul_integer_to_float, "MatMulNBits": exact_matmul_nbits}


def weight_name(node: onnx.NodeProto) -> str:
    return node.input[1]


def check_gemms(built: Path, session_fn, feeds: dict[str, np.ndarray], work: Path) -> list[dict]:
    """Run the optimized model at ``built`` once (``session_fn(path)`` opens it with the artifact's
    options) with each integer GEMM's activation and output exposed; compare each GEMM with its
    exact result. Returns one record per GEMM (module docstring); an empty list without any."""
    model = load_graph(built)
    gemms = integer_gemms(model)
    if not gemms:
        return []
    work.mkdir(parents=True, exist_ok=True)
    have = {o.name for o in model.graph.output}
    inits = {t.name: t for t in model.graph.initializer}
    names: list[str] = []
    for g in gemms:
        # the activation, the output, and any scale / zero point computed by a node rather than
        # stored (ONNX Runtime inserts Casts of FP16 scales, e.g. InsertedPrecisionFreeCast_*)
        computed = [t for t in g.input[1:] if t and t not in inits]
        for t in (g.input[0], g.output[0], *computed):
            if t not in have and t not in names:
                names.append(t)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names)
    weights = Weights(model, built.parent)
    path = work / "gemm-probe.onnx"
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    write_model(probe, path, Weights(probe, built.parent), external=external, link=True)
    del probe
    sess = session_fn(path)
    wanted = [o.name for o in sess.get_outputs()]
    got = dict(zip(wanted, sess.run(wanted, feeds), strict=True))
    del sess

    def value(name: str) -> np.ndarray:
        return weights.array(inits[name]) if name in inits else np.asarray(got[name])

    records = []
    for g in gemms:
        a, y = got[g.input[0]], got[g.output[0]]
        rec = {"node": g.name or g.output[0], "op": g.op_type, "weight": weight_name(g),
               "shape": [int(a.shape[-1]), int(y.shape[-1])], "tolerance": TOLERANCE[g.op_type]}
        try:
            ref = EXACT[g.op_type](g, a, value)
        except ValueError as exc:
            records.append({**rec, "max_rel_err": None, "passed": True, "note": str(exc)})
            continue
        scale = max(float(np.abs(ref).max()), 1e-12)
        d = np.abs(np.asarray(y, np.float64) - ref)
        err = float(d.max()) / scale
        rec.update(max_rel_err=err, elements_off=int((d > TOLERANCE[g.op_type] * scale).sum()),
                   passed=bool(np.isfinite(err) and err <= TOLERANCE[g.op_type]))
        records.append(rec)
        del ref, d
    shutil.rmtree(work, ignore_errors=True)  # the probe and its hard link of the data file
    return records


def summary(records: list[dict]) -> dict:
    """The manifest's ``build.gemm_check``: counts, the worst GEMM, the ones that failed."""
    errs = [r for r in records if r.get("max_rel_err") is not None]
    worst = max(errs, key=lambda r: r["max_rel_err"], default=None)
    return {"checked": len(errs), "failed": [r for r in records if not r["passed"]],
            "worst": worst, "ops": sorted({r["op"] for r in records}),
            "what": "each integer GEMM of the optimized model on the activations it sees (self-check inputs) "
                    "against the exact result of its own integers and scales; max error / max |exact output|"}
