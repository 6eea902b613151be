"""The only module of engines/trtllm that touches torch, transformers and safetensors at import.

In:  numpy arrays to save; a checkpoint folder's config; dequantized weights and quantization
     specs from reader.py.
Out: sharded safetensors files (+ index) written with the safetensors library; the parameter
     layout of a Hugging Face model built on the meta device; Hugging Face causal LMs (the float
     reference, and the fake-quantized model of a checkpoint) and their logits.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from trtforge.engines.trtllm.convert import HfLayout

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_VIEW = {"bfloat16": (np.uint16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn)}
INDEX_FILE = "model.safetensors.index.json"


def to_torch(a: np.ndarray) -> torch.Tensor:
    """numpy (incl. ml_dtypes bfloat16 / float8_e4m3fn) -> a torch tensor with the same bits."""
    a = np.array(a, order="C")  # a copy; np.ascontiguousarray would turn a scalar into shape [1]
    name = a.dtype.name
    if name in _VIEW:
        raw, tdt = _VIEW[name]
        return torch.from_numpy(a.view(raw)).view(tdt)
    return torch.from_numpy(a)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor -> numpy; float types as float32 (exact for float16, bfloat16 and FP8)."""
    return t.detach().to(torch.float32).cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def config_from_dict(cfg: dict) -> transformers.PretrainedConfig:
    # the checkpoint writes torch_dtype beside dtype for older transformers; this one reads dtype
    data = {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype")}
    cls = type(transformers.AutoConfig.for_model(data["model_type"]))
    return cls.from_dict(data)


def hf_layout(cfg: dict) -> HfLayout:
    """Parameter names and shapes of the model ``cfg`` describes, without allocating weights."""
    config = config_from_dict(cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    linears, embeddings = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears[name] = (int(mod.in_features), int(mod.out_features), mod.bias is not None)
        elif isinstance(mod, torch.nn.Embedding):
            embeddings.append(name)
    params = {n: tuple(int(d) for d in p.shape) for n, p in model.named_parameters()}
    tied = bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" not in params
    return HfLayout((cfg.get("architectures") or [type(model).__name__])[0], linears, params, embeddings, tied,
                    int(sum(p.numel() for p in model.parameters())))


def save_tensors(tensors: dict[str, np.ndarray], folder: Path, max_shard_bytes: int) -> dict:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index when larger than a shard."""
    names = list(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = int(tensors[n].nbytes)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    total = int(sum(tensors[n].nbytes for n in names))
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    umask = os.umask(0)
    os.umask(umask)
    for fname, members in zip(files, shards):
        save_file({n: to_torch(tensors[n]) for n in members}, str(folder / fname), metadata={"format": "pt"})
        os.chmod(folder / fname, 0o666 & ~umask)  # safetensors creates files private; a checkpoint is shared
        weight_map.update(dict.fromkeys(members, fname))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"files": files, "total_bytes": total, "tensors": len(names)}


# --------------------------------------------------------------------------- fake-quantized model


@dataclass
class LinearSpec:
    """A Linear as TensorRT-LLM computes it: dequantized weight, optional x * pre_quant_scale,
    then FP8 activation quantization (static per tensor, dynamic per token) or none."""

    weight: np.ndarray  # float64 [out, in], already dequantized as the server does
    bias: np.ndarray | None = None
    pre_quant_scale: np.ndarray | None = None
    act: str | None = None  # None | "static" | "token" | "dynamic-tensor"
    input_scale: float | None = None


class FakeQuantLinear(torch.nn.Module):
    def __init__(self, spec: LinearSpec) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(spec.weight.astype(np.float32)), requires_grad=False)
        self.bias = None if spec.bias is None else torch.nn.Parameter(torch.from_numpy(spec.bias.astype(np.float32)),
                                                                      requires_grad=False)
        self.pre = None if spec.pre_quant_scale is None else torch.from_numpy(spec.pre_quant_scale.astype(np.float32))
        self.act, self.input_scale = spec.act, spec.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.pre is not None:
            x = x * self.pre
        if self.act == "static":
            x = fp8_fake_quant(x, torch.tensor(self.input_scale, dtype=torch.float32))
        elif self.act == "token":
            x = fp8_fake_quant(x, torch.clamp(x.abs().amax(dim=-1, keepdim=True) / 448.0, min=1e-12))
        elif self.act == "dynamic-tensor":
            x = fp8_fake_quant(x, torch.clamp(x.abs().amax() / 448.0, min=1e-12))
        return torch.nn.functional.linear(x, self.weight, self.bias)


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Saturating FP8 E4M3 round trip (what static_quantize_e4m3_per_tensor feeds the GEMM)."""
    return torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32) * scale


def _no_init():
    """transformers' context that skips random initialization (moved between 4.x and 5.x)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(mod).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build_model(cfg: dict, params: dict[str, np.ndarray], linears: Iterable[tuple[str, LinearSpec]] = ()) -> torch.nn.Module:
    """A float32 HF causal LM of ``cfg`` holding ``params``; each (module, spec) of ``linears``
    (consumed one at a time, so one float64 weight is alive at once) replaces that nn.Linear."""
    config = config_from_dict(cfg)
    with _no_init():
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    replaced = set()
    for name, spec in linears:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, FakeQuantLinear(spec))
        replaced.add(name)
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in params.items()
             if k.rpartition(".")[0] not in replaced}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    left = [k for k in missing if k.rpartition(".")[0] not in replaced and k not in tied]
    if left or unexpected:
        raise ValueError(f"state dict mismatch: missing {left[:3]}, unexpected {list(unexpected)[:3]}")
    if tied:  # skipping initialization also skips tying in transformers 5
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb.weight is not in_emb.weight:
            out_emb.weight = in_emb.weight
    return model.eval()


def load_reference(folder: Path, dtype: str) -> torch.nn.Module:
    """The float source model, its weights rounded to the checkpoint dtype, run in float32."""
    from transformers.utils import logging as hf_logging

    quiet = not hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise in a CLI's stderr
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, attn_implementation="eager", local_files_only=True,
            trust_remote_code=False, use_safetensors=True)
    finally:
        if not quiet:
            hf_logging.enable_progress_bar()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(TORCH_DTYPES[dtype]).to(torch.float32))
    return model.eval()


def logits(model: torch.nn.Module, rows: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for ids in rows:
            t = torch.from_numpy(np.asarray(ids, np.int64)).reshape(1, -1)
            out.append(model(input_ids=t, attention_mask=torch.ones_like(t)).logits.float().numpy())
    return out
