"""A session: the run state of one sequence over a loaded model.

The loaded model (``engine.api.Engine``: config, memory-mapped weights, tokenizer) never
changes once loaded and is shared; everything one sequence mutates lives here, as
llama2.c keeps its ``RunState`` apart from ``TransformerWeights``. Several sessions may
share one model (interleaved generations, a server's requests). Numba's parallel kernels
are not re-entrant across threads: run one forward at a time per process.
"""
from __future__ import annotations

import numpy as np

from engine import failpoints
from engine.errors import EngineError
from engine.forward import Hooks, forward
from engine.generate import GenStats, generate, prefill
from engine.kv_cache import KVCache
from engine.sampling import Sampler
from engine.sink import NullSink
from kernels.matmul import Int8Activations


def as_hooks(hooks) -> Hooks | None:
    """None, a Hooks, or a dict {(stage, layer): fn} as a Hooks (None when empty)."""
    if hooks is None or isinstance(hooks, Hooks):
        return hooks
    return Hooks(hooks) if hooks else None


class Session:
    """Run state of one sequence.

    kv:    KVCache        keys/values of positions 0..pos-1, grown as positions are used
    int8:  Int8Activations int8 activation buffers of the quantized matmuls (reused)
    sink:  the sink stages are computed into by default (NullSink: reusable scratch)
    pos:   int            positions the cache holds (the next forward's default start)
    """

    def __init__(self, engine, n_ctx: int | None = None, sink=None):
        n_ctx = engine.n_ctx if n_ctx is None else n_ctx
        if n_ctx < 1:
            raise EngineError(f"context size must be positive, got {n_ctx}")
        if n_ctx > engine.config.context:
            raise EngineError(f"context size {n_ctx} exceeds the model's context length {engine.config.context}")
        self.engine = engine
        self.model = engine.model
        self.n_ctx = n_ctx
        self.kv = KVCache(engine.config, n_ctx)
        if failpoints.active("session.stale_cache"):
            self._inherit_stale_cache(engine)
        self.int8 = Int8Activations()
        self.sink = NullSink() if sink is None else sink
        self.pos = 0

    def _inherit_stale_cache(self, engine) -> None:
        """Planted fault: reuse the engine's previous session's cache and trust what it holds."""
        last = getattr(engine, "_last_session", None)
        engine._last_session = self
        if last is not None:
            self.kv = last.kv
            if self.kv.n_ctx < self.n_ctx:
                self.kv.n_ctx, self.kv.positions = self.n_ctx, np.arange(self.n_ctx, dtype=np.int64)
            self.kv.stale = last.pos

    def reset(self) -> None:
        """Forget the sequence: the next forward starts at position 0."""
        self.pos = 0

    # -- forwards ------------------------------------------------------------------------
    def forward_view(self, ids, pos: int | None = None, sink=None, all_logits: bool = False,
                     hooks=None) -> np.ndarray:
        """One forward over ids at positions pos.. (default: where the session is); returns
        the lm_head buffer itself (valid until the next forward). The cache must hold
        positions 0..pos-1, so pos may not be past the session's end. `hooks`:
        ``{(stage, layer): fn(values, positions)}`` or an engine.forward.Hooks (see there)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = self.pos if pos is None else pos
        if not 0 <= pos <= self.pos:
            raise EngineError(f"forward at position {pos}, but the session holds positions 0..{self.pos - 1} "
                              f"(a forward may start at most at {self.pos})")
        logits = forward(self.model, self, ids, pos, sink, all_logits=all_logits, hooks=as_hooks(hooks))
        self.pos = pos + len(ids)
        return logits

    def forward(self, ids, pos: int | None = None, sink=None, all_logits: bool = False, hooks=None) -> np.ndarray:
        """Like forward_view, but returns logits ([n or 1, vocab]) as a copy."""
        return self.forward_view(ids, pos, sink, all_logits, hooks).copy()

    def prefill(self, ids, hooks=None) -> np.ndarray:
        """Prefill ids from position 0; return the last position's logits (a copy)."""
        self.pos = 0
        return prefill(self, np.asarray(ids, dtype=np.int64), hooks=as_hooks(hooks)).copy()

    def generate(self, prompt_ids, max_tokens: int = 256, sampler: Sampler | None = None,
                 stop_at_eog: bool = True, stats: GenStats | None = None, hooks=None):
        """Yield generated token ids (the end-of-generation token included when it comes),
        starting from an empty sequence: the prompt is prefilled from position 0. `hooks`
        run in every forward: the prompt's prefill and each decode step."""
        if max_tokens < 1:
            raise EngineError(f"--max-tokens must be >= 1, got {max_tokens}")
        self.pos = 0
        stop = self.engine.tokenizer.eog_ids if stop_at_eog else frozenset()
        return generate(self, prompt_ids, max_tokens, sampler or Sampler(), stop_ids=stop, stats=stats,
                        hooks=as_hooks(hooks))

    def score(self, ids, top: int = 5, chunk: int = 128, hooks=None) -> dict:
        """Teacher-forced forward over ids: per position log p(next id) and the top candidates."""
        ids = np.asarray(ids, dtype=np.int64)
        hooks = as_hooks(hooks)
        if len(ids) == 0:
            raise EngineError("nothing to score: 0 tokens")
        if len(ids) > self.n_ctx:
            raise EngineError(f"{len(ids)} tokens exceed the context size {self.n_ctx}")
        positions, nll = [], []
        for start in range(0, len(ids), chunk):
            logits = self.forward_view(ids[start:start + chunk], start, all_logits=True, hooks=hooks)
            for r in range(logits.shape[0]):
                i = start + r
                row = logits[r].astype(np.float64)
                lse = np.log(np.exp(row - row.max()).sum()) + row.max()
                nxt = int(ids[i + 1]) if i + 1 < len(ids) else None
                lp = float(row[nxt] - lse) if nxt is not None else None
                if lp is not None:
                    nll.append(-lp)
                best = np.argsort(-logits[r], kind="stable")[:top] if top > 0 else []
                positions.append({"pos": i, "next_id": nxt, "logprob": lp,
                                  "top": [[int(t), float(logits[r, t])] for t in best]})
        ppl = float(np.exp(np.mean(nll))) if nll else None
        return {"ids": [int(t) for t in ids], "positions": positions, "perplexity": ppl}
