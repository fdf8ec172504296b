"""stage_stats against hand-computed values."""
import json
import math

import numpy as np
import pytest

from trace.stats import attention_rows, stage_stats

NAN, INF = float("nan"), float("inf")


def test_plain_values():
    s = stage_stats(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32))
    assert s["all"] == {"count": 4, "min": 1.0, "max": 4.0, "mean": 2.5, "std": math.sqrt(1.25),
                        "nan": 0, "inf": 0, "zero": 0}
    assert s["last"] == {"count": 2, "min": 3.0, "max": 4.0, "mean": 3.5, "std": 0.5,
                         "nan": 0, "inf": 0, "zero": 0}


def test_nan_inf_zero_excluded_and_counted():
    values = np.array([[NAN, 2.0, -0.0, INF], [0.0, -INF, 4.0, NAN]], dtype=np.float32)
    s = stage_stats(values)
    # finite values overall: 2, -0, 0, 4 -> mean 1.5, population variance (0.25+2.25+2.25+6.25)/4 = 2.75
    assert s["all"] == {"count": 8, "min": 0.0, "max": 4.0, "mean": 1.5, "std": math.sqrt(2.75),
                        "nan": 2, "inf": 2, "zero": 2}
    # last row finite: 0, 4
    assert s["last"] == {"count": 4, "min": 0.0, "max": 4.0, "mean": 2.0, "std": 2.0,
                         "nan": 1, "inf": 1, "zero": 1}


def test_no_finite_values_gives_none():
    s = stage_stats(np.array([[NAN, INF], [-INF, NAN]], dtype=np.float32))
    for key in ("all", "last"):
        assert s[key]["min"] is None and s[key]["max"] is None
        assert s[key]["mean"] is None and s[key]["std"] is None
    assert (s["all"]["nan"], s["all"]["inf"], s["last"]["nan"], s["last"]["inf"]) == (2, 2, 1, 1)


def test_empty():
    s = stage_stats(np.zeros((0, 3), np.float32))
    assert s["all"]["count"] == 0 and s["all"]["mean"] is None
    assert s["last"]["count"] == 0


def test_sums_in_float64():
    values = np.full((1, 1000), 16777216.0, dtype=np.float32)  # 2**24: float32 sums would lose the +1s
    values[0, ::2] += 2.0
    s = stage_stats(values)["all"]
    assert s["mean"] == 16777217.0 and s["std"] == 1.0


def test_plain_python_types_json_serialisable():
    s = stage_stats(np.array([[1.0, NAN]], dtype=np.float32))
    for summary in s.values():
        for key, v in summary.items():
            assert v is None or type(v) in (int, float), key
    json.dumps(s)


def test_rejects_non_2d():
    with pytest.raises(ValueError, match=r"needs a 2-D \[token, dim\] array, got shape \(3,\)"):
        stage_stats(np.zeros(3, np.float32))


def test_attention_rows_last_row_is_last_query():
    heads, q, k = 2, 3, 4
    scores = np.arange(heads * q * k, dtype=np.float32).reshape(heads, q, k)
    rows = attention_rows(scores)
    assert rows.shape == (q, heads * k)
    np.testing.assert_array_equal(rows[-1], np.concatenate([scores[0, -1], scores[1, -1]]))
    last = stage_stats(rows)["last"]
    assert (last["min"], last["max"], last["count"]) == (8.0, 23.0, 8)
