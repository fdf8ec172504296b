"""A corpus of hand-made hostile GGUF files, built as bytes from a valid base file, each with its expected message.

`build_case(name, base)` returns (bytes, expected substring of the one-line error, or None when the
file must load and run correctly). Cases either patch one field of the base in place (via the
layout map of tests/gguf_fuzz.py) or re-serialize the base with changed metadata/tensor infos
through `rebuild` (our own minimal GGUF writer, which can write any value type anywhere).
"""
from __future__ import annotations

import struct

import numpy as np

from tests import gguf_fuzz as fz

_NP_VTYPE = {np.dtype("u1"): 0, np.dtype("i1"): 1, np.dtype("u2"): 2, np.dtype("i2"): 3, np.dtype("u4"): 4,
             np.dtype("i4"): 5, np.dtype("f4"): 6, np.dtype("bool"): 7, np.dtype("u8"): 10,
             np.dtype("i8"): 11, np.dtype("f8"): 12}


class Raw:
    """A metadata value written exactly as given: type id and payload bytes."""

    def __init__(self, vtype: int, payload: bytes):
        self.vtype, self.payload = vtype, payload


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def enc_value(v) -> tuple[int, bytes]:
    if isinstance(v, Raw):
        return v.vtype, v.payload
    if isinstance(v, bool):
        return 7, bytes([v])
    if isinstance(v, int):
        return (4, struct.pack("<I", v)) if 0 <= v < 1 << 32 else (11, struct.pack("<q", v))
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, (str, bytes)):
        return 8, _str(v)
    if isinstance(v, np.ndarray):
        return 9, struct.pack("<IQ", _NP_VTYPE[v.dtype], v.size) + v.astype(v.dtype.newbyteorder("<")).tobytes()
    if isinstance(v, list):
        if not v:
            return 9, struct.pack("<IQ", 0, 0)
        parts = [enc_value(x) for x in v]
        return 9, struct.pack("<IQ", parts[0][0], len(v)) + b"".join(p for _, p in parts)
    raise TypeError(type(v))


def rebuild(base: bytes, meta=None, drop=(), tensors=None, data_patch=None) -> bytes:
    """Re-serialize `base` with metadata keys set (`meta`), removed (`drop`), and tensor infos edited.

    `tensors(infos)` may edit the list of [name, dims, type, relative offset]; data is copied as is
    (`data_patch(bytearray, {name: absolute offset})` may change it)."""
    from engine.gguf_reader import GGUFFile
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(base)
        f.flush()
        gf = GGUFFile(f.name)
        md = dict(gf.metadata)
        infos = [[t.name, list(t.ne), t.ggml_type, t.offset - gf.data_start] for t in gf.tensors.values()]
        data = bytearray(base[gf.data_start:])
    for k in drop:
        md.pop(k, None)
    md.update(meta or {})
    if tensors:
        infos = tensors(infos) or infos
    if data_patch:
        data_patch(data, {name: off for name, _, _, off in infos})
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(md)))
    for k, v in md.items():
        vtype, payload = enc_value(v)
        out += _str(k) + struct.pack("<I", vtype) + payload
    for name, dims, ttype, off in infos:
        out += _str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, off)
    align = md.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 and not align & (align - 1) else 32
    out += b"\0" * (-len(out) % align)
    return bytes(out + data)


def _field(base: bytes, kind: str, label: str | None = None, nth: int = 0) -> fz.Field:
    hits = [f for f in fz.layout(base).fields if f.kind == kind and (label is None or f.label == label)]
    return hits[nth]


def _set(kind, v, label=None):
    return lambda b: fz.set_field(b, _field(b, kind, label), v)


def _nested(depth: int) -> Raw:
    """An array of an array of ... (depth levels) of one u32."""
    payload, etype = struct.pack("<I", 7), 4
    for _ in range(depth):
        payload, etype = struct.pack("<IQ", etype, 1) + payload, 9
    return Raw(9, payload)


