"""Integer block dot products written as LLVM IR (Numba intrinsics).

LLVM does not turn Numba loops into the byte multiply-adds llama.cpp's K-quant dot
products are built on, and the nibble loops it does vectorize stay in 32-bit lanes
(see PERF-NOTES.md). These intrinsics build one weight block's dot product against
int8 activations from 256-bit vector operations, the way ggml does: `vpmaddubsw`
multiplies unsigned weight codes by signed activations in pairs (16-bit sums), and a
multiply-add with the sub-block's scale (`vpdpwssd` with AVX512-VNNI, else `vpmaddwd`
+ add) folds the scale and the accumulation into one instruction.

Without AVX2 the same IR is emitted as widen, multiply and add, which LLVM maps to
whatever the target has; Numba's cache is keyed on the CPU, so a cached AVX-512 build
is never run elsewhere.

Every result is an exact integer: callers turn it into floats with the block's
scales, so the only rounding is that of the int8 activations themselves.
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels.quants import Q4_1, Q4_K, Q5_0, Q6_K, Q8_0

_FEATURES = llvm_binding.get_host_cpu_features()
HAS_AVX2 = bool(_FEATURES.get("avx2", False))
HAS_VNNI = bool(_FEATURES.get("avx512vnni", False) and _FEATURES.get("avx512vl", False))

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V32I8, _V16I8, _V8I8 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 16), ir.VectorType(_I8, 8)
_V16I16, _V8I16 = ir.VectorType(_I16, 16), ir.VectorType(_I16, 8)
_V8I32, _V32I16 = ir.VectorType(_I32, 8), ir.VectorType(_I16, 32)


def _splat(ty: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)


def _shuffle(builder, vec, idx):
    mask = ir.Constant(ir.VectorType(_I32, len(idx)), [ir.Constant(_I32, i) for i in idx])
    return builder.shuffle_vector(vec, ir.Constant(vec.type, None), mask)


def _pairs_sum(builder, wide):
    """Lane i = wide[2i] + wide[2i+1]."""
    n = wide.type.count
    return builder.add(_shuffle(builder, wide, range(0, n, 2)), _shuffle(builder, wide, range(1, n, 2)))


def _intrinsic(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _maddubs(builder, u8: ir.Value, s8: ir.Value) -> ir.Value:
    """<16 x i16>: lane i = u8[2i]*s8[2i] + u8[2i+1]*s8[2i+1] (vpmaddubsw; the callers' operands
    are small enough that its i16 saturation never applies)."""
    if HAS_AVX2:
        return _intrinsic(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [u8, s8])
    return _pairs_sum(builder, builder.mul(builder.zext(u8, _V32I16), builder.sext(s8, _V32I16)))


def _dot_u8s8(builder, u8: ir.Value, s8: ir.Value) -> ir.Value:
    """<8 x i32>: lane i = sum_k u8[4i+k] * s8[4i+k] (vpdpbusd with AVX512-VNNI, else
    vpmaddubsw + vpmaddwd by ones)."""
    if HAS_VNNI:
        return _intrinsic(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                          [ir.Constant(_V8I32, None), builder.bitcast(u8, _V8I32), builder.bitcast(s8, _V8I32)])
    return _madd(builder, None, _maddubs(builder, u8, s8), _splat(_V16I16, 1))


def _madd(builder, acc, a16: ir.Value, b16: ir.Value) -> ir.Value:
    """<8 x i32>: acc + (lane i = a16[2i]*b16[2i] + a16[2i+1]*b16[2i+1]); acc may be None.

    With AVX512-VNNI the accumulate is part of the instruction (vpdpwssd), else vpmaddwd + add."""
    if HAS_VNNI and acc is not None:
        return _intrinsic(builder, "llvm.x86.avx512.vpdpwssd.256", _V8I32,
                          [acc, builder.bitcast(a16, _V8I32), builder.bitcast(b16, _V8I32)])
    if HAS_AVX2:
        prod = _intrinsic(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [a16, b16])
    else:
        v16i32 = ir.VectorType(_I32, 16)
        prod = _pairs_sum(builder, builder.mul(builder.sext(a16, v16i32), builder.sext(b16, v16i32)))
    return prod if acc is None else builder.add(acc, prod)


PREFETCH_AHEAD = 3072   # bytes: weight rows stream from DRAM; fetch this far ahead of the block in use


def _prefetch(builder, base, offset: int) -> None:
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
        "llvm.prefetch.p0")
    ptr = builder.gep(base, [ir.Constant(_I64, offset)])
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _load(builder, base, offset: int, ty):
    """Unaligned load of `ty` at byte pointer base + offset."""
    ptr = builder.gep(base, [ir.Constant(_I64, offset)]) if offset else base
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _ptr(context, builder, arrty, arr, idxty, idx):
    """Pointer to element `idx` of a 1-D array argument, as a byte pointer for int8/uint8 arrays."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, idx, idxty, types.intp)])


