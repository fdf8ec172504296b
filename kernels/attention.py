"""Causal grouped-query attention over the KV cache."""
import numpy as np
from numba import njit, prange


@njit(cache=True)
def store_kv(k, v, k_cache, v_cache, pos0, n_kv_heads, head_dim):
    """Copy k, v [n, n_kv_heads*head_dim] into cache [n_kv_heads, ctx, head_dim] at pos0.."""
    n = k.shape[0]
    for t in range(n):
        for h in range(n_kv_heads):
            for i in range(head_dim):
                k_cache[h, pos0 + t, i] = k[t, h * head_dim + i]
                v_cache[h, pos0 + t, i] = v[t, h * head_dim + i]


@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, head_dim, scale,
              scores, probs, out):
    """Softmax(q K^T * scale) V for queries at positions pos0..pos0+n-1.

    q: [n, n_heads*head_dim]; caches [n_kv_heads, ctx, head_dim] already holding
    positions 0..pos0+n-1. scores/probs: [n_heads, n, pos0+n], masked (future)
    entries written as 0. out: [n, n_heads*head_dim].
    """
    n = q.shape[0]
    n_keys = pos0 + n
    group = n_heads // n_kv_heads
    for job in prange(n_heads * n):
        h = job // n
        t = job % n
        kvh = h // group
        qo = h * head_dim
        last = pos0 + t  # causal: keys 0..last
        mx = -np.inf
        for j in range(last + 1):
            acc = np.float32(0.0)
            for i in range(head_dim):
                acc += q[t, qo + i] * k_cache[kvh, j, i]
            sc = acc * np.float32(scale)
            scores[h, t, j] = sc
            if sc > mx:
                mx = sc
        total = np.float32(0.0)
        for j in range(last + 1):
            e = np.float32(np.exp(scores[h, t, j] - mx))
            probs[h, t, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(last + 1, n_keys):
            scores[h, t, j] = 0.0
            probs[h, t, j] = 0.0
        for i in range(head_dim):
            out[t, qo + i] = 0.0
        for j in range(last + 1):
            p = probs[h, t, j] * inv
            probs[h, t, j] = p
            for i in range(head_dim):
                out[t, qo + i] += p * v_cache[kvh, j, i]
