"""The CLI front end: good runs, and every malformed or out-of-range flag gives one line and exit 2."""
from __future__ import annotations

import json

import pytest

from tests.synthetic import tokenizer_vocab, write_tiny_model
from tests.test_model_errors import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf")


def test_run_streams_text_and_reports_speed(tiny):
    res = run_cli("run", tiny, "--prompt", "the theater", "--max-tokens", "5")
    assert res.returncode == 0, res.stderr
    assert "prompt tokens:" in res.stderr and "prefill" in res.stderr and "decode" in res.stderr
    assert res.stdout.strip() != ""


def test_run_raw_parses_special_tokens(tiny):
    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = json.loads(run_cli("tokenize", tiny, text, "--special").stdout)
    tokens = tokenizer_vocab()[0]
    assert ids[0] == tokens.index("<|im_start|>") and ids.count(tokens.index("<|im_end|>")) == 1
    res = run_cli("run", tiny, "--raw", "--prompt", text, "--max-tokens", "2")
    assert res.returncode == 0, res.stderr
    assert f"prompt tokens: {len(ids)}," in res.stderr


def test_tokenize_prints_json_ids(tiny):
    res = run_cli("tokenize", tiny, "the theater")
    assert res.returncode == 0, res.stderr
    ids = json.loads(res.stdout)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids) and ids


def test_score_json_shape(tiny):
    res = run_cli("score", tiny, "--text", "the theater is", "--raw", "--top", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"ids", "positions", "perplexity"}
    assert len(out["positions"]) == len(out["ids"])
    assert out["positions"][0]["next_id"] == out["ids"][1]
    assert len(out["positions"][0]["top"]) == 2


@pytest.mark.parametrize("flags,needle", [
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-tokens", "lots"], "--max-tokens must be an integer"),
    (["--max-tokens", "99999999999"], "--max-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "hot"], "--temperature must be a number"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--threads", "0"], "--threads"),
    (["--threads", "4096"], "--threads"),
    (["--ctx", "0"], "--ctx"),
    (["--seed", "x"], "--seed"),
])
def test_bad_run_flags(tiny, flags, needle):
    assert_one_line_error(run_cli("run", tiny, "--prompt", "hi", *flags), needle)


def test_unknown_model_key():
    assert_one_line_error(run_cli("run", "qwen9-900b", "--max-tokens", "1"), "qwen9-900b", "known key")


def test_nonexistent_model_path(tmp_path):
    p = tmp_path / "missing" / "model.gguf"
    assert_one_line_error(run_cli("run", p, "--max-tokens", "1"), str(p))


def test_prompt_longer_than_context(tiny):
    assert_one_line_error(run_cli("run", tiny, "--ctx", "8", "--raw", "--prompt", "the theater " * 20),
                          "context size 8")


@pytest.mark.parametrize("ids,needle", [("1,x,3", "--ids"), ("", "--ids"), ("5,99999", "out of range")])
def test_bad_score_ids(tiny, ids, needle):
    assert_one_line_error(run_cli("score", tiny, "--ids", ids), needle)


def test_unknown_command():
    assert_one_line_error(run_cli("frobnicate"), "invalid command line")
