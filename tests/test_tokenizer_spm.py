"""SPM ("llama") tokenizer: a synthetic vocabulary pinning llama.cpp's merge order, tie-breaking and
byte fallback (no download), and Gemma 3 270M against llama.cpp (llama-cpp-python, vocab_only) on
a seeded fuzz set: ids with and without parse_special, pieces, detokenized text, round trips.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import random
import time

import numpy as np
import pytest

from engine.errors import EngineError
from engine.tokenizer import Tokenizer, TokenizerBase
from engine.tokenizer_spm import SpmTokenizer
from tests.conftest import model_file

GEMMA = "gemma3-270m-q4_k_m"
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed "
                                 "(optional extra: pip install '.[llamacpp]')")

# -- a synthetic vocabulary: no model file needed ---------------------------------------------
# (text, score, GGUF token type); 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
SYN_HEAD = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<start_of_turn>", 0.0, 3), ("<tool>", 0.0, 4)]
SYN_PIECES = [
    ("▁", -1.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("d", -1.0), ("y", -1.0), ("z", -1.0),
    ("ab", -2.0), ("bc", -2.0),        # equal scores: the leftmost pair merges first
    ("cd", -1.5),                      # a higher score beats position
    ("abcd", -0.5),                    # only reachable through "ab" + "cd"; no "bcd"
    ("xyz", -0.1),                     # no "xy" / "yz": never formed; "x" falls back to a byte
    ("▁a", -1.2), ("▁ab", -1.1), ("▁▁", -1.3),
]


def syn_vocab():
    tokens = [t for t, _, _ in SYN_HEAD] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in SYN_PIECES]
    scores = [s for _, s, _ in SYN_HEAD] + [0.0] * 256 + [s for _, s in SYN_PIECES]
    types = [k for _, _, k in SYN_HEAD] + [6] * 256 + [1] * len(SYN_PIECES)
    return tokens, scores, types


def syn_md(**extra) -> dict:
    tokens, scores, types = syn_vocab()
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
          "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    md.update(extra)
    return {k: v for k, v in md.items() if v is not None}


@functools.lru_cache(maxsize=None)
def syn(space_prefix: bool = True) -> SpmTokenizer:
    return Tokenizer.from_metadata(syn_md(**{"tokenizer.ggml.add_space_prefix": space_prefix}), source="syn.gguf")


def pieces(tok, ids):
    return [tok._tokens[i] for i in ids]


# (text, pieces without a space prefix, pieces with it)
SYN_CASES = [
    ("abc", ["ab", "c"], ["▁ab", "c"]),                    # tie ab/bc: leftmost
    ("bcd", ["b", "cd"], ["▁", "b", "cd"]),                # cd outscores bc
    ("abcd", ["abcd"], ["▁ab", "cd"]),                     # ab + cd -> abcd; "▁ab" wins first with the prefix
    ("bcbc", ["bc", "bc"], ["▁", "bc", "bc"]),
    ("xyz", ["<0x78>", "y", "z"], ["▁", "<0x78>", "y", "z"]),  # no intermediate token: no merge
    ("é中", ["<0xC3>", "<0xA9>", "<0xE4>", "<0xB8>", "<0xAD>"], ["▁", "<0xC3>", "<0xA9>", "<0xE4>", "<0xB8>", "<0xAD>"]),
    ("a  b", ["a", "▁▁", "b"], ["▁a", "▁▁", "b"]),
    ("a<tool>ab", ["a", "<tool>", "ab"], ["▁a", "<tool>", "▁ab"]),   # user-defined: matched, then prefixed
    ("ab</s>ab", ["ab", "<0x3C>", "<0x2F>", "<0x73>", "<0x3E>", "ab"],
     ["▁ab", "<0x3C>", "<0x2F>", "<0x73>", "<0x3E>", "ab"]),         # control text is plain text here
    ("▁a", ["▁a"], ["▁", "▁a"]),                           # a literal U+2581 in the input
]


@pytest.mark.parametrize("text,plain,prefixed", SYN_CASES, ids=[f"syn{i}" for i in range(len(SYN_CASES))])
def test_synthetic_merges_ties_and_bytes(text, plain, prefixed):
    assert pieces(syn(False), syn(False).encode(text)) == plain
    assert pieces(syn(True), syn(True).encode(text)) == prefixed


def test_synthetic_specials_bos_eos_and_prefix_after_specials():
    tok = syn(True)
    assert isinstance(tok, TokenizerBase) and tok.add_bos and not tok.add_eos
    assert tok.encode("") == [] and tok.encode("", add_special=True) == [1]
    ids = tok.encode("<start_of_turn>ab</s>", parse_special=True, add_special=True)
    assert pieces(tok, ids) == ["<s>", "<start_of_turn>", "▁ab", "</s>"]
    eos = Tokenizer.from_metadata(syn_md(**{"tokenizer.ggml.add_eos_token": True,
                                             "tokenizer.ggml.add_bos_token": False}))
    assert pieces(eos, eos.encode("ab", add_special=True)) == ["▁ab", "</s>"]
    assert tok.eog_ids == {2} and (tok.bos_id, tok.eos_id) == (1, 2)


def test_synthetic_decode_and_stream():
    tok, plain = syn(True), syn(False)
    for t in (tok, plain):
        for text in ("abcd bc  a", "é中 xyz", " ab", "  a"):
            assert t.decode(t.encode(text)) == text
    assert plain.decode(plain.encode("a<tool>b")) == "a<tool>b"
    assert tok.decode(tok.encode("a<tool>b")) == "a<tool> b"  # the prefix after a special stays, as in llama.cpp
    ids = tok.encode("é中")
    assert tok.token_bytes(ids[0]) == b" " and tok.token_bytes(ids[1]) == b"\xc3"
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in ids] == [" ", "", "é", "", "", "中"] and dec.flush() == ""
    assert tok.decode([1, 3], special=False) == "" and tok.decode([1, 3]) == "<s><start_of_turn>"
    assert tok.token_bytes(4, special=False) == b"<tool>"


def test_synthetic_defaults_follow_llamacpp():
    tok = Tokenizer.from_metadata(syn_md(**{"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None,
                                             "tokenizer.ggml.scores": None}))
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (1, 2, True, True)
    # without scores every pair ties: plain leftmost-first merging
    assert pieces(tok, tok.encode("bcd")) == ["▁", "bc", "d"]


@pytest.mark.parametrize("extra,words", [
    ({"tokenizer.ggml.scores": np.zeros(3, np.float32)}, "tokenizer.ggml.scores is not an array of"),
    ({"tokenizer.ggml.scores": ["x"]}, "tokenizer.ggml.scores is not an array of"),
    ({"tokenizer.ggml.tokens": None}, "tokenizer vocabulary missing"),
    ({"tokenizer.ggml.tokens": ["a", "a"], "tokenizer.ggml.scores": None, "tokenizer.ggml.token_type": None},
     "duplicate token text"),
    ({"tokenizer.ggml.token_type": np.zeros(2, np.int32)}, "tokenizer.ggml.token_type is not an array"),
    ({"tokenizer.ggml.add_space_prefix": "yes"}, "tokenizer.ggml.add_space_prefix is not a boolean"),
    ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert' (supported: 'gpt2', 'llama')"),
])
def test_synthetic_bad_metadata_is_one_line_error(extra, words):
    with pytest.raises(EngineError) as err:
        Tokenizer.from_metadata(syn_md(**extra), source="bad.gguf")
    msg = str(err.value)
    assert msg.startswith("bad.gguf: ") and words in msg and "\n" not in msg


def test_synthetic_missing_byte_token_is_an_error():
    tokens, scores, types = syn_vocab()
    keep = [i for i, t in enumerate(tokens) if t != "<0x78>"]
    md = syn_md(**{"tokenizer.ggml.tokens": [tokens[i] for i in keep],
                   "tokenizer.ggml.scores": np.array([scores[i] for i in keep], np.float32),
                   "tokenizer.ggml.token_type": np.array([types[i] for i in keep], np.int32)})
    tok = Tokenizer.from_metadata(md, source="nobyte.gguf")
    assert pieces(tok, tok.encode("ab")) == ["▁ab"]
    with pytest.raises(EngineError, match=r"^nobyte\.gguf: the vocabulary has no byte token <0x78>"):
        tok.encode("x")


def _write_vocab_gguf(path, space_prefix: bool):
    """The synthetic vocabulary as a vocab-only llama GGUF llama.cpp can load."""
    from gguf import GGUFWriter
    tokens, scores, types = syn_vocab()
    w = GGUFWriter(str(path), "llama")
    for k, v in {"block_count": 1, "context_length": 64, "embedding_length": 64, "feed_forward_length": 128,
                 "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@needs_llama
@pytest.mark.parametrize("space_prefix", [False, True])
def test_synthetic_cases_match_llamacpp(tmp_path, space_prefix):
    """The pinned synthetic expectations are llama.cpp's own."""
    import llama_cpp
    path = _write_vocab_gguf(tmp_path / "syn.gguf", space_prefix)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        tok = syn(space_prefix)
        extra = ["<start_of_turn>ab</s>", "abcabc", " a b  c ", "zyx", "", " "]
        for text in [c[0] for c in SYN_CASES] + extra:
            for special in (False, True):
                for bos in (False, True):
                    ref = llm.tokenize(text.encode(), add_bos=bos, special=special)
                    assert tok.encode(text, special, bos) == ref, (text, special, bos)
    finally:
        llm.close()


