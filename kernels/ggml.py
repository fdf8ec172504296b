"""The GGML tensor types as the GGUF format defines them: id, name, block shape.

These are facts of the file format (ggml's `type_traits` table), true whether or not
we can compute with a type: the reader sizes every tensor from them, and `inspect`
names a type we cannot run instead of refusing to parse the file. Which types we can
compute with, and how, is kernels/quants.py's registry.
"""
from __future__ import annotations

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 = 0, 1, 2, 3, 6, 7, 8, 9
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
IQ4_NL, IQ4_XS, BF16 = 20, 23, 30

# type id -> (name, elements per block, bytes per block), from ggml's type_traits
FORMAT = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}


def type_name(t: int) -> str:
    """ggml's name of type id t ("Q4_K"), or "type#t" for an id the format does not define."""
    entry = FORMAT.get(t)
    return entry[0] if entry else f"type#{t}"


def block_shape(t: int) -> tuple[int, int]:
    """(elements, bytes) of one block of type t; KeyError for an id the format does not define."""
    _, elems, nbytes = FORMAT[t]
    return elems, nbytes
