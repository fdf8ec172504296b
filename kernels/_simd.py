"""Integer block dot products written as LLVM IR, one builder per weight type.

LLVM does not turn Numba loops into the byte multiply-adds llama.cpp's K-quant dot
products are built on, and the nibble loops it does vectorize stay in 32-bit lanes
(see PERF-NOTES.md). Each `<type>_block` builder here emits one weight block's dot
product against int8 activations from 256-bit vector operations, the way ggml does
(kernels/_mm_int8.py loops them over a row): `vpmaddubsw` multiplies unsigned
weight codes by signed activations in pairs (16-bit sums), and a
multiply-add with the sub-block's scale (`vpdpwssd` with AVX512-VNNI, else `vpmaddwd`
+ add) folds the scale and the accumulation into one instruction.

Signed weights (IQ4_NL, IQ4_XS: values from a 16-entry table, looked up with `vpshufb`)
go through |w| times x with w's sign (`vpsignb`), as ggml's mul_sum_i8_pairs. With GFNI,
bit fields (nibbles, 2-bit codes, high bits) are cut out with one `vgf2p8affineqb` each.

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


_FEATURES = llvm_binding.get_host_cpu_features()
HAS_AVX2 = bool(_FEATURES.get("avx2", False))
HAS_VNNI = bool(_FEATURES.get("avx512vnni", False) and _FEATURES.get("avx512vl", False))
HAS_GFNI = bool(HAS_AVX2 and _FEATURES.get("gfni", False))

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V32I8, _V16I8, _V8I8 = ir.VectorType(_I8, 32), ir.VectorType(_I8, 16), ir.VectorType(_I8, 8)
_V16I16, _V8I16 = ir.VectorType(_I16, 16), ir.VectorType(_I16, 8)
_V8I32, _V16I32, _V32I16 = ir.VectorType(_I32, 8), ir.VectorType(_I32, 16), ir.VectorType(_I16, 32)


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


def _dot_u8s8(builder, u8: ir.Value, s8: ir.Value, acc: ir.Value | None = None) -> ir.Value:
    """<8 x i32>: lane i = acc[i] + sum_k u8[4i+k] * s8[4i+k] (vpdpbusd with AVX512-VNNI, else
    vpmaddubsw + vpmaddwd by ones); acc may be None (zeros). vpdpbusd adds into acc for free:
    a block's integer offset passed as acc costs no instruction per weight row."""
    if HAS_VNNI:
        return _intrinsic(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32,
                          [acc if acc is not None else ir.Constant(_V8I32, [ir.Constant(_I32, 0)] * 8),
                           builder.bitcast(u8, _V8I32), builder.bitcast(s8, _V8I32)])
    dot = _madd(builder, None, _maddubs(builder, u8, s8), _splat(_V16I16, 1))
    return dot if acc is None else builder.add(acc, dot)


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


def types_mask(qtypes) -> int:
    """The types mask of GGML type ids (bit t for type t): what the kernels compiled for a set
    of weight types (kernels/_mm_int8.mm_q8_for, kernels/_mm_panel.mm_panels_for) are keyed on."""
    mask = 0
    for t in qtypes:
        mask |= 1 << int(t)
    return mask


def literal_mask(kinds) -> int | None:
    """The value of an intrinsic's types-mask argument when it is a compile-time constant (a
    kernel's closure constant, which Numba types as a literal), else None."""
    return kinds.literal_value if isinstance(kinds, types.IntegerLiteral) else None


def type_switch(builder, qtype, candidates, emit, n_results: int = 0):
    """IR: a switch on the weight type (a runtime integer) to `emit(qt)` for each QuantType of
    `candidates`; emit returns n_results floats, and any other type gives NaN for them (callers
    pass only candidate types). Returns the results."""
    results = [cgutils.alloca_once(builder, _F32) for _ in range(n_results)]
    merge = builder.append_basic_block("type_switch.end")
    unknown = builder.append_basic_block("type_switch.unknown")
    switch = builder.switch(qtype, unknown)
    for qt in candidates:
        case = builder.append_basic_block(f"type_switch.type{qt.id}")
        switch.add_case(ir.Constant(qtype.type, qt.id), case)
        with builder.goto_block(case):
            for res, value in zip(results, emit(qt) or ()):
                builder.store(value, res)
            builder.branch(merge)
    with builder.goto_block(unknown):
        for res in results:
            builder.store(ir.Constant(_F32, float("nan")), res)
        builder.branch(merge)
    builder.position_at_end(merge)
    return [builder.load(r) for r in results]