def _q4k_scales_mins(builder, blk):
    """The 8 six-bit scales and 8 mins of a Q4_K block (bytes 4..15) as two <8 x i16>.

    The 12 packed bytes are read as three little-endian words and rearranged so the
    scales fill two words and the mins two more (the same bit moves as ggml)."""
    u0, u1, u2 = (_load(builder, blk, o, _I32) for o in (4, 8, 12))
    m1, m2, m3 = (ir.Constant(_I32, v) for v in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))
    c4, c6 = ir.Constant(_I32, 4), ir.Constant(_I32, 6)
    sc_lo = builder.and_(u0, m1)
    sc_hi = builder.or_(builder.and_(u2, m2), builder.shl(builder.and_(builder.lshr(u0, c6), m3), c4))
    mn_lo = builder.and_(u1, m1)
    mn_hi = builder.or_(builder.and_(builder.lshr(u2, c4), m2), builder.shl(builder.and_(builder.lshr(u1, c6), m3), c4))

    def widen(lo, hi):
        pair = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), None), lo, ir.Constant(_I32, 0))
        pair = builder.insert_element(pair, hi, ir.Constant(_I32, 1))
        return builder.zext(builder.bitcast(pair, _V8I8), _V8I16)
    return widen(sc_lo, sc_hi), widen(mn_lo, mn_hi)


_F32 = ir.FloatType()
_V8F32 = ir.VectorType(_F32, 8)
_FAST = ("reassoc", "contract", "nsz")


def _f16_at(builder, base, offset: int, count: int):
    """`count` consecutive float16 values at base + offset, as floats (vcvtph2ps)."""
    vec = _load(builder, base, offset, ir.VectorType(ir.IntType(16), count))
    return builder.fpext(builder.bitcast(vec, ir.VectorType(ir.HalfType(), count)), ir.VectorType(_F32, count))


def _fsplat(builder, value):
    vec = builder.insert_element(ir.Constant(_V8F32, None), value, ir.Constant(_I32, 0))
    return _shuffle(builder, vec, [0] * 8)


def _scaled(builder, ivec, wscale, xscale):
    """<8 x i32> integer sums as floats times the weight scale and the activation scale."""
    return builder.fmul(builder.sitofp(ivec, _V8F32), _fsplat(builder, builder.fmul(wscale, xscale)), flags=_FAST)


def _sums16(builder, bp):
    """The 16 block sums (int16) of one token's 256 activations."""
    return builder.load(builder.bitcast(bp, _V16I16.as_pointer()), align=2)


