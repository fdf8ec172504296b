"""kernels/_dequant_ext.py block decoders against gguf's reference dequantizers, bit for bit.

Results are compared as uint32 patterns, so signed zeros and NaN payloads count. Blocks are
random bytes with their f16 scale fields drawn from extreme values (as in
tests/test_quant_kernels.py), and also fully random (NaN and Inf scales included).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from numba import njit

from engine.gguf_reader import GGUFFile
from kernels import _dequant_ext as X
from kernels.f16 import F16_TO_F32

T = gguf.GGMLQuantizationType
# name: (decoder, gguf type, elements per block, bytes per block, byte offsets of the f16 fields)
BLOCK_TYPES = {
    "Q4_0": (X.dq_q4_0, T.Q4_0, 32, 18, (0,)),
    "Q5_1": (X.dq_q5_1, T.Q5_1, 32, 24, (0, 2)),
    "Q2_K": (X.dq_q2_k, T.Q2_K, 256, 84, (80, 82)),
    "Q3_K": (X.dq_q3_k, T.Q3_K, 256, 110, (108,)),
    "Q5_K": (X.dq_q5_k, T.Q5_K, 256, 176, (0, 2)),
    "IQ4_NL": (X.dq_iq4_nl, T.IQ4_NL, 32, 18, (0,)),
    "IQ4_XS": (X.dq_iq4_xs, T.IQ4_XS, 256, 136, (0,)),
}
NAMES = tuple(BLOCK_TYPES)
# normal, zero, negative zero, subnormal, huge and negative f16 scales (tests/test_quant_kernels.py)
SCALE_POOL = np.array([1.0, 0.0, -0.0, 2.0 ** -24, 3.5e-6, 6.1e-5, 0.0123, -0.37, 60000.0, -60000.0, 65504.0],
                      dtype=np.float16)
MODELS = Path.home() / ".cache" / "numgguf" / "models"


@njit
def _decode(dq, raw, out, lut, bsize, elems):
    """out[b*elems:(b+1)*elems] = block b of raw, for every block."""
    for b in range(raw.shape[0] // bsize):
        dq(raw[b * bsize:(b + 1) * bsize], out[b * elems:(b + 1) * elems], lut)


@njit
def _bf16(row, e0, e1, dst):
    X.bf16_span(row, e0, e1, dst)


def random_blocks(name, n, rng, pool=True):
    """n random blocks [n, bytes]; with pool, their f16 scale fields drawn from SCALE_POOL."""
    _, _, _, bsize, fields = BLOCK_TYPES[name]
    raw = rng.integers(0, 256, (n, bsize), dtype=np.uint8)
    if pool:
        for off in fields:
            raw[:, off:off + 2] = rng.choice(SCALE_POOL, n).view(np.uint8).reshape(n, 2)
    return raw


def decode(name, raw):
    dq, _, elems, bsize, _ = BLOCK_TYPES[name]
    out = np.empty(raw.size // bsize * elems, np.float32)
    _decode(dq, np.ascontiguousarray(raw).reshape(-1), out, F16_TO_F32, bsize, elems)
    return out


def reference(name, raw):
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(np.ascontiguousarray(raw), BLOCK_TYPES[name][1]).reshape(-1)


def assert_bitwise(got, want, msg=""):
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape, msg
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=msg)


@pytest.mark.parametrize("name", NAMES)
def test_random_blocks_bitwise(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    raw = random_blocks(name, 600, rng)
    assert_bitwise(decode(name, raw), reference(name, raw))


@pytest.mark.parametrize("name", NAMES)
def test_any_bytes_bitwise(name):
    """Every byte random: NaN and Inf scales too, NaN payloads as gguf's."""
    rng = np.random.default_rng(1000 + sum(map(ord, name)))
    raw = random_blocks(name, 3000, rng, pool=False)
    with np.errstate(all="ignore"):
        assert_bitwise(decode(name, raw), reference(name, raw))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_scales(name):
    """Each f16 field NaN (two payloads, one signed), +-Inf or 0 in every combination."""
    _, _, _, _, fields = BLOCK_TYPES[name]
    special = np.array([0x7E01, 0xFD02, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x3C00], np.uint16)
    combos = np.array(np.meshgrid(*[special] * len(fields))).reshape(len(fields), -1).T
    rng = np.random.default_rng(7)
    raw = random_blocks(name, len(combos), rng)
    for k, off in enumerate(fields):
        raw[:, off:off + 2] = combos[:, k].astype(np.uint16).view(np.uint8).reshape(-1, 2)
    assert_bitwise(decode(name, raw), reference(name, raw))


