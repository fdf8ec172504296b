"""The prompt GEMM of K-quant weights: row panels decoded once, multiplied by every token
with AVX512-VNNI `vpdpbusd` across 16 rows at once.

Why: the block dot products of kernels/_mm_int8.py unpack each weight block again for
every four tokens and sum within a row (lanes are a block's elements), so every block
ends in a reduction and each 32 products pay a scale multiply-add. Here a work item
takes PANEL weight rows, decodes them once into byte codes laid out so that one 512-bit
register holds four consecutive codes of each of 16 rows (kernels/_panels.py says what the
codes and per-block integers are for each type), and then, for TOKENS tokens at a time,

    vpdpbusd  acc[16 rows] += codes[16 rows x 4] . broadcast(x[t, 4 values])

so one instruction does 64 multiply-adds, lanes are rows, a sub-block's scale is one
`vpmulld` per 16 rows and token, and the 16 row results of a token are stored as one
vector: no reduction. The decoded panel (about PANEL * cols bytes) stays in L2 while the
tokens stream past it.

Every block's sums are exact integers, as on the other integer path, and the float steps
after them are those of llama.cpp's repacked Q4_K GEMM (one FMA per block and row with
d * xd; mins in their own accumulator), where mm_q8 keeps eight lane partials per row as
llama.cpp's one-row dot does: llama.cpp's prompts take its GEMM, so ours does too. Needs
AVX512-VNNI (`available`); elsewhere prompts take mm_q8.
"""
from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels._simd import _F32, _I32, _I64, _V16I32, HAS_VNNI, _intrinsic, literal_mask, type_switch, types_mask
from kernels.quants import TYPES

PANEL_TYPES = tuple(t for t in TYPES.values() if t.panel is not None)
LANES = 16                 # rows per 512-bit register of int32 lanes
GROUPS = 2                 # lane groups per panel
PANEL = LANES * GROUPS     # weight rows per work item
TOKENS = 4                 # tokens per register tile
QK = 256                   # elements per block (all panel types are 256-element K-quants)
KGROUPS = QK // 4          # 4-byte code groups per block
MAX_NSUB = max((t.panel.nsub for t in PANEL_TYPES), default=16)
available = HAS_VNNI and bool(PANEL_TYPES)

_V16F32 = ir.VectorType(_F32, 16)


def _aligned(shape, dtype):
    """np.empty with each row starting on a 64-byte boundary (row sizes here are multiples of 64),
    so a code vector never straddles two cache lines."""
    nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def scratch(cols: int, threads: int):
    """Per-thread panel buffers for weights of `cols` columns: (codes uint8, scales int32,
    coefficients int32, d float32, dm float32, tile float32), each [threads, size]."""
    nb = cols // QK
    return (_aligned((threads, GROUPS * nb * KGROUPS * 64), np.uint8),
            np.empty((threads, GROUPS * nb * MAX_NSUB * LANES), np.int32),
            np.empty((threads, GROUPS * nb * 8 * LANES), np.int32),
            np.empty((threads, GROUPS * nb * LANES), np.float32),
            np.empty((threads, GROUPS * nb * LANES), np.float32),
            np.empty((threads, TOKENS * PANEL), np.float32))


def _gep(builder, base, index):
    return builder.gep(base, [index])


def _c(value):
    return ir.Constant(_I64, value)


def _transpose16(builder, vecs):
    """16 <16 x i32> rows -> 16 columns (out[g][r] = vecs[r][g]): four rounds of two-source
    shuffles, each swapping the off-diagonal s x s blocks of every 2s x 2s block."""
    vecs = list(vecs)
    for bit in range(4):
        s = 1 << bit
        for r in range(16):
            if r & s:
                continue
            p = r | s
            low = [c if not c & s else 16 + c - s for c in range(16)]
            high = [16 + c if c & s else c + s for c in range(16)]
            a, b = vecs[r], vecs[p]
            vecs[r] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16), [ir.Constant(_I32, i) for i in low]))
            vecs[p] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16), [ir.Constant(_I32, i) for i in high]))
    return vecs


