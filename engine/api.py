"""The Python API the CLI calls: Engine.load(...), .generate(...), .forward(...), .score(...)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.fetch import resolve_model
from engine.forward import Model, forward
from engine.generate import GenStats, generate, prefill
from engine.kv_cache import KVCache
from engine.model import open_model
from engine.sampling import Sampler
from engine.tokenizer import Tokenizer
from trace.sink import NullSink

# The KV cache is np.zeros (lazily paged), so a large default context costs
# memory only for the positions actually used.
MAX_DEFAULT_CTX = 32768


def set_threads(n: int | None) -> None:
    """Use n Numba worker threads (default: all cores)."""
    import numba
    if n is None:
        return
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise EngineError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)


def _note_first_compile() -> None:
    """Say on stderr that kernels are being compiled when Numba's on-disk cache is empty."""
    import sys
    import numba
    custom = numba.config.CACHE_DIR  # NUMBA_CACHE_DIR, if set, holds the cache instead of __pycache__
    cache = Path(custom) if custom else Path(__file__).resolve().parents[1] / "kernels" / "__pycache__"
    if not any(cache.rglob("*.nbi")):
        print("compiling kernels with Numba (once; later runs load them from the cache)...", file=sys.stderr)


class Engine:
    """A loaded model: config, memory-mapped weights, tokenizer and a KV cache."""

    def __init__(self, path: Path, n_ctx: int | None = None, exact: bool = False):
        self.path = Path(path)
        self.gguf, self.config, weights = open_model(self.path)
        self.model = Model(self.config, weights, exact=exact)
        self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata, source=str(self.path))
        if self.tokenizer.n_vocab != self.config.vocab:
            raise EngineError(f"{self.path}: tokenizer has {self.tokenizer.n_vocab} tokens but the model "
                              f"config says vocab {self.config.vocab}")
        n_ctx = n_ctx or min(self.config.context, MAX_DEFAULT_CTX)
        if n_ctx < 1:
            raise EngineError(f"context size must be positive, got {n_ctx}")
        if n_ctx > self.config.context:
            raise EngineError(f"context size {n_ctx} exceeds the model's context length {self.config.context}")
        self.n_ctx = n_ctx
        try:
            self.kv = KVCache(self.config, n_ctx)
        except MemoryError:
            c = self.config
            gib = 2 * 4 * c.n_layers * c.kv_dim * n_ctx / 2**30
            raise EngineError(f"cannot allocate the KV cache for {n_ctx} tokens ({gib:.1f} GiB); "
                              f"use a smaller --ctx") from None
        self.sink = NullSink()

    @classmethod
    def load(cls, model: str | None = None, n_ctx: int | None = None, threads: int | None = None,
             quiet: bool = False, exact: bool = False) -> "Engine":
        """Load a model by key (fetched on first use) or GGUF path.

        exact=True computes in float32 throughout (every matmul on float32 activations, K/V
        kept in float32) instead of rounding as llama.cpp does (see engine.forward.Model)."""
        set_threads(threads)
        path = resolve_model(model, quiet=quiet)
        if not quiet:
            _note_first_compile()
        return cls(path, n_ctx=n_ctx, exact=exact)

    # -- prompts ---------------------------------------------------------------------
    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of a user prompt: the chat template unless raw (raw parses special tokens)."""
        if not raw and self.gguf.metadata.get("tokenizer.chat_template"):
            text = self.tokenizer.render_chat([{"role": "user", "content": text}])
        return self.tokenizer.encode(text, parse_special=True)

    # -- model calls -----------------------------------------------------------------
    def forward(self, ids, pos: int = 0, sink=None, all_logits: bool = False) -> np.ndarray:
        """One forward over ids at positions pos..; returns logits ([n or 1, vocab]) as a copy."""
        ids = np.asarray(ids, dtype=np.int64)
        return forward(self.model, self.kv, ids, pos, sink or self.sink, all_logits=all_logits).copy()

    def prefill(self, ids) -> np.ndarray:
        """Prefill ids from position 0; return the last position's logits."""
        return prefill(self.model, self.kv, np.asarray(ids, dtype=np.int64), self.sink).copy()

    def generate(self, prompt_ids, max_tokens: int = 256, sampler: Sampler | None = None,
                 stop_at_eog: bool = True, stats: GenStats | None = None):
        """Yield generated token ids (the end-of-generation token included when it comes)."""
        if max_tokens < 1:
            raise EngineError(f"--max-tokens must be >= 1, got {max_tokens}")
        stop = self.tokenizer.eog_ids if stop_at_eog else frozenset()
        return generate(self.model, self.kv, prompt_ids, max_tokens, sampler or Sampler(), self.sink,
                        stop_ids=stop, stats=stats)

    def score(self, ids, top: int = 5, chunk: int = 128) -> dict:
        """Teacher-forced forward over ids: per position log p(next id) and the top candidates."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            raise EngineError("nothing to score: 0 tokens")
        if len(ids) > self.n_ctx:
            raise EngineError(f"{len(ids)} tokens exceed the context size {self.n_ctx}")
        positions, nll = [], []
        for start in range(0, len(ids), chunk):
            logits = forward(self.model, self.kv, ids[start:start + chunk], start, self.sink, all_logits=True)
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
