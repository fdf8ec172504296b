"""A slow, plain-numpy float64 forward written from the model definition (test-only).

It shares nothing with the engine's kernels: weights are dequantized with
gguf's reference dequantizers and every stage is computed with numpy. Returns
every stage's value by (stage, layer), as float64, so trace captures can be checked too.

Why float64: the reference must measure our error, not its own. Dequantized weights are
exact in float32 (and so in float64); everything computed from them (matmuls, attention,
norms, RoPE, SwiGLU) runs in float64, so the reference's own rounding (~1e-16 relative) is
far below any tolerance and does not depend on which BLAS kernel numpy picks (a float32
reference through OpenBLAS measured 4.8e-4 on the 1.5B's layer-0 attention probabilities
with its default kernels and 1.2e-3 with OPENBLAS_CORETYPE=Haswell: its own rounding).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine.gguf_reader import GGUFFile


class ReferenceModel:
    def __init__(self, path):
        self.gf = GGUFFile(path)
        md = self.gf.metadata
        self.arch = md["general.architecture"]
        p = self.arch + "."
        self.n_layers = md[p + "block_count"]
        self.n_heads = md[p + "attention.head_count"]
        self.n_kv = md[p + "attention.head_count_kv"]
        self.dim = md[p + "embedding_length"]
        self.head_dim = self.dim // self.n_heads
        self.eps = float(np.float32(md[p + "attention.layer_norm_rms_epsilon"]))
        self.base = md.get(p + "rope.freq_base", 10000.0)
        self._cache = {}

    def w(self, name):
        """Dequantized tensor as a float32 numpy array in [rows, cols] order (exact: every
        ggml type dequantizes to float32 values)."""
        if name not in self._cache:
            info = self.gf.tensors[name]
            raw = np.asarray(self.gf.tensor_bytes(name))
            arr = dequantize(raw, GGMLQuantizationType(info.ggml_type)).astype(np.float32)
            self._cache[name] = arr.reshape(tuple(reversed(info.ne)))
        return self._cache[name]

    def w64(self, name):
        """The same tensor widened to float64 (not cached: a 1.5B layer would hold ~0.4 GB)."""
        return self.w(name).astype(np.float64)

    def matmul(self, x, name):
        """x @ W.T in float64, W the dequantized tensor `name`."""
        return x @ self.w64(name).T

    def has(self, name):
        return name in self.gf.tensors

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + self.eps) * self.w64(w)

    def rope(self, x, n_heads):
        n = x.shape[0]
        hd = self.head_dim
        x = x.reshape(n, n_heads, hd)
        pos = np.arange(n, dtype=np.float64)[:, None]
        freqs = self.base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = pos * freqs[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        out = np.empty_like(x)
        if self.arch == "qwen2":  # NEOX: rotate halves
            a, b = x[..., :hd // 2], x[..., hd // 2:]
            out[..., :hd // 2] = a * cos - b * sin
            out[..., hd // 2:] = a * sin + b * cos
        else:  # NORM: adjacent pairs
            a, b = x[..., 0::2], x[..., 1::2]
            out[..., 0::2] = a * cos - b * sin
            out[..., 1::2] = a * sin + b * cos
        return out.reshape(n, n_heads * hd)

    def forward(self, ids, n_layers=None):
        """All stages for a prompt at positions 0..n-1: dict (stage, layer) -> array."""
        ids = np.asarray(ids)
        n, hd = len(ids), self.head_dim
        st = {}
        x = self.w("token_embd.weight")[ids].astype(np.float64)
        st["embedding", None] = x
        for L in range(self.n_layers if n_layers is None else n_layers):
            b = f"blk.{L}."
            h = self.rmsnorm(x, b + "attn_norm.weight")
            st["attn_norm", L] = h
            qkv = np.concatenate([self.matmul(h, b + f"attn_{t}.weight") for t in "qkv"], axis=1)
            st["qkv_matmul", L] = qkv
            if self.has(b + "attn_q.bias"):
                qkv = qkv + np.concatenate([self.w64(b + f"attn_{t}.bias") for t in "qkv"])
                st["qkv_bias", L] = qkv
            qd, kvd = self.n_heads * hd, self.n_kv * hd
            q = self.rope(qkv[:, :qd], self.n_heads)
            k = self.rope(qkv[:, qd:qd + kvd], self.n_kv)
            v = qkv[:, qd + kvd:]
            st["q_post_rope", L], st["k_post_rope", L] = q, k
            group = self.n_heads // self.n_kv
            scores = np.zeros((self.n_heads, n, n))
            probs = np.zeros_like(scores)
            att = np.zeros((n, qd))
            mask = np.tril(np.ones((n, n), bool))
            for hh in range(self.n_heads):
                kh = hh // group
                s = (q[:, hh * hd:(hh + 1) * hd] @ k[:, kh * hd:(kh + 1) * hd].T) / np.sqrt(hd)
                s = np.where(mask, s, -np.inf)
                e = np.exp(s - s.max(axis=1, keepdims=True))
                p = e / e.sum(axis=1, keepdims=True)
                scores[hh] = np.where(mask, s, 0)
                probs[hh] = p
                att[:, hh * hd:(hh + 1) * hd] = p @ v[:, kh * hd:(kh + 1) * hd]
            st["attn_scores", L], st["attn_softmax", L], st["attention", L] = scores, probs, att
            ao = self.matmul(att, b + "attn_output.weight")
            st["attn_out", L] = ao
            r = x + ao
            st["post_attn_residual", L] = r
            h2 = self.rmsnorm(r, b + "ffn_norm.weight")
            st["ffn_norm", L] = h2
            g = self.matmul(h2, b + "ffn_gate.weight")
            u = self.matmul(h2, b + "ffn_up.weight")
            silu = g / (1 + np.exp(-g))
            st["ffn_gate", L], st["ffn_up", L], st["ffn_silu", L] = g, u, silu
            sw = silu * u
            st["ffn_swigl", L] = sw
            d = self.matmul(sw, b + "ffn_down.weight")
            st["ffn_out", L] = d
            x = r + d
            st["post_ffn_residual", L] = x
        if n_layers is None:
            fn = self.rmsnorm(x, "output_norm.weight")
            st["final_norm", None] = fn
            out = "output.weight" if self.has("output.weight") else "token_embd.weight"
            st["lm_head", None] = self.matmul(fn[-1:], out)
        return st
