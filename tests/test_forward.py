"""The engine's forward against an independent numpy forward, and KV-cached decode vs full recompute."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import engine_for, model_file
from tests.helpers import KeepSink, rel_err


# Our kernels and numpy differ only in float32 summation order (and exp/cos/sin
# rounding); over a whole model that stays below ~1e-3 of each stage's scale.
STAGE_REL_TOL = 2e-3


@pytest.mark.model
@pytest.mark.parametrize("key", ["smollm2-135m-q4_1", "qwen2.5-coder-0.5b-q4_k_m"])
def test_every_stage_matches_numpy_reference(key):
    from tests.reference_forward import ReferenceModel
    eng = engine_for(key, exact=True)
    ids = eng.tokenizer.encode("What is 2+2? Answer briefly, then explain.")
    n_layers = eng.config.n_layers if key.startswith("smollm2") else 3
    ref = ReferenceModel(model_file(key)).forward(ids, n_layers=None if n_layers == eng.config.n_layers else n_layers)
    sink = KeepSink()
    from engine.forward import forward
    forward(eng.model, eng.kv, np.asarray(ids), 0, sink)
    compared = 0
    for (stage, layer), want in ref.items():
        got = sink.kept[stage, layer]
        assert got.shape == want.shape, (stage, layer)
        assert not np.isnan(got).any(), f"{stage}/{layer} not fully written"
        err = rel_err(got, want)
        assert err <= STAGE_REL_TOL, f"{stage} layer {layer}: relative error {err:.2e}"
        compared += 1
    assert compared >= 16 * n_layers


@pytest.mark.model
@pytest.mark.parametrize("key", ["smollm2-135m-q4_1", "qwen2.5-coder-0.5b-q4_k_m"])
def test_kv_cached_decode_equals_full_recompute(key):
    # exact mode: decode steps in float32 like the prompt, so only summation order differs
    eng = engine_for(key, exact=True)
    prompt = eng.tokenizer.encode("def fibonacci(n):\n    ")
    gen = list(eng.generate(prompt, max_tokens=12, stop_at_eog=False))
    seq = prompt + gen
    # step logits from the cache: prefill, then one token at a time
    cached = [eng.prefill(prompt)[None]]
    for i, t in enumerate(gen[:-1]):
        cached.append(eng.forward([t], pos=len(prompt) + i))
    cached = np.concatenate(cached)
    full = eng.forward(seq[:-1], all_logits=True)[len(prompt) - 1:]
    # matvec vs batched matmul differ only in summation order: logits agree to ~1e-4 of their scale
    err = np.max(np.abs(cached - full))
    assert err <= 2e-3 * np.max(np.abs(full)), err
    assert (np.argmax(cached, 1) == np.array(gen)).all()


# The default decode step quantizes activations to int8 (llama.cpp's approximation), so it
# is held to the bounds test_parity_llamacpp.py accepts between llama.cpp's int8 forward and
# an exact float32 one: max |diff| 0.75, cosine 0.999 (Qwen).
@pytest.mark.model
@pytest.mark.parametrize("key", ["qwen2.5-coder-0.5b-q4_k_m", "qwen2.5-coder-1.5b-q4_k_m"])
def test_int8_decode_close_to_exact_decode(key):
    fast, exact = engine_for(key), engine_for(key, exact=True)
    prompt = fast.tokenizer.encode("def fibonacci(n):\n    ")
    gen = list(exact.generate(prompt, max_tokens=8, stop_at_eog=False))
    fast.prefill(prompt)
    exact.prefill(prompt)
    for i, t in enumerate(gen[:-1]):
        a = fast.forward([t], pos=len(prompt) + i)[0].astype(np.float64)
        b = exact.forward([t], pos=len(prompt) + i)[0].astype(np.float64)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert np.abs(a - b).max() <= 0.75 and cos >= 0.999, (i, np.abs(a - b).max(), cos)
        assert not np.array_equal(a, b)   # the int8 path really ran
