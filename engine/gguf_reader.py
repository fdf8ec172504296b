"""A purpose-built GGUF parser over np.memmap.

`gguf.GGUFReader` builds Python objects for every element of the vocabulary and
merge arrays (seconds on a 150k vocabulary); this parser decodes only what we
use and leaves tensor data as memory-mapped views. Every length and offset is
checked against the file size before it is trusted.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from kernels.ggml import FORMAT, block_shape, type_name

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Caps on what a header may make us allocate (real models are far below them: ~300 KV pairs,
# ~2,000 tensors, vocabularies and merge lists of ~300k strings, chat templates of a few KB).
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_STRING = 1 << 24        # bytes in one string
MAX_ARRAY = 1 << 24         # elements in one string or nested array (numeric arrays are zero-copy views)
MAX_NESTING = 4             # arrays of arrays of ...

# GGUF metadata value types
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


def _show(name: str, limit: int = 80) -> str:
    """A key or tensor name fit for a one-line message: control characters escaped, long names cut."""
    if len(name) > limit:
        name = name[:limit] + "..."
    return name if name.isprintable() else repr(name)[1:-1]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    ne: tuple          # GGUF dims, ne[0] fastest (columns)
    offset: int        # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata` (dict) and `.tensors` (name -> TensorInfo)."""

    def __init__(self, path):
        self.path = Path(path)
        name = str(self.path)
        try:
            self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            if self.path.exists() and self.path.stat().st_size == 0:
                raise EngineError(f"{name}: not a GGUF file (empty)") from None
            raise EngineError(f"{name}: cannot open: {e}") from None
        self.size = int(self.mm.size)
        self._buf = memoryview(self.mm)
        self._pos = 0
        self.metadata: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # -- low-level readers, each bounds-checked ------------------------------------
    def _fail(self, what: str) -> EngineError:
        return EngineError(f"{self.path}: {what}")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"truncated file: {what} at byte {self._pos} extends past the end ({self.size} bytes)")

    def _scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        v = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += n
        return v

    def _string(self, what: str) -> str:
        n = self._scalar("<Q", what)
        if n > MAX_STRING:
            raise self._fail(f"{what}: string length {n} exceeds the limit of {MAX_STRING} bytes")
        self._need(n, what)
        raw = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not valid UTF-8") from None

    def _string_array(self, count: int, key: str) -> list[str]:
        """`count` strings from the current position: what `_string` reads `count` times, in one
        loop without a call, a format lookup or a message per element (a vocabulary and its
        merges are ~300k strings, and this loop is most of a warm start's file parsing). A bad
        element is read again by `_string`, which raises the error naming it."""
        buf, size, pos = self._buf, self.size, self._pos
        unpack, out = _U64.unpack_from, [None] * count
        for i in range(count):
            end = pos + 8
            if end <= size:
                n = unpack(buf, pos)[0]
                stop = end + n
                if n <= MAX_STRING and stop <= size:
                    try:
                        out[i] = str(buf[end:stop], "utf-8")
                        pos = stop
                        continue
                    except UnicodeDecodeError:
                        pass
            self._pos = pos
            self._string(f"element {i} of {key}")   # raises with the details
            raise AssertionError("unreachable: _string accepted what the fast loop refused")
        self._pos = pos
        return out

    def _value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self._scalar(_SCALARS[vtype], f"value of {key}")
        if vtype == _STRING:
            return self._string(f"value of {key}")
        if vtype == _ARRAY:
            etype = self._scalar("<I", f"array type of {key}")
            count = self._scalar("<Q", f"array length of {key}")
            if etype in _NP_SCALARS:
                item = np.dtype(_NP_SCALARS[etype]).itemsize
                self._need(count * item, f"array {key} ({count} elements)")
                arr = np.frombuffer(self._buf, dtype=_NP_SCALARS[etype], count=count, offset=self._pos)
                self._pos += count * item
                return arr.astype(bool) if etype == 7 else arr
            if etype in (_STRING, _ARRAY) and count > MAX_ARRAY:
                raise self._fail(f"array {key}: {count} elements exceed the limit of {MAX_ARRAY}")
            if etype == _STRING:
                # each string needs at least its 8-byte length: cap what a header can make us allocate
                self._need(count * 8, f"array {key} ({count} strings)")
                return self._string_array(count, key)
            if etype == _ARRAY:
                if depth >= MAX_NESTING:
                    raise self._fail(f"array {key}: arrays nested more than {MAX_NESTING} deep")
                self._need(count * 12, f"array {key} ({count} nested arrays)")
                return [self._value(_ARRAY, key, depth + 1) for _ in range(count)]
            raise self._fail(f"metadata {key}: unknown array element type {etype}")
        raise self._fail(f"metadata {key}: unknown value type {vtype}")

    # -- the file ----------------------------------------------------------------------
    def _parse(self) -> None:
        if self.size < 4 or bytes(self._buf[:4]) != GGUF_MAGIC:
            raise self._fail("not a GGUF file (bad magic)")
        self._pos = 4
        version = self._scalar("<I", "version")
        if version not in (2, 3):
            raise self._fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        n_tensors = self._scalar("<Q", "tensor count")
        n_kv = self._scalar("<Q", "metadata count")
        # Every KV needs >= 12 bytes, every tensor info >= 24: reject absurd counts early.
        if n_kv * 12 > self.size or n_tensors * 24 > self.size:
            raise self._fail(f"header counts ({n_kv} metadata, {n_tensors} tensors) exceed the file size")
        if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
            raise self._fail(f"header counts ({n_kv} metadata, {n_tensors} tensors) exceed the limits "
                             f"({MAX_KV}, {MAX_TENSORS})")
        for _ in range(n_kv):
            key = self._string("metadata key")
            shown = _show(key)
            if key in self.metadata:
                raise self._fail(f"metadata key {shown} is duplicated")
            vtype = self._scalar("<I", f"type of {shown}")
            self.metadata[key] = self._value(vtype, shown)
        infos, names = [], set()
        for _ in range(n_tensors):
            raw_name = self._string("tensor name")
            name = _show(raw_name)
            n_dims = self._scalar("<I", f"dims of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {name}: bad number of dimensions {n_dims}")
            ne = tuple(self._scalar("<Q", f"shape of tensor {name}") for _ in range(n_dims))
            gtype = self._scalar("<I", f"type of tensor {name}")
            offset = self._scalar("<Q", f"offset of tensor {name}")
            if raw_name in names:
                raise self._fail(f"tensor {name}: duplicated")
            names.add(raw_name)
            infos.append((raw_name, n_dims, ne, gtype, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise self._fail(f"general.alignment {align!r} is not a power of two")
        self.alignment = align
        data_start = (self._pos + align - 1) // align * align
        self.data_start = data_start
        for raw_name, n_dims, ne, gtype, offset in infos:
            name = _show(raw_name)
            if gtype not in FORMAT:   # sizes come from the format; what we compute with is checked later
                raise self._fail(f"tensor {name}: unknown tensor type {type_name(gtype)}")
            elems, bsize = block_shape(gtype)
            n = 1
            for d in ne:
                if d <= 0:
                    raise self._fail(f"tensor {name}: bad dimension {d} in shape {list(ne)}")
                n *= d
            if ne[0] % elems:
                raise self._fail(f"tensor {name}: row length {ne[0]} is not a multiple of the "
                                 f"{type_name(gtype)} block size {elems}")
            nbytes = n // elems * bsize
            start = data_start + offset
            if offset % align:
                raise self._fail(f"tensor {name}: offset {offset} is not aligned to {align}")
            if start + nbytes > self.size:
                raise self._fail(f"tensor {name}: data [{start}, {start + nbytes}) extends past the end "
                                 f"of the file ({self.size} bytes); truncated?")
            self.tensors[raw_name] = TensorInfo(raw_name, gtype, ne, start, nbytes)

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor as a read-only 2-D uint8 view [rows, row_bytes]."""
        info = self.tensors[name]
        elems, bsize = block_shape(info.ggml_type)
        row_bytes = info.ne[0] // elems * bsize
        rows = info.nbytes // row_bytes
        return self.mm[info.offset:info.offset + info.nbytes].reshape(rows, row_bytes)
