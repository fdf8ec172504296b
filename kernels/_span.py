"""Exact decoding of runs of blocks of any registered type (kernels/quants.py).

`dq_span` is what the batched float matmul (kernels/_gemm.py) is built on: a runtime
switch over every type, its dispatch derived from the registry's decoders, so a new
type's decoder is reached here without editing this file. The embedding lookup
(`dequantize_rows`) instead compiles one kernel per type, on first use: it runs for
every model, and the all-type switch took ~45 s of a first run's ~80 s of compiling
(every decoder inlined), where one type's kernel takes a few seconds. (A kernel cache
made from other sources of this package is cleared at import: kernels/__init__.py.)
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from kernels.quants import BF16, F16, F32, TYPES


@njit(inline="always")
def _no_decoder(qtype, row, e0, e1, dst, lut):
    pass


def _type_blocks(t):
    """An inlined `blocks(row, e0, e1, dst, lut)`: type t's decoder over the blocks covering
    elements [e0, e1) of a row, its decoder called as a constant (so Numba inlines it)."""
    bsize, elems, dq = t.block_bytes, t.block_elems, t.dequant

    @njit(inline="always")
    def blocks(row, e0, e1, dst, lut):
        for b in range(e0 // elems, e1 // elems):
            dq(row[b * bsize:(b + 1) * bsize], dst[b * elems - e0:(b + 1) * elems - e0], lut)
    return blocks


def _decoder_chain(types):
    """One function `decode(qtype, row, e0, e1, dst, lut)` that decodes the blocks covering
    elements [e0, e1) of a row with the decoder of `qtype`, for every block type of the registry.

    Built as a chain of inlined tests, one per type, each calling its decoder as a constant:
    Numba then inlines every decoder, as a hand-written if-chain would. (A tuple of decoders
    iterated with literal_unroll compiles to calls through function pointers instead, which
    halves the decode speed: 2.4 vs 5.0 Gelem/s on Q4_K.)"""
    decode = _no_decoder
    for t in types:
        def link(prev, qid=t.id, blocks=_type_blocks(t)):
            @njit(inline="always")
            def decode(qtype, row, e0, e1, dst, lut):
                if qtype == qid:
                    blocks(row, e0, e1, dst, lut)
                else:
                    prev(qtype, row, e0, e1, dst, lut)
            return decode
        decode = link(decode)
    return decode


_decode_blocks = _decoder_chain([t for t in TYPES.values() if t.dequant is not None])


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


@njit(cache=True)
def dq_span(qtype, row, e0, e1, dst, lut):
    """Decode elements [e0, e1) of a row (block-aligned) into dst[0:e1-e0]; the caller has
    validated qtype against the registry."""
    if qtype == F32:
        _span_f32(row, e0, e1, dst)
    elif qtype == F16:
        _span_f16(row, e0, e1, dst, lut)
    elif qtype == BF16:
        _span_bf16(row, e0, e1, dst)
    else:
        _decode_blocks(qtype, row, e0, e1, dst, lut)


def dq_span_of(qtype, row, e0, e1, dst, lut):
    """dq_span for a qtype known when compiling (a constant): only that type's decoder is
    compiled in. Callable from njit code only."""
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
