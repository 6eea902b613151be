"""ONNX file I/O shared by every stage: the artifact's file names, saving, loading, checking,
and the weights of graphs too large to hold or serialize whole.

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

Models over 2 GB (protobuf cannot serialize a message that large) are handled as graphs loaded
with ``load_external_data=False``, whose big initializers are references into ``model.onnx.data``.
:class:`Weights` reads such a tensor from its file when a pass needs its values, records edits
(SmoothQuant's rescaling, the FP16 cast) to apply when the tensor is written, and appends new
tensors (quantized weights) to the output's :class:`DataFile` as they are produced;
:func:`write_model` then writes the graph and streams every remaining tensor, copying untouched
ones from the input's data file (or hard-linking that file, for scratch models). Nothing holds
more than one tensor's values at a time, and no ModelProto with its weights is ever copied or
serialized whole.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.errors import ExportError, InputError, TrtforgeError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# protobuf cannot serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# in external-data files, tensors smaller than this stay in the graph (onnx's size_threshold)
EMBED_BELOW = 1024
ALIGN = 4096  # offsets of external tensors of a page or more are page-aligned (ONNX Runtime maps them)
_CHUNK = 64 << 20

_GRAPH_FIELD = 7  # ModelProto.graph
_INIT_FIELD = 5  # GraphProto.initializer
_LEN = 2  # wire type: length-delimited

# tensor types whose external bytes are a plain little-endian numpy array
_PLAIN = {
    TensorProto.FLOAT: np.dtype(np.float32), TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64), TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8), TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16), TensorProto.INT32: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.uint32), TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT64: np.dtype(np.uint64), TensorProto.BOOL: np.dtype(np.bool_),
}
_PLAIN_TYPES = {v: k for k, v in _PLAIN.items()}


def needs_external(nbytes: int) -> bool:
    """Whether weights of ``nbytes`` must go to an external-data file (read at call time, so tests
    can lower the threshold)."""
    return nbytes > EXTERNAL_DATA_THRESHOLD


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
    _write_streaming(model, path, list(model.graph.initializer))


def _write_streaming(model: onnx.ModelProto, path: str | os.PathLike[str], inits: list[TensorProto]) -> None:
    """``model`` with ``inits`` as its graph's initializers, serialized one tensor at a time."""
    graph = model.graph
    shell_graph = onnx.GraphProto()
    copy_fields(graph, shell_graph, skip="initializer")
    graph_head = shell_graph.SerializeToString()
    sizes = [t.ByteSize() for t in inits]
    graph_len = len(graph_head) + sum(len(_key(_INIT_FIELD)) + len(_varint(s)) + s for s in sizes)
    shell_model = onnx.ModelProto()
    copy_fields(model, shell_model, skip="graph")
    with open(Path(path), "wb") as f:
        f.write(shell_model.SerializeToString())
        f.write(_key(_GRAPH_FIELD) + _varint(graph_len))
        f.write(graph_head)
        for t, size in zip(inits, sizes):
            f.write(_key(_INIT_FIELD) + _varint(size))
            f.write(t.SerializeToString())


def copy_fields(src, dst, skip: str | tuple[str, ...]) -> None:
    """Shallow copy of every set field of a message except ``skip`` (a name or names)."""
    skip = (skip,) if isinstance(skip, str) else skip
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if isinstance(value, (list, tuple)) or hasattr(value, "extend"):  # repeated
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


# ----------------------------------------------------------------------------- external data

def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make ``t`` a reference to ``length`` bytes at ``offset`` of ``location`` (its data cleared)."""
    t.ClearField("raw_data")
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's data, wherever it is (no data is read)."""
    if is_external(t):
        info = external_info(t)
        if "length" in info:
            return int(info["length"])
    dt = _PLAIN.get(t.data_type)
    if dt is not None and t.HasField("raw_data"):  # no copy of the bytes to count them
        return int(np.prod(t.dims, dtype=np.int64)) * dt.itemsize
    return t.ByteSize()


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def embedded_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in the graph itself (what serializing it would copy)."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer if not is_external(t))


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


@dataclass(frozen=True)
class _Ref:
    """Where an external tensor's bytes are, and what they hold."""

    path: Path
    offset: int
    length: int
    data_type: int
    dims: tuple[int, ...]


