"""Bias add, residual add, SiLU and SwiGLU: row-parallel elementwise kernels."""
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def add_bias(x, b, out):
    """out[t, i] = x[t, i] + b[i]."""
    n, d = x.shape
    for t in prange(n):
        for i in range(d):
            out[t, i] = x[t, i] + b[i]


@njit(cache=True, parallel=True)
def add(a, b, out):
    """out = a + b, all [n, d]."""
    n, d = a.shape
    for t in prange(n):
        for i in range(d):
            out[t, i] = a[t, i] + b[t, i]


@njit(cache=True, parallel=True)
def silu_and_swiglu(gate, up, silu_out, swiglu_out):
    """silu_out = silu(gate) = gate * sigmoid(gate); swiglu_out = silu_out * up."""
    n, d = gate.shape
    for t in prange(n):
        for i in range(d):
            g = gate[t, i]
            s = g / (np.float32(1.0) + np.exp(-g))
            silu_out[t, i] = s
            swiglu_out[t, i] = s * up[t, i]
