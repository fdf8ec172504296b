"""The --stages / --layers grammar and TracePlan.wants."""
import pytest

from trace.plan import PlanError, TracePlan, parse_layers, parse_stages
from trace.stages import STAGES


def test_parse_stages_all_and_case():
    assert parse_stages("all") == STAGES
    assert parse_stages(" ALL ") == STAGES
    assert parse_stages("all,embedding") == STAGES


def test_parse_stages_forward_order_dedup_whitespace_case():
    assert parse_stages(" lm_head , FFN_UP,attn_norm,ffn_up ") == ("attn_norm", "ffn_up", "lm_head")


def test_parse_stages_alias():
    assert parse_stages("layer_output") == ("post_ffn_residual",)
    assert parse_stages("Layer_Output,post_ffn_residual,embedding") == ("embedding", "post_ffn_residual")


@pytest.mark.parametrize("text, what", [
    ("nope", "unknown stage 'nope'"),
    ("attn_norm,Bogus", "unknown stage 'Bogus'"),
    ("", "empty stage name in ''"),
    ("attn_norm,,ffn_up", "empty stage name in 'attn_norm,,ffn_up'"),
    ("attn_norm, ", "empty stage name"),
])
def test_parse_stages_errors(text, what):
    with pytest.raises(PlanError) as e:
        parse_stages(text)
    msg = str(e.value)
    assert what in msg and "\n" not in msg
    assert "valid stages: all, embedding, attn_norm" in msg
    assert all(s in msg for s in STAGES)
    assert "layer_output (= post_ffn_residual)" in msg


@pytest.mark.parametrize("text, expected", [
    ("0-3", (0, 1, 2, 3)),
    ("5", (5,)),
    ("0-3,7", (0, 1, 2, 3, 7)),
    ("7,0-3", (0, 1, 2, 3, 7)),
    ("2-4,3-5,4", (2, 3, 4, 5)),
    (" 1 , 2 - 3 ", (1, 2, 3)),
    ("3-3", (3,)),
    ("27", (27,)),
    ("all", tuple(range(28))),
    ("ALL", tuple(range(28))),
    ("all,3", tuple(range(28))),
])
def test_parse_layers(text, expected):
    assert parse_layers(text, 28) == expected


@pytest.mark.parametrize("text, what", [
    ("30", "layer 30 is out of range: the model has 28 layers (0-27)"),
    ("28", "layer 28 is out of range: the model has 28 layers (0-27)"),
    ("0-28", "layer 28 is out of range: the model has 28 layers (0-27)"),
    ("3-1", "layer range '3-1' is reversed; the model has 28 layers (0-27)"),
    ("-1", "layer '-1' is negative; the model has 28 layers (0-27)"),
    ("a", "malformed layer spec 'a' in 'a': expected N, A-B or all; the model has 28 layers (0-27)"),
    ("1-", "malformed layer spec '1-'"),
    ("-", "malformed layer spec '-'"),
    ("1--3", "malformed layer spec '1--3'"),
    ("1-2-3", "malformed layer spec '1-2-3'"),
    ("1.5", "malformed layer spec '1.5'"),
    ("", "empty layer spec in '': expected N, A-B or all; the model has 28 layers (0-27)"),
    ("1,,2", "empty layer spec in '1,,2'"),
    ("\u0663", "malformed layer spec"),  # a non-ASCII digit
])
def test_parse_layers_errors(text, what):
    with pytest.raises(PlanError) as e:
        parse_layers(text, 28)
    assert what in str(e.value) and "\n" not in str(e.value)


def test_parse_layers_zero_layer_model():
    assert parse_layers("all", 0) == ()
    with pytest.raises(PlanError, match=r"layer 0 is out of range: the model has 0 layers$"):
        parse_layers("0", 0)


def test_plan_wants():
    plan = TracePlan(("embedding", "attn_norm", "lm_head", "final_norm"), (1, 3))
    assert plan.wants("attn_norm", 1) and plan.wants("attn_norm", 3)
    assert not plan.wants("attn_norm", 0) and not plan.wants("attn_norm", None)
    assert not plan.wants("ffn_up", 1)
    for stage in ("embedding", "final_norm", "lm_head"):
        assert plan.wants(stage, None)


def test_plan_whole_model_stages_wanted_with_no_layers():
    plan = TracePlan(("embedding", "lm_head", "ffn_up"), ())
    assert plan.wants("embedding", None) and plan.wants("lm_head", None)
    assert not plan.wants("ffn_up", 0) and not plan.wants("final_norm", None)


def test_plan_normalises_order():
    plan = TracePlan(["lm_head", "attn_norm", "attn_norm"], [3, 1, 3])
    assert plan.stages == ("attn_norm", "lm_head") and plan.layers == (1, 3)


def test_plan_rejects_unknown_stage():
    with pytest.raises(PlanError, match="unknown stage 'layer_output'"):
        TracePlan(("layer_output",), (0,))


def test_plan_parse():
    plan = TracePlan.parse("layer_output,lm_head", "0-1", 4)
    assert plan.stages == ("post_ffn_residual", "lm_head") and plan.layers == (0, 1)
    with pytest.raises(PlanError, match="the model has 4 layers"):
        TracePlan.parse("all", "4", 4)
