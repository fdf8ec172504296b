"""Kernel and forward benchmarks (pytest-benchmark); never part of the unit tests.

    python -m pytest bench/bench_kernels.py                 # from the repository root
    python -m pytest bench/bench_kernels.py -k "Q4_K and matvec"

- matvec (1 token, decode) and matmul (128 tokens, prefill) for every quant type on the
  1.5B's matrix shapes (random blocks with finite scales: speed does not depend on values),
  float32 activations (`matmul`, the exact path) and int8 ones (`matmul_int8` including the
  activations' quantization, the default path);
- one decode step and one 128-token prefill forward of each real model in the model cache.
Threads: NUMBA_NUM_THREADS / the default (all cores); set OPENBLAS_NUM_THREADS=1.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from kernels.matmul import Int8Activations, int8_kind, matmul, matmul_int8  # noqa: E402
from kernels.quants import GGML_TYPES, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, type_name  # noqa: E402

TYPES = (Q4_K, Q6_K, Q4_1, Q5_0, Q8_0)
# (rows, cols) of the 1.5B: attn_q/attn_output, attn_k/v, ffn_gate/up, ffn_down, lm_head
SHAPES = {"q_o 1536x1536": (1536, 1536), "k_v 256x1536": (256, 1536), "gate_up 8960x1536": (8960, 1536),
          "down 1536x8960": (1536, 8960), "lm_head 151936x1536": (151936, 1536)}
SCALE_OFFSETS = {Q4_1: (0, 2), Q5_0: (0,), Q8_0: (0,), Q4_K: (0, 2), Q6_K: (208,)}
_W = {}


def weights(qtype, rows, cols):
    key = (qtype, rows, cols)
    if key not in _W:
        rng = np.random.default_rng(0)
        elems, bsize = GGML_TYPES[qtype]
        w = rng.integers(0, 256, (rows, cols // elems, bsize), dtype=np.uint8)
        for off in SCALE_OFFSETS[qtype]:
            w[:, :, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        _W.clear()
        _W[key] = w.reshape(rows, -1)
    return _W[key]


def _case(kind, qtype, shape_name):
    rows, cols = SHAPES[shape_name]
    if cols % GGML_TYPES[qtype][0]:
        pytest.skip("shape not a whole number of blocks")
    n = 1 if kind == "matvec" else 128
    w = weights(qtype, rows, cols)
    x = np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32)
    out = np.empty((n, rows), np.float32)
    matmul(w, qtype, x, out)  # compile / load from cache
    return w, x, out, n * rows * cols


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("qtype", TYPES, ids=type_name)
def test_matvec(benchmark, qtype, shape_name):
    w, x, out, macs = _case("matvec", qtype, shape_name)
    benchmark.group = f"matvec {shape_name}"
    benchmark.extra_info["MACs"] = macs
    benchmark.pedantic(matmul, args=(w, qtype, x, out), rounds=10 if "lm_head" in shape_name else 30,
                       iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("shape_name", ["q_o 1536x1536", "gate_up 8960x1536", "down 1536x8960"])
@pytest.mark.parametrize("qtype", TYPES, ids=type_name)
def test_matmul_128(benchmark, qtype, shape_name):
    w, x, out, macs = _case("matmul", qtype, shape_name)
    benchmark.group = f"matmul 128 tokens {shape_name}"
    benchmark.extra_info["MACs"] = macs
    benchmark.pedantic(matmul, args=(w, qtype, x, out), rounds=5, iterations=1, warmup_rounds=1)


def _int8(w, qtype, x, out, acts):
    matmul_int8(w, qtype, acts.quantize(x, int8_kind(qtype, x.shape[1])), out)


@pytest.mark.parametrize("n", [1, 128])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("qtype", TYPES, ids=type_name)
def test_int8(benchmark, qtype, shape_name, n):
    if n == 128 and "lm_head" in shape_name:
        pytest.skip("a prompt's lm_head is one row")
    w, x, out, macs = _case("matvec" if n == 1 else "matmul", qtype, shape_name)
    acts = Int8Activations()
    _int8(w, qtype, x, out, acts)  # compile / load from cache
    benchmark.group = f"int8 {n} token{'s' * (n > 1)} {shape_name}"
    benchmark.extra_info["MACs"] = macs
    benchmark.pedantic(_int8, args=(w, qtype, x, out, acts), rounds=10 if "lm_head" in shape_name or n > 1 else 30,
                       iterations=1, warmup_rounds=1)


MODELS = ("qwen2.5-coder-1.5b-q4_k_m", "qwen2.5-coder-0.5b-q4_k_m", "smollm2-135m-q4_1")
@pytest.mark.model
@pytest.mark.parametrize("key", MODELS)
def test_decode_step(benchmark, cached_engine, key):
    eng = cached_engine(key)
    ids = list(range(100, 228))
    eng.prefill(ids)
    benchmark.group = "decode step (position 128)"
    benchmark.pedantic(eng.forward, args=([1000],), kwargs={"pos": 128}, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.model
@pytest.mark.parametrize("key", MODELS)
def test_prefill_128(benchmark, cached_engine, key):
    eng = cached_engine(key)
    ids = list(range(100, 228))
    benchmark.group = "prefill 128 tokens"
    benchmark.pedantic(eng.prefill, args=(ids,), rounds=3, iterations=1, warmup_rounds=1)
