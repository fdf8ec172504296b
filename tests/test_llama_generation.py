"""`capture_llama_generation`: llama.cpp's intermediates while it decodes a sequence token by token.

Tests that run llama.cpp need llama-cpp-python (the optional extra
``pip install '.[llamacpp]'``) and skip, saying so, without it; real-model tests fetch the
model on first use (``NUMGGUF_OFFLINE=1`` skips instead).

The sequence is the prompt "def fib(n):" (raw) plus 8 tokens llama.cpp itself generated
greedily (``llama_cpp.Llama``); the capture feeds the prompt in one llama_decode and the 8
tokens one llama_decode each. Measured (llama-cpp-python 0.3.36, CPU build without AMX):
- the prompt rows equal capture_llama of the prompt bit for bit (same micro-batch size, same
  256-cell context);
- against capture_llama of the whole sequence (12-13 tokens) in one batch, the worst per-row
  cosine of the decode rows of post_ffn_residual / ffn_swigl, layers 0-3, is 0.99972
  (qwen2.5-coder-0.5b, ffn_swigl layer 3; layers 0-23: 0.99937) and 1 - 2e-16 (smollm2-135m,
  close but not bit for bit; layers 0-29: 0.99912): llama.cpp's one-token decode and its batch
  take different kernel paths, so they agree closely, not exactly;
- lm_head row i's argmax is llama.cpp's greedy token i, for all 9 rows.
"""
from __future__ import annotations

import importlib.util
import json
import math
import types

import numpy as np
import pytest

from engine.errors import EngineError
from tests.conftest import model_file
from trace.aprt import read_aprt, stage_path
from trace.llama_capture import _Collector, capture_llama, capture_llama_generation
from trace.sink import GenerationSink
from trace.plan import TracePlan

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed "
                                 "(optional extra: pip install '.[llamacpp]')")
PROMPT = "def fib(n):"
N_DECODE = 8
LAYERS = (0, 1, 2, 3)
STAGES = ("embedding", "attn_scores", "attn_softmax", "ffn_swigl", "post_ffn_residual", "final_norm", "lm_head")
COSINE = 0.999
MODELS = ("qwen2.5-coder-0.5b-q4_k_m", "smollm2-135m-q4_1")
# one llama.cpp thread: on the 2 cores shared with other work, ggml's spinning thread barriers made
# 2 threads 10-50x slower than 1 (a 12-token prefill: 8 s vs 0.4 s); the values do not depend on it
THREADS = 1


def load(out):
    manifest = json.loads((out / "manifest.json").read_text())
    values = {(e["stage"], e["layer"]): np.asarray(read_aprt(out / e["path"]).values).reshape(e["shape"])
              for e in manifest["files"]}
    return manifest, values


def row_cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- without llama.cpp: the collector and the row files on synthetic graph nodes ---------------------

class _Node:
    def __init__(self, name, op, values, op_params=(0,) * 16):
        self.name, self.op, self.values, self.ne, self.op_params = name, op, values, values.shape[::-1], op_params


def _scale_param(scale: float) -> tuple:
    return (int(np.float32(scale).view(np.int32)),) + (0,) * 15


def _forward_nodes(pos0, n, n_kv_pad, heads, dim, vocab, rng, leak=False):
    """One fake 1-layer llama.cpp forward: (name, op, numpy values) in compute order."""
    kq = rng.standard_normal((1, heads, n, n_kv_pad)).astype(np.float32)
    logits = np.where(np.arange(n_kv_pad)[None, :] <= pos0 + np.arange(n)[:, None], kq[0], -np.inf)
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft = (soft / soft.sum(-1, keepdims=True)).astype(np.float32)[None]
    if leak:
        soft[0, 0, -1, -1] = 0.5  # probability on an empty (padding) cell
    return [("embd", "GET_ROWS", rng.standard_normal((1, 1, n, dim)).astype(np.float32)),
            ("kq-0", "MUL_MAT", kq), ("kq_soft_max-0", "SOFT_MAX", soft),
            ("l_out-0", "ADD", rng.standard_normal((1, 1, n, dim)).astype(np.float32)),
            ("result_norm", "MUL", rng.standard_normal((1, 1, n, dim)).astype(np.float32)),
            ("result_output", "MUL_MAT", rng.standard_normal((1, 1, n, vocab)).astype(np.float32))]


