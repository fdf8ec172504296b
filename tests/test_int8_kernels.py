"""The int8-activation matmul against an exact integer reference.

`Int8Activations.quantize` must reproduce ggml's quantize_row_q8_K (K-quant weights) and
x86 quantize_row_q8_0 (the 32-element block types) bit for bit (independent numpy versions
below), and `matmul_int8` must equal deq(W) @ deq(xq) computed in float64. The only rounding in matmul_int8 is float32 arithmetic on each block's exact
integer sums: a few roundings per block and a float32 sum over cols/256 blocks and 8
lanes, so |error| <= (cols/256 + 8) * 2^-23 * (|deq(W)| @ |deq(xq)|); we check 1e-5 of
that sum, which holds for rows up to ~20,000 columns.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from engine import failpoints
from kernels import _mm_panel
from kernels import matmul as _kernels
from kernels._mm_int8 import mm_q8
from kernels.matmul import PANEL_MIN_TOKENS, Int8Activations, dequantize, int8_kind, int8_ready, matmul_int8_many
from kernels.quants import F16, Q2_K, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, TYPES, type_name
from tests.conftest import model_file
from tests.test_quant_kernels import random_weights


# The kernel as these tests see it: kernels/ hold no fail points, so the contract runner's
# quant.matmul_scale fault (python -m cli contracts --mutate) acts here, on its results.
def matmul_int8(w, qtype, xq, out):
    _kernels.matmul_int8(w, qtype, xq, out)
    if failpoints.active("quant.matmul_scale"):
        out *= np.float32(1.01)


def q8k_reference(x: np.ndarray):
    """ggml's quantize_row_q8_K: per 256 values, iscale = -127 / (the value of largest |x|)."""
    n, cols = x.shape
    xq = np.zeros((n, cols), np.int8)
    d = np.zeros((n, cols // 256), np.float32)
    for t in range(n):
        for b in range(cols // 256):
            blk = x[t, b * 256:(b + 1) * 256]
            i = int(np.argmax(np.abs(blk)))
            if blk[i] == 0:
                continue
            iscale = np.float32(-127.0) / blk[i]
            xq[t, b * 256:(b + 1) * 256] = np.minimum(127, np.rint(iscale * blk)).astype(np.int8)
            d[t, b] = np.float32(1.0) / iscale
    sums = xq.reshape(n, -1, 16).astype(np.int32).sum(axis=2)
    return xq, d, sums


def q8_0_reference(x: np.ndarray):
    """ggml's x86 quantize_row_q8_0: per 32 values d = max|x| / 127 stored as float16,
    q = round-half-even(x * (127 / max|x|)); plus each block's sum of q."""
    n, cols = x.shape
    blocks = x.reshape(n, -1, 32)
    amax = np.abs(blocks).max(axis=2)
    d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        iscale = np.where(amax != 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    xq = np.rint(blocks * iscale[:, :, None]).astype(np.int8)
    return xq.reshape(n, cols), d, xq.astype(np.int32).sum(axis=2)


def check(raw, qtype, x):
    rows, cols = raw.shape[0], x.shape[1]
    kind = int8_kind(qtype, cols)
    xq, d, sums = Int8Activations().quantize(x, kind)
    want_q, want_d, want_s = (q8k_reference if kind == "q8k" else q8_0_reference)(x)
    assert np.array_equal(xq, want_q) and np.array_equal(d, want_d) and np.array_equal(sums, want_s)
    w = dequantize(raw, qtype, (rows, cols)).astype(np.float64)
    block = cols // d.shape[1]
    xf = (xq.astype(np.float64).reshape(len(x), -1, block) * d[:, :, None]).reshape(len(x), cols)
    want, scale = xf @ w.T, np.abs(xf) @ np.abs(w).T
    out = np.full((len(x), rows), np.nan, np.float32)
    matmul_int8(raw, qtype, (xq, d, sums), out)
    assert np.all(np.abs(out - want) <= 1e-5 * scale + 1e-30), np.max(np.abs(out - want) / (scale + 1e-30))


# every type with an integer path in the registry, so a new row is tested as soon as it has one
INT8_QTYPES = tuple(t for t, r in TYPES.items() if r.int8 is not None)


@pytest.mark.parametrize("qtype", INT8_QTYPES, ids=type_name)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 17])      # the kernel runs tokens in fours, then the tail
@pytest.mark.parametrize("blocks", [1, 3, 24])        # row widths in the type's int8 blocks
def test_int8_matmul_random(qtype, n, blocks):
    """Random weight bytes (every scale and code pattern, f16 scales from SCALE_POOL: zero,
    subnormal, +-60000, ...) against activations of mixed magnitudes."""
    rng = np.random.default_rng(qtype * 1000 + n * 31 + blocks)
    cols = blocks * TYPES[qtype].int8.block
    raw = random_weights(qtype, 37, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32) * rng.choice([1e-3, 1.0, 300.0], (n, 1)).astype(np.float32)
    x[0, 5 % cols] = 40.0 * np.abs(x[0]).max()    # an outlier, as in real activations
    if n > 2 and cols >= 512:
        x[2, 256:512] = 0.0                          # an all-zero block
    check(raw, qtype, x)


PANEL_QTYPES = tuple(t for t, r in TYPES.items() if r.panel is not None)


@pytest.mark.parametrize("qtype", PANEL_QTYPES, ids=type_name)
@pytest.mark.parametrize("n", [PANEL_MIN_TOKENS, 37])   # the shortest prompt it takes; whole tiles and a tail
@pytest.mark.parametrize("rows", [32, 45])               # one whole panel; a panel past the last row
def test_panel_gemm_random(qtype, n, rows):
    """Prompts against the types with a panel decoder take the panel GEMM (kernels/_mm_panel.py,
    on AVX512-VNNI machines): same bound, random blocks with extreme scales, 1 and 5 blocks."""
    rng = np.random.default_rng(qtype * 100 + n + rows)
    for blocks in (1, 5):
        raw = random_weights(qtype, rows, 256 * blocks, rng)
        x = rng.standard_normal((n, 256 * blocks)).astype(np.float32)
        x[n - 1, 7] = 50.0 * np.abs(x[n - 1]).max()    # an outlier in the tail tile
        check(raw, qtype, x)


@pytest.mark.skipif(not _mm_panel.available, reason="the panel GEMM needs AVX512-VNNI, which this CPU lacks")
def test_prompts_take_the_panel_gemm():
    """A group of Q4_K, Q2_K and Q6_K weights: from PANEL_MIN_TOKENS rows their outputs are the
    panel kernel's bit for bit, below it mm_q8's (and the panel types are every Q8_K type)."""
    assert {t for t in PANEL_QTYPES} == {t for t, r in TYPES.items() if r.int8 is not None and r.int8.name == "q8k"}
    rng = np.random.default_rng(3)
    types_ = [Q4_K, Q2_K, Q6_K]
    mats = [random_weights(t, 40, 512, rng) for t in types_]
    for n in (PANEL_MIN_TOKENS - 1, PANEL_MIN_TOKENS, 21):
        xq = Int8Activations().quantize(rng.standard_normal((n, 512)).astype(np.float32))
        outs = [np.full((n, 40), np.nan, np.float32) for _ in mats]
        matmul_int8_many([(w, t, o) for w, t, o in zip(mats, types_, outs)], xq)
        scratch = _mm_panel.scratch(512, numba.config.NUMBA_NUM_THREADS)
        for w, t, o in zip(mats, types_, outs):
            want = np.full((n, 40), np.nan, np.float32)
            if n >= PANEL_MIN_TOKENS and TYPES[t].panel is not None:
                _mm_panel.mm_panels(w, t, *xq, want, *scratch)
            else:
                mm_q8((w,), (t,), *xq, (want,))
            np.testing.assert_array_equal(o, want, err_msg=f"{type_name(t)}, {n} rows")


@pytest.mark.model
@pytest.mark.parametrize("key,name", [("qwen2.5-coder-1.5b-q4_k_m", "blk.3.ffn_up.weight"),
                                      ("qwen2.5-coder-1.5b-q4_k_m", "blk.0.ffn_down.weight"),
                                      ("qwen2.5-coder-1.5b-q4_k_m", "blk.3.attn_k.weight"),
                                      ("qwen2.5-coder-0.5b-q4_k_m", "blk.0.ffn_up.weight"),     # Q5_0
                                      ("qwen2.5-coder-0.5b-q4_k_m", "token_embd.weight"),       # Q8_0
                                      ("smollm2-135m-q4_1", "blk.2.ffn_gate.weight")])          # Q4_1
def test_int8_matmul_real_tensors(key, name):
    from engine.gguf_reader import GGUFFile
    f = GGUFFile(model_file(key))
    info = f.tensors[name]
    raw = f.tensor_bytes(name)[:300]
    rng = np.random.default_rng(7)
    check(raw, info.ggml_type, rng.standard_normal((2, info.ne[0])).astype(np.float32))


# the types with no tensor in the fetched models, from files llama.cpp's quantizer made (tests/quantized_models.py)
REQUANTIZED = [("smollm2-135m-q4_0", "Q4_0"), ("smollm2-135m-q5_1", "Q5_1"), ("smollm2-135m-iq4_nl", "IQ4_NL"),
               ("smollm2-135m-iq4_xs", "IQ4_XS"), ("qwen2.5-coder-1.5b-q2_k", "Q2_K"),
               ("qwen2.5-coder-1.5b-q3_k_m", "Q3_K"), ("qwen2.5-coder-1.5b-q5_k_m", "Q5_K")]


@pytest.mark.model
@pytest.mark.parametrize("key,type_", REQUANTIZED, ids=[t for _, t in REQUANTIZED])
def test_int8_matmul_requantized_tensors(key, type_):
    """Real blocks of each new type (the first tensor of that type in the file with an integer path)."""
    from engine.gguf_reader import GGUFFile
    from tests.quantized_models import quantized_model
    qtype = next(t for t in TYPES if type_name(t) == type_)
    f = GGUFFile(quantized_model(key))
    name = next(n for n, info in f.tensors.items() if info.ggml_type == qtype and int8_ready(qtype, info.ne[0]))
    raw = f.tensor_bytes(name)[:300]
    rng = np.random.default_rng(8)
    check(raw, qtype, rng.standard_normal((5, f.tensors[name].ne[0])).astype(np.float32))


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("contiguous_last", [False, True])
def test_int8_matmul_many_equals_one_at_a_time(n, contiguous_last):
    """One launch for several matrices (q/k/v, gate/up): mixed types and row counts, outputs that
    are column blocks of one buffer, or (contiguous_last) a separate array of another layout."""
    rng = np.random.default_rng(n)
    mats = [random_weights(Q4_K, 40, 512, rng), random_weights(Q6_K, 17, 512, rng), random_weights(Q4_K, 3, 512, rng)]
    xq = Int8Activations().quantize(rng.standard_normal((n, 512)).astype(np.float32))
    buf = np.full((n, 60), np.nan, np.float32)
    outs = [buf[:, :40], buf[:, 40:57], np.full((n, 3), np.nan, np.float32) if contiguous_last else buf[:, 57:]]
    matmul_int8_many([(w, t, o) for w, t, o in zip(mats, [Q4_K, Q6_K, Q4_K], outs)], xq)
    for w, t, o in zip(mats, [Q4_K, Q6_K, Q4_K], outs):
        want = np.empty((n, w.shape[0]), np.float32)
        matmul_int8(w, t, xq, want)
        np.testing.assert_array_equal(o, want)


def test_int8_errors():
    assert int8_ready(Q4_K, 512) and int8_ready(Q6_K, 256) and int8_ready(Q8_0, 96) and int8_ready(Q4_1, 32)
    assert not int8_ready(Q4_K, 896) and not int8_ready(F16, 512)
    with pytest.raises(ValueError, match="'q8_0' layout"):   # activations quantized for the wrong weights
        matmul_int8(random_weights(Q8_0, 4, 512, np.random.default_rng(0)), Q8_0,
                    Int8Activations().quantize(np.ones((1, 512), np.float32)), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        Int8Activations().quantize(np.zeros((1, 100), np.float32))
    raw = random_weights(Q4_K, 4, 512, np.random.default_rng(0))
    xq = Int8Activations().quantize(np.ones((1, 256), np.float32))
    with pytest.raises(ValueError, match="columns"):
        matmul_int8(raw, Q4_K, xq, np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="no int8 matmul"):
        matmul_int8(np.zeros((4, 1024), np.uint8), F16, xq, np.zeros((1, 4), np.float32))
