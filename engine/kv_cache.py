"""Preallocated run state: the key/value cache."""
from __future__ import annotations

import numpy as np

from engine.model import Config


class KVCache:
    """K and V per layer as [n_kv_heads, n_ctx, head_dim] float32 (positions contiguous per head).

    Allocated with np.zeros, so pages are only touched (and count toward RSS) as
    positions are filled.
    """

    def __init__(self, cfg: Config, n_ctx: int):
        self.n_ctx = n_ctx
        shape = (cfg.n_layers, cfg.n_kv_heads, n_ctx, cfg.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.positions = np.arange(n_ctx, dtype=np.int64)
