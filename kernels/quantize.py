"""A simple numpy quantizer producing ggml's exact block layouts (for test fixtures).

`quantize(data, qtype)` turns float rows into the bytes a GGUF file stores
[rows, row_bytes]. Q4_K and Q6_K are implemented here; F32, F16, Q4_1, Q5_0
and Q8_0 come from gguf.quants. The K-quant scale choice is not llama.cpp's
(no error search): scales are rounded *up* so every value stays inside the
representable range, which bounds the error of each element by half a
quantization step of its sub-block.
"""
from __future__ import annotations

import gguf
import numpy as np

from kernels.quants import F16, F32, GGML_TYPES, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, type_name


def quantize(data: np.ndarray, qtype: int) -> np.ndarray:
    """float rows [rows, cols] -> uint8 [rows, row_bytes] in ggml's layout for qtype."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2 or qtype not in GGML_TYPES or data.shape[1] % GGML_TYPES[qtype][0]:
        raise ValueError(f"cannot quantize shape {data.shape} to {type_name(qtype)}")
    if not np.isfinite(data).all():
        raise ValueError("cannot quantize non-finite values")
    rows, cols = data.shape
    if qtype in (Q4_K, Q6_K):
        blocks = data.reshape(-1, 256)
        raw = _q4_k(blocks) if qtype == Q4_K else _q6_k(blocks)
    elif qtype in (F32, F16, Q4_1, Q5_0, Q8_0):
        raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType(qtype))
    else:
        raise ValueError(f"cannot quantize to {type_name(qtype)}")
    return np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)


def _f16_ceil(v: np.ndarray) -> np.ndarray:
    """The smallest float16 >= v, elementwise (v >= 0)."""
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.isfinite(h).all():
        raise ValueError("values too large for a float16 block scale")
    return h


def _steps(need: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-block f16 super-scale and per-sub-block integer scales in [0, qmax] with d*sc >= need."""
    d = _f16_ceil(need.max(axis=-1) / qmax)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.ceil(need / df), 0).clip(0, qmax)
    return d, sc.astype(np.int32)


def _q4_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = x.reshape(nb, 8, 32)
    mins = -np.minimum(sub.min(axis=-1), 0)                        # offsets to subtract, >= 0
    dmin, m = _steps(mins, 63)
    off = dmin.astype(np.float32)[:, None] * m                      # >= mins: the low end is covered
    d, sc = _steps((sub.max(axis=-1) + off) / 15, 63)               # 15 steps reach the maximum
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint((sub + off[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
                             m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
    q = q.reshape(nb, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                           scales, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    grp = x.reshape(nb, 16, 16)
    d, sc = _steps(np.abs(grp).max(axis=-1) / 31, 127)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint(grp / step), 0).clip(-32, 31).astype(np.int32) + 32
    q = q.astype(np.uint8).reshape(nb, 2, 4, 32)                   # element 128*h + 32*k + l
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.astype(np.int8).view(np.uint8),
                           d.view(np.uint8).reshape(nb, 2)], axis=1)
