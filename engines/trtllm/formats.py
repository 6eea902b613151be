"""What TensorRT-LLM's PyTorch backend reads, as data: architectures, quant_algo, tensor layouts.

In:  nothing (constants and small pure functions); family facts (the TensorRT-LLM class, the
     groups the loader fuses, whether trtforge writes the family) come from ARCHITECTURES.
Out: the ``hf_quant_config.json`` and ``config.json["quantization_config"]`` dicts trtforge writes,
     the lists the writer uses to refuse what the loader cannot read, and the source each rule
     was read from (docs/trtllm.md quotes them).

The format is NVIDIA Model Optimizer's "unified" Hugging Face checkpoint: HF tensor names, with
quantized ``weight`` tensors and ``weight_scale`` / ``input_scale`` / ``pre_quant_scale`` beside
them, and ``hf_quant_config.json`` naming the algorithm. No TensorRT-LLM code ran here; every rule
below was read from the sources named in ``SOURCES`` (commits as stored in the search index).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from trtforge._version import __version__
from trtforge.architectures.base import TRTLLM_FUSED, Checkpoint
from trtforge.registry import ARCHITECTURES

SOURCES: dict[str, str] = {
    "arch_index": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/_arch_index.py @ 065ff9e9",
    "modeling_auto": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_auto.py @ 01bffee1",
    "model_config": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/model_config.py @ 008e0af8",
    "modelopt_config": "NVIDIA/TensorRT-LLM tensorrt_llm/quantization/modelopt_config.py @ 2edf354d",
    "linear": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/modules/linear.py @ 00bbf71e",
    "fpA_intB": "NVIDIA/TensorRT-LLM cpp/tensorrt_llm/kernels/cutlass_kernels/fpA_intB_gemm/"
                "fpA_intB_gemm_template.h @ 03cff08f",
    "requirements": "NVIDIA/TensorRT-LLM requirements.txt @ 000867d9 (transformers==4.57.1, nvidia-modelopt~=0.37)",
    "modelopt_pack": "nvidia-modelopt 0.47.0 modelopt/torch/export/quant_utils.py pack_int4_in_uint8",
    "removal": "NVIDIA/TensorRT-LLM docs/source/legacy/tensorrt-backend-removal.md @ 335107a7",
    "gemma3": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_gemma3.py @ b35ac1b6, "
              "checkpoints/hf/gemma3_weight_mapper.py @ 2a9abd95",
    "qk_norm": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/modules/qk_norm_attention.py @ 034c3f0a",
    "phi3": "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/models/modeling_phi3.py @ bd6f83f8 (the version @ 000a01de "
            "passed only 'weight' for qkv_proj/gate_up_proj and loads no quantized Phi-3)",
}

# What the format targets: TensorRT-LLM 1.0 made the PyTorch backend (which reads these
# checkpoints with tensorrt_llm.LLM(model=dir)) the default; after 1.2 it is the only backend.
TARGET: dict = {
    "tensorrt_llm": ">=1.0",
    "backend": "pytorch",
    "entry_point": "tensorrt_llm.LLM(model=CHECKPOINT_DIR) or trtllm-serve CHECKPOINT_DIR",
    "format": "NVIDIA Model Optimizer unified Hugging Face checkpoint (hf_quant_config.json + safetensors)",
    "not_for": "TensorRT-LLM < 1.0 with the TensorRT backend (trtllm-build reads its own rank*.safetensors format)",
    "verified_in_tensorrt_llm": False,
}

# tensorrt_llm/_torch/models/_arch_index.py MODEL_ARCH_TO_MODULE (causal LMs among them); the
# loader dispatches on config.architectures[0] and raises ValueError("Unknown architecture for
# AutoModelForCausalLM: ...") for anything else (modeling_auto.py). For reference only: which
# trtforge family is written under which class, and whether trtforge writes it, is the family's
# Architecture entry (trtforge/architectures/<family>.py, ``checkpoint``).
TRTLLM_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Phi3ForCausalLM", "Gemma3ForCausalLM", "Starcoder2ForCausalLM",
    "DeepseekV3ForCausalLM", "GptOssForCausalLM", "NemotronForCausalLM", "NemotronHForCausalLM",
    "Exaone4ForCausalLM", "Cohere2ForCausalLM", "SeedOssForCausalLM",
)

# What the loader fuses, per family (load_weights_fused_qkv_helper / _gate_up_helper):
# {group kind: member leaves in order}. A fused FP8 layer takes the max of the shard scales, a
# fused W4A16 layer ignores pre_quant_scale.
Fused = Mapping[str, tuple[str, ...]]


def checkpoint_of(model_type: str | None) -> Checkpoint | None:
    """The family's TensorRT-LLM facts (class name, fused groups, writable), from ARCHITECTURES."""
    arch = ARCHITECTURES.find(model_type) if model_type else None
    return arch.checkpoint if arch is not None else None


