"""How each K-quant type's blocks become the int8 panels of the prompt GEMM (kernels/_mm_panel.py).

A prompt's matmul decodes a panel of weight rows once and multiplies it by every token.
The panel holds each weight as an unsigned byte code `u` and, per row and 256-element
block, the integers and floats that turn a code's dot product into the block's value:

    W[r, e] = d[r] * sc[r, e // L] * u[r, e] - dm[r] * coef[r, e // 16]

with L = 256 / nsub the scale sub-block (32 for Q4_K, 16 for Q6_K). Against Q8_K
activations (int8 x, float scale xd, int16 sums of every 16 values) a block's dot
product is then xd * (d * sum_s sc_s * dot(u_s, x_s) - dm * sum_j coef_j * sum_j(x)),
with both sums exact integers, as in kernels/_simd.py's block dot products.

A type's `PanelCodes` row gives, as LLVM IR over one block's bytes: its 256 codes in four
chunks of 64 (elements 64c .. 64c + 63), its nsub scales as i32, its 16 coefficients as
i16, and d and dm as floats. Everything else (the transposition into lanes, the
multiply) is shared. Registered in kernels/quants.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from kernels._simd import (_I32, _IQ4NL_BIASED, _V16I8, _V16I16, _V16I32, _V32I8, _bit_to, _f16_at, _gf_bits,
                           _iq4xs_scales, _load, _lut16, _nibbles32, _q3k_scales, _q4k_scales_mins_vec, _scalar_f16,
                           _shuffle, _splat)


@dataclass(frozen=True)
class PanelCodes:
    """One type's panel decoder (see the module doc)."""
    nsub: int              # scale sub-blocks per 256-element block
    codes: object          # (builder, blk, chunk) -> <64 x i8>, the codes of elements 64*chunk ..
    scales: object         # (builder, blk) -> (sc <nsub x i32>, coef <16 x i16>, d float, dm float)
    offset_in_d: bool = False   # dm is d: the coefficients are an integer offset of the codes (u - c)


def _concat(builder, low32, high32):
    """<64 x i8>: two <32 x i8> (uniform byte shifts stay 256-bit ops; x86 has no per-byte
    variable shift to build a 512-bit one from)."""
    return builder.shuffle_vector(low32, high32, ir.Constant(ir.VectorType(_I32, 64), [ir.Constant(_I32, i) for i in range(64)]))


def _q4_k_codes(builder, blk, chunk: int):
    # qs[32c .. 32c+31]: low nibbles are elements 64c + 0..31, high nibbles 64c + 32..63
    q = _load(builder, blk, 16 + 32 * chunk, _V32I8)
    low4 = _splat(_V32I8, 15)
    return _concat(builder, builder.and_(q, low4), builder.and_(builder.lshr(q, _splat(_V32I8, 4)), low4))