def _cfg(heads, dim, vocab):
    """The config fields a GenerationSink sizes its files from (one layer, every width = dim) and the
    llama.cpp collector reads (architecture, attention window)."""
    from types import SimpleNamespace
    return SimpleNamespace(n_layers=1, n_heads=heads, dim=dim, vocab=vocab, q_dim=dim, kv_dim=dim, ffn_dim=dim,
                           arch="qwen2", window=lambda layer: 0)


def test_generation_files_rows_from_synthetic_forwards(tmp_path):
    """Prompt of 3 then 2 one-token forwards: rows land at their positions, lm_head one row per forward,
    attention rows over keys 0..t with zeros after; files appear only when published."""
    heads, dim, vocab, n_prompt, T, scale = 2, 4, 5, 3, 5, 0.25
    plan = TracePlan(("embedding", "attn_scores", "attn_softmax", "post_ffn_residual", "lm_head"), (0,))
    files = GenerationSink(tmp_path, plan, _cfg(heads, dim, vocab), T, n_prompt)
    files.create()
    col = _Collector(files, plan, n_prompt, _cfg(heads, dim, vocab), False)
    rng = np.random.default_rng(0)
    fed = []
    for step, (pos0, n) in enumerate([(0, 3), (3, 1), (4, 1)]):
        files.begin(pos0, n)
        col.begin(pos0, n)
        nodes = _forward_nodes(pos0, n, 256, heads, dim, vocab, rng)
        fed.append((pos0, n, {name: v for name, _, v in nodes}))
        for name, op, v in nodes:
            # only the nodes the plan needs are read: no final_norm planned, so not result_norm
            assert col.want(name, op) == (name != "result_norm"), name
            if name == "result_norm":
                continue
            col.take(_Node(name, op, v, _scale_param(scale) if name.startswith("kq_soft_max") else (0,) * 16))
        assert col.written == {("embedding", None), ("attn_scores", 0), ("attn_softmax", 0),
                               ("post_ffn_residual", 0), ("lm_head", None)}
    assert not list(tmp_path.rglob("*.bin"))  # nothing looks complete before finish
    written = files.finish(T)
    assert [(s, L, shape) for s, L, shape, _ in written] == [
        ("embedding", None, (T, dim)), ("attn_scores", 0, (heads, T, T)), ("attn_softmax", 0, (heads, T, T)),
        ("post_ffn_residual", 0, (T, dim)), ("lm_head", None, (T - n_prompt + 1, vocab))]
    assert not list(tmp_path.rglob("*.partial"))
    got = {(s, L): np.asarray(read_aprt(p).values).reshape(shape) for s, L, shape, p in written}
    assert read_aprt(stage_path(tmp_path, "attn_scores", 0)).layer == 0
    assert read_aprt(stage_path(tmp_path, "lm_head", None)).layer is None
    for step, (pos0, n, v) in enumerate(fed):
        rows = slice(pos0, pos0 + n)
        np.testing.assert_array_equal(got["embedding", None][rows], v["embd"].reshape(n, dim))
        np.testing.assert_array_equal(got["post_ffn_residual", 0][rows], v["l_out-0"].reshape(n, dim))
        np.testing.assert_array_equal(got["lm_head", None][step], v["result_output"].reshape(n, vocab)[-1])
        np.testing.assert_array_equal(got["attn_softmax", 0][:, rows, :pos0 + n], v["kq_soft_max-0"][0, :, :, :pos0 + n])
        want = np.where(np.tri(n, pos0 + n, pos0, dtype=bool), v["kq-0"][0, :, :, :pos0 + n] * np.float32(scale), 0)
        np.testing.assert_array_equal(got["attn_scores", 0][:, rows, :pos0 + n], want)
    for stage in ("attn_scores", "attn_softmax"):
        assert not np.triu(got[stage, 0], 1).any(), stage
    np.testing.assert_allclose(got["attn_softmax", 0].sum(-1), 1, rtol=1e-6)


def test_probability_on_a_masked_cell_is_an_error(tmp_path):
    plan = TracePlan(("attn_softmax",), (0,))
    files = GenerationSink(tmp_path, plan, _cfg(2, 4, 5), 4, 3)
    files.create()
    col = _Collector(files, plan, 3, _cfg(2, 4, 5), False)
    files.begin(3, 1)
    col.begin(3, 1)
    nodes = _forward_nodes(3, 1, 256, 2, 4, 5, np.random.default_rng(1), leak=True)
    name, op, v = nodes[2]
    assert col.want(name, op)
    with pytest.raises(EngineError, match="position 3 puts probability on a KV cell after cell 3"):
        col.take(_Node(name, op, v, _scale_param(0.5)))


