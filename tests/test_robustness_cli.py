"""Full disks, file-size limits, signals and bad flags: a clear one-line message, a non-zero exit, no traceback,
no file that looks complete, and earlier captures untouched.

Signals are sent to a real `python -m cli trace` child at a deterministic point: the child runs the
CLI's own main() with one kernel wrapped to announce (by creating a marker file) that the forward
has reached layer 1 and then sleep; the test sends SIGINT or SIGTERM once the marker exists.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from gguf import GGMLQuantizationType

from tests.conftest import REPO
from tests.synthetic import write_tiny_model
from tests.test_trace_cli import assert_one_line_error, files, run_cli
from trace.aprt import read_aprt

F32 = GGMLQuantizationType.F32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("rob") / "tiny.gguf", qtype=F32, n_layers=3)


@pytest.fixture(scope="module")
def earlier(model, tmp_path_factory):
    """A complete capture made before the failures below (also warms Numba's cache)."""
    out = tmp_path_factory.mktemp("earlier") / "cap"
    res = run_cli("trace", model, "--out", out)
    assert res.returncode == 0, res.stderr
    return out


def assert_capture_valid(out):
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(e["path"] for e in m["files"]) + ["manifest.json"] == files(out)
    for e in m["files"]:
        assert read_aprt(out / e["path"]).count == e["count"]


# -- file-size limit and full disk ----------------------------------------------------------------------

def _limit_fsize(nbytes):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return pre


def test_file_size_limit_stops_cleanly(model, earlier, tmp_path):
    """RLIMIT_FSIZE lets the small files (norms, q/k) be created, then the first big one fails: EFBIG
    (SIGXFSZ is ignored), one line, exit 2, every file of the failed capture removed."""
    prompt = "the theater is on the other side " * 6
    out = tmp_path / "cap"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "cli", "trace", str(model), "--raw", "--prompt", prompt,
                          "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=_limit_fsize(48 * 1024))
    err = assert_one_line_error(res, "cannot write the capture", "File too large", "partial files removed")
    assert ".bin.partial" in err  # names the file that did not fit
    assert files(out) == []
    assert_capture_valid(earlier)


def test_full_disk_stops_cleanly(model, earlier, tmp_path, monkeypatch):
    """ENOSPC while reserving a file's blocks (simulated at the 5th file): EngineError, nothing left behind."""
    from engine.api import Engine
    from engine.errors import EngineError
    from trace.capture import capture, plan_for_model
    real, calls = os.posix_fallocate, []

    def full(fd, offset, length):
        calls.append(1)
        if len(calls) >= 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    eng = Engine(model, n_ctx=64)
    out = tmp_path / "cap"
    out.mkdir()
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(EngineError, match="cannot write the capture .*No space left on device"):
        capture(eng, eng.prompt_ids("hello"), plan_for_model("all", "all", eng.config), out, "hello")
    assert files(out) == [] and list(out.iterdir()) == []
    assert_capture_valid(earlier)


def test_failure_while_publishing_removes_everything(model, tmp_path, monkeypatch):
    """An interruption after the forward (while renaming files into place) leaves no .bin and no manifest."""
    from engine.api import Engine
    from trace import sink as sink_mod
    from trace.capture import capture, plan_for_model
    real, calls = os.replace, []

    def flaky(a, b):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(a, b)

    eng = Engine(model, n_ctx=64)
    out = tmp_path / "cap"
    out.mkdir()
    monkeypatch.setattr(sink_mod.os, "replace", flaky)
    with pytest.raises(KeyboardInterrupt):
        capture(eng, eng.prompt_ids("hello"), plan_for_model("all", "all", eng.config), out, "hello")
    assert files(out) == []


def test_capture_keeps_only_about_one_layer_mapped(model, tmp_path):
    """The sink does not keep finished stages' files mapped: resident memory stays ~one layer, not the capture."""
    from engine.api import Engine
    from trace.sink import TraceSink
    from trace.capture import plan_for_model
    eng = Engine(model, n_ctx=64)
    plan = plan_for_model("all", "all", eng.config)
    sink = TraceSink(tmp_path, plan, eng.config.n_layers)
    peak = []

    class Counting:
        def buffer(self, stage, layer, shape):
            with open("/proc/self/maps") as f:
                # this capture's maps only: other tests' leftovers in this process do not count
                peak.append(sum(".bin.partial" in line and str(tmp_path) in line for line in f))
            return sink.buffer(stage, layer, shape)

    eng.forward(eng.prompt_ids("hello"), sink=Counting())
    sink.finish()
    per_layer = len(plan.stages) - 3
    assert len(files(tmp_path)) == 3 + eng.config.n_layers * per_layer
    assert max(peak) <= per_layer + 3, max(peak)


# -- signals ----------------------------------------------------------------------------------------------

_CHILD = """
import os, sys, time
import engine.forward as fwd
import cli
real, calls, marker = fwd.silu_and_swiglu, [], sys.argv[1]
def slow(*args):
    calls.append(1)
    if len(calls) == 2:  # layer 1: layer 0's files and the embedding exist as .partial files
        open(marker, "w").close()
        time.sleep(120)
    return real(*args)
fwd.silu_and_swiglu = slow
sys.argv = ["cli", *sys.argv[2:]]
sys.exit(cli.main())
"""


def _signal_mid_capture(args, marker, sig):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker), *map(str, args)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never reached layer 1"
            time.sleep(0.02)
        child.send_signal(sig)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("sig,code,message", [(signal.SIGINT, 130, "error: interrupted"),
                                              (signal.SIGTERM, 143, "error: terminated")])