def _patch_tensor(name, values: bytes):
    def patch(data, offsets):
        data[offsets[name]:offsets[name] + len(values)] = values
    return patch


def _rename(old, new):
    def edit(infos):
        for t in infos:
            if t[0] == old:
                t[0] = new
    return edit


def _extra_tensor(name, ttype):
    return lambda infos: infos + [[name, [32], ttype, 0]]


def _all_offsets_zero(infos):
    for t in infos:
        t[3] = 0


ARCH = "qwen2"
N_VOCAB = 266
# name -> (function base -> bytes, expected message substring or None for "loads and runs")
CORPUS = {
    "empty": (lambda b: b"", "not a GGUF file"),
    "bad_magic": (lambda b: b"GGML" + b[4:], "bad magic"),
    "magic_only": (lambda b: b[:4], "truncated file: version"),
    "version_1": (_set("version", 1), "unsupported GGUF version 1"),
    "version_max": (_set("version", 0xFFFFFFFF), "unsupported GGUF version 4294967295"),
    "n_tensors_2_60": (_set("n_tensors", 1 << 60), "exceed the file size"),
    "n_kv_2_40": (_set("n_kv", 1 << 40), "exceed the file size"),
    "n_kv_short": (_set("n_kv", 3), "tensor"),  # the first KV's bytes are then read as a tensor info
    "string_len_2_60": (_set("key_len", 1 << 60), "exceeds the limit of 16777216 bytes"),
    "string_len_past_end": (_set("key_len", 10 ** 6), "truncated file: metadata key"),
    "key_not_utf8": (lambda b: fz.overwrite(b, _field(b, "key_len").offset + 8, b"\xff\xfe"), "not valid UTF-8"),
    "value_type_unknown": (_set("vtype", 99), "unknown value type 99"),
    "array_type_unknown": (_set("arr_type", 99, "tokenizer.ggml.tokens"), "unknown array element type 99"),
    "array_len_2_40": (_set("arr_len", 1 << 40, "tokenizer.ggml.tokens"), "exceed the limit of 16777216"),
    "array_len_past_end": (_set("arr_len", 1 << 20, "tokenizer.ggml.tokens"), "truncated file"),
    "token_len_2_60": (_set("str_len", 1 << 60, "tokenizer.ggml.tokens[0]"), "exceeds the limit"),
    # an element past the first of a string array: the bulk string-array reader names it
    "token_len_past_end": (_set("str_len", 10 ** 7, "tokenizer.ggml.tokens[2]"),
                           "truncated file: element 2 of tokenizer.ggml.tokens"),
    "token_not_utf8": (lambda b: fz.overwrite(b, _field(b, "str_len", "tokenizer.ggml.tokens[3]").offset + 8, b"\xff"),
                       "element 3 of tokenizer.ggml.tokens is not valid UTF-8"),
    "nested_arrays_deep": (lambda b: rebuild(b, {"x.nested": _nested(50)}), "nested more than 4 deep"),
    "n_dims_0": (_set("n_dims", 0), "bad number of dimensions 0"),
    "n_dims_2_31": (_set("n_dims", 1 << 31), "bad number of dimensions 2147483648"),
    "tensor_dim_zero": (_set("dim", 0), "bad dimension 0"),
    "tensor_dim_2_62": (_set("dim", 1 << 62), "extends past the end"),
    "tensor_dim_max": (_set("dim", (1 << 64) - 1), "extends past the end"),
    "tensor_type_unknown": (_set("ttype", 9999), "unknown tensor type type#9999"),
    # a type the format defines and we do not compute with (Q8_1 is ggml's activation type)
    "tensor_type_q8_1": (_set("ttype", 9), "unsupported type Q8_1"),
    "tensor_offset_misaligned": (lambda b: fz.set_field(b, _field(b, "toffset", nth=1),
                                                        int.from_bytes(b[_field(b, "toffset", nth=1).offset:][:8],
                                                                       "little") + 4), "is not aligned to 32"),
    "tensor_offset_2_40": (_set("toffset", 1 << 40), "extends past the end"),
    "tensor_offset_max": (_set("toffset", (1 << 64) - 32), "extends past the end"),
    "tensors_all_at_offset_0": (lambda b: rebuild(b, tensors=_all_offsets_zero), None),
    "alignment_48": (lambda b: rebuild(b, {"general.alignment": 48}), "general.alignment 48 is not a power of two"),
    "alignment_0": (lambda b: rebuild(b, {"general.alignment": 0}), "general.alignment 0 is not a power of two"),
    "alignment_string": (lambda b: rebuild(b, {"general.alignment": "32"}), "is not a power of two"),
    "alignment_2_40": (lambda b: rebuild(b, {"general.alignment": Raw(10, struct.pack("<Q", 1 << 40))}),
                       "extends past the end"),
    "arch_missing": (lambda b: rebuild(b, drop=["general.architecture"]), "missing metadata key general.architecture"),
    "arch_array": (lambda b: rebuild(b, {"general.architecture": np.arange(5, dtype=np.uint8)}),
                   "unsupported architecture (a ndarray, not a string)"),
    "arch_newline": (lambda b: rebuild(b, {"general.architecture": "qwen2\nINJECTED"}),
                     "unsupported architecture 'qwen2\\nINJECTED'"),
    "block_count_0": (lambda b: rebuild(b, {f"{ARCH}.block_count": 0}), "block_count = 0 is out of range"),
    "block_count_2_31": (lambda b: rebuild(b, {f"{ARCH}.block_count": 1 << 31}), "is out of range"),
    "block_count_2": (lambda b: rebuild(b, {f"{ARCH}.block_count": 2}), "missing tensor blk.1.attn_norm.weight"),
    "block_count_float": (lambda b: rebuild(b, {f"{ARCH}.block_count": 1.0}), "has the wrong type"),
    "block_count_negative": (lambda b: rebuild(b, {f"{ARCH}.block_count": -1}), "is out of range"),
    "head_count_0": (lambda b: rebuild(b, {f"{ARCH}.attention.head_count": 0}), "is out of range"),
    "head_count_3": (lambda b: rebuild(b, {f"{ARCH}.attention.head_count": 3}), "even head dimension"),
    "head_count_kv_array": (lambda b: rebuild(b, {f"{ARCH}.attention.head_count_kv": np.array([1], np.uint32)}),
                            "has the wrong type"),
    "key_length_odd": (lambda b: rebuild(b, {f"{ARCH}.attention.key_length": 15}), "even head dimension"),
    "key_length_2_62": (lambda b: rebuild(b, {f"{ARCH}.attention.key_length": Raw(10, struct.pack("<Q", 1 << 62))}),
                        "even head dimension"),
    "rope_dims_odd": (lambda b: rebuild(b, {f"{ARCH}.rope.dimension_count": 7}), "rope.dimension_count 7"),
    "rope_base_nan": (lambda b: rebuild(b, {f"{ARCH}.rope.freq_base": float("nan")}), "freq_base = nan"),
    "rope_base_negative": (lambda b: rebuild(b, {f"{ARCH}.rope.freq_base": -10000.0}), "must be a positive"),
    "eps_negative": (lambda b: rebuild(b, {f"{ARCH}.attention.layer_norm_rms_epsilon": -1.0}), "out of range"),
    "eps_inf": (lambda b: rebuild(b, {f"{ARCH}.attention.layer_norm_rms_epsilon": float("inf")}), "out of range"),
    "context_0": (lambda b: rebuild(b, {f"{ARCH}.context_length": 0}), "context_length = 0 must be positive"),
    "context_2_62": (lambda b: rebuild(b, {f"{ARCH}.context_length": Raw(10, struct.pack("<Q", 1 << 62))}), None),
    "vocab_1e9": (lambda b: rebuild(b, {f"{ARCH}.vocab_size": 10 ** 9}), "vocabulary size 1000000000 is out of range"),
    "vocab_mismatch": (lambda b: rebuild(b, {f"{ARCH}.vocab_size": 300}), "token_embd.weight has shape"),
    "tokens_not_strings": (lambda b: rebuild(b, {"tokenizer.ggml.tokens": np.arange(N_VOCAB, dtype=np.int32),
                                                 f"{ARCH}.vocab_size": N_VOCAB}), "tokens is not an array of strings"),
    "tokens_empty": (lambda b: rebuild(b, {"tokenizer.ggml.tokens": [], f"{ARCH}.vocab_size": N_VOCAB}),
                     "tokens is not an array of strings"),  # an empty array is written as u8
    "head_count_kv_3": (lambda b: rebuild(b, {f"{ARCH}.attention.head_count_kv": 3}), "not a multiple"),
    "tokens_nested": (lambda b: rebuild(b, {"tokenizer.ggml.tokens": [["a"]] * N_VOCAB, f"{ARCH}.vocab_size": N_VOCAB}),
                      "tokens is not an array of strings"),
    "tokens_too_few": (lambda b: rebuild(b, {"tokenizer.ggml.tokens": ["a", "b"]}), "token_embd.weight has shape"),
    "tokens_duplicate": (lambda b: rebuild(b, {"tokenizer.ggml.tokens": ["a"] * N_VOCAB}), "duplicate token text"),
    "merges_missing": (lambda b: rebuild(b, drop=["tokenizer.ggml.merges"]), "vocabulary or merges missing"),
    "merges_numbers": (lambda b: rebuild(b, {"tokenizer.ggml.merges": np.arange(7, dtype=np.uint8)}),
                       "merges is not an array of strings"),
    "merges_garbage": (lambda b: rebuild(b, {"tokenizer.ggml.merges": ["", " ", "x", "a b c", "\x00 \x00"]}), None),
    "token_type_short": (lambda b: rebuild(b, {"tokenizer.ggml.token_type": np.ones(10, np.int32)}),
                         "token_type is not an array of 266 integers"),
    "token_type_floats": (lambda b: rebuild(b, {"tokenizer.ggml.token_type": np.ones(N_VOCAB, np.float32)}),
                          "token_type is not an array"),
    "token_type_all_byte": (lambda b: rebuild(b, {"tokenizer.ggml.token_type": np.full(N_VOCAB, 6, np.int32)}), None),
    "token_type_wild": (lambda b: rebuild(b, {"tokenizer.ggml.token_type":
                                              np.arange(-133, 133, dtype=np.int32) * 1000003}), None),
    "tokenizer_model_bert": (lambda b: rebuild(b, {"tokenizer.ggml.model": "bert"}), "unsupported tokenizer model 'bert'"),
    "tokenizer_model_array": (lambda b: rebuild(b, {"tokenizer.ggml.model": np.zeros(3, np.uint8)}),
                              "unsupported tokenizer model (a ndarray)"),
    "pre_array": (lambda b: rebuild(b, {"tokenizer.ggml.pre": np.zeros(3, np.uint8)}), "unknown pre-tokenizer"),
    "pre_unknown": (lambda b: rebuild(b, {"tokenizer.ggml.pre": "klingon"}), "unknown pre-tokenizer 'klingon'"),
    "add_bos_array": (lambda b: rebuild(b, {"tokenizer.ggml.add_bos_token": np.zeros(3, np.uint8)}),
                      "add_bos_token is not a boolean"),
    "bos_eos_ids_wild": (lambda b: rebuild(b, {"tokenizer.ggml.bos_token_id": 10 ** 9,
                                               "tokenizer.ggml.eos_token_id": -5,
                                               "tokenizer.ggml.eot_token_id": "x"}), None),
    "chat_template_number": (lambda b: rebuild(b, {"tokenizer.chat_template": 5}), "chat_template is not a string"),
    "chat_template_raises": (lambda b: rebuild(b, {"tokenizer.chat_template": "{{ raise_exception('boom') }}"}),
                             "chat template error: boom"),
    "chat_template_syntax": (lambda b: rebuild(b, {"tokenizer.chat_template": "{% for %}"}), "chat template error"),
    "chat_template_sandbox": (lambda b: rebuild(b, {"tokenizer.chat_template":
                                                    "{{ ''.__class__.__mro__[1].__subclasses__() }}"}),
                              "chat template error"),
    "chat_template_huge_string": (lambda b: rebuild(b, {"tokenizer.chat_template": "{{ 'x' * 10**10 }}"}),
                                  "chat template error"),
    "chat_template_huge_loop": (lambda b: rebuild(b, {"tokenizer.chat_template":
                                                      "{% for i in range(99999) %}{% for j in range(99999) %}"
                                                      "{% endfor %}{% endfor %}"}), "chat template error"),
    "newline_in_tensor_name": (lambda b: rebuild(b, tensors=_extra_tensor("evil\nname", 9999)),
                               "tensor evil\\nname: unknown tensor type"),
    "tensor_renamed": (lambda b: rebuild(b, tensors=_rename("blk.0.ffn_up.weight", "blk.0.ffn_upp.weight")),
                       "missing tensor blk.0.ffn_up.weight"),
    "tensor_duplicate_name": (lambda b: rebuild(b, tensors=_rename("blk.0.ffn_up.weight", "blk.0.ffn_gate.weight")),
                              "duplicated"),
    "tensor_3d": (lambda b: rebuild(b, tensors=lambda infos: [t if t[0] != "blk.0.ffn_up.weight" else
                                                              [t[0], t[1] + [1], t[2], t[3]] for t in infos]),
                  "tensor blk.0.ffn_up.weight has shape [32, 64, 1]"),
    "norm_weight_nan": (lambda b: rebuild(b, data_patch=_patch_tensor("blk.0.attn_norm.weight",
                                                                      np.full(4, np.nan, np.float32).tobytes())),
                        "holds NaN or Inf"),
    "matrix_weight_nan_inf": (lambda b: rebuild(b, data_patch=_patch_tensor(
        "blk.0.ffn_up.weight", np.array([np.nan, np.inf, -np.inf, 3e38] * 64, np.float32).tobytes())), None),
    "truncated_in_kv": (lambda b: fz.truncate(b, _field(b, "str_len", "tokenizer.ggml.tokens[3]").offset + 3),
                        "truncated file"),
    "truncated_in_tensor_infos": (lambda b: fz.truncate(b, _field(b, "toffset", nth=2).offset + 5),
                                  "truncated file: offset of tensor"),
    "truncated_in_padding": (lambda b: fz.truncate(b, fz.layout(b).data_start - 1), "extends past the end"),
    "truncated_in_data": (lambda b: fz.truncate(b, len(b) - 100), "extends past the end"),
}


def build_case(name: str, base: bytes) -> tuple[bytes, str | None]:
    make, expected = CORPUS[name]
    return make(base), expected


# cases whose construction needs more than one line
def _dup(b: bytes) -> bytes:
    """Two KV pairs with the same key: re-serialize, then rename the second key to the first."""
    data = rebuild(b, {"general.aaaa": 1, "general.aaab": 2})
    return data.replace(b"general.aaab", b"general.aaaa", 1)


def _f16_embd(b: bytes) -> bytes:
    """token_embd.weight re-typed F16 (its bytes then read as twice as many halves): still in bounds, loads."""
    return rebuild(b, tensors=lambda infos: [t if t[0] != "token_embd.weight" else [t[0], t[1], 1, t[3]]
                                             for t in infos])


CORPUS["duplicate_key"] = (_dup, "metadata key general.aaaa is duplicated")
CORPUS["tensor_type_f16_shape_kept"] = (_f16_embd, None)
