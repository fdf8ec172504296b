"""Sinks hand the forward the buffer each stage is computed into.

The forward never decides where a stage's values live: for every stage it calls
``sink.buffer(stage, layer, shape)`` and computes into the float32 array it gets.
``layer`` is the layer index, or None for whole-model stages (embedding,
final_norm, lm_head).
"""
from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import numpy as np

from engine import failpoints
from trace.aprt import create_aprt, partial_path, stage_path


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

    def reserve(self, stage: str, size: int) -> None:
        """Preallocate `size` floats for `stage` (run-state set-up, not the hot path)."""
        buf = self._scratch.get(stage)
        if buf is None or buf.size < size:
            self._scratch[stage] = np.empty(size, dtype=np.float32)
            self._views.clear()

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
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


class TraceSink:
    """Hands out, for each (stage, layer) the plan wants, a memmap of a new APRT file's body.

    The file is created as ``<final path>.partial`` at its final size, so the forward's
    kernels write straight into it (zero copy). ``finish()`` publishes the files by
    renaming; ``abort()`` deletes them, so a failed forward leaves nothing that looks
    complete. Unwanted stages get scratch from an internal NullSink. Used as a context
    manager it finishes on a clean exit and aborts on an exception.
    """

    def __init__(self, out_dir, plan, n_layers: int):
        bad = [layer for layer in plan.layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"plan layer {bad[0]} is out of range: the model has {n_layers} layers")
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.n_layers = n_layers
        self._scratch = NullSink()
        self._requested: set[tuple[str, int | None]] = set()
        self._copies: list = []
        # the sink keeps only a weak reference to each file's map: once the forward drops a
        # buffer its pages are unmapped (they stay in the page cache, not in this process's RSS),
        # so a capture of every stage of every layer costs about one layer of resident memory
        self._open: list[tuple[str, int | None, tuple, Path, weakref.ref]] = []

    def reserve(self, stage: str, size: int) -> None:
        """Preallocate scratch for unwanted stages (see NullSink.reserve)."""
        self._scratch.reserve(stage, size)

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
        """The float32 array of `shape` the forward computes (stage, layer) into."""
        key = (stage, layer)
        if key in self._requested:
            raise ValueError(f"stage {stage} layer {layer} was requested twice in one forward")
        self._requested.add(key)
        if not self.plan.wants(stage, layer):
            return self._scratch.buffer(stage, layer, shape)
        path = stage_path(self.out_dir, stage, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = create_aprt(partial_path(path), layer, math.prod(shape))
        if failpoints.active("sink.publish_early"):
            path.unlink(missing_ok=True)
            os.link(partial_path(path), path)
        if failpoints.active("sink.copy"):
            self._copies.append((body, scratch := np.zeros(shape, np.float32)))
            self._open.append((stage, layer, tuple(shape), path, weakref.ref(body)))
            return scratch
        self._open.append((stage, layer, tuple(shape), path, weakref.ref(body)))
        return body.reshape(shape)

    def finish(self) -> list[tuple[str, int | None, tuple, Path]]:
        """Flush and publish every file of this forward; return (stage, layer, shape, path) for each."""
        written = []
        for body, scratch in self._copies:  # only under the sink.copy fail point
            body[:] = scratch.reshape(-1)
        for stage, layer, shape, path, ref in self._open:
            body = ref()
            if body is not None:  # still mapped (held by the caller): write it back now
                body.flush()
            os.replace(partial_path(path), path)
            written.append((stage, layer, shape, path))
        self._reset()
        return written

    def abort(self) -> None:
        """Delete this forward's unfinished files."""
        for _, _, _, path, _ in self._open:
            partial_path(path).unlink(missing_ok=True)
        self._reset()

    def _reset(self) -> None:
        self._copies = []
        self._open = []
        self._requested = set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()
        return False
