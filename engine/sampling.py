"""Token sampling: greedy at temperature 0, else temperature, top-k and top-p with a seeded RNG."""
from __future__ import annotations

import numpy as np

from engine.errors import EngineError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        if not np.isfinite(temperature) or temperature < 0:
            raise EngineError(f"--temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise EngineError(f"--top-k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise EngineError(f"--top-p must be in (0, 1], got {top_p}")
        if seed is not None and not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise EngineError(f"--seed must be a non-negative integer, got {seed}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        """Pick the next token id from raw logits [vocab]."""
        if self.greedy:
            return int(np.argmax(logits))  # lowest id wins an exact tie, as in llama.cpp's reference
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            ids = np.argpartition(-z, self.top_k - 1)[:self.top_k]
        else:
            ids = np.arange(z.size)
        ids = ids[np.argsort(-z[ids], kind="stable")]
        p = np.exp(z[ids] - z[ids[0]])
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            ids, p = ids[:keep], p[:keep] / p[:keep].sum()
        return int(ids[self.rng.choice(len(ids), p=p)])


class Replay(Sampler):
    """A sampler that returns a given token sequence in order whatever the logits: a
    teacher-forced decode (each step fed the token another run generated)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = [int(t) for t in tokens]
        self.step = 0

    def __call__(self, logits: np.ndarray) -> int:
        if self.step >= len(self.tokens):
            raise EngineError(f"replay: asked for token {self.step + 1} of a {len(self.tokens)}-token sequence")
        self.step += 1
        return self.tokens[self.step - 1]
