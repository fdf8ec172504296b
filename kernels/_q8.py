"""Quantized matmuls against int8 activations (llama.cpp's Q8_K and Q8_0 paths).

Each activation row is quantized once per matmul to int8 with one float32 scale per
block: blocks of 256 for K-quant weights (`quantize_q8k`, the rounding of ggml's
quantize_row_q8_K, plus the sums of every 16 values) and blocks of 32 for Q8_0,
Q5_0 and Q4_1 weights (`quantize_q8_0`, the rounding of ggml's x86 quantize_row_q8_0,
scale stored as float16, plus each block's sum). Each weight block's dot product is
then an exact integer (kernels/_simd.py) scaled by the blocks' float scales. The
error against the float path is that of the int8 activations: at most half a step,
max|x_block|/254, per element; the same approximation llama.cpp makes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels._simd import row_dot, row_dot4
from kernels.f16 import round_f16

QK = 256                                    # activations per int8 block for K-quant weights
QK8_0 = 32                                  # ... and for Q8_0, Q5_0 and Q4_1 weights
CHUNK = 16                                  # weight rows per parallel work item


@njit(cache=True, inline="always")
def _quantize_row(x, xq, xd, bs):
    for b in range(x.shape[0] // QK):
        amax, vmax = np.float32(0.0), np.float32(0.0)
        for i in range(b * QK, b * QK + QK):
            if abs(x[i]) > amax:
                amax, vmax = abs(x[i]), x[i]
        if amax == 0.0:
            xd[b] = 0.0
            xq[b * QK:b * QK + QK] = 0
            bs[b * 16:b * 16 + 16] = 0
            continue
        iscale = np.float32(-127.0) / vmax
        for g in range(16):
            t = 0
            for i in range(b * QK + 16 * g, b * QK + 16 * g + 16):
                v = min(127, int(np.rint(iscale * x[i])))
                xq[i] = v
                t += v
            bs[b * 16 + g] = t
        xd[b] = np.float32(1.0) / iscale


@njit(cache=True)
def quantize_q8k(x, xq, xd, bs):
    """Quantize rows x[n, cols] (cols % 256 == 0) into xq int8 [n, cols], scales xd float32
    [n, cols/256] and 16-element sums bs int16 [n, cols/16]."""
    for t in range(x.shape[0]):
        _quantize_row(x[t], xq[t], xd[t], bs[t])


@njit(cache=True)
def quantize_q8_0(x, xq, xd, bs):
    """Quantize rows x[n, cols] (cols % 32 == 0) into xq int8 [n, cols], scales xd float32
    [n, cols/32] (float16 values, as ggml stores them) and block sums bs int16 [n, cols/32]."""
    for t in range(x.shape[0]):
        for b in range(x.shape[1] // QK8_0):
            amax = np.float32(0.0)
            for i in range(b * QK8_0, b * QK8_0 + QK8_0):
                amax = max(amax, abs(x[t, i]))
            xd[t, b] = round_f16(amax / np.float32(127.0))
            iscale = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
            total = 0
            for i in range(b * QK8_0, b * QK8_0 + QK8_0):
                v = int(np.rint(x[t, i] * iscale))
                xq[t, i] = v
                total += v
            bs[t, b] = total


@njit(cache=True)
def dequantize_q8(xq, xd, out):
    """out[t, i] = xq[t, i] * xd[t, i // block]: quantized activations back as float32."""
    block = xq.shape[1] // xd.shape[1]
    for t in range(xq.shape[0]):
        for i in range(xq.shape[1]):
            out[t, i] = np.float32(xq[t, i]) * xd[t, i // block]


@njit(cache=True, inline="always")
def _chunks(w):
    return (w.shape[0] + CHUNK - 1) // CHUNK


@njit(cache=True, inline="always")
def _locate(ws, job):
    """(matrix, chunk within it) of work item `job`, counting the matrices' chunks in order."""
    i, first = 0, 0
    while job >= first + _chunks(ws[i]):
        first += _chunks(ws[i])
        i += 1
    return i, job - first


# Work items are CHUNK weight rows of one of the matrices; inside one, activation rows go four at
# a time so each weight block is unpacked once per four tokens while the chunk's rows stay in cache.
# Several matrices that share an input (q/k/v, gate/up) run in one parallel launch.
@njit(cache=True, parallel=True)
def mm_q8(ws, qtypes, xq, xd, bs, outs):
    """outs[i][t, r] = ws[i][r] . x[t] for each matrix i (a tuple of row arrays, their types and
    outputs) and activations quantized for those types (quantize_q8k or quantize_q8_0)."""
    n = xq.shape[0]
    xs, ds, bst = xq.shape[1], xd.shape[1], bs.shape[1]
    total = 0
    for i in range(len(ws)):
        total += _chunks(ws[i])
    for job in prange(total):
        i, c = _locate(ws, job)
        w, qtype, out = ws[i], qtypes[i], outs[i]
        r0, r1 = c * CHUNK, min(w.shape[0], c * CHUNK + CHUNK)
        for t in range(0, n - 3, 4):
            for r in range(r0, r1):
                out[t, r], out[t + 1, r], out[t + 2, r], out[t + 3, r] = row_dot4(
                    qtype, w[r], xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
        for t in range(n - n % 4, n):
            for r in range(r0, r1):
                out[t, r] = row_dot(qtype, w[r], xq, t * xs, xs, xd, t * ds, ds, bs, t * bst, bst)