# -- Gemma 3 270M against llama.cpp --------------------------------------------------------
@functools.lru_cache(maxsize=None)
def gemma() -> SpmTokenizer:
    from engine.gguf_reader import GGUFFile
    path = model_file(GEMMA)
    return Tokenizer.from_metadata(GGUFFile(path).metadata, source=str(path))


@pytest.fixture(scope="module")
def gemma_llama():
    """llama.cpp's tokenizer of the same file (vocab only), closed at the end."""
    import llama_cpp
    llm = llama_cpp.Llama(str(model_file(GEMMA)), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def ref_detokenize(llm, ids, special: bool) -> bytes:
    """llama_detokenize (remove_special false) with a buffer large enough for any piece."""
    import llama_cpp
    arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, False, special)
    assert n >= 0
    return buf.raw[:n]


def ref_piece(llm, tid: int, special: bool) -> bytes:
    import llama_cpp
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, tid, buf, 256, 0, special)
    assert n >= 0
    return buf.raw[:n]


WORDS = ("the", "quick", "brown", "fox", "Hello", "world", "don't", "it's", "GGUF", "tokenizer", "llama", "naïve",
         "café", "São", "Zürich", "Ελληνικά", "русский", "日本語", "中文", "한국어", "print(x)", "a_b", "x=1;",
         "<b>", "</s>", "<s>", "<td>", "[multimodal]", "https://example.com/a?b=c", "▁", "▁▁x", "<0x41>", "ÿ")