def _decode_type(builder, qt, row_at, nb, bufs, staging):
    """IR: decode one panel of type qt; row_at(k) is the byte pointer of panel row k (an i64).

    Each row's four 64-code chunks go through `staging` (16 rows x 4 chunks x 64 bytes, in
    L1), and each chunk's 16 rows are transposed from there: loops instead of unrolled rows
    keep the code small (compile time) at the cost of one L1 round trip per code."""
    codes, sc, coef, dd, dm = bufs
    pc, block_bytes = qt.panel, qt.block_bytes
    nsub = pc.nsub
    with cgutils.for_range(builder, _opaque_i64(builder, _c(GROUPS))) as group_loop:
        g = group_loop.index
        with cgutils.for_range(builder, nb) as block_loop:
            b = block_loop.index
            gb = builder.add(builder.mul(g, nb), b)                    # (group, block) index
            with cgutils.for_range(builder, _opaque_i64(builder, _c(LANES))) as row_loop:
                i = row_loop.index
                blk = builder.gep(row_at(builder.add(builder.mul(g, _c(LANES)), i)), [builder.mul(b, _c(block_bytes))])
                s_vec, c_vec, d, dmin = pc.scales(builder, blk)
                for s in range(nsub):
                    at = builder.add(builder.mul(builder.add(builder.mul(gb, _c(nsub)), _c(s)), _c(LANES)), i)
                    builder.store(builder.extract_element(s_vec, ir.Constant(_I32, s)), _gep(builder, sc, at))
                pairs = builder.bitcast(c_vec, ir.VectorType(_I32, 8))
                for j in range(8):
                    at = builder.add(builder.mul(builder.add(builder.mul(gb, _c(8)), _c(j)), _c(LANES)), i)
                    builder.store(builder.extract_element(pairs, ir.Constant(_I32, j)), _gep(builder, coef, at))
                at = builder.add(builder.mul(gb, _c(LANES)), i)
                builder.store(d, _gep(builder, dd, at))
                builder.store(dmin, _gep(builder, dm, at))
                for chunk in range(4):
                    slot = builder.gep(staging, [builder.add(_c(chunk * LANES), i)])
                    builder.store(builder.bitcast(pc.codes(builder, blk, chunk), _V16I32), slot)
            with cgutils.for_range(builder, _opaque_i64(builder, _c(4))) as chunk_loop:
                chunk = chunk_loop.index
                first = builder.mul(chunk, _c(LANES))
                rows = [builder.load(builder.gep(staging, [builder.add(first, _c(r))])) for r in range(LANES)]
                for k, col in enumerate(_transpose16(builder, rows)):
                    at = builder.mul(builder.add(builder.mul(gb, _c(KGROUPS)), builder.add(first, _c(k))), _c(64))
                    builder.store(col, builder.bitcast(_gep(builder, codes, at), _V16I32.as_pointer()), align=1)


def _switch(builder, qtype, emit, mask: int):
    """type_switch over the panel types of `mask`; other types do nothing."""
    type_switch(builder, qtype, [t for t in PANEL_TYPES if mask >> t.id & 1], emit)


def _array_data(context, builder, ty, value):
    return context.make_array(ty)(context, builder, value).data


