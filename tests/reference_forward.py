"""A slow, plain-numpy float32 forward written from the model definition (test-only).

It shares nothing with the engine's kernels: weights are dequantized with
gguf's reference dequantizers and every stage is computed with numpy. Returns
every stage's value by (stage, layer) so trace captures can be checked too.
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
        self.eps = np.float32(md[p + "attention.layer_norm_rms_epsilon"])
        self.base = md.get(p + "rope.freq_base", 10000.0)
        self._cache = {}

    def w(self, name):
        """Dequantized tensor as float32 numpy array in [rows, cols] order."""
        if name not in self._cache:
            info = self.gf.tensors[name]
            raw = np.asarray(self.gf.tensor_bytes(name))
            arr = dequantize(raw, GGMLQuantizationType(info.ggml_type)).astype(np.float32)
            self._cache[name] = arr.reshape(tuple(reversed(info.ne)))
        return self._cache[name]

    def has(self, name):
        return name in self.gf.tensors

    def rmsnorm(self, x, w):
        return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps)).astype(np.float32) * w

    def rope(self, x, n_heads):
        n = x.shape[0]
        hd = self.head_dim
        x = x.reshape(n, n_heads, hd).astype(np.float64)
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
        return out.reshape(n, n_heads * hd).astype(np.float32)

    def forward(self, ids, n_layers=None):
        """All stages for a prompt at positions 0..n-1: dict (stage, layer) -> array."""
        ids = np.asarray(ids)
        n, hd = len(ids), self.head_dim
        st = {}
        x = self.w("token_embd.weight")[ids]
        st["embedding", None] = x
        for L in range(self.n_layers if n_layers is None else n_layers):
            b = f"blk.{L}."
            h = self.rmsnorm(x, self.w(b + "attn_norm.weight"))
            st["attn_norm", L] = h
            qkv = np.concatenate([h @ self.w(b + f"attn_{t}.weight").T for t in "qkv"], axis=1)
            st["qkv_matmul", L] = qkv
            if self.has(b + "attn_q.bias"):
                qkv = qkv + np.concatenate([self.w(b + f"attn_{t}.bias") for t in "qkv"])
                st["qkv_bias", L] = qkv
            qd, kvd = self.n_heads * hd, self.n_kv * hd
            q = self.rope(qkv[:, :qd], self.n_heads)
            k = self.rope(qkv[:, qd:qd + kvd], self.n_kv)
            v = qkv[:, qd + kvd:]
            st["q_post_rope", L], st["k_post_rope", L] = q, k
            group = self.n_heads // self.n_kv
            scores = np.zeros((self.n_heads, n, n), np.float32)
            probs = np.zeros_like(scores)
            att = np.zeros((n, qd), np.float32)
            mask = np.tril(np.ones((n, n), bool))
            for hh in range(self.n_heads):
                kh = hh // group
                s = (q[:, hh * hd:(hh + 1) * hd] @ k[:, kh * hd:(kh + 1) * hd].T) / np.float32(np.sqrt(hd))
                s = np.where(mask, s, -np.inf)
                e = np.exp(s - s.max(axis=1, keepdims=True))
                p = e / e.sum(axis=1, keepdims=True)
                scores[hh] = np.where(mask, s, 0)
                probs[hh] = p
                att[:, hh * hd:(hh + 1) * hd] = p @ v[:, kh * hd:(kh + 1) * hd]
            st["attn_scores", L], st["attn_softmax", L], st["attention", L] = scores, probs, att
            ao = att @ self.w(b + "attn_output.weight").T
            st["attn_out", L] = ao
            r = x + ao
            st["post_attn_residual", L] = r
            h2 = self.rmsnorm(r, self.w(b + "ffn_norm.weight"))
            st["ffn_norm", L] = h2
            g = h2 @ self.w(b + "ffn_gate.weight").T
            u = h2 @ self.w(b + "ffn_up.weight").T
            silu = g / (1 + np.exp(-g))
            st["ffn_gate", L], st["ffn_up", L], st["ffn_silu", L] = g, u, silu
            sw = silu * u
            st["ffn_swigl", L] = sw
            d = sw @ self.w(b + "ffn_down.weight").T
            st["ffn_out", L] = d
            x = r + d
            st["post_ffn_residual", L] = x
        if n_layers is None:
            fn = self.rmsnorm(x, self.w("output_norm.weight"))
            st["final_norm", None] = fn
            out = self.w("output.weight") if self.has("output.weight") else self.w("token_embd.weight")
            st["lm_head", None] = fn[-1:] @ out.T
        return st
