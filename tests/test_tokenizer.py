"""Tokenizer: ids and pieces against llama.cpp 0.3.36, streaming decode, chat templates, errors.

Reference cases come from ../shared/reference (skipped when absent). The edge-case ids below
were produced with llama.cpp 0.3.36 (llama-cpp-python, vocab_only) on the same GGUF files. The
synthetic-vocabulary tests need no model file.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import pytest

import engine.tokenizer as tokenizer_module
from engine.errors import EngineError
from engine.tokenizer import Tokenizer, _BYTE_ENC
from tests.conftest import MODEL_KEYS, load_reference, model_file

QWEN, SMOL = "qwen2.5-coder-1.5b-q4_k_m", "smollm2-135m-q4_1"


@functools.lru_cache(maxsize=None)
def real_tokenizer(key: str) -> Tokenizer:
    from engine.gguf_reader import GGUFFile
    path = model_file(key)
    return Tokenizer.from_metadata(GGUFFile(path).metadata, source=str(path))


def _params(name: str, pick):
    """One param per reference case of every model; a skipping placeholder when the data is absent."""
    out = []
    for key in MODEL_KEYS:
        try:
            cases = pick(load_reference(key, name))
        except BaseException:  # pytest.skip inside load_reference: reference absent
            out.append(pytest.param(key, None, id=f"{key}-noref"))
            continue
        out += [pytest.param(key, c, id=f"{key}-{i}") for i, c in enumerate(cases)]
    return out


def _need(case):
    if case is None:
        pytest.skip("llama.cpp reference data not found")


# -- llama.cpp reference data ----------------------------------------------------------------
@pytest.mark.model
@pytest.mark.parametrize("key,case", _params("tokenize.json", lambda d: d))
def test_tokenize_matches_llamacpp(key, case):
    _need(case)
    tok = real_tokenizer(key)
    special = case["parse_special"]
    assert tok.encode(case["text"], parse_special=special) == case["ids"]
    assert [tok.token_bytes(i, special).hex() for i in case["ids"]] == case["pieces_hex"]
    assert tok.decode(case["ids"], special) == case["text"]


@pytest.mark.model
@pytest.mark.parametrize("key,case", _params("generate.json", lambda d: d["cases"]))
def test_generate_prompt_ids_match_llamacpp(key, case):
    _need(case)
    assert real_tokenizer(key).encode(case["prompt"], parse_special=True) == case["prompt_ids"]


@pytest.mark.model
def test_chat_template_matches_reference():
    chat = load_reference(QWEN, "chat.json")
    tok = real_tokenizer(QWEN)
    text = tok.render_chat([{"role": "user", "content": chat["question"]}])
    assert text == chat["rendered_prompt"]
    assert tok.encode(text, parse_special=True) == chat["prompt_ids"]


@pytest.mark.model
@pytest.mark.parametrize("key", MODEL_KEYS)
def test_eog_ids_match_llamacpp(key):
    expected = load_reference(None, "meta.json")["models"][key]["eog_ids"]
    assert sorted(real_tokenizer(key).eog_ids) == expected


# -- unicode edge cases (ids from llama.cpp 0.3.36) ------------------------------------------
EDGE = [  # (text, Qwen2.5 ids, SmolLM2 ids), the same with and without parse_special
    ("don't stop, it's O'Neil's DON'T",
     [15007, 944, 2936, 11, 432, 594, 506, 6, 61940, 594, 44273, 17323],
     [12420, 982, 2853, 28, 357, 506, 492, 23, 47917, 506, 422, 2154, 23, 68]),
    ("👍🏽 and 🇺🇸 and 👨\u200d👩\u200d👧!",
     [144349, 145375, 323, 11162, 229, 118, 145383, 323, 61804, 101, 378, 235, 145233, 378, 235, 145665, 0],
     [10813, 235, 231, 10813, 233, 138, 284, 15107, 225, 135, 10813, 225, 133, 284, 15107, 235, 118, 321, 231,
      10813, 235, 119, 321, 231, 10813, 235, 117, 17]),
    ("e\u0301te\u0301 na\u0308ive",  # combining marks
     [68, 53839, 665, 53839, 4317, 136, 230, 533], [85, 151, 219, 676, 151, 219, 15486, 151, 226, 404]),
    ("12345 67890 3.14",
     [16, 17, 18, 19, 20, 220, 21, 22, 23, 24, 15, 220, 18, 13, 16, 19],
     [33, 34, 35, 36, 37, 216, 38, 39, 40, 41, 32, 216, 35, 30, 33, 36]),
    ("a  b   c\t\t d    \n  e",
     [64, 220, 293, 256, 272, 298, 294, 1066, 220, 384], [81, 216, 278, 256, 265, 1656, 287, 289, 3805, 297]),
    ("line1\r\nline2\r\n\r\nend", [1056, 16, 319, 1056, 17, 871, 408], [1311, 33, 201, 198, 1311, 34, 7209, 198, 486]),
    ('<tool_call>{"a": 1}</tool_call>',  # Qwen's user-defined tokens match even without parse_special
     [151657, 4913, 64, 788, 220, 16, 92, 151658],
     [44, 19324, 79, 4350, 46, 39428, 81, 1799, 216, 33, 109, 9617, 19324, 79, 4350, 46]),
]


@pytest.mark.model
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("text,qwen_ids,smol_ids", EDGE, ids=[f"edge{i}" for i in range(len(EDGE))])
def test_unicode_edge_cases(text, qwen_ids, smol_ids, special):
    for key, expected in ((QWEN, qwen_ids), (SMOL, smol_ids)):
        tok = real_tokenizer(key)
        assert tok.encode(text, parse_special=special) == expected, key
        assert tok.decode(expected) == text


@pytest.mark.model
def test_non_control_eog_text_is_special_only_when_parsed():
    """Qwen's '</s>' is a NORMAL token that llama.cpp promotes to CONTROL (it is an EOG text)."""
    tok = real_tokenizer(QWEN)
    assert tok.encode("a</s>b", parse_special=False) == [64, 522, 82, 51407]
    assert tok.encode("a</s>b", parse_special=True) == [64, 128247, 65]
    assert tok.token_bytes(128247, special=False) == b""


