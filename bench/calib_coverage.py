"""What a PyTorch-hook calibration could cover of what trtforge's ONNX calibration watches.

Reads only the exported graph (trtforge.onnx_io.load_graph: no weight bytes) and the Hugging Face
model's module tree built on the meta device (no weights), never runs either. For each watched
tensor (every GEMM activation input and attention BMM input; the same set for every recipe, since
ranges serve any later recipe), it says whether the tensor is the input of a MatMul/Gemm whose
weight initializer is an ``nn.Linear``'s weight by state-dict name (``<module>.weight``): what
forward hooks on the model's Linear modules would observe, with the statistics mapped back to the
graph by name. The rest (attention BMMs, a tied lm_head, GEMMs whose weight the exporter renamed)
would need a graph-to-module mapping of their own.

    python bench/calib_coverage.py /work/artifacts/gemma3-fp32 /work/models/gemma3-270m
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path


def linear_names(model_dir: Path) -> set[str]:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--json", type=Path, help="write the counts here")
    a = ap.parse_args()

    from trtforge.calibration.patterns import attention_bmm_inputs, find_gemms, watched_tensors
    from trtforge.calibration.recipe import get_preset
    from trtforge.graph import GraphIndex
    from trtforge.onnx_io import load_graph

    model = load_graph(a.export / "model.onnx")
    idx = GraphIndex(model)
    watched = watched_tensors(model, idx)
    gemms = find_gemms(model, idx)
    bmm = attention_bmm_inputs(model, idx)
    linears = linear_names(a.model_dir)
    mapped_weight = {g.weight for g in gemms if g.weight.removesuffix(".weight") in linears}
    # a tensor a hook sees: the input of a GEMM whose weight is a Linear's (hooks see module inputs)
    by_tensor: dict[str, list] = {}
    for g in gemms:
        by_tensor.setdefault(g.act, []).append(g)

    def kind(t: str) -> str:
        gs = by_tensor.get(t, [])
        if gs and all(g.weight in mapped_weight for g in gs):
            return "Linear input (hook-mappable)"
        if gs and any(g.weight in mapped_weight for g in gs):
            return "GEMM input, some consumers not a Linear"
        if gs:
            return "GEMM input, weight not a Linear by name: " + ", ".join(sorted({g.weight for g in gs}))[:80]
        return "attention BMM input" if t in bmm else "other"

    kinds = {t: kind(t) for t in watched}
    result = {"export": str(a.export), "watched": len(watched), "gemms": len(gemms),
              "attention_bmm_inputs": len(bmm), "linear_modules": len(linears),
              "kinds": dict(Counter(kinds.values())), "recipes": {}}
    for name in ("fp8", "int8-sq"):
        r = get_preset(name)
        quantized = [g for g in gemms if not any(fnmatch.fnmatch(g.node, p) or fnmatch.fnmatch(g.weight, p) for p in r.exclude)]
        used = {g.act for g in quantized} | (set(bmm) if r.quantize_attention_bmm else set())
        result["recipes"][name] = {
            "watched": len(watched),
            "scales_used": len(used),
            "scales_used_hook_mappable": sum(kinds[t].startswith("Linear input") for t in used),
            "gemms_quantized": len(quantized),
            "gemms_quantized_weight_is_linear": sum(g.weight in mapped_weight for g in quantized),
        }
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
