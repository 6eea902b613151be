"""Baselines for bench/quantize.py: ONNX Runtime's quantize_static and Model Optimizer's ONNX PTQ.

The parent (the project's environment) writes the calibration feeds to an .npz and the GEMM
scope to a JSON file; each baseline then runs in its own process, under its own interpreter:

    python bench/_baselines.py ort      SRC.onnx OUT_DIR FEEDS.npz SCOPE.json minmax|entropy|percentile
    python bench/_baselines.py modelopt SRC.onnx OUT_DIR FEEDS.npz SCOPE.json int8|fp8|int4-awq_clip|int4-awq_lite|...

The child imports only numpy, onnx and the tool (no trtforge), so Model Optimizer can live in a
virtual environment of its own. It prints one JSON line: the output path, the seconds from
process start (imports included) and the peak RSS (VmHWM) of the process.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

T0 = time.perf_counter()


def calib_feeds(src: Path, calib: list[Path], n: int, seq_len: int = 256) -> tuple[list[dict], dict]:
    """The calibration samples trtforge builds for this artifact (same windows / sentences, same seed).

    Needs trtforge: called by the parent, which saves them with save_feeds().
    """
    from trtforge.artifacts import OnnxArtifact
    from trtforge.inputs import make_feeds
    from trtforge.textdata import build_samples, load_tokenizer

    art = OnnxArtifact.open(src)
    d = art.manifest["dims"]
    mode = "windows" if art.manifest["source"]["family"] == "decoder" else "sentences"
    s = build_samples(calib, load_tokenizer(art.path), mode=mode, num_samples=n,
                      seq_len=128 if mode == "sentences" else seq_len, seed=0, max_positions=d["max_positions"],
                      vocab_size=d["vocab_size"])
    names = [i["name"] for i in art.inputs]
    # onnxruntime's histogram calibrators need one shape for every batch: right-pad sentences
    # to the longest (with their attention mask), as a user of quantize_static would.
    width = max(len(x) for x in s.ids)
    feeds = []
    for i, ids in enumerate(s.ids):
        tt = s.token_type_ids[i] if s.token_type_ids else np.zeros_like(ids)
        pad = width - len(ids)
        f = make_feeds(np.pad(ids, (0, pad))[None], names, d, np.float32, np.pad(tt, (0, pad))[None])
        f["attention_mask"] = np.pad(np.ones(len(ids), np.int64), (0, pad))[None]
        feeds.append(f)
    return feeds, {"mode": mode, "samples": len(s.ids), "tokens_per_sample": width, "notes": list(s.notes)}


def save_feeds(feeds: list[dict], path: Path) -> None:
    np.savez(path, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})


def gemm_scope(model_path: Path, exclude_globs: tuple[str, ...] = ("lm_head", "pooler", "classifier", "score")) -> dict:
    """The GEMMs every tool quantizes: MatMul/Gemm with a weight initializer, minus the heads
    trtforge excludes by default; attention BMMs (two activations) are left unquantized too."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    quant, excl = [], []
    for n in m.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        weighted = any(i in inits for i in n.input[1:2])
        if weighted and not any(g in n.name for g in exclude_globs):
            quant.append(n.name)
        else:
            excl.append(n.name)
    return {"quantize": quant, "exclude": excl}


def _load_feeds(path: str) -> list[dict]:
    z = np.load(path)
    n = len(z[z.files[0]])
    return [{k: z[k][i : i + 1] for k in z.files} for i in range(n)]


def _reader_cls():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds = feeds
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

        def get_first(self):
            return self.feeds[0]

        def rewind(self):
            self.it = iter(self.feeds)

        def __len__(self):
            return len(self.feeds)

    return Reader


ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def ort_quantize_static(src: str, out: str, feeds_npz: str, scope_json: str, method: str) -> tuple[Path, dict]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = _load_feeds(feeds_npz)
    scope = json.loads(Path(scope_json).read_text())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "model.onnx"
    call = dict(quant_format="QDQ", op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=scope["exclude"],
                activation_type="QInt8", weight_type="QInt8", per_channel=True,
                calibrate_method=ORT_METHODS[method],
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                use_external_data_format=True)
    quantize_static(
        src, str(dst), _reader_cls()(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=call["op_types_to_quantize"],
        nodes_to_exclude=scope["exclude"], activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        per_channel=True, calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
        extra_options=call["extra_options"], use_external_data_format=True,
    )
    call["nodes_to_exclude"] = f"{len(scope['exclude'])} nodes (lm_head / heads and attention BMMs)"
    return dst, call


def modelopt_quantize(src: str, out: str, feeds_npz: str, scope_json: str, mode: str) -> tuple[Path, dict]:
    from modelopt.onnx.quantization import quantize

    z = np.load(feeds_npz)
    data = {k: z[k] for k in z.files}
    seq = data[z.files[0]].shape[1]
    shapes = ",".join(f"{k}:1x{seq}" for k in z.files)  # one sample per calibration step
    scope = json.loads(Path(scope_json).read_text())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "model.onnx"
    qmode, _, method = mode.partition("-")
    call = dict(quantize_mode=qmode, calibration_method=method or ("awq_clip" if qmode == "int4" else "entropy"),
                calibration_shapes=shapes, calibration_eps=["cpu"], high_precision_dtype="fp32",
                nodes_to_exclude=[re.escape(n) for n in scope["exclude"]], use_external_data_format=True)
    if qmode != "int4":
        call["op_types_to_quantize"] = ["MatMul", "Gemm"]
        if Path(src).stat().st_size > 2**30:
            # its whole-graph calibration was killed by the OOM killer at 14 GB RSS on Gemma 3 270M
            # (24 GB machine); per-node calibration is its documented option for large models
            call["calibrate_per_node"] = True
    else:
        call["block_size"] = 128
    quantize(onnx_path=src, calibration_data=data, output_path=str(dst), log_level="WARNING", **call)
    call["nodes_to_exclude"] = f"{len(scope['exclude'])} nodes (lm_head / heads and attention BMMs)"
    return dst, call


def _hwm_mib() -> float:
    # VmHWM: this process's peak RSS (ru_maxrss can carry the parent's across exec)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str]) -> int:
    tool, src, out, feeds, scope, method = argv
    fn = {"ort": ort_quantize_static, "modelopt": modelopt_quantize}[tool]
    path, call = fn(src, out, feeds, scope, method)
    versions = {}
    for mod in ("onnxruntime", "modelopt", "onnx"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    print(json.dumps({"path": str(path), "seconds": time.perf_counter() - T0, "peak_rss_mib": _hwm_mib(),
                      "call": call, "versions": versions}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
