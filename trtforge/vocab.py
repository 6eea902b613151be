"""The one vocabulary every stage speaks: precisions, granularities, tasks, model families.

Recipes, build targets, parity presets, manifests and TensorRT-LLM checkpoints all name
precisions with :class:`Precision`; nothing else defines a precision name. The values are the
strings manifests have always held on disk (``"int4-weight-only"``, ``"fp8"``, ...), so JSON
written before this module existed reads the same. Members are ``str`` subclasses: they compare
equal to their value, format as their value and serialize to JSON as their value.
"""

from __future__ import annotations

from enum import Enum

from trtforge.errors import InputError


class StrEnum(str, Enum):
    """``enum.StrEnum`` for Python 3.10: ``str(x)`` and f-strings give the value, not ``Cls.NAME``."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Precision(StrEnum):
    """What a graph (or one GEMM) computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"  # E4M3
    INT4 = "int4-weight-only"  # W4A16, block-quantized DequantizeLinear
    # FP4 (E2M1) Q/DQ: never emitted by trtforge, but recognised in graphs so a build refuses it
    # on GPUs before Blackwell instead of failing inside TensorRT.
    FP4 = "fp4"

    @property
    def quantized(self) -> bool:
        return self in QUANTIZED

    @property
    def is_float(self) -> bool:
        return self in FLOATS

    @property
    def weight_bits(self) -> int:
        return _BITS[self]

    @classmethod
    def parse(cls, name: str | Precision, *, what: str = "precision") -> Precision:
        """A precision from its value or a common alias (``int4``, ``int4-awq``, ``nvfp4``, ``e4m3``)."""
        if isinstance(name, Precision):
            return name
        key = str(name).strip().lower()
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise InputError(f"unknown {what} {name!r}", f"use one of: {', '.join(p.value for p in cls)}") from None

    @classmethod
    def lookup(cls, name: object) -> Precision | None:
        """Like :meth:`parse`, but ``None`` for a name that is not a precision."""
        try:
            return cls.parse(str(name))
        except InputError:
            return None


QUANTIZED = frozenset({Precision.INT8, Precision.FP8, Precision.INT4, Precision.FP4})
FLOATS = frozenset({Precision.FP32, Precision.FP16, Precision.BF16})
# The precisions a quantization recipe may ask for (FP4 is only recognised, never produced).
RECIPE_PRECISIONS = (Precision.INT8, Precision.FP8, Precision.INT4)
_BITS = {Precision.FP32: 32, Precision.FP16: 16, Precision.BF16: 16, Precision.INT8: 8, Precision.FP8: 8,
         Precision.INT4: 4, Precision.FP4: 4}
_ALIASES = {
    "int4": "int4-weight-only", "int4-awq": "int4-weight-only", "int4-gptq": "int4-weight-only",
    "int4-rtn": "int4-weight-only", "w4a16": "int4-weight-only", "int4_awq": "int4-weight-only",
    "nvfp4": "fp4", "e4m3": "fp8", "float8": "fp8", "w8a8": "int8",
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16", "float": "fp32",
}


class Granularity(StrEnum):
    """How many scales a quantized tensor has."""

    TENSOR = "tensor"  # one scale
    CHANNEL = "channel"  # one per output channel (weights)
    BLOCK = "block"  # one per block of K (INT4 weights)
    TOKEN = "token"  # one per row, computed at run time (dynamic activations)


class CalibDevice(StrEnum):
    """Where calibration runs ONNX Runtime (recipe key ``calib_device``)."""

    AUTO = "auto"  # CUDA where onnxruntime-gpu sees a GPU, else CPU
    CPU = "cpu"
    CUDA = "cuda"


class Task(StrEnum):
    FEATURE_EXTRACTION = "feature-extraction"
    SEQUENCE_CLASSIFICATION = "sequence-classification"
    CAUSAL_LM = "causal-lm"
    CAUSAL_LM_WITH_PAST = "causal-lm-with-past"

    @property
    def is_decoder(self) -> bool:
        return self in (Task.CAUSAL_LM, Task.CAUSAL_LM_WITH_PAST)


class Family(StrEnum):
    ENCODER = "encoder"
    DECODER = "decoder"