@pytest.mark.model
def test_stream_decoder_holds_back_split_utf8():
    tok = real_tokenizer(QWEN)
    text = "👍🏽 and 🇺🇸 flags, 中文"
    ids = tok.encode(text)
    pieces = [tok.token_bytes(i) for i in ids]
    assert any(_incomplete(p) for p in pieces), "test text no longer splits a UTF-8 sequence"
    dec = tok.stream_decoder()
    outs = [dec.push(i) for i in ids]
    assert "".join(outs) + dec.flush() == text
    assert not any("\ufffd" in o for o in outs)


@pytest.mark.model
def test_encode_speed():
    """A fresh ~2.5k-token text (this repo's source plus CJK and Cyrillic) encodes well within a second."""
    tok = real_tokenizer(QWEN)
    text = (Path(tokenizer_module.__file__).read_text()[:8000] + "中文分词测试：今天天气很好，我们去公园散步吧。" * 20
            + " Привет, мир! Как дела? " * 20)
    tok._word_cache.clear()
    t0 = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - t0
    assert len(ids) > 2000 and elapsed < 1.0


def _incomplete(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# -- a synthetic vocabulary: no model file needed ---------------------------------------------
SPECIALS = [("<|im_start|>", 3), ("<|im_end|>", 3), ("<|endoftext|>", 3), ("<x>", 3), ("<x><y>", 3),
            ("<tool>", 4), ("</s>", 1)]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]


def synthetic_md(**extra) -> dict:
    tokens = [_BYTE_ENC[b] for b in range(256)] + ["he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    types = [1] * len(tokens)
    for text, ttype in SPECIALS:
        tokens.append(text)
        types.append(ttype)
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": MERGES,
          "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
          "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>")}
    md.update(extra)
    return md


