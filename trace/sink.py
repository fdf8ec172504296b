"""Sinks hand the forward the buffer each stage is computed into.

The forward never decides where a stage's values live: for every stage it calls
``sink.buffer(stage, layer, shape)`` and computes into the float32 array it gets.
``layer`` is the layer index, or None for whole-model stages (embedding,
final_norm, lm_head).
"""
from __future__ import annotations

import numpy as np


class NullSink:
    """Hands out reusable scratch: one growing flat float32 buffer per stage.

    Buffers are shared across layers (a stage's scratch for layer L+1 overwrites
    layer L's), so the forward must finish reading a stage's value before it asks
    for the same stage again. After the first forward of a given size nothing is
    allocated.
    """

    def __init__(self):
        self._scratch: dict[str, np.ndarray] = {}

    def reserve(self, stage: str, size: int) -> None:
        """Preallocate `size` floats for `stage` (run-state set-up, not the hot path)."""
        buf = self._scratch.get(stage)
        if buf is None or buf.size < size:
            self._scratch[stage] = np.empty(size, dtype=np.float32)

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
        size = 1
        for d in shape:
            size *= d
        buf = self._scratch.get(stage)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 1), dtype=np.float32)
            self._scratch[stage] = buf
        return buf[:size].reshape(shape)

    def finish(self) -> None:
        """Called when the forward completed; nothing to publish for scratch."""

    def abort(self) -> None:
        """Called when the forward failed."""
