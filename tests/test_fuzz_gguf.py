"""Hostile GGUF files never crash, hang or blow up memory: a one-line EngineError, or a correct load.

Three sources of cases:
- hypothesis mutations of small synthetic models (F32 qwen2, Q8_0 llama): one header field set to an
  edge value, a cut at or near a section boundary, overwritten header or tensor bytes, or two of
  these at once. Derandomized, so CI runs the same examples every time; NUMGGUF_FUZZ_EXAMPLES
  raises the count (`python -m tests.gguf_fuzz` runs a long random session).
- the same mutations of the header of a real model (SmolLM2, when it is in the cache), with a
  sparse copy of its data section.
- a hand-made corpus (tests/gguf_corpus.py), each case with the message it must produce; a few
  of them also through the CLI in a subprocess (exit 2, one line, no traceback).
"""
from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import gguf_fuzz as fz
from tests.gguf_corpus import CORPUS, build_case
from tests.synthetic import write_tiny_model
from tests.test_model_errors import assert_one_line_error, run_cli

EXAMPLES = int(os.environ.get("NUMGGUF_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
OUTCOMES: dict[str, dict[str, int]] = {}   # target -> message template (or "load ok") -> count


def base_model(d: Path, arch: str = "qwen2", qtype=GGMLQuantizationType.F32) -> Path:
    """A small but complete model: 1 layer, dim 32, 2 heads (1 KV head), 266-token vocabulary."""
    return write_tiny_model(d / f"base-{arch}.gguf", arch=arch, qtype=qtype, n_layers=1, dim=32, ffn=64,
                            n_heads=2, n_kv=1)


def mutations(data: bytes, header_only: bool = False):
    """A strategy of mutated copies of a valid GGUF `data`."""
    lay = fz.layout(data)
    fields = lay.fields

    def edge(f: fz.Field):
        bits = 8 * f.size
        orig = int.from_bytes(data[f.offset:f.offset + f.size], "little")
        return st.one_of(st.sampled_from([v for v in fz.INTERESTING_U64 if v < 1 << bits]),
                         st.integers(0, (1 << bits) - 1),
                         st.integers(-64, 64).map(lambda d: orig + d))

    field_mut = st.sampled_from(fields).flatmap(
        lambda f: edge(f).map(lambda v, f=f: lambda b: fz.set_field(b, f, v)))
    cut = st.tuples(st.sampled_from(lay.boundaries), st.integers(-9, 9)).map(
        lambda t: lambda b: fz.truncate(b, t[0] + t[1]))
    header_bytes = st.tuples(st.integers(0, lay.data_start + 8), st.binary(min_size=1, max_size=8)).map(
        lambda t: lambda b: fz.overwrite(b, t[0], t[1]))
    muts = [field_mut, field_mut, cut, header_bytes]
    if not header_only:
        specials = st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\xff" * 4,
                                    b"\x00\x7c", b"\xff\x7f"])
        tensor_bytes = st.tuples(st.sampled_from(lay.tensor_starts), st.integers(0, 256), specials).map(
            lambda t: lambda b: fz.overwrite(b, t[0] + t[1], t[2] * 4))
        muts.append(tensor_bytes)
    one = st.one_of(*muts)
    return st.lists(one, min_size=1, max_size=2).map(lambda fs: _apply(data, fs))


def _apply(data: bytes, fs) -> bytes:
    for f in fs:
        data = f(data)
    return data


def check_bytes(data: bytes, path: Path, forward: bool = True, size: int | None = None) -> str | None:
    """Write data (sparse-extended to `size`) and run the property."""
    with open(path, "wb") as f:
        f.write(data)
        if size is not None and size > len(data):
            f.truncate(size)
    return fz.check(path, forward=forward)


def _record(target: str, msg: str | None, path: Path) -> None:
    key = "load ok" if msg is None else fz.template(msg, path)
    bucket = OUTCOMES.setdefault(target, {})
    bucket[key] = bucket.get(key, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Print how many examples ran and how many distinct messages they produced (see with -s)."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for target, seen in OUTCOMES.items():
        n = sum(seen.values())
        print(f"\nfuzz {target}: {n} examples, {len(seen) - ('load ok' in seen)} distinct error messages, "
              f"{seen.get('load ok', 0)} correct loads")
    every = set().union(*OUTCOMES.values()) - {"load ok"} if OUTCOMES else set()
    print(f"fuzz all targets: {sum(sum(v.values()) for v in OUTCOMES.values())} examples, "
          f"{len(every)} distinct error messages; peak RSS growth {(rss1 - rss0) / 1024:.0f} MiB")
    # a header never makes us allocate more than a sliver of memory (the forward is tiny)
    assert rss1 - rss0 < 512 * 1024, f"peak RSS grew by {(rss1 - rss0) // 1024} MiB while fuzzing"


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzbase")
    out = {"qwen2-f32": base_model(d), "llama-q8_0": base_model(d, "llama", GGMLQuantizationType.Q8_0)}
    for p in out.values():
        assert fz.check(p) is None  # the unmutated files load and run (and the kernels are compiled)
    return {k: p.read_bytes() for k, p in out.items()}


@pytest.mark.parametrize("target", ["qwen2-f32", "llama-q8_0"])
def test_fuzz_synthetic(bases, tmp_path_factory, target):
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"

    @FUZZ
    @given(mutations(bases[target]))
    def run(data):
        _record(target, check_bytes(data, path), path)

    run()


def test_fuzz_real_header(tmp_path_factory):
    """Header mutations of a real model's metadata (49k-token vocabulary, merges, template).

    Its data section is a sparse hole of the right size: the loader's checks see real offsets,
    no forward runs."""
    from engine.fetch import model_path
    from engine.gguf_reader import GGUFFile
    src = model_path("smollm2-135m-q4_1")
    if not src.exists():
        pytest.skip(f"{src} not in the model cache")
    gf = GGUFFile(src)
    head = src.open("rb").read(gf.data_start)
    size = gf.size
    path = tmp_path_factory.mktemp("fuzzreal") / "m.gguf"

    @settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
    @given(mutations(head + b"\0" * 64, header_only=True))
    def run(data):
        _record("smollm2-header", check_bytes(data, path, forward=False, size=size), path)

    run()


# -- the hand-made corpus --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_base(tmp_path_factory):
    return base_model(tmp_path_factory.mktemp("corpus")).read_bytes()


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_case(corpus_base, tmp_path, name):
    data, expected = build_case(name, corpus_base)
    path = tmp_path / f"{name}.gguf"
    msg = check_bytes(data, path)
    _record("corpus", msg, path)
    if expected is None:
        assert msg is None, msg
    else:
        assert msg is not None and expected in msg, f"{name}: {msg!r} lacks {expected!r}"
        assert msg.startswith(str(path)), msg


@pytest.mark.parametrize("name,cmd", [("string_len_2_60", "inspect"), ("n_dims_2_31", "run"),
                                      ("nested_arrays_deep", "tokenize"), ("vocab_1e9", "run"),
                                      ("tokens_not_strings", "run"), ("newline_in_tensor_name", "inspect")])
def test_corpus_through_cli(corpus_base, tmp_path, name, cmd):
    data, expected = build_case(name, corpus_base)
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    args = [cmd, path] + (["--prompt", "hi", "--max-tokens", "2"] if cmd == "run" else []) + \
        (["hello"] if cmd == "tokenize" else [])
    assert_one_line_error(run_cli(*args, timeout=60), str(path), expected)
