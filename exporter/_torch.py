"""Everything in the export stage that touches torch and transformers.

This private module is the only place in ``trtforge.exporter`` that imports torch or
transformers at module level; the rest of the package imports it lazily.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import transformers

from trtforge.architectures import Architecture, NormKind
from trtforge.errors import ExportError, InputError
from trtforge.exporter.fold import fold_constants
from trtforge.onnx_io import DataFile, new_tensor
from trtforge.vocab import Task

log = logging.getLogger(__name__)


def load_model(folder: Path, arch: Architecture, task: Task) -> torch.nn.Module:
    """Load weights from a local folder, FP32, eager attention, never remote code.

    Eager attention exports as explicit MatMul/Softmax/MatMul, which is what Q/DQ placement on
    the attention batched matmuls and TensorRT's attention fusion patterns expect.

    Memory: a checkpoint held in BF16 or FP16 safetensors is loaded in that dtype and then
    upcast parameter by parameter (:func:`upcast`), so the process never holds the FP32 model
    beside the loader's reduced-precision copy (loading straight to FP32 peaked at 1.5x the FP32
    weights on TinyLlama's shape).
    """
    auto = getattr(transformers, arch.auto_class[task])
    dtype = checkpoint_dtype(sorted(folder.glob("*.safetensors")))
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = auto.from_pretrained(
                str(folder),
                dtype=dtype,
                attn_implementation="eager",
                trust_remote_code=False,
                local_files_only=True,
                output_loading_info=True,
            )
    except Exception as exc:
        raise _load_error(folder, exc) from None
    missing = [k for k in info.get("missing_keys", []) if not _benign_missing(k)]
    if missing:
        raise InputError(
            f"the weights in {folder} miss {len(missing)} tensors the config needs (e.g. {missing[0]})",
            "the weight files do not match config.json; check the folder is complete",
        )
    if task == Task.SEQUENCE_CLASSIFICATION and any("classifier" in k or "score" in k for k in info.get("missing_keys", [])):
        raise InputError(f"{folder} has no classification head weights", "use --task feature-extraction")
    model.eval()
    if dtype != torch.float32:
        upcast(model)
    check_finite(model)
    return model


_SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """BF16 or FP16 where every floating tensor of the safetensors ``files`` is of that dtype (read
    from their headers, no data), else FP32 (mixed, FP32, or pickled weights)."""
    import json
    import struct

    kinds: set[str] = set()
    if not files:
        return torch.float32
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 << 20:
                    return torch.float32
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return torch.float32  # from_pretrained says what is wrong with the file
        kinds |= {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                  and str(v.get("dtype", "")).startswith(("F", "BF"))}
    return _SAFETENSORS_FLOATS[next(iter(kinds))] if len(kinds) == 1 and kinds <= set(_SAFETENSORS_FLOATS) else torch.float32


_MADV_PAGEOUT = 21  # Linux 5.4+


def _page_out(t: torch.Tensor) -> None:
    """Let the kernel reclaim the pages under ``t`` now (their contents stay valid).

    transformers maps safetensors files into memory and hands out tensors that are views of
    the mapping; every page the upcast reads stays resident until the whole file is unmapped,
    which would add the checkpoint's size to the peak. ``MADV_PAGEOUT`` drops them as they are
    read. Elsewhere (anonymous memory, older kernels, not Linux) it does nothing or fails
    harmlessly, and a page read again is simply read from the file again."""
    import ctypes
    import mmap

    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def upcast(model: torch.nn.Module) -> None:
    """Every floating parameter and buffer to FP32, in place, one tensor at a time (each reduced-
    precision tensor is freed as its FP32 copy replaces it; tied parameters stay tied).

    A scalar buffer that transformers computes from a Python float (Gemma's ``embed_scale``,
    kept as ``scalar_embed_scale``) takes that exact value: loaded in BF16 it would be rounded
    (sqrt(640) = 25.298 becomes 25.25), which an FP32 load does not do."""
    done: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_floating_point() or p.dtype == torch.float32:
                continue
            if id(p) not in done:
                done[id(p)] = torch.nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                _page_out(p)
            mod._parameters[name] = done[id(p)]
            del p
        for name, b in list(mod._buffers.items()):
            if b is None or not b.is_floating_point() or b.dtype == torch.float32:
                continue
            scalar = getattr(mod, f"scalar_{name}", None)
            exact = b.dim() == 0 and isinstance(scalar, (int, float)) and not isinstance(scalar, bool)
            mod._buffers[name] = torch.tensor(float(scalar), dtype=torch.float32) if exact else b.float()


def _load_error(folder: Path, exc: BaseException) -> InputError:
    """One line for a failed from_pretrained; never PyTorch's advice to set weights_only=False."""
    text = str(exc).strip()
    chain = text + " " + " ".join(str(c) for c in (exc.__cause__, exc.__context__) if c)
    if type(exc).__name__ == "UnpicklingError" or "weights_only" in chain or "Unpickl" in chain:
        return InputError(
            f"the weights in {folder} are a pickle holding Python objects that safe loading (torch.load with "
            "weights_only=True) refuses, so trtforge will not load them",
            "convert the checkpoint to safetensors with a tool you trust, in an environment you trust "
            "(e.g. from_pretrained(...).save_pretrained(dir, safe_serialization=True)), and export that folder",
        )
    if isinstance(exc, (OSError, ValueError, RuntimeError, KeyError)) or type(exc).__name__ in (
            "SafetensorError", "HeaderTooLarge"):
        first = text.splitlines()[0] if text else type(exc).__name__
        truncated = type(exc).__name__ in ("SafetensorError", "HeaderTooLarge") or "incomplete" in first.lower()
        return InputError(
            f"the weights in {folder} failed to load: {first[:300]}",
            "the weight files look truncated or corrupt; copy them again" if truncated else
            "check that the folder holds complete model.safetensors (or pytorch_model.bin) files for this config",
        )
    raise exc