def test_signal_mid_capture(model, earlier, tmp_path, sig, code, message):
    out = tmp_path / "cap"
    res = _signal_mid_capture(["trace", model, "--out", out], tmp_path / "marker", sig)
    err = assert_one_line_error(res, code=code)
    assert err == message
    assert files(out) == []  # no .bin, no .partial, no manifest
    assert_capture_valid(earlier)


def test_sigterm_during_force_replace_leaves_no_mixture(model, earlier, tmp_path):
    """--force into an old capture, then SIGTERM: the folder holds neither the old capture nor a partial new one."""
    import shutil
    out = tmp_path / "cap"
    shutil.copytree(earlier, out)
    res = _signal_mid_capture(["trace", model, "--stages", "ffn_up", "--out", out, "--force"], tmp_path / "m",
                              signal.SIGTERM)
    assert_one_line_error(res, code=143)
    assert files(out) == []


def test_sigterm_during_run(model, tmp_path):
    """`run` interrupted by SIGTERM: one line, exit 143 (text generated so far stays on stdout)."""
    child = """
import sys, time
import engine.sampling as s
import cli
real, calls, marker = s.Sampler.__call__, [], sys.argv[1]
def slow(self, logits):
    calls.append(1)
    if len(calls) == 3:
        open(marker, "w").close()
        time.sleep(120)
    return real(self, logits)
s.Sampler.__call__ = slow
sys.argv = ["cli", *sys.argv[2:]]
sys.exit(cli.main())
"""
    global _CHILD
    saved, _CHILD = _CHILD, child
    try:
        res = _signal_mid_capture(["run", model, "--prompt", "hi", "--max-tokens", "50"], tmp_path / "m",
                                  signal.SIGTERM)
    finally:
        _CHILD = saved
    # `run` has printed its load line by then (a progress note, before the interruption)
    assert res.stderr.startswith("loaded ") and "Traceback" not in res.stderr, res.stderr
    res.stderr = res.stderr.split("\n", 1)[1]
    assert assert_one_line_error(res, code=143) == "error: terminated"


# -- flags: every command, malformed and out-of-range values: one line, exit 2 --------------------------------