@pytest.fixture(scope="module")
def syn() -> Tokenizer:
    return Tokenizer.from_metadata(synthetic_md(), source="synthetic.gguf")


def _id(tok: Tokenizer, text: str) -> int:
    return tok._ids[text]


def test_bpe_merges_by_rank(syn):
    assert syn.encode("hello") == [_id(syn, "hello")]
    assert syn.encode("hellx") == [_id(syn, "hell"), ord("x")]
    assert syn.encode("hello wo") == [_id(syn, "hello"), _id(syn, "Ġwo")]
    assert syn.encode("") == []


def test_special_tokens_parse(syn):
    text = "<|im_start|>hello<|im_end|>"
    assert syn.encode(text, parse_special=True) == [_id(syn, "<|im_start|>"), _id(syn, "hello"), _id(syn, "<|im_end|>")]
    assert _id(syn, "<|im_start|>") not in syn.encode(text, parse_special=False)
    # user-defined tokens are matched either way; the longest special text wins
    assert syn.encode("a<tool>b", parse_special=False) == [ord("a"), _id(syn, "<tool>"), ord("b")]
    assert syn.encode("<x><y><x>", parse_special=True) == [_id(syn, "<x><y>"), _id(syn, "<x>")]


def test_eog_and_roles(syn):
    assert syn.eog_ids == {_id(syn, t) for t in ("<|im_end|>", "<|endoftext|>", "</s>")}
    assert (syn.bos_id, syn.eos_id, syn.add_bos, syn.n_vocab) == (
        _id(syn, "<|endoftext|>"), _id(syn, "<|im_end|>"), False, 256 + 6 + len(SPECIALS))


def test_token_bytes_and_decode(syn):
    end = _id(syn, "<|im_end|>")
    assert syn.token_bytes(_id(syn, "Ġwo")) == b" wo"
    assert syn.token_bytes(end) == b"<|im_end|>" and syn.token_bytes(end, special=False) == b""
    assert syn.token_bytes(_id(syn, "<tool>"), special=False) == b"<tool>"
    assert syn.decode([_id(syn, "hello"), end], special=False) == "hello"
    with pytest.raises(EngineError):
        syn.token_bytes(syn.n_vocab)


def test_stream_decoder_split_sequence(syn):
    text = "é中😀"
    ids = syn.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # no merges: one byte per token
    dec = syn.stream_decoder()
    outs = [dec.push(i) for i in ids]
    assert outs == ["", "é", "", "", "中", "", "", "", "😀"]
    assert dec.flush() == ""
    dec.push(ids[2])  # first byte of 中 only
    assert dec.flush() == "\ufffd"


def test_chatml_fallback_and_variables():
    syn = Tokenizer.from_metadata(synthetic_md())
    assert syn.render_chat([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tpl = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"
    syn = Tokenizer.from_metadata(synthetic_md(**{"tokenizer.chat_template": tpl}))
    assert syn.render_chat([{"role": "user", "content": "hi"}]) == "<|endoftext|>hi<|im_end|>"


@pytest.mark.parametrize("tpl", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}",
    "{{ raise_exception('no system role') }}",
    "{% for %}",
])
def test_template_errors_are_engine_errors(tpl):
    syn = Tokenizer.from_metadata(synthetic_md(**{"tokenizer.chat_template": tpl}), source="evil.gguf")
    with pytest.raises(EngineError) as err:
        syn.render_chat([{"role": "user", "content": "hi"}])
    msg = str(err.value)
    assert msg.startswith("evil.gguf: chat template error") and "\n" not in msg


@pytest.mark.parametrize("extra,words", [
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert'"),
    ({"tokenizer.ggml.pre": "no-such-pre"}, "unknown pre-tokenizer 'no-such-pre'"),
    ({"tokenizer.ggml.merges": None}, "merges missing"),
])
def test_unsupported_tokenizers_raise(extra, words):
    with pytest.raises(EngineError) as err:
        Tokenizer.from_metadata(synthetic_md(**extra), source="bad.gguf")
    assert str(err.value).startswith("bad.gguf: ") and words in str(err.value)
