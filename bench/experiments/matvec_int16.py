"""EXPERIMENT, not used by the engine: decode matvecs on int16-quantized activations.

Status (issue 4, measured single-thread on the 1.5B's tensors, same run, min of 20):
  Q4_K 8960x1536: exact float kernel 1.44 ms (9.6 GMAC/s), this one 1.46 ms (9.5 GMAC/s)
  after the lane layout below reached `vpmaddwd`/`vpdpwssd` (check with inspect_asm);
  Q6_K/Q8_0/Q5_0/Q4_1 here are still scalar or `vpmulld` (0.3-0.8x the float kernels).
  Errors vs float64: ~8e-6 of |x|.|W| (exact path: ~3e-8). Lessons: reading an int32
  array (xs) inside the block loop, or a constant 16/32 lane bound, kills vectorization.
  Next: decode whole 32-weight groups to int16 with the scale folded in, then one clean
  `acc[l] = i32(acc[l] + w[l]*x[l] + w[l+16]*x[l+16])` loop (PERF-NOTES' 33-48 GMAC/s shape).

Integer dot products (AVX-512 VNNI `vpdpwssd`).

The activation vector is quantized once per matmul (`quantize_act`): per block of QB
elements (256 for K-quants, 32 for the 32-element types) a float32 scale
xd = max|x| / QMAX and xq = round(x / xd) in int16, plus the sum of xq per 32 elements
(for the types with a min/offset term). Weights stay in their GGML encoding; each
kernel multiplies the small integer weights (times their integer sub-block scales for
K-quants) with xq in int32 lane accumulators, then converts to float once per block.

Accuracy: the only difference from the exact float path is the rounding of x to
xq*xd: |x - xq*xd| <= xd/2 = max|x_block| / (2*QMAX), i.e. 3.1e-5 of each block's
largest activation (llama.cpp's 8-bit activations: 4e-3). So
|out - x @ W.T| <= 1e-4 * (|x| @ |W|.T) + sum_blocks |W_block| . xd_block/2
(tests/test_quant_kernels_fast.py checks this bound against float64).
Integer ranges: QMAX = 16383 keeps every int32 lane sum in range (worst case Q6_K,
16 products of |sc*q| <= 4096 per lane: 1.07e9 < 2**31).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels._dequant import i8, i32, q4k_scale_min, q5_high_bits, q5_pair, q6_quad
from kernels.f16 import half
from kernels.quants import Q4_1, Q4_K, Q5_0, Q6_K, Q8_0

FASTMATH = {"contract", "reassoc", "nsz"}
QMAX = 16383
CHUNK = 16


@njit(cache=True)
def quantize_act(x, qb, xq, xd, xs):
    """x float32 [cols] -> xq int16 [cols], xd float32 [cols // qb], xs int32 [cols // 32] (sums of xq)."""
    cols = x.shape[0]
    for b in range(cols // qb):
        amax = np.float32(0.0)
        for i in range(b * qb, b * qb + qb):
            a = abs(x[i])
            if a > amax:
                amax = a
        if not amax < np.float32(np.inf):     # Inf or NaN in the block: propagate NaN
            d = np.float32(np.nan)
            inv = np.float32(0.0)
        elif amax > 0:
            d = amax / np.float32(QMAX)
            inv = np.float32(QMAX) / amax
        else:
            d = np.float32(0.0)
            inv = np.float32(0.0)
        xd[b] = d
        for i in range(b * qb, b * qb + qb):
            xq[i] = np.int16(np.rint(x[i] * inv))
    for s in range(cols // 32):
        t = i32(0)
        for i in range(32):
            t = i32(t + i32(xq[s * 32 + i]))
        xs[s] = t


@njit(cache=True, inline="always")
def _fsum(acc):
    t = np.float32(0.0)
    for l in range(acc.shape[0]):
        t += acc[l]
    return t


@njit(cache=True, fastmath=FASTMATH, inline="always")
def row_q4_k(row, xq, xd, xs, acc, facc, lut):
    """Lane l of sub-block k pairs its elements l and l + 16, so each int32 lane sum
    belongs to one sub-block (one vpmaddwd per 32 weights) and is scaled in float."""
    nb = row.shape[0] // 144
    nl = acc.shape[0] >> 1                # 16, opaque to LLVM
    facc[:] = 0.0
    msum = np.float32(0.0)
    for b in range(nb):
        blk, xb = row[b * 144:b * 144 + 144], xq[b * 256:b * 256 + 256]
        dx = xd[b]
        d, dmin = half(blk, 0, lut) * dx, half(blk, 2, lut) * dx
        for j in range(4):
            sc0, m0 = q4k_scale_min(blk[4:16], 2 * j)
            sc1, m1 = q4k_scale_min(blk[4:16], 2 * j + 1)
            f0, f1 = d * np.float32(sc0), d * np.float32(sc1)
            q, x = blk[16 + 32 * j:48 + 32 * j], xb[64 * j:64 * j + 64]
            for l in range(nl):
                u, v = i32(q[l]), i32(q[16 + l])
                s0 = i32(i32(i32(u & i32(15)) * i32(x[l])) + i32(i32(v & i32(15)) * i32(x[16 + l])))
                s1 = i32(i32(i32(u >> i32(4)) * i32(x[32 + l])) + i32(i32(v >> i32(4)) * i32(x[48 + l])))
                facc[l] += np.float32(s0) * f0 + np.float32(s1) * f1
        mi = i32(0)
        for j in range(8):   # a separate loop: reading xs next to the lane loop stops its vectorization
            m = q4k_scale_min(blk[4:16], j)[1]
            mi = i32(mi + i32(i32(m) * xs[b * 8 + j]))
        msum += dmin * np.float32(mi)
    return _fsum(facc[:16]) - msum


@njit(cache=True, fastmath=FASTMATH, inline="always")
def row_q6_k(row, xq, xd, xs, acc, facc, lut):
    nb = row.shape[0] // 210
    nl = acc.shape[0] >> 1                # 16, opaque to LLVM
    facc[:] = 0.0
    for b in range(nb):
        blk, xb = row[b * 210:b * 210 + 210], xq[b * 256:b * 256 + 256]
        d = half(blk, 208, lut)
        acc[:] = 0
        for h in range(2):
            for g in range(2):
                s = 192 + 8 * h + g
                s0, s1, s2, s3 = i8(blk[s]), i8(blk[s + 2]), i8(blk[s + 4]), i8(blk[s + 6])
                qa, qc, e = 64 * h + 16 * g, 128 + 32 * h + 16 * g, 128 * h + 16 * g
                for l in range(nl):
                    q0, q1, q2, q3 = q6_quad(blk[qa + l], blk[qa + 32 + l], blk[qc + l])
                    acc[l] = i32(acc[l] + i32(i32(q0 * s0) * i32(xb[e + l])) + i32(i32(q1 * s1) * i32(xb[e + 32 + l]))
                                 + i32(i32(q2 * s2) * i32(xb[e + 64 + l])) + i32(i32(q3 * s3) * i32(xb[e + 96 + l])))
        da = d * xd[b]
        for l in range(nl):
            facc[l] += np.float32(acc[l]) * da
    return _fsum(facc[:16])


@njit(cache=True, fastmath=FASTMATH, inline="always")
def row_q8_0(row, xq, xd, xs, acc, facc, lut):
    nb = row.shape[0] // 34
    nl = acc.shape[0] >> 1                # 16, opaque to LLVM
    facc[:] = 0.0
    for b in range(nb):
        blk, xb = row[b * 34:b * 34 + 34], xq[b * 32:b * 32 + 32]
        da = half(blk, 0, lut) * xd[b]
        for l in range(nl):
            acc[l] = i32(i32(i8(blk[2 + l]) * i32(xb[l])) + i32(i8(blk[18 + l]) * i32(xb[16 + l])))
        for l in range(nl):
            facc[l] += np.float32(acc[l]) * da
    return _fsum(facc[:16])


@njit(cache=True, fastmath=FASTMATH, inline="always")
def row_q5_0(row, xq, xd, xs, acc, facc, lut):
    nb = row.shape[0] // 22
    nl = acc.shape[0] >> 1                # 16, opaque to LLVM
    facc[:] = 0.0
    for b in range(nb):
        blk, xb = row[b * 22:b * 22 + 22], xq[b * 32:b * 32 + 32]
        da, qh = half(blk, 0, lut) * xd[b], q5_high_bits(blk, 2)
        for l in range(nl):
            lo, hi = q5_pair(blk[6 + l], qh, l)
            acc[l] = i32(i32(lo * i32(xb[l])) + i32(hi * i32(xb[16 + l])))
        for l in range(nl):
            facc[l] += np.float32(acc[l]) * da
    return _fsum(facc[:16])


@njit(cache=True, fastmath=FASTMATH, inline="always")
def row_q4_1(row, xq, xd, xs, acc, facc, lut):
    nb = row.shape[0] // 20
    nl = acc.shape[0] >> 1                # 16, opaque to LLVM
    facc[:] = 0.0
    msum = np.float32(0.0)
    for b in range(nb):
        blk, xb = row[b * 20:b * 20 + 20], xq[b * 32:b * 32 + 32]
        dx = xd[b]
        da, ma = half(blk, 0, lut) * dx, half(blk, 2, lut) * dx
        for l in range(nl):
            v = i32(blk[4 + l])
            acc[l] = i32(i32(i32(v & i32(15)) * i32(xb[l])) + i32(i32(v >> i32(4)) * i32(xb[16 + l])))
        for l in range(nl):
            facc[l] += np.float32(acc[l]) * da
        msum += ma * np.float32(xs[b])
    return _fsum(facc[:16]) + msum




@njit(cache=True, inline="always")
def qset(qtype):
    """Which activation quantization a weight type reads: 0 = 256-element blocks, 1 = 32."""
    return 0 if qtype == Q4_K or qtype == Q6_K else 1


@njit(cache=True, inline="always")
def row_dot(qtype, row, xq, xd, xs, acc, facc, lut):
    if qtype == Q4_K:
        return row_q4_k(row, xq[0], xd[0], xs[0], acc, facc, lut)
    if qtype == Q6_K:
        return row_q6_k(row, xq[0], xd[0], xs[0], acc, facc, lut)
    if qtype == Q8_0:
        return row_q8_0(row, xq[1], xd[1], xs[1], acc, facc, lut)
    if qtype == Q5_0:
        return row_q5_0(row, xq[1], xd[1], xs[1], acc, facc, lut)
    return row_q4_1(row, xq[1], xd[1], xs[1], acc, facc, lut)


@njit(cache=True)
def quantize_sets(x, need0, need1, xq, xd, xs):
    """Quantize x [cols] into set 0 (256-blocks) and/or set 1 (32-blocks) of xq/xd/xs [2, ...]."""
    if need0:
        quantize_act(x, 256, xq[0], xd[0], xs[0])
    if need1:
        quantize_act(x, 32, xq[1], xd[1], xs[1])


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mvq(w, qtype, xq, xd, xs, out, lut):
    """out[r] = dot(W[r], x) from the quantized activation sets (see module doc)."""
    rows = w.shape[0]
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(32, np.int32)
        facc = np.empty(32, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            out[r] = row_dot(qtype, w[r], xq, xd, xs, acc, facc, lut)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mvq3(w0, t0, w1, t1, w2, t2, xq, xd, xs, out0, out1, out2, lut):
    """Three matvecs on the same activation in one parallel launch (Q, K, V)."""
    r0, r1, r2 = w0.shape[0], w1.shape[0], w2.shape[0]
    c0, c1, c2 = (r0 + CHUNK - 1) // CHUNK, (r1 + CHUNK - 1) // CHUNK, (r2 + CHUNK - 1) // CHUNK
    for c in prange(c0 + c1 + c2):
        acc = np.empty(32, np.int32)
        facc = np.empty(32, np.float32)
        if c < c0:
            for r in range(c * CHUNK, min(r0, c * CHUNK + CHUNK)):
                out0[r] = row_dot(t0, w0[r], xq, xd, xs, acc, facc, lut)
        elif c < c0 + c1:
            k = c - c0
            for r in range(k * CHUNK, min(r1, k * CHUNK + CHUNK)):
                out1[r] = row_dot(t1, w1[r], xq, xd, xs, acc, facc, lut)
        else:
            k = c - c0 - c1
            for r in range(k * CHUNK, min(r2, k * CHUNK + CHUNK)):
                out2[r] = row_dot(t2, w2[r], xq, xd, xs, acc, facc, lut)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mvq_gate_up(wg, tg, wu, tu, xq, xd, xs, gate, up, silu, swigl, lut):
    """gate = Wg x, up = Wu x and, row chunk by row chunk, silu(gate) and silu(gate) * up."""
    rows = wg.shape[0]
    for c in prange((rows + CHUNK - 1) // CHUNK):
        acc = np.empty(32, np.int32)
        facc = np.empty(32, np.float32)
        for r in range(c * CHUNK, min(rows, c * CHUNK + CHUNK)):
            g = row_dot(tg, wg[r], xq, xd, xs, acc, facc, lut)
            u = row_dot(tu, wu[r], xq, xd, xs, acc, facc, lut)
            gate[r] = g
            up[r] = u
            s = g / (np.float32(1.0) + np.exp(-g))
            silu[r] = s
            swigl[r] = s * u