def writable_architectures() -> list[str]:
    """The TensorRT-LLM classes trtforge writes checkpoints for (every family whose entry says so)."""
    return [a.checkpoint.architecture for a in ARCHITECTURES if a.checkpoint is not None and a.checkpoint.writable]


def fused_of(model_type: str | None) -> Fused:
    """The groups the loader fuses for this family (TensorRT-LLM's generic q/k/v, gate/up otherwise)."""
    ck = checkpoint_of(model_type)
    return ck.fused if ck is not None else TRTLLM_FUSED


class Fp8Scheme(str, Enum):
    """FP8 layouts the loader reads: per-tensor weights + static per-tensor activations (``FP8``),
    or per-channel weights + dynamic per-token activations (``FP8_PER_CHANNEL_PER_TOKEN``)."""

    TENSOR = "tensor"
    ROWWISE = "rowwise"


class CkptDType(str, Enum):
    """The checkpoint's float type (config.json ``dtype``; TensorRT-LLM runs its GEMMs in it)."""

    AUTO = "auto"  # the source model's float16/bfloat16, else float16
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


QUANT_ALGO_FP8 = "FP8"
QUANT_ALGO_FP8_ROWWISE = "FP8_PER_CHANNEL_PER_TOKEN"
QUANT_ALGO_W4A16_AWQ = "W4A16_AWQ"
QUANT_ALGOS = (QUANT_ALGO_FP8, QUANT_ALGO_FP8_ROWWISE, QUANT_ALGO_W4A16_AWQ)

# fpA_intB_gemm_template.h: "Only group size 64 and 128 supported for fine grained kernels."
W4A16_GROUP_SIZES = (64, 128)
FP8_MAX = 448.0

SQ_REFUSAL = (
    "TensorRT-LLM's loader cannot read W8A8 SmoothQuant checkpoints: get_quant_method() in "
    "tensorrt_llm/_torch/modules/linear.py has no linear method for quant_algo W8A8_SQ_PER_CHANNEL and raises "
    "ValueError('unsupported quant mode'), and the TensorRT engine backend that ran SmoothQuant was removed"
)
SQ_HINT = "quantize the export with --recipe fp8 (Ada/Hopper) or --recipe int4-awq (Ampere and later); keep int8-sq for TensorRT engines"


def norm_offset(name: str, ck: Checkpoint | None) -> float:
    """What the family's loader adds to the tensor ``name`` before use: Gemma's 1 on every norm
    weight (Gemma3HfWeightMapper.handle_manual_copy: ``'norm' in module_name``); 0 otherwise.
    The checkpoint holds the ONNX graph's scale minus it."""
    if ck is None or not ck.norm_offset or not name.endswith(".weight"):
        return 0.0
    return ck.norm_offset if "norm" in name.rpartition(".")[0] else 0.0


