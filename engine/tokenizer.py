"""The GGUF tokenizer, matching llama.cpp: gpt2 byte-level BPE, special tokens, chat templates.

`TokenizerBase` holds what every tokenizer model shares (token attributes and roles, the
special-token partition, BOS/EOS, pieces, streaming decode, chat templates) and its
`from_metadata` picks the model by `tokenizer.ggml.model`: "gpt2" is `Tokenizer` here,
"llama" (SentencePiece) is `engine.tokenizer_spm.SpmTokenizer`.

Mirrors llama.cpp's src/llama-vocab.cpp: token attributes from `tokenizer.ggml.token_type`
(with its by-text overrides), `tokenizer_st_partition` for special tokens (longest text
first), the pre-tokenizer regexes per `tokenizer.ggml.pre` (applied in sequence, keeping the
unmatched gaps, as unicode.cpp does), and the rank-ordered BPE merge queue. llama.cpp's
unicode tables are generated from the `regex` module's \\p{L}, \\p{N} and \\s, so the same
patterns are run here with `regex` directly.
"""
from __future__ import annotations

import codecs
import contextlib
import heapq
import json
from datetime import datetime

import numpy as np
import regex

from engine import failpoints
from engine.errors import EngineError

# llama_token_attr bits; GGUF token_type (index) -> attr
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
_TYPE_ATTR = (0, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes applied in order, ignore_merges, default add_bos), as llama.cpp
_PRE_FAMILIES = (
    (("default",), _DEFAULT, False, False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), (_LLAMA3,), True, True),
    (("dbrx", "smaug-bpe"), (_LLAMA3,), False, False),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2,), False, False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
     (r"\p{N}", _GPT2), False, False),
    (("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "mpt", "olmo", "jais", "exaone4"),
     (_GPT2,), False, False),
)
_PRE = {name: fam[1:] for fam in _PRE_FAMILIES for name in fam[0]}

# llama.cpp's by-text detection of roles (when the id is not in the metadata); detected
# tokens become CONTROL. Texts use llama.cpp's exact spelling (DeepSeek's are fullwidth).
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_ROLES = (  # (metadata keys, candidate texts, is end-of-generation)
    (("eot",), _EOT_TEXTS, False),
    (("eom",), ("<|eom_id|>",), False),
    (("fim_pre", "prefix"), ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                             "▁<PRE>", "<|code_prefix|>", "<|prefix|>"), False),
    (("fim_suf", "suffix"), ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                             "▁<SUF>", "<|code_suffix|>", "<|suffix|>"), False),
    (("fim_mid", "middle"), ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                             "▁<MID>", "<|code_middle|>", "<|middle|>"), False),
    (("fim_pad",), ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"), True),
    (("fim_rep",), ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"), True),
    (("fim_sep",), ("<|file_sep|>",), True),
)
# every token with one of these texts ends generation (llama.cpp's list, see issue #9606)
_EOG_TEXTS = frozenset(_EOT_TEXTS) | {
    "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "</s>", "<|eom_id|>", "[EOS]", "<eos>", "<turn|>",
    "<|tool_response>", "[e~["}

_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
           " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


_BYTE_ENC = _bytes_to_unicode()
_BYTE_TOKEN = regex.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_DEC = {c: b for b, c in _BYTE_ENC.items()}


def _byte_encode(word: str) -> str:
    """UTF-8 bytes of word, each as its GPT-2 printable character."""
    return word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTE_ENC)


def _byte_decode(text: str) -> bytes:
    """Inverse of _byte_encode; unmappable characters as llama.cpp's [UNK_BYTE_0x..] marker."""
    out = bytearray()
    for ch in text:
        b = _BYTE_DEC.get(ch)
        if b is None:
            out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
        else:
            out.append(b)
    return bytes(out)


def _split_keep(rx, text: str):
    """Matches of rx and the gaps between them, in order (llama.cpp's unicode_regex_split_stl)."""
    pos = 0
    for m in rx.finditer(text):
        a, b = m.span()
        if a > pos:
            yield text[pos:a]
        if b > a:
            yield text[a:b]
        pos = b
    if pos < len(text):
        yield text[pos:]