def check_finite(model: torch.nn.Module) -> None:
    """Refuse weights with NaN or Inf values, naming the first such tensor (one pass, no copies)."""
    bad = []
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not _all_finite(t):
                bad.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum())))
    if bad:
        name, nans, infs = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise InputError(
            f"the model's weights are not finite: {name} has {nans} NaN and {infs} Inf values{more}",
            "the checkpoint is damaged or was saved from a diverged run; use an intact copy of the weights",
        )


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``isfinite(t).all()`` a slice at a time: on a whole tensor it allocates a float copy and a
    mask of it (+540 MB for a 49k x 2048 embedding)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None (no tokenizer files, or they fail to load: validation then
    uses random token ids)."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # a broken tokenizer must not stop the export; validation falls back
        log.warning("tokenizer in %s failed to load (%s); validation will use random token ids", folder, exc)
        return None


def _benign_missing(key: str) -> bool:
    # Buffers recomputed at load time and tied weights are not missing weights.
    return key.endswith(("position_ids", "inv_freq", "masked_bias", ".attn.bias")) or key == "lm_head.weight"


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class EncoderWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, task: Task, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.input_names = input_names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, args))
        out = self.model(**kwargs, return_dict=True)
        return out.last_hidden_state if self.task == Task.FEATURE_EXTRACTION else out.logits


