"""ONNX file I/O shared by every stage: the artifact's file names, saving, loading, checking.

``save_model`` writes small models with :func:`save_streaming` and large ones (or on request)
with their weights in one ``model.onnx.data`` beside the graph. ``check_onnx`` runs the checker
by path, so external data (> 2 GB) works; its error names the stage whose graph failed.

Save an ONNX model without ever holding its serialized bytes whole in memory:

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

from trtforge.errors import ExportError, InputError, TrtforgeError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# protobuf cannot serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

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


def save_model(model: onnx.ModelProto, path: Path, *, force_external: bool = False,
               stage: str = "export") -> bool:
    """Save, with all weights in one ``model.onnx.data`` beside it when large; returns whether external."""
    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    external = force_external or size > EXTERNAL_DATA_THRESHOLD
    try:
        if external:
            data = path.parent / DATA_FILE
            if data.exists():
                data.unlink()
            onnx.save_model(
                model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=DATA_FILE, size_threshold=1024,
            )
        else:
            save_streaming(model, path)
    except OSError as exc:
        raise TrtforgeError(f"{stage}: writing {path} failed: {exc.strerror or exc}",
                            "check free disk space and permissions") from exc
    return external


def check_onnx(path: Path, *, stage: str = "export") -> None:
    """Full onnx.checker pass, by path so models with external data (>2 GB) work.

    A failure is a trtforge bug in the stage that wrote the graph, and says which one."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        what = "exported" if stage == "export" else f"{stage}d" if stage.endswith("e") else stage
        raise ExportError(f"the {what} graph fails onnx.checker: {str(exc).splitlines()[0]}",
                          f"report this {stage} bug") from exc


def load_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """``onnx.load`` with a one-line error for a file that does not parse (truncated, not ONNX)."""
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except FileNotFoundError as exc:
        raise InputError(f"{path} (or its external data {exc.filename}) does not exist",
                         "re-run the stage that wrote it") from None
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a whole ONNX model
        if type(exc).__name__ in ("DecodeError", "EncodeError", "ValidationError") or isinstance(exc, (OSError, ValueError)):
            raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})",
                             "the file is truncated or corrupt; re-run the stage that wrote it") from None
        raise