def _q4k_block(builder, blk, xps, bps, xds):
    """One Q4_K block against each token's activations (byte pointer xps[t] to its 256 int8
    values, bps[t] to their 16-element sums, xds[t] its float scale): per token, the block's
    contribution as <8 x float> partial sums, d*xd*sum_s sc_s*dot(q_s, x_s) - dmin*xd*sum_s
    min_s*sum(x_s), from exact integer sums. The weights are unpacked once for all tokens.

    As in ggml: vpmaddubsw multiplies nibbles by activations in pairs, and a multiply-add
    with the sub-block's scale (vpdpwssd) folds in the scale and the accumulation."""
    scales, mins = _q4k_scales_mins(builder, blk)
    mins_paired = _shuffle(builder, mins, [i // 2 for i in range(16)])   # min_s for both 16-sums of s
    low4, four = _splat(_V32I8, 15), _splat(_V32I8, 4)
    quads, splats = [], []
    for j in range(4):
        q = _load(builder, blk, 16 + 32 * j, _V32I8)
        quads += [builder.and_(q, low4), builder.lshr(q, four)]
        splats += [_shuffle(builder, scales, [2 * j] * 16), _shuffle(builder, scales, [2 * j + 1] * 16)]
    dm = _f16_at(builder, blk, 0, 2)          # d, dmin
    d, dmin = (builder.extract_element(dm, ir.Constant(_I32, i)) for i in (0, 1))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        acc = None
        for s in range(8):
            acc = _madd(builder, acc, _maddubs(builder, quads[s], _load(builder, xp, 32 * s, _V32I8)), splats[s])
        mins_part = _madd(builder, None, _sums16(builder, bp), mins_paired)
        parts.append(builder.fsub(_scaled(builder, acc, d, xd), _scaled(builder, mins_part, dmin, xd), flags=_FAST))
    return parts


def _q6k_block(builder, blk, xps, bps, xds):
    """One Q6_K block per token (arguments as _q4k_block): d*xd*sum_i sc_i*dot(q_i - 32, x_i)
    as <8 x float> partial sums, from exact integer sums."""
    scales = builder.sext(_load(builder, blk, 192, _V16I8), _V16I16)
    low4, three, four = _splat(_V32I8, 15), _splat(_V32I8, 3), _splat(_V32I8, 4)
    quads, splats = [], []
    for h in range(2):
        ql0 = _load(builder, blk, 64 * h, _V32I8)
        ql1 = _load(builder, blk, 64 * h + 32, _V32I8)
        qh = _load(builder, blk, 128 + 32 * h, _V32I8)

        def high(shift):
            bits = builder.lshr(qh, _splat(_V32I8, shift)) if shift else qh
            return builder.shl(builder.and_(bits, three), four)
        quads += [builder.or_(builder.and_(ql0, low4), high(0)),
                  builder.or_(builder.and_(ql1, low4), high(2)),
                  builder.or_(builder.lshr(ql0, four), high(4)),
                  builder.or_(builder.lshr(ql1, four), high(6))]
        for k in range(4):
            s = 8 * h + 2 * k   # activations 0..15 of this group use scale s, 16..31 scale s + 1
            splats.append(_shuffle(builder, scales, [s] * 8 + [s + 1] * 8))
    d = builder.extract_element(_f16_at(builder, blk, 208, 1), ir.Constant(_I32, 0))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        acc = None
        for g in range(8):   # group g covers activations 32g..32g+31
            acc = _madd(builder, acc, _maddubs(builder, quads[g], _load(builder, xp, 32 * g, _V32I8)), splats[g])
        # the stored values are q + 32: subtract 32 * sum_i sc_i * sum(x_i)
        off = _madd(builder, None, _sums16(builder, bp), scales)
        parts.append(_scaled(builder, builder.sub(acc, builder.shl(off, _splat(_V8I32, 5))), d, xd))
    return parts


def _nibbles32(builder, blk, offset: int):
    """The 32 four-bit codes of a 16-byte ggml nibble array: low nibbles are elements 0..15,
    high nibbles 16..31."""
    qs = _load(builder, blk, offset, _V16I8)
    lo = builder.and_(qs, _splat(_V16I8, 15))
    hi = builder.lshr(qs, _splat(_V16I8, 4))
    mask = ir.Constant(ir.VectorType(_I32, 32), [ir.Constant(_I32, i) for i in range(32)])
    return builder.shuffle_vector(lo, hi, mask)


def _lane0(builder, vec_ty, value):
    """A vector of vec_ty with `value` in lane 0 and zeros elsewhere."""
    zero = ir.Constant(vec_ty, [ir.Constant(vec_ty.element, 0)] * vec_ty.count)
    return builder.insert_element(zero, value, ir.Constant(_I32, 0))


def _sum32(builder, bp):
    """The int16 sum of one token's 32 activations, as i32."""
    return builder.sext(builder.load(builder.bitcast(bp, _I16.as_pointer()), align=2), _I32)


def _q8_0_block(builder, blk, xps, bps, xds):
    """One Q8_0 block (f16 d, 32 int8) against 32 int8 activations per token: d*xd*dot(w, x)
    as <8 x float>. The signed product goes through |w| * (x with w's sign), as in ggml."""
    w = _load(builder, blk, 2, _V32I8)
    zero = ir.Constant(_V32I8, [ir.Constant(_I8, 0)] * 32)
    negative = builder.icmp_signed("<", w, zero)
    w_abs = builder.select(negative, builder.sub(zero, w), w)   # -128 stays 0x80 = 128 unsigned
    d = builder.extract_element(_f16_at(builder, blk, 0, 1), ir.Constant(_I32, 0))
    parts = []
    for xp, xd in zip(xps, xds):
        x = _load(builder, xp, 0, _V32I8)
        signed_x = builder.select(negative, builder.sub(zero, x),
                                  builder.select(builder.icmp_signed("==", w, zero), zero, x))
        parts.append(_scaled(builder, _dot_u8s8(builder, w_abs, signed_x), d, xd))
    return parts


def _q5_0_block(builder, blk, xps, bps, xds):
    """One Q5_0 block (f16 d, 32 high bits, 16 nibble bytes; value = d*(q - 16)) per token:
    d*xd*(dot(q, x) - 16*sum(x)) as <8 x float>."""
    high = builder.bitcast(_load(builder, blk, 2, _I32), ir.VectorType(ir.IntType(1), 32))
    q = builder.or_(_nibbles32(builder, blk, 6),
                    builder.shl(builder.zext(high, _V32I8), _splat(_V32I8, 4)))
    d = builder.extract_element(_f16_at(builder, blk, 0, 1), ir.Constant(_I32, 0))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        dot = _dot_u8s8(builder, q, _load(builder, xp, 0, _V32I8))
        offset = builder.shl(_sum32(builder, bp), ir.Constant(_I32, 4))
        parts.append(_scaled(builder, builder.sub(dot, _lane0(builder, _V8I32, offset)), d, xd))
    return parts


def _q4_1_block(builder, blk, xps, bps, xds):
    """One Q4_1 block (f16 d, f16 m, 16 nibble bytes; value = d*q + m) per token:
    d*xd*dot(q, x) + m*xd*sum(x) as <8 x float>."""
    q = _nibbles32(builder, blk, 4)
    dm = _f16_at(builder, blk, 0, 2)
    d, m = (builder.extract_element(dm, ir.Constant(_I32, i)) for i in (0, 1))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        dot = _scaled(builder, _dot_u8s8(builder, q, _load(builder, xp, 0, _V32I8)), d, xd)
        shift = builder.fmul(builder.fmul(m, xd, flags=_FAST), builder.sitofp(_sum32(builder, bp), _F32), flags=_FAST)
        parts.append(builder.fadd(dot, _lane0(builder, _V8F32, shift), flags=_FAST))
    return parts


# weight type -> (bytes per block, activations per block, the block's IR)
_BLOCKS = {Q4_K: (144, 256, _q4k_block), Q6_K: (210, 256, _q6k_block), Q8_0: (34, 32, _q8_0_block),
           Q5_0: (22, 32, _q5_0_block), Q4_1: (20, 32, _q4_1_block)}


def _row_loop(context, builder, arg_types, args, qtype: int, tokens: int):
    """IR for W_row . x_t over a whole row of `qtype` blocks, for `tokens` activation rows; returns
    one float per token. Arguments as in row_dot: block_fn turns each block into scaled 8-lane
    float partial sums, which are added into one accumulator per token and reduced once per row."""
    block_bytes, block_elems, block_fn = _BLOCKS[qtype]
    sums_per_block = 16 if block_elems == 256 else 1
    (trow, txq, txo, txs, txd, tdo, tds, tbs, tbo, tbst) = arg_types
    row_ary = context.make_array(trow)(context, builder, args[0])
    nblocks = builder.udiv(cgutils.unpack_tuple(builder, row_ary.shape, 1)[0],
                           ir.Constant(row_ary.shape.type.element, block_bytes))
    intp = lambda v, t: context.cast(builder, v, t, types.intp)  # noqa: E731
    xstride, dstride, bstride = intp(args[3], txs), intp(args[6], tds), intp(args[9], tbst)
    x0 = _ptr(context, builder, txq, args[1], txo, args[2])
    d0 = _ptr(context, builder, txd, args[4], tdo, args[5])
    b0 = _ptr(context, builder, tbs, args[7], tbo, args[8])
    accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8F32, [0.0] * 8)) for _ in range(tokens)]
    with cgutils.for_range(builder, nblocks) as loop:
        b = loop.index

        def at(base, step, stride, t):   # element b*step + t*stride of an activation array
            return builder.gep(base, [builder.add(builder.mul(b, ir.Constant(b.type, step)),
                                                  builder.mul(stride, ir.Constant(_I64, t)))])
        blk = builder.gep(row_ary.data, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        if tokens == 1:
            for k in range(0, block_bytes, 64):
                _prefetch(builder, blk, PREFETCH_AHEAD + k)
        parts = block_fn(builder, blk, [at(x0, block_elems, xstride, t) for t in range(tokens)],
                         [at(b0, sums_per_block, bstride, t) for t in range(tokens)],
                         [builder.load(at(d0, 1, dstride, t)) for t in range(tokens)])
        for acc, part in zip(accs, parts):
            builder.store(builder.fadd(builder.load(acc), part, flags=_FAST), acc)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, _V8F32]),
                                        "llvm.vector.reduce.fadd.v8f32")
    return [builder.call(fn, [ir.Constant(_F32, 0.0), builder.load(a)], fastmath=_FAST) for a in accs]


