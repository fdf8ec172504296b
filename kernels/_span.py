"""Exact decoding of runs of blocks of any registered type (kernels/quants.py).

`dq_span_of` is what the embedding lookup (`dequantize_rows`) and the float matmuls
(kernels/_gemm.py) are built on: each of them is compiled per weight type, on first use, with
that type's decoder inlined from the registry, so a new type's decoder is reached here without
editing this file. (One kernel over a runtime switch of every type, every decoder inlined,
took ~45 s to compile where one type's kernel takes a few seconds. A kernel cache made from
other sources of this package is cleared at import: kernels/__init__.py.)
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kernels.quants import BF16, F16, F32, TYPES


def _type_blocks(t):
    """An inlined `blocks(row, e0, e1, dst, lut)`: type t's decoder over the blocks covering
    elements [e0, e1) of a row, its decoder called as a constant (so Numba inlines it)."""
    bsize, elems, dq = t.block_bytes, t.block_elems, t.dequant

    @njit(inline="always")
    def blocks(row, e0, e1, dst, lut):
        for b in range(e0 // elems, e1 // elems):
            dq(row[b * bsize:(b + 1) * bsize], dst[b * elems - e0:(b + 1) * elems - e0], lut)
    return blocks


@njit(inline="always")
def _span_f32(row, e0, e1, dst):
    src = row[4 * e0:4 * e1].view(np.float32)
    for i in range(e1 - e0):
        dst[i] = src[i]


@njit(inline="always")
def _span_f16(row, e0, e1, dst, lut):
    src = row[2 * e0:2 * e1].view(np.uint16)
    for i in range(e1 - e0):
        dst[i] = lut[src[i]]


@njit(inline="always")
def _span_bf16(row, e0, e1, dst):   # the top half of a float32
    src = row[2 * e0:2 * e1].view(np.uint16)
    bits = dst[:e1 - e0].view(np.uint32)
    for i in range(e1 - e0):
        bits[i] = np.uint32(src[i]) << np.uint32(16)


def dq_span_of(qtype, row, e0, e1, dst, lut):
    """Decode elements [e0, e1) of a row (block-aligned) into dst[0:e1-e0], for a qtype known
    when compiling (a constant, registered): only that type's decoder is compiled in, inlined
    (a decoder called through a function pointer decodes half as fast: 2.4 vs 5.0 Gelem/s on
    Q4_K). Callable from njit code only."""
    raise NotImplementedError("dq_span_of is called from Numba-compiled code")


@overload(dq_span_of, inline="always")
def _dq_span_of(qtype, row, e0, e1, dst, lut):
    if not isinstance(qtype, types.IntegerLiteral):
        return None
    qid = qtype.literal_value
    if qid == F32:
        return lambda qtype, row, e0, e1, dst, lut: _span_f32(row, e0, e1, dst)
    if qid == F16:
        return lambda qtype, row, e0, e1, dst, lut: _span_f16(row, e0, e1, dst, lut)
    if qid == BF16:
        return lambda qtype, row, e0, e1, dst, lut: _span_bf16(row, e0, e1, dst)
    blocks = _type_blocks(TYPES[qid])
    return lambda qtype, row, e0, e1, dst, lut: blocks(row, e0, e1, dst, lut)


@functools.cache
def _rows_kernel(qid: int):
    """The embedding lookup kernel of one type. qid is a closure constant: Numba types it as a
    literal (so dq_span_of compiles that type only), and its cache keys each closure on the
    values it captures, so every type's kernel is cached apart."""
    @njit(cache=True, parallel=True)
    def dequantize_rows_of(w, ids, out, lut):
        cols = out.shape[1]
        for i in prange(ids.shape[0]):
            dq_span_of(qid, w[ids[i]], 0, cols, out[i], lut)
    return dequantize_rows_of


def dequantize_rows(w, qtype: int, ids, out, lut) -> None:
    """out[i, :] = dequantized row ids[i] of w (ids already range-checked, qtype registered)."""
    _rows_kernel(int(qtype))(w, ids, out, lut)
