# ruff: noqa: E402  (a script: torch loads only after the --prepare branch)
"""GPU check of TensorRT-LLM FP8 checkpoints written by `trtforge export-checkpoint`.

(a) the loader's fused q/k/v and gate/up re-scaling, run on the GPU exactly as TensorRT-LLM's
``rescale_fused_weights`` writes it, against the reader's CPU emulation (bit-identical FP8?);
(b) every quantized Linear replaced by ``torch._scaled_mm`` on the checkpoint's FP8 weight,
weight_scale and input_scale (what ``FP8QDQLinearMethod.apply`` calls) against trtforge's CPU
emulation of the checkpoint (logits cosine, top-1, perplexity change).

    python bench/gpu_trtllm_fp8.py --prepare DIR        # here, CPU: three FP8 checkpoints + rows.npz
    python bench/gpu_trtllm_fp8.py cuda DIR             # on the GPU machine; writes DIR/trtllm_gpu_check.json

Result of the run quoted in docs/trtllm.md: docs/results/trtllm_gpu_check_h200.json.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np


def prepare(d: Path) -> None:
    """Tiny tied LLaMA (hidden 128) -> FP8 quantize (per tensor; per channel) -> checkpoints."""
    from trtforge.calibration import quantize
    from trtforge.engines.trtllm import CheckpointOptions, Fp8Scheme, export_checkpoint
    from trtforge.exporter import DType, ExportOptions, export_onnx
    from trtforge.recipes import load_quant_recipe
    from trtforge.testing.tinymodels import make_model

    repo = Path(__file__).resolve().parent.parent
    calib = [repo / "examples" / "data" / "calib-mpl-lgpl.txt"]
    src = make_model("llama", d / "src", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    exp = export_onnx(src, d / "export", ExportOptions(dtype=DType.FP16), force=True)
    q_t = quantize(exp, load_quant_recipe("fp8", ["weight_granularity=tensor"]), d / "q-tensor", calib=calib, force=True)
    q_c = quantize(exp, load_quant_recipe("fp8"), d / "q-channel", calib=calib, force=True)
    export_checkpoint(q_t, d / "ck-tensor", force=True)
    export_checkpoint(q_c, d / "ck-channel", force=True)
    export_checkpoint(q_c, d / "ck-rowwise", CheckpointOptions(fp8_scheme=Fp8Scheme.ROWWISE), force=True)
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    text = (repo / "examples" / "data" / "eval-gpl-3.0.txt").read_text().split("\n\n")[3:19]
    rows = {f"r{i}": np.asarray(tok(" ".join(t.split()))["input_ids"][:64], np.int64) for i, t in enumerate(text)}
    np.savez(d / "rows.npz", **rows)


if len(sys.argv) > 2 and sys.argv[1] == "--prepare":
    prepare(Path(sys.argv[2]))
    sys.exit(0)

import torch  # noqa: E402

here = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")
dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
out_dir = here
torch.set_num_threads(1)
from trtforge.engines.trtllm._torch import TORCH_DTYPES, LinearSpec, build_model
from trtforge.engines.trtllm.formats import fused_group
from trtforge.engines.trtllm.reader import CheckpointReader
from trtforge.engines.trtllm.verify import compare_logits

rows = [r for r in np.load(here / "rows.npz").values()]
res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
       "capability": list(torch.cuda.get_device_capability(0)) if dev == "cuda" else None}


class ScaledMM(torch.nn.Module):
    def __init__(self, lin, dtype):
        super().__init__()
        self.w = torch.from_numpy(lin.q.astype(np.float32)).to(torch.float8_e4m3fn).to(dev)  # exact: q is on the E4M3 grid
        self.ws = torch.tensor(float(lin.scale), dtype=torch.float32, device=dev) if np.ndim(lin.scale) == 0 else \
            torch.from_numpy(lin.scale.astype(np.float32)).reshape(1, -1).to(dev)
        self.xs = None if lin.input_scale is None else torch.tensor(lin.input_scale, dtype=torch.float32, device=dev)
        self.b = None if lin.bias is None else torch.from_numpy(lin.bias.astype(np.float32)).to(dev)
        self.act, self.dtype = lin.act, dtype

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.act == "static":
            qx = torch.clamp(x2.float() / self.xs, -448, 448).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(qx, self.w.t(), scale_a=self.xs, scale_b=self.ws, out_dtype=self.dtype)
        else:  # dynamic per token, per-channel weights (FP8_PER_CHANNEL_PER_TOKEN)
            sx = torch.clamp(x2.float().abs().amax(dim=-1, keepdim=True) / 448.0, min=1e-12)
            qx = torch.clamp(x2.float() / sx, -448, 448).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(qx, self.w.t(), scale_a=sx, scale_b=self.ws, out_dtype=torch.bfloat16).to(self.dtype)
        if self.b is not None:
            y = y + self.b.to(y.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])


def run(model, dtype):
    model = model.to(dev).to(dtype)
    outs = []
    with torch.inference_mode():
        for r in rows:
            t = torch.from_numpy(r).reshape(1, -1).to(dev)
            outs.append(model(input_ids=t, attention_mask=torch.ones_like(t)).logits.float().cpu().numpy())
    return outs


for name in sorted(p.name for p in here.iterdir() if p.is_dir() and p.name.startswith("ck-")):
    t0 = time.time()
    reader = CheckpointReader(here / name)
    lins = reader.linears()
    entry = {"quant_algo": reader.quant_algo, "dtype": reader.dtype}
    # 1. the loader's fused re-scaling, as linear.py writes it, on this device
    same = total = 0
    if reader.quant_algo == "FP8":
        groups = {}
        for m in lins:
            fg = fused_group(m)
            if fg and lins[m].quantized:
                groups.setdefault(fg[:2], []).append(m)
        for members in groups.values():
            scales = torch.tensor([float(reader.tensor(f"{m}.weight_scale")) for m in members], device=dev)
            s_max = scales.max()
            for m, s_i in zip(members, scales):
                w = reader.tensor(f"{m}.weight").to(dev)
                re = w.to(TORCH_DTYPES[reader.dtype]).mul_(s_i).div_(s_max).to(torch.float8_e4m3fn)
                total += 1
                same += int(torch.equal(re.float().cpu(), torch.from_numpy(lins[m].q.astype(np.float32))))
    entry["fused_rescale_bit_identical"] = f"{same}/{total}"
    # 2. CPU emulation (FakeQuantLinear, float32) vs FP8 GEMMs on this device
    specs = [(m, LinearSpec(s.weight, s.bias, s.pre_quant_scale, s.act, s.input_scale)) for m, s in lins.items() if s.quantized]
    cpu_model = build_model(reader.config, reader.float_params(), specs)
    cpu = []
    with torch.inference_mode():
        for r in rows:
            t = torch.from_numpy(r).reshape(1, -1)
            cpu.append(cpu_model(input_ids=t, attention_mask=torch.ones_like(t)).logits.float().numpy())
    for label, dtype in (("fp32_rest", torch.float32), ("checkpoint_dtype", TORCH_DTYPES[reader.dtype])):
        gmodel = build_model(reader.config, reader.float_params(), specs)
        for m, s in lins.items():
            if s.quantized:
                parent, _, leaf = m.rpartition(".")
                setattr(gmodel.get_submodule(parent), leaf, ScaledMM(s, dtype))
        g = run(gmodel, dtype)
        entry[f"scaled_mm_{label}_vs_cpu_emulation"] = compare_logits(cpu, g, rows)
        entry[f"max_abs_logit_diff_{label}"] = float(max(np.abs(a - b).max() for a, b in zip(cpu, g)))
    entry["seconds"] = round(time.time() - t0, 2)
    res[name] = entry
    print(name, json.dumps(entry)[:400], flush=True)
(out_dir / "trtllm_gpu_check.json").write_text(json.dumps(res, indent=1))
