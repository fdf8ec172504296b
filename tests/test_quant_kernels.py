"""Fused dequant-matmul kernels against gguf's reference dequantizers.

Exactness: `dequantize`/`get_rows` must equal gguf.quants.dequantize bitwise
(compared as uint32 patterns, so NaN payloads and signed zeros count too).

Matmul tolerance: |out - x @ W.T| <= RTOL * (|x| @ |W|.T) + ATOL, reference in
float64 over gguf's float32 weights. The kernels form each product w*x from the
reference's float32 weight with at most two roundings, and accumulate in
float32 in a blocked order (16/32 lane accumulators of about K/16 chained
operations, or 512-column partial dots added in sequence). The classic bound
for such a sum is (m + 2) * 2**-24 * sum|w*x| with m the longest chain of
additions, m <= K/16 + 16 here, so RTOL = 1e-4 holds for K up to ~25000 (the
models' largest K is 8960: bound ~3.5e-5; observed errors are ~1e-7 relative).
ATOL only covers float32 underflow.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine.fetch import model_path
from engine.gguf_reader import GGUFFile
from engine import failpoints
from kernels import matmul as _kernels
from kernels.quantize import quantize
from kernels import ggml, quants
from kernels.quants import (BF16, F16, F32, FLOAT_TYPES, GGML_TYPES, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K,
                            Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, Q8_K, TYPES, type_name)


# The kernels as these tests see them. kernels/ hold no fail points, so the contract runner's
# quant.* faults (python -m cli contracts --mutate) act here, on the kernels' results.
def matmul(w, qtype, x, out):
    _kernels.matmul(w, qtype, x, out)
    if failpoints.active("quant.matmul_scale"):
        out *= np.float32(1.01)


def get_rows(w, qtype, ids, out):
    _kernels.get_rows(w, qtype, ids, out)
    if failpoints.active("quant.get_rows_ulp") and out.size:
        out[:, -1] = np.nextafter(out[:, -1], np.float32(np.inf))


def dequantize(w, qtype, shape):
    out = _kernels.dequantize(w, qtype, shape)
    if failpoints.active("quant.get_rows_ulp") and out.size:
        out[:, -1] = np.nextafter(out[:, -1], np.float32(np.inf))
    return out

RTOL, ATOL = 1e-4, 1e-30
# every block type in the registry, so a new row is tested as soon as it is added
QUANT_TYPES = tuple(t for t in TYPES if t not in FLOAT_TYPES)
ALL_TYPES = tuple(TYPES)
# byte offsets of the f16 scale fields inside one block (test_registry_is_consistent: one entry per type)
SCALE_FIELDS = {Q4_1: (0, 2), Q5_0: (0,), Q8_0: (0,), Q4_K: (0, 2), Q6_K: (208,), Q4_0: (0,), Q5_1: (0, 2),
                Q2_K: (80, 82), Q3_K: (108,), Q5_K: (0, 2), IQ4_NL: (0,), IQ4_XS: (0,)}
# normal, zero, negative zero, subnormal, huge and negative f16 scales
SCALE_POOL = np.array([1.0, 0.0, -0.0, 2.0 ** -24, 3.5e-6, 6.1e-5, 0.0123, -0.37, 60000.0, -60000.0, 65504.0],
                      dtype=np.float16)


def random_weights(qtype, rows, cols, rng, finite=True):
    """Random raw weight bytes [rows, row_bytes]: random payloads, scale fields drawn from SCALE_POOL."""
    if qtype == F32:
        return (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 4, (rows, cols))).astype(np.float32).view(np.uint8)
    if qtype == F16:
        if finite:
            return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
        return rng.integers(0, 65536, (rows, cols), dtype=np.uint16).view(np.uint8)
    if qtype == BF16:   # the top halves of float32 values; any bit pattern (NaN, Inf, subnormal) if not finite
        if finite:
            return (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return rng.integers(0, 65536, (rows, cols), dtype=np.uint16).view(np.uint8)
    elems, bsize = GGML_TYPES[qtype]
    w = rng.integers(0, 256, (rows, cols // elems, bsize), dtype=np.uint8)
    for off in SCALE_FIELDS[qtype]:
        w[:, :, off:off + 2] = rng.choice(SCALE_POOL, w.shape[:2]).view(np.uint8).reshape(rows, -1, 2)
    return w.reshape(rows, -1)


def reference(raw, qtype, cols):
    return gguf.quants.dequantize(np.ascontiguousarray(raw), gguf.GGMLQuantizationType(qtype)).reshape(-1, cols)


def assert_bitwise(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def check_matmul(raw, qtype, x):
    """matmul of x against raw weights agrees with float64 numpy within the stated tolerance,
    both into a C-contiguous block of rows and into a column block of a wider buffer."""
    w = reference(raw, qtype, x.shape[1]).astype(np.float64)
    exact = x.astype(np.float64) @ w.T
    bound = RTOL * (np.abs(x).astype(np.float64) @ np.abs(w).T) + ATOL
    n, rows = exact.shape
    for wide in (False, True):
        buf = np.full((n + 2, rows + 3 if wide else rows), np.nan, np.float32)
        out = buf[1:-1, 1:-2] if wide else buf[1:-1]    # nothing else in buf may change
        matmul(raw, qtype, x, out)
        assert np.isnan(buf).sum() == buf.size - out.size
        assert (np.abs(out - exact) <= bound).all(), f"max excess {np.max(np.abs(out - exact) - bound)}"


def shape_for(qtype):
    """(rows, cols): rows not a multiple of the kernels' row groups; cols spanning a partial 256-span,
    and for the float types (any width) not a multiple of the 32 lanes of their matvecs."""
    if qtype in FLOAT_TYPES:
        return (13, 350)
    return (13, 768) if GGML_TYPES[qtype][0] == 256 else (13, 352)


def test_registry_is_consistent():
    """The registry's rows agree with the GGUF format (gguf's own table) and with each other, and
    everything derived from them covers exactly the registered types."""
    from engine.model import MATRIX_TYPES
    for t, (name, elems, nbytes) in ggml.FORMAT.items():
        gt = gguf.GGMLQuantizationType(t)
        assert gt.name == name and gguf.GGML_QUANT_SIZES[gt] == (elems, nbytes), (t, name)
    for t, row in TYPES.items():
        assert row.id == t and (row.block_elems, row.block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        assert (row.dequant is None) == (row.block_elems == 1), f"{row.name}: block types need a decoder"
        assert (row.int8 is None) == (row.int8_block is None), f"{row.name}: an int8 layout needs its block dot product"
        if row.int8 is not None:
            assert row.int8 in quants.LAYOUTS.values() and row.block_elems == row.int8.block, row.name
            assert row.int8.block % row.int8.sum_block == 0, row.name
        assert GGML_TYPES[t] == ggml.block_shape(t)
    assert set(MATRIX_TYPES) == set(TYPES) == set(ALL_TYPES) and set(SCALE_FIELDS) == set(QUANT_TYPES)
    from kernels._mm_int8 import INT8_TYPES
    assert {r.id for r in INT8_TYPES} == {t for t, r in TYPES.items() if r.int8 is not None}


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=type_name)
def test_dequantize_random_blocks_bitwise(qtype):
    rng = np.random.default_rng(qtype)
    rows, cols = shape_for(qtype)
    raw = random_weights(qtype, rows, cols, rng, finite=False)
    with np.errstate(all="ignore"):
        assert_bitwise(dequantize(raw, qtype, (rows, cols)), reference(raw, qtype, cols))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=type_name)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_matmul_random(qtype, n):
    rng = np.random.default_rng(100 * qtype + n)
    rows, cols = shape_for(qtype)
    raw = random_weights(qtype, rows, cols, rng)
    check_matmul(raw, qtype, rng.standard_normal((n, cols)).astype(np.float32))


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=type_name)
def test_get_rows(qtype):
    rng = np.random.default_rng(7)
    rows, cols = shape_for(qtype)
    raw = random_weights(qtype, rows, cols, rng)
    want = reference(raw, qtype, cols)
    for ids in (np.array([3, 0, 12, 3], np.int64), np.array([5], np.int32), np.zeros(0, np.int64)):
        out = np.empty((len(ids), cols), np.float32)
        get_rows(raw, qtype, ids, out)
        assert_bitwise(out, want[ids])


def test_strided_x_is_accepted():
    rng = np.random.default_rng(4)
    raw = random_weights(Q4_K, 13, 512, rng)
    wide = rng.standard_normal((3, 520)).astype(np.float32)
    got, want = np.empty((3, 13), np.float32), np.empty((3, 13), np.float32)
    matmul(raw, Q4_K, wide[:, 3:515], got)
    matmul(raw, Q4_K, np.ascontiguousarray(wide[:, 3:515]), want)
    assert_bitwise(got, want)


def test_float_weight_arrays_accepted():
    rng = np.random.default_rng(3)
    w32 = rng.standard_normal((9, 40)).astype(np.float32)
    w16 = w32.astype(np.float16)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    for w, qtype in ((w32, F32), (w16, F16)):
        check_matmul(np.ascontiguousarray(w).view(np.uint8), qtype, x)
        out = np.empty((2, 9), np.float32)
        matmul(w, qtype, x, out)
        np.testing.assert_allclose(out, x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)
        assert_bitwise(dequantize(w, qtype, (9, 40)), w.astype(np.float32))


def test_invalid_arguments():
    rng = np.random.default_rng(0)
    raw = random_weights(Q4_K, 4, 256, rng)
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="Q8_K"):          # ggml's activation type, never a weight
        matmul(raw, Q8_K, x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="columns"):
        matmul(raw, Q4_K, np.zeros((2, 512), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        matmul(raw, Q4_K, x, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="x must"):
        matmul(raw, Q4_K, x.astype(np.float64), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="contiguous rows"):
        matmul(raw, Q4_K, x, np.zeros((2, 8), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="blocks"):
        matmul(np.ascontiguousarray(raw[:, :100]), Q4_K, x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        matmul(random_weights(Q4_K, 4, 512, rng)[:, :144], Q4_K, x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="range"):
        get_rows(raw, Q4_K, np.array([4]), np.zeros((1, 256), np.float32))
    with pytest.raises(ValueError, match="shape"):
        dequantize(raw, Q4_K, (4, 512))


@pytest.mark.parametrize("qtype", [Q4_K, Q6_K], ids=type_name)
def test_quantize_round_trip(qtype):
    """Every element within half a step of its sub-block, plus the rounding of the super-scales."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6, 512)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    x[0, :256] = 0.0                       # an all-zero block
    x[1] = np.abs(x[1])                    # no negative values: zero mins
    x[2, :32] = 5.0                        # a constant sub-block
    raw = quantize(x, qtype)
    assert raw.shape == (6, 512 // 256 * GGML_TYPES[qtype][1]) and raw.dtype == np.uint8
    err = np.abs(reference(raw, qtype, 512) - x)
    if qtype == Q4_K:
        sub = x.reshape(6, 2, 8, 32)
        step = (sub.max(-1) - np.minimum(sub.min(-1), 0)) / 15          # ideal step per sub-block
        levels = 63
    else:
        sub = x.reshape(6, 2, 16, 16)
        step = np.abs(sub).max(-1) / 31
        levels = 127
    slack = 2 * step.max(-1, keepdims=True) / levels                    # super-scale rounding
    assert (err.reshape(sub.shape).max(-1) <= 0.5 * step + slack + 1e-6).all()
    assert err[0, :256].max() == 0.0
    rms = np.sqrt((err[3:] ** 2).mean() / (x[3:] ** 2).mean())
    assert rms < (0.09 if qtype == Q4_K else 0.025)


def test_synthetic_gguf_file(tmp_path):
    """quantize -> GGUFWriter -> GGUFFile -> matmul: the fixture path other tests rely on."""
    rng = np.random.default_rng(9)
    dense = rng.standard_normal((24, 512)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for name, qtype in (("w4", Q4_K), ("w6", Q6_K), ("w8", Q8_0)):
        writer.add_tensor(name, quantize(dense, qtype), raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(path)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    for name, qtype in (("w4", Q4_K), ("w6", Q6_K), ("w8", Q8_0)):
        assert f.tensors[name].ggml_type == qtype and f.tensors[name].ne == (512, 24)
        check_matmul(f.tensor_bytes(name), qtype, x)


REAL = [  # (model key, tensor, type)
    ("qwen2.5-coder-1.5b-q4_k_m", "blk.0.ffn_gate.weight", Q4_K),
    ("qwen2.5-coder-1.5b-q4_k_m", "blk.0.ffn_down.weight", Q6_K),
    ("qwen2.5-coder-1.5b-q4_k_m", "blk.0.attn_norm.weight", F32),
    ("qwen2.5-coder-0.5b-q4_k_m", "blk.0.ffn_gate.weight", Q5_0),
    ("qwen2.5-coder-0.5b-q4_k_m", "blk.0.attn_v.weight", Q8_0),
    ("smollm2-135m-q4_1", "blk.0.ffn_down.weight", Q4_1),
    ("smollm2-135m-q4_1", "token_embd.weight", Q8_0),
]


@pytest.mark.model
@pytest.mark.parametrize("key,tensor,qtype", REAL, ids=[f"{k.split('-q')[0]}:{t}" for k, t, _ in REAL])
def test_real_tensor(key, tensor, qtype):
    path = model_path(key)
    if not path.exists():
        pytest.skip(f"{path} not downloaded")
    f = GGUFFile(path)
    assert f.tensors[tensor].ggml_type == qtype
    cols = f.tensors[tensor].ne[0]
    raw = f.tensor_bytes(tensor)[:64]
    want = reference(raw, qtype, cols)
    assert_bitwise(dequantize(raw, qtype, (raw.shape[0], cols)), want)
    ids = np.array([raw.shape[0] - 1, 0, raw.shape[0] // 2])
    out = np.empty((3, cols), np.float32)
    get_rows(raw, qtype, ids, out)
    assert_bitwise(out, want[ids])
    rng = np.random.default_rng(11)
    for n in (1, 5):
        check_matmul(raw, qtype, rng.standard_normal((n, cols)).astype(np.float32))


@pytest.mark.parametrize("exact", [False, True])
def test_matmul_group_of_float_matrices_equals_one_at_a_time(exact):
    """A group's 16-bit float matrices of one type run as one launch in decode (q/k/v of a BF16
    file); each output equals its own matmul of x rounded as llama.cpp rounds it for that type
    (x as it is if exact), into separate outputs and column blocks of one buffer, with an F32
    matrix in the group."""
    from kernels.matmul import Int8Activations, MatmulGroup, matmul_group
    rng = np.random.default_rng(7)
    cols = 100                                   # not a multiple of 32: the scalar tail runs
    mats = [(random_weights(t, rows, cols, rng), t) for t, rows in
            ((BF16, 37), (BF16, 5), (F16, 19), (F16, 33), (F32, 3), (BF16, 64))]
    x = rng.standard_normal((1, cols)).astype(np.float32)
    int8 = Int8Activations()
    group = MatmulGroup(mats, exact=exact)
    for strided in (False, True):
        wide = np.full((1, sum(w.shape[0] for w, _ in mats) + 1), np.nan, np.float32)
        outs, at = [], 1 if strided else 0
        for w, _ in mats:
            outs.append(wide[:, at:at + w.shape[0]] if strided else np.full((1, w.shape[0]), np.nan, np.float32))
            at += w.shape[0]
        matmul_group(group, int8, x, outs)
        for (w, t), out in zip(mats, outs):
            want = np.empty_like(out)
            matmul(w, t, x if exact else int8.float_rounded(x, t).copy(), want)
            np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
