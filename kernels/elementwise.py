"""Bias add, residual add, SiLU/SwiGLU and GELU/GeGLU: row-parallel kernels for prefill, serial
ones for decode.

Each pair shares one inlined row function; the serial variant exists because for a
single decode row a parallel launch costs more than the work (and on a busy machine
waits for a descheduled worker thread).
"""
import numpy as np
from numba import njit, prange

from kernels._expf import expf
from kernels.f16 import round_f16

GELU_COEF_A = np.float32(0.044715)
SQRT_2_OVER_PI = np.float32(0.7978845608028654)


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


@njit(cache=True, inline="always")
def gelu_tanh(x):
    """GELU in its tanh form, in float32: 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))."""
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(SQRT_2_OVER_PI * x * (np.float32(1.0) + GELU_COEF_A * x * x)))


@njit(cache=True, inline="always")
def _gelu_geglu_row(gate, up, gelu_out, geglu_out, t, f16):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        if not f16:
            y = gelu_tanh(g)
        elif g <= np.float32(-10.0):     # ggml's table-driven GELU (GGML_GELU_FP16): its limits, then
            y = np.float32(0.0)          # gelu of x rounded to f16, the result stored as f16
        elif g >= np.float32(10.0):
            y = g
        else:
            y = round_f16(gelu_tanh(round_f16(g)))
        gelu_out[t, i] = y
        geglu_out[t, i] = y * up[t, i]


@njit(cache=True, parallel=True)
def gelu_and_geglu(gate, up, gelu_out, geglu_out, f16):
    """gelu_out = gelu(gate) (tanh form); geglu_out = gelu_out * up. With f16, GELU is computed as
    llama.cpp's CPU backend does (ggml_vec_geglu_f32 with its f16 table): 0 below -10, x above
    10, else gelu(f16(x)) rounded to f16."""
    for t in prange(gate.shape[0]):
        _gelu_geglu_row(gate, up, gelu_out, geglu_out, t, f16)


@njit(cache=True)
def gelu_and_geglu_serial(gate, up, gelu_out, geglu_out, f16):
    """gelu_and_geglu without a parallel launch."""
    for t in range(gate.shape[0]):
        _gelu_geglu_row(gate, up, gelu_out, geglu_out, t, f16)