PREFETCH_AHEAD = 16384  # bytes: weight rows stream from DRAM; fetch this far ahead of the block in use (measured best of 3072, 8192, 16384 on decode)


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


def _q4k_scales_mins_vec(builder, blk):
    """_q4k_scales_mins in vector registers: the same bit moves on the three words as lanes of
    one <4 x i32> (bytes 4..19; the fourth lane is unused). The scalar version needs more
    general registers than a big kernel has, and its spills and moves cost more than this."""
    v4 = ir.VectorType(_I32, 4)
    c = lambda *vals: ir.Constant(v4, [ir.Constant(_I32, v) for v in vals])  # noqa: E731
    words = _load(builder, blk, 4, v4)                         # u0, u1, u2, -
    lo = builder.and_(words, c(*[0x3F3F3F3F] * 4))             # sc_lo, mn_lo
    u22 = _shuffle(builder, words, [2, 2, 2, 2])
    hi_low = builder.and_(builder.lshr(u22, c(0, 4, 0, 4)), c(*[0x0F0F0F0F] * 4))
    hi_top = builder.shl(builder.and_(builder.lshr(words, c(*[6] * 4)), c(*[0x03030303] * 4)), c(*[4] * 4))
    hi = builder.or_(hi_low, hi_top)                            # sc_hi, mn_hi
    both = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 4), [ir.Constant(_I32, i) for i in (0, 4, 1, 5)]))
    b16 = builder.bitcast(both, _V16I8)                         # 8 scale bytes, then 8 min bytes
    return (builder.zext(_shuffle(builder, b16, range(8)), _V8I16),
            builder.zext(_shuffle(builder, b16, range(8, 16)), _V8I16))


_F32 = ir.FloatType()
_V8F32 = ir.VectorType(_F32, 8)
_FAST = ("reassoc", "contract", "nsz")


def reduce_fadd(builder, vec, flags=_FAST):
    """The sum of a float vector's lanes (llvm.vector.reduce.fadd, with `flags` licensing its order)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec.type.element, [vec.type.element, vec.type]),
                                        f"llvm.vector.reduce.fadd.v{vec.type.count}f32")
    return builder.call(fn, [ir.Constant(vec.type.element, 0.0), vec], fastmath=flags)


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


def _scaled_codes_dot(builder, quads, splats, xp):
    """<8 x i32>: sum_g splats[g] . maddubs(quads[g], x[32g:32g+32]) over one token's 256 int8
    activations at xp: eight 32-code groups of unsigned weight codes, each multiplied by its
    activations in pairs (vpmaddubsw) and folded in with its sub-block scales (vpdpwssd or
    vpmaddwd + add). The inner loop of the 256-element K-quant blocks."""
    acc = None
    for g, (q, sc) in enumerate(zip(quads, splats)):
        acc = _madd(builder, acc, _maddubs(builder, q, _load(builder, xp, 32 * g, _V32I8)), sc)
    return acc


def q4_k_block(builder, blk, xps, bps, xds):
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
        acc = _scaled_codes_dot(builder, quads, splats, xp)
        mins_part = _madd(builder, None, _sums16(builder, bp), mins_paired)
        parts.append(builder.fsub(_scaled(builder, acc, d, xd), _scaled(builder, mins_part, dmin, xd), flags=_FAST))
    return parts


def q6_k_block(builder, blk, xps, bps, xds):
    """One Q6_K block per token (arguments as q4_k_block): d*xd*sum_i sc_i*dot(q_i - 32, x_i)
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
        acc = _scaled_codes_dot(builder, quads, splats, xp)
        # the stored values are q + 32: subtract 32 * sum_i sc_i * sum(x_i)
        off = _madd(builder, None, _sums16(builder, bp), scales)
        parts.append(_scaled(builder, builder.sub(acc, builder.shl(off, _splat(_V8I32, 5))), d, xd))
    return parts