BAD_FLAGS = [
    (["run", "{m}", "--seed", "-1"], "--seed must be a non-negative integer"),
    (["run", "{m}", "--max-tokens", "-5"], "--max-tokens"),
    (["run", "{m}", "--max-tokens", "1e9"], "--max-tokens must be an integer"),
    (["run", "{m}", "--max-tokens", "1000000000000"], "--max-tokens must be between"),
    (["run", "{m}", "--temperature", "inf"], "--temperature must be finite"),
    (["run", "{m}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["run", "{m}", "--top-p", "-0.1"], "--top-p must be in (0, 1]"),
    (["run", "{m}", "--top-p", "1.0000001"], "--top-p must be in (0, 1]"),
    (["run", "{m}", "--top-p", "inf"], "--top-p must be finite"),
    (["run", "{m}", "--top-k", "2.5"], "--top-k must be an integer"),
    (["run", "{m}", "--threads", "-1"], "--threads"),
    (["run", "{m}", "--threads", "0"], "--threads"),
    (["run", "{m}", "--ctx", "-1"], "--ctx"),
    (["run", "{m}", "--ctx", "99999999999"], "--ctx"),
    (["run", "{m}", "--ctx", "4096"], "context size 4096 exceeds the model's context length 256"),
    (["run", "{m}", "--raw", "--prompt", "the theater " * 200], "shorter than the context size 256"),
    (["run", "{m}", "--raw", "--prompt", ""], "the prompt is empty"),
    (["score", "{m}", "--text", "hi", "--top", "-1"], "--top must be between 0 and 1000"),
    (["score", "{m}", "--text", "hi", "--top", "100000"], "--top must be between 0 and 1000"),
    (["score", "{m}", "--text", "hi", "--threads", "0"], "--threads"),
    (["score", "{m}", "--ids", "-3"], "out of range"),
    (["score", "{m}", "--ids", "1,2,99999999999999999999"], "out of range"),
    (["score", "{m}", "--raw", "--text", ""], "nothing to score"),
    (["score", "{m}", "--raw", "--text", "the theater " * 200], "exceeds the model's context length 256"),
    (["trace", "{m}", "--threads", "0", "--out", "{t}/c"], "--threads"),
    (["trace", "{m}", "--threads", "100000", "--out", "{t}/c"], "--threads must be between"),
    (["trace", "{m}", "--raw", "--prompt", "the theater " * 200, "--out", "{t}/c"],
     "exceeds the model's context length 256"),
    (["trace", "{m}", "--layers", "99999999999999999999", "--out", "{t}/c"], "out of range"),
    (["diff", "{t}", "{t}", "--atol", "inf"], "--atol must be finite"),
    (["diff", "{t}", "{t}", "--rtol", "1e400"], "--rtol must be finite"),
    (["tokenize", "{t}/nope.gguf", "hi"], "nope.gguf"),
    (["tokenize", "qwen9-900b", "hi"], "neither a known key"),
    (["score", "qwen9-900b", "--text", "x"], "neither a known key"),
    (["trace", "qwen9-900b", "--out", "{t}/c"], "neither a known key"),
    (["inspect", "qwen9-900b"], "neither a known key"),
    (["inspect", "{t}"], "is a directory"),
    (["inspect", "{t}/fifo"], "is not a regular file"),
    (["fetch", "qwen9-900b"], "unknown model key 'qwen9-900b'"),
]


@pytest.mark.parametrize("argv,needle", BAD_FLAGS, ids=[f"{a[0]}:{' '.join(a[2:])[:40]}" for a, _ in BAD_FLAGS])
def test_bad_flags(model, tmp_path, argv, needle):
    os.mkfifo(tmp_path / "fifo")
    args = [a.format(m=model, t=tmp_path) for a in argv]
    assert_one_line_error(run_cli(*args, timeout=120), needle)
    assert not (tmp_path / "c").exists()
