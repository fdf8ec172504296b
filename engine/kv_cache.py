"""The key/value cache of one sequence, grown as positions are used."""
from __future__ import annotations

import numpy as np

from engine import failpoints
from engine.errors import EngineError
from engine.model import Config

# Positions held by a new cache. K is stored transposed ([.., head_dim, positions]), so every
# one of its rows is touched from the first token on: a cache sized for the whole context up
# front (32,768 positions) would cost the 1.5B 0.9 GB of resident memory for one token.
INITIAL_POSITIONS = 256


class KVCache:
    """Per layer, K as [n_kv_heads, head_dim, capacity] and V as [n_kv_heads, capacity, head_dim],
    float32 (the layouts kernels.attention reads fastest).

    ``n_ctx`` is the most positions the cache may ever hold; ``capacity`` what it holds room
    for now. ``reserve(n)`` (called by the forward before it writes position n-1) doubles the
    capacity, copying what is there, until n fits: memory grows with the positions used, and a
    long generation reallocates only log2(n_ctx / 256) times.
    """

    def __init__(self, cfg: Config, n_ctx: int, initial: int = INITIAL_POSITIONS):
        if n_ctx < 1:
            raise EngineError(f"context size must be positive, got {n_ctx}")
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.positions = np.arange(n_ctx, dtype=np.int64)  # rope positions, sliced per forward
        self.k, self.v = self._allocate(min(n_ctx, initial))
        # positions an earlier session left here that the planted fault session.stale_cache
        # trusts instead of rewriting (always 0 without that fault)
        self.stale = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[-1]

    def _allocate(self, capacity: int):
        c = self.cfg
        try:
            return (np.zeros((c.n_layers, c.n_kv_heads, c.head_dim, capacity), dtype=np.float32),
                    np.zeros((c.n_layers, c.n_kv_heads, capacity, c.head_dim), dtype=np.float32))
        except MemoryError:
            gib = 2 * 4 * c.n_layers * c.kv_dim * capacity / 2**30
            raise EngineError(f"cannot allocate the KV cache for {capacity} tokens ({gib:.1f} GiB); "
                              f"use a smaller --ctx") from None

    def reserve(self, n_positions: int) -> None:
        """Make room for positions 0..n_positions-1 (keeping what the cache holds)."""
        if n_positions <= self.capacity:
            return
        if n_positions > self.n_ctx:
            raise EngineError(f"context full: {n_positions} tokens exceed the context size {self.n_ctx}")
        capacity = self.capacity
        while capacity < n_positions:
            capacity *= 2
        k, v = self._allocate(min(capacity, self.n_ctx))
        old = self.capacity
        if not failpoints.active("kv.grow_no_copy"):
            k[..., :old] = self.k
            v[:, :, :old] = self.v
        self.k, self.v = k, v
