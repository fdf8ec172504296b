"""APRT format: exact byte layout, bit-exact round trips, every error."""
import os
import struct

import numpy as np
import pytest

from trace import aprt
from trace.aprt import WHOLE_MODEL, AprtError, create_aprt, read_aprt, stage_path, write_aprt

# quiet NaN, NaN with payload, signalling NaN with payload, negative NaN, +Inf, -Inf, -0.0, +0.0,
# smallest denormal, 1.0, largest finite
SPECIAL_BITS = np.array([0x7FC00000, 0x7FC12345, 0x7FA00001, 0xFFC00F00, 0x7F800000, 0xFF800000,
                         0x80000000, 0x00000000, 0x00000001, 0x3F800000, 0x7F7FFFFF], dtype=np.uint32)


def special_values():
    return SPECIAL_BITS.view(np.float32)


def test_exact_byte_layout(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, 3, np.array([[1.5, -2.0], [0.25, -0.0]], dtype=np.float32))
    assert p.read_bytes() == struct.pack("<4sII4f", b"APRT", 3, 4, 1.5, -2.0, 0.25, -0.0)


def test_whole_model_header_and_special_bits_layout(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, None, special_values())
    expected = struct.pack("<4sII", b"APRT", 0xFFFFFFFF, len(SPECIAL_BITS))
    expected += struct.pack(f"<{len(SPECIAL_BITS)}I", *SPECIAL_BITS.tolist())
    assert p.read_bytes() == expected
    assert WHOLE_MODEL == 0xFFFFFFFF


def test_read_hand_made_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(struct.pack("<4sII3f", b"APRT", 7, 3, 1.0, -0.0, float("inf")))
    f = read_aprt(p)
    assert (f.layer, f.count) == (7, 3)
    assert f.values.dtype == np.float32 and f.values.shape == (3,)
    assert f.values.view(np.uint32).tolist() == [0x3F800000, 0x80000000, 0x7F800000]


@pytest.mark.parametrize("layer", [0, 5, None])
def test_write_read_round_trip_bit_exact(tmp_path, layer):
    p = tmp_path / "x.bin"
    write_aprt(p, layer, special_values())
    f = read_aprt(p)
    assert f.layer == layer and f.count == len(SPECIAL_BITS)
    np.testing.assert_array_equal(f.values.view(np.uint32), SPECIAL_BITS)


def test_explicit_whole_model_layer_reads_as_none(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, WHOLE_MODEL, np.zeros(2, np.float32))
    assert read_aprt(p).layer is None


def test_big_endian_input_is_written_little_endian(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, 0, special_values().astype(">f4"))
    np.testing.assert_array_equal(read_aprt(p).values.view(np.uint32), SPECIAL_BITS)


def test_read_values_are_read_only_memmap(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, 0, np.arange(4, dtype=np.float32))
    values = read_aprt(p).values
    assert isinstance(values, np.memmap) and values.ndim == 1
    assert not values.flags.writeable
    with pytest.raises(ValueError):
        values[0] = 1.0


def test_zero_length_body(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, 2, np.zeros(0, np.float32))
    assert p.read_bytes() == struct.pack("<4sII", b"APRT", 2, 0)
    f = read_aprt(p)
    assert (f.layer, f.count, f.values.shape) == (2, 0, (0,))