@intrinsic
def panel_decode(typingctx, kinds, qtype, w, r0, codes, sc, coef, dd, dm):
    """Decode rows r0 .. r0+PANEL-1 of w (2-D bytes; rows past the end repeat its last row)
    into the panel buffers (1-D: one thread's rows of `scratch`). kinds: a constant types mask
    (only those types' code is compiled in)."""
    mask = literal_mask(kinds)
    if mask is None:
        return None
    sig = types.void(kinds, qtype, w, r0, codes, sc, coef, dd, dm)

    def codegen(context, builder, signature, args):
        args, arg_types = args[1:], signature.args[1:]
        qt_v = context.cast(builder, args[0], arg_types[0], types.int64)
        warr = context.make_array(arg_types[1])(context, builder, args[1])
        nrows, row_bytes = cgutils.unpack_tuple(builder, warr.shape, 2)
        stride = cgutils.unpack_tuple(builder, warr.strides, 2)[0]
        first = context.cast(builder, args[2], arg_types[2], types.intp)
        last = builder.sub(nrows, _c(1))

        def row_at(k):   # rows past the end repeat the last one
            r = builder.add(first, k)
            return builder.gep(warr.data, [builder.mul(builder.select(builder.icmp_signed(">", r, last), last, r), stride)])
        bufs = [_array_data(context, builder, arg_types[i], args[i]) for i in range(3, 8)]
        staging = cgutils.alloca_once(builder, _V16I32, size=4 * LANES)

        def emit(qt):
            nb = builder.udiv(row_bytes, _c(qt.block_bytes))
            _decode_type(builder, qt, row_at, nb, bufs, staging)
        _switch(builder, qt_v, emit, mask)
        return context.get_dummy_value()
    return sig, codegen


def _opaque_i64(builder, value):
    """value, through an empty inline asm: LLVM cannot see it is a constant."""
    return builder.asm(ir.FunctionType(_I64, [_I64]), "", "=r,0", [value], side_effect=False)


def _splat_i32(builder, value):
    vec = builder.insert_element(ir.Constant(_V16I32, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_V16I32, None), ir.Constant(_V16I32, [ir.Constant(_I32, 0)] * 16))


