"""The three registries features are added to: architectures, quantization methods, backends.

Each entry is one module that defines one object and registers it:

* :class:`Architecture`  (``trtforge/architectures/<family>.py``): everything family-specific.
* :class:`QuantMethod`   (``calibration/methods/<method>.py``): what statistics a method needs
  and how it plans scales and weights.
* :class:`Backend`       (``engines/backends/<backend>.py``): option checks, build, the parity
  runner and the load check of one kind of deployable artifact.

Stages loop over the registries; they never branch on a name. The core (this module) knows
each registry's built-in entry modules by name and imports them on first use, so the core never
imports a stage at import time and a stage reaches another stage's entries only through here.
Third-party packages add entries through the ``trtforge.architectures``, ``trtforge.quant_methods``
and ``trtforge.backends`` entry-point groups.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from importlib import metadata
from typing import Generic, TypeVar

from trtforge.errors import InputError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry. ``get`` of an unknown name is a one-line error listing the known ones."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...], entry_point_group: str,
                 hint: str = "") -> None:
        self.kind = kind
        self._builtin = builtin_modules
        self._group = entry_point_group
        self._hint = hint
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._loaded = False

    def register(self, entry: T, *, aliases: tuple[str, ...] = ()) -> T:
        name = entry.name  # type: ignore[attr-defined]
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        for a in aliases:
            self._aliases[a] = name
        return entry

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtin:
            importlib.import_module(mod)
        try:
            eps = metadata.entry_points(group=self._group)
        except Exception:  # pragma: no cover - broken metadata must not break trtforge
            eps = ()
        for ep in eps:
            try:
                ep.load()
            except Exception as exc:  # a broken plugin is reported, never fatal
                log.warning("could not load %s plugin %s: %s", self.kind, ep.name, exc)

    def get(self, name: str) -> T:
        self._load()
        key = self._aliases.get(name, name)
        if key not in self._entries:
            raise InputError(f"unknown {self.kind} {name!r}", self._hint or f"use one of: {', '.join(self.names())}")
        return self._entries[key]

    def find(self, name: str) -> T | None:
        self._load()
        return self._entries.get(self._aliases.get(name, name))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[T]:
        self._load()
        return iter([self._entries[k] for k in sorted(self._entries)])

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None


ARCHITECTURES: Registry = Registry(
    "architecture",
    tuple(f"trtforge.architectures.{m}" for m in ("bert", "roberta", "gpt2", "llama", "mistral", "qwen2",
                                                   "qwen3", "phi3", "gemma3")),
    "trtforge.architectures",
)
QUANT_METHODS: Registry = Registry(
    "quantization method",
    tuple(f"trtforge.calibration.methods.{m}" for m in ("ranges", "smoothquant", "rtn", "awq", "gptq")),
    "trtforge.quant_methods",
)
BACKENDS: Registry = Registry(
    "backend",
    tuple(f"trtforge.engines.backends.{m}" for m in ("cpu_ort", "tensorrt", "trtllm_checkpoint")),
    "trtforge.backends",
)