def test_write_is_atomic_and_leaves_no_partial(tmp_path):
    p = tmp_path / "x.bin"
    write_aprt(p, 0, np.ones(3, np.float32))
    assert os.listdir(tmp_path) == ["x.bin"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(aprt.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_aprt(tmp_path / "x.bin", 0, np.ones(3, np.float32))
    assert os.listdir(tmp_path) == []


def test_create_aprt_makes_final_size_file_with_writable_body(tmp_path):
    p = tmp_path / "x.bin"
    body = create_aprt(p, 4, 5)
    assert isinstance(body, np.memmap) and body.dtype == np.float32 and body.shape == (5,)
    assert p.stat().st_size == 12 + 4 * 5
    assert p.read_bytes()[:12] == struct.pack("<4sII", b"APRT", 4, 5)
    body[:] = special_values()[:5]
    body.flush()
    np.testing.assert_array_equal(read_aprt(p).values.view(np.uint32), SPECIAL_BITS[:5])


def test_create_aprt_zero_values_and_whole_model(tmp_path):
    p = tmp_path / "x.bin"
    body = create_aprt(p, None, 0)
    assert body.shape == (0,)
    assert p.read_bytes() == struct.pack("<4sII", b"APRT", 0xFFFFFFFF, 0)


def test_error_bad_magic(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(struct.pack("<4sII", b"GGUF", 0, 0))
    with pytest.raises(AprtError, match=r"not an APRT file \(magic b'GGUF', expected b'APRT'\)") as e:
        read_aprt(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("n", [0, 4, 11])
def test_error_header_truncated(tmp_path, n):
    p = tmp_path / "x.bin"
    p.write_bytes(struct.pack("<4sII", b"APRT", 0, 0)[:n])
    with pytest.raises(AprtError, match=f"header truncated: {n} bytes, an APRT header is 12") as e:
        read_aprt(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("extra", [-4, -1, 1, 8])
def test_error_body_length(tmp_path, extra):
    p = tmp_path / "x.bin"
    p.write_bytes(struct.pack("<4sII", b"APRT", 0, 3) + b"\0" * (12 + extra))
    with pytest.raises(AprtError) as e:
        read_aprt(p)
    msg = str(e.value)
    assert str(p) in msg
    assert f"body is {12 + extra} bytes but the header says 3 values (12 bytes)" in msg


def test_error_huge_count_with_small_body(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(struct.pack("<4sII", b"APRT", 0, 0xFFFFFFFF) + b"\0" * 8)
    with pytest.raises(AprtError, match=r"body is 8 bytes but the header says 4294967295 values \(17179869180 bytes\)"):
        read_aprt(p)


def test_error_missing_file_and_directory(tmp_path):
    with pytest.raises(AprtError, match="nope.bin: cannot read: No such file or directory"):
        read_aprt(tmp_path / "nope.bin")
    with pytest.raises(AprtError, match="cannot read"):
        read_aprt(tmp_path)


def test_error_count_overflow_on_create(tmp_path):
    p = tmp_path / "x.bin"
    with pytest.raises(AprtError, match=r"count 4294967296 would overflow the u32 count field \(max 4294967295\)") as e:
        create_aprt(p, 0, 2**32)
    assert str(p) in str(e.value)
    assert not p.exists()


def test_error_count_overflow_on_write(tmp_path):
    huge = np.broadcast_to(np.float32(0), (2**32,))  # zero-stride: no memory
    with pytest.raises(AprtError, match="count 4294967296 would overflow"):
        write_aprt(tmp_path / "x.bin", 0, huge)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("layer", [-1, 2**32])
def test_error_layer_does_not_fit(tmp_path, layer):
    with pytest.raises(AprtError, match=f"layer {layer} does not fit the u32 layer field"):
        create_aprt(tmp_path / "x.bin", layer, 1)


def test_stage_path(tmp_path):
    assert stage_path(tmp_path, "attn_norm", 3) == tmp_path / "layer-3" / "attn_norm.bin"
    assert stage_path(tmp_path, "post_ffn_residual", 0) == tmp_path / "layer-0" / "post_ffn_residual.bin"
    assert stage_path(tmp_path, "embedding", None) == tmp_path / "layer-0" / "embedding.bin"
    assert stage_path(tmp_path, "final_norm", None) == tmp_path / "final_norm.bin"
    assert stage_path(str(tmp_path), "lm_head", None) == tmp_path / "lm_head.bin"


@pytest.mark.parametrize("stage, layer, message", [
    ("nope", 0, "unknown stage 'nope'"),
    ("lm_head", 3, "lm_head is a whole-model stage: layer must be None, got 3"),
    ("embedding", 0, "embedding is a whole-model stage: layer must be None, got 0"),
    ("ffn_up", None, "ffn_up is a per-layer stage: layer is required, got None"),
])
def test_stage_path_errors(tmp_path, stage, layer, message):
    with pytest.raises(ValueError, match=message):
        stage_path(tmp_path, stage, layer)
