"""The logit lens: every layer's residual through the model's own output head."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synthetic import write_tiny_model
from tests.test_first_use import strict_loads
from tests.test_model_errors import assert_one_line_error, run_cli

TEXT = "the theater is on the other side"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("lens") / "tiny.gguf", n_layers=3)


@pytest.mark.parametrize("exact", [False, True])
def test_last_layer_is_the_models_output(tiny, exact):
    from engine.api import Engine
    from engine.forward import output_head
    from trace.lens import logit_lens
    eng = Engine(tiny, exact=exact)
    ids = eng.tokenizer.encode(TEXT)
    logits = eng.new_session().forward(ids, all_logits=True)
    s = eng.new_session()
    from tests.helpers import KeepSink
    keep = KeepSink()
    s.forward(ids, sink=keep, all_logits=True)
    np.testing.assert_array_equal(output_head(eng.model, s, keep.kept["post_ffn_residual", 2]), logits)
    result = logit_lens(eng, ids, (0, 1, 2), top=3)
    last = result["layers"][-1]["positions"]
    assert [p["top"][0][0] for p in last] == list(np.argmax(logits, axis=1))
    assert all(abs(p["top"][0][1] - float(logits[p["pos"], p["top"][0][0]])) == 0 for p in last)
    assert result["layers"][0]["positions"] != last   # earlier layers read differently


def test_lens_cli_json_and_plot(tiny, tmp_path):
    res = run_cli("lens", tiny, "--raw", "--prompt", TEXT, "--top", "2", "--layers", "1-2", "--json")
    assert res.returncode == 0, res.stderr
    out = strict_loads(res.stdout)
    assert [row["layer"] for row in out["layers"]] == [1, 2]
    assert all(len(p["top"]) == 2 for row in out["layers"] for p in row["positions"])
    score = json.loads(run_cli("score", tiny, "--text", TEXT, "--raw", "--top", "1", "--json").stdout)
    assert [p["top"][0][0] for p in out["layers"][-1]["positions"]] == [p["top"][0][0] for p in score["positions"]]
    res = run_cli("lens", tiny, "--raw", "--prompt", TEXT, "--plot", tmp_path / "lens.png")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "lens.png").stat().st_size > 1000
    assert_one_line_error(run_cli("lens", tiny, "--layers", "9"), "layer 9 is out of range")


@pytest.mark.model
def test_lens_last_layer_equals_score_top1_on_the_05b():
    from tests.conftest import model_file
    key = "qwen2.5-coder-0.5b-q4_k_m"
    model_file(key)
    text = "The capital of France is"
    lens = strict_loads(run_cli("lens", key, "--raw", "--prompt", text, "--top", "1", "--layers", "all", "--json",
                                timeout=600).stdout)
    score = json.loads(run_cli("score", key, "--text", text, "--raw", "--top", "1", "--json", timeout=600).stdout)
    assert len(lens["layers"]) == 24
    # the last layer's lens is the model's output: the same top-1 token and logit as score
    assert [p["top"][0][:2] for p in lens["layers"][-1]["positions"]] == [p["top"][0] for p in score["positions"]]
