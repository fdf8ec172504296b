"""Fused dequantize + dot-product kernels for one activation vector (decode).

Every kernel computes out[r] = dot(dequant(w[r]), x) for all rows, in parallel
over chunks of CHUNK rows. Weights are decoded in registers, never stored: each
block is walked in unit-stride loops over 16 or 32 lanes that add into lane
accumulators `acc[l]` (one per thread, summed once per row), which LLVM turns
into byte-unpack, `vcvtdq2ps` and `vfmadd` on 512-bit vectors. Block slices are
taken once per block and indexed with constant offsets inside it: per-sub-block
slices cost ~35% in bounds bookkeeping. Each dequantized weight is the same
float32 as the reference (`dq_*`); only the summation order differs.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels._dequant import i8, i32, q4k_scale_min, q5_high_bits, q5_pair, q6_quad
from kernels.f16 import half

FASTMATH = {"contract", "reassoc", "nsz"}   # no nnan/ninf: NaN and Inf propagate as in numpy
CHUNK = 32                                  # rows per parallel work item


@njit(cache=True, inline="always")
def _lane_sum(acc):
    t = np.float32(0.0)
    for l in range(acc.shape[0]):
        t += acc[l]
    return t


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_q4_k(w, x, out, lut):
    rows, nb = w.shape[0], w.shape[1] // 144
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(32, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            row = w[r]
            acc[:] = 0.0
            for b in range(nb):
                blk, xb = row[b * 144:b * 144 + 144], x[b * 256:b * 256 + 256]
                d, dmin = half(blk, 0, lut), half(blk, 2, lut)
                for j in range(4):
                    sc0, m0 = q4k_scale_min(blk[4:16], 2 * j)
                    sc1, m1 = q4k_scale_min(blk[4:16], 2 * j + 1)
                    a0, b0 = d * np.float32(sc0), dmin * np.float32(m0)
                    a1, b1 = d * np.float32(sc1), dmin * np.float32(m1)
                    for l in range(32):
                        v = i32(blk[16 + 32 * j + l])
                        acc[l] += ((a0 * np.float32(i32(v & i32(15))) - b0) * xb[64 * j + l]
                                   + (a1 * np.float32(i32(v >> i32(4))) - b1) * xb[64 * j + 32 + l])
            out[r] = _lane_sum(acc)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_q6_k(w, x, out, lut):
    rows, nb = w.shape[0], w.shape[1] // 210
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(16, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            row = w[r]
            acc[:] = 0.0
            for b in range(nb):
                blk, xb = row[b * 210:b * 210 + 210], x[b * 256:b * 256 + 256]
                d = half(blk, 208, lut)
                for h in range(2):
                    for g in range(2):
                        s = 192 + 8 * h + g
                        d0, d1 = d * np.float32(i8(blk[s])), d * np.float32(i8(blk[s + 2]))
                        d2, d3 = d * np.float32(i8(blk[s + 4])), d * np.float32(i8(blk[s + 6]))
                        qa, qc, e = 64 * h + 16 * g, 128 + 32 * h + 16 * g, 128 * h + 16 * g
                        for l in range(16):
                            q0, q1, q2, q3 = q6_quad(blk[qa + l], blk[qa + 32 + l], blk[qc + l])
                            acc[l] += ((d0 * np.float32(q0)) * xb[e + l] + (d1 * np.float32(q1)) * xb[e + 32 + l]
                                       + (d2 * np.float32(q2)) * xb[e + 64 + l] + (d3 * np.float32(q3)) * xb[e + 96 + l])
            out[r] = _lane_sum(acc)


@njit(cache=True, inline="always")
def _pair(row, x, b, nb, bsize):
    """Bytes and x-slices of blocks b and b+1 (32-element types), decoded in one loop
    pass (a pass per block costs ~1.5x in overhead). For odd nb the last block is
    paired with itself and the returned factor w1, which scales the partner's d
    and m, is 0 so it adds nothing."""
    b1 = min(b + 1, nb - 1)
    k0, k1 = row[b * bsize:(b + 1) * bsize], row[b1 * bsize:(b1 + 1) * bsize]
    x0, x1 = x[b * 32:b * 32 + 32], x[b1 * 32:b1 * 32 + 32]
    return k0, k1, x0, x1, np.float32(1.0 if b1 > b else 0.0)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_q4_1(w, x, out, lut):
    rows, nb = w.shape[0], w.shape[1] // 20
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(16, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            row = w[r]
            acc[:] = 0.0
            for b in range(0, nb, 2):
                k0, k1, x0, x1, w1 = _pair(row, x, b, nb, 20)
                d0, m0 = half(k0, 0, lut), half(k0, 2, lut)
                d1, m1 = w1 * half(k1, 0, lut), w1 * half(k1, 2, lut)
                for l in range(16):
                    u, v = i32(k0[4 + l]), i32(k1[4 + l])
                    acc[l] += ((d0 * np.float32(i32(u & i32(15))) + m0) * x0[l]
                               + (d0 * np.float32(i32(u >> i32(4))) + m0) * x0[16 + l]
                               + (d1 * np.float32(i32(v & i32(15))) + m1) * x1[l]
                               + (d1 * np.float32(i32(v >> i32(4))) + m1) * x1[16 + l])
            out[r] = _lane_sum(acc)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_q5_0(w, x, out, lut):
    rows, nb = w.shape[0], w.shape[1] // 22
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(16, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            row = w[r]
            acc[:] = 0.0
            for b in range(0, nb, 2):
                k0, k1, x0, x1, w1 = _pair(row, x, b, nb, 22)
                d0, h0 = half(k0, 0, lut), q5_high_bits(k0, 2)
                d1, h1 = w1 * half(k1, 0, lut), q5_high_bits(k1, 2)
                for l in range(16):
                    lo0, hi0 = q5_pair(k0[6 + l], h0, l)
                    lo1, hi1 = q5_pair(k1[6 + l], h1, l)
                    acc[l] += ((d0 * np.float32(lo0)) * x0[l] + (d0 * np.float32(hi0)) * x0[16 + l]
                               + (d1 * np.float32(lo1)) * x1[l] + (d1 * np.float32(hi1)) * x1[16 + l])
            out[r] = _lane_sum(acc)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_q8_0(w, x, out, lut):
    rows, nb = w.shape[0], w.shape[1] // 34
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(32, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            row = w[r]
            acc[:] = 0.0
            for b in range(0, nb, 2):
                k0, k1, x0, x1, w1 = _pair(row, x, b, nb, 34)
                d0, d1 = half(k0, 0, lut), w1 * half(k1, 0, lut)
                for l in range(32):
                    acc[l] += (np.float32(i8(k0[2 + l])) * d0) * x0[l] + (np.float32(i8(k1[2 + l])) * d1) * x1[l]
            out[r] = _lane_sum(acc)
