"""Exact per-block dequantizers (bit-identical to gguf.quants.dequantize).

Each `dq_<type>(blk, dst, lut)` decodes one block (a uint8 view of its bytes)
into `dst` (a view of exactly block_elems floats), evaluating the same float32
expression in the same order as gguf's reference, so results match bitwise.
For Q8_0 and Q4_1 the inner loop bound is taken from `dst.shape[0]` instead of
a constant: with a constant LLVM fully unrolls those short loops into scalar
code instead of vectorizing them (Q8_0: 2.1 vs 5.8 Gelem/s); the other types
vectorize better with constant bounds.
The registry (kernels/quants.py) ties each decoder to its type; `kernels._span.dq_span_of`
decodes a run of whole blocks of a registered type.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from kernels.f16 import half


@njit(cache=True, inline="always")
def q4k_scale_min(s, j):
    """6-bit (scale, min) of sub-block j from the 12 packed scale bytes `s` of a Q4_K block."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


# Numba widens every integer operation to int64, which LLVM then vectorizes in
# 64-bit lanes; wrapping each step in i32() keeps the decode in 32-bit lanes.
i32 = np.int32


@njit(cache=True, inline="always")
def i8(b):
    """A uint8 byte reinterpreted as a signed int8, widened to int32."""
    return i32(i32(i32(b) ^ i32(128)) - i32(128))


@njit(cache=True, inline="always")
def q5_high_bits(row, o):
    """The 32 fifth bits of a Q5_0 block: the little-endian uint32 at row[o:o+4], as int32."""
    return i32(i32(row[o]) | i32(i32(row[o + 1]) << i32(8))
               | i32(i32(row[o + 2]) << i32(16)) | i32(i32(row[o + 3]) << i32(24)))


_BIT = (np.int32(1) << np.arange(32, dtype=np.int32)).astype(np.int32)   # _BIT[j] = bit j


@njit(cache=True, inline="always")
def q5_pair(byte, qh, j):
    """Signed Q5_0 values of elements j and j + 16 (byte = qs[j], j < 16)."""
    v = i32(byte)
    lo = i32(i32(v & i32(15)) | (i32(16) if i32(qh & _BIT[j]) != 0 else i32(0)))
    hi = i32(i32(v >> i32(4)) | (i32(16) if i32(qh & _BIT[j + 16]) != 0 else i32(0)))
    return i32(lo - i32(16)), i32(hi - i32(16))


@njit(cache=True, inline="always")
def q6_quad(a, b, c):
    """Signed Q6_K values of elements l, l+32, l+64, l+96 from ql[l], ql[l+32], qh[l]."""
    a, b, c = i32(a), i32(b), i32(c)
    q0 = i32(i32(a & i32(15)) | i32(i32(c & i32(3)) << i32(4)))
    q1 = i32(i32(b & i32(15)) | i32(i32(c & i32(12)) << i32(2)))
    q2 = i32(i32(a >> i32(4)) | i32(c & i32(48)))
    q3 = i32(i32(b >> i32(4)) | i32(i32(c >> i32(2)) & i32(48)))
    return i32(q0 - i32(32)), i32(q1 - i32(32)), i32(q2 - i32(32)), i32(q3 - i32(32))


@njit(cache=True, inline="always")
def dq_q4_1(blk, dst, lut):
    d, m = half(blk, 0, lut), half(blk, 2, lut)
    h = dst.shape[0] // 2                 # 16, but opaque to LLVM: see the module doc
    for j in range(h):
        v = i32(blk[4 + j])
        dst[j] = d * np.float32(i32(v & i32(15))) + m
        dst[j + h] = d * np.float32(i32(v >> i32(4))) + m


@njit(cache=True, inline="always")
def dq_q5_0(blk, dst, lut):
    d, qh = half(blk, 0, lut), q5_high_bits(blk, 2)
    for j in range(16):
        lo, hi = q5_pair(blk[6 + j], qh, j)
        dst[j] = d * np.float32(lo)
        dst[j + 16] = d * np.float32(hi)


@njit(cache=True, inline="always")
def dq_q8_0(blk, dst, lut):
    d = half(blk, 0, lut)
    for j in range(dst.shape[0]):         # 32, but opaque to LLVM: see the module doc
        dst[j] = np.float32(i8(blk[2 + j])) * d


@njit(cache=True, inline="always")
def dq_q4_k(blk, dst, lut):
    d, dmin = half(blk, 0, lut), half(blk, 2, lut)
    for j in range(4):
        sc0, m0 = q4k_scale_min(blk[4:16], 2 * j)
        sc1, m1 = q4k_scale_min(blk[4:16], 2 * j + 1)
        a0, b0 = d * np.float32(sc0), dmin * np.float32(m0)
        a1, b1 = d * np.float32(sc1), dmin * np.float32(m1)
        for l in range(32):
            v = i32(blk[16 + 32 * j + l])
            dst[64 * j + l] = a0 * np.float32(i32(v & i32(15))) - b0
            dst[64 * j + 32 + l] = a1 * np.float32(i32(v >> i32(4))) - b1


@njit(cache=True, inline="always")
def dq_q6_k(blk, dst, lut):
    d = half(blk, 208, lut)
    for h in range(2):
        for g in range(2):
            s = 192 + 8 * h + g
            d0, d1 = d * np.float32(i8(blk[s])), d * np.float32(i8(blk[s + 2]))
            d2, d3 = d * np.float32(i8(blk[s + 4])), d * np.float32(i8(blk[s + 6]))
            qa, qc, e = 64 * h + 16 * g, 128 + 32 * h + 16 * g, 128 * h + 16 * g
            for l in range(16):
                q0, q1, q2, q3 = q6_quad(blk[qa + l], blk[qa + 32 + l], blk[qc + l])
                dst[e + l] = d0 * np.float32(q0)
                dst[e + 32 + l] = d1 * np.float32(q1)
                dst[e + 64 + l] = d2 * np.float32(q2)
                dst[e + 96 + l] = d3 * np.float32(q3)
