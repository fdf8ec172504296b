"""Preallocated run state: the key/value cache."""
from __future__ import annotations

import numpy as np

from engine.model import Config


class KVCache:
    """Per layer, K as [n_kv_heads, head_dim, n_ctx] and V as [n_kv_heads, n_ctx, head_dim],
    float32 (the layouts kernels.attention reads fastest).

    Allocated with np.zeros, so V's pages are only touched (and count toward RSS) as
    positions are filled; K's transposed rows are all touched from the first token.
    """

    def __init__(self, cfg: Config, n_ctx: int):
        self.n_ctx = n_ctx
        self.k = np.zeros((cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, n_ctx), dtype=np.float32)
        self.v = np.zeros((cfg.n_layers, cfg.n_kv_heads, n_ctx, cfg.head_dim), dtype=np.float32)
        self.positions = np.arange(n_ctx, dtype=np.int64)
