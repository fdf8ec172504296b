"""GGML tensor type ids and block layouts of the types we support."""
from __future__ import annotations

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15

# type id -> (elements per block, bytes per block)
GGML_TYPES = {
    F32: (1, 4),
    F16: (1, 2),
    Q4_1: (32, 20),
    Q5_0: (32, 22),
    Q8_0: (32, 34),
    Q4_K: (256, 144),
    Q6_K: (256, 210),
}

_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
          10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}


def type_name(t: int) -> str:
    return _NAMES.get(t, f"type#{t}")


def row_bytes(t: int, cols: int) -> int:
    elems, bsize = GGML_TYPES[t]
    return cols // elems * bsize
