"""Hostile GGUF files: a map of a valid file's fields, mutations of them, and the check every case must pass.

`layout(data)` walks a valid GGUF (independently of engine.gguf_reader) and records where every
header field lives: version, counts, string lengths, value and array types, array lengths,
tensor dims, types and offsets, plus the section boundaries (end of each KV pair, end of the
tensor infos, start of the data, each tensor's start). The mutators rewrite one field, cut the file
at a boundary, or overwrite bytes. `check(path)` is the property: loading the file ends in an
`EngineError` with a one-line message (returned), or in a model that survives tokenizing,
detokenizing every token and a short forward (returns None). Anything else - another exception,
a hang (SIGALRM), a crash - fails the test.

Also runnable for a long fuzz session (see README "Robustness"):

    python -m tests.gguf_fuzz --examples 20000
"""
from __future__ import annotations

import contextlib
import re
import signal
import threading
from dataclasses import dataclass

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9

# values that hit the edges of every integer check
INTERESTING_U64 = (0, 1, 2, 3, 4, 5, 7, 8, 12, 31, 32, 33, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31,
                   (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 60, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
INTERESTING_U32 = tuple(v for v in INTERESTING_U64 if v < 1 << 32)


@dataclass(frozen=True)
class Field:
    offset: int
    size: int       # 4 or 8 (little-endian unsigned), or the byte length of a scalar value
    kind: str       # version, n_tensors, n_kv, key_len, vtype, str_len, arr_type, arr_len, value, n_dims, dim,
                    # ttype, toffset
    label: str


@dataclass
class Layout:
    fields: list
    boundaries: list    # byte offsets where a section ends / begins
    data_start: int
    tensor_starts: list


def layout(data: bytes) -> Layout:
    """Fields and section boundaries of a valid GGUF v3 file."""
    pos = 0
    fields, bounds = [], []

    def u(size, kind, label):
        nonlocal pos
        v = int.from_bytes(data[pos:pos + size], "little")
        fields.append(Field(pos, size, kind, label))
        pos += size
        return v

    def string(kind, label):
        nonlocal pos
        n = u(8, kind, label)
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(vtype, key):
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            fields.append(Field(pos, _SCALAR_SIZES[vtype], "value", key))
            pos += _SCALAR_SIZES[vtype]
        elif vtype == STRING:
            string("str_len", key)
        else:
            etype = u(4, "arr_type", key)
            count = u(8, "arr_len", key)
            if etype in _SCALAR_SIZES:
                pos += count * _SCALAR_SIZES[etype]
            elif etype == STRING:
                for i in range(count):
                    if i < 4 or i == count - 1:  # a few element lengths are enough to mutate
                        string("str_len", f"{key}[{i}]")
                    else:
                        pos += 8 + int.from_bytes(data[pos:pos + 8], "little")
            else:
                for i in range(count):
                    value(etype, f"{key}[{i}]")

    assert data[:4] == b"GGUF"
    pos = 4
    u(4, "version", "version")
    n_tensors = u(8, "n_tensors", "tensor count")
    n_kv = u(8, "n_kv", "metadata count")
    bounds.append(pos)
    align = 32
    for _ in range(n_kv):
        key = string("key_len", "key")
        vtype = u(4, "vtype", key)
        start = pos
        value(vtype, key)
        if key == "general.alignment":
            align = int.from_bytes(data[start:pos], "little")
        bounds.append(pos)
    offsets = []
    for _ in range(n_tensors):
        name = string("key_len", "tensor name")
        n_dims = u(4, "n_dims", name)
        for d in range(n_dims):
            u(8, "dim", f"{name} dim {d}")
        u(4, "ttype", name)
        offsets.append(u(8, "toffset", name))
        bounds.append(pos)
    data_start = (pos + align - 1) // align * align
    starts = [data_start + o for o in offsets]
    bounds += [data_start] + starts + [len(data)]
    return Layout(fields, sorted(set(bounds)), data_start, starts)


def set_field(data: bytes, f: Field, v: int) -> bytes:
    v &= (1 << (8 * f.size)) - 1
    return data[:f.offset] + v.to_bytes(f.size, "little") + data[f.offset + f.size:]


def truncate(data: bytes, at: int) -> bytes:
    return data[:max(0, min(at, len(data)))]


def overwrite(data: bytes, at: int, chunk: bytes) -> bytes:
    at = max(0, min(at, len(data)))
    return data[:at] + chunk + data[at + len(chunk):]


# -- the property ----------------------------------------------------------------------------------

class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise Hang in the main thread after `seconds` (Python code only; no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(path, forward: bool = True, seconds: float = 20.0) -> str | None:
    """Load `path` as the engine does; the one-line EngineError message, or None for a correct load.

    A correct load must also tokenize, decode every token, render the chat template and run a
    short forward without error (an EngineError there is fine too: e.g. a hostile template)."""
    from engine.api import Engine
    from engine.errors import EngineError
    with time_limit(seconds):
        try:
            eng = Engine(path, n_ctx=8)
            tok = eng.tokenizer
            for i in range(tok.n_vocab):
                tok.token_bytes(i)
            tok.decode(range(tok.n_vocab))
            if forward:
                ids = eng.prompt_ids("the cat sat")[:6] or [0]
                logits = eng.forward(ids)
                assert logits.shape == (1, eng.config.vocab)
        except EngineError as e:
            msg = str(e)
            assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
            return msg
    return None


_NUM = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?")


def template(msg: str, path) -> str:
    """A message with the file path and all numbers blanked: one entry per kind of error."""
    return _NUM.sub("N", msg.replace(str(path), "<file>"))


# -- a long run outside pytest ------------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse
    import tempfile
    import time
    from pathlib import Path

    from hypothesis import HealthCheck, given, settings

    from tests import test_fuzz_gguf as t

    ap = argparse.ArgumentParser(description="long GGUF fuzz run (random seeds, not derandomized)")
    ap.add_argument("--examples", type=int, default=5000, help="examples per target")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = t.base_model(Path(tmp))
        seen: dict[str, int] = {}
        n = [0]
        t0 = time.time()

        @settings(max_examples=a.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(t.mutations(base.read_bytes()))
        def run(mut):
            n[0] += 1
            msg = t.check_bytes(mut, Path(tmp) / "m.gguf")
            key = "load ok" if msg is None else template(msg, Path(tmp) / "m.gguf")
            seen[key] = seen.get(key, 0) + 1

        run()
        print(f"{n[0]} examples in {time.time() - t0:.0f} s; {len(seen)} distinct outcomes:")
        for k, v in sorted(seen.items(), key=lambda kv: -kv[1]):
            print(f"{v:7d}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
