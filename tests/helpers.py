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


# byte offsets of the f16 factors that multiply a whole block, per ggml type: d, and for the
# types that subtract a minimum its factor too (Q4_1/Q5_1 m; Q4_K/Q5_K dmin), so that scaling
# all of them scales every value of the block
BLOCK_SCALE_OFFSETS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def scale_tensor_rows(src, dst, tensor: str, factor: float, rows=None) -> None:
    """Copy a GGUF file with rows (output units; default all) of one quantized matrix scaled by
    `factor`, by scaling each of their blocks' f16 factors (so each value is scaled to f16
    rounding of the factor, ~5e-4 relative): a weight fault a cosine alone cannot see."""
    import shutil
    from engine.gguf_reader import GGUFFile
    from kernels.quants import GGML_TYPES
    shutil.copyfile(src, dst)
    info = GGUFFile(dst).tensors[tensor]
    elems, block = GGML_TYPES[info.ggml_type]
    per_row = info.ne[0] // elems
    n_rows = info.nbytes // block // per_row
    mm = np.memmap(dst, dtype=np.uint8, mode="r+", offset=info.offset, shape=(n_rows, per_row, block))
    sel = np.arange(n_rows) if rows is None else np.asarray(rows)
    for off in BLOCK_SCALE_OFFSETS[info.ggml_type]:
        f16 = mm[sel, :, off:off + 2].copy().view(np.float16)
        mm[sel, :, off:off + 2] = (f16.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
    mm.flush()
    del mm
