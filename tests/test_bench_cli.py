"""`bench`'s measurement modes: --ctx-fill, --roofline and llama.cpp's --flash-attn settings.

Speed itself is never asserted here (a benchmark measures, a test does not time); these check
that each mode measures what it says: the fill is the prompt and decoding starts after it, the
roofline's bytes per token are the file's weight matrices plus the KV rows read (computed here
from the GGUF file independently of the engine), and `--flash-attn both` reports two llama.cpp
instances and takes each ratio against the better one.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synthetic import write_tiny_model
from tests.test_llama_trace import needs_llama
from tests.test_model_errors import run_cli
from tests.test_trace_cli import assert_one_line_error

SMOL = "smollm2-135m-q4_1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("bench") / "tiny.gguf", n_layers=2)


def expected_bytes_per_token(path, context: int) -> int:
    """Weight matrices of the file (every 2-D tensor but the embedding table, which a tied output
    head reads whole) plus float32 K and V rows of `context` positions in each layer."""
    from engine.gguf_reader import GGUFFile
    from engine.model import read_config
    gf = GGUFFile(path)
    cfg = read_config(gf)
    total = 0
    for name, info in gf.tensors.items():
        if len(info.ne) == 2 and (name != "token_embd.weight" or cfg.tied_output):
            total += gf.tensor_bytes(name).nbytes
    return total + cfg.n_layers * 2 * context * cfg.kv_dim * 4


def test_ctx_fill_and_roofline(tiny):
    res = run_cli("bench", tiny, "--ctx-fill", "40", "--gen-tokens", "5", "--repeat", "2", "--roofline", "--json",
                  timeout=600)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["ctx_fill"] == 40 and r["prompt_tokens"] == 40 and r["gen_tokens"] == 5
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    roof = r["roofline"]
    # the timed decode steps attend to 40..44 cached positions: the mean, 42, is what is counted
    assert roof["bytes_per_token"] == expected_bytes_per_token(tiny, 40 + 5 // 2)
    assert roof["read_gb_s"] > 0.1
    assert roof["roofline_tok_s"] == pytest.approx(roof["read_gb_s"] * 1e9 / roof["bytes_per_token"])
    assert roof["fraction"] == pytest.approx(r["decode_tok_s"] / roof["roofline_tok_s"])


def test_ctx_fill_decodes_what_a_plain_run_of_that_prompt_decodes(tiny):
    """Decoding after the fill restarts at position N each repeat: the tokens are those of a fresh
    prefill of the same N ids, repeat after repeat."""
    from engine.api import Engine
    from engine.benchmark import measure_ours, prompt_ids
    eng = Engine(tiny, n_ctx=64)
    ids = prompt_ids(eng, 30)
    first = measure_ours(eng, ids, 8)
    again = [measure_ours(eng, ids, 8, filled=first)["tokens"] for _ in range(2)]
    fresh = Engine(tiny, n_ctx=64)
    want = [int(np.argmax(fresh.prefill(ids)))]
    for i in range(7):
        want.append(int(np.argmax(fresh.forward([want[-1]], pos=len(ids) + i)[0])))
    assert first["tokens"] == want and again == [want, want]


@pytest.mark.parametrize("flags,needle", [
    (["--flash-attn", "sometimes"], "--flash-attn must be one of off, on, both"),
    (["--flash-attn", "on"], "needs --vs-llama-cpp"),
    (["--ctx-fill", "0"], "--ctx-fill must be"),
    (["--ctx-fill", "100000"], "exceeds the model's context length"),
])
def test_bench_flag_errors_are_one_line(tiny, flags, needle):
    assert_one_line_error(run_cli("bench", tiny, *flags), needle, code=2)


@needs_llama
@pytest.mark.model
def test_flash_attn_both_measures_two_llama_instances():
    from tests.conftest import model_file
    model_file(SMOL)
    res = run_cli("bench", SMOL, "--ctx-fill", "64", "--gen-tokens", "4", "--repeat", "1", "--vs-llama-cpp",
                  "--flash-attn", "both", "--json", timeout=600)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    llamas = r["llama_cpp"]
    assert set(llamas) == {"flash_attn_off", "flash_attn_on"}
    best = max(v["decode_tok_s"] for v in llamas.values())
    assert r["ratio"]["decode_tok_s"] == pytest.approx(r["decode_tok_s"] / best)
    assert r["ratio"]["ttft_s"] == pytest.approx(r["ttft_s"] / min(v["ttft_s"] for v in llamas.values()))
