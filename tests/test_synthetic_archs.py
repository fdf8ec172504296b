"""qwen3, phi3, Llama 3 / linear RoPE scaling and llama files with a sliding window, against
llama.cpp 0.3.36 run live on small synthetic GGUF files (tests/synthetic.py: dim 256, 4 heads of
64, 2 KV heads, ffn 512, 2 layers, random weights, the gpt2 test vocabulary of 266 tokens).

What each case checks (facts from llama.cpp's graph, see engine/arch.py):
- qwen3: per-head RMS norms of Q and K (attn_q_norm / attn_k_norm) before NeoX RoPE, no biases.
- phi3: fused attn_qkv (rows q, k, v) and fused ffn_up (gate half first), split at load into
  row views of the memory map; NeoX RoPE. Its attention.sliding_window is ignored, as llama.cpp
  ignores it ("Phi SWA is currently disabled").
- llama3: rope_freqs.weight, each rotary frequency divided by its factor (factors 1..8 here).
- linear: rope.scaling.type linear, factor 4 (positions / 4).
- gemma3_linear: linear RoPE scaling on gemma3 (6 layers, window 16): only the global layers are
  scaled (llama.cpp sets rope_freq_scale_train_swa = 1 for gemma3; get_rope_freq_scale).
- llama_swa: llama.attention.sliding_window = 16 on a llama file, prompts of 24 to 64 tokens:
  llama.cpp ignores the key (its llama graph has no sliding window), so we do; a forward that
  applied the window to every layer would be far outside the bounds (test_the_feature_matters).
Each case is also run with the feature left out or done the other way (no Q/K norms, gate and
up swapped, no frequency factors, no scaling, NORM instead of NeoX RoPE): each lands far outside
the bounds, so the bounds do test the feature.

Bounds: ~1.4x the difference of our exact float32 forward (Engine(exact=True)) from llama.cpp,
the worst over the cases and prompts of each weight type (measured: F32 max 0.0196 / mean
0.0054 / cosine 0.99999968, Q8_0 max 0.667 / mean 0.185 / cosine 0.99958; the default forward
is closer: F32 max 0.0192, Q8_0 max 0.554). Llama-style files with a tied output have logits of
std ~8 on this vocabulary (qwen3's own output.weight: ~1.2), which is what sets the scale of the
Q8_0 noise. The wrong variants are at max >= 1.12 and mean >= 0.29 (gemma3_linear unscaled: one
global layer of six; qwen3 without Q/K norms: 2.0 / 0.52; the others >= 19 / >= 5): at least
39x the F32 bounds; test_the_feature_matters asks for 20x.
MARGIN: a llama.cpp near-tie below this is not a disagreement (greedy tokens compared up to
the first such step; teacher-forced, our top-1 within MARGIN of llama.cpp's): ~1.4x the largest
change we make to the gap between llama.cpp's top two logits over the 8 teacher-forced steps
(measured, exact and default forwards: F32 0.026, Q8_0 0.66 on the Q8_0 cases here, 0.80 on a
Q8_0 llama_swa file). With Q8_0 many steps are near-ties by that measure, so the greedy check
mostly runs on the F32 files (8 clear steps on nearly every F32 prompt).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from tests.synthetic import write_tiny_model
from tests.test_llama_trace import needs_llama

F32, Q8_0 = int(T.F32), int(T.Q8_0)
# (max |diff|, mean |diff|, cosine) of the last position's logits, per weight type
BOUNDS = {F32: (0.0275, 0.0075, 0.99999955), Q8_0: (0.93, 0.26, 0.99941)}
MARGIN = {F32: 0.04, Q8_0: 1.0}
STEPS = 8
WINDOW = 16
CASES = {
    "qwen3": dict(arch="qwen3"),
    "phi3": dict(arch="phi3", overrides={"uint32": {"attention.sliding_window": WINDOW}}),
    "llama3": dict(arch="llama", extra_tensors={"rope_freqs.weight": np.linspace(1, 8, 32).astype(np.float32)}),
    "linear": dict(arch="llama", overrides={"string": {"rope.scaling.type": "linear"},
                                            "float32": {"rope.scaling.factor": 4.0}}),
    "llama_swa": dict(arch="llama", overrides={"uint32": {"attention.sliding_window": WINDOW}}),
    # 6 layers: five sliding-window layers (RoPE base 10k, never scaled) and one global (base 1M, / 4)
    "gemma3_linear": dict(arch="gemma3", n_layers=6, overrides={
        "uint32": {"attention.sliding_window": WINDOW}, "string": {"rope.scaling.type": "linear"},
        "float32": {"rope.scaling.factor": 4.0, "rope.freq_base": 1e6}}),
}
QTYPES = {"qwen3": (F32, Q8_0), "phi3": (F32, Q8_0), "llama3": (F32, Q8_0), "linear": (F32,), "llama_swa": (F32,),
          "gemma3_linear": (F32,)}
PARAMS = [pytest.param(c, q, id=f"{c}-{T(q).name}") for c in CASES for q in QTYPES[c]]


def prompts() -> dict[str, list[int]]:
    """Token ids given directly: every prompt is longer than WINDOW, so a window would matter."""
    rng = np.random.default_rng(7)
    return {"a": [int(t) for t in rng.integers(0, 263, 40)], "b": [int(t) for t in rng.integers(0, 263, 24)],
            "c": list(range(32, 96))}


PROMPTS = prompts()
_STATE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _close_llamas():
    """llama.cpp's models are freed here, not at interpreter exit (where its library may be gone)."""
    yield
    for key in [k for k in _STATE if k[0] == "llama"]:
        _STATE.pop(key).close()


