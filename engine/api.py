"""The Python API: Engine.load(...) (the loaded model) and its sessions (run state).

    eng = Engine.load("smollm2-135m-q4_1")
    s = eng.new_session()                  # KV cache, scratch, position, sink of one sequence
    for tok in s.generate(eng.prompt_ids("Hi"), max_tokens=8): ...

Engine's own forward/prefill/generate/score run on a default session (``eng.session``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.fetch import resolve_model
from engine.forward import Model
from engine.generate import GenStats
from engine.model import open_model
from engine.sampling import Sampler
from engine.session import Session
from engine.tokenizer import Tokenizer

# A session's KV cache grows with the positions it uses (engine.kv_cache), so the default
# context costs memory only for what a generation reaches.
MAX_DEFAULT_CTX = 32768


def set_threads(n: int | None) -> None:
    """Use n Numba worker threads (default: all cores)."""
    import numba
    if n is None:
        return
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise EngineError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)


def numba_cache_empty() -> bool:
    """Whether Numba's on-disk cache holds no kernel (a first run: every kernel compiles)."""
    import numba
    custom = numba.config.CACHE_DIR  # NUMBA_CACHE_DIR, if set, holds the cache instead of __pycache__
    cache = Path(custom) if custom else Path(__file__).resolve().parents[1] / "kernels" / "__pycache__"
    return not any(cache.rglob("*.nbi"))


def _note_first_compile() -> None:
    """Say on stderr that kernels are being compiled when Numba's on-disk cache is empty."""
    import sys
    if numba_cache_empty():
        print("compiling kernels with Numba (once; later runs load them from the cache)...", file=sys.stderr)


class Engine:
    """A loaded model: config, memory-mapped weights, tokenizer. Immutable once loaded; the
    run state of a sequence lives in a Session (``new_session()``)."""

    def __init__(self, path: Path, n_ctx: int | None = None, exact: bool = False):
        t0 = time.perf_counter()
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
        self.n_ctx = n_ctx  # the default context of new sessions
        self._session: Session | None = None
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def load(cls, model: str | None = None, n_ctx: int | None = None, threads: int | None = None,
             quiet: bool = False, exact: bool = False) -> "Engine":
        """Load a model by key (fetched on first use) or GGUF path.

        exact=True computes in float32 throughout (every matmul on float32 activations, K/V
        kept in float32, attention scores summed in float64) instead of rounding as llama.cpp does (see engine.forward.Model)."""
        set_threads(threads)
        path = resolve_model(model, quiet=quiet)
        if not quiet:
            _note_first_compile()
        return cls(path, n_ctx=n_ctx, exact=exact)

    # -- sessions ----------------------------------------------------------------------
    def new_session(self, n_ctx: int | None = None, sink=None) -> Session:
        """A new, empty sequence over this model (its own KV cache, scratch and position)."""
        return Session(self, n_ctx=n_ctx, sink=sink)

    @property
    def session(self) -> Session:
        """The default session that Engine.forward/prefill/generate/score use."""
        if self._session is None:
            self._session = self.new_session()
        return self._session

    def warm_up(self) -> float:
        """Load every kernel a generation runs (`warm_forward`), compiling it the first time
        Numba's cache is empty: then in two processes (engine.precompile), one per core.
        Returns the seconds it took, so that a prefill measured afterwards is the forward's own."""
        t0 = time.perf_counter()
        if numba_cache_empty():
            import sys
            from engine.precompile import warm_in_parallel
            shown = sys.stderr.isatty()   # a progress line on a terminal; logs get only the totals

            def progress(claimed, total):
                print(f"\rcompiling kernels: {claimed}/{total} started", end="", file=sys.stderr, flush=True)
            warm_in_parallel(self, self.warm_forward, progress if shown else None)
            if shown:
                print(file=sys.stderr)
        self.warm_forward()
        return time.perf_counter() - t0

    def warm_forward(self) -> None:
        """A 2-token prompt and one decode step in a throwaway 4-position session, as llama.cpp
        warms up with an empty run: every kernel a generation calls is called once."""
        s = self.new_session(n_ctx=min(4, self.config.context))
        s.forward_view([0, 0], 0)
        s.forward_view([0], 2)

    # -- prompts -----------------------------------------------------------------------
    def prompt_ids(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of a user prompt: the chat template unless raw or the model has none (special
        tokens parsed either way), with BOS/EOS where the model adds them (as llama.cpp does)."""
        templated = not raw and self.has_chat_template
        if templated:
            text = self.tokenizer.render_chat([{"role": "user", "content": text}])
        ids = self.tokenizer.encode(text, parse_special=True, add_special=True)
        bos = self.tokenizer.bos_id
        if templated and len(ids) > 1 and bos is not None and ids[0] == ids[1] == bos:
            ids = ids[1:]   # the template wrote BOS itself
        return ids

    @property
    def has_chat_template(self) -> bool:
        """Whether the model file has a chat template (a base model often has none)."""
        return bool(self.gguf.metadata.get("tokenizer.chat_template"))

    # -- model calls on the default session --------------------------------------------
    def forward(self, ids, pos: int = 0, sink=None, all_logits: bool = False) -> np.ndarray:
        """One forward over ids at positions pos..; returns logits ([n or 1, vocab]) as a copy."""
        return self.session.forward(ids, pos, sink, all_logits)

    def prefill(self, ids) -> np.ndarray:
        """Prefill ids from position 0; return the last position's logits."""
        return self.session.prefill(ids)

    def generate(self, prompt_ids, max_tokens: int = 256, sampler: Sampler | None = None,
                 stop_at_eog: bool = True, stats: GenStats | None = None, hooks=None):
        """Yield generated token ids (the end-of-generation token included when it comes)."""
        return self.session.generate(prompt_ids, max_tokens, sampler, stop_at_eog, stats, hooks)

    def score(self, ids, top: int = 5, chunk: int = 128) -> dict:
        """Teacher-forced forward over ids: per position log p(next id) and the top candidates."""
        return self.session.score(ids, top, chunk)