@pytest.mark.parametrize("name", NAMES)
def test_writes_only_its_block(name):
    """A block decoded into a slice of a larger buffer leaves the rest of it alone."""
    dq, _, elems, bsize, _ = BLOCK_TYPES[name]
    raw = random_blocks(name, 3, np.random.default_rng(3)).reshape(-1)
    buf = np.full(5 * elems, np.nan, np.float32)
    _decode(dq, raw[bsize:2 * bsize], buf[2 * elems:3 * elems], F16_TO_F32, bsize, elems)
    assert_bitwise(buf[2 * elems:3 * elems], reference(name, raw[bsize:2 * bsize]))
    assert np.isnan(np.delete(buf, np.s_[2 * elems:3 * elems])).all()


@pytest.mark.parametrize("name", NAMES)
def test_strided_arrays(name):
    """Non-contiguous block and output views (Numba layout 'A') decode the same."""
    dq, _, elems, bsize, _ = BLOCK_TYPES[name]
    raw = random_blocks(name, 40, np.random.default_rng(11)).reshape(-1)
    wide = np.zeros(2 * raw.size, np.uint8)
    wide[::2] = raw
    out = np.empty(2 * (raw.size // bsize) * elems, np.float32)
    _decode(dq, wide[::2], out[::2], F16_TO_F32, bsize, elems)
    assert_bitwise(np.ascontiguousarray(out[::2]), reference(name, raw))


def test_iq4nl_values():
    assert X.IQ4NL_VALUES.dtype == np.int8
    assert tuple(int(v) for v in X.IQ4NL_VALUES) == gguf.quants.IQ4_NL.kvalues


def test_bf16_bit_patterns():
    special = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x0080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F,
                        0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FFF, 0xFFFF, 0x7FA5, 0x4049],
                       np.uint16)   # +-0, subnormals, +-1, +-max, +-Inf, quiet/signalling NaNs, pi
    rng = np.random.default_rng(30)
    row = np.concatenate([special, rng.integers(0, 65536, 5000, dtype=np.uint16)]).view(np.uint8)
    want = gguf.quants.dequantize(row, T.BF16)
    n = row.size // 2
    for e0, e1 in ((0, n), (3, n - 5), (7, 7), (n - 1, n)):
        buf = np.full(n + 4, np.float32(-1.5))
        _bf16(row, e0, e1, buf)
        assert_bitwise(buf[:e1 - e0], want[e0:e1])
        assert (buf[e1 - e0:] == np.float32(-1.5)).all()
    got = np.empty(len(special), np.float32)
    _bf16(row, 0, len(special), got)
    assert (got.view(np.uint32) == special.astype(np.uint32) << 16).all()


def _real_tensors():
    """{type name: (file name, tensor name, raw rows [4, row_bytes])}: the first tensor of each of
    our types in the cached models, smallest file first. Files are read with the engine's GGUF
    reader (0.3 s a file; gguf.GGUFReader parses the tokenizer arrays too: 3-15 s a file)."""
    ours = {int(BLOCK_TYPES[name][1]): name for name in NAMES} | {int(T.BF16): "BF16"}
    found = {}
    for path in sorted(MODELS.glob("*.gguf"), key=lambda p: p.stat().st_size):
        try:
            f = GGUFFile(path)
        except Exception:           # e.g. a file another process is still writing
            continue
        for info in f.tensors.values():
            name = ours.get(info.ggml_type)
            if name is not None and name not in found:
                found[name] = (path.name, info.name, np.array(f.tensor_bytes(info.name)[:4]))
    return found


def test_real_tensors():
    """A few rows of a real tensor of each of our types present in ~/.cache/numgguf/models."""
    found = _real_tensors()
    if not found:
        pytest.skip(f"no {'/'.join(NAMES)}/BF16 tensor in {MODELS}/*.gguf")
    for name, (file, tensor, rows) in sorted(found.items()):
        msg = f"{file}: {tensor} ({name})"
        if name == "BF16":
            row = rows.reshape(-1)
            got = np.empty(row.size // 2, np.float32)
            _bf16(row, 0, got.size, got)
            assert_bitwise(got, gguf.quants.dequantize(row, T.BF16).reshape(-1), msg)
        else:
            assert_bitwise(decode(name, rows), reference(name, rows), msg)