def _row_dot_codegen(tokens: int):
    """A switch on the weight type (a runtime value) to one _row_loop per supported type; an
    unsupported type gives NaN (callers pass only int8_ready types)."""
    def codegen(context, builder, signature, args):
        qtype = context.cast(builder, args[0], signature.args[0], types.int64)
        results = [cgutils.alloca_once(builder, _F32) for _ in range(tokens)]
        merge = builder.append_basic_block("row_dot.end")
        unknown = builder.append_basic_block("row_dot.unknown")
        switch = builder.switch(qtype, unknown)
        for qt in _BLOCKS:
            case = builder.append_basic_block(f"row_dot.type{qt}")
            switch.add_case(ir.Constant(qtype.type, qt), case)
            with builder.goto_block(case):
                for res, value in zip(results, _row_loop(context, builder, signature.args[1:], args[1:], qt, tokens)):
                    builder.store(value, res)
                builder.branch(merge)
        with builder.goto_block(unknown):
            for res in results:
                builder.store(ir.Constant(_F32, float("nan")), res)
            builder.branch(merge)
        builder.position_at_end(merge)
        sums = [builder.load(r) for r in results]
        return sums[0] if tokens == 1 else context.make_tuple(builder, signature.return_type, sums)
    return codegen


def _row_dot_intrinsic(tokens: int, doc: str):
    def typer(typingctx, qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride):
        ret = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        return ret(qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride), _row_dot_codegen(tokens)
    typer.__doc__ = doc
    typer.__name__ = typer.__qualname__ = f"row_dot_{tokens}"
    return intrinsic(typer)


_ARGS = """Arguments (qtype, row, xq, xo, xstride, xd, do, dstride, bs, bo, bstride): the weight row's
    GGML type and bytes; activation row t starts at xq[xo + t*xstride], its per-block scales at
    xd[do + t*dstride] and its sums (one per 16 values for 256-element blocks, one per block for
    32-element blocks) at bs[bo + t*bstride]."""
row_dot = _row_dot_intrinsic(1, "W_row . x for one activation row (a float).\n\n    " + _ARGS)
row_dot4 = _row_dot_intrinsic(4, "W_row . x_t for four activation rows t (a 4-tuple).\n\n    " + _ARGS)
