"""The machine's memory read bandwidth: the roofline `bench --roofline` sets decode against.

A decode step streams every weight once from DRAM, so the bound on its speed is the read
bandwidth divided by the bytes it reads. This measures that bandwidth the way a decode
step reads: each thread streams one contiguous part of a buffer far larger than the
last-level cache, summing it in four 16-lane float accumulators (the sum is returned so
the reads cannot be optimised away).
"""
from __future__ import annotations

import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from kernels._simd import reduce_fadd

LANES = 64   # floats per step: four 512-bit accumulators
_V16F32 = ir.VectorType(ir.FloatType(), 16)


@intrinsic
def _sum_steps(typingctx, a, start, steps):
    """sum of a[start : start + LANES*steps] (float32, contiguous) in four 16-lane accumulators,
    as IR: a Numba loop over a lane array is not vectorized (it is scalarised, 63 vaddss)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        first = context.cast(builder, args[1], signature.args[1], types.intp)
        n = context.cast(builder, args[2], signature.args[2], types.intp)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, [0.0] * 16)) for _ in range(4)]
        with cgutils.for_range(builder, n) as loop:
            base = builder.add(first, builder.mul(loop.index, ir.Constant(first.type, LANES)))
            for k, acc in enumerate(accs):
                ptr = builder.gep(data, [builder.add(base, ir.Constant(first.type, 16 * k))])
                vec = builder.load(builder.bitcast(ptr, _V16F32.as_pointer()), align=4)
                builder.store(builder.fadd(builder.load(acc), vec), acc)
        total = builder.fadd(builder.fadd(builder.load(accs[0]), builder.load(accs[1])),
                             builder.fadd(builder.load(accs[2]), builder.load(accs[3])))
        return reduce_fadd(builder, total, flags=("reassoc",))
    return types.float32(a, start, steps), codegen


@njit(cache=True, parallel=True)
def _read_sum(a, parts):
    steps = a.shape[0] // parts // LANES
    sums = np.zeros(parts, np.float64)
    for p in prange(parts):
        sums[p] = _sum_steps(a, p * steps * LANES, steps)
    return sums.sum()


def read_bandwidth(nbytes: int = 1 << 30, repeat: int = 3) -> float:
    """Bytes per second read by `numba.get_num_threads()` threads streaming an nbytes buffer
    (best of `repeat` passes after one that faults the pages in). The buffer is freed on return."""
    a = np.ones(nbytes // 4, np.float32)
    parts = numba.get_num_threads()
    _read_sum(a, parts)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _read_sum(a, parts)
        best = min(best, time.perf_counter() - t)
    read = a.shape[0] // parts // LANES * LANES * parts * 4
    return read / best
