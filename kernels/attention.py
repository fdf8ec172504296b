"""Causal grouped-query attention over the KV cache."""
import numpy as np
from numba import njit, prange

from kernels._expf import expf
from kernels.f16 import round_f16


@njit(cache=True)
def store_kv(k, v, k_cache, v_cache, pos0, n_kv_heads, head_dim, f16=False):
    """Copy k, v [n, n_kv_heads*head_dim] into the caches at positions pos0..pos0+n-1.

    k_cache is [n_kv_heads, head_dim, ctx] (keys transposed, so the scores of many
    positions are computed side by side); v_cache is [n_kv_heads, ctx, head_dim].
    With f16, values are rounded to float16 precision as they are stored, which is
    what llama.cpp's default f16 KV cache keeps."""
    n = k.shape[0]
    for t in range(n):
        for h in range(n_kv_heads):
            for i in range(head_dim):
                kv, vv = k[t, h * head_dim + i], v[t, h * head_dim + i]
                if f16:
                    kv, vv = round_f16(kv), round_f16(vv)
                k_cache[h, i, pos0 + t] = kv
                v_cache[h, pos0 + t, i] = vv


@njit(cache=True, inline="always")
def _first_key(keys, window):
    """The first key position a query with `keys` causal keys (0..keys-1) attends to."""
    return max(0, keys - window) if window > 0 else 0


KEY_BLOCK = 256   # keys per block of the score pass: 8 key rows x 256 floats stay in L1 for all query heads
DIMS = 8          # head_dim products added per pass over a score row (one load and store of it per DIMS)


@njit(cache=True, fastmath={"contract"}, inline="always")
def _scores_f32(q, t, k_t, h0, group, head_dim, first, end, scores):
    """scores[h, t, first:end] = q_h . K[:, first:end] for the query heads h0..h0+group-1 of one
    KV head: the keys go in blocks of KEY_BLOCK, and each block's key rows, read once, serve
    every query head of the group (the group's heads would otherwise stream the same keys once
    each: at 4,096 positions the 1.5B's six heads per KV head read 2 MB of keys six times). Each
    score still sums its head_dim products in order, DIMS per pass over the row (the row's
    loads and stores, not the products, bound this loop), as a plain loop would."""
    rows8 = head_dim - head_dim % DIMS
    for kb in range(first, end, KEY_BLOCK):
        ke = min(end, kb + KEY_BLOCK)
        for h in range(h0, h0 + group):
            scores[h, t, kb:ke] = 0.0
        for i in range(0, rows8, DIMS):
            k0, k1, k2, k3 = k_t[i, kb:ke], k_t[i + 1, kb:ke], k_t[i + 2, kb:ke], k_t[i + 3, kb:ke]
            k4, k5, k6, k7 = k_t[i + 4, kb:ke], k_t[i + 5, kb:ke], k_t[i + 6, kb:ke], k_t[i + 7, kb:ke]
            for h in range(h0, h0 + group):
                qh = q[t, h * head_dim:(h + 1) * head_dim]
                q0, q1, q2, q3, q4, q5, q6, q7 = qh[i], qh[i + 1], qh[i + 2], qh[i + 3], qh[i + 4], qh[i + 5], qh[i + 6], qh[i + 7]
                s = scores[h, t, kb:ke]
                for j in range(ke - kb):
                    acc = s[j]
                    acc += q0 * k0[j]
                    acc += q1 * k1[j]
                    acc += q2 * k2[j]
                    acc += q3 * k3[j]
                    acc += q4 * k4[j]
                    acc += q5 * k5[j]
                    acc += q6 * k6[j]
                    acc += q7 * k7[j]
                    s[j] = acc
        for i in range(rows8, head_dim):
            kr = k_t[i, kb:ke]
            for h in range(h0, h0 + group):
                qi = q[t, h * head_dim + i]
                s = scores[h, t, kb:ke]
                for j in range(ke - kb):
                    s[j] += qi * kr[j]


