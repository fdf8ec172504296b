"""Hostile APRT files for the reader and for diff: an AprtError/DiffError with a one-line message, or a
correct read; never another exception, a hang, or memory beyond the file's own size.

Mutations: header fields (magic, layer, count) set to edge values, cuts at and around the header,
appended or removed body bytes, and whole random files; for diff also captures whose files are
replaced by mutated ones, directories named like files and files named like layer folders.
NUMGGUF_FUZZ_EXAMPLES raises the example count.
"""
from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gguf_fuzz import INTERESTING_U32, time_limit
from tests.test_trace_cli import assert_one_line_error, run_cli
from trace.aprt import HEADER, AprtError, read_aprt, write_aprt
from trace.diff import DiffError, diff_captures, format_report

EXAMPLES = int(os.environ.get("NUMGGUF_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))
SEEN: dict[str, set] = {"reader": set(), "diff": set()}

GOOD = struct.pack("<4sII", b"APRT", 3, 6) + np.array([1, -0.0, np.nan, np.inf, 2, 3], "<f4").tobytes()


def aprt_mutations():
    field = st.tuples(st.sampled_from([4, 8]), st.one_of(st.sampled_from(INTERESTING_U32),
                                                         st.integers(0, 2**32 - 1), st.integers(0, 12)))
    set_field = field.map(lambda t: lambda b: b[:t[0]] + struct.pack("<I", t[1]) + b[t[0] + 4:])
    magic = st.binary(min_size=4, max_size=4).map(lambda m: lambda b: m + b[4:])
    cut = st.integers(0, len(GOOD) + 4).map(lambda n: lambda b: b[:n])
    grow = st.binary(min_size=1, max_size=16).map(lambda x: lambda b: b + x)
    mut = st.one_of(set_field, set_field, magic, cut, grow)
    mutated = st.lists(mut, min_size=1, max_size=3).map(lambda fs: _apply(GOOD, fs))
    return st.one_of(mutated, mutated, mutated, st.binary(max_size=64))


def _apply(data, fs):
    for f in fs:
        data = f(data)
    return data


def _clean(msg: str) -> str:
    assert msg and "\n" not in msg, repr(msg)
    return msg


@FUZZ
@given(aprt_mutations())
def test_fuzz_reader(tmp_path_factory, data):
    p = tmp_path_factory.getbasetemp() / "fuzz.bin"
    p.write_bytes(data)
    with time_limit(10):
        try:
            f = read_aprt(p)
        except AprtError as e:
            SEEN["reader"].add(_clean(str(e)).replace(str(p), "<file>"))
            return
    # a correct read: the header and the size agree, the values are the body
    assert len(data) == HEADER.size + 4 * f.count and data[:4] == b"APRT"
    assert np.asarray(f.values).tobytes() == data[HEADER.size:]
    SEEN["reader"].add("read ok")


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    root = tmp_path_factory.mktemp("aprtcap") / "a"
    (root / "layer-0").mkdir(parents=True)
    (root / "layer-1").mkdir()
    write_aprt(root / "layer-0" / "embedding.bin", None, np.arange(6, dtype=np.float32))
    for layer in (0, 1):
        write_aprt(root / f"layer-{layer}" / "ffn_up.bin", layer, np.linspace(-1, 1, 8, dtype=np.float32))
    write_aprt(root / "lm_head.bin", None, np.array([1, 2, 3], np.float32))
    return root


@FUZZ
@given(data=aprt_mutations(), target=st.sampled_from(["layer-0/embedding.bin", "layer-1/ffn_up.bin", "lm_head.bin",
                                                      "layer-7/ffn_up.bin", "layer-x/ffn_up.bin", "ffn_up.bin"]),
       side=st.booleans())
def test_fuzz_diff(capture, tmp_path_factory, data, target, side):
    b = tmp_path_factory.getbasetemp() / "fuzzdiff"
    shutil.rmtree(b, ignore_errors=True)
    shutil.copytree(capture, b)
    (b / target).parent.mkdir(exist_ok=True)
    (b / target).write_bytes(data)
    x, y = (capture, b) if side else (b, capture)
    with time_limit(10):
        try:
            report = diff_captures(x, y)
        except (AprtError, DiffError) as e:
            SEEN["diff"].add(_clean(str(e)).replace(str(b), "<dir>"))
            return
    text = format_report(report)
    assert text.splitlines()[-1].startswith(("all ", "first divergence: "))
    SEEN["diff"].add("report ok" if report.ok else "report divergent")


def test_fuzz_summary():
    """Printed with -s: how many distinct messages the fuzzers above produced (they run first)."""
    for k, v in SEEN.items():
        print(f"\nfuzz aprt {k}: {len(v)} distinct outcomes")


def _layout_cases(tmp_path, capture):
    b = tmp_path / "b"
    shutil.copytree(capture, b)
    return b


@pytest.mark.parametrize("break_it,needle", [
    (lambda b: ((b / "lm_head.bin").unlink(), (b / "lm_head.bin").mkdir()), None),  # a directory named .bin
    (lambda b: ((b / "layer-1" / "ffn_up.bin").unlink(), os.mkfifo(b / "layer-1" / "ffn_up.bin")), None),
    (lambda b: (shutil.rmtree(b / "layer-1"), (b / "layer-1").write_text("x")), None),  # a file named layer-1
    (lambda b: (b / "layer-99999999999999999999").mkdir(), None),
    (lambda b: (b / "layer-0" / "ffn_up.bin").write_bytes(b"APRT" + b"\xff" * 8), "body is 0 bytes"),
    (lambda b: ((b / "layer-0" / "ffn_up.bin").unlink(), (b / "layer-0" / "ffn_up.bin").symlink_to(b / "nowhere")),
     None),  # a dangling symlink
])
def test_diff_odd_capture_layouts_through_cli(capture, tmp_path, break_it, needle):
    """Odd files in a capture never crash diff: either a report (exit 0/1) or one line, exit 2."""
    b = _layout_cases(tmp_path, capture)
    break_it(b)
    res = run_cli("diff", capture, b, timeout=60)
    if needle is None:
        assert res.returncode in (0, 1), res.stderr
        assert "Traceback" not in res.stderr and res.stdout.strip().splitlines()[-1]
    else:
        assert_one_line_error(res, needle)