def _read_ref(ref: _Ref) -> np.ndarray:
    dt = _PLAIN.get(ref.data_type)
    try:
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            if dt is not None:
                count = ref.length // dt.itemsize
                a = np.fromfile(f, dtype=dt, count=count)
                if a.size != count:
                    raise EOFError
                return a.reshape(ref.dims)
            data = f.read(ref.length)
            if len(data) != ref.length:
                raise EOFError
    except FileNotFoundError:
        raise InputError(f"the external data file {ref.path} does not exist", "re-run the stage that wrote it") from None
    except EOFError:
        raise InputError(f"{ref.path} ends before the tensor at offset {ref.offset} ({ref.length} bytes)",
                         "the external data file is truncated; re-run the stage that wrote it") from None
    tmp = TensorProto()
    tmp.data_type = ref.data_type
    tmp.dims.extend(ref.dims)
    tmp.raw_data = data
    return numpy_helper.to_array(tmp)


def _read_bytes(ref: _Ref) -> bytes:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = f.read(ref.length)
    if len(data) != ref.length:
        raise InputError(f"{ref.path} ends before the tensor at offset {ref.offset} ({ref.length} bytes)",
                         "the external data file is truncated; re-run the stage that wrote it")
    return data


class DataFile:
    """One external-data file, written tensor by tensor (appended; big tensors page-aligned)."""

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self._f = open(self.path, "ab" if append else "wb")  # noqa: SIM115 - closed by close() / the writer
        self.size = self._f.tell() if append else 0

    def _align(self, n: int) -> None:
        if n >= ALIGN and self.size % ALIGN:
            pad = ALIGN - self.size % ALIGN
            self._f.write(b"\0" * pad)
            self.size += pad

    def write(self, data) -> tuple[int, int]:
        """Append ``data`` (bytes or a buffer); returns (offset, length)."""
        n = memoryview(data).nbytes
        self._align(n)
        off = self.size
        self._f.write(data)
        self.size += n
        return off, n

    def copy(self, src: Path, offset: int, length: int) -> tuple[int, int]:
        """Append ``length`` bytes of ``src`` from ``offset``, in chunks."""
        self._align(length)
        off = self.size
        with open(src, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(left, _CHUNK))
                if not chunk:
                    raise InputError(f"{src} ends before the tensor at offset {offset} ({length} bytes)",
                                     "the external data file is truncated; re-run the stage that wrote it")
                self._f.write(chunk)
                left -= len(chunk)
        self.size += length
        return off, length

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class Weights:
    """The initializer values of one graph, read tensor by tensor; edits kept beside the graph.

    Tensors held in the graph (embedded) are read and edited in place, as onnx would. Tensors in
    external data (a graph loaded with ``load_external_data=False``; ``base_dir`` is the folder
    their locations are relative to) stay on disk: :meth:`array` reads one from its file,
    :meth:`transform` records an edit that is applied whenever the tensor is read or written,
    and :meth:`put` writes a new tensor straight to ``out`` (the output's data file) when there
    is one. Passes take tensors as the graph holds them (``GraphIndex.initializers``).
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike[str] | None = None,
                 out: DataFile | None = None) -> None:
        self.model = model
        self.base = Path(base_dir) if base_dir is not None else None
        self.out = out
        self._pending: dict[str, tuple[_Ref, list[tuple[Callable, np.dtype]]]] = {}
        self._dirs: dict[str, Path] = {}  # tensors put into ``out``: read from its folder

    def rebind(self, model: onnx.ModelProto) -> None:
        """The graph was replaced by a converted copy (same tensor names)."""
        self.model = model

    def pending(self, name: str) -> bool:
        """Whether the tensor has recorded edits not yet written."""
        return name in self._pending

    def ref(self, t: TensorProto) -> _Ref:
        info = external_info(t)
        base = self._dirs.get(t.name, self.base)
        if base is None:
            raise InputError(f"initializer {t.name} is in external data ({info.get('location')}) and no folder was "
                             "given to read it from", "load the model from its file, or pass its folder")
        path = base / info["location"]
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else path.stat().st_size - offset
        return _Ref(path, offset, length, t.data_type, tuple(int(d) for d in t.dims))

    def array(self, t: TensorProto) -> np.ndarray:
        """The tensor's value (edits applied), read from wherever it is."""
        p = self._pending.get(t.name)
        if p is not None:
            ref, steps = p
            a = _read_ref(ref)
            for fn, dt in steps:
                a = fn(a.astype(np.float64)).astype(dt)
            return a
        if is_external(t):
            return _read_ref(self.ref(t))
        return numpy_helper.to_array(t)

    def transform(self, t: TensorProto, fn: Callable[[np.ndarray], np.ndarray], dtype=None) -> None:
        """``t := fn(t as float64)``, cast to ``dtype`` (default: ``t``'s own type)."""
        if not is_external(t) and t.name not in self._pending:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(fn(arr.astype(np.float64)).astype(dtype or arr.dtype), t.name))
            return
        if t.name not in self._pending:
            self._pending[t.name] = (self.ref(t), [])
        dt = np.dtype(dtype) if dtype is not None else helper.tensor_dtype_to_np_dtype(t.data_type)
        self._pending[t.name][1].append((fn, dt))
        t.data_type = helper.np_dtype_to_tensor_dtype(dt)

    def clone(self, t: TensorProto, name: str) -> TensorProto:
        """A copy of ``t`` named ``name``, appended to the graph (the reference only, for external data)."""
        c = self.model.graph.initializer.add()
        c.CopyFrom(t)
        c.name = name
        if t.name in self._pending:
            ref, steps = self._pending[t.name]
            self._pending[name] = (ref, list(steps))
        if t.name in self._dirs:
            self._dirs[name] = self._dirs[t.name]
        return c

    def put(self, array: np.ndarray, name: str) -> TensorProto:
        """A new tensor holding ``array``: written to ``out`` now when there is one (and it is not tiny),
        else held in the graph. The caller adds it to the graph."""
        t = new_tensor(array, name, self.out)
        if is_external(t):
            self._dirs[name] = self.out.path.parent
        return t

    def drop(self, name: str) -> None:
        """Forget a tensor removed from the graph."""
        self._pending.pop(name, None)