def test_bad_prompt_length_or_context_is_an_error(tmp_path):
    cfg = types.SimpleNamespace(arch="llama", n_layers=2, context=8)
    plan = TracePlan(("lm_head",), ())
    for ids, n_prompt in (([1, 2, 3], 0), ([1, 2, 3], 4)):
        with pytest.raises(EngineError, match="the prompt must be 1..3 of the 3 tokens"):
            capture_llama_generation("absent.gguf", ids, n_prompt, plan, tmp_path, "", cfg)
    with pytest.raises(EngineError, match="no tokens"):
        capture_llama_generation("absent.gguf", [], 0, plan, tmp_path, "", cfg)
    with pytest.raises(EngineError, match="exceeds the model's context length 8"):
        capture_llama_generation("absent.gguf", list(range(9)), 2, plan, tmp_path, "", cfg)
    assert not any(tmp_path.iterdir())


# -- with llama.cpp ---------------------------------------------------------------------------------

def _greedy(path, n_new: int):
    """The prompt's token ids and n_new tokens llama.cpp generates from them greedily."""
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    try:
        prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        new = []
        for tok in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            new.append(int(tok))
            if len(new) == n_new:
                break
    finally:
        llm.close()
    return [int(i) for i in prompt_ids], new


@pytest.fixture(scope="module", params=MODELS)
def captured(request, tmp_path_factory):
    """Per model: a greedy sequence, its generation capture, and capture_llama of the prompt and of it all."""
    if not HAVE_LLAMA:
        pytest.skip("llama-cpp-python is not installed (optional extra: pip install '.[llamacpp]')")
    from engine.gguf_reader import GGUFFile
    from engine.model import read_config
    key = request.param
    path = model_file(key)
    cfg = read_config(GGUFFile(path))
    prompt_ids, greedy = _greedy(path, N_DECODE + 1)  # one more: the token lm_head's last row predicts
    ids = prompt_ids + greedy[:N_DECODE]
    plan = TracePlan(STAGES, LAYERS)
    root = tmp_path_factory.mktemp(key)
    dirs = {name: root / name for name in ("gen", "prompt", "full")}
    for d in dirs.values():
        d.mkdir()
    capture_llama_generation(path, ids, len(prompt_ids), plan, dirs["gen"], PROMPT, cfg, n_threads=THREADS)
    capture_llama(path, prompt_ids, plan, dirs["prompt"], PROMPT, cfg, n_threads=THREADS)
    capture_llama(path, ids, plan, dirs["full"], PROMPT, cfg, n_threads=THREADS)
    return types.SimpleNamespace(key=key, path=path, cfg=cfg, ids=ids, n_prompt=len(prompt_ids), greedy=greedy,
                                 plan=plan, dirs=dirs, **{n: load(d) for n, d in dirs.items()})


@needs_llama
@pytest.mark.model
def test_generation_manifest_and_files(captured):
    c = captured
    m, values = c.gen
    T, n, cfg = len(c.ids), c.n_prompt, c.cfg
    assert m["layout"] == "generation" and m["engine"] == "llama.cpp"
    assert m["token_ids"] == c.ids and m["n_tokens"] == T and m["prompt_tokens"] == n
    assert m["generated_ids"] == c.ids[n:] == c.greedy[:N_DECODE]
    prefill, _ = c.prompt
    assert set(m) - set(prefill) == {"layout", "prompt_tokens", "generated_ids"}  # capture_llama's keys, and these
    assert {k: m[k] for k in ("prompt", "stages", "layers", "derived", "unavailable", "arch", "n_layers")} \
        == {k: prefill[k] for k in ("prompt", "stages", "layers", "derived", "unavailable", "arch", "n_layers")}
    shapes = {(e["stage"], e["layer"]): tuple(e["shape"]) for e in m["files"]}
    assert list(shapes) == [(s, L) for s, L in ([("embedding", None)] + [(s, L) for L in LAYERS for s in STAGES
                                                if s not in ("embedding", "final_norm", "lm_head")]
                                                + [("final_norm", None), ("lm_head", None)])]
    for (stage, layer), shape in shapes.items():
        want = {"attn_scores": (cfg.n_heads, T, T), "attn_softmax": (cfg.n_heads, T, T),
                "ffn_swigl": (T, cfg.ffn_dim), "lm_head": (T - n + 1, cfg.vocab)}.get(stage, (T, cfg.dim))
        assert shape == want, (stage, layer)
        head = read_aprt(stage_path(c.dirs["gen"], stage, layer))
        assert head.layer == layer and head.count == math.prod(shape)  # layer None: the WHOLE_MODEL field
    assert not list(c.dirs["gen"].rglob("*.partial"))