def _detect_roles(md: dict, ids: dict[str, int], attrs: list[int], bos_default: int = 11,
                  eos_default: int = 11) -> tuple[dict, frozenset]:
    """Role ids (bos, eos, eot, fim_...) and the end-of-generation set, as llama_vocab::impl::load
    finds them: metadata first, else by token text; tokens found by text become CONTROL.
    The defaults are llama.cpp's per vocabulary type (BPE: 11 and 11, SPM: 1 and 2)."""
    n = len(attrs)

    def meta_id(*keys, default=None):
        for key in keys:
            v = md.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(v, int) and 0 <= v < n:
                return v
        return default if default is not None and default < n else None

    roles = {"bos": meta_id("bos", default=bos_default), "eos": meta_id("eos", default=eos_default)}
    eog = set()
    for keys, texts, is_eog in _ROLES:
        rid = meta_id(*keys)
        if rid is None:
            found = [ids[t] for t in texts if t in ids]
            rid = min(found) if found else None
            if rid is not None:
                attrs[rid] |= CONTROL
        roles[keys[0]] = rid
        if is_eog and rid is not None:
            eog.add(rid)
    for tid in (ids[t] for t in _EOG_TEXTS if t in ids):
        eog.add(tid)
        attrs[tid] |= CONTROL
    eog.update(r for r in (roles["eos"], roles["eot"], roles["eom"]) if r is not None)
    return roles, frozenset(eog)


def _shown(v) -> str:
    """A metadata value fit for a one-line message."""
    return repr(v[:80]) if isinstance(v, str) else (repr(v) if v is None else f"(a {type(v).__name__})")


def _fail(source: str, msg: str) -> EngineError:
    return EngineError(f"{source}: {msg}" if source else msg)


def _check_strings(key: str, arr, source: str) -> None:
    if not isinstance(arr, list) or not all(map(str.__instancecheck__, arr)):
        raise _fail(source, f"tokenizer.ggml.{key} is not an array of strings")


def _token_ids(tokens: list[str], source: str) -> dict[str, int]:
    """Token text -> id; a duplicated text is an error, as in llama.cpp."""
    ids = dict(zip(tokens, range(len(tokens))))
    if len(ids) != len(tokens):
        raise _fail(source, "duplicate token text in the vocabulary")
    return ids


def _token_attrs(md: dict, n: int, source: str) -> list[int]:
    """Per-token llama_token_attr bits from `tokenizer.ggml.token_type` (all NORMAL without it)."""
    types = md.get("tokenizer.ggml.token_type")
    if types is not None and not (isinstance(types, np.ndarray) and types.dtype.kind in "iu"
                                  and types.ndim == 1 and len(types) == n):
        raise _fail(source, f"tokenizer.ggml.token_type is not an array of {n} integers "
                            "(one per token)")
    if types is None:
        return [NORMAL] * n
    table = np.array(_TYPE_ATTR + (0,), dtype=np.int64)  # any other type: no attribute
    return table[np.where((types >= 0) & (types < len(_TYPE_ATTR)), types, len(_TYPE_ATTR))].tolist()


def _flag(md: dict, key: str, default: bool, source: str) -> bool:
    v = md.get(key, default)
    if not isinstance(v, (bool, int)):
        raise _fail(source, f"{key} is not a boolean")
    return bool(v)


def _chat_template(md: dict, source: str) -> str | None:
    template = md.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise _fail(source, "tokenizer.chat_template is not a string")
    return template


