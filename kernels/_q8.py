"""Activation rows quantized to int8 for the integer paths (llama.cpp's Q8_K and Q8_0).

Each activation row is quantized once per matmul to int8 with one float32 scale per
block: blocks of 256 for K-quant weights (`quantize_q8k`, the rounding of ggml's
quantize_row_q8_K, plus the sums of every 16 values) and blocks of 32 for the
32-element block types (`quantize_q8_0`, the rounding of ggml's x86 quantize_row_q8_0,
scale stored as float16, plus each block's sum). Each weight block's dot product is
then an exact integer (kernels/_simd.py, kernels/_mm_int8.py) scaled by the blocks' float scales. The
error against the float path is that of the int8 activations: at most half a step,
max|x_block|/254, per element; the same approximation llama.cpp makes.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.f16 import round_f16

QK = 256                                    # activations per int8 block for K-quant weights
QK8_0 = 32                                  # ... and for the 32-element block types


@njit(cache=True, inline="always")
def _quantize_row(x, xq, xd, bs):
    for b in range(x.shape[0] // QK):
        blk = x[b * QK:b * QK + QK]
        # the first value of largest |x| (ggml keeps the first on ties): its magnitude by a max
        # reduction (exact in any order: with no NaN, the caller's fastmath flags let LLVM
        # vectorize it), then a scan for it
        amax = np.float32(0.0)
        for i in range(QK):
            amax = max(amax, abs(blk[i]))
        if amax == 0.0:
            xd[b] = 0.0
            xq[b * QK:b * QK + QK] = 0
            bs[b * 16:b * 16 + 16] = 0
            continue
        j = 0
        while abs(blk[j]) != amax:
            j += 1
        iscale = np.float32(-127.0) / blk[j]
        for g in range(16):
            t = np.int32(0)
            xs, qs = x[b * QK + 16 * g:b * QK + 16 * g + 16], xq[b * QK + 16 * g:b * QK + 16 * g + 16]
            for i in range(16):
                # min in float, then int32 (not Python ints: int64 lanes and a byte extract per store)
                v = np.int32(min(np.float32(127.0), np.rint(iscale * xs[i])))
                qs[i] = np.int8(v)
                t += v
            bs[b * 16 + g] = t
        xd[b] = np.float32(1.0) / iscale


@njit(cache=True, parallel=True, fastmath={"nnan", "nsz"})
def quantize_q8k(x, xq, xd, bs):
    """Quantize rows x[n, cols] (cols % 256 == 0) into xq int8 [n, cols], scales xd float32
    [n, cols/256] and 16-element sums bs int16 [n, cols/16]. A prompt's rows are quantized in
    parallel (a tenth of a 1,024-token prefill in one thread); one row, a decode step's, without
    a parallel launch."""
    if x.shape[0] == 1:
        _quantize_row(x[0], xq[0], xd[0], bs[0])
        return
    for t in prange(x.shape[0]):
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


@njit(cache=True)
def round_rows_f16(x, out):
    """out = x rounded to float16 (ties to even) and back: the activations llama.cpp multiplies
    F16 weights by (its vec_dot_type for F16 is F16)."""
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[t, i] = round_f16(x[t, i])


@njit(cache=True)
def round_rows_bf16(x, out):
    """out = x rounded to bfloat16 and back, as ggml's fp32 -> bf16 conversion: round to nearest,
    ties to even, on the top 16 bits; a NaN keeps its top bits and is made quiet. The activations
    llama.cpp multiplies BF16 weights by (its vec_dot_type for BF16 is BF16)."""
    src = x.view(np.uint32)
    dst = out.view(np.uint32)
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            u = src[t, i]
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                dst[t, i] = ((u >> np.uint32(16)) | np.uint32(64)) << np.uint32(16)
            else:
                dst[t, i] = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)) << np.uint32(16)
