"""The vectorized exp, SiLU/SwiGLU and the attention kernel against float64 numpy."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from kernels._expf import expf
from kernels.attention import attention, store_kv
from kernels.elementwise import silu_and_swiglu, silu_and_swiglu_serial


@njit(cache=True)
def _expf_array(x, out):
    for i in range(x.shape[0]):
        out[i] = expf(x[i])


def _ulps(got, want64):
    return np.abs(got.astype(np.float64) - want64) / np.spacing(want64.astype(np.float32)).astype(np.float64)


def test_expf_within_one_ulp_over_its_range():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(-87.3, 88.0, 1_000_001, dtype=np.float32),
                        rng.standard_normal(200_000).astype(np.float32) * 4,
                        np.float32([0.0, -0.0, 1e-30, -1e-30, np.log(2), -np.log(2)])])
    out = np.empty_like(x)
    _expf_array(x, out)
    assert _ulps(out, np.exp(x.astype(np.float64))).max() <= 1.0


def test_expf_clamps_instead_of_overflowing():
    x = np.float32([-1000.0, -88.0, 89.0, 1000.0])
    out = np.empty_like(x)
    _expf_array(x, out)
    assert np.isfinite(out).all() and (out > 0).all()
    np.testing.assert_allclose(out, np.exp(np.float32([-87.3, -87.3, 88.0, 88.0]).astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("kernel", [silu_and_swiglu, silu_and_swiglu_serial])
def test_silu_and_swiglu_match_float64(kernel):
    rng = np.random.default_rng(2)
    gate = np.concatenate([rng.standard_normal((3, 1000)) * 6, np.full((1, 1000), -200.0)]).astype(np.float32)
    up = rng.standard_normal(gate.shape).astype(np.float32)
    silu, swigl = np.empty_like(gate), np.empty_like(gate)
    kernel(gate, up, silu, swigl)
    g = gate.astype(np.float64)
    want = g / (1.0 + np.exp(-g))
    # one rounding each in exp, 1 + e, the division and the product: a few float32 ulps
    np.testing.assert_allclose(silu, want, rtol=4e-7, atol=1e-30)
    np.testing.assert_allclose(swigl, want * up, rtol=6e-7, atol=1e-30)


def _attention_f64(q, k, v, pos0, n_heads, n_kv_heads, head_dim, scale):
    n, group = q.shape[0], n_heads // n_kv_heads
    out = np.zeros(q.shape)
    probs = np.zeros((n_heads, n, pos0 + n))
    for h in range(n_heads):
        kh = h // group
        qs = q[:, h * head_dim:(h + 1) * head_dim].astype(np.float64)
        ks = k[:, kh * head_dim:(kh + 1) * head_dim].astype(np.float64)
        s = qs @ ks.T * scale
        s[np.arange(pos0 + n)[None, :] > pos0 + np.arange(n)[:, None]] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        probs[h] = p
        out[:, h * head_dim:(h + 1) * head_dim] = p @ v[:, kh * head_dim:(kh + 1) * head_dim]
    return out, probs


@pytest.mark.parametrize("n,pos0,n_heads,n_kv_heads", [(1, 0, 4, 4), (1, 37, 12, 2), (9, 0, 6, 2), (5, 20, 8, 1)])
def test_attention_matches_float64(n, pos0, n_heads, n_kv_heads):
    """Prefill and cached decode, grouped-query layouts; scores up to ~50 in magnitude."""
    head_dim, ctx = 32, 64
    rng = np.random.default_rng(n * 100 + pos0)
    k = rng.standard_normal((pos0 + n, n_kv_heads * head_dim)).astype(np.float32)
    v = rng.standard_normal((pos0 + n, n_kv_heads * head_dim)).astype(np.float32)
    q = (rng.standard_normal((n, n_heads * head_dim)) * 2).astype(np.float32)
    k_cache = np.zeros((n_kv_heads, head_dim, ctx), np.float32)
    v_cache = np.zeros((n_kv_heads, ctx, head_dim), np.float32)
    store_kv(k, v, k_cache, v_cache, 0, n_kv_heads, head_dim)
    scores = np.full((n_heads, n, pos0 + n), np.nan, np.float32)
    probs, out = np.full_like(scores, np.nan), np.full((n, n_heads * head_dim), np.nan, np.float32)
    scale = 1.0 / np.sqrt(head_dim)
    attention(q[:, :], k_cache, v_cache, pos0, n_heads, n_kv_heads, head_dim, scale, scores, probs, out)
    want_out, want_probs = _attention_f64(q, k, v, pos0, n_heads, n_kv_heads, head_dim, scale)
    # float32 sums of 32 products (scores) and of pos0+n terms (outputs): ~1e-6 relative
    np.testing.assert_allclose(probs, want_probs, rtol=0, atol=2e-6)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-5)
    masked = np.arange(pos0 + n)[None, :] > pos0 + np.arange(n)[:, None]
    assert (scores[:, masked] == 0).all() and (probs[:, masked] == 0).all()