def new_tensor(array: np.ndarray, name: str, data: DataFile | None) -> TensorProto:
    """``array`` as a tensor, its bytes appended to ``data`` unless it is tiny or there is no file."""
    array = np.asarray(array)
    dt = _PLAIN_TYPES.get(array.dtype)
    if data is not None and array.nbytes >= EMBED_BELOW and dt is not None:
        t = TensorProto()
        t.name = name
        t.data_type = dt
        t.dims.extend(array.shape)
        set_external(t, data.name, *data.write(memoryview(np.ascontiguousarray(array)).cast("B")))
        return t
    t = numpy_helper.from_array(array, name)  # int4 packing and friends
    raw = t.raw_data if data is not None else b""
    if len(raw) >= EMBED_BELOW:
        set_external(t, data.name, *data.write(raw))
    return t


def _link(src: Path, folder: Path, links: dict[Path, str | None]) -> str | None:
    """Hard-link ``src`` into ``folder`` (once); its name there, or None where links are impossible."""
    if src not in links:
        name = f"linked.{src.name}"
        k = 0
        while (folder / name).exists() and not os.path.samefile(folder / name, src):
            k += 1
            name = f"linked{k}.{src.name}"
        try:
            if not (folder / name).exists():
                os.link(src, folder / name)
            links[src] = name
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            links[src] = None
    return links[src]


def write_model(model: onnx.ModelProto, path: str | os.PathLike[str], weights: Weights | None = None, *,
                external: bool, data: DataFile | None = None, link: bool = False) -> None:
    """Write ``model`` with every initializer's current value, one tensor at a time; ``model`` is
    left as it is.

    ``external``: tensors of ``EMBED_BELOW`` bytes or more go to ``data`` (default: a new
    ``model.onnx.data`` beside ``path``; tensors :meth:`Weights.put` already wrote there stay),
    else everything is held in the file (the caller keeps that under 2 GB). ``link`` (with
    ``external``): untouched external tensors are read from a hard link of their file placed
    beside ``path`` instead of being copied (for scratch models; falls back to copying across
    file systems).
    """
    path = Path(path)
    folder = path.parent
    weights = weights or Weights(model)
    own = None
    if external and data is None:
        data = own = DataFile(folder / DATA_FILE)
    links: dict[Path, str | None] = {}
    out: list[TensorProto] = []
    try:
        for t in model.graph.initializer:
            out.append(_written(t, weights, data if external else None, folder, links if link else None))
    finally:
        if own is not None:
            own.close()
        elif data is not None:
            data.flush()
    _write_streaming(model, path, out)