def loader_config(cfg: dict, ck: Checkpoint | None) -> dict:
    """config.json as TensorRT-LLM's pinned transformers 4.57 (formats.SOURCES requirements) reads it.

    transformers 5 writes RoPE settings only as ``rope_parameters``, a key 4.57 does not know: it
    would fall back to its defaults (rope_theta 10000, no scaling), wrong for Qwen3 (1e6), Gemma 3's
    global layers (1e6) and Phi-4-mini's longrope. The flat keys are added beside it, from it:
    ``rope_theta``, ``rope_scaling`` (a non-default rope_type), ``partial_rotary_factor``; per layer
    type (Gemma 3) through the family's ``rope_keys``. Keys already present are kept."""
    out = dict(cfg)
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return out
    per_type = ck.rope_keys if ck is not None else {}
    main = rp
    if per_type and all(isinstance(v, dict) for v in rp.values()):
        for layer_type, key in per_type.items():
            if "rope_theta" in (rp.get(layer_type) or {}):
                out.setdefault(key, rp[layer_type]["rope_theta"])
        main = next((rp.get(t) or {} for t, k in per_type.items() if k == "rope_theta"), {})
    if "rope_theta" in main:
        out.setdefault("rope_theta", main["rope_theta"])
    if "partial_rotary_factor" in main:
        out.setdefault("partial_rotary_factor", main["partial_rotary_factor"])
    kind = main.get("rope_type", main.get("type", "default"))
    if kind == "longrope":
        # Phi3Config 4.x accepts exactly these three keys, and reads original_max_position_embeddings
        # at the top level
        out.setdefault("rope_scaling", {"type": "longrope", "long_factor": main.get("long_factor"),
                                        "short_factor": main.get("short_factor")})
        if "original_max_position_embeddings" in main:
            out["original_max_position_embeddings"] = main["original_max_position_embeddings"]
    elif kind not in (None, "default"):
        scaling = {k: v for k, v in main.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling["rope_type"] = kind
        out.setdefault("rope_scaling", scaling)
    return out


def fused_group(module: str, fused: Fused = TRTLLM_FUSED) -> tuple[str, str, str] | None:
    """``model.layers.0.self_attn.k_proj`` -> (``model.layers.0.self_attn``, ``qkv``, ``k_proj``)."""
    parent, _, leaf = module.rpartition(".")
    for kind, leaves in fused.items():
        if leaf in leaves:
            return parent, kind, leaf
    return None


@dataclass(frozen=True)
class CheckpointFormat:
    """The quantization a checkpoint declares; serialises to both places the loader looks."""

    quant_algo: str
    group_size: int | None = None
    exclude_modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.quant_algo not in QUANT_ALGOS:
            raise ValueError(f"quant_algo {self.quant_algo!r} is not one trtforge writes")

    @property
    def producer(self) -> dict:
        return {"name": "trtforge", "version": __version__}

    def hf_quant_config(self) -> dict:
        """``hf_quant_config.json`` in Model Optimizer's nested layout; the loader reads it first
        and treats it as authoritative (model_config.py: ModelConfig.from_pretrained)."""
        q: dict = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": None}
        if self.quant_algo == QUANT_ALGO_W4A16_AWQ:
            q.update(group_size=self.group_size, has_zero_point=False, pre_quant_scale=True)
        q["exclude_modules"] = list(self.exclude_modules)
        return {"producer": self.producer, "quantization": q}

    def inline_config(self) -> dict:
        """``config.json["quantization_config"]`` (the flat layout, ``quant_method: modelopt``).

        Model Optimizer's own flat form omits ``group_size`` for W4A16_AWQ; with only this file a
        loader would then build the layer with group_size None, so trtforge always writes it."""
        c: dict = {"quant_method": "modelopt", "quant_algo": self.quant_algo, "producer": self.producer,
                   "ignore": list(self.exclude_modules), "kv_cache_scheme": None}
        if self.quant_algo == QUANT_ALGO_W4A16_AWQ:
            c.update(group_size=self.group_size, has_zero_point=False, pre_quant_scale=True)
        elif self.quant_algo == QUANT_ALGO_FP8:
            c["config_groups"] = {"group_0": {
                "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}
        else:
            c["config_groups"] = {"group_0": {
                "input_activations": {"dynamic": True, "num_bits": 8, "type": "float", "strategy": "token"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float", "strategy": "channel"},
                "targets": ["Linear"]}}
        return c


def read_quant_config(data: dict) -> dict:
    """Normalise either layout to {quant_algo, group_size, exclude_modules, ...} the way
    modelopt_config.py does (nested ``quantization`` wrapper, or flat with ``ignore``)."""
    if isinstance(data.get("quantization"), dict):
        q = dict(data["quantization"])
    else:
        q = {k: v for k, v in data.items() if k not in ("ignore", "producer", "quant_method", "config_groups")}
        q["exclude_modules"] = list(data.get("ignore") or [])
        scheme = data.get("kv_cache_scheme")
        q["kv_cache_quant_algo"] = "FP8" if isinstance(scheme, dict) and scheme.get("type") == "float" \
            and scheme.get("num_bits") == 8 else None
    q.setdefault("exclude_modules", [])
    q.setdefault("group_size", None)
    return q


def is_modelopt_inline(data: dict) -> bool:
    """modelopt_config.py is_modelopt_quant_config: quant_method starts with "modelopt", or the
    producer is modelopt."""
    method = str(data.get("quant_method") or "")
    producer = data.get("producer") or {}
    return method.startswith("modelopt") or (isinstance(producer, dict) and producer.get("name") == "modelopt")
