"""Small test-only helpers shared by several test files."""
from __future__ import annotations

import numpy as np


class KeepSink:
    """A sink that hands out a fresh NaN-filled array per (stage, layer) and keeps them all."""

    def __init__(self):
        self.kept = {}

    def buffer(self, stage, layer, shape):
        assert (stage, layer) not in self.kept, f"{stage} layer {layer} requested twice"
        self.kept[stage, layer] = np.full(shape, np.nan, dtype=np.float32)
        return self.kept[stage, layer]


def rel_err(got, want) -> float:
    """max |got - want| relative to max |want| (float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def memmap_base(arr):
    """The np.memmap in arr's base chain that owns the mapping (its base is an mmap.mmap), or None."""
    while isinstance(arr, np.ndarray):
        if isinstance(arr, np.memmap) and not isinstance(arr.base, np.ndarray):
            return arr
        arr = arr.base
    return None
