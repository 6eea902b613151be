"""--per-layer: which quantized layers contribute most of the error, by quantizing one at a time.

In:  the candidate's quantization manifest (recipe, float upstream, quantized nodes), its saved
     activation ranges (``ranges.json``), the reference's outputs on the evaluation batches.
Out: the ``per_layer`` section of report.json: for every quantized GEMM, the error of the task
     output (logits or last_hidden_state) when only that GEMM is quantized, its share of the
     summed excess error, a ranking, and suggested exclusions.

Method: the float upstream model is run once (baseline: what the candidate would compute with
nothing quantized, e.g. FP32 vs the FP16 reference), then once per quantized node with only
that node quantized (the quantize stage's ``quantize_model(..., only={node})``, with the same
recipe and ranges, so smoothing of that node's group is included). A node's excess noise is its
noise power minus the baseline's; quantization noise of independent layers adds roughly
linearly, so shares of the sum rank the layers. Runs on the first ``per_layer_samples`` texts.

With prompts (task-level parity), :func:`rank_layers_by_task` ranks the same single-layer
models by what they do to one category (the chosen one, else the worst): each continues that
category's prompts greedily, and its agreement with the reference's continuations (and the mean
number of tokens before the first divergence) is compared with the float baseline's. Layers
that lose the most agreement, then the most tokens, come first (``per_layer.task_ranking``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from trtforge import metrics as M
from trtforge.artifacts import OnnxArtifact, sha256_file
from trtforge.errors import ParityError
from trtforge.manifest import MANIFEST, Manifest, QuantizationInfo, Upstream
from trtforge.onnx_io import load_model
from trtforge.ort import session
from trtforge.parity.data import EvalData
from trtforge.parity.decode import DecodeLimits, budget, greedy
from trtforge.parity.models import ModelSide
from trtforge.parity.options import ParityOptions
from trtforge.parity.prompts import PromptSet
from trtforge.parity.tasks import encode_prompts, eos_ids, first_divergence
from trtforge.requantize import QuantizeOne, layer_quantizer
from trtforge.vocab import Task

log = logging.getLogger(__name__)

METHOD = "quantize one layer at a time"
SUGGEST_RULE = ("layers whose share is at least twice the average, in rank order, until they cover half of the "
                "error; at most 10 % of the quantized layers")
RANGES_FILE = "ranges.json"  # what the quantize stage saves when its manifest does not name the file


def _quantization_home(cand: ModelSide) -> tuple[Path, Manifest, QuantizationInfo]:
    """The folder and manifest of the quantize stage's output: the candidate itself, or (for a
    build, which carries the quantization record but not the ranges) the artifact it came from."""
    quantized = [(f, m, m.quantization) for f, m in cand.lineage if m.quantization is not None]
    if not quantized:
        raise ParityError("--per-layer needs a quantized candidate, and this one has no quantization in its manifest",
                          "pass the folder written by 'trtforge quantize' (or a build of it)")
    for folder, manifest, q in quantized:
        if _ranges_path(folder, q).is_file():
            return folder, manifest, q
    return quantized[-1]


def _ranges_path(folder: Path, q: QuantizationInfo) -> Path:
    return folder / (q.get("ranges_file") or RANGES_FILE)


def _float_upstream(manifest: Manifest) -> Upstream:
    """The float model the quantize stage started from (its manifest's origin)."""
    up = manifest.origin
    if up is None or not (up.folder / MANIFEST).is_file():
        raise ParityError(f"--per-layer re-quantizes the float model the candidate came from, and "
                          f"{up.path if up else None} is missing", "keep the export folder the candidate was quantized from")
    return up


def preflight(cand: ModelSide) -> None:
    """Fail before any inference when --per-layer cannot run for this candidate."""
    folder, manifest, q = _quantization_home(cand)
    _float_upstream(manifest)
    quantizer(folder, manifest, q)


def quantizer(folder: Path, manifest: Manifest, q: QuantizationInfo) -> QuantizeOne:
    """``f(float_model, node)`` -> the float model with only ``node`` quantized, as the
    candidate's recipe and saved ranges quantize it: the quantize stage's implementation,
    reached through the core hook trtforge.requantize (parity never imports calibration)."""
    ranges_path = _ranges_path(folder, q)
    if not ranges_path.is_file():
        raise ParityError(f"--per-layer needs the candidate's saved ranges, and {ranges_path} is missing",
                          "re-run 'trtforge quantize' to write them")
    dtype = q.get("dtype") or (manifest.model.dtype if manifest.model is not None else None)
    return layer_quantizer(q, ranges_path, dims=manifest.dims, dtype=dtype)


def _session(model: Any, tmp: Path):
    """An ORT session for an in-memory model (saved with external data when over 2 GB)."""
    try:
        return session(model.SerializeToString())
    except ValueError:  # protobuf refuses messages over 2 GiB
        path = tmp / "layer.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="layer.onnx.data")
        return session(path)


def _cast(feeds: dict[str, np.ndarray], sess) -> dict[str, np.ndarray]:
    types = {i.name: i.type for i in sess.get_inputs()}
    out = {}
    for k, v in feeds.items():
        if k not in types:
            continue
        t = types[k]
        out[k] = v.astype(np.float16) if t == "tensor(float16)" else v.astype(np.float32) if t == "tensor(float)" else v
    return out


def rank_layers(
    ref: ModelSide, cand: ModelSide, ev: EvalData, ref_outputs: list[dict[str, np.ndarray]], options: ParityOptions
) -> dict[str, Any]:
    """The per_layer section (see module docstring)."""
    folder, manifest, q = _quantization_home(cand)
    nodes = [n for n in q.nodes if n.get("status") == "quantized"]
    output = "last_hidden_state" if ref.task == Task.FEATURE_EXTRACTION else "logits"
    result: dict[str, Any] = {"method": METHOD, "output": output, "num_samples": 0, "baseline_snr_db": None,
                              "layers": [], "suggested_exclusions": [], "suggestion_rule": SUGGEST_RULE}
    if not nodes:
        result["note"] = "the candidate has no quantized layers"
        return result
    up = _float_upstream(manifest)
    up_model_file = OnnxArtifact.open(up.folder).model_path
    want = up.model_hash
    if want and sha256_file(up_model_file) != want:
        raise ParityError(f"the float upstream {up_model_file} changed since the candidate was quantized",
                          "re-run 'trtforge quantize' so the per-layer analysis matches the candidate")
    float_model = load_model(up_model_file, load_external_data=True)

    # The first batches, up to per_layer_samples texts.
    idx, rows = [], 0
    for i, f in enumerate(ev.feeds):
        if rows >= options.per_layer_samples:
            break
        idx.append(i)
        rows += f["input_ids"].shape[0]
    feeds = [ev.feeds[i] for i in idx]
    refs = [np.asarray(ref_outputs[i][output]) for i in idx]  # read once (they may be spilled to disk)
    valids = [M.valid_for(output, r.shape, f, ref.task) for r, f in zip(refs, feeds, strict=True)]
    signal = sum(float(np.square(_sel(r, v)).sum()) for r, v in zip(refs, valids, strict=True))
    result["num_samples"] = rows

    def measure(model: Any, tmp: Path) -> dict[str, Any]:
        """The task output of ``model`` on the subset against the reference's."""
        sess = _session(model, tmp)
        outs = [sess.run([output], _cast(f, sess))[0] for f in feeds]
        triples = list(zip(refs, outs, valids, strict=True))
        noise = sum(float(np.square(_sel(c, v) - _sel(r, v)).sum()) for r, c, v in triples)
        cos = np.concatenate([M.row_cosine(M.valid_rows(r, v), M.valid_rows(c, v)) for r, c, v in triples])
        m = {"noise_total": noise, "snr_db": M.snr_db(signal, noise), "cosine_mean": float(np.nanmean(cos)),
             "kl_mean": None}
        if output == "logits":
            m["kl_mean"] = M.logits_metrics(refs, outs, valids)[0]["kl_mean"]
        return m

    with tempfile.TemporaryDirectory(prefix="trtforge-perlayer-") as tmpdir:
        tmp = Path(tmpdir)
        quantize_one = quantizer(folder, manifest, q)
        base = measure(float_model, tmp)
        result["baseline_snr_db"] = base["snr_db"]
        layers = []
        for n, entry in enumerate(nodes, 1):
            log.info("per-layer %d/%d: %s", n, len(nodes), entry["node"])
            m = measure(quantize_one(float_model, entry["node"]), tmp)
            layers.append({"node": entry["node"], "weight": entry.get("weight"),
                           "noise": max(0.0, m["noise_total"] - base["noise_total"]),
                           "snr_db": m["snr_db"], "cosine_mean": m["cosine_mean"], "kl_mean": m["kl_mean"]})
    total = sum(x["noise"] for x in layers)
    layers.sort(key=lambda x: -x["noise"])
    for rank, x in enumerate(layers, 1):
        x["rank"] = rank
        x["share_pct"] = 100.0 * x["noise"] / total if total > 0 else 0.0
    result["layers"] = [{k: x[k] for k in ("rank", "node", "weight", "share_pct", "noise", "snr_db", "cosine_mean",
                                           "kl_mean")} for x in layers]
    result["suggested_exclusions"] = suggest(layers)
    if total <= 0:
        result["note"] = "quantizing any single layer adds no measurable error on these samples"
    return result


@dataclass(frozen=True)
class _Side:
    """What greedy() reads of a side, for a single-layer model run outside Polygraphy's runners list."""

    role: str
    task: Task
    input_names: list[str]
    dims: Any
    pad_token_id: int


def rank_layers_by_task(ref: ModelSide, cand: ModelSide, prompts: PromptSet, tasks: dict[str, Any], category: str,
                        tokenizer: Any, options: ParityOptions, limits: DecodeLimits) -> dict[str, Any]:
    """``per_layer.task_ranking``: quantized layers ranked by the agreement they cost on ``category``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    folder, manifest, q = _quantization_home(cand)
    nodes = [n for n in q.nodes if n.get("status") == "quantized"]
    rows = [r for r in tasks["prompts"] if r["category"] == category]
    result: dict[str, Any] = {"category": category, "chosen": options.per_layer_category is not None,
                              "num_prompts": len(rows), "candidate_agreement": tasks["categories"][category]["agreement"],
                              "baseline_agreement": None, "baseline_mean_tokens": None, "layers": []}
    if not nodes or not rows:
        result["note"] = "the candidate has no quantized layers" if not nodes else f"no prompts in {category}"
        return result
    up = _float_upstream(manifest)
    float_model = load_model(OnnxArtifact.open(up.folder).model_path, load_external_data=True)
    _, max_prompt, _ = budget(options.max_new_tokens, ref.dims.max_positions, limits)
    subset = PromptSet(prompts.path, tuple(prompts.prompts[r["index"]] for r in rows), prompts.sha256)
    seqs, _ = encode_prompts(tokenizer, subset, max_prompt)
    want = [r["reference_ids"] for r in rows]
    steps = tasks["max_new_tokens"]
    eos = eos_ids(tokenizer)

    def score(model: Any, tmp: Path) -> tuple[float, float]:
        sess = _session(model, tmp)
        side = _Side("per-layer", ref.task, [i.name for i in sess.get_inputs()], ref.dims, ref.pad_token_id)
        with OnnxrtRunner(sess, name="per-layer") as runner:
            got = greedy(runner, side, seqs, max_new_tokens=steps, eos=eos, batch_size=options.prompt_batch_size)
        divs = [first_divergence(w, g) for w, g in zip(want, got, strict=True)]
        agree = sum(d is None for d in divs) / len(divs)
        mean = sum(len(w) if d is None else d for w, d in zip(want, divs, strict=True)) / len(divs)
        return agree, mean

    with tempfile.TemporaryDirectory(prefix="trtforge-perlayer-") as tmpdir:
        tmp = Path(tmpdir)
        quantize_one = quantizer(folder, manifest, q)
        base_agree, base_mean = score(float_model, tmp)
        layers = []
        for n, entry in enumerate(nodes, 1):
            log.info("per-layer (%s) %d/%d: %s", category, n, len(nodes), entry["node"])
            agree, mean = score(quantize_one(float_model, entry["node"]), tmp)
            layers.append({"node": entry["node"], "weight": entry.get("weight"), "agreement": agree,
                           "mean_tokens_before_divergence": mean, "agreement_lost": base_agree - agree,
                           "tokens_lost": base_mean - mean})
    layers.sort(key=lambda x: (-x["agreement_lost"], -x["tokens_lost"]))
    for rank, x in enumerate(layers, 1):
        x["rank"] = rank
    result.update(baseline_agreement=base_agree, baseline_mean_tokens=base_mean, layers=layers,
                  rule="largest agreement lost against the float baseline first, then most tokens lost")
    if all(x["agreement_lost"] <= 0 and x["tokens_lost"] <= 0 for x in layers):
        result["note"] = f"quantizing any single layer changes no continuation of {category} on these prompts"
    return result


def suggest(layers: list[dict[str, Any]]) -> list[str]:
    """See SUGGEST_RULE; ``layers`` sorted by share, largest first."""
    if not layers:
        return []
    average = 100.0 / len(layers)
    cap = max(1, math.floor(0.1 * len(layers)))
    picked, covered = [], 0.0
    for x in layers:
        if covered >= 50.0 or len(picked) >= cap or x["share_pct"] < 2 * average:
            break
        picked.append(x["node"])
        covered += x["share_pct"]
    return picked


def _sel(a: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a[np.broadcast_to(valid, a.shape)] if valid is not None else a.reshape(-1)
