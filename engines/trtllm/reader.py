"""Read a unified checkpoint the way TensorRT-LLM's PyTorch backend does, and de-quantize it.

In:  a checkpoint folder: config.json, hf_quant_config.json, model.safetensors (or shards and
     model.safetensors.index.json). Any writer's: trtforge's or Model Optimizer's.
Out: ``CheckpointReader``: the quantization config from where the loader looks first
     (hf_quant_config.json, else a modelopt ``quantization_config`` in config.json), every tensor
     (safetensors, never pickle), ``check()`` -- the shapes, dtypes and tensors the loader's
     create_weights/load_weights need, each failure a ValidationError -- and per Linear a
     ``ServerLinear``: the weight the kernels compute with after loading, including the
     re-quantization the loader applies when it fuses FP8 q/k/v and gate/up to one scale.

Rules follow tensorrt_llm/_torch/modules/linear.py (formats.SOURCES): FP8QDQLinearMethod,
FP8RowwiseLinearMethod, W4A16_AWQ_LinearMethod and the fused-weight helpers.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtforge.engines.trtllm.formats import (
    QUANT_ALGO_FP8,
    QUANT_ALGO_FP8_ROWWISE,
    QUANT_ALGO_W4A16_AWQ,
    W4A16_GROUP_SIZES,
    checkpoint_of,
    fused_group,
    fused_of,
    is_modelopt_inline,
    loader_config,
    norm_offset,
    read_quant_config,
)
from trtforge.engines.trtllm.pack import unpack_int4
from trtforge.errors import InputError, ValidationError

HF_QUANT_CONFIG = "hf_quant_config.json"


def torch_adapter():
    """engines/trtllm/_torch.py, the one module here that imports torch, transformers and
    safetensors.torch: loaded on first use, so the refusals and the format code run without them."""
    return importlib.import_module("trtforge.engines.trtllm._torch")


INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ServerLinear:
    module: str
    weight: np.ndarray  # float64 [out, in], as the kernel multiplies it
    quantized: bool
    q: np.ndarray | None = None  # the integers / FP8 values after loading, float64 [out, in]
    stored_q: np.ndarray | None = None  # as stored in the file (int4 unpacked), before fused re-scaling
    scale: np.ndarray | None = None  # as used: [] / [out] / [out, in/group], cast where the loader casts
    input_scale: float | None = None
    pre_quant_scale: np.ndarray | None = None  # applied as x * pre_quant_scale (None where ignored)
    act: str | None = None  # "static" | "token" | None (FP8 activations)
    bias: np.ndarray | None = None
    rescaled: bool = False  # the loader re-quantized it to a fused group's max scale


class CheckpointReader:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"{self.folder} has no config.json", "pass a checkpoint folder")
        self.config: dict = json.loads(cfg_path.read_text(encoding="utf-8"))
        self.quant, self.quant_source, self.warnings = _discover(self.folder, self.config)
        self.dtype = str(self.config.get("dtype") or self.config.get("torch_dtype") or "float16")
        self.weight_map = _weight_map(self.folder)
        # the groups the loader fuses for this family (its Architecture entry, by config model_type)
        self.fused = fused_of(self.config.get("model_type"))
        self.checkpoint = checkpoint_of(self.config.get("model_type"))
        self._layout = None

    # ------------------------------------------------------------------ tensors
    @property
    def quant_algo(self) -> str | None:
        return self.quant.get("quant_algo") if self.quant else None

    def keys(self) -> list[str]:
        return sorted(self.weight_map)

    def tensor(self, name: str):  # -> torch.Tensor
        from safetensors import safe_open

        if name not in self.weight_map:
            raise KeyError(name)
        with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def array(self, name: str) -> np.ndarray:
        return torch_adapter().to_numpy(self.tensor(name))

    @property
    def layout(self):
        if self._layout is None:
            self._layout = torch_adapter().hf_layout(self.config)
        return self._layout

    def norm_offset(self, name: str) -> float:
        """What the family's loader adds to tensor ``name`` (Gemma's norms: 1): the checkpoint holds
        the computed scale minus it."""
        return norm_offset(name, self.checkpoint)

    def excluded(self, module: str) -> bool:
        """apply_quant_config_exclude_modules: a pattern matching the module, or for a fused layer
        any of the HF modules it is made of (q/k/v, gate/up load as one layer)."""
        pats = list((self.quant or {}).get("exclude_modules") or [])
        fg = fused_group(module, self.fused)
        names = [f"{fg[0]}.{leaf}" for leaf in self.fused[fg[1]]] if fg else [module]
        return any(fnmatch.fnmatch(n, p) for n in names for p in pats)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Raise ValidationError at the first thing TensorRT-LLM's loader would reject."""
        arch = (self.config.get("architectures") or [None])[0]
        if not arch:
            raise ValidationError("config.json has no architectures entry; TensorRT-LLM dispatches on architectures[0]",
                                  "write the checkpoint again")
        algo = self.quant_algo
        if algo not in (None, QUANT_ALGO_FP8, QUANT_ALGO_FP8_ROWWISE, QUANT_ALGO_W4A16_AWQ):
            raise ValidationError(f"quant_algo {algo!r} is not one this reader checks", "use FP8 or W4A16_AWQ checkpoints")
        ck = self.checkpoint
        if ck is not None and algo in ck.refuse:
            raise ValidationError(f"{arch} cannot load quant_algo {algo}: {ck.refuse[algo]}",
                                  "write this family as FP8 per tensor, or build a TensorRT engine")
        self._check_config(arch)
        group = (self.quant or {}).get("group_size")
        if algo == QUANT_ALGO_W4A16_AWQ and group not in W4A16_GROUP_SIZES:
            raise ValidationError(f"W4A16_AWQ needs group_size 64 or 128 in {self.quant_source}, got {group!r}",
                                  "the fine-grained W4A16 kernels support only these")
        lay = self.layout
        for name, shape in lay.params.items():
            if name.rpartition(".")[0] in lay.linears:
                continue
            self._expect(name, shape, (self.dtype,))
        for module, (inf, outf, has_bias) in lay.linears.items():
            if module == "lm_head" and lay.tied:
                continue
            self._check_linear(module, inf, outf, algo, group)
            if has_bias:
                self._expect(f"{module}.bias", (outf,), (self.dtype,))

    def _check_config(self, arch: str) -> None:
        """The config keys the loader's transformers 4.x reads (formats.loader_config): with only
        transformers 5's rope_parameters it would run RoPE with its defaults."""
        cfg, ck = self.config, self.checkpoint
        if not isinstance(cfg.get("rope_parameters"), dict):
            return
        want = loader_config({k: cfg[k] for k in ("rope_parameters",)}, ck)
        missing = [k for k in want if k != "rope_parameters" and k not in cfg]
        if missing:
            raise ValidationError(f"config.json has rope_parameters but no {missing[0]}, which {arch}'s loader reads "
                                  "(TensorRT-LLM pins transformers 4.57, which does not know rope_parameters)",
                                  "write the checkpoint again with trtforge export-checkpoint")
        if ck is not None and ck.q_rows_are_hidden:
            heads, hidden = int(cfg.get("num_attention_heads") or 0), int(cfg.get("hidden_size") or 0)
            hd = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
            if heads and heads * hd != hidden:
                raise ValidationError(f"{arch}: {heads} heads of {hd} != hidden_size {hidden}; the loader slices q at "
                                      "hidden_size rows of qkv_proj", "build a TensorRT engine instead")

    def _check_linear(self, module: str, inf: int, outf: int, algo: str | None, group: int | None) -> None:
        w = f"{module}.weight"
        if algo is None or self.excluded(module):
            self._expect(w, (outf, inf), (self.dtype,))
            return
        if algo in (QUANT_ALGO_FP8, QUANT_ALGO_FP8_ROWWISE):
            self._expect(w, (outf, inf), ("float8_e4m3fn",))
            ws = self._need(module, "weight_scale" if f"{module}.weight_scale" in self.weight_map or algo == QUANT_ALGO_FP8
                            else "weight_scale_inv")
            n = int(np.prod(ws.shape))
            if algo == QUANT_ALGO_FP8 and n != 1:
                raise ValidationError(f"{module}.weight_scale has {n} values; quant_algo FP8 reads it with reshape([])",
                                      "write per-tensor FP8 scales, or declare FP8_PER_CHANNEL_PER_TOKEN")
            if algo == QUANT_ALGO_FP8_ROWWISE and tuple(ws.shape) != (outf,):
                raise ValidationError(f"{module}.weight_scale has shape {list(ws.shape)}, FP8_PER_CHANNEL_PER_TOKEN needs [{outf}]",
                                      "write one scale per output channel")
            if f"{module}.input_scale" in self.weight_map and int(np.prod(self.tensor(f"{module}.input_scale").shape)) != 1:
                raise ValidationError(f"{module}.input_scale must hold one value", "write a per-tensor activation scale")
            return
        if inf % group:
            raise ValidationError(f"{module}: in_features {inf} is not divisible by group_size {group} "
                                  "(W4A16_AWQ_LinearMethod.create_weights raises ValueError)", "choose a group size that divides it")
        if outf % 2:
            raise ValidationError(f"{module}: {outf} output channels cannot be packed two per byte", "W4A16 needs an even out_features")
        self._expect(w, (outf // 2, inf), ("uint8", "int8"))
        ws = self._need(module, "weight_scale")
        if tuple(ws.shape) != (outf, inf // group):
            raise ValidationError(f"{module}.weight_scale has shape {list(ws.shape)}, W4A16_AWQ needs [{outf}, {inf // group}]",
                                  "write [out, in/group] scales")
        if fused_group(module, self.fused) is None:
            pqs = self._need(module, "pre_quant_scale", why="load_weights_vanilla indexes weights['pre_quant_scale'] (KeyError)")
            if tuple(pqs.shape) != (inf,):
                raise ValidationError(f"{module}.pre_quant_scale has shape {list(pqs.shape)}, needs [{inf}]", "write one factor per input")

    def _need(self, module: str, leaf: str, why: str = "TensorRT-LLM's loader reads it"):
        name = f"{module}.{leaf}"
        if name not in self.weight_map:
            raise ValidationError(f"{name} is missing ({why})", "write the checkpoint again with trtforge export-checkpoint")
        return self.tensor(name)

    def _expect(self, name: str, shape: tuple, dtypes: tuple[str, ...]) -> None:
        if name not in self.weight_map:
            raise ValidationError(f"tensor {name} is missing from the checkpoint", "write the checkpoint again")
        t = self.tensor(name)
        dt = str(t.dtype).replace("torch.", "")
        if tuple(t.shape) != tuple(shape) or dt not in dtypes:
            raise ValidationError(f"{name} is {dt} {list(t.shape)}, the loader expects {'/'.join(dtypes)} {list(shape)}",
                                  "write the checkpoint again")

    # ------------------------------------------------------------------ what the server computes
    def float_params(self) -> dict[str, np.ndarray]:
        """Every tensor that is not part of a quantized Linear (norms, embeddings, biases, lm_head)."""
        lay = self.layout
        out = {}
        for name in lay.params:
            module = name.rpartition(".")[0]
            if module in lay.linears and name.endswith(".weight") and not (self.quant_algo is None or self.excluded(module)):
                continue
            if module == "lm_head" and lay.tied:
                continue
            out[name] = self.array(name)
        return out

    def served_float_params(self) -> dict[str, np.ndarray]:
        """``float_params`` as the server holds them. Where the family's loader adds an offset
        (Gemma's norms: ``p.data.copy_(module_weights[n][:] + 1)``, Gemma3HfWeightMapper.handle_manual_copy)
        it adds it to the stored tensor in the checkpoint's dtype, which rounds the sum once more
        (bfloat16: up to 2^-9 of it). Returned as that sum in float32 minus the offset, exactly, so a
        Hugging Face model, which computes ``offset + w`` itself in float32, holds the server's scale."""
        out = self.float_params()
        for name in out:
            offset = self.norm_offset(name)
            if offset:
                served = self.tensor(name) + offset  # in the stored dtype, as the loader computes it
                out[name] = torch_adapter().to_numpy(served) - np.float32(offset)
        return out

    def iter_linears(self) -> Iterator[ServerLinear]:
        """Each Linear as the server computes it, one at a time (a fused FP8 group together), so
        only one layer's float64 weight is alive at once."""
        lay = self.layout
        pending: dict[tuple[str, str], list[ServerLinear]] = {}
        for module, (_inf, _outf, has_bias) in lay.linears.items():
            if module == "lm_head" and lay.tied:
                continue
            bias = self.array(f"{module}.bias") if has_bias else None
            if self.quant_algo is None or self.excluded(module):
                yield ServerLinear(module, self.array(f"{module}.weight").astype(np.float64), False, bias=bias)
                continue
            lin = self._int4(module, bias) if self.quant_algo == QUANT_ALGO_W4A16_AWQ else self._fp8(module, bias)
            fg = fused_group(module, self.fused)
            if self.quant_algo != QUANT_ALGO_FP8 or fg is None:
                yield lin
                continue
            group = pending.setdefault((fg[0], fg[1]), [])
            group.append(lin)
            present = [f"{fg[0]}.{leaf}" for leaf in self.fused[fg[1]] if f"{fg[0]}.{leaf}" in lay.linears]
            if len(group) == len(present):
                yield from _fuse_fp8(self, pending.pop((fg[0], fg[1])))
        for group in pending.values():  # incomplete groups (a member excluded): fused as they are
            yield from _fuse_fp8(self, group)

    def linears(self) -> dict[str, ServerLinear]:
        """All Linears at once (small models and tests; iter_linears for large ones)."""
        return {lin.module: lin for lin in self.iter_linears()}

    def _int4(self, module: str, bias) -> ServerLinear:
        import torch

        TORCH_DTYPES = torch_adapter().TORCH_DTYPES
        group = int(self.quant["group_size"])
        packed = self.tensor(f"{module}.weight")
        q = unpack_int4(packed.view(torch.uint8).numpy()).astype(np.float64)
        # copy_weight casts weight_scale to the module dtype
        s = self.tensor(f"{module}.weight_scale").to(TORCH_DTYPES[self.dtype]).to(torch.float64).numpy()
        pqs = None
        if fused_group(module, self.fused) is None:  # fused q/k/v and gate/up ignore it
            pqs = self.array(f"{module}.pre_quant_scale")
        w = q * np.repeat(s, group, axis=1)
        return ServerLinear(module, w, True, q=q, stored_q=q, scale=s, pre_quant_scale=pqs, bias=bias)

    def _fp8(self, module: str, bias) -> ServerLinear:
        q = self.array(f"{module}.weight").astype(np.float64)
        name = f"{module}.weight_scale" if f"{module}.weight_scale" in self.weight_map else f"{module}.weight_scale_inv"
        s = self.array(name).astype(np.float32).astype(np.float64)
        if self.quant_algo == QUANT_ALGO_FP8:
            s = s.reshape(())
            isc = f"{module}.input_scale"
            input_scale = float(self.array(isc).reshape(())) if isc in self.weight_map else None
            return ServerLinear(module, q * s, True, q=q, stored_q=q, scale=s, input_scale=input_scale,
                                act="static" if input_scale is not None else "dynamic-tensor", bias=bias)
        return ServerLinear(module, q * s[:, None], True, q=q, stored_q=q, scale=s, act="token", bias=bias)


def _fuse_fp8(reader: CheckpointReader, members: list[ServerLinear]) -> list[ServerLinear]:
    """FP8QDQLinearMethod.rescale_fused_weights: max input_scale and max weight_scale over the
    shards, each shard ``weight.to(dtype).mul_(s_i).div_(s_max).to(float8_e4m3fn)``."""
    import torch

    TORCH_DTYPES = torch_adapter().TORCH_DTYPES
    scales = torch.tensor([float(lin.scale) for lin in members], dtype=torch.float32)
    s_max = scales.max()
    inputs = [lin.input_scale for lin in members]
    in_max = max(inputs) if all(i is not None for i in inputs) else None
    for lin, s_i in zip(members, scales):
        if float(s_i) != float(s_max):
            stored = reader.tensor(f"{lin.module}.weight")
            re = stored.to(TORCH_DTYPES[reader.dtype]).mul_(s_i).div_(s_max).to(torch.float8_e4m3fn)
            lin.q = re.to(torch.float64).numpy()
            lin.rescaled = True
        lin.scale = np.asarray(float(s_max), np.float64)
        lin.weight = lin.q * float(s_max)
        lin.input_scale = in_max
    return members


def _discover(folder: Path, config: dict) -> tuple[dict | None, str | None, list[str]]:
    """ModelConfig.from_pretrained: hf_quant_config.json first (authoritative), else config.json."""
    warnings: list[str] = []
    inline = config.get("quantization_config")
    path = folder / HF_QUANT_CONFIG
    if path.is_file():
        try:
            q = read_quant_config(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not valid JSON: {exc}", "write the checkpoint again") from None
        if isinstance(inline, dict) and is_modelopt_inline(inline):
            flat = read_quant_config(inline)
            for key in ("quant_algo", "group_size"):
                if flat.get(key) != q.get(key):
                    warnings.append(f"config.json quantization_config {key}={flat.get(key)!r} differs from "
                                    f"{HF_QUANT_CONFIG} ({q.get(key)!r}); the loader uses {HF_QUANT_CONFIG}")
        return q, HF_QUANT_CONFIG, warnings
    if isinstance(inline, dict) and is_modelopt_inline(inline):
        return read_quant_config(inline), "config.json", warnings
    return None, None, warnings


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        wm = dict(data.get("weight_map") or {})
        for f in set(wm.values()):
            if not (folder / f).is_file():
                raise InputError(f"{INDEX_FILE} names {f}, which is missing", "copy the whole checkpoint folder")
        return wm
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} has no *.safetensors files", "pass a checkpoint folder (safetensors only; pickle files are never read)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            names = h.keys()  # a safetensors handle, not a dict
            out.update(dict.fromkeys(names, f.name))
    return out
