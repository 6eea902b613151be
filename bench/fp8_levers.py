"""Zero-byte levers of an INT8/FP8 recipe, measured as the budget search measures its GPTQ lever.

One calibration pass (the budget's ranges part, with the GEMM inputs' Hessians), then each
variant's fully quantized graph (calibration/budget_graph.build_switched, every switch off) on the
budget's held-out part: the expected perplexity change from the KL (decoders) or the mean
embedding cosine (encoders), with the one-sided 95% bound the budget is judged by. What a budget
search on the same data would see as its "every GEMM quantized" starting point.

    python bench/fp8_levers.py [--model gemma3|minilm] [--variant 'fp8' --variant 'fp8:weight_rounding=gptq,gptq_act_order=true' ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine  # noqa: E402,I001
from budget import CALIB, GEMMA, export_minilm  # noqa: E402

DEFAULT = ["fp8", "fp8:weight_rounding=gptq", "fp8:weight_rounding=gptq,gptq_act_order=true",
           "fp8:weight_rounding=gptq,gptq_damp=0.001", "fp8:weight_rounding=gptq,gptq_damp=0.1"]


def parse(spec: str):
    from trtforge.calibration import get_preset

    name, _, rest = spec.partition(":")
    changes = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            changes[k] = json.loads(v)
        except json.JSONDecodeError:
            changes[k] = v
    return get_preset(name).replace(**changes) if changes else get_preset(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["gemma3", "minilm"], default="gemma3")
    ap.add_argument("--variant", action="append")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    variants = args.variant or DEFAULT

    from trtforge.artifacts import OnnxArtifact
    from trtforge.calibration.budget import split_held_out
    from trtforge.calibration.budget_eval import HeldOut, mapped_session
    from trtforge.calibration.budget_graph import build_switched
    from trtforge.calibration.budget_spec import parse_budget
    from trtforge.calibration.collect import collect_ranges
    from trtforge.calibration.patterns import attention_bmm_inputs, watched_tensors
    from trtforge.graph import GraphIndex, inline_identity_initializers
    from trtforge.onnx_io import Weights, load_graph
    from trtforge.ort import release_memory
    from trtforge.textdata import build_samples, load_tokenizer
    from trtforge.vocab import Family

    art = OnnxArtifact.open(GEMMA if args.model == "gemma3" else export_minilm())
    budget = parse_budget("perplexity=1%" if args.model == "gemma3" else "embedding_cosine=0.999")
    base = parse(variants[0])
    dims = art.dims
    model = load_graph(art.model_path)
    weights = Weights(model, art.path)
    inline_identity_initializers(model, weights)
    idx = GraphIndex(model, weights)
    watched = watched_tensors(model, idx)
    bmm = set(attention_bmm_inputs(model, idx))
    mode = "windows" if art.manifest.source.family == Family.DECODER else "sentences"
    samples = build_samples(CALIB, load_tokenizer(art.path), mode=mode, num_samples=base.num_samples,
                            seq_len=base.seq_len, seed=base.seed, max_positions=dims.max_positions,
                            vocab_size=dims.vocab_size, text_field=base.text_field)
    samples, held = split_held_out(samples)
    t = time.perf_counter()
    ranges = collect_ranges(model, watched, samples, dims, batch_size=base.batch_size, bins=base.histogram_bins,
                            keep=base.keep_tokens, seed=base.seed, per_tensor=bmm, base_dir=art.path,
                            hessians={n for n in watched if n not in bmm})
    calib_s = time.perf_counter() - t
    del idx, model, weights
    ev = HeldOut(held, dims, art.manifest.source.task, budget, int(dims.vocab_size or 0), int(dims.hidden_size or 0))
    ev.set_reference(art.model_path)
    scratch = Path(os.environ.get("TRTFORGE_BENCH_OUT", REPO / "bench" / "out")) / "fp8-levers"
    rows = []
    for spec in variants:
        recipe = parse(spec)
        t = time.perf_counter()
        sw = build_switched(art, recipe, ranges, dims, "auto" if recipe.dtype == "auto" else recipe.dtype, scratch)
        build_s = time.perf_counter() - t
        sess = mapped_session(sw.path, None)
        v = ev.value(sess, {})
        del sess
        release_memory()
        shutil.rmtree(scratch, ignore_errors=True)
        row = {"variant": spec, "value": v.point, "bound": v.bound, "se": v.se, "observed": v.observed,
               "build_s": build_s}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"machine": machine(), "model": args.model, "budget": budget.text, "held_out_samples": len(held.ids),
           "held_out_tokens": held.num_tokens, "calibration_s": calib_s,
           "what": "every GEMM quantized, measured on the budget's held-out part (value: expected perplexity "
                   "change % from the KL for a decoder, mean embedding cosine for an encoder)", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
