"""Batched dequantize-matmul for many activation rows (prefill).

Rows of W are taken in groups of ROWS; parallel work items are runs of
GROUPS_PER_ITEM groups. For each span of up to SPAN columns the group's weights
are decoded once (exactly, by `dq_span_of`) into a per-thread ROWS x SPAN float32
scratch (16 KiB, stays in L1) and reused for every token: tokens go in pairs,
each pair's x-spans are loaded once and multiplied against all ROWS decoded
rows, giving 16 independent dot products that LLVM keeps in vector
accumulators. Partial sums are added into `out` span by span.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from kernels._span import dq_span_of
from kernels._matvec import FASTMATH
from kernels.quants import F16, F32

ROWS = 8
SPAN = 512
GROUPS_PER_ITEM = 4


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot8(buf, xa, xb, res):
    """res[j, k] = dot(buf[k, :n], x_j) for the 8 rows k and the two token spans xa, xb (length n)."""
    b0, b1, b2, b3, b4, b5, b6, b7 = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = np.float32(0.0)
    for i in range(xa.shape[0]):
        u, v = xa[i], xb[i]
        s0 += b0[i] * u
        t0 += b0[i] * v
        s1 += b1[i] * u
        t1 += b1[i] * v
        s2 += b2[i] * u
        t2 += b2[i] * v
        s3 += b3[i] * u
        t3 += b3[i] * v
        s4 += b4[i] * u
        t4 += b4[i] * v
        s5 += b5[i] * u
        t5 += b5[i] * v
        s6 += b6[i] * u
        t6 += b6[i] * v
        s7 += b7[i] * u
        t7 += b7[i] * v
    res[0, 0], res[0, 1], res[0, 2], res[0, 3], res[0, 4], res[0, 5], res[0, 6], res[0, 7] = s0, s1, s2, s3, s4, s5, s6, s7
    res[1, 0], res[1, 1], res[1, 2], res[1, 3], res[1, 4], res[1, 5], res[1, 6], res[1, 7] = t0, t1, t2, t3, t4, t5, t6, t7


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _accumulate(out, t, r0, res, j, nr, first):
    o = out[t]
    for k in range(nr):
        if first:
            o[r0 + k] = res[j, k]
        else:
            o[r0 + k] += res[j, k]


@functools.cache
def _gemm_kernel(qid: int):
    """gemm for weights of one type. qid is a closure constant: Numba types it as a literal, so
    dq_span_of compiles that type's decoder only (the all-type switch, every decoder inlined,
    was ~45 s of compiling on a first run of a model with 32-element blocks), and its cache
    keeps each type's kernel apart (as kernels._span's embedding lookup)."""
    @njit(cache=True, fastmath=FASTMATH, parallel=True)
    def gemm_of(w, x, out, lut):
        n, cols = x.shape
        rows = w.shape[0]
        ngroups = (rows + ROWS - 1) // ROWS
        for item in prange((ngroups + GROUPS_PER_ITEM - 1) // GROUPS_PER_ITEM):
            # in a last group with nr < ROWS, rows k >= nr hold stale values whose sums are never stored
            buf = np.zeros((ROWS, SPAN), np.float32)
            res = np.empty((2, ROWS), np.float32)
            for g in range(item * GROUPS_PER_ITEM, min(ngroups, (item + 1) * GROUPS_PER_ITEM)):
                r0 = g * ROWS
                nr = min(ROWS, rows - r0)
                for e0 in range(0, cols, SPAN):
                    e1 = min(cols, e0 + SPAN)
                    for k in range(nr):
                        dq_span_of(qid, w[r0 + k], e0, e1, buf[k], lut)
                    for t in range(0, n, 2):
                        tb = min(t + 1, n - 1)               # odd n: the last token is paired with itself
                        _dot8(buf, x[t, e0:e1], x[tb, e0:e1], res)
                        _accumulate(out, t, r0, res, 0, nr, e0 == 0)
                        if tb > t:
                            _accumulate(out, tb, r0, res, 1, nr, e0 == 0)
    return gemm_of


def gemm(w, qtype: int, x, out, lut) -> None:
    """out[t, r] = dot(dequant(w[r]), x[t]) for all tokens t and rows r (qtype registered)."""
    _gemm_kernel(int(qtype))(w, x, out, lut)


MV_ROWS = 32   # rows per parallel work item of mv_float


@functools.cache
def _mv_float_kernel(qid: int):
    """mv_float for weights of one type (a closure constant, as _gemm_kernel's)."""
    @njit(cache=True, fastmath=FASTMATH, parallel=True)
    def mv_float_of(w, x, out, lut):
        rows, cols = w.shape[0], x.shape[0]
        for item in prange((rows + MV_ROWS - 1) // MV_ROWS):
            buf = np.empty(SPAN, np.float32)
            for r in range(item * MV_ROWS, min(rows, (item + 1) * MV_ROWS)):
                t = np.float32(0.0)
                if qid == F32:
                    v = w[r].view(np.float32)
                    for i in range(cols):
                        t += v[i] * x[i]
                elif qid == F16:
                    u = w[r].view(np.uint16)
                    for i in range(cols):
                        t += lut[u[i]] * x[i]
                else:
                    for e0 in range(0, cols, SPAN):
                        e1 = min(cols, e0 + SPAN)
                        dq_span_of(qid, w[r], e0, e1, buf, lut)
                        for i in range(e1 - e0):
                            t += buf[i] * x[e0 + i]
                out[r] = t
    return mv_float_of


def mv_float(w, qtype: int, x, out, lut) -> None:
    """out[r] = dot(dequant(w[r]), x) for one activation row, for the types with no fused matvec:
    F32 and F16 read directly, any other type decoded exactly a span at a time (dq_span_of) into
    a per-work-item scratch that stays in L1."""
    _mv_float_kernel(int(qtype))(w, x, out, lut)
