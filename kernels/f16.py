"""float16 -> float32 for Numba kernels, via a table over all 65536 bit patterns.

Numba's float16 support is limited, so kernels read the two little-endian bytes
of an f16 field and look the value up in `F16_TO_F32` (256 KiB, built once,
bit-identical to numpy's float16 -> float32 conversion, NaN payloads included).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic

F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
F16_TO_F32.flags.writeable = False


@njit(cache=True, inline="always")
def half(row, o, lut):
    """The f16 stored at bytes row[o], row[o+1] (little-endian), as float32."""
    return lut[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@intrinsic
def round_f16(typingctx, x):
    """float32 x rounded to the nearest float16 (ties to even) and back: what storing it in an
    f16 buffer keeps (vcvtps2ph / vcvtph2ps)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.float32), codegen
