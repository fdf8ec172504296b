"""Fused dequantize + dot-product kernels for one activation vector (decode).

Every kernel computes out[r] = dot(dequant(w[r]), x) for all rows, in parallel
over chunks of CHUNK rows. Weights are decoded in registers, never stored: each
block is walked in unit-stride loops over 16 or 32 lanes that add into lane
accumulators `acc[l]` (one per thread, summed once per row), which LLVM turns
into byte-unpack, `vcvtdq2ps` and `vfmadd` on 512-bit vectors. Block slices are
taken once per block and indexed with constant offsets inside it: per-sub-block
slices cost ~35% in bounds bookkeeping. Each dequantized weight is the same
float32 as the reference (`dq_*`); only the summation order differs.

The 16-bit float types (F16, BF16) are widened in registers by LLVM IR (`_half_dot32`), a
few rows at a time; `mv_half_many` runs several such matrices that read one x (q/k/v,
gate/up) in one parallel launch.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels._dequant import i8, i32, q4k_scale_min, q5_high_bits, q5_pair, q6_quad
from kernels.f16 import half
from kernels._simd import _FAST, PREFETCH_AHEAD, _prefetch, reduce_fadd

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


_V16F32 = ir.VectorType(ir.FloatType(), 16)


def _half_dot32(widen_bf16: bool, nrows: int):
    """An intrinsic (w, r, x, chunks) -> (sum_{i < 32*chunks} w(W[r+k, i]) * x[i] for k < nrows)
    for 16-bit float weights (w: a 2-D uint16 array of their bits, rows r..r+nrows-1 in range;
    x: float32, contiguous): bf16 widened to float32 by a shift, f16 by vcvtph2ps, in registers,
    into two 16-lane accumulators per row. Rows go `nrows` at a time so that each core streams
    several rows at once and loads x once for them. (Numba loops over a scratch array for the
    same bit move do not vectorize: the integer and float views of one scratch alias.)"""
    def typer(typingctx, w, r, x, chunks):
        def codegen(context, builder, signature, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            warr = context.make_array(signature.args[0])(context, builder, args[0])
            stride = cgutils.unpack_tuple(builder, warr.strides, 2)[0]          # bytes
            row0 = context.cast(builder, args[1], signature.args[1], types.intp)
            wbytes = builder.bitcast(warr.data, ir.IntType(8).as_pointer())
            rows = [builder.gep(wbytes, [builder.mul(builder.add(row0, ir.Constant(row0.type, k)), stride)])
                    for k in range(nrows)]
            xdata = context.make_array(signature.args[2])(context, builder, args[2]).data
            n = context.cast(builder, args[3], signature.args[3], types.intp)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(2)]
                    for _ in range(nrows)]
            v32i16, v32f32 = ir.VectorType(ir.IntType(16), 32), ir.VectorType(f32, 32)
            halves = [ir.Constant(ir.VectorType(i32, 16), [ir.Constant(i32, 16 * h + k) for k in range(16)])
                      for h in range(2)]
            with cgutils.for_range(builder, n) as loop:
                base = builder.mul(loop.index, ir.Constant(loop.index.type, 32))
                xv = builder.load(builder.bitcast(builder.gep(xdata, [base]), v32f32.as_pointer()), align=4)
                for row, row_accs in zip(rows, accs):
                    row_at = builder.gep(row, [builder.mul(base, ir.Constant(base.type, 2))])
                    _prefetch(builder, row_at, PREFETCH_AHEAD)    # one cache line of weights per step
                    wv = builder.load(builder.bitcast(row_at, v32i16.as_pointer()), align=2)
                    if widen_bf16:
                        wide = builder.zext(wv, ir.VectorType(i32, 32))
                        wf = builder.bitcast(builder.shl(wide, ir.Constant(wide.type, [ir.Constant(i32, 16)] * 32)), v32f32)
                    else:
                        wf = builder.fpext(builder.bitcast(wv, ir.VectorType(ir.HalfType(), 32)), v32f32)
                    for lanes, acc in zip(halves, row_accs):
                        prod = builder.fmul(builder.shuffle_vector(wf, wf, lanes), builder.shuffle_vector(xv, xv, lanes),
                                            flags=_FAST)
                        builder.store(builder.fadd(builder.load(acc), prod, flags=_FAST), acc)
            sums = [reduce_fadd(builder, builder.fadd(builder.load(a0), builder.load(a1), flags=_FAST))
                    for a0, a1 in accs]
            return sums[0] if nrows == 1 else context.make_tuple(builder, signature.return_type, sums)
        ret = types.float32 if nrows == 1 else types.UniTuple(types.float32, nrows)
        return ret(w, r, x, chunks), codegen
    typer.__name__ = f"{'bf16' if widen_bf16 else 'f16'}_dot32_rows{nrows}"
    return intrinsic(typer)


HALF_ROWS = 4
_bf16_dot, _f16_dot = _half_dot32(True, 1), _half_dot32(False, 1)
_bf16_dot_rows, _f16_dot_rows = _half_dot32(True, HALF_ROWS), _half_dot32(False, HALF_ROWS)


@njit(cache=True, inline="always")
def chunks_of(w, chunk):
    """Parallel work items of `chunk` rows in matrix w."""
    return (w.shape[0] + chunk - 1) // chunk


@njit(cache=True, inline="always")
def locate_chunk(ws, job, chunk):
    """(matrix, chunk within it) of work item `job` over the matrices ws, counting their chunks
    in order: several matrices that share an input (q/k/v, gate/up) run in one parallel launch."""
    i, first = 0, 0
    while job >= first + chunks_of(ws[i], chunk):
        first += chunks_of(ws[i], chunk)
        i += 1
    return i, job - first


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _half_rows(w, bf16, x, out, r0, r1, lut):
    """out[r] = W[r] . x for rows r0..r1-1 of 16-bit float weights (BF16 if bf16, else F16):
    whole runs of 32 widened in registers (_half_dot32), HALF_ROWS rows at a time, and a
    scalar tail past them."""
    cols = x.shape[0]
    full = cols - cols % 32
    u2 = w.view(np.uint16)
    mid = r1 - (r1 - r0) % HALF_ROWS
    for r in range(r0, mid, HALF_ROWS):
        dots = _bf16_dot_rows(u2, r, x, full // 32) if bf16 else _f16_dot_rows(u2, r, x, full // 32)
        for k in range(HALF_ROWS):
            out[r + k] = dots[k]
    for r in range(mid, r1):
        out[r] = _bf16_dot(u2, r, x, full // 32) if bf16 else _f16_dot(u2, r, x, full // 32)
    if full < cols:   # scratch for the bf16 bit move only here: no allocation per call otherwise
        bits = np.empty(1, np.uint32)
        val = bits.view(np.float32)
        for r in range(r0, r1):
            t = np.float32(0.0)
            for i in range(full, cols):
                if bf16:
                    bits[0] = np.uint32(u2[r, i]) << np.uint32(16)
                    t += val[0] * x[i]
                else:
                    t += lut[u2[r, i]] * x[i]
            out[r] += t


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_bf16(w, x, out, lut):
    """BF16 weights (the top half of a float32), widened exactly in registers."""
    for c in prange(chunks_of(w, CHUNK)):
        _half_rows(w, True, x, out, c * CHUNK, min(w.shape[0], c * CHUNK + CHUNK), lut)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_f16(w, x, out, lut):
    """F16 weights, widened exactly in registers (vcvtph2ps)."""
    for c in prange(chunks_of(w, CHUNK)):
        _half_rows(w, False, x, out, c * CHUNK, min(w.shape[0], c * CHUNK + CHUNK), lut)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def mv_half_many(ws, bf16, x, outs, lut):
    """outs[i][0, r] = W_i[r] . x for several 16-bit float matrices of one type (BF16 if bf16,
    else F16) that read one x, in one parallel launch (outs: [1, rows_i] arrays of one layout)."""
    total = 0
    for i in range(len(ws)):
        total += chunks_of(ws[i], CHUNK)
    for job in prange(total):
        i, c = locate_chunk(ws, job, CHUNK)
        _half_rows(ws[i], bf16, x, outs[i][0], c * CHUNK, min(ws[i].shape[0], c * CHUNK + CHUNK), lut)