@needs_llama
@pytest.mark.model
def test_prompt_rows_equal_capture_llama_of_the_prompt(captured):
    """The prompt's forward is the same llama_decode as capture_llama's: bit for bit."""
    _, gen = captured.gen
    _, prompt = captured.prompt
    n = captured.n_prompt
    assert set(gen) == set(prompt)
    for (stage, layer), want in prompt.items():
        got = gen[stage, layer]
        if stage in ("attn_scores", "attn_softmax"):
            np.testing.assert_array_equal(got[:, :n, :n], want, err_msg=f"{stage} {layer}")
            assert not got[:, :n, n:].any(), f"{stage} {layer}: prompt rows see later keys"
        elif stage == "lm_head":
            np.testing.assert_array_equal(got[:1], want, err_msg=stage)
        else:
            np.testing.assert_array_equal(got[:n], want, err_msg=f"{stage} {layer}")


@needs_llama
@pytest.mark.model
def test_decode_rows_agree_with_one_batch(captured):
    """Decode rows vs capture_llama of the whole sequence in one batch: cosine >= 0.999 per row."""
    _, gen = captured.gen
    _, full = captured.full
    n = captured.n_prompt
    worst = {}
    for stage in ("post_ffn_residual", "ffn_swigl"):
        for layer in LAYERS:
            cos = row_cosines(gen[stage, layer][n:], full[stage, layer][n:])
            worst[stage, layer] = float(cos.min())
    (ws, wl), wc = min(worst.items(), key=lambda kv: kv[1])
    print(f"\n{captured.key}: decode rows vs one batch, worst cosine {wc:.7f} ({ws} layer {wl}); 1 - cosine: "
          + " ".join(f"{s}[{L}]={1 - c:.1e}" for (s, L), c in worst.items()))
    bad = {k: round(c, 6) for k, c in worst.items() if not c >= COSINE}
    assert not bad, f"below cosine {COSINE}: {bad}"


@needs_llama
@pytest.mark.model
def test_lm_head_rows_predict_the_greedy_tokens(captured):
    """Row i holds the logits generated token i was sampled from (row 0: the prompt's last position)."""
    _, gen = captured.gen
    lm = gen["lm_head", None]
    assert lm.shape[0] == N_DECODE + 1
    assert lm.argmax(-1).tolist() == captured.greedy


@needs_llama
@pytest.mark.model
def test_attention_rows_are_causal_and_normalised(captured):
    _, gen = captured.gen
    T = len(captured.ids)
    for layer in LAYERS:
        for stage in ("attn_scores", "attn_softmax"):
            assert not np.triu(gen[stage, layer], 1).any(), f"{stage} {layer}: nonzero above the diagonal"
        soft = gen["attn_softmax", layer].astype(np.float64)
        np.testing.assert_allclose(soft.sum(-1), np.ones((soft.shape[0], T)), atol=1e-5, err_msg=f"layer {layer}")


@needs_llama
@pytest.mark.model
def test_failed_generation_capture_leaves_nothing(tmp_path, monkeypatch):
    """An exception in the middle of the decode steps removes every file; no manifest is written."""
    from engine.gguf_reader import GGUFFile
    from engine.model import read_config
    path = model_file("smollm2-135m-q4_1")
    cfg = read_config(GGUFFile(path))
    begin = GenerationSink.begin

    def failing_begin(self, pos0, n):
        if pos0 == 7:   # the third decode step after the 5-token prompt
            raise KeyboardInterrupt
        begin(self, pos0, n)

    monkeypatch.setattr(GenerationSink, "begin", failing_begin)
    with pytest.raises(KeyboardInterrupt):
        capture_llama_generation(path, list(range(100, 108)), 5,
                                 TracePlan(("attn_softmax", "post_ffn_residual", "lm_head"), (0,)), tmp_path,
                                 PROMPT, cfg, n_threads=THREADS)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