class CausalLMWrapper(torch.nn.Module):
    """Flat tensors in and out, so the KV cache crosses the ONNX boundary as named tensors.

    transformers' DynamicCache cannot be exported directly by either torch exporter with the
    versions we pin; the wrapper builds one from ``past_key_values.N.key/value`` inputs and
    returns ``present.N.key/value``. An empty past (length 0) is a prefill.

    The cache is built without the model config, so every layer is a full-length DynamicLayer,
    sliding-window ones included (Gemma 3): ``present`` is always ``past + new`` positions long and
    the window is applied by the mask transformers builds from the cache indices
    (``kv_idx > q_idx - window``). transformers' own cache for such a layer keeps only the last
    ``window - 1`` positions; attention over them is the same (tests/exporter/test_new_families.py
    decodes past the window against ``generate()``).
    """

    def __init__(self, model: torch.nn.Module, num_layers: int, with_past: bool) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.with_past = with_past
        self.cache_kw = _cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "return_dict": True,
        }
        if not self.with_past:
            out = self.model(**kwargs, use_cache=False)
            return out.logits
        cache = transformers.DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        kwargs[self.cache_kw] = cache
        out = self.model(**kwargs, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        presents = []
        for i in range(self.num_layers):
            if hasattr(cache, "layers"):
                presents += [cache.layers[i].keys, cache.layers[i].values]
            else:  # older transformers
                presents += [cache.key_cache[i], cache.value_cache[i]]
        return (out.logits, *presents)


WRAPPERS = ("encoder", "causal-lm")  # the names an Architecture's ``wrapper`` may take


class PlusOneRMSNorm(torch.nn.Module):
    """Gemma's ``x / rms(x) * (1 + w)`` with ``1 + w`` held as one parameter, ``weight_plus_one``.

    Left to itself the TorchScript exporter folds ``1 + w`` into an anonymous constant
    (``onnx::Mul_1542``) that cannot be traced back to the module's weight, so the parameters
    could not be attached and the export fell back to embedding them (about 5x the weights in
    memory). With the sum as the parameter, the graph's norm is the plain RMSNorm pattern whose
    scale initializer is ``<module>.weight_plus_one``: SmoothQuant and AWQ fold into it exactly
    (``S / s``), and the name says that the Hugging Face weight is ``S - 1``.
    """

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        self.weight_plus_one = torch.nn.Parameter(1.0 + norm.weight.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight_plus_one).type_as(x)


def fold_plus_one_norms(model: torch.nn.Module) -> int:
    """Replace every (1 + w) RMSNorm of a ``NormKind.RMSNORM_PLUS_ONE`` model by
    :class:`PlusOneRMSNorm`; each replacement is checked to compute exactly what the original
    does (a norm that is not (1 + w) fails the export instead of changing the model)."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "weight", None), torch.nn.Parameter)]
    g = torch.Generator().manual_seed(0)
    for name, mod in targets:
        new = PlusOneRMSNorm(mod)
        x = torch.randn(2, 3, mod.weight.shape[-1], generator=g) * 4.0
        with torch.no_grad():
            same = torch.allclose(mod(x), new(x), rtol=1e-6, atol=1e-6)
        if not same:
            raise ExportError(f"norm {name} ({type(mod).__name__}) does not compute x / rms(x) * (1 + w)",
                              "the architecture entry declares a (1 + w) RMSNorm this model does not have; report it")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    return len(targets)


class LongRopeRotary(torch.nn.Module):
    """``longrope`` rotary embeddings (Phi-3 128k, Phi-3.5-mini, Phi-4-mini) without the in-place
    buffer update transformers does (``inv_freq.copy_(...)``, which ONNX cannot express).

    transformers picks the long or the short frequencies from ``max(position_ids) + 1`` of the
    current call; so does this, with ``torch.where`` in the graph (cached keys keep the rotation
    they were computed with, as in transformers).
    """

    def __init__(self, rotary: torch.nn.Module, long_inv_freq: torch.Tensor, original_max: int) -> None:
        super().__init__()
        self.register_buffer("short_inv_freq", rotary.original_inv_freq.detach().clone().float(), persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq.detach().clone().float(), persistent=False)
        self.original_max = int(original_max)
        self.attention_scaling = float(rotary.attention_scaling)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = torch.max(position_ids) + 1
        inv_freq = torch.where(seq_len > self.original_max, self.long_inv_freq, self.short_inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def replace_longrope(model: torch.nn.Module) -> int:
    """Swap every single-kind ``longrope`` rotary module for :class:`LongRopeRotary`, each checked
    against the original below and above ``original_max_position_embeddings``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    targets = [(n, m) for n, m in model.named_modules()
               if getattr(m, "rope_type", None) == "longrope" and hasattr(m, "original_inv_freq")]
    for name, mod in targets:
        original_max = mod.config.rope_parameters["original_max_position_embeddings"]
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](mod.config, None, seq_len=original_max + 1)
        new = LongRopeRotary(mod, long_inv_freq, original_max)
        x = torch.zeros(1, 1, 1)
        with torch.no_grad():
            for n in (original_max // 2, original_max + 8):
                pos = torch.arange(n)[None]
                if not all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(mod(x, pos), new(x, pos))):
                    raise ExportError(f"rotary embedding {name} ({type(mod).__name__}) does not match trtforge's "
                                      "traceable longrope", "report this with the model's config.json")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    return len(targets)


def build_wrapper(model: torch.nn.Module, arch: Architecture, task: Task, input_names: list[str],
                  num_layers: int) -> torch.nn.Module:
    """The architecture's export wrapper (``Architecture.wrapper``) around the loaded model."""
    if arch.norm == NormKind.RMSNORM_PLUS_ONE:
        log.debug("folded %d (1 + w) norms into weight_plus_one parameters", fold_plus_one_norms(model))
    if arch.is_decoder and replace_longrope(model):
        log.debug("longrope rotary embeddings replaced by a traceable equivalent")
    if arch.wrapper == "causal-lm":
        w: torch.nn.Module = CausalLMWrapper(model, num_layers, task == Task.CAUSAL_LM_WITH_PAST)
    elif arch.wrapper == "encoder":
        w = EncoderWrapper(model, task, input_names)
    else:
        raise ExportError(f"architecture {arch.name!r} names export wrapper {arch.wrapper!r}, which the exporter lacks",
                          f"use one of: {', '.join(WRAPPERS)}")
    # torch.onnx.export restores the module's train/eval mode afterwards; a wrapper left in
    # training mode would switch dropout back on in the model it wraps.
    return w.eval()