def _q4_k_scales(builder, blk):
    scales, mins = _q4k_scales_mins_vec(builder, blk)
    dm = _f16_at(builder, blk, 0, 2)
    d, dmin = (builder.extract_element(dm, ir.Constant(_I32, i)) for i in (0, 1))
    coef = _shuffle(builder, mins, [i // 2 for i in range(16)])      # min_s for both 16-sums of s
    return builder.zext(scales, ir.VectorType(_I32, 8)), coef, d, dmin


def _q6_k_codes(builder, blk, chunk: int):
    # elements 128h + 64k + 32m + i: nibble k of ql[64h + 32m + i] | bits 4k + 2m of qh[32h + i], << 4
    h, k = divmod(chunk, 2)
    qh = _load(builder, blk, 128 + 32 * h, _V32I8)
    halves = []
    for m in range(2):
        ql = _load(builder, blk, 64 * h + 32 * m, _V32I8)
        low = builder.and_(builder.lshr(ql, _splat(_V32I8, 4)) if k else ql, _splat(_V32I8, 15))
        shift = 4 * k + 2 * m
        high = builder.and_(builder.lshr(qh, _splat(_V32I8, shift)) if shift else qh, _splat(_V32I8, 3))
        halves.append(builder.or_(low, builder.shl(high, _splat(_V32I8, 4))))
    return _concat(builder, *halves)


def _q6_k_scales(builder, blk):
    # W = d * sc_j * (u - 32): dm = d and coef_j = 32 * sc_j (|32 * sc| <= 4096 fits i16)
    sc8 = _load(builder, blk, 192, _V16I8)
    d = builder.extract_element(_f16_at(builder, blk, 208, 1), ir.Constant(_I32, 0))
    coef = builder.shl(builder.sext(sc8, _V16I16), _splat(_V16I16, 5))
    return builder.sext(sc8, _V16I32), coef, d, d


def _q5_k_codes(builder, blk, chunk: int):
    # as Q4_K (qs at 48), plus bit 2c (low nibbles) or 2c + 1 (high nibbles) of qh[i] as bit 4
    q = _load(builder, blk, 48 + 32 * chunk, _V32I8)
    qh = _load(builder, blk, 16, _V32I8)
    low4 = _splat(_V32I8, 15)
    return _concat(builder, builder.or_(builder.and_(q, low4), _bit_to(builder, qh, 2 * chunk, 4)),
                   builder.or_(builder.lshr(q, _splat(_V32I8, 4)), _bit_to(builder, qh, 2 * chunk + 1, 4)))


def _two_bits(builder, q, s: int):
    """Bits 2s, 2s + 1 of every byte of q, as 0..3."""
    return _gf_bits(builder, q, [(2 * s, 0), (2 * s + 1, 1)]) if s else builder.and_(q, _splat(_V32I8, 3))


def _q3_k_codes(builder, blk, chunk: int):
    # elements 128h + 32s + i (s = 2(c % 2) + m): u = bits 2s, 2s+1 of qs[32h + i] | bit 4h + s of hmask[i] << 2
    h = chunk // 2
    ql = _load(builder, blk, 32 + 32 * h, _V32I8)
    hm = _load(builder, blk, 0, _V32I8)
    halves = [builder.or_(_two_bits(builder, ql, s), _bit_to(builder, hm, 4 * h + s, 2))
              for s in (2 * (chunk % 2), 2 * (chunk % 2) + 1)]
    return _concat(builder, *halves)


def _q3_k_scales(builder, blk):
    # W = d * sc_j * (u - 4), u = q + 4 in 0..7: dm = d and coef_j = 4 * sc_j
    sc16 = _q3k_scales(builder, blk)
    d = _scalar_f16(builder, blk, 108)
    return builder.sext(sc16, _V16I32), builder.shl(sc16, _splat(_V16I16, 2)), d, d


def _q2_k_codes(builder, blk, chunk: int):
    # elements 128h + 32s + i: bits 2s, 2s + 1 of qs[32h + i]
    q = _load(builder, blk, 16 + 32 * (chunk // 2), _V32I8)
    return _concat(builder, *(_two_bits(builder, q, s) for s in (2 * (chunk % 2), 2 * (chunk % 2) + 1)))


def _q2_k_scales(builder, blk):
    # W = d * sc_j * q - dmin * m_j: scale in the low nibble of byte j, min in the high one
    sb = _load(builder, blk, 0, _V16I8)
    dm = _f16_at(builder, blk, 80, 2)
    d, dmin = (builder.extract_element(dm, ir.Constant(_I32, i)) for i in (0, 1))
    return (builder.zext(builder.and_(sb, _splat(_V16I8, 15)), _V16I32),
            builder.zext(builder.lshr(sb, _splat(_V16I8, 4)), _V16I16), d, dmin)


def _iq4_xs_codes(builder, blk, chunk: int):
    # sub-blocks 2c and 2c + 1 (32 nibbles each at 8 + 16 ib): u = kv[q] + 128, an unsigned byte
    return _concat(builder, *(_lut16(builder, _IQ4NL_BIASED, _nibbles32(builder, blk, 8 + 16 * ib))
                              for ib in (2 * chunk, 2 * chunk + 1)))


def _iq4_xs_scales(builder, blk):
    # W = d * ls_s * (u - 128): dm = d and coef_j = 128 * ls_(j // 2) (|128 * ls| <= 4096 fits i16)
    ls = _iq4xs_scales(builder, blk)
    d = _scalar_f16(builder, blk, 0)
    return builder.sext(ls, ir.VectorType(_I32, 8)), builder.shl(_shuffle(builder, ls, [i // 2 for i in range(16)]),
                                                                _splat(_V16I16, 7)), d, d


Q4_K_PANEL = PanelCodes(8, _q4_k_codes, _q4_k_scales)
Q5_K_PANEL = PanelCodes(8, _q5_k_codes, _q4_k_scales)     # Q5_K's scales, mins, d and dmin are Q4_K's
Q6_K_PANEL = PanelCodes(16, _q6_k_codes, _q6_k_scales, offset_in_d=True)
Q3_K_PANEL = PanelCodes(16, _q3_k_codes, _q3_k_scales, offset_in_d=True)
Q2_K_PANEL = PanelCodes(16, _q2_k_codes, _q2_k_scales)
IQ4_XS_PANEL = PanelCodes(8, _iq4_xs_codes, _iq4_xs_scales, offset_in_d=True)
