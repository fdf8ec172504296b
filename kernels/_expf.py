"""A float32 exp that LLVM vectorizes (Numba's np.exp is a scalar libm call per element).

Cody-Waite range reduction x = n*ln2 + r with |r| <= ln2/2, Cephes' degree-6 polynomial for
exp(r) and 2**n built from its exponent bits: within 1 ulp of exp on [-87.3, 88.0]
(tests/test_elementwise.py checks it against float64 exp). Arguments are clamped to that
range, so the result is never inf, 0 or a denormal; callers (softmax, SiLU) need neither.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LO, _HI = np.float32(-87.3), np.float32(88.0)


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, inline="always")
def expf(x):
    """exp(x) for a float32 x, vectorizable (see the module doc for accuracy)."""
    x = min(max(x, _LO), _HI)
    n = np.float32(np.floor(x * _LOG2E + np.float32(0.5)))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * _f32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