def export(
    wrapper: torch.nn.Module,
    dummy: dict[str, np.ndarray],
    path: Path,
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    data: DataFile | None = None,
) -> tuple[onnx.ModelProto, str]:
    """Export with the TorchScript exporter (``dynamo=False``); returns (model, how weights got in).

    Why not ``dynamo=True``: with the pinned torch/transformers it exported a small LLaMA in
    about 9 s and its graph differed from PyTorch by 0.33 on left-padded positions, while the
    TorchScript exporter took under 0.5 s and matched to 2e-7 including left-padded rows
    (measured for issue 2; tests/exporter cover padded batches either way).

    Memory: with its parameters embedded, torch.onnx.export peaked at about 5x the weights
    (2.5 GB for a 432 MB LLaMA, bench/export.py): it holds the traced constants, the folded
    copies and the serialized proto at once. Even without parameters its constant folding
    computes the transpose of every Linear weight (+0.9x the weights on TinyLlama's shape). So
    the graph is traced without parameters and without the exporter's folding; :mod:`.fold`
    folds its constants, and each parameter (transposed where the graph transposes it) is then
    attached straight from the module: written to ``data`` tensor by tensor when given (the
    graph then refers to it), else held in the graph. Where an input cannot be matched to a
    parameter, the export falls back to embedding them (more memory).
    """
    _torch_export(wrapper, dummy, path, output_names, dynamic_axes, opset, export_params=False, fold=False)
    proto = onnx.load(str(path), load_external_data=False)  # the traced graph holds no weights
    fold_constants(proto)
    if attach_parameters(proto, wrapper, set(dummy), data):
        return proto, "attached from the module"
    del proto
    log.info("could not attach every parameter directly; exporting with embedded weights (more memory)")
    _torch_export(wrapper, dummy, path, output_names, dynamic_axes, opset, export_params=True)
    return onnx.load(str(path), load_external_data=True), "embedded by torch.onnx.export"


def _torch_export(wrapper, dummy, path, output_names, dynamic_axes, opset, *, export_params: bool,
                  fold: bool = True) -> None:
    args = tuple(torch.from_numpy(dummy[name]) for name in dummy)
    try:
        with warnings.catch_warnings(), _shape_inference_without_values(not export_params):
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(
                    wrapper,
                    args,
                    str(path),
                    input_names=list(dummy),
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    do_constant_folding=fold,
                    export_params=export_params,
                    dynamo=False,
                )
    except OSError:
        raise
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            "report this with the model's config.json; try another --opset",
        ) from exc


@contextlib.contextmanager
def _shape_inference_without_values(active: bool):
    """The TorchScript exporter's whole-graph ONNX shape inference without the parameters' values.

    It is handed every parameter's value and converts them to ONNX tensors for the inference:
    +0.8x the weights for a 0.38B LLaMA (1.15 GB), though a graph whose parameters are inputs
    (``export_params=False``) has their shapes and types on those inputs already. Without the
    values the exported graph is the same, byte for byte (checked on TinyLlama's shape)."""
    c = torch._C
    original = getattr(c, "_jit_pass_onnx_graph_shape_type_inference", None)
    if not active or original is None:
        yield
        return
    c._jit_pass_onnx_graph_shape_type_inference = lambda graph, params, opset: original(graph, {}, opset)
    try:
        yield
    finally:
        c._jit_pass_onnx_graph_shape_type_inference = original


