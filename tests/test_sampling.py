"""Sampler: greedy, temperature, top-k and top-p behave as documented."""
import numpy as np
import pytest

from engine.errors import EngineError
from engine.sampling import Sampler


def test_greedy_picks_lowest_id_on_ties():
    assert Sampler()(np.array([1.0, 3.0, 3.0, 2.0], np.float32)) == 1


def test_top_k_one_is_greedy():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    s = Sampler(temperature=1.5, top_k=1, seed=3)
    assert all(s(logits) == int(np.argmax(logits)) for _ in range(20))


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    s = Sampler(temperature=1.0, top_p=0.7, seed=1)
    assert {s(logits) for _ in range(300)} == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    s = Sampler(temperature=1.0, seed=5)
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"temperature": float("nan")}, {"top_p": 0.0},
                                {"top_p": 1.5}, {"top_k": -2}])
def test_bad_parameters_are_clear_errors(kw):
    with pytest.raises(EngineError):
        Sampler(**kw)