def model_file(tmp_path_factory, case: str, qtype: int):
    key = ("file", case, qtype)
    if key not in _STATE:
        path = tmp_path_factory.mktemp("archs") / f"{case}-{T(qtype).name}.gguf"
        _STATE[key] = write_tiny_model(path, qtype=qtype, seed=3, **CASES[case])
    return _STATE[key]


def engine(path, exact: bool = False):
    from engine.api import Engine
    key = ("engine", str(path), exact)
    if key not in _STATE:
        _STATE[key] = Engine(path, n_ctx=256, exact=exact)
    return _STATE[key]


def llama(path):
    from llama_cpp import Llama
    key = ("llama", str(path))
    if key not in _STATE:
        _STATE[key] = Llama(str(path), n_ctx=256, n_batch=256, n_ubatch=256, n_threads=2, n_threads_batch=2,
                            flash_attn=False, n_gpu_layers=0, verbose=False)
    return _STATE[key]


def logit_stats(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    d = np.abs(got - want)
    return float(d.max()), float(d.mean()), float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))


def within(stats, qtype) -> bool:
    mx, mean, cos = BOUNDS[qtype]
    return stats[0] <= mx and stats[1] <= mean and stats[2] >= cos


def compare(tmp_path_factory, case: str, qtype: int, name: str) -> dict:
    from tests.test_parity_quant_types import llama_greedy
    key = ("cmp", case, qtype, name)
    if key in _STATE:
        return _STATE[key]
    path = model_file(tmp_path_factory, case, qtype)
    eng, llm, ids = engine(path), llama(path), PROMPTS[name]
    greedy, want = llama_greedy(llm, ids, STEPS)
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = next((i for i, m in enumerate(top2[:, 1] - top2[:, 0]) if m < MARGIN[qtype]), STEPS)
    forced = eng.forward(ids + greedy[:-1], all_logits=True)[len(ids) - 1:].astype(np.float64)
    lag = want.max(axis=1) - want[np.arange(STEPS), forced.argmax(axis=1)]
    got = eng.forward(ids)[0].astype(np.float64)
    exact = engine(path, exact=True).forward(ids)[0].astype(np.float64)
    ours = list(eng.generate(ids, max_tokens=clear, stop_at_eog=False)) if clear else []
    _STATE[key] = r = {"want": want[0], "greedy": greedy, "clear": clear, "ours": ours, "lag": lag,
                       "stats": logit_stats(got, want[0]), "exact": logit_stats(exact, want[0])}
    return r


