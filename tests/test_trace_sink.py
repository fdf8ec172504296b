"""TraceSink: zero-copy memmap buffers, publish on finish, nothing complete-looking on abort."""
from pathlib import Path

import numpy as np
import pytest

from trace.aprt import read_aprt
from trace.plan import TracePlan
from trace.sink import NullSink, TraceSink
from tests.helpers import memmap_base

SPECIAL = np.array([0x7FC12345, 0x7FA00001, 0x7F800000, 0xFF800000, 0x80000000, 0x3F800000],
                   dtype=np.uint32).view(np.float32)


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())





@pytest.fixture
def plan():
    return TracePlan(("embedding", "attn_norm", "ffn_up", "lm_head"), (1,))


def test_wanted_buffer_is_memmap_of_partial_file(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    buf = sink.buffer("attn_norm", 1, (2, 3))
    partial = tmp_path / "layer-1" / "attn_norm.bin.partial"
    assert buf.shape == (2, 3) and buf.dtype == np.float32 and buf.flags.writeable and buf.flags.c_contiguous
    base = memmap_base(buf)
    assert base is not None and Path(base.filename).resolve() == partial.resolve()
    assert files(tmp_path) == ["layer-1/attn_norm.bin.partial"]
    assert partial.stat().st_size == 12 + 4 * 6


def test_writes_land_in_the_file_without_copy(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    buf = sink.buffer("attn_norm", 1, (2, 3))
    buf[...] = SPECIAL.reshape(2, 3)
    partial = tmp_path / "layer-1" / "attn_norm.bin.partial"
    fresh = np.memmap(partial, dtype="<f4", mode="r", offset=12, shape=(6,))
    np.testing.assert_array_equal(fresh.view(np.uint32), SPECIAL.view(np.uint32))  # visible before finish
    written = sink.finish()
    final = tmp_path / "layer-1" / "attn_norm.bin"
    assert written == [("attn_norm", 1, (2, 3), final)]
    f = read_aprt(final)
    assert (f.layer, f.count) == (1, 6)
    np.testing.assert_array_equal(f.values.view(np.uint32), SPECIAL.view(np.uint32))
    assert files(tmp_path) == ["layer-1/attn_norm.bin"]


def test_numba_kernel_writes_straight_into_the_file(tmp_path, plan):
    numba = pytest.importorskip("numba")

    @numba.njit
    def fill(out):
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] = i * 10 + j

    sink = TraceSink(tmp_path, plan, n_layers=2)
    fill(sink.buffer("ffn_up", 1, (2, 3)))
    sink.finish()
    assert read_aprt(tmp_path / "layer-1" / "ffn_up.bin").values.tolist() == [0, 1, 2, 10, 11, 12]


def test_unwanted_stage_gets_scratch_and_no_file(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    for stage, layer in (("attn_norm", 0), ("ffn_gate", 1), ("final_norm", None)):
        buf = sink.buffer(stage, layer, (2, 4))
        assert buf.shape == (2, 4) and buf.dtype == np.float32
        assert memmap_base(buf) is None
    assert sink.finish() == []
    assert files(tmp_path) == []


def test_whole_model_stages_paths_and_headers(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.buffer("embedding", None, (3, 2))[...] = 1.0
    sink.buffer("lm_head", None, (5,))[...] = 2.0
    written = sink.finish()
    assert [(s, layer, shape) for s, layer, shape, _ in written] == [("embedding", None, (3, 2)), ("lm_head", None, (5,))]
    assert files(tmp_path) == ["layer-0/embedding.bin", "lm_head.bin"]
    emb = read_aprt(tmp_path / "layer-0" / "embedding.bin")
    assert emb.layer is None and emb.values.tolist() == [1.0] * 6
    head = read_aprt(tmp_path / "lm_head.bin")
    assert head.layer is None and head.values.tolist() == [2.0] * 5


def test_full_forward_shape(tmp_path):
    """A forward asks for every stage of every layer; only the plan's end up on disk."""
    plan = TracePlan.parse("embedding,ffn_up,final_norm", "0,2", 3)
    sink = TraceSink(tmp_path, plan, n_layers=3)
    sink.buffer("embedding", None, (2, 4))
    for layer in range(3):
        for stage in ("attn_norm", "ffn_up", "post_ffn_residual"):
            sink.buffer(stage, layer, (2, 4))[...] = layer
    sink.buffer("final_norm", None, (2, 4))
    sink.buffer("lm_head", None, (7,))
    sink.finish()
    assert files(tmp_path) == ["final_norm.bin", "layer-0/embedding.bin", "layer-0/ffn_up.bin", "layer-2/ffn_up.bin"]
    assert read_aprt(tmp_path / "layer-2" / "ffn_up.bin").values.tolist() == [2.0] * 8


def test_duplicate_request_is_an_error(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.buffer("attn_norm", 1, (2,))
    with pytest.raises(ValueError, match="stage attn_norm layer 1 was requested twice in one forward"):
        sink.buffer("attn_norm", 1, (2,))
    sink.buffer("ffn_gate", 0, (2,))
    with pytest.raises(ValueError, match="requested twice"):
        sink.buffer("ffn_gate", 0, (2,))


def test_same_stage_other_layer_is_fine(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.buffer("attn_norm", 0, (2,))
    sink.buffer("attn_norm", 1, (2,))


def test_sink_is_reusable_after_finish(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.buffer("attn_norm", 1, (2,))[...] = 1.0
    sink.finish()
    sink.buffer("attn_norm", 1, (2,))[...] = 5.0
    sink.finish()
    assert read_aprt(tmp_path / "layer-1" / "attn_norm.bin").values.tolist() == [5.0, 5.0]


def test_abort_leaves_no_files(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.buffer("embedding", None, (2, 2))[...] = 1.0
    sink.buffer("attn_norm", 1, (2, 2))[...] = 1.0
    sink.abort()
    assert files(tmp_path) == []
    assert sink.finish() == []


def test_abort_keeps_earlier_finished_forward(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.buffer("lm_head", None, (2,))[...] = 3.0
    sink.finish()
    sink.buffer("attn_norm", 1, (2,))
    sink.abort()
    assert files(tmp_path) == ["lm_head.bin"]


def test_context_manager_aborts_on_exception(tmp_path, plan):
    with pytest.raises(KeyboardInterrupt):
        with TraceSink(tmp_path, plan, n_layers=2) as sink:
            sink.buffer("attn_norm", 1, (2,))[...] = 1.0
            raise KeyboardInterrupt
    assert files(tmp_path) == []


def test_context_manager_finishes_on_clean_exit(tmp_path, plan):
    with TraceSink(tmp_path, plan, n_layers=2) as sink:
        sink.buffer("attn_norm", 1, (2,))[...] = 4.0
    assert read_aprt(tmp_path / "layer-1" / "attn_norm.bin").values.tolist() == [4.0, 4.0]
    assert files(tmp_path) == ["layer-1/attn_norm.bin"]


def test_zero_size_buffer(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    assert sink.buffer("ffn_up", 1, (0, 8)).shape == (0, 8)
    sink.finish()
    assert read_aprt(tmp_path / "layer-1" / "ffn_up.bin").count == 0


def test_plan_layer_beyond_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="plan layer 4 is out of range: the model has 4 layers"):
        TraceSink(tmp_path, TracePlan(("attn_norm",), (0, 4)), n_layers=4)


def test_reserve_delegates_to_scratch(tmp_path, plan):
    sink = TraceSink(tmp_path, plan, n_layers=2)
    sink.reserve("ffn_gate", 16)
    a = sink.buffer("ffn_gate", 0, (4, 4))
    b = sink.buffer("ffn_gate", 1, (2, 2))
    assert np.shares_memory(a, b)  # scratch reused, as with NullSink


def test_null_sink_unchanged():
    sink = NullSink()
    a = sink.buffer("attn_norm", 0, (2, 3))
    b = sink.buffer("attn_norm", 0, (2, 3))  # NullSink allows repeats
    assert np.shares_memory(a, b) and sink.finish() is None and sink.abort() is None
