"""Facts from a GGUF file's header: metadata and tensor infos, never tensor data.

The header is parsed here rather than with `gguf.GGUFReader`, which builds an object for every token
string: about 5 s for a 128k vocabulary (REFERENCE.md). Arrays of strings are skipped over, keeping
only their length (the vocabulary size is all a planner needs of them). The `gguf` package still
supplies the format's constants and the quantisation block sizes. Split models
(`NAME-00001-of-00003.gguf`) are read whole: metadata from the first shard, tensors from all.

Every file is hostile until checked: it is opened only if it is a regular file (a FIFO would block the
reader forever, a device could be endless), and every count and size is checked against the format's limits
and the file's own size before anything is built from it (`keys.py` checks the values the planner reads).
The same reader parses the start of a file fetched from elsewhere (`parse_header`: a hub model's, with the
file's size the hub gives), saying when the header goes on past the bytes at hand.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from launcher.plan.keys import ModelFileError as ModelFileError
from launcher.plan.keys import check_metadata

_MAGIC = b"GGUF"
_SCALARS: dict[int, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}
_VERSIONS = (2, 3)  # what llama.cpp reads
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 2**63 - 1  # ggml counts elements in an int64
_MAX_ENTRIES = 1 << 20  # metadata keys or tensors in one file: real models have a few thousand at most
_MAX_NUMBERS = 1 << 16  # numeric arrays kept (per-layer values); longer ones (token scores) are skipped
_SHARD = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    n_bytes: int


@dataclass(frozen=True)
class StringArray:
    """An array of strings, skipped: only its length is kept (a vocabulary)."""

    length: int


@dataclass(frozen=True)
class SkippedArray:
    """A long array of numbers (token scores or types), skipped: the planner needs none of it."""

    length: int


@dataclass(frozen=True)
class GgufFile:
    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    file_bytes: int = 0  # the first file's size (apparent: a sparse hole counts)
    data_end: int = 0  # where its last tensor's data ends: beyond file_bytes, the file is cut short

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch(self, key: str, default: Any = None) -> Any:
        """`{architecture}.{key}` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, StringArray):
            return tokens.length
        return int(self.arch("vocab_size", 0))


class HeaderIncomplete(ModelFileError):
    """The bytes at hand end inside the header and the file goes on: read more of it."""


# A file's header as parsed: metadata, tensors, the file's size and where its tensor data ends.
HeaderPart = tuple[dict[str, Any], list[TensorInfo], int, int]


class _Cursor:
    def __init__(self, data: memoryview, path: Path, file_bytes: int) -> None:
        self.data = data
        self.pos = 0
        self.path = path
        self.file_bytes = file_bytes

    def cut_short(self) -> ModelFileError:
        """The data ends inside the header: the file is cut short, or only its start was fetched."""
        if len(self.data) < self.file_bytes:
            return HeaderIncomplete(f"{self.path}: the GGUF header goes on past the first {len(self.data)} bytes")
        return ModelFileError(f"{self.path}: the GGUF header is cut short (truncated file?)")

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise self.cut_short()
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        end = self.pos + length
        if end > len(self.data):
            raise self.cut_short()
        text = bytes(self.data[self.pos : end]).decode("utf-8", errors="replace")
        self.pos = end
        return text

    def skip_strings(self, count: int) -> None:
        data, pos, limit = self.data, self.pos, len(self.data)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > limit:
                raise self.cut_short()
            pos += 8 + unpack(data, pos)[0]
        if pos > limit:
            raise self.cut_short()
        self.pos = pos

    def value(self, kind: int) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return self.string()
        if kind == gguf.GGUFValueType.ARRAY:
            item_kind, count = self.take("<I"), self.take("<Q")
            if item_kind == gguf.GGUFValueType.STRING:
                self.skip_strings(count)
                return StringArray(count)
            fmt = _SCALARS.get(item_kind)
            if fmt is None:
                raise ModelFileError(f"{self.path}: unknown GGUF array type {item_kind}")
            size = struct.calcsize(fmt)
            end = self.pos + size * count
            if end > len(self.data):
                raise self.cut_short()
            if count > _MAX_NUMBERS:
                self.pos = end
                return SkippedArray(count)
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, self.pos))
            self.pos = end
            return values
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ModelFileError(f"{self.path}: unknown GGUF value type {kind}")
        return self.take(fmt)


def _tensor_bytes(name: str, shape: tuple[int, ...], ggml_type: int, cursor: _Cursor) -> int:
    """The tensor's bytes, refused where its element count is more than ggml can hold or its data more
    than the whole file."""
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelFileError(f"{cursor.path}: tensor {name!r} has an unknown type {ggml_type}") from None
    elements = 1
    for dim in shape:
        elements *= dim
    n_bytes = elements // block * size
    if elements > _MAX_ELEMENTS or n_bytes > cursor.file_bytes:
        raise ModelFileError(
            f"{cursor.path}: tensor {name!r} claims {elements} elements ({n_bytes} bytes), more than the "
            f"file's {cursor.file_bytes} bytes"
        )
    return n_bytes


