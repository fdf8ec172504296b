"""Bias add, residual add, SiLU and SwiGLU: row-parallel kernels for prefill, serial ones for decode.

Each pair shares one inlined row function; the serial variant exists because for a
single decode row a parallel launch costs more than the work (and on a busy machine
waits for a descheduled worker thread).
"""
import numpy as np
from numba import njit, prange

from kernels._expf import expf


@njit(cache=True, inline="always")
def _add_bias_row(x, b, out, t):
    for i in range(x.shape[1]):
        out[t, i] = x[t, i] + b[i]


@njit(cache=True, inline="always")
def _add_row(a, b, out, t):
    for i in range(a.shape[1]):
        out[t, i] = a[t, i] + b[t, i]


# error_model="numpy": a float division by zero gives inf instead of raising, which lets the
# SiLU loop vectorize (Python's error model puts a branch on every division).
@njit(cache=True, inline="always", error_model="numpy")
def _silu_swiglu_row(gate, up, silu_out, swiglu_out, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        s = g / (np.float32(1.0) + expf(-g))
        silu_out[t, i] = s
        swiglu_out[t, i] = s * up[t, i]


@njit(cache=True, parallel=True)
def add_bias(x, b, out):
    """out[t, i] = x[t, i] + b[i]."""
    for t in prange(x.shape[0]):
        _add_bias_row(x, b, out, t)


@njit(cache=True)
def add_bias_serial(x, b, out):
    """add_bias without a parallel launch."""
    for t in range(x.shape[0]):
        _add_bias_row(x, b, out, t)


@njit(cache=True, parallel=True)
def add(a, b, out):
    """out = a + b, all [n, d]."""
    for t in prange(a.shape[0]):
        _add_row(a, b, out, t)


@njit(cache=True)
def add_serial(a, b, out):
    """add without a parallel launch."""
    for t in range(a.shape[0]):
        _add_row(a, b, out, t)


@njit(cache=True, parallel=True, error_model="numpy")
def silu_and_swiglu(gate, up, silu_out, swiglu_out):
    """silu_out = silu(gate) = gate * sigmoid(gate); swiglu_out = silu_out * up."""
    for t in prange(gate.shape[0]):
        _silu_swiglu_row(gate, up, silu_out, swiglu_out, t)


@njit(cache=True, error_model="numpy")
def silu_and_swiglu_serial(gate, up, silu_out, swiglu_out):
    """silu_and_swiglu without a parallel launch."""
    for t in range(gate.shape[0]):
        _silu_swiglu_row(gate, up, silu_out, swiglu_out, t)