SPECIAL_TEXTS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused7>",
                 "<start_of_image>", "<end_of_image>", "<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n")
SPACES = (" ", "  ", "   ", "     ", "\n", "\n\n", "\t", "\t\t", " \n", "\r\n", "\n \n", " \t ", "\u3000", "\u00a0")
PUNCT = ".,;:!?-–—…'\"()[]{}<>/\\|@#$%^&*+=~`_"
EMOJI = ("👍", "👍🏽", "🇺🇸", "👨\u200d👩\u200d👧", "😀", "🧿", "❤️", "🤖", "🫠", "🪿")


def _rare(rng: random.Random) -> str:
    """Code points unlikely to be pieces: byte fallback (unassigned, private use, rare planes, controls)."""
    lo, hi = rng.choice([(0x0378, 0x0379), (0xE000, 0xF8FF), (0x10000, 0x1FFFF), (0x20000, 0x2FFFF),
                         (0xF0000, 0xF00FF), (0x01, 0x1F), (0x7F, 0x9F), (0x0300, 0x036F), (0x2580, 0x259F)])
    return chr(rng.randint(lo, hi))


def _piece(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.28:
        w = rng.choice(WORDS)
        return w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w
    if k < 0.45:
        return rng.choice(SPACES)
    if k < 0.53:
        return str(rng.randint(0, 10 ** rng.randint(1, 8)))
    if k < 0.62:
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 3)))
    if k < 0.70:
        return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 4)))
    if k < 0.76:
        return rng.choice(EMOJI)
    if k < 0.82:
        return rng.choice("àáâãäåæçèéêëìíîïñòóôõöøùúûüýþßœšžł") + rng.choice(("", "\u0301", "\u0308"))
    if k < 0.90:
        return _rare(rng)
    return rng.choice(SPECIAL_TEXTS)


