"""Rotary position embeddings, NEOX (rotate halves) and NORM (adjacent pairs) styles."""
import numpy as np
from numba import njit, prange


def rope_inv_freq(n_rot: int, base: float) -> np.ndarray:
    """theta_i = base^(-2i/n_rot) for i in [0, n_rot/2), float64."""
    return base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)


@njit(cache=True, inline="always")
def _rope_row(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, out, t):
    half = n_rot // 2
    p = np.float64(positions[t])
    for i in range(half):   # each angle's cos/sin once, for every head
        ang = p * inv_freq[i]
        c = np.float32(np.cos(ang))
        s = np.float32(np.sin(ang))
        for h in range(n_heads):
            if neox:
                a = h * head_dim + i
                b = a + half
            else:
                a = h * head_dim + 2 * i
                b = a + 1
            x0 = x[t, a]
            x1 = x[t, b]
            out[t, a] = x0 * c - x1 * s
            out[t, b] = x0 * s + x1 * c
    for h in range(n_heads):
        for i in range(n_rot, head_dim):
            out[t, h * head_dim + i] = x[t, h * head_dim + i]


@njit(cache=True, parallel=True)
def rope(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, out):
    """Rotate the first n_rot dims of each head of x [n, n_heads*head_dim] into out.

    NEOX pairs dim i with i + n_rot/2; NORM pairs dim 2i with 2i+1. Dims past
    n_rot pass through. out may alias x.
    """
    for t in prange(x.shape[0]):
        _rope_row(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, out, t)


@njit(cache=True)
def rope_serial(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, out):
    """rope without a parallel launch (decode: one row, where a launch costs more than the work)."""
    for t in range(x.shape[0]):
        _rope_row(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, out, t)