class StreamDecoder:
    """Token ids in, text out; a UTF-8 sequence split across tokens is held back until complete."""

    def __init__(self, tokenizer: "TokenizerBase", special: bool = True):
        self._tok, self._special = tokenizer, special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly empty)."""
        return self._utf8.decode(self._tok.token_bytes(token_id, self._special))

    def flush(self) -> str:
        """Whatever is held back, with an incomplete sequence as U+FFFD."""
        return self._utf8.decode(b"", final=True)


class TokenizerBase:
    """What every GGUF tokenizer model shares: token attributes and roles, the special-token
    partition, BOS/EOS, pieces and (streaming) decoding, the chat template.

    A model implements `_encode_fragments` (the text between special tokens) and
    `_normal_piece` (the bytes of a NORMAL token); `from_metadata` picks the model."""

    def __init__(self, tokens: list[str], ids: dict[str, int], attrs: list[int], roles: dict,
                 eog_ids: frozenset, add_bos: bool, chat_template: str | None, source: str = "",
                 add_eos: bool = False):
        self._tokens, self._ids, self._attrs, self.n_vocab = tokens, ids, attrs, len(tokens)
        self.bos_id, self.eos_id, self.eog_ids = roles["bos"], roles["eos"], eog_ids
        self.add_bos, self.add_eos = add_bos, add_eos
        self._template_src, self._template, self._source = chat_template, None, source
        flagged = np.flatnonzero(np.array(attrs, dtype=np.int64) & (CONTROL | USER_DEFINED | UNKNOWN)).tolist()
        special = sorted((i for i in flagged if tokens[i]), key=lambda i: -len(tokens[i].encode("utf-8")))
        self._specials_all = [(i, tokens[i]) for i in special]
        self._specials_user = [(i, tokens[i]) for i in special if not attrs[i] & (CONTROL | UNKNOWN)]
        self._pieces: dict[int, bytes] = {}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, md: dict, source: str = "") -> "TokenizerBase":
        """Build the tokenizer `tokenizer.ggml.model` names from a GGUF metadata dict ("gpt2":
        `Tokenizer`, "llama": `SpmTokenizer`); EngineError for a model not implemented here."""
        model = md.get("tokenizer.ggml.model")
        if isinstance(model, str) and model == "gpt2":
            return Tokenizer._build(md, source)
        if isinstance(model, str) and model == "llama":
            from engine.tokenizer_spm import SpmTokenizer
            return SpmTokenizer._build(md, source)
        raise _fail(source, f"unsupported tokenizer model {_shown(model)} (supported: 'gpt2', 'llama')")

    # -- encoding ------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = False, add_special: bool = False) -> list[int]:
        """Token ids of text. parse_special: control-token texts become their ids. add_special:
        BOS first and EOS last where the model adds them (llama_tokenize's add_special); off by
        default, so no BOS is added."""
        if failpoints.active("tokenizer.no_special"):
            parse_special = False
        out: list[int] = []
        if add_special and self.add_bos and self.bos_id is not None:
            out.append(self.bos_id)
        self._encode_fragments(self._partition(text, parse_special), out)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _encode_fragments(self, frags: list, out: list[int]) -> None:
        """Append the ids of the partitioned text (ints are special-token ids, str raw text)."""
        raise NotImplementedError

    def _partition(self, text: str, parse_special: bool) -> list:
        """Split out special tokens, longest text first (llama.cpp's tokenizer_st_partition).

        User-defined tokens are matched even when parse_special is false, as llama.cpp does."""
        frags = [text] if text else []
        for tid, tok in self._specials_all if parse_special else self._specials_user:
            new = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                for k, part in enumerate(f.split(tok)):
                    if k:
                        new.append(tid)
                    if part:
                        new.append(part)
            frags = new
        return frags

    # -- decoding ------------------------------------------------------------------------
    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """Raw bytes of a token's piece (may be a partial UTF-8 sequence); control and unknown
        tokens render their text only if special (llama_token_to_piece)."""
        if not 0 <= token_id < self.n_vocab:
            raise EngineError(f"token id {token_id} is out of range [0, {self.n_vocab})")
        attr = self._attrs[token_id]
        if attr & (CONTROL | UNKNOWN) and not special:
            return b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id, attr)
        return piece

    def _piece(self, token_id: int, attr: int) -> bytes:
        text = self._tokens[token_id]
        if attr & (CONTROL | UNKNOWN | USER_DEFINED):
            return text.encode("utf-8")
        if attr & NORMAL:
            return self._normal_piece(text)
        if attr & BYTE:  # "<0xHH>"; any other text of a BYTE token is taken as it is
            m = _BYTE_TOKEN.fullmatch(text)
            return bytes([int(m[1], 16)]) if m else text.encode("utf-8")
        return b""  # unused / undefined tokens have no text

    def _normal_piece(self, text: str) -> bytes:
        raise NotImplementedError

    def decode(self, ids, special: bool = True) -> str:
        """Text of ids: piece bytes joined, decoded as UTF-8 with replacement."""
        return b"".join(self.token_bytes(int(i), special) for i in ids).decode("utf-8", "replace")

    def stream_decoder(self, special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, special)

    # -- chat ----------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The model's chat template (ChatML if it has none) rendered in jinja2's sandbox, as HF does."""
        try:
            with _template_limits():
                if self._template is None:
                    self._template = _jinja_env().from_string(self._template_src or _CHATML)
                out = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id))
        except MemoryError:
            raise _fail(self._source, "chat template error: it needs too much memory") from None
        except Exception as e:  # any failure inside an untrusted template
            msg = " ".join(str(e).split())[:200] or type(e).__name__
            raise _fail(self._source, f"chat template error: {msg}") from None
        if len(out) > TEMPLATE_MAX_LEN:
            raise _fail(self._source, f"chat template error: output of {len(out)} characters is too long")
        return out

    def _text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokens[token_id]