def attach_parameters(proto: onnx.ModelProto, wrapper: torch.nn.Module, real_inputs: set[str],
                      data: DataFile | None = None) -> bool:
    """Turn the parameter inputs of a graph exported with ``export_params=False`` into initializers
    (with ``data``: references to their bytes, appended to that file one tensor at a time).

    An input is a parameter or buffer by name. ``Transpose`` of a 2-D parameter (a Linear weight
    feeding a MatMul, in graphs traced without folding) becomes an initializer holding the
    transposed weight, named ``onnx::MatMul_<n>`` as the exporter's folding names it; a tied
    weight read both ways (embedding and lm_head) is written both ways. With folding, an input
    may also be a constant folded from a parameter: only the transpose of a Linear weight feeding
    a MatMul, found through the MatMul's module path in its node name. Shapes must match exactly.
    Returns False (and changes nothing) if any input cannot be resolved.
    """
    from onnx import helper, numpy_helper

    # remove_duplicate=False: a tied lm_head is the embedding Parameter under a second name
    named = dict(wrapper.named_parameters(remove_duplicate=False)) | dict(wrapper.named_buffers(remove_duplicate=False))
    g = proto.graph
    graph_inputs = {i.name for i in g.input}
    outputs = {o.name for o in g.output}
    taken = graph_inputs | {o for n in g.node for o in n.output}
    # Transpose(parameter) -> a transposed initializer (planned first; nothing changes on failure)
    folded: dict[str, tuple[str, str]] = {}  # transpose output -> (new initializer, parameter)
    k = 0
    for node in g.node:
        x = node.input[0] if node.op_type == "Transpose" and node.input else None
        if (x in graph_inputs and x not in real_inputs and x in named and named[x].dim() == 2
                and _perm(node) in (None, [1, 0]) and node.output[0] not in outputs):
            while f"onnx::MatMul_{k}" in taken:
                k += 1
            folded[node.output[0]] = (f"onnx::MatMul_{k}", x)
            taken.add(f"onnx::MatMul_{k}")
    # by position: protobuf hands out a new Python object for a message on each access
    dropped = {j for j, n in enumerate(g.node) if n.op_type == "Transpose" and n.output and n.output[0] in folded}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for j, node in enumerate(g.node):
        if j in dropped:
            continue
        for i in node.input:
            consumers.setdefault(folded[i][0] if i in folded else i, []).append(node)

    wanted: dict[str, tuple[list[int], tuple[str, bool]]] = {}  # initializer -> (shape, (source, transposed))
    for inp in g.input:
        if inp.name in real_inputs or inp.name not in consumers:
            continue
        wanted[inp.name] = ([d.dim_value for d in inp.type.tensor_type.shape.dim], (inp.name, False))
    for new, param in folded.values():
        wanted[new] = (list(named[param].shape)[::-1], (param, True))

    resolved: dict[str, tuple[str, bool]] = {}
    for name, (shape, (key, transpose)) in wanted.items():
        source = None
        if key in named:
            source = (key, transpose)
        else:
            users = consumers.get(name, [])
            if len(users) == 1 and users[0].op_type == "MatMul" and users[0].input[1] == name:
                parts = [p for p in users[0].name.strip("/").split("/") if p][:-1]
                if ".".join(parts) + ".weight" in named:
                    source = (".".join(parts) + ".weight", True)
        if source is None:
            return False
        t = named[source[0]]
        if (list(t.shape)[::-1] if source[1] else list(t.shape)) != shape:
            return False
        resolved[name] = source

    if folded:
        keep_nodes = [n for j, n in enumerate(g.node) if j not in dropped]
        for node in keep_nodes:
            for j, i in enumerate(node.input):
                if i in folded:
                    node.input[j] = folded[i][0]
        del g.node[:]
        g.node.extend(keep_nodes)
    keep = [i for i in g.input if i.name in real_inputs]
    for name, (key, transpose) in resolved.items():
        arr = named[key].detach().cpu().numpy()
        if transpose:
            arr = arr.T
        if data is not None:
            # one tensor at a time: a transposed view is made contiguous (one copy of this tensor),
            # written, and dropped before the next
            g.initializer.append(new_tensor(arr, name, data))
            continue
        # Built in place: appending a finished TensorProto copies it once more, and tobytes()
        # writes a transposed view in C order itself, so no contiguous copy comes first either
        # (for Gemma 3's tied 262k-token lm_head each of those is 671 MB).
        t = g.initializer.add()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.raw_data = numpy_helper.tobytes_little_endian(arr)
    del g.input[:]
    g.input.extend(keep)
    return True


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


@torch.no_grad()
def run(wrapper: torch.nn.Module, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    """Run the wrapper in FP32 on numpy inputs (float inputs are upcast)."""
    args = []
    for v in feeds.values():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if t.is_floating_point():
            t = t.float()
        args.append(t)
    out = wrapper(*args)
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {name: t.detach().float().numpy() for name, t in zip(output_names, out)}


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__}
