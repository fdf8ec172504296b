"""Generation: prefill the prompt as matrices (in chunks), then decode one token per step."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError
from engine.sampling import Sampler

PREFILL_CHUNK = 256  # tokens per prefill forward: bounds scratch memory for long prompts


@dataclass
class GenStats:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated: int = 0
    decode_s: float = 0.0
    first_token_s: float = 0.0
    stop_reason: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes from the prefill's logits; later ones from decode steps
        steps = max(self.generated - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0


def prefill(session, ids: np.ndarray, chunk: int = PREFILL_CHUNK, hooks=None) -> np.ndarray:
    """Run the prompt through the session from position 0 in chunks; return the last
    position's logits [vocab] (a view of the sink's lm_head buffer)."""
    logits = None
    for start in range(0, len(ids), chunk):
        logits = session.forward_view(ids[start:start + chunk], start, hooks=hooks)
    return logits[0]


def check_prompt(ids, n_ctx: int) -> None:
    """Raise unless a generation can start from these prompt ids in a context of n_ctx."""
    if len(ids) == 0:
        raise EngineError("the prompt is empty (0 tokens)")
    if len(ids) >= n_ctx:
        raise EngineError(f"the prompt has {len(ids)} tokens; it must be shorter than the context size {n_ctx}")


def generate(session, prompt_ids, max_tokens: int, sampler: Sampler, stop_ids=frozenset(),
             stats: GenStats | None = None, hooks=None):
    """Yield generated token ids until a stop id (yielded too), max_tokens or a full context."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    n_ctx = session.n_ctx
    check_prompt(ids, n_ctx)
    stats = stats if stats is not None else GenStats()
    stats.prompt_tokens = len(ids)
    t0 = time.perf_counter()
    logits = prefill(session, ids, hooks=hooks)
    stats.prefill_s = time.perf_counter() - t0
    token_buf = np.empty(1, dtype=np.int64)
    pos = len(ids)
    for i in range(max_tokens):
        tok = sampler(logits)
        stats.generated += 1
        if i == 0:
            stats.first_token_s = time.perf_counter() - t0
        yield tok
        if tok in stop_ids:
            stats.stop_reason = "eog"
            return
        if i + 1 == max_tokens:
            break
        if pos >= n_ctx:
            stats.stop_reason = "context full"
            return
        t_step = time.perf_counter()
        token_buf[0] = tok
        logits = session.forward_view(token_buf, pos, hooks=hooks)[0]
        pos += 1
        stats.decode_s += time.perf_counter() - t_step
    stats.stop_reason = "max tokens"