def _splat_f32(builder, value):
    vec = builder.insert_element(ir.Constant(_V16F32, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, ir.Constant(_V16F32, None), ir.Constant(_V16I32, [ir.Constant(_I32, 0)] * 16))


def _load_i32(builder, byte_ptr, offset):
    return builder.load(builder.bitcast(builder.gep(byte_ptr, [offset]), _I32.as_pointer()), align=1)


def _dot_type(builder, qt, nb, bufs, xs, xds, bss, tile):
    """IR: tile[t * PANEL + r] = sum over blocks of panel row r . token t, for TOKENS tokens:
    xs[t] byte pointers to token t's int8 values, xds[t] float pointers to its block scales,
    bss[t] byte pointers to its int16 16-element sums."""
    codes, sc, coef, dd, dm = bufs
    nsub = qt.panel.nsub
    per_sub = KGROUPS // nsub                     # 4-byte groups per scale sub-block
    zero_i = ir.Constant(_V16I32, [ir.Constant(_I32, 0)] * 16)
    # llama.cpp's float steps (its repacked Q4_K GEMM): per block one FMA of the exact integer sum
    # with d * xd, the mins' sum in a second accumulator with dmin * xd, subtracted at the end.
    # Where the offset is scaled by d itself (offset_in_d) it is subtracted in integers first,
    # as llama.cpp's Q6_K dot does.
    tots = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(TOKENS)]
            for _ in range(GROUPS)]
    tots_min = [[cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(TOKENS)]
                for _ in range(GROUPS)]
    offset_in_d = qt.panel.offset_in_d
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        gbs = [builder.add(builder.mul(_c(g), nb), b) for g in range(GROUPS)]
        xb = [builder.gep(x, [builder.mul(b, _c(QK))]) for x in xs]
        blks = [[cgutils.alloca_once_value(builder, zero_i) for _ in range(TOKENS)] for _ in range(GROUPS)]
        # one loop iteration per scale sub-block, its trip count hidden from LLVM: unrolled, the
        # scheduler hoists every sub-block's dot products above the scale multiplies and spills
        # the 64 partial sums that are then live at once (and the code takes minutes to compile)
        with cgutils.for_range(builder, _opaque_i64(builder, _c(nsub))) as sub:
            s = sub.index
            acc = [[zero_i] * TOKENS for _ in range(GROUPS)]
            for kk in range(per_sub):
                k = builder.add(builder.mul(s, _c(per_sub)), _c(kk))
                ws = [builder.load(builder.bitcast(_gep(builder, codes, builder.mul(builder.add(builder.mul(gb, _c(KGROUPS)), k), _c(64))),
                                                   _V16I32.as_pointer()), align=1) for gb in gbs]
                xv = [_splat_i32(builder, _load_i32(builder, x, builder.mul(k, _c(4)))) for x in xb]
                for g in range(GROUPS):
                    for t in range(TOKENS):
                        acc[g][t] = _intrinsic(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32, [acc[g][t], ws[g], xv[t]])
            for g in range(GROUPS):
                at = builder.mul(builder.add(builder.mul(gbs[g], _c(nsub)), s), _c(LANES))
                scv = builder.load(builder.bitcast(_gep(builder, sc, at), _V16I32.as_pointer()), align=4)
                for t in range(TOKENS):
                    builder.store(builder.add(builder.load(blks[g][t]), builder.mul(acc[g][t], scv)), blks[g][t])
        blk = [[builder.load(a) for a in row] for row in blks]
        mins = [[zero_i] * TOKENS for _ in range(GROUPS)]
        for j in range(8):
            bv = [_splat_i32(builder, _load_i32(builder, bp, builder.add(builder.mul(b, _c(32)), _c(4 * j)))) for bp in bss]
            for g in range(GROUPS):
                at = builder.mul(builder.add(builder.mul(gbs[g], _c(8)), _c(j)), _c(LANES))
                cv = builder.load(builder.bitcast(_gep(builder, coef, at), _V16I32.as_pointer()), align=4)
                for t in range(TOKENS):
                    mins[g][t] = _intrinsic(builder, "llvm.x86.avx512.vpdpwssd.512", _V16I32, [mins[g][t], cv, bv[t]])
        xdv = [_splat_f32(builder, builder.load(builder.gep(xd, [b]))) for xd in xds]
        for g in range(GROUPS):
            at = builder.mul(gbs[g], _c(LANES))
            dv = builder.load(builder.bitcast(_gep(builder, dd, at), _V16F32.as_pointer()), align=4)
            dmv = builder.load(builder.bitcast(_gep(builder, dm, at), _V16F32.as_pointer()), align=4)
            for t in range(TOKENS):
                if offset_in_d:
                    _fma_into(builder, tots[g][t], builder.sub(blk[g][t], mins[g][t]), builder.fmul(dv, xdv[t]))
                else:
                    _fma_into(builder, tots[g][t], blk[g][t], builder.fmul(dv, xdv[t]))
                    _fma_into(builder, tots_min[g][t], mins[g][t], builder.fmul(dmv, xdv[t]))
    for g in range(GROUPS):
        for t in range(TOKENS):
            at = _c(t * PANEL + g * LANES)
            result = builder.load(tots[g][t]) if offset_in_d else builder.fsub(builder.load(tots[g][t]), builder.load(tots_min[g][t]))
            builder.store(result, builder.bitcast(_gep(builder, tile, at), _V16F32.as_pointer()), align=4)


def _fma_into(builder, acc, ints, scale):
    """*acc = fma(float(ints), scale, *acc), one rounding (llvm.fma, not left to contraction)."""
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F32, [_V16F32] * 3), "llvm.fma.v16f32")
    builder.store(builder.call(fma, [builder.sitofp(ints, _V16F32), scale, builder.load(acc)]), acc)


