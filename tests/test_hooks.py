"""Hooks: functions on a stage's final values, run before anything downstream reads them.

``session.forward/generate/score(..., hooks={(stage, layer): fn})``, ``fn(values, positions)``
may change ``values`` in place; hooks on stages a fused kernel computes (ffn_silu, attn_scores,
attn_softmax) make the forward compute what follows from the hooked values.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType

from engine.errors import EngineError
from tests.helpers import KeepSink
from tests.synthetic import write_tiny_model

PROMPT = "the theater is on the other side"
PROMPT_B = "a river runs through it and on"


@pytest.fixture(scope="module", params=[("qwen2", GGMLQuantizationType.Q4_K), ("llama", GGMLQuantizationType.Q8_0)],
                ids=lambda p: p[0])
def tiny(request, tmp_path_factory):
    from engine.api import Engine
    arch, qtype = request.param
    path = write_tiny_model(tmp_path_factory.mktemp("hooks") / f"{arch}.gguf", arch=arch, qtype=qtype, n_layers=3)
    return Engine(path, n_ctx=128)


def stages_of(eng, ids, hooks=None):
    keep = KeepSink()
    logits = eng.new_session().forward(ids, sink=keep, hooks=hooks, all_logits=True)
    return keep.kept, logits


def test_a_hook_that_reads_changes_nothing(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    seen = []
    every = {(s, layer): (lambda v, p, _k=(s, layer): seen.append((_k, v.shape, tuple(p))))
             for (s, layer) in stages_of(tiny, ids)[0]}
    plain, logits = stages_of(tiny, ids)
    hooked, hooked_logits = stages_of(tiny, ids, every)
    assert len(seen) == len(every)
    np.testing.assert_array_equal(hooked_logits, logits)   # unfused paths included: same values
    for key, v in plain.items():
        np.testing.assert_array_equal(hooked[key], v, err_msg=str(key))
    assert all(p == tuple(range(len(ids))) for _, _, p in seen)


def test_zero_steer_changes_nothing_and_ablation_changes_the_logits(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    _, base = stages_of(tiny, ids)
    _, steered = stages_of(tiny, ids, {("post_attn_residual", 1): lambda v, p: v.__iadd__(np.zeros(v.shape[1],
                                                                                                np.float32))})
    np.testing.assert_array_equal(steered, base)
    _, ablated = stages_of(tiny, ids, {("attn_out", 1): lambda v, p: v.fill(0.0)})
    assert np.abs(ablated - base).max() > 1e-3


def test_patching_a_residual_makes_everything_after_it_the_other_runs(tiny):
    """Patch post_ffn_residual of layer L at all positions with prompt B's: every later stage and
    the logits equal B's bit for bit (same kernels on the same inputs; earlier K/V do not enter)."""
    a, b = tiny.tokenizer.encode(PROMPT), tiny.tokenizer.encode(PROMPT_B)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    clean, clean_logits = stages_of(tiny, b)
    patched, patched_logits = stages_of(tiny, a, {("post_ffn_residual", 1): lambda v, p: v.__setitem__(
        slice(None), clean["post_ffn_residual", 1])})
    np.testing.assert_array_equal(patched_logits, clean_logits)
    for key in (("attn_norm", 2), ("attn_softmax", 2), ("post_ffn_residual", 2), ("final_norm", None)):
        np.testing.assert_array_equal(patched[key], clean[key], err_msg=str(key))


def test_fused_stages_honour_their_hooks(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    plain, _ = stages_of(tiny, ids)
    # silu zeroed: swiglu = silu * up is zero too, and the layer's output moves
    hooked, _ = stages_of(tiny, ids, {("ffn_silu", 0): lambda v, p: v.fill(0.0)})
    assert not hooked["ffn_swigl", 0].any() and not np.array_equal(hooked["ffn_out", 0], plain["ffn_out", 0])
    # every score of key 0 pushed down: the softmax and attention output follow
    def mask_key0(v, p):
        v[:, :, 0] = -1e9
    hooked, _ = stages_of(tiny, ids, {("attn_scores", 1): mask_key0})
    probs = hooked["attn_softmax", 1]
    assert np.all(probs[:, 1:, 0] < 1e-30) and np.allclose(probs[:, 1:].sum(-1), 1, atol=1e-5)
    assert not np.array_equal(hooked["attention", 1], plain["attention", 1])
    # probabilities replaced by uniform weights: the attention output is the mean of the values
    def uniform(v, p):
        for t in range(v.shape[1]):
            v[:, t, :t + 1] = 1.0 / (t + 1)
    hooked, _ = stages_of(tiny, ids, {("attn_softmax", 0): uniform})
    assert not np.array_equal(hooked["attention", 0], plain["attention", 0])


def test_hooked_k_enters_the_cache(tiny):
    """A hook on k_post_rope changes what later decode steps attend to."""
    ids = tiny.tokenizer.encode(PROMPT)
    s1, s2 = tiny.new_session(), tiny.new_session()
    s1.prefill(ids)
    s2.prefill(ids, hooks={("k_post_rope", 0): lambda v, p: v.__imul__(np.float32(3.0))})
    assert not np.array_equal(s1.forward([5]), s2.forward([5]))


def test_hooks_fire_in_every_forward_of_a_generation(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    calls = []
    toks = list(tiny.new_session().generate(ids, max_tokens=4, stop_at_eog=False,
                                            hooks={("ffn_out", 2): lambda v, p: calls.append(tuple(p)),
                                                   "lm_head": lambda v, p: calls.append(("lm", tuple(p)))}))
    P = len(ids)
    assert calls == [tuple(range(P)), ("lm", (P - 1,)), (P,), ("lm", (P,)), (P + 1,), ("lm", (P + 1,)),
                     (P + 2,), ("lm", (P + 2,))]
    assert len(toks) == 4


def test_a_hook_that_never_fires_is_an_error(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    with pytest.raises(EngineError, match="ffn_out layer 7 never ran"):
        stages_of(tiny, ids, {("ffn_out", 7): lambda v, p: None})
    with pytest.raises(EngineError, match="not callable"):
        stages_of(tiny, ids, {("ffn_out", 0): 3})
