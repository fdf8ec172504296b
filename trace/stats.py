"""Activation statistics for a captured stage, json-serialisable."""
from __future__ import annotations

import numpy as np


def attention_rows(scores: np.ndarray) -> np.ndarray:
    """Reshape attention scores [heads, query, key] to [query, heads*key].

    Row i holds query position i's scores for every head, heads side by side, so
    the 'last' row of ``stage_stats`` is the last query position (the newest token)
    attending over all keys in every head.
    """
    heads, queries, keys = scores.shape
    return scores.transpose(1, 0, 2).reshape(queries, heads * keys)


def stage_stats(values_2d: np.ndarray) -> dict:
    """Statistics over all values ('all') and over the last row only ('last').

    ``values_2d`` is [token, dim]. Each summary has count, min, max, mean, std
    (population), nan, inf and zero counts. NaN and Inf are excluded from
    min/max/mean/std, which are None when no value is finite. Sums are float64.
    """
    values = np.asarray(values_2d)
    if values.ndim != 2:
        raise ValueError(f"stage_stats needs a 2-D [token, dim] array, got shape {values.shape}")
    return {"all": _summary(values), "last": _summary(values[-1:])}


def _summary(values: np.ndarray) -> dict:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = x[np.isfinite(x)]
    has = finite.size > 0
    return {
        "count": int(x.size),
        "min": float(finite.min()) if has else None,
        "max": float(finite.max()) if has else None,
        "mean": float(finite.mean()) if has else None,
        "std": float(finite.std()) if has else None,
        "nan": int(np.count_nonzero(np.isnan(x))),
        "inf": int(np.count_nonzero(np.isinf(x))),
        "zero": int(np.count_nonzero(x == 0)),
    }
