"""Range collection: run the float ONNX model on calibration samples, keep streaming statistics.

In:  an ONNX file, the names of the tensors to watch (GEMM inputs), calibration Samples.
Out: ActivationRanges, saved as ``ranges.json`` (statistics) plus ``ranges.samples.npz`` (the
     bounded token-row reservoirs; numpy arrays, no pickle). Reusable with ``--ranges`` to
     re-quantize without running calibration again.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from trtforge.artifacts import read_json, sha256_json, write_json
from trtforge.calibration.stats import TensorStats
from trtforge.errors import CalibrationError, InputError
from trtforge.graph import tensor_types
from trtforge.inputs import make_feeds
from trtforge.manifest import ModelDims
from trtforge.onnx_io import EXTERNAL_DATA_THRESHOLD
from trtforge.ort import session
from trtforge.progress import progress
from trtforge.textdata import Samples

log = logging.getLogger(__name__)
RANGES_VERSION = 1


@dataclass
class ActivationRanges:
    model_key: str  # identifies the graph the statistics belong to (tensor names + shapes)
    tensors: dict[str, TensorStats]
    calibration: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        arrays = {f"t{i}": s.sample for i, s in enumerate(self.tensors.values()) if s.sample is not None}
        names = {f"t{i}": n for i, (n, s) in enumerate(self.tensors.items()) if s.sample is not None}
        if arrays:
            npz = path.with_suffix(".samples.npz")
            tmp = npz.with_name(f".{npz.name}.tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(npz)
        write_json(path, {
            "version": RANGES_VERSION,
            "model_key": self.model_key,
            "calibration": self.calibration,
            "meta": self.meta,
            "samples_file": path.with_suffix(".samples.npz").name if arrays else None,
            "samples_index": names,
            "tensors": [s.to_json() for s in self.tensors.values()],
        })
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationRanges:
        path = Path(path)
        d = read_json(path, "ranges file")
        if not isinstance(d, dict) or d.get("version") != RANGES_VERSION or "tensors" not in d:
            raise InputError(f"{path} is not a trtforge ranges file (version {RANGES_VERSION})", "re-run calibration to write one")
        samples: dict[str, np.ndarray] = {}
        if d.get("samples_file"):
            npz = path.parent / d["samples_file"]
            if npz.exists():
                with np.load(npz, allow_pickle=False) as z:
                    samples = {d["samples_index"][k]: z[k] for k in z.files}
        tensors = {t["name"]: TensorStats.from_json(t, samples.get(t["name"])) for t in d["tensors"]}
        return cls(d["model_key"], tensors, d.get("calibration", {}), d.get("meta", {}))

    @property
    def has_samples(self) -> bool:
        return any(s.sample is not None for s in self.tensors.values())


def model_key(model: onnx.ModelProto, watched: list[str]) -> str:
    """A key that changes when the watched tensors or the graph's inputs change."""
    return sha256_json({
        "watched": sorted(watched),
        "inputs": [(i.name, str(i.type)) for i in model.graph.input],
        "nodes": len(model.graph.node),
    })


def batches(samples: Samples, batch_size: int):
    """Group equal-length samples so no batch needs padding (statistics never see pad tokens)."""
    by_len: dict[int, list[int]] = {}
    for i, a in enumerate(samples.ids):
        by_len.setdefault(len(a), []).append(i)
    out = []
    for length in sorted(by_len):
        idx = by_len[length]
        for k in range(0, len(idx), batch_size):
            out.append(idx[k : k + batch_size])
    return out


def collect_ranges(
    model: onnx.ModelProto,
    watched: list[str],
    samples: Samples,
    dims: ModelDims | dict,
    *,
    batch_size: int = 8,
    bins: int = 2048,
    keep: int = 512,
    seed: int = 0,
    providers: list[str] | None = None,
    per_tensor: set[str] | None = None,
) -> ActivationRanges:
    """``per_tensor`` tensors (attention BMM inputs, whose last axis may be the sequence) get
    per-tensor statistics only and no kept rows."""
    if not samples.ids:
        raise CalibrationError("no calibration samples", "pass calibration text")
    types = tensor_types(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in watched:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    input_names = [i.name for i in model.graph.input]
    float_dtype = np.float16 if any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input) else np.float32
    with tempfile.TemporaryDirectory(prefix="trtforge-calib-") as tmp:
        path = Path(tmp) / "probe.onnx"
        large = probe.ByteSize() > EXTERNAL_DATA_THRESHOLD if probe.ByteSize() < 2**31 else True
        onnx.save_model(probe, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location="probe.data")
        del probe
        sess = session(path, providers=providers)
    stats: dict[str, TensorStats] = {}
    groups = batches(samples, batch_size)
    for bi, idx in enumerate(progress(groups, len(groups), "calibration")):
        ids = np.stack([samples.ids[i] for i in idx])
        tt = np.stack([samples.token_type_ids[i] for i in idx]) if samples.token_type_ids else None
        outs = sess.run(watched, make_feeds(ids, input_names, dims, float_dtype, tt))
        for name, x in zip(watched, outs):
            st = stats.get(name)
            if st is None:
                flat = per_tensor is not None and name in per_tensor
                st = stats[name] = TensorStats(name, 0 if flat else int(x.shape[-1]), bins=bins,
                                               keep=0 if flat else keep, seed=seed)
            try:
                st.update(x)
            except FloatingPointError:
                raise CalibrationError(
                    f"activation {name} is non-finite (inf or NaN) on calibration batch {bi}",
                    "the model overflows on this data: calibrate the fp32 export, or check the weights",
                ) from None
    # no timings here: ranges.json is content, identical for identical inputs (timings go to manifests)
    meta = {
        "batches": len(groups),
        "batch_size": batch_size,
        "histogram_bins": bins,
        "kept_rows_per_tensor": keep,
        "providers": list(sess.get_providers()),
    }
    return ActivationRanges(model_key(model, watched), stats, samples.describe(), meta)
