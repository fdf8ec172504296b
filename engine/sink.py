"""The sink protocol: where the forward computes each stage, and the scratch sink.

The forward never decides where a stage's values live: for every stage it calls
``sink.buffer(stage, layer, shape)`` and computes into the float32 array it gets.
``layer`` is the layer index, or None for whole-model stages (embedding,
final_norm, lm_head). Before its first request the forward calls ``sink.begin(pos0, n)``
when the sink has it (the positions it is about to compute; a generation trace maps those rows).
A sink may also have ``reserve(stage, size)`` (preallocate), ``finish()`` and ``abort()``. ``NullSink`` hands out scratch; ``trace.sink.TraceSink``
hands out windows of memory-mapped files.
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
        # stage -> (shape, view) last handed out: a decode step asks for ~20 buffers per layer
        # with the same shapes, and slicing + reshaping each time cost ~0.4 ms per token (1.5B)
        self._views: dict[str, tuple[tuple, np.ndarray]] = {}

    def begin(self, pos0: int, n: int) -> None:
        """Called by the forward before it runs n tokens at positions pos0..; scratch needs nothing."""

    def reserve(self, stage: str, size: int) -> None:
        """Preallocate `size` floats for `stage` (run-state set-up, not the hot path)."""
        buf = self._scratch.get(stage)
        if buf is None or buf.size < size:
            self._scratch[stage] = np.empty(size, dtype=np.float32)
            self._views.clear()

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
        """A float32 scratch array of `shape` for (stage, layer)."""
        last = self._views.get(stage)
        if last is not None and last[0] == shape:
            return last[1]
        size = 1
        for d in shape:
            size *= d
        buf = self._scratch.get(stage)
        if buf is None or buf.size < size:
            buf = np.empty(max(size, 1), dtype=np.float32)
            self._scratch[stage] = buf
            self._views.clear()   # views of the old, smaller buffer must not be handed out again
        view = buf[:size].reshape(shape)
        self._views[stage] = (shape, view)
        return view

    def finish(self) -> None:
        """Called when the forward completed; nothing to publish for scratch."""

    def abort(self) -> None:
        """Called when the forward failed."""