@needs_llama
@pytest.mark.parametrize("case,qtype", PARAMS)
@pytest.mark.parametrize("name", list(PROMPTS))
def test_last_position_logits_close(tmp_path_factory, case, qtype, name):
    r = compare(tmp_path_factory, case, qtype, name)
    print(f"{case}/{T(qtype).name}/{name}: default max {r['stats'][0]:.4f} mean {r['stats'][1]:.5f} "
          f"cosine {r['stats'][2]:.8f}; exact max {r['exact'][0]:.4f} mean {r['exact'][1]:.5f} "
          f"cosine {r['exact'][2]:.8f}")
    assert within(r["stats"], qtype), f"default forward: {r['stats']} (bounds {BOUNDS[qtype]})"
    assert within(r["exact"], qtype), f"exact forward: {r['exact']} (bounds {BOUNDS[qtype]})"


@needs_llama
@pytest.mark.parametrize("case,qtype", PARAMS)
@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_and_teacher_forced(tmp_path_factory, case, qtype, name):
    r = compare(tmp_path_factory, case, qtype, name)
    print(f"{case}/{T(qtype).name}/{name}: {r['clear']} clear steps, lag max {r['lag'].max():.4f}")
    bad = [(k, round(float(v), 4)) for k, v in enumerate(r["lag"]) if v > MARGIN[qtype]]
    assert not bad, f"steps where our top-1 is more than {MARGIN[qtype]} below llama.cpp's top-1: {bad}"
    assert r["ours"] == r["greedy"][:r["clear"]], \
        f"greedy tokens differ within the first {r['clear']} clear steps: {r['ours']} vs {r['greedy']}"


def _no_qk_norm(eng):
    eng.model.weights = dataclasses.replace(eng.model.weights, layers=tuple(
        dataclasses.replace(layer, q_norm=None, k_norm=None) for layer in eng.model.weights.layers))


def _swap_gate_up(eng):
    from kernels.matmul import MatmulGroup
    for g, layer in zip(eng.model.matmuls, eng.model.weights.layers):
        g.gate_up = MatmulGroup([(w.data, w.qtype) for w in (layer.w_up, layer.w_gate)], eng.model.exact)


def _rope_norm(eng):
    eng.model.cfg = dataclasses.replace(eng.model.cfg, rope_neox=False)


def _no_freq_factors(eng):
    eng.model.inv_freq = [f * eng.model.weights.rope_freqs for f in eng.model.inv_freq]


def _no_linear_scale(eng):
    eng.model.inv_freq = [f / eng.model.cfg.rope_scale_of(li) for li, f in enumerate(eng.model.inv_freq)]


def _linear_scale_every_layer(eng):   # gemma3's sliding-window layers scaled too (llama.cpp: they are not)
    cfg = eng.model.cfg
    eng.model.inv_freq = [f / cfg.rope_scale_of(li) * cfg.rope_freq_scale for li, f in enumerate(eng.model.inv_freq)]


def _window_every_layer(eng):   # what a sliding window on every layer would give (llama.cpp does not apply it)
    cfg = eng.model.cfg
    eng.model.cfg = dataclasses.replace(cfg, sliding_window=WINDOW, swa_pattern=cfg.n_layers + 1,
                                        rope_base_swa=cfg.rope_base)


# case -> the feature done wrong; each must land far outside the bounds
WRONG = {"qwen3": (_no_qk_norm, _rope_norm), "phi3": (_swap_gate_up, _rope_norm), "llama3": (_no_freq_factors,),
         "linear": (_no_linear_scale,), "llama_swa": (_window_every_layer,),
         "gemma3_linear": (_no_linear_scale, _linear_scale_every_layer)}


@needs_llama
@pytest.mark.parametrize("case", list(CASES))
def test_the_feature_matters(tmp_path_factory, case):
    """Each case's feature, left out or done the other way, is clearly outside the bounds
    (for llama_swa: applying the window llama.cpp ignores)."""
    from engine.api import Engine
    path = model_file(tmp_path_factory, case, F32)
    for wrong in WRONG[case]:
        for name, ids in PROMPTS.items():
            want = compare(tmp_path_factory, case, F32, name)["want"]
            eng = Engine(path, n_ctx=256, exact=True)
            wrong(eng)
            stats = logit_stats(eng.forward(ids)[0].astype(np.float64), want)
            print(f"{case} {wrong.__name__} {name}: max {stats[0]:.3f} mean {stats[1]:.4f} cosine {stats[2]:.6f}")
            assert stats[0] > 20 * BOUNDS[F32][0] and stats[1] > 20 * BOUNDS[F32][1], (wrong.__name__, name, stats)