def fuzz_texts(n: int = 400, seed: int = 20261201) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(_piece(rng) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.2:
            s = " " * rng.randint(1, 3) + s
        if rng.random() < 0.2:
            s += rng.choice(SPACES)
        out.append(s)
    return out


FUZZ = fuzz_texts()


@needs_llama
@pytest.mark.model
@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
def test_gemma_fuzz_ids_match_llamacpp(gemma_llama, special):
    tok, llm = gemma(), gemma_llama
    bad = []
    for text in FUZZ:
        for bos in (False, True):
            ours = tok.encode(text, parse_special=special, add_special=bos)
            ref = llm.tokenize(text.encode("utf-8"), add_bos=bos, special=special)
            if ours != ref:
                bad.append((text, bos, ours, ref))
    assert not bad, f"{len(bad)} of {2 * len(FUZZ)} differ; first: {bad[0]!r}"


@needs_llama
@pytest.mark.model
@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
def test_gemma_fuzz_decode_matches_llamacpp(gemma_llama, special):
    """decode == llama_detokenize on the fuzz ids; it round-trips wherever llama.cpp's does, which
    is every text without a literal U+2581 (that one comes back as a space)."""
    tok, llm = gemma(), gemma_llama
    for text in FUZZ:
        ids = tok.encode(text, parse_special=special)
        ref = ref_detokenize(llm, ids, True).decode("utf-8", "replace")
        assert tok.decode(ids) == ref, text
        assert (ref == text) == ("\u2581" not in text), text
        if ref == text:
            assert tok.decode(ids) == text
        dec = tok.stream_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)


@needs_llama
@pytest.mark.model
def test_gemma_pieces_roles_and_eog_match_llamacpp(gemma_llama):
    import llama_cpp
    tok, llm = gemma(), gemma_llama
    vocab = llm._model.vocab
    rng = random.Random(7)
    sample = sorted(set(range(300)) | set(rng.sample(range(tok.n_vocab), 3000)) | {tok.n_vocab - 1})
    for tid in sample:
        for special in (False, True):
            assert tok.token_bytes(tid, special) == ref_piece(llm, tid, special), (tid, special)
    ref_eog = {i for i in range(tok.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert set(tok.eog_ids) == ref_eog
    assert (tok.bos_id, tok.eos_id) == (llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab))
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)


@pytest.mark.model
def test_gemma_vocab_loads_fast():
    """Building the 262k-token tokenizer from the metadata (not the GGUF parse) stays well under a second."""
    from engine.gguf_reader import GGUFFile
    md = GGUFFile(model_file(GEMMA)).metadata
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        tok = Tokenizer.from_metadata(md)
        best = min(best, time.perf_counter() - t0)
    assert isinstance(tok, SpmTokenizer) and tok.n_vocab == 262144
    assert best < 1.0, f"building the Gemma tokenizer took {best:.2f} s"


@pytest.mark.model
def test_gemma_encode_speed():
    tok = gemma()
    text = " ".join(FUZZ[:200]) + ("中文分词测试：今天天气很好。" * 20) + (" Привет, мир!" * 20)
    t0 = time.perf_counter()
    ids = tok.encode(text, parse_special=True)
    assert len(ids) > 2000 and time.perf_counter() - t0 < 1.0


@needs_llama
@pytest.mark.model
def test_cli_tokenize_prints_llama_tokenize_ids(gemma_llama):
    from tests.test_model_errors import run_cli
    text = "<start_of_turn>user\nHello,  world! 中文 🇺🇸<end_of_turn>"
    llm = gemma_llama
    for flags, special in (((), False), (("--special",), True)):
        res = run_cli("tokenize", GEMMA, text, "--no-escape", *flags)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == llm.tokenize(text.encode(), add_bos=True, special=special)