class Tokenizer(TokenizerBase):
    """A llama.cpp-compatible gpt2 (byte-level BPE) tokenizer built from GGUF metadata."""

    def __init__(self, tokens: list[str], ids: dict[str, int], attrs: list[int], merges: list[str],
                 pre: tuple, roles: dict, eog_ids: frozenset, add_bos: bool, chat_template: str | None,
                 source: str = ""):
        super().__init__(tokens, ids, attrs, roles, eog_ids, add_bos, chat_template, source)
        # llama.cpp keeps the first rank of a duplicated merge; keys are "left right"
        self._ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
        if failpoints.active("tokenizer.merge_order"):
            self._ranks = {k: -r for k, r in self._ranks.items()}
        regexes, self._ignore_merges, _ = pre
        self._regexes = [regex.compile(r) for r in regexes]
        self._word_cache: dict[str, list[int]] = {}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def _build(cls, md: dict, source: str = "") -> "Tokenizer":
        """The gpt2 tokenizer of a GGUF metadata dict (`tokenizer.ggml.model` already checked)."""
        pre_name = md.get("tokenizer.ggml.pre")
        pre_name = "default" if pre_name is None or (isinstance(pre_name, str) and not pre_name) else pre_name
        if not isinstance(pre_name, str) or pre_name not in _PRE:
            raise _fail(source, f"unknown pre-tokenizer {_shown(pre_name)} (supported: {', '.join(sorted(_PRE))})")
        tokens, merges = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.merges")
        if tokens is None or merges is None or (isinstance(tokens, list) and not tokens):
            raise _fail(source, "tokenizer vocabulary or merges missing from the metadata")
        for key, arr in (("tokens", tokens), ("merges", merges)):
            _check_strings(key, arr, source)
        ids = _token_ids(tokens, source)
        attrs = _token_attrs(md, len(tokens), source)
        roles, eog = _detect_roles(md, ids, attrs)
        pre = _PRE[pre_name]
        add_bos = _flag(md, "tokenizer.ggml.add_bos_token", pre[2], source)
        template = _chat_template(md, source)
        tok = cls(tokens, ids, attrs, merges, pre, roles, eog, add_bos, template, source)
        add_eos = md.get("tokenizer.ggml.add_eos_token")  # only used by encode(add_special=True)
        tok.add_eos = isinstance(add_eos, (bool, int)) and bool(add_eos)
        return tok

    # -- encoding ------------------------------------------------------------------------
    def _encode_fragments(self, frags: list, out: list[int]) -> None:
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
            else:
                for word in self._pre_split(frag):
                    ids = self._word_cache.get(word)
                    if ids is None:
                        if len(self._word_cache) > 200_000:
                            self._word_cache.clear()
                        ids = self._word_cache[word] = self._bpe(_byte_encode(word))
                    out.extend(ids)

    def _pre_split(self, text: str) -> list[str]:
        """Pre-tokenizer words: each regex splits every piece left by the previous ones."""
        pieces = [text]
        for rx in self._regexes:
            pieces = [w for p in pieces for w in _split_keep(rx, p)]
        return pieces

    def _bpe(self, word: str) -> list[int]:
        """BPE of one byte-encoded word: merge the lowest-rank (then leftmost) pair until none is left."""
        if len(word) == 1 or (self._ignore_merges and word in self._ids):
            return self._symbols_to_ids([word])
        syms = list(word)
        nxt = list(range(1, len(syms) + 1))
        nxt[-1] = -1
        prv = list(range(-1, len(syms) - 1))
        ranks = self._ranks
        heap = []

        def add(left: int, right: int) -> None:
            rank = ranks.get(syms[left] + " " + syms[right])
            if rank is not None:
                heapq.heappush(heap, (rank, left, right, syms[left] + syms[right]))

        for i in range(len(syms) - 1):
            add(i, i + 1)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or a + b != merged:
                continue  # stale: one side was merged since this pair was queued
            syms[left], syms[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            if prv[left] >= 0:
                add(prv[left], left)
            if nxt[left] >= 0:
                add(left, nxt[left])
        return self._symbols_to_ids([s for s in syms if s])

    def _symbols_to_ids(self, syms: list[str]) -> list[int]:
        """Token ids of final BPE symbols; a symbol missing from the vocabulary falls back to
        its single ASCII bytes, as llama.cpp does."""
        out = []
        for s in syms:
            tid = self._ids.get(s)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._ids[chr(b)] for b in s.encode("utf-8") if b < 0x80 and chr(b) in self._ids)
        return out

    # -- decoding ------------------------------------------------------------------------
    def _normal_piece(self, text: str) -> bytes:
        return _byte_decode(text)


