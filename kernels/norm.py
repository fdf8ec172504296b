"""RMSNorm."""
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, per row t of x [n, d]."""
    n, d = x.shape
    for t in prange(n):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = x[t, i] * scale * w[i]