def _kind(mode: int) -> str:
    """What a path that is not a regular file is, in words."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return what
    return "not a regular file"


def regular_problem(path: Path) -> str | None:
    """What keeps ``path`` from being read as a model file, said after its name ("does not exist", "is
    a FIFO, not a regular file"), or None when it is a regular file. Only stat: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except PermissionError:
        return "cannot be read (permission denied)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a regular file"


def open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of ``path`` (``what`` names it in errors: "model file", "the --mmproj
    file"), opened only if it is a regular file and without blocking: a FIFO would block the open (and the
    placement lock with it) forever, and opening a device may act on it, so neither is ever opened."""
    problem = regular_problem(path)
    if problem is not None:
        raise ModelFileError(f"{what} {path} {problem}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:  # gone or changed since the stat
        raise ModelFileError(f"{what} {path} cannot be read ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # swapped for something else since the stat
        os.close(fd)
        raise ModelFileError(f"{what} {path} is {_kind(mode)}, not a regular file")
    return fd


def _read_one(path: Path, what: str) -> HeaderPart:
    with os.fdopen(open_regular(path, what), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelFileError(f"{what} {path} is not a GGUF model (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _parse(_Cursor(view, path, size))
            finally:
                view.release()


def parse_header(data: bytes, name: Path, file_bytes: int) -> HeaderPart:
    """The header in ``data``, the start of a file of ``file_bytes`` bytes named ``name`` in errors (a file
    fetched in part): HeaderIncomplete when the header goes on past ``data``."""
    if len(data) < 24:
        raise ModelFileError(f"{name} is not a GGUF model (too short)")
    with memoryview(data) as view:
        return _parse(_Cursor(view, name, file_bytes))


def _parse(cursor: _Cursor) -> HeaderPart:
    if bytes(cursor.data[:4]) != _MAGIC:
        raise ModelFileError(f"{cursor.path} is not a GGUF model (no GGUF magic)")
    cursor.pos = 4
    version = cursor.take("<I")
    if version not in _VERSIONS:
        raise ModelFileError(f"{cursor.path}: GGUF version {version} is not one llama.cpp reads (2 or 3)")
    n_tensors, n_kv = cursor.take("<Q"), cursor.take("<Q")
    for count, what in ((n_tensors, "tensors"), (n_kv, "metadata keys")):
        if count > _MAX_ENTRIES:
            raise ModelFileError(f"{cursor.path}: the header claims {count} {what}, more than {_MAX_ENTRIES}")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.take("<I"))
    tensors = []
    ends = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.take("<I")
        if n_dims > _MAX_DIMS:
            raise ModelFileError(f"{cursor.path}: tensor {name!r} has {n_dims} dimensions, more than {_MAX_DIMS}")
        dims = tuple(cursor.take("<Q") for _ in range(n_dims))
        ggml_type = cursor.take("<I")
        offset = cursor.take("<Q")  # in the data section
        tensors.append(TensorInfo(name, dims, ggml_type, _tensor_bytes(name, dims, ggml_type, cursor)))
        ends.append(offset + tensors[-1].n_bytes)
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or not 0 < alignment <= 1 << 20 or alignment & (alignment - 1):
        raise ModelFileError(f"{cursor.path}: general.alignment is {alignment!r}; it should be a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    return metadata, tensors, cursor.file_bytes, data_start + max(ends, default=0)


def read_gguf(path: Path, what: str = "model file") -> GgufFile:
    """The header of ``path`` (and of its sibling shards, for a split model); ``what`` names the file in
    errors."""
    first = _read_one(path, what)
    rest = []
    siblings = split_siblings(path, first[0])
    for sibling in siblings:
        if not sibling.exists():
            raise ModelFileError(f"{path} is split in {len(siblings) + 1} files but {sibling.name} is missing")
        rest.append(_read_one(sibling, f"{what} part"))
    return assemble(path, first, rest)


def split_siblings(path: Path, metadata: dict[str, Any]) -> list[Path]:
    """The other files of a split model whose first file is ``path`` (none for a model in one file), once
    the metadata the planner reads is checked (keys.py): the first file's header says how many there are."""
    check_metadata(path, metadata)
    shard = _SHARD.match(path.name)
    count = int(metadata.get("split.count", 1))
    if count <= 1:
        return []
    if shard is None or int(shard["no"]) != 1:
        raise ModelFileError(f"{path} is shard {metadata.get('split.no', '?')} of a split model: name the first")
    return [path.with_name(f"{shard['prefix']}-{no:05d}-of-{count:05d}.gguf") for no in range(2, count + 1)]


def assemble(path: Path, first: HeaderPart, rest: list[HeaderPart]) -> GgufFile:
    """The model of a file's header and, for a split model, its other files' (split_siblings checked)."""
    metadata, tensors, file_bytes, data_end = first
    return GgufFile(
        path=path,
        metadata=metadata,
        tensors=[*tensors, *(t for part in rest for t in part[1])],
        file_bytes=file_bytes,
        data_end=data_end,
    )
