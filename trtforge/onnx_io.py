"""Save an ONNX model without ever holding its serialized bytes whole in memory.

``onnx.save_model`` serializes the whole ModelProto into one bytes object before writing: for a
432 MB model the process peaked 1.1 GB above the proto itself (bench/export.py, onnx 1.23).
Protobuf's wire format lets a message be written field by field, and a repeated field element by
element, so this writes the model without its graph, then the graph's header, then every
initializer serialized on its own: one tensor's bytes at a time. ``onnx.load`` reads the file
like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

_GRAPH_FIELD = 7  # ModelProto.graph
_INIT_FIELD = 5  # GraphProto.initializer
_LEN = 2  # wire type: length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int) -> bytes:
    return _varint((field << 3) | _LEN)


def save_streaming(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` (single file, < 2 GiB) tensor by tensor."""
    graph = model.graph
    inits = list(graph.initializer)
    shell_graph = onnx.GraphProto()
    _copy_fields(graph, shell_graph, skip="initializer")
    graph_head = shell_graph.SerializeToString()
    sizes = [t.ByteSize() for t in inits]
    graph_len = len(graph_head) + sum(len(_key(_INIT_FIELD)) + len(_varint(s)) + s for s in sizes)
    shell_model = onnx.ModelProto()
    _copy_fields(model, shell_model, skip="graph")
    with open(Path(path), "wb") as f:
        f.write(shell_model.SerializeToString())
        f.write(_key(_GRAPH_FIELD) + _varint(graph_len))
        f.write(graph_head)
        for t, size in zip(inits, sizes):
            f.write(_key(_INIT_FIELD) + _varint(size))
            f.write(t.SerializeToString())


def _copy_fields(src, dst, skip: str) -> None:
    """Shallow copy of every set field of a message except ``skip``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, (list, tuple)) or hasattr(value, "extend"):  # repeated
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)
