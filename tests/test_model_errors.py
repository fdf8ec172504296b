"""Every bad-input case of model loading ends in a one-line error naming the file (and tensor), exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest
from gguf import GGMLQuantizationType

from tests.conftest import REPO
from tests.synthetic import write_tiny_model

F32 = GGMLQuantizationType.F32


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


@pytest.fixture
def good(tmp_path):
    return write_tiny_model(tmp_path / "good.gguf", qtype=F32)


def test_good_synthetic_model_inspects(good):
    res = run_cli("inspect", good)
    assert res.returncode == 0, res.stderr
    assert "n_layers" in res.stdout and "F32" in res.stdout


def test_not_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_bytes(b"hello, this is not a model\n" * 10)
    assert_one_line_error(run_cli("inspect", p), str(p), "not a GGUF file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    assert_one_line_error(run_cli("inspect", p), str(p), "not a GGUF file")


@pytest.mark.parametrize("cut", [6, 20, 300, 2000])
def test_truncated_header(good, tmp_path, cut):
    p = tmp_path / "cut.gguf"
    p.write_bytes(good.read_bytes()[:cut])
    assert_one_line_error(run_cli("inspect", p), str(p), "truncated")


def test_tensor_past_end_of_file(good, tmp_path):
    p = tmp_path / "short.gguf"
    p.write_bytes(good.read_bytes()[:-1000])
    assert_one_line_error(run_cli("inspect", p), str(p), "tensor blk.1.ffn_down.weight", "past the end")


def assert_unsupported(p, run_needles, missing):
    """A well-formed file we cannot run: `run` fails in one line naming the first problem, and
    `inspect` describes the file, says "supported: no" with one "missing:" line per problem
    (exactly the lines `missing`, each a list of needles) and exits 1."""
    assert_one_line_error(run_cli("run", p, "--prompt", "hi", "--max-tokens", "1"), str(p), *run_needles)
    res = run_cli("inspect", p)
    assert res.returncode == 1 and "Traceback" not in res.stderr, (res.returncode, res.stderr)
    assert "tensors:" in res.stdout and "supported: no" in res.stdout, res.stdout
    lines = [line for line in res.stdout.splitlines() if line.strip().startswith("missing:")]
    assert len(lines) == len(missing), res.stdout
    for line, needles in zip(lines, missing):
        assert all(n in line for n in needles), (line, needles)


def test_unsupported_architecture(tmp_path):
    p = write_tiny_model(tmp_path / "gpt.gguf", arch="gptneox", qtype=F32)
    assert_unsupported(p, ["unsupported architecture 'gptneox'"], [["unsupported architecture 'gptneox'"]])


def test_unsupported_tensor_type(tmp_path):
    p = write_tiny_model(tmp_path / "tq2.gguf", qtype=GGMLQuantizationType.TQ2_0)
    assert_unsupported(p, ["tensor blk.0.attn_q.weight", "unsupported type TQ2_0"],
                       [["unsupported tensor type TQ2_0", "16 tensors", "e.g. token_embd.weight"]])


def test_unsupported_architecture_and_type_both_named(tmp_path):
    p = write_tiny_model(tmp_path / "both.gguf", arch="gptneox", qtype=GGMLQuantizationType.TQ2_0)
    assert_unsupported(p, ["unsupported architecture 'gptneox'"],
                       [["unsupported architecture 'gptneox'"], ["unsupported tensor type TQ2_0"]])


def test_missing_tensor(tmp_path):
    p = write_tiny_model(tmp_path / "miss.gguf", qtype=F32, skip_tensors={"blk.1.ffn_up.weight"})
    assert_unsupported(p, ["missing tensor blk.1.ffn_up.weight"], [["missing tensor blk.1.ffn_up.weight"]])


def test_shape_disagrees_with_config(tmp_path):
    p = write_tiny_model(tmp_path / "shape.gguf", qtype=F32, overrides={"uint32": {"feed_forward_length": 384}})
    assert_unsupported(p, ["tensor blk.0.ffn_gate.weight", "shape", "[256, 384]"],
                       [["tensor blk.0.ffn_gate.weight", "shape", "[256, 384]"]])


def test_nonexistent_path(tmp_path):
    p = tmp_path / "nope.gguf"
    assert_one_line_error(run_cli("inspect", p), str(p))


def test_run_on_bad_file_exits_2_before_any_forward(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)
    assert_one_line_error(run_cli("run", p, "--prompt", "hi", "--max-tokens", "2"), str(p))