# GF(2) bit matrices for vgf2p8affineqb, one per 64-bit lane: output bit i of each byte is the
# parity of (input byte & byte 7-i of the matrix). These two keep the low nibble / shift down the high one.
_GF_LOW4, _GF_HIGH4 = 0x0102040800000000, 0x1020408000000000


def _gf_nibbles(builder, doubled):
    """Nibble codes of 16-byte nibble arrays, each given twice in a row (`doubled`: 32 or 64
    bytes): one vgf2p8affineqb whose bit matrix is "low nibble" for the first copy of each and
    "high nibble" for the second, so every array becomes its 32 codes in ggml's order."""
    n = doubled.type.count
    matrix = ir.Constant(ir.VectorType(_I64, n // 8),
                         [ir.Constant(_I64, m) for m in ((_GF_LOW4,) * 2 + (_GF_HIGH4,) * 2) * (n // 32)])
    return _intrinsic(builder, f"llvm.x86.vgf2p8affineqb.{8 * n}", doubled.type,
                      [doubled, builder.bitcast(matrix, doubled.type), ir.Constant(_I8, 0)])


def _nibbles32(builder, blk, offset: int):
    """The 32 four-bit codes of a 16-byte ggml nibble array: low nibbles are elements 0..15,
    high nibbles 16..31. With GFNI: the 16 bytes loaded into both halves, and one vgf2p8affineqb
    whose bit matrix is "low nibble" in the low half and "high nibble" in the high half (for
    the 32-element block types this is a tenth of the instructions of a block)."""
    if HAS_GFNI:
        return _gf_nibbles(builder, _shuffle(builder, _load(builder, blk, offset, _V16I8), list(range(16)) * 2))
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


def q8_0_block(builder, blk, xps, bps, xds):
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


def q5_0_block(builder, blk, xps, bps, xds):
    """One Q5_0 block (f16 d, 32 high bits, 16 nibble bytes; value = d*(q - 16)) per token:
    d*xd*(dot(q, x) - 16*sum(x)) as <8 x float>."""
    high = builder.bitcast(_load(builder, blk, 2, _I32), ir.VectorType(ir.IntType(1), 32))
    q = builder.or_(_nibbles32(builder, blk, 6),
                    builder.shl(builder.zext(high, _V32I8), _splat(_V32I8, 4)))
    d = builder.extract_element(_f16_at(builder, blk, 0, 1), ir.Constant(_I32, 0))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        offset = builder.neg(builder.shl(_sum32(builder, bp), ir.Constant(_I32, 4)))   # -16*sum(x): per token
        dot = _dot_u8s8(builder, q, _load(builder, xp, 0, _V32I8), _lane0(builder, _V8I32, offset))
        parts.append(_scaled(builder, dot, d, xd))
    return parts


def q4_1_block(builder, blk, xps, bps, xds):
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


def _psign(builder, x, w):
    """x with w's sign, lane by lane (vpsignb): -x where w < 0, 0 where w == 0, else x."""
    if HAS_AVX2 and x.type == _V32I8:
        return _intrinsic(builder, "llvm.x86.avx2.psign.b", _V32I8, [x, w])
    zero = ir.Constant(x.type, [ir.Constant(_I8, 0)] * x.type.count)
    return builder.select(builder.icmp_signed("<", w, zero), builder.sub(zero, x),
                          builder.select(builder.icmp_signed("==", w, zero), zero, x))


def _lut16(builder, table, idx):
    """<32 x i8>: lane i = table[idx[i]] for 16 int8 table entries and indices 0..15 (vpshufb with
    the table in both 128-bit halves; without AVX2 a select per entry)."""
    if HAS_AVX2:
        return _intrinsic(builder, "llvm.x86.avx2.pshuf.b", _V32I8,
                          [ir.Constant(_V32I8, [ir.Constant(_I8, v) for v in list(table) * 2]), idx])
    out = ir.Constant(_V32I8, [ir.Constant(_I8, 0)] * 32)
    for k, v in enumerate(table):
        out = builder.select(builder.icmp_unsigned("==", idx, _splat(_V32I8, k)), _splat(_V32I8, v), out)
    return out


def _gf_bits(builder, vec, moves):
    """<32 x i8>: in every byte, bit dst = bit src of vec's byte for each (src, dst) of moves, the
    other bits clear. With GFNI one vgf2p8affineqb (LLVM emits a shift and a mask); else
    shifts, masks and ors."""
    if HAS_GFNI:
        rows = [0] * 8                         # byte 7-i of the matrix selects output bit i
        for src, dst in moves:
            rows[7 - dst] |= 1 << src
        matrix = sum(r << (8 * k) for k, r in enumerate(rows))
        return _intrinsic(builder, "llvm.x86.vgf2p8affineqb.256", _V32I8,
                          [vec, builder.bitcast(ir.Constant(ir.VectorType(_I64, 4), [ir.Constant(_I64, matrix)] * 4), _V32I8),
                           ir.Constant(_I8, 0)])
    out = None
    for src, dst in moves:
        bit = _bit_to(builder, vec, src, dst)
        out = bit if out is None else builder.or_(out, bit)
    return out


def _bit_to(builder, vec, src: int, dst: int):
    """Bit `src` of every byte of vec moved to bit `dst`, all other bits clear."""
    if HAS_GFNI and src != dst:
        return _gf_bits(builder, vec, [(src, dst)])
    if src > dst:
        vec = builder.lshr(vec, _splat(vec.type, src - dst))
    elif src < dst:
        vec = builder.shl(vec, _splat(vec.type, dst - src))
    return builder.and_(vec, _splat(vec.type, 1 << dst))


def _scalar_f16(builder, blk, offset: int):
    return builder.extract_element(_f16_at(builder, blk, offset, 1), ir.Constant(_I32, 0))


def _opaque(builder, vec):
    """vec unchanged, through an empty inline asm that LLVM cannot see into (no instruction is
    emitted). The scale splats of q2_k_block and q3_k_block shuffle 16-bit scales widened from
    bytes; LLVM would narrow each such shuffle to a byte shuffle plus its own widening (two
    port-5 instructions per splat instead of one vpermw). q5_1_block uses it to keep its result
    out of the caller's accumulator chain."""
    if not HAS_AVX2:
        return vec
    return builder.asm(ir.FunctionType(vec.type, [vec.type]), "", "=v,0", [vec], side_effect=False)


def _pair_splats(builder, scales16, group: int):
    """<16 x i16> of scales16[2*group] (lanes 0..7) and scales16[2*group + 1] (lanes 8..15): the
    scales of the two 16-element sub-blocks of a 32-activation vpmaddubsw result."""
    return _shuffle(builder, scales16, [2 * group] * 8 + [2 * group + 1] * 8)


# ggml's kvalues_iq4nl (kernels/_dequant_ext.IQ4NL_VALUES), and their absolute values
_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4NL_ABS = tuple(abs(v) for v in _IQ4NL)
_IQ4NL_BIASED = tuple(v ^ -128 for v in _IQ4NL)   # the bytes of v + 128 (1..241), as int8 constants


def q4_0_block(builder, blk, xps, bps, xds):
    """One Q4_0 block (f16 d, 16 nibble bytes; value = d*(q - 8)) per token:
    d*xd*(dot(q, x) - 8*sum(x)) as <8 x float>, q unsigned (ggml signs q - 8 instead: the same
    integer)."""
    q = _nibbles32(builder, blk, 2)
    d = _scalar_f16(builder, blk, 0)
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        offset = builder.neg(builder.shl(_sum32(builder, bp), ir.Constant(_I32, 3)))   # -8*sum(x): per token
        dot = _dot_u8s8(builder, q, _load(builder, xp, 0, _V32I8), _lane0(builder, _V8I32, offset))
        parts.append(_scaled(builder, dot, d, xd))
    return parts


_V16F32, _V64I8 = ir.VectorType(_F32, 16), ir.VectorType(_I8, 64)
# two 32-element blocks per 512-bit vpdpbusd: with AVX512-VNNI and GFNI (Zen 4, Ice Lake and later)
HAS_PAIRS = bool(HAS_VNNI and HAS_GFNI and _FEATURES.get("avx512bw", False))


def _nibble_pair(builder, blk, xp, bp, xdp, table, bias_shift: int):
    """Two consecutive blocks of 16 nibble bytes after an f16 d (Q4_0, IQ4_NL: 18 bytes each, at
    blk and blk + 18) against one token's 64 int8 activations (xp), their two block sums (bp)
    and two scales (xdp): <16 x float>, lanes 0..7 the first block's partial sums as the type's
    block IR gives them, 8..15 the second's. Codes are the nibbles, or table[nibble] (vpshufb)
    if `table`; both are unsigned, and the integer -sum(x) << bias_shift that makes them the
    type's signed values rides in vpdpbusd's accumulator (Q4_0: q - 8; IQ4_NL: kv[q] + 128 -
    128). One vgf2p8affineqb unpacks both blocks and one vpdpbusd multiplies them: the one-token
    loop of these types is bound by instructions, not by memory."""
    both = builder.shuffle_vector(_load(builder, blk, 2, _V16I8), _load(builder, blk, 20, _V16I8),
                                  ir.Constant(ir.VectorType(_I32, 64), [ir.Constant(_I32, i) for i in
                                                                          list(range(16)) * 2 + list(range(16, 32)) * 2]))
    q = _gf_nibbles(builder, both)
    if table is not None:
        q = _intrinsic(builder, "llvm.x86.avx512.pshuf.b.512", _V64I8,
                       [ir.Constant(_V64I8, [ir.Constant(_I8, v) for v in list(table) * 4]), q])
    v2i32 = ir.VectorType(_I32, 2)
    sums = builder.sext(builder.load(builder.bitcast(bp, ir.VectorType(_I16, 2).as_pointer()), align=2), v2i32)
    offsets = builder.neg(builder.shl(sums, _splat(v2i32, bias_shift)))
    acc = ir.Constant(_V16I32, [ir.Constant(_I32, 0)] * 16)
    for k, lane in enumerate((0, 8)):
        acc = builder.insert_element(acc, builder.extract_element(offsets, ir.Constant(_I32, k)), ir.Constant(_I32, lane))
    dot = _intrinsic(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                     [acc, builder.bitcast(q, _V16I32), builder.bitcast(_load(builder, xp, 0, _V64I8), _V16I32)])
    d = ir.Constant(ir.VectorType(_F32, 2), None)
    for k, offset in enumerate((0, 18)):
        d = builder.insert_element(d, _scalar_f16(builder, blk, offset), ir.Constant(_I32, k))
    xd = builder.load(builder.bitcast(xdp, ir.VectorType(_F32, 2).as_pointer()), align=4)
    scale = _shuffle(builder, builder.fmul(d, xd, flags=_FAST), [0] * 8 + [1] * 8)
    return builder.fmul(builder.sitofp(dot, _V16F32), scale, flags=_FAST)


def q4_0_pair(builder, blk, xp, bp, xdp):
    """Two Q4_0 blocks, one token, in 512-bit vectors (_nibble_pair): q - 8 = q + (-8)."""
    return _nibble_pair(builder, blk, xp, bp, xdp, None, 3)


def iq4_nl_pair(builder, blk, xp, bp, xdp):
    """Two IQ4_NL blocks, one token (_nibble_pair): kv[q] = (kv[q] + 128) - 128, as iq4_nl_block."""
    return _nibble_pair(builder, blk, xp, bp, xdp, _IQ4NL_BIASED, 7)


def q5_1_block(builder, blk, xps, bps, xds):
    """One Q5_1 block (f16 d, f16 m, 32 high bits, 16 nibble bytes; value = d*q + m, q in 0..31)
    per token: d*xd*dot(q, x) + m*xd*sum(x) as <8 x float> (ggml's Q8_1 activations have the
    same int8 values as our Q8_0 layout; its s term is our xd*sum(x)). sum(x) is taken as
    dot(1, x), a second vpdpbusd in 8 lanes: cheaper than converting the scalar block sum and
    blending it into one lane."""
    high = builder.bitcast(_load(builder, blk, 4, _I32), ir.VectorType(ir.IntType(1), 32))
    q = builder.or_(_nibbles32(builder, blk, 8),
                    builder.shl(builder.zext(high, _V32I8), _splat(_V32I8, 4)))
    ones = _splat(_V32I8, 1)
    dm = _f16_at(builder, blk, 0, 2)
    v2f32 = dm.type
    parts = []
    for xp, xd in zip(xps, xds):
        x = _load(builder, xp, 0, _V32I8)
        dot = builder.sitofp(_dot_u8s8(builder, q, x), _V8F32)
        total = builder.sitofp(_dot_u8s8(builder, ones, x), _V8F32)
        xd2 = _shuffle(builder, builder.insert_element(ir.Constant(v2f32, None), xd, ir.Constant(_I32, 0)), [0, 0])
        dmx = builder.fmul(dm, xd2, flags=_FAST)          # d*xd, m*xd
        part = builder.fadd(builder.fmul(dot, _shuffle(builder, dmx, [0] * 8), flags=_FAST),
                            builder.fmul(total, _shuffle(builder, dmx, [1] * 8), flags=_FAST), flags=_FAST)
        # opaque: else LLVM folds both products into the caller's accumulator as two chained FMAs,
        # whose latency (8 cycles per 24-byte block) then bounds the loop; this way it is one add
        parts.append(_opaque(builder, part))
    return parts


def iq4_nl_block(builder, blk, xps, bps, xds):
    """One IQ4_NL block (f16 d, 16 nibble bytes indexing kvalues_iq4nl) per token:
    d*xd*dot(kv[q], x) as <8 x float>. The table lookup is vpshufb.

    With VNNI the table is biased by 128 to unsigned bytes (1..241), which vpdpbusd takes as
    they are, and dot(kv[q], x) = dot(kv[q] + 128, x) - dot(128, x), the same integer. The
    second dot depends on the token only, so LLVM computes it once for the four rows of a
    rows_dot: one shuffle-port instruction (vpshufb) per row and block, where the sign route
    takes two (vpshufb for kv[q], vpshufb for |kv[q]|). vpmaddubsw would saturate on the
    biased bytes (241*127*2 > 32767), so without VNNI the signed product goes through
    |kv[q]| * (x with kv[q]'s sign), as ggml's mul_sum_i8_pairs."""
    q = _nibbles32(builder, blk, 2)
    d = _scalar_f16(builder, blk, 0)
    if HAS_VNNI:
        w = _lut16(builder, _IQ4NL_BIASED, q)
        bias = _splat(_V32I8, -128)   # the byte 0x80: 128 as vpdpbusd's unsigned operand
        parts = []
        for xp, xd in zip(xps, xds):
            x = _load(builder, xp, 0, _V32I8)
            # the token's -dot(128, x), shared by every row, rides in vpdpbusd's accumulator
            dot = _dot_u8s8(builder, w, x, builder.neg(_dot_u8s8(builder, bias, x)))
            parts.append(_scaled(builder, dot, d, xd))
        return parts
    w, w_abs = _lut16(builder, _IQ4NL, q), _lut16(builder, _IQ4NL_ABS, q)
    return [_scaled(builder, _dot_u8s8(builder, w_abs, _psign(builder, _load(builder, xp, 0, _V32I8), w)), d, xd)
            for xp, xd in zip(xps, xds)]


def q5_k_block(builder, blk, xps, bps, xds):
    """One Q5_K block (f16 d, f16 dmin, Q4_K's 12 scale bytes, qh[32], qs[128]) per token, as
    q4_k_block with q = nibble + 16 * bit s of qh for sub-block s: d*xd*sum_s sc_s*dot(q_s, x_s)
    - dmin*xd*sum_s min_s*sum(x_s) as <8 x float>, from exact integer sums."""
    scales, mins = _q4k_scales_mins_vec(builder, blk)
    mins_paired = _shuffle(builder, mins, [i // 2 for i in range(16)])
    low4, four = _splat(_V32I8, 15), _splat(_V32I8, 4)
    qh = _load(builder, blk, 16, _V32I8)
    quads, splats = [], []
    for j in range(4):
        q = _load(builder, blk, 48 + 32 * j, _V32I8)
        quads += [builder.or_(builder.and_(q, low4), _bit_to(builder, qh, 2 * j, 4)),
                  builder.or_(builder.lshr(q, four), _bit_to(builder, qh, 2 * j + 1, 4))]
        splats += [_shuffle(builder, scales, [2 * j] * 16), _shuffle(builder, scales, [2 * j + 1] * 16)]
    dm = _f16_at(builder, blk, 0, 2)
    d, dmin = (builder.extract_element(dm, ir.Constant(_I32, i)) for i in (0, 1))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        acc = _scaled_codes_dot(builder, quads, splats, xp)
        mins_part = _madd(builder, None, _sums16(builder, bp), mins_paired)
        parts.append(builder.fsub(_scaled(builder, acc, d, xd), _scaled(builder, mins_part, dmin, xd), flags=_FAST))
    return parts


def _q3k_scales(builder, blk):
    """The 16 signed 6-bit scales of a Q3_K block (bytes 96..107) as <16 x i16>: ggml's bit
    moves on the three little-endian words a0, a1, hi, as lanes of one <4 x i32> (lane k holds
    scales 4k..4k+3: low nibbles of a0, a1, then their high nibbles; two high bits from hi,
    shifted by 2k), minus 32. In vector registers: the scalar version's general registers
    spill in the big kernel. The 16 bytes are read from 94 (110-byte blocks: not past the end)."""
    v4 = ir.VectorType(_I32, 4)
    c = lambda *vals: ir.Constant(v4, [ir.Constant(_I32, v) for v in vals])  # noqa: E731
    raw = _load(builder, blk, 94, _V16I8)                      # bytes 94..109: a0 at 2, a1 at 6, hi at 10
    a = builder.bitcast(_shuffle(builder, raw, [2, 3, 4, 5, 6, 7, 8, 9] * 2), v4)     # a0, a1, a0, a1
    hi = builder.bitcast(_shuffle(builder, raw, [10, 11, 12, 13] * 4), v4)
    low = builder.and_(builder.lshr(a, c(0, 0, 4, 4)), c(*[0x0F0F0F0F] * 4))
    high = builder.shl(builder.and_(builder.lshr(hi, c(0, 2, 4, 6)), c(*[0x03030303] * 4)), c(*[4] * 4))
    return builder.sext(builder.sub(builder.bitcast(builder.or_(low, high), _V16I8), _splat(_V16I8, 32)), _V16I16)


def q3_k_block(builder, blk, xps, bps, xds):
    """One Q3_K block (hmask[32], qs[64], 12 scale bytes, f16 d) per token: d*xd*sum_i
    sc_i*dot(q_i, x_i) as <8 x float>, q = 2 low bits - 4 unless the hmask bit is set, from
    exact integer sums. ggml subtracts the 4 per element (a second vpmaddubsw); here the stored
    u = q + 4 (0..7) is multiplied and 4 * sum_i sc_i * sum(x_i) subtracted, from the Q8_K
    16-element sums (as q6_k_block does with its 32)."""
    scales = _opaque(builder, _q3k_scales(builder, blk))
    hm = _load(builder, blk, 0, _V32I8)
    three = _splat(_V32I8, 3)
    quads, splats = [], []
    for h in range(2):
        ql = _load(builder, blk, 32 + 32 * h, _V32I8)
        for s in range(4):   # activations 128h + 32s .. +31: sub-blocks 8h + 2s, 8h + 2s + 1
            g = 4 * h + s
            low = _gf_bits(builder, ql, [(2 * s, 0), (2 * s + 1, 1)]) if s else builder.and_(ql, three)
            quads.append(builder.or_(low, _bit_to(builder, hm, g, 2)))
            splats.append(_pair_splats(builder, scales, g))
    d = _scalar_f16(builder, blk, 108)
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        acc = _scaled_codes_dot(builder, quads, splats, xp)
        off = _madd(builder, None, _sums16(builder, bp), scales)
        parts.append(_scaled(builder, builder.sub(acc, builder.shl(off, _splat(_V8I32, 2))), d, xd))
    return parts


def q2_k_block(builder, blk, xps, bps, xds):
    """One Q2_K block (16 scale bytes: low nibble scale, high nibble min; qs[64]; f16 d, dmin)
    per token: d*xd*sum_i sc_i*dot(q_i, x_i) - dmin*xd*sum_i min_i*sum(x_i) as <8 x float>,
    q the 2-bit codes of 16-element sub-block i, the mins from the Q8_K 16-element sums (as
    ggml), all from exact integer sums."""
    sb = _load(builder, blk, 0, _V16I8)
    scales = _opaque(builder, builder.zext(builder.and_(sb, _splat(_V16I8, 15)), _V16I16))
    mins = builder.zext(builder.lshr(sb, _splat(_V16I8, 4)), _V16I16)
    three = _splat(_V32I8, 3)
    quads, splats = [], []
    for h in range(2):
        q = _load(builder, blk, 16 + 32 * h, _V32I8)
        for s in range(4):   # activations 128h + 32s .. +31: sub-blocks 8h + 2s, 8h + 2s + 1
            quads.append(_gf_bits(builder, q, [(2 * s, 0), (2 * s + 1, 1)]) if s else builder.and_(q, three))
            splats.append(_pair_splats(builder, scales, 4 * h + s))
    dm = _f16_at(builder, blk, 80, 2)
    d, dmin = (builder.extract_element(dm, ir.Constant(_I32, i)) for i in (0, 1))
    parts = []
    for xp, bp, xd in zip(xps, bps, xds):
        acc = _scaled_codes_dot(builder, quads, splats, xp)
        mins_part = _madd(builder, None, _sums16(builder, bp), mins)
        parts.append(builder.fsub(_scaled(builder, acc, d, xd), _scaled(builder, mins_part, dmin, xd), flags=_FAST))
    return parts


def _iq4xs_scales(builder, blk):
    """The 8 scales of an IQ4_XS block as <8 x i16>: (4 low bits from scales_l, nibble ib % 2 of
    byte ib // 2, at 4..7) | (2 high bits 2*ib of the uint16 scales_h at 2) << 4, minus 32."""
    v8i16 = _V8I16
    lo = _shuffle(builder, _load(builder, blk, 4, ir.VectorType(_I8, 4)), [i // 2 for i in range(8)])
    lo = builder.and_(builder.lshr(builder.zext(lo, v8i16), ir.Constant(v8i16, [ir.Constant(_I16, 4 * (i % 2)) for i in range(8)])),
                      _splat(v8i16, 15))
    sh = builder.insert_element(ir.Constant(v8i16, None), _load(builder, blk, 2, _I16), ir.Constant(_I32, 0))
    sh = _shuffle(builder, sh, [0] * 8)
    hi = builder.and_(builder.lshr(sh, ir.Constant(v8i16, [ir.Constant(_I16, 2 * i) for i in range(8)])), _splat(v8i16, 3))
    return builder.sub(builder.or_(lo, builder.shl(hi, _splat(v8i16, 4))), _splat(v8i16, 32))


def iq4_xs_block(builder, blk, xps, bps, xds):
    """One IQ4_XS block (f16 d, scales_h, scales_l[4], qs[128]: 8 sub-blocks of 32 nibbles
    indexing kvalues_iq4nl) per token: d*xd*sum_ib ls_ib*dot(kv[q_ib], x_ib) as <8 x float>,
    ls_ib the signed 6-bit scale, from exact integer sums. As in ggml: vpshufb looks up the
    values, vpmaddubsw multiplies |kv| by x with kv's sign (pairs of at most 2*127*127, no
    saturation) and a multiply-add with the scale (vpdpwssd) accumulates."""
    scales = _iq4xs_scales(builder, blk)
    signed, absolute, splats = [], [], []
    for ib in range(8):
        q = _nibbles32(builder, blk, 8 + 16 * ib)
        signed.append(_lut16(builder, _IQ4NL, q))
        absolute.append(_lut16(builder, _IQ4NL_ABS, q))
        splats.append(_shuffle(builder, scales, [ib] * 16))
    d = _scalar_f16(builder, blk, 0)
    parts = []
    for xp, xd in zip(xps, xds):
        acc = None
        for ib in range(8):
            x = _psign(builder, _load(builder, xp, 32 * ib, _V32I8), signed[ib])
            acc = _madd(builder, acc, _maddubs(builder, absolute[ib], x), splats[ib])
        parts.append(_scaled(builder, acc, d, xd))
    return parts
