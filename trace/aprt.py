"""APRT files: a 12-byte header then float32 values (see ../shared/DESIGN.md).

Layout, all little-endian: magic ``b"APRT"``; u32 layer index (``WHOLE_MODEL`` for
a whole-model stage); u32 count of values; ``count`` f32 values, row-major.
Values are stored and read back bit for bit (NaN payloads, Inf, -0.0).
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import failpoints
from trace.stages import STAGE_INDEX, WHOLE_MODEL_STAGES

MAGIC = b"APRT"
WHOLE_MODEL = 0xFFFFFFFF
MAX_COUNT = 0xFFFFFFFF
HEADER = struct.Struct("<4sII")
DTYPE = np.dtype("<f4")


class AprtError(ValueError):
    """A malformed APRT file or an unwritable header; the message is one line naming the file."""


@dataclass(frozen=True)
class AprtFile:
    """A read APRT file; ``values`` is a read-only float32 memmap of the body."""

    path: Path
    layer: int | None
    count: int
    values: np.memmap


def stage_path(out_dir, stage: str, layer: int | None) -> Path:
    """Where a stage's file lives in a capture directory.

    Per-layer stages (layer given): ``<out>/layer-<N>/<stage>.bin``; ``final_norm``
    and ``lm_head`` (layer None): ``<out>/<stage>.bin``; ``embedding`` (layer None):
    ``<out>/layer-0/embedding.bin``.
    """
    if stage not in STAGE_INDEX:
        raise ValueError(f"unknown stage {stage!r}")
    whole = stage in WHOLE_MODEL_STAGES
    if whole != (layer is None):
        kind = "a whole-model stage: layer must be None" if whole else "a per-layer stage: layer is required"
        raise ValueError(f"{stage} is {kind}, got {layer!r}")
    out = Path(out_dir)
    if stage == "embedding":
        return out / "layer-0" / "embedding.bin"
    if whole:
        return out / f"{stage}.bin"
    return out / f"layer-{layer}" / f"{stage}.bin"


def partial_path(path) -> Path:
    """The name a file is written under until it is complete: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def header_bytes(path, layer: int | None, count: int) -> bytes:
    """The 12-byte header of a file holding `count` values of `layer` (None: whole-model)."""
    return _header(path, layer, count)


def _header(path, layer: int | None, count: int) -> bytes:
    field = WHOLE_MODEL if layer is None else layer
    if not 0 <= field <= WHOLE_MODEL:
        raise AprtError(f"{path}: layer {layer} does not fit the u32 layer field")
    if not 0 <= count <= MAX_COUNT:
        raise AprtError(f"{path}: count {count} would overflow the u32 count field (max {MAX_COUNT})")
    if failpoints.active("aprt.header_layer"):
        field = (field + 1) & WHOLE_MODEL
    return HEADER.pack(MAGIC, field, count)


def write_aprt(path, layer: int | None, values: np.ndarray) -> None:
    """Write ``values`` (flattened, as float32 LE) atomically: ``<path>.partial`` then rename."""
    path = Path(path)
    header = _header(path, layer, np.size(values))
    body = np.ascontiguousarray(values, dtype=DTYPE).reshape(-1)
    if failpoints.active("aprt.nan_canonical"):
        body = np.where(np.isnan(body), np.float32("nan"), body).astype(DTYPE)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as f:
            f.write(header)
            f.write(body.data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def create_aprt(path, layer: int | None, n_values: int) -> np.memmap:
    """Create ``path`` at its final size with its header; return a writable memmap of the body.

    The body's disk blocks are reserved up front (posix_fallocate), so a full disk or a file-size
    limit is an OSError (ENOSPC, EFBIG) here, never a SIGBUS when a kernel writes into the map."""
    header = _header(path, layer, n_values)
    size = HEADER.size + DTYPE.itemsize * n_values
    with open(path, "wb") as f:
        f.write(header)
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(e.errno, e.strerror, str(path)) from None
            f.truncate(size)  # a file system without fallocate: sparse, as before
    return np.memmap(path, dtype=DTYPE, mode="r+", offset=HEADER.size, shape=(n_values,))


def read_aprt(path) -> AprtFile:
    """Read an APRT file's header and map its body read-only; raise AprtError if malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise AprtError(f"{path}: cannot read: {e.strerror}") from None
    if len(head) < HEADER.size:
        raise AprtError(f"{path}: header truncated: {len(head)} bytes, an APRT header is {HEADER.size}")
    magic, field, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise AprtError(f"{path}: not an APRT file (magic {magic!r}, expected {MAGIC!r})")
    body = size - HEADER.size
    if body != DTYPE.itemsize * count:
        raise AprtError(
            f"{path}: body is {body} bytes but the header says {count} values ({DTYPE.itemsize * count} bytes)")
    values = np.memmap(path, dtype=DTYPE, mode="r", offset=HEADER.size, shape=(count,))
    return AprtFile(path, None if field == WHOLE_MODEL else field, count, values)
