"""RMSNorm: a row-parallel kernel for prefill and a serial one for a single decode row."""
import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _rmsnorm_row(x, w, eps, out, t):
    d = x.shape[1]
    ss = np.float32(0.0)
    for i in range(d):
        ss += x[t, i] * x[t, i]
    scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
    for i in range(d):
        out[t, i] = x[t, i] * scale * w[i]


@njit(cache=True, parallel=True)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, per row t of x [n, d]."""
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


@njit(cache=True)
def rmsnorm_serial(x, w, eps, out):
    """rmsnorm without a parallel launch (decode: one row, where a launch costs more than the work)."""
    for t in range(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


@njit(cache=True, inline="always")
def _rmsnorm_head(x, w, eps, n_heads, out, job):
    hd = w.shape[0]
    t, h = job // n_heads, job % n_heads
    ss = np.float32(0.0)
    for i in range(h * hd, (h + 1) * hd):
        ss += x[t, i] * x[t, i]
    scale = np.float32(1.0) / np.sqrt(ss / np.float32(hd) + np.float32(eps))
    for i in range(hd):
        out[t, h * hd + i] = x[t, h * hd + i] * scale * w[i]


@njit(cache=True, parallel=True)
def rmsnorm_heads(x, w, eps, n_heads, out):
    """RMSNorm of every head on its own: x and out [n, n_heads*head_dim] (x may be a column block
    of a wider buffer), w [head_dim] shared by the heads (Q/K norms)."""
    for job in prange(x.shape[0] * n_heads):
        _rmsnorm_head(x, w, eps, n_heads, out, job)


@njit(cache=True)
def rmsnorm_heads_serial(x, w, eps, n_heads, out):
    """rmsnorm_heads without a parallel launch (decode)."""
    for job in range(x.shape[0] * n_heads):
        _rmsnorm_head(x, w, eps, n_heads, out, job)