def _written(t: TensorProto, weights: Weights, data: DataFile | None, folder: Path,
             links: dict[Path, str | None] | None) -> TensorProto:
    """The tensor as it is written: a reference into ``data`` (or a linked file), or embedded."""
    if weights.pending(t.name):
        new = new_tensor(weights.array(t), t.name, data)
        new.doc_string = t.doc_string
        return new
    if is_external(t):
        ref = weights.ref(t)
        if data is not None and ref.path == data.path:
            return t
        c = TensorProto()
        c.CopyFrom(t)
        if data is not None and links is not None and (name := _link(ref.path, folder, links)) is not None:
            set_external(c, name, ref.offset, ref.length)
        elif data is not None:
            set_external(c, data.name, *data.copy(ref.path, ref.offset, ref.length))
        else:
            del c.external_data[:]
            c.data_location = TensorProto.DEFAULT
            c.raw_data = _read_bytes(ref)
        return c
    if data is not None and t.HasField("raw_data") and tensor_nbytes(t) >= EMBED_BELOW:
        c = TensorProto()
        c.CopyFrom(t)
        set_external(c, data.name, *data.write(t.raw_data))
        return c
    return t


def save_model(model: onnx.ModelProto, path: Path, *, force_external: bool = False,
               stage: str = "export") -> bool:
    """Save, with all weights in one ``model.onnx.data`` beside it when large; returns whether external.

    ``model`` is left as it is (its weights are not moved out of it)."""
    external = force_external or needs_external(weight_bytes(model))
    try:
        if external:
            write_model(model, path, external=True)
        else:
            save_streaming(model, path)
    except OSError as exc:
        raise TrtforgeError(f"{stage}: writing {path} failed: {exc.strerror or exc}",
                            "check free disk space and permissions") from exc
    return external


def _varint_at(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of each field in buf[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint_at(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint_at(buf, pos)
            yield field, wire, first, pos, after
        elif wire == 1:
            yield field, wire, first, pos, pos + 8
            after = pos + 8
        elif wire == 2:
            n, pos = _varint_at(buf, pos)
            after = pos + n
            yield field, wire, first, pos, after
        elif wire == 5:
            yield field, wire, first, pos, pos + 4
            after = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        pos = after


_RAW_DATA_FIELD = 9  # TensorProto.raw_data
# load_graph parses model files smaller than this whole (their weights are then held in the proto)
PARSE_WHOLE_BELOW = 64 << 20


def load_graph(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """The model at ``path`` without its weights' data, whether they are in external data or in
    the file itself: a tensor held in ``model.onnx`` becomes a reference to its bytes there
    (location ``model.onnx``), so a model saved as one file is handled like one with external
    data (``Weights`` reads a tensor when needed, ONNX Runtime reads them from the file) instead
    of being parsed into memory whole. Protobuf's wire format is walked over a memory map and the
    weight bytes are skipped, never read."""
    import mmap

    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InputError(f"{path} does not exist", "re-run the stage that wrote it") from None
    try:
        size = path.stat().st_size
        if size < PARSE_WHOLE_BELOW:  # small: parsing it whole costs nothing
            return load_model(path, load_external_data=False)
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _load_graph(buf, size, path.name)
        except (ValueError, IndexError) as exc:
            raise InputError(f"{path} is not a readable ONNX model ({exc})",
                             "the file is truncated or corrupt; re-run the stage that wrote it") from None
        finally:
            buf.close()
    finally:
        f.close()


def _load_graph(buf, size: int, location: str) -> onnx.ModelProto:
    model_rest, graph = bytearray(), None
    for field, wire, first, vs, ve in _fields(buf, 0, size):
        if field == _GRAPH_FIELD and wire == _LEN:
            graph = _graph_without_data(buf, vs, ve, location)
        else:
            model_rest += buf[first:ve]
    model = onnx.ModelProto.FromString(bytes(model_rest))
    if graph is not None:
        model.graph.CopyFrom(graph)
    return model


def _graph_without_data(buf, start: int, end: int, location: str) -> onnx.GraphProto:
    rest = bytearray()
    inits = []
    for field, wire, first, vs, ve in _fields(buf, start, end):
        if field != _INIT_FIELD or wire != _LEN:
            rest += buf[first:ve]
            continue
        head, raw = bytearray(), None
        for f2, w2, first2, vs2, ve2 in _fields(buf, vs, ve):
            if f2 == _RAW_DATA_FIELD and w2 == _LEN and ve2 - vs2 >= EMBED_BELOW:
                raw = (vs2, ve2 - vs2)
            else:
                head += buf[first2:ve2]
        t = TensorProto.FromString(bytes(head))
        if raw is not None:
            set_external(t, location, *raw)
        inits.append(t)
    graph = onnx.GraphProto.FromString(bytes(rest))
    graph.initializer.extend(inits)
    return graph


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
