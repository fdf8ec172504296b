"""The activation-patching sweep: `cli patch` and trace.patching."""
from __future__ import annotations

import numpy as np
import pytest

from tests.synthetic import write_tiny_model
from tests.test_first_use import strict_loads
from tests.test_model_errors import assert_one_line_error, run_cli

CLEAN = "the theater is on the other side"
CORRUPT = "the theater is in the other side"   # one byte differs: same token count
METRIC = "logit-diff 101 97"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("patching") / "tiny.gguf", n_layers=3)


def _sweep(path, stage="post_ffn_residual", layers=(0, 1, 2), metric=METRIC):
    from engine.api import Engine
    from trace.patching import parse_metric, patch_sweep
    eng = Engine(path)
    clean, corrupt = eng.tokenizer.encode(CLEAN), eng.tokenizer.encode(CORRUPT)
    return eng, clean, corrupt, patch_sweep(eng, clean, corrupt, stage, layers,
                                           parse_metric(metric, eng.tokenizer, eng.config.vocab))


@pytest.mark.parametrize("stage", ["post_ffn_residual", "attn_out", "ffn_silu", "attention"])
def test_sweep_recovers_exactly_nothing_before_the_change_and_everything_at_the_end(tiny, stage):
    """Before the first differing token the two runs are the same: patching there recovers
    exactly 0. The last layer's residual at the last position is all the metric reads: exactly 1."""
    eng, clean, corrupt, result = _sweep(tiny, stage)
    first = next(i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b)
    rec = np.asarray(result["recovered"])
    assert rec.shape == (3, len(clean)) and result["positions"] == list(range(len(clean)))
    np.testing.assert_array_equal(rec[:, :first], 0.0)
    assert np.abs(rec[:, first:]).max() > 0.01          # the differing token matters somewhere
    if stage == "post_ffn_residual":
        assert rec[2, -1] == 1.0
        # by hand: the corrupted forward with that row put back gives the clean run's metric
        s = eng.new_session()
        logits = s.forward(clean)[-1]
        assert result["clean"] == float(logits[101]) - float(logits[97])
    np.testing.assert_allclose(np.asarray(result["patched"]), result["corrupt"] +
                               rec * (result["clean"] - result["corrupt"]), rtol=1e-12, atol=1e-12)


def test_patch_cli_json_table_and_plot(tiny, tmp_path):
    res = run_cli("patch", tiny, "--clean", CLEAN, "--corrupt", CORRUPT, "--raw", "--stage", "layer_output",
                  "--layers", "1-2", "--metric", "logit-diff 'e' 'a'", "--json")
    assert res.returncode == 0, res.stderr
    out = strict_loads(res.stdout)
    assert out["layers"] == [1, 2] and len(out["recovered"]) == 2
    assert all(len(row) == len(out["positions"]) for row in out["recovered"])
    assert out["recovered"][-1][-1] == 1.0 and out["clean"] != out["corrupt"]
    res = run_cli("patch", tiny, "--clean", CLEAN, "--corrupt", CORRUPT, "--raw", "--stage", "ffn_out",
                  "--metric", METRIC, "--plot", tmp_path / "sweep.png")
    assert res.returncode == 0, res.stderr
    assert "most recovered" in res.stdout and res.stdout.count("\n") >= 4
    assert (tmp_path / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("args, needle", [
    (("--corrupt", "the theater is on the other sides"), "same token count"),
    (("--metric", "logit-diff 'the' 'a'"), "is 2 tokens"),
    (("--metric", "logit-diff 97 97"), "both tokens"),
    (("--metric", "logit-diff 99999 97"), "out of range"),
    (("--metric", "logit-ratio 1 2"), "expected \"logit-diff"),
    (("--stage", "ffn_outt"), "unknown stage"),
    (("--stage", "ffn_out,attn_out"), "give one stage"),
    (("--stage", "lm_head"), "the metric reads lm_head"),
    (("--layers", "7"), "out of range"),
    (("--stage", "final_norm", "--layers", "1"), "whole-model stage"),
    (("--clean", None), "patch needs --clean"),
])
def test_patch_cli_bad_input_is_one_line(tiny, args, needle):
    opts = {"--clean": CLEAN, "--corrupt": CORRUPT, "--stage": "post_ffn_residual", "--metric": METRIC}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in opts:
            opts[flag] = value
        else:
            extra += [flag, value]
    argv = [x for flag, v in opts.items() if v is not None for x in (flag, v)]
    assert_one_line_error(run_cli("patch", tiny, "--raw", *argv, *extra), needle)


@pytest.mark.model
def test_sweep_on_the_05b_finds_the_country_and_recovers_one_at_the_end():
    """France/Spain: the answer lives at the country's position in early layers and at the last
    position in the last ones (it moves between layers 17 and 21, measured)."""
    from tests.conftest import engine_for, model_file
    from trace.patching import parse_metric, patch_sweep
    model_file("qwen2.5-coder-0.5b-q4_k_m")
    eng = engine_for("qwen2.5-coder-0.5b-q4_k_m")
    clean = eng.prompt_ids("The capital of France is", raw=True)
    corrupt = eng.prompt_ids("The capital of Spain is", raw=True)
    metric = parse_metric("logit-diff ' Paris' ' Madrid'", eng.tokenizer, eng.config.vocab)
    result = patch_sweep(eng, clean, corrupt, "post_ffn_residual", [6, 23], metric)
    rec = np.asarray(result["recovered"])
    assert result["clean"] > 0 > result["corrupt"]
    assert rec[1, -1] == 1.0                                  # last layer, last position
    np.testing.assert_array_equal(rec[:, :3], 0.0)            # "The capital of": the same in both
    assert rec[0, 3] > 0.9 and abs(rec[0, -1]) < 0.1          # layer 6: all of it at " France"
    assert abs(rec[1, 3]) < 0.1                               # layer 23: none of it there any more
