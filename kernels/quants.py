"""The registry of the GGML types we compute with: one row per type, like ggml's type traits.

A row ties together everything about a weight type: its block shape (from the GGUF
format, kernels/ggml.py), its exact block decoder, its fused one-token matvec if it has
one, and the int8 activation layout and block dot product of its integer path (the
path llama.cpp takes, so our rounding is llama.cpp's). Every dispatch table is derived
from `TYPES`: the span decoder behind the batched matmul and the embedding lookup
(kernels/_span.py), the integer row dot product (kernels/_mm_int8.py), the matvec and
int8 choices of kernels/matmul.py, and the types engine/model.py accepts. Adding a
type is its kernels in one module and one row here; tests/test_quant_kernels.py checks
the rows against the format and gguf's reference dequantizers.
"""
from __future__ import annotations

from dataclasses import dataclass

from kernels import _dequant, _dequant_ext, _matvec, _panels, _simd
from kernels._q8 import quantize_q8_0, quantize_q8k, round_rows_bf16, round_rows_f16
from kernels.ggml import (BF16, F16, F32, FORMAT, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0,  # noqa: F401
                          Q5_1, Q5_K, Q6_K, Q8_0, Q8_K, block_shape, type_name)


@dataclass(frozen=True)
class Int8Layout:
    """How activation rows are quantized to int8 for one family of weight types (ggml's
    vec_dot_type): a float32 scale per `block` values and an int16 sum per `sum_block`."""
    name: str
    block: int
    sum_block: int
    quantize: object            # njit (x [n, cols], xq, xd, bs) -> None, kernels/_q8.py
    # Prompts (two or more rows) run the integer kernel only where it is the faster one: against
    # 32-element blocks it pays a float scale per 32 products per token and loses to the batched
    # float kernel (0.5B gate, 128 tokens: 56 vs 83 GMAC/s), which then gets x rounded to the same
    # int8 grid instead: the same values, so the same result up to summation order.
    integer_prompts: bool


Q8K = Int8Layout("q8k", 256, 16, quantize_q8k, integer_prompts=True)        # ggml's Q8_K
Q8_0_ACT = Int8Layout("q8_0", 32, 32, quantize_q8_0, integer_prompts=False)  # ggml's Q8_0 (and Q8_1)
LAYOUTS = {layout.name: layout for layout in (Q8K, Q8_0_ACT)}


@dataclass(frozen=True)
class QuantType:
    """One weight type we compute with. Block shape comes from the format table."""
    id: int
    # njit dq(blk uint8 [block_bytes], dst float32 [block_elems], f16 lut), exact (bit-identical to
    # gguf.quants.dequantize); None for the float types, which kernels/_span.py reads elementwise
    dequant: object = None
    # njit mv(w, x, out, lut): a fused one-token matvec; None: the generic float matvec over dequant
    matvec: object = None
    int8: Int8Layout | None = None      # activation layout of the integer path, if there is one
    int8_block: object = None           # its IR block dot product (kernels/_simd.py)
    int8_pair: object = None            # optional: two blocks at once, one token (kernels/_simd.py)
    # njit (x, out): x rounded to the float grid llama.cpp multiplies these weights by (its
    # vec_dot_type), for weights with no integer path; None: x as it is
    float_activations: object = None
    # its prompt-GEMM panel decoder (kernels/_panels.py), if prompts take kernels/_mm_panel.py
    panel: object = None

    @property
    def name(self) -> str:
        return type_name(self.id)

    @property
    def block_elems(self) -> int:
        return block_shape(self.id)[0]

    @property
    def block_bytes(self) -> int:
        return block_shape(self.id)[1]


TYPES = {t.id: t for t in (
    QuantType(F32),
    QuantType(F16, matvec=_matvec.mv_f16, float_activations=round_rows_f16),
    QuantType(BF16, matvec=_matvec.mv_bf16, float_activations=round_rows_bf16),
    QuantType(Q4_0, _dequant_ext.dq_q4_0, None, Q8_0_ACT, _simd.q4_0_block, int8_pair=_simd.q4_0_pair),
    QuantType(Q5_1, _dequant_ext.dq_q5_1, None, Q8_0_ACT, _simd.q5_1_block),
    QuantType(Q2_K, _dequant_ext.dq_q2_k, None, Q8K, _simd.q2_k_block, panel=_panels.Q2_K_PANEL),
    QuantType(Q3_K, _dequant_ext.dq_q3_k, None, Q8K, _simd.q3_k_block, panel=_panels.Q3_K_PANEL),
    QuantType(Q5_K, _dequant_ext.dq_q5_k, None, Q8K, _simd.q5_k_block, panel=_panels.Q5_K_PANEL),
    QuantType(IQ4_NL, _dequant_ext.dq_iq4_nl, None, Q8_0_ACT, _simd.iq4_nl_block, int8_pair=_simd.iq4_nl_pair),
    QuantType(IQ4_XS, _dequant_ext.dq_iq4_xs, None, Q8K, _simd.iq4_xs_block, panel=_panels.IQ4_XS_PANEL),
    QuantType(Q4_1, _dequant.dq_q4_1, _matvec.mv_q4_1, Q8_0_ACT, _simd.q4_1_block),
    QuantType(Q5_0, _dequant.dq_q5_0, _matvec.mv_q5_0, Q8_0_ACT, _simd.q5_0_block),
    QuantType(Q8_0, _dequant.dq_q8_0, _matvec.mv_q8_0, Q8_0_ACT, _simd.q8_0_block),
    QuantType(Q4_K, _dequant.dq_q4_k, _matvec.mv_q4_k, Q8K, _simd.q4_k_block, panel=_panels.Q4_K_PANEL),
    QuantType(Q6_K, _dequant.dq_q6_k, _matvec.mv_q6_k, Q8K, _simd.q6_k_block, panel=_panels.Q6_K_PANEL),
)}
FLOAT_TYPES = tuple(t for t, row in TYPES.items() if row.dequant is None)
SUPPORTED = tuple(TYPES)
# supported type id -> (elements per block, bytes per block)
GGML_TYPES = {t: block_shape(t) for t in TYPES}


def row_bytes(t: int, cols: int) -> int:
    """Bytes of one row of `cols` values of type t."""
    elems, nbytes = block_shape(t)
    return cols // elems * nbytes
