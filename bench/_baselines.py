"""Baselines for bench/quantize.py: ONNX Runtime's quantize_static and Model Optimizer's ONNX PTQ."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _calib_feeds(src: Path, calib: Path, n: int = 64):
    """The same calibration text trtforge gets, tokenized the same way (sentences / windows)."""
    from trtforge.artifacts import OnnxArtifact
    from trtforge.inputs import make_feeds
    from trtforge.textdata import build_samples, load_tokenizer

    art = OnnxArtifact.open(src)
    d = art.manifest["dims"]
    mode = "windows" if art.manifest["source"]["family"] == "decoder" else "sentences"
    s = build_samples([calib], load_tokenizer(art.path), mode=mode, num_samples=n if mode == "sentences" else 128,
                      seq_len=128 if mode == "sentences" else 256, seed=0, max_positions=d["max_positions"],
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
    return art, feeds


def ort_quantize_static(src: str, out: str, calib: str, method: str) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    art, feeds = _calib_feeds(Path(src), Path(calib))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "model.onnx"
    quantize_static(
        str(art.model_path), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        calibrate_method=CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return dst


def modelopt_quantize(src: str, out: str, calib: str, mode: str) -> Path:
    from modelopt.onnx.quantization import quantize

    from trtforge.artifacts import OnnxArtifact

    art, feeds = _calib_feeds(Path(src), Path(calib))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "model.onnx"
    data = {k: np.concatenate([f[k] for f in feeds[:1]]) for k in feeds[0]}
    quantize(onnx_path=str(OnnxArtifact.open(src).model_path), quantize_mode=mode, calibration_data=data,
             output_path=str(dst), calibration_method={"int4": "awq_clip"}.get(mode, "max"))
    return dst