# Every loop below vectorizes across positions (q.k) or across head_dim (p.v) while each
# sum still runs in sequential order, so "contract" (fused multiply-add) is the only
# fast-math licence needed and results match a plain float32 loop to rounding.
@njit(cache=True, parallel=True, fastmath={"contract"})
def attention(q, k_cache, v_cache, pos0, n_heads, n_kv_heads, head_dim, scale,
              scores, probs, out, f64_scores=False, window=0):
    """Softmax(q K^T * scale) V for queries at positions pos0..pos0+n-1.

    q: [n, n_heads*head_dim]; caches as written by store_kv, already holding
    positions 0..pos0+n-1. scores/probs: [n_heads, n, pos0+n], masked (future, or
    outside the window) entries written as 0. out: [n, n_heads*head_dim].

    window > 0: the query at position p sees keys p-window+1..p only (a sliding-window
    layer; llama.cpp's LLAMA_SWA_TYPE_STANDARD masks keys with p - key >= window).

    f64_scores: sum each q.k in float64, then round the scaled score to float32. Scores can
    be large and close together (the Qwen 1.5B's layer 0: ~11,800 +- 50 across a row), where
    a float32 sum's rounding (~0.005) moves the probabilities by ~1e-3; a float64 sum leaves
    only the score's own float32 rounding (~5e-4). Slower (one key at a time): exact mode.

    One work item is one (KV head, query) pair and serves all the query heads that
    share that KV head, so a decode step splits evenly over the KV heads, and reads that KV
    head's keys and values once for all of them (_scores_f32; the p.v pass likewise).
    """
    n = q.shape[0]
    group = n_heads // n_kv_heads
    scale32 = np.float32(scale)
    for job in prange(n_kv_heads * n):
        kvh = job // n
        t = job % n
        first = _first_key(pos0 + t + 1, window)   # causal: keys first..pos0+t
        keys = pos0 + t + 1 - first                 # how many; below, key j is position first + j
        k_t, values = k_cache[kvh], v_cache[kvh][first:]   # slices of rows stay contiguous
        end = first + keys
        h0 = kvh * group
        if not f64_scores:
            _scores_f32(q, t, k_t, h0, group, head_dim, first, end, scores)
        for h in range(h0, h0 + group):
            srow, prow = scores[h, t], probs[h, t]
            srow[:first] = 0.0
            prow[:first] = 0.0
            srow[end:] = 0.0
            prow[end:] = 0.0
            s, pr = srow[first:end], prow[first:end]
            if f64_scores:
                qh = q[t, h * head_dim:(h + 1) * head_dim]
                for j in range(keys):
                    acc64 = 0.0
                    for i in range(head_dim):
                        acc64 += np.float64(qh[i]) * np.float64(k_t[i, first + j])
                    s[j] = np.float32(acc64 * scale)
            else:
                for j in range(keys):
                    s[j] *= scale32
            mx = np.float32(-np.inf)
            for j in range(keys):
                mx = max(mx, s[j])
            for j in range(keys):
                pr[j] = expf(s[j] - mx)
            total = np.float32(0.0)
            for j in range(keys):
                total += pr[j]
            inv = np.float32(1.0) / total
            for j in range(keys):
                pr[j] *= inv
            out[t, h * head_dim:(h + 1) * head_dim] = 0.0
        # p.v: value rows, read once, are added into every head of the group in key order, DIMS
        # keys per pass over an output row (its loads and stores bound this loop)
        keys8 = keys - keys % DIMS
        for j in range(0, keys8, DIMS):
            v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
            v4, v5, v6, v7 = values[j + 4], values[j + 5], values[j + 6], values[j + 7]
            for h in range(h0, h0 + group):
                ph = probs[h, t, first + j:first + j + DIMS]
                p0, p1, p2, p3, p4, p5, p6, p7 = ph[0], ph[1], ph[2], ph[3], ph[4], ph[5], ph[6], ph[7]
                oh = out[t, h * head_dim:(h + 1) * head_dim]
                for i in range(head_dim):
                    acc = oh[i]
                    acc += p0 * v0[i]
                    acc += p1 * v1[i]
                    acc += p2 * v2[i]
                    acc += p3 * v3[i]
                    acc += p4 * v4[i]
                    acc += p5 * v5[i]
                    acc += p6 * v6[i]
                    acc += p7 * v7[i]
                    oh[i] = acc
        for j in range(keys8, keys):
            vr = values[j]
            for h in range(h0, h0 + group):
                p = probs[h, t, first + j]
                oh = out[t, h * head_dim:(h + 1) * head_dim]
                for i in range(head_dim):
                    oh[i] += p * vr[i]


# The two halves of `attention` after its scores, for a forward whose attention stages are
# hooked (engine.forward runs them only then): a hook may change the scores or the
# probabilities, and what follows must be computed from the changed values.
@njit(cache=True, parallel=True, fastmath={"contract"})   # as `attention`: the same roundings
def softmax_causal(scores, pos0, probs, window=0):
    """probs[h, t, :] = softmax of scores[h, t, first:pos0+t+1] (other keys 0), as `attention` does."""
    n_heads, n = scores.shape[0], scores.shape[1]
    for job in prange(n_heads * n):
        h = job // n
        t = job % n
        keys = pos0 + t + 1
        first = _first_key(keys, window)
        mx = np.float32(-np.inf)
        for j in range(first, keys):
            mx = max(mx, scores[h, t, j])
        total = np.float32(0.0)
        for j in range(first, keys):
            e = expf(scores[h, t, j] - mx)
            probs[h, t, j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(first, keys):
            probs[h, t, j] *= inv
        probs[h, t, :first] = 0.0
        probs[h, t, keys:] = 0.0


@njit(cache=True, parallel=True, fastmath={"contract"})
def attend(probs, v_cache, pos0, n_heads, n_kv_heads, head_dim, out, window=0):
    """out[t, head h] = sum_j probs[h, t, j] * V[j] over the keys `attention` sees, as it does."""
    n = probs.shape[1]
    group = n_heads // n_kv_heads
    for job in prange(n_heads * n):
        h = job // n
        t = job % n
        values = v_cache[h // group]
        oh = out[t, h * head_dim:(h + 1) * head_dim]
        oh[:] = 0.0
        for j in range(_first_key(pos0 + t + 1, window), pos0 + t + 1):
            p = probs[h, t, j]
            vr = values[j]
            for i in range(head_dim):
                oh[i] += p * vr[i]