# A chat template is untrusted code: bound what one rendering may cost.
TEMPLATE_SECONDS = 5.0          # wall time (main thread only: enforced with SIGALRM)
TEMPLATE_MAX_LEN = 1 << 20      # characters in the result, and in any string or list it builds
TEMPLATE_MEMORY = 1 << 30       # extra address space while rendering (RLIMIT_AS)


class TemplateLimit(Exception):
    pass


@contextlib.contextmanager
def _template_limits():
    """Wall-time and address-space limits around a rendering; both are restored afterwards."""
    import resource
    import signal
    import threading
    import time
    main = threading.current_thread() is threading.main_thread()
    old_handler = old_timer = None
    if main:
        def on_alarm(signum, frame):
            raise TemplateLimit(f"rendering took more than {TEMPLATE_SECONDS:g} s")
        t0 = time.monotonic()
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        old_timer = signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * resource.getpagesize()
        cap = vm + TEMPLATE_MEMORY
        if old_as[0] == resource.RLIM_INFINITY or old_as[0] > cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, old_as[1]))
        else:
            old_as = None
    except (OSError, ValueError):
        old_as = None
    try:
        yield
    finally:
        if old_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_as)
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_timer[0] > 0:  # re-arm an outer timer with what is left of it
                signal.setitimer(signal.ITIMER_REAL, max(old_timer[0] - (time.monotonic() - t0), 1e-3),
                                 old_timer[1])


def _jinja_env():
    """An immutable sandbox with the helpers HF transformers gives chat templates."""
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def size(x):
        return len(x) if isinstance(x, (str, list, tuple)) else None

    class Env(ImmutableSandboxedEnvironment):
        """Refuses the one-operator memory bombs: 'x' * 10**10, 2 ** 10**9, doubling a string."""
        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if size(seq) is not None and isinstance(n, int) and size(seq) * n > TEMPLATE_MAX_LEN:
                        raise SecurityError(f"repetition to {size(seq) * n} items is too long")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and abs(right) > 1024:
                    raise SecurityError(f"exponent {right} is too large")
            elif operator == "+" and size(left) is not None and size(right) is not None:
                if size(left) + size(right) > TEMPLATE_MAX_LEN:
                    raise SecurityError("concatenation is too long")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