def test_config_from_metadata(tmp_path_factory):
    from engine.arch import model_stages
    eng = engine(model_file(tmp_path_factory, "llama_swa", F32))
    assert [eng.config.window(li) for li in range(eng.config.n_layers)] == [0, 0]   # llama.cpp ignores it
    eng = engine(model_file(tmp_path_factory, "phi3", F32))
    assert [eng.config.window(li) for li in range(eng.config.n_layers)] == [0, 0]
    assert model_stages("phi3", False) == model_stages("llama", False)
    assert engine(model_file(tmp_path_factory, "linear", F32)).config.rope_freq_scale == 0.25
    cfg = engine(model_file(tmp_path_factory, "qwen3", F32)).config
    assert (cfg.arch, cfg.rope_neox, cfg.qkv_bias, cfg.tied_output) == ("qwen3", True, False, False)
    assert {"q_norm", "k_norm"} <= set(model_stages("qwen3", False))
    cfg = engine(model_file(tmp_path_factory, "gemma3_linear", F32)).config
    assert [cfg.window(li) for li in range(6)] == [WINDOW] * 5 + [0]
    assert [cfg.rope_scale_of(li) for li in range(6)] == [1.0] * 5 + [0.25]
    assert (cfg.rope_base_of(0), cfg.rope_base_of(5)) == (10000.0, 1e6)


@pytest.mark.parametrize("qtype", [F32, Q8_0])
def test_phi3_fused_tensors_are_row_views(tmp_path_factory, qtype):
    """q/k/v and gate/up are consecutive row ranges of the memory-mapped fused tensors: no copy."""
    eng = engine(model_file(tmp_path_factory, "phi3", qtype))
    cfg, gf = eng.config, eng.gguf
    for i, layer in enumerate(eng.model.weights.layers):
        for fused, parts in ((f"blk.{i}.attn_qkv.weight", (layer.wq, layer.wk, layer.wv)),
                             (f"blk.{i}.ffn_up.weight", (layer.w_gate, layer.w_up))):
            whole = gf.tensor_bytes(fused)
            start = whole.__array_interface__["data"][0]
            r0 = 0
            for part in parts:
                assert np.shares_memory(part.data, whole) and not part.data.flags.writeable
                assert part.data.__array_interface__["data"][0] == start + r0 * whole.shape[1]
                assert part.data.shape == (part.rows, whole.shape[1]) and part.cols == cfg.dim
                r0 += part.rows
            assert r0 == whole.shape[0]


def _error_of(path) -> str:
    from engine.api import Engine
    from engine.errors import EngineError
    with pytest.raises(EngineError) as e:
        Engine(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_other_rope_scaling_types_are_one_line_errors(tmp_path, kind):
    p = write_tiny_model(tmp_path / "m.gguf", arch="llama", qtype=F32,
                         overrides={"string": {"rope.scaling.type": kind}, "float32": {"rope.scaling.factor": 4.0}})
    assert f"unsupported RoPE scaling type '{kind}'" in _error_of(p)


def test_longrope_factors_and_misplaced_rope_freqs_are_errors(tmp_path):
    p = write_tiny_model(tmp_path / "phi.gguf", arch="phi3", qtype=F32,
                         extra_tensors={"rope_factors_long.weight": np.ones(32, np.float32),
                                        "rope_factors_short.weight": np.ones(32, np.float32)})
    assert "rope_factors_long.weight (LongRoPE" in _error_of(p)
    # llama.cpp refuses this file too (qwen3 has no rope_freqs tensor: one tensor too many)
    p = write_tiny_model(tmp_path / "q3.gguf", arch="qwen3", qtype=F32,
                         extra_tensors={"rope_freqs.weight": np.ones(32, np.float32)})
    assert "rope_freqs.weight in a qwen3 model" in _error_of(p)
    p = write_tiny_model(tmp_path / "l3.gguf", arch="llama", qtype=F32,
                         extra_tensors={"rope_freqs.weight": np.ones(16, np.float32)})
    assert "rope_freqs.weight has shape [16], expected [32]" in _error_of(p)
