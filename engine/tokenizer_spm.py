"""The SentencePiece-style tokenizer GGUF calls "llama" (`tokenizer.ggml.model`), as llama.cpp has it.

Mirrors llama.cpp's src/llama-vocab.cpp for LLAMA_VOCAB_TYPE_SPM: special tokens are split
out first (shared with the gpt2 tokenizer, `TokenizerBase._partition`); each raw fragment gets
a leading space when `tokenizer.ggml.add_space_prefix` (default true) and it starts the text or
follows a special token; spaces become U+2581; then `llm_tokenizer_spm_session`: start from
single code points, repeatedly merge the adjacent pair whose concatenation is a token with the
highest `tokenizer.ggml.scores` (ties: the leftmost pair), and emit any symbol left that is not
a token as its UTF-8 bytes' `<0xXX>` tokens. Decoding turns U+2581 back into spaces and byte
tokens into their byte (streaming-safe through the shared `StreamDecoder`).
"""
from __future__ import annotations

import heapq

import numpy as np

from engine.tokenizer import (TokenizerBase, _chat_template, _check_strings, _detect_roles, _fail, _flag,
                              _token_attrs, _token_ids)

SPACE = "\u2581"  # SentencePiece's escaped space


class SpmTokenizer(TokenizerBase):
    """A llama.cpp-compatible SPM tokenizer built from GGUF metadata."""

    def __init__(self, tokens: list[str], ids: dict[str, int], attrs: list[int], scores: list[float],
                 roles: dict, eog_ids: frozenset, add_bos: bool, add_eos: bool, add_space_prefix: bool,
                 chat_template: str | None, source: str = ""):
        super().__init__(tokens, ids, attrs, roles, eog_ids, add_bos, chat_template, source, add_eos=add_eos)
        self._scores = scores
        self.add_space_prefix = add_space_prefix
        # llama_vocab::byte_to_token: "<0xXX>", else the byte itself as a one-character token
        self._byte_ids = []
        for b in range(256):
            tid = ids.get(f"<0x{b:02X}>")
            if tid is None and b < 0x80:
                tid = ids.get(chr(b))
            self._byte_ids.append(tid)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def _build(cls, md: dict, source: str = "") -> "SpmTokenizer":
        """The SPM tokenizer of a GGUF metadata dict (`tokenizer.ggml.model` already checked)."""
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is None or (isinstance(tokens, list) and not tokens):
            raise _fail(source, "tokenizer vocabulary missing from the metadata")
        _check_strings("tokens", tokens, source)
        ids = _token_ids(tokens, source)
        n = len(tokens)
        scores = md.get("tokenizer.ggml.scores")
        if scores is None:  # llama.cpp takes every score as 0
            scores = [0.0] * n
        elif (isinstance(scores, np.ndarray) and scores.dtype.kind in "iuf" and scores.ndim == 1
              and len(scores) >= n):
            scores = scores[:n].astype(np.float32).tolist()  # llama.cpp's float scores, exactly
        else:
            raise _fail(source, f"tokenizer.ggml.scores is not an array of {n} numbers (one per token)")
        attrs = _token_attrs(md, n, source)
        roles, eog = _detect_roles(md, ids, attrs, bos_default=1, eos_default=2)  # llama.cpp's SPM defaults
        add_bos = _flag(md, "tokenizer.ggml.add_bos_token", True, source)
        add_eos = _flag(md, "tokenizer.ggml.add_eos_token", False, source)
        for key, on, role in (("bos", add_bos, roles["bos"]), ("eos", add_eos, roles["eos"])):
            if on and role is None:
                raise _fail(source, f"tokenizer.ggml.add_{key}_token is true, but tokenizer.ggml.{key}_token_id "
                                    "is not set")
        add_space_prefix = _flag(md, "tokenizer.ggml.add_space_prefix", True, source)
        template = _chat_template(md, source)
        return cls(tokens, ids, attrs, scores, roles, eog, add_bos, add_eos, add_space_prefix, template, source)

    # -- encoding ------------------------------------------------------------------------
    def _encode_fragments(self, frags: list, out: list[int]) -> None:
        prev_special = True  # the first fragment is prefixed too, BOS or not
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm(frag.replace(" ", SPACE), out)
                prev_special = False

    def _spm(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize: merge the highest-score adjacent pair (then the
        leftmost) whose concatenation is a token, until none is left; unknown symbols as bytes."""
        ids, scores = self._ids, self._scores
        syms = list(text)
        n = len(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            tid = ids.get(syms[i] + syms[i + 1])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, size = pop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # stale: one side was merged since this pair was queued
            syms[left], syms[right] = a + b, ""
            nr = nxt[left] = nxt[right]
            if nr >= 0:
                prv[nr] = left
                tid = ids.get(syms[left] + syms[nr])
                if tid is not None:
                    push(heap, (-scores[tid], left, nr, len(syms[left]) + len(syms[nr])))
            p = prv[left]
            if p >= 0:
                tid = ids.get(syms[p] + syms[left])
                if tid is not None:
                    push(heap, (-scores[tid], p, left, len(syms[p]) + len(syms[left])))
        i = 0
        while i != -1:
            s = syms[i]
            tid = ids.get(s)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_token(b, s) for b in s.encode("utf-8", "surrogatepass"))
            i = nxt[i]

    def _byte_token(self, b: int, sym: str) -> int:
        tid = self._byte_ids[b]
        if tid is None:
            raise _fail(self._source, f"the vocabulary has no byte token <0x{b:02X}> for {sym!r}")
        return tid

    # -- decoding ------------------------------------------------------------------------
    def _normal_piece(self, text: str) -> bytes:
        return text.replace(SPACE, " ").encode("utf-8")

    def decode(self, ids, special: bool = True) -> str:
        """Text of ids as llama_detokenize gives it (remove_special false): piece bytes joined, with
        the space add_space_prefix put before the first token taken off again."""
        ids = list(ids)
        data = b"".join(self.token_bytes(int(i), special) for i in ids)
        if self.add_space_prefix and ids and self.token_bytes(int(ids[0]), special)[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", "replace")