@intrinsic
def panel_dot(typingctx, kinds, qtype, nb, codes, sc, coef, dd, dm, xq, xd, bs, t0, nt, tile):
    """tile[t, r] = panel row r . activation row t0 + t for t < TOKENS (rows past t0 + nt - 1
    repeat that row): xq int8 [n, cols], xd float32 [n, cols/256], bs int16 [n, cols/16].
    kinds: as in panel_decode."""
    mask = literal_mask(kinds)
    if mask is None:
        return None
    sig = types.void(kinds, qtype, nb, codes, sc, coef, dd, dm, xq, xd, bs, t0, nt, tile)

    def codegen(context, builder, signature, args):
        args, signature = args[1:], types.void(*signature.args[1:])
        qt_v = context.cast(builder, args[0], signature.args[0], types.int64)
        nb_v = context.cast(builder, args[1], signature.args[1], types.intp)
        bufs = [_array_data(context, builder, signature.args[i], args[i]) for i in range(2, 7)]
        arrs = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (7, 8, 9)]
        t0_v = context.cast(builder, args[10], signature.args[10], types.intp)
        nt_v = context.cast(builder, args[11], signature.args[11], types.intp)
        tile = _array_data(context, builder, signature.args[12], args[12])
        ptrs = [[], [], []]
        for t in range(TOKENS):
            row = builder.add(t0_v, builder.select(builder.icmp_signed(">=", _c(t), nt_v), builder.sub(nt_v, _c(1)), _c(t)))
            for p, arr in zip(ptrs, arrs):
                stride = cgutils.unpack_tuple(builder, arr.strides, 2)[0]     # bytes
                base = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
                p.append(builder.gep(base, [builder.mul(row, stride)]))
        xs, bss = ptrs[0], ptrs[2]
        xds = [builder.bitcast(p, _F32.as_pointer()) for p in ptrs[1]]

        def emit(qt):
            _dot_type(builder, qt, nb_v, bufs, xs, xds, bss, tile)
        _switch(builder, qt_v, emit, mask)
        return context.get_dummy_value()
    return sig, codegen


_C2 = {t: types.Array(t, 2, "C") for t in (types.int8, types.int16, types.int32, types.uint8, types.float32)}
# The one signature mm_panels kernels are compiled for (as kernels._mm_int8's MM_Q8_SIGNATURE):
# an output of any strides, so the column slices of a prompt's q/k/v buffer and C-contiguous
# outputs share a kernel instead of compiling one each.
MM_PANELS_SIGNATURE = types.void(
    types.Array(types.uint8, 2, "C", readonly=True), types.int64, _C2[types.int8], _C2[types.float32],
    _C2[types.int16], types.Array(types.float32, 2, "A"), _C2[types.uint8], _C2[types.int32], _C2[types.int32],
    _C2[types.float32], _C2[types.float32], _C2[types.float32])


@functools.cache
def _mm_panels_kernel(kinds: int):
    """mm_panels compiled for the panel types of mask `kinds` only (a closure constant, typed as
    a literal and cached per value, as kernels._mm_int8's mm_q8 kernels), for MM_PANELS_SIGNATURE
    only, when this is first called."""
    @njit([MM_PANELS_SIGNATURE], cache=True, parallel=True)
    def mm_panels_of(w, qtype, xq, xd, bs, out, codes, sc, coef, dd, dm, tiles):
        n = xq.shape[0]
        nb = xq.shape[1] // QK
        for p in prange((w.shape[0] + PANEL - 1) // PANEL):
            tid = numba.get_thread_id()
            r0 = p * PANEL
            rows = min(PANEL, w.shape[0] - r0)
            panel_decode(kinds, qtype, w, r0, codes[tid], sc[tid], coef[tid], dd[tid], dm[tid])
            tile = tiles[tid]
            for t0 in range(0, n, TOKENS):
                nt = min(TOKENS, n - t0)
                panel_dot(kinds, qtype, nb, codes[tid], sc[tid], coef[tid], dd[tid], dm[tid], xq, xd, bs, t0, nt, tile)
                for t in range(nt):
                    for r in range(rows):
                        out[t0 + t, r0 + r] = tile[t * PANEL + r]
    return mm_panels_of


def mm_panels_for(qtypes):
    """The mm_panels kernel for weights of these panel types (type ids), compiled on first use."""
    for t in qtypes:
        if not (t in TYPES and TYPES[t].panel is not None):
            raise ValueError(f"type {t} has no panel decoder")
    kinds = types_mask(qtypes)
    return _mm_panels_kernel(kinds)


def mm_panels(w, qtype, xq, xd, bs, out, codes, sc, coef, dd, dm, tiles):
    """out[t, r] = w[r] . x[t] for weights of a panel type (2-D bytes) and Q8_K activations
    (quantize_q8k), with per-thread buffers from `scratch`. One work item is one panel."""
    mm_panels_for((qtype,))(w, qtype, xq, xd, bs, out, codes, sc, coef, dd, dm, tiles)
