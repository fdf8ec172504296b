"""Exact per-block dequantizers for Q4_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS and BF16.

Same convention as `kernels._dequant`: `dq_<type>(blk, dst, lut)` decodes one
block (`blk`, a uint8 view of its bytes) into `dst` (a float32 view of exactly
block_elems floats); `lut` is `kernels.f16.F16_TO_F32`. `bf16_span` decodes a
run of BF16 elements of a row of raw bytes.

Bit-exactness rule: every element is the same float32 expression, evaluated in
the same order, as in gguf.quants.dequantize (gguf 0.19), so results match
bitwise, signed zeros and NaN payloads included: float32 throughout (gguf never
promotes to float64 here), K-quants form the sub-block scale first,
`(d * sc) * q - dmin * m` (Q2_K, Q5_K), `(d * sc) * q` (Q3_K, IQ4_XS).
Since d is an f16 (11 significant bits) and sc, q are small integers (at most
6 + 7 more bits), every such product is exact in float32, so the grouping of
the products cannot change a result; what can is the one rounding add or
subtract (in float32: widening it to float64 could round twice) and which NaN
an operation returns. That last point matters for Q5_1's `d * q + m`: LLVM may swap the
operands of the (commutative) add, which shows only when both are NaN (x86
returns the first operand, numpy's d * q); a block whose m is NaN takes an
explicit path that keeps d * q's NaN.

Speed: integer steps are wrapped in i32() and every shift is by a constant so
LLVM vectorizes in 32-bit lanes (see `kernels._dequant`; a shift by a loop
variable drops it to 64-bit lanes or scalar code). The 16-entry lookups of the
4-bit types (IQ4_NL, IQ4_XS, and Q4_0 as the table -8..7) are a byte shuffle
(pshufb) of the nibbles, emitted as LLVM IR by `_nibble_lut`: a plain table
lookup in Numba becomes vgatherdps or scalar code, 3-5x slower.

`IQ4NL_VALUES` is ggml's 16-entry non-linear table `kvalues_iq4nl` (int8) used
by IQ4_NL and IQ4_XS.
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels._dequant import i32, q4k_scale_min, q5_high_bits, q5_pair
from kernels.f16 import half

IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=np.int8)
IQ4NL_VALUES.flags.writeable = False

HAS_SSSE3 = bool(llvm_binding.get_host_cpu_features().get("ssse3", False))
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16I8, _V16F32 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.FloatType(), 16)


def _nibble_lut(ftable, loop, name):
    """An intrinsic f(blk, o, dst, e, scale) that decodes the 16 nibble bytes blk[o:o+16]
    through the 16-entry table `ftable` (float32 values of small integers):
        dst[e + l] = scale * ftable[blk[o + l] & 15],  dst[e + 16 + l] = scale * ftable[blk[o + l] >> 4].
    Each element is gguf's single product scale * float32(value). With SSSE3 and C-contiguous
    arrays: one 16-byte load, two pshufb on the int8 table, widen, multiply, two 16-float
    stores; otherwise `loop`, the same formula in Python (a module-level function, reading
    ftable as a global: Numba's compile_internal cannot key a closure over an array)."""
    table = [int(v) for v in ftable]
    assert len(table) == 16 and all(-128 <= v < 128 and v == f for v, f in zip(table, ftable))

    def typer(typingctx, blk, o, dst, e, scale):
        sig = types.void(blk, o, dst, e, scale)
        vector = HAS_SSSE3 and blk.layout == "C" and dst.layout == "C"

        def codegen(context, builder, signature, args):
            if not vector:
                return context.compile_internal(builder, loop, signature, args)
            tb, to, td, te, _ = signature.args
            bdata = context.make_array(tb)(context, builder, args[0]).data
            ddata = context.make_array(td)(context, builder, args[2]).data
            bp = builder.gep(bdata, [context.cast(builder, args[1], to, types.intp)])
            dp = builder.gep(ddata, [context.cast(builder, args[3], te, types.intp)])
            q = builder.load(builder.bitcast(bp, _V16I8.as_pointer()), align=1)
            nibbles = (builder.and_(q, ir.Constant(_V16I8, [15] * 16)),
                       builder.lshr(q, ir.Constant(_V16I8, [4] * 16)))
            lut = ir.Constant(_V16I8, table)
            pshufb = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_V16I8, [_V16I8, _V16I8]), "llvm.x86.ssse3.pshuf.b.128")
            s = builder.insert_element(ir.Constant(_V16F32, None), args[4], ir.Constant(_I32, 0))
            s = builder.shuffle_vector(s, ir.Constant(_V16F32, None), ir.Constant(ir.VectorType(_I32, 16), [0] * 16))
            for k, nib in enumerate(nibbles):
                f = builder.sitofp(builder.call(pshufb, [lut, nib]), _V16F32)
                ptr = builder.gep(dp, [ir.Constant(_I64, 16 * k)]) if k else dp
                builder.store(builder.fmul(s, f), builder.bitcast(ptr, _V16F32.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen

    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


_IQ4NL_F32 = IQ4NL_VALUES.astype(np.float32)        # exact, as gguf's .astype(np.float32)
_Q4_0_F32 = np.arange(-8, 8).astype(np.float32)     # Q4_0's nibble - 8


def _iq4_loop(blk, o, dst, e, scale):
    """_iq4_32 without SSSE3 or for non-contiguous arrays."""
    for l in range(16):
        v = i32(blk[o + l])
        dst[e + l] = scale * _IQ4NL_F32[i32(v & i32(15))]
        dst[e + 16 + l] = scale * _IQ4NL_F32[i32(v >> i32(4))]


def _q4_0_loop(blk, o, dst, e, scale):
    """_q4_0_32 without SSSE3 or for non-contiguous arrays."""
    for l in range(16):
        v = i32(blk[o + l])
        dst[e + l] = scale * _Q4_0_F32[i32(v & i32(15))]
        dst[e + 16 + l] = scale * _Q4_0_F32[i32(v >> i32(4))]


_iq4_32 = _nibble_lut(_IQ4NL_F32, _iq4_loop, "iq4_32")
_q4_0_32 = _nibble_lut(_Q4_0_F32, _q4_0_loop, "q4_0_32")


@njit(cache=True, inline="always")
def dq_q4_0(blk, dst, lut):
    """Q4_0 (18 bytes / 32): f16 d; qs[16], element j the low nibble of qs[j], j + 16 the
    high one. x = d * (nibble - 8)."""
    _q4_0_32(blk, 2, dst, 0, half(blk, 0, lut))


@njit(cache=True, inline="always")
def dq_q5_1(blk, dst, lut):
    """Q5_1 (24 bytes / 32): f16 d, f16 m, uint32 qh (bit j = fifth bit of element j), qs[16]
    (nibbles as Q4_0). x = d * q + m, q in 0..31."""
    d, m = half(blk, 0, lut), half(blk, 2, lut)
    qh = q5_high_bits(blk, 4)
    if m != m:       # NaN m: gguf keeps d * q where that is NaN too (see the module doc)
        for j in range(16):
            lo, hi = q5_pair(blk[8 + j], qh, j)
            t0, t1 = d * np.float32(i32(lo + i32(16))), d * np.float32(i32(hi + i32(16)))
            dst[j] = t0 if t0 != t0 else t0 + m
            dst[j + 16] = t1 if t1 != t1 else t1 + m
        return
    for j in range(16):
        lo, hi = q5_pair(blk[8 + j], qh, j)      # q - 16 for Q5_0; +16 folds away
        dst[j] = d * np.float32(i32(lo + i32(16))) + m
        dst[j + 16] = d * np.float32(i32(hi + i32(16))) + m


@njit(cache=True, inline="always")
def dq_q2_k(blk, dst, lut):
    """Q2_K (84 bytes / 256): scales[16] (per 16-element sub-block: low nibble scale, high
    nibble min), qs[64], f16 d at 80, f16 dmin at 82. Element 128*h + 32*s + l is the 2-bit
    (qs[32*h + l] >> 2*s) & 3 of sub-block 8*h + 2*s + l//16. x = (d * sc) * q - dmin * m."""
    d, dmin = half(blk, 80, lut), half(blk, 82, lut)
    for h in range(2):
        for g in range(2):               # first / second 16 bytes of this half's 32 qs bytes
            sc = 8 * h + g
            s0, s1, s2, s3 = i32(blk[sc]), i32(blk[sc + 2]), i32(blk[sc + 4]), i32(blk[sc + 6])
            a0, b0 = d * np.float32(i32(s0 & i32(15))), dmin * np.float32(i32(s0 >> i32(4)))
            a1, b1 = d * np.float32(i32(s1 & i32(15))), dmin * np.float32(i32(s1 >> i32(4)))
            a2, b2 = d * np.float32(i32(s2 & i32(15))), dmin * np.float32(i32(s2 >> i32(4)))
            a3, b3 = d * np.float32(i32(s3 & i32(15))), dmin * np.float32(i32(s3 >> i32(4)))
            q, e = 16 + 32 * h + 16 * g, 128 * h + 16 * g
            for l in range(16):
                v = i32(blk[q + l])
                dst[e + l] = a0 * np.float32(i32(v & i32(3))) - b0
                dst[e + 32 + l] = a1 * np.float32(i32(i32(v >> i32(2)) & i32(3))) - b1
                dst[e + 64 + l] = a2 * np.float32(i32(i32(v >> i32(4)) & i32(3))) - b2
                dst[e + 96 + l] = a3 * np.float32(i32(v >> i32(6))) - b3


@njit(cache=True, inline="always")
def _q3k_scale(blk, i):
    """Signed 6-bit scale i (0..15) of a Q3_K block: low 4 bits nibble i // 8 of scales[i % 8],
    high 2 bits bits 2*(i // 4) of scales[8 + i % 4]; minus 32."""
    lo = i32(i32(i32(blk[96 + (i & 7)]) >> i32(4 * (i >> 3))) & i32(15))
    hi = i32(i32(i32(blk[104 + (i & 3)]) >> i32(2 * (i >> 2))) & i32(3))
    return i32(i32(lo | i32(hi << i32(4))) - i32(32))


@njit(cache=True, inline="always")
def _q3k_value(v, hm, shift, bit):
    """Signed 3-bit Q3_K value: (v >> shift) & 3, minus 4 unless bit `bit` of hm is set."""
    lo = i32(i32(v >> i32(shift)) & i32(3))
    m = i32(i32(i32(hm >> i32(bit)) & i32(1)) ^ i32(1))
    return np.float32(i32(lo - i32(m << i32(2))))


@njit(cache=True, inline="always")
def dq_q3_k(blk, dst, lut):
    """Q3_K (110 bytes / 256): hmask[32], qs[64], scales[12] (16 packed 6-bit scales), f16 d
    at 108. Element 128*h + 32*s + l of sub-block 8*h + 2*s + l//16: (qs[32*h + l] >> 2*s) & 3,
    minus 4 unless bit 4*h + s of hmask[l] is set. x = (d * sc) * q."""
    d = half(blk, 108, lut)
    for g in range(2):                   # l in 16*g .. 16*g + 15: all shifts constant
        a0, a1 = d * np.float32(_q3k_scale(blk, g)), d * np.float32(_q3k_scale(blk, g + 2))
        a2, a3 = d * np.float32(_q3k_scale(blk, g + 4)), d * np.float32(_q3k_scale(blk, g + 6))
        c0, c1 = d * np.float32(_q3k_scale(blk, g + 8)), d * np.float32(_q3k_scale(blk, g + 10))
        c2, c3 = d * np.float32(_q3k_scale(blk, g + 12)), d * np.float32(_q3k_scale(blk, g + 14))
        e = 16 * g
        for l in range(16):
            hm = i32(blk[e + l])
            v, w = i32(blk[32 + e + l]), i32(blk[64 + e + l])
            dst[e + l] = a0 * _q3k_value(v, hm, 0, 0)
            dst[e + 32 + l] = a1 * _q3k_value(v, hm, 2, 1)
            dst[e + 64 + l] = a2 * _q3k_value(v, hm, 4, 2)
            dst[e + 96 + l] = a3 * _q3k_value(v, hm, 6, 3)
            dst[e + 128 + l] = c0 * _q3k_value(w, hm, 0, 4)
            dst[e + 160 + l] = c1 * _q3k_value(w, hm, 2, 5)
            dst[e + 192 + l] = c2 * _q3k_value(w, hm, 4, 6)
            dst[e + 224 + l] = c3 * _q3k_value(w, hm, 6, 7)


@njit(cache=True, inline="always")
def _q5k_value(v, h, up):
    """Q5_K value: the nibble v | 16 * (the bit of h that `up` shifts to bit 4); up in -3..4."""
    hb = i32(h << i32(up)) if up >= 0 else i32(h >> i32(-up))
    return np.float32(i32(v | i32(hb & i32(16))))


@njit(cache=True, inline="always")
def dq_q5_k(blk, dst, lut):
    """Q5_K (176 bytes / 256): f16 d, f16 dmin, scales[12] (8 6-bit scales and mins, as Q4_K),
    qh[32], qs[128]. Element 64*j + 32*k + l (sub-block 2*j + k): nibble k of qs[32*j + l]
    plus 16 * bit (2*j + k) of qh[l]. x = (d * sc) * q - dmin * m."""
    d, dmin = half(blk, 0, lut), half(blk, 2, lut)
    s = blk[4:16]
    sc0, m0 = q4k_scale_min(s, 0)
    sc1, m1 = q4k_scale_min(s, 1)
    sc2, m2 = q4k_scale_min(s, 2)
    sc3, m3 = q4k_scale_min(s, 3)
    sc4, m4 = q4k_scale_min(s, 4)
    sc5, m5 = q4k_scale_min(s, 5)
    sc6, m6 = q4k_scale_min(s, 6)
    sc7, m7 = q4k_scale_min(s, 7)
    a0, b0 = d * np.float32(sc0), dmin * np.float32(m0)
    a1, b1 = d * np.float32(sc1), dmin * np.float32(m1)
    a2, b2 = d * np.float32(sc2), dmin * np.float32(m2)
    a3, b3 = d * np.float32(sc3), dmin * np.float32(m3)
    a4, b4 = d * np.float32(sc4), dmin * np.float32(m4)
    a5, b5 = d * np.float32(sc5), dmin * np.float32(m5)
    a6, b6 = d * np.float32(sc6), dmin * np.float32(m6)
    a7, b7 = d * np.float32(sc7), dmin * np.float32(m7)
    for l in range(32):                  # one qh byte per l: all eight shifts constant
        h = i32(blk[16 + l])
        v0, v1, v2, v3 = i32(blk[48 + l]), i32(blk[80 + l]), i32(blk[112 + l]), i32(blk[144 + l])
        dst[l] = a0 * _q5k_value(i32(v0 & i32(15)), h, 4) - b0
        dst[32 + l] = a1 * _q5k_value(i32(v0 >> i32(4)), h, 3) - b1
        dst[64 + l] = a2 * _q5k_value(i32(v1 & i32(15)), h, 2) - b2
        dst[96 + l] = a3 * _q5k_value(i32(v1 >> i32(4)), h, 1) - b3
        dst[128 + l] = a4 * _q5k_value(i32(v2 & i32(15)), h, 0) - b4
        dst[160 + l] = a5 * _q5k_value(i32(v2 >> i32(4)), h, -1) - b5
        dst[192 + l] = a6 * _q5k_value(i32(v3 & i32(15)), h, -2) - b6
        dst[224 + l] = a7 * _q5k_value(i32(v3 >> i32(4)), h, -3) - b7


@njit(cache=True, inline="always")
def dq_iq4_nl(blk, dst, lut):
    """IQ4_NL (18 bytes / 32): f16 d; qs[16] nibbles as Q4_0, each an index into
    IQ4NL_VALUES. x = d * IQ4NL_VALUES[nibble]."""
    _iq4_32(blk, 2, dst, 0, half(blk, 0, lut))


@njit(cache=True, inline="always")
def dq_iq4_xs(blk, dst, lut):
    """IQ4_XS (136 bytes / 256): f16 d, uint16 scales_h (2 high bits per 32-element sub-block),
    scales_l[4] (4 low bits each, low nibble first), qs[128]. Sub-block ib: scale = (low |
    high << 4) - 32; its elements 16*k + l are IQ4NL_VALUES[nibble k of qs[16*ib + l]].
    x = (d * scale) * value."""
    d = half(blk, 0, lut)
    sh = i32(i32(blk[2]) | i32(i32(blk[3]) << i32(8)))
    for ib in range(8):
        lo = i32(i32(i32(blk[4 + (ib >> 1)]) >> i32(4 * (ib & 1))) & i32(15))
        hi = i32(i32(sh >> i32(2 * ib)) & i32(3))
        _iq4_32(blk, 8 + 16 * ib, dst, 32 * ib, d * np.float32(i32(i32(lo | i32(hi << i32(4))) - i32(32))))


@njit(cache=True, inline="always")
def bf16_span(row, e0, e1, dst):
    """BF16 (2 bytes / element): elements [e0, e1) of a row of raw bytes into dst[0:e1-e0].
    The float32 bit pattern is the uint16 shifted left by 16, written as bits, so NaN payloads
    are kept, as by gguf's (int16 -> int32) << 16 view."""
    src = row[2 * e0:2 * e1].view(np.uint16)
    out = dst[:e1 - e0].view(np.int32)
    for i in range(e1 - e0):
        out[i] = i32(i32(src[i]) << i32(16))
