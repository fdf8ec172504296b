"""Zero copy, proven: the kernels of a real forward write each captured stage straight into the
memory map of its APRT file; nothing is computed elsewhere and copied in.

Method: every kernel the forward calls is wrapped (in engine.forward's namespace) by a spy that
records its output arguments; the sink is wrapped to record the buffer it handed out for each
(stage, layer). For every captured stage, some kernel's output argument must share memory
(np.shares_memory) with the handed-out buffer, and that buffer must be a view of an np.memmap of
the stage's file. Finally, a sentinel written through the buffer after the forward shows up in the
file on disk: the buffer *is* the file's mapping, not a copy of it.
"""
from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType

import engine.forward as fwd
from tests.conftest import engine_for
from tests.synthetic import write_tiny_model
from trace.aprt import partial_path, read_aprt, stage_path
from trace.capture import plan_for_model
from trace.plan import TracePlan
from trace.sink import TraceSink
from tests.helpers import KeepSink, memmap_base

# kernel name -> how many trailing positional arguments are outputs
KERNEL_OUTPUTS = {"get_rows": 1, "rmsnorm": 1, "matmul_group": 1, "add_bias": 1, "rope": 1, "attention": 3, "add": 1,
                  "silu_and_swiglu": 2}





class RecordingSink:
    """Passes every request to a TraceSink and keeps what it handed out."""

    def __init__(self, sink):
        self.sink, self.handed = sink, {}

    def buffer(self, stage, layer, shape):
        buf = self.sink.buffer(stage, layer, shape)
        self.handed[stage, layer] = buf
        return buf


@pytest.fixture
def kernel_outputs(monkeypatch):
    """Spy on the forward's kernels; returns the list of (kernel, output array) they wrote."""
    written = []
    for name, n_out in KERNEL_OUTPUTS.items():
        real = getattr(fwd, name)

        def spy(*args, _real=real, _name=name, _n=n_out, **kw):   # outputs: the last positional arguments
            for out in args[len(args) - _n:]:
                for o in (out if isinstance(out, list) else [out]):   # matmul_group: a list of outputs
                    written.append((_name, o))
            return _real(*args, **kw)

        monkeypatch.setattr(fwd, name, spy)
    return written


def _check_zero_copy(eng, ids, out, plan, kernel_outputs):
    sink = TraceSink(out, plan, eng.config.n_layers)
    rec = RecordingSink(sink)
    eng.forward(ids, sink=rec)
    captured = {k: v for k, v in rec.handed.items() if plan.wants(*k)}
    assert captured, "nothing captured"
    writers = {}
    for key, buf in captured.items():
        mm = memmap_base(buf)
        assert mm is not None, f"{key}: the buffer is not a view of a memmap"
        assert Path(mm.filename).resolve() == partial_path(stage_path(out, *key)).resolve()
        assert np.shares_memory(buf, mm) and buf.dtype == np.float32
        # numba types the memmap view as a plain C-contiguous float32 array (no copy, no object mode)
        assert numba.typeof(buf) == numba.types.Array(numba.float32, buf.ndim, "C")
        hits = [name for name, o in kernel_outputs if np.shares_memory(o, buf)]
        assert hits, f"{key}: no kernel wrote into the file's memory map"
        writers[key[0]] = hits[0]
    written = sink.finish()
    assert {(s, layer) for s, layer, _, _ in written} == set(captured)
    # the values in the files are those of an ordinary forward, bit for bit
    keep = KeepSink()
    eng.forward(ids, sink=keep)
    for key, buf in captured.items():
        f = read_aprt(stage_path(out, *key))
        np.testing.assert_array_equal(f.values.view(np.uint32), keep.kept[key].reshape(-1).view(np.uint32))
    # the handed-out buffer IS the file: a write through it lands on disk
    for key, buf in list(captured.items())[:5]:
        buf.reshape(-1)[0] = np.float32(-1234.5)
        memmap_base(buf).flush()
        raw = stage_path(out, *key).read_bytes()
        assert np.frombuffer(raw, "<f4", count=1, offset=12)[0] == np.float32(-1234.5), key
    return writers


def test_every_stage_is_written_by_its_kernel_into_the_file_synthetic(tmp_path, kernel_outputs):
    from engine.api import Engine
    eng = Engine(write_tiny_model(tmp_path / "m.gguf", qtype=GGMLQuantizationType.Q4_K, n_layers=2), n_ctx=64)
    plan = plan_for_model("all", "all", eng.config)
    writers = _check_zero_copy(eng, eng.prompt_ids("What is 2+2?"), tmp_path / "c", plan, kernel_outputs)
    assert writers == {
        "embedding": "get_rows", "attn_norm": "rmsnorm", "qkv_matmul": "matmul_group", "qkv_bias": "add_bias",
        "q_post_rope": "rope", "k_post_rope": "rope", "attn_scores": "attention", "attn_softmax": "attention",
        "attention": "attention", "attn_out": "matmul_group", "post_attn_residual": "add", "ffn_norm": "rmsnorm",
        "ffn_gate": "matmul_group", "ffn_up": "matmul_group", "ffn_silu": "silu_and_swiglu",
        "ffn_swigl": "silu_and_swiglu", "ffn_out": "matmul_group", "post_ffn_residual": "add",
        "final_norm": "rmsnorm", "lm_head": "matmul_group"}


def test_single_token_forward_is_zero_copy_too(tmp_path, kernel_outputs):
    """One token takes the matvec path of matmul: still straight into the file."""
    from engine.api import Engine
    eng = Engine(write_tiny_model(tmp_path / "m.gguf", arch="llama", qtype=GGMLQuantizationType.Q8_0), n_ctx=64)
    plan = plan_for_model("ffn_swigl,ffn_up,lm_head", "all", eng.config)
    _check_zero_copy(eng, [5], tmp_path / "c", plan, kernel_outputs)


@pytest.mark.model
def test_ffn_swigl_layers_0_3_zero_copy_real_model(tmp_path, kernel_outputs):
    eng = engine_for("smollm2-135m-q4_1")
    plan = plan_for_model("ffn_swigl", "0-3", eng.config)
    writers = _check_zero_copy(eng, eng.prompt_ids("What is 2+2?", raw=True), tmp_path / "c", plan, kernel_outputs)
    assert writers == {"ffn_swigl": "silu_and_swiglu"}


def test_numba_kernel_accepts_memmap_without_copy(tmp_path):
    """A Numba kernel called directly with TraceSink's np.memmap writes into the mapping."""
    from kernels.elementwise import silu_and_swiglu
    sink = TraceSink(tmp_path, TracePlan(("ffn_silu", "ffn_swigl"), (0,)), 1)
    silu, swigl = sink.buffer("ffn_silu", 0, (3, 8)), sink.buffer("ffn_swigl", 0, (3, 8))
    assert isinstance(silu, np.memmap) and isinstance(swigl, np.memmap)
    gate = np.linspace(-3, 3, 24, dtype=np.float32).reshape(3, 8)
    up = np.full((3, 8), 2.0, np.float32)
    silu_and_swiglu(gate, up, silu, swigl)
    sink.finish()
    want = gate / (1 + np.exp(-gate.astype(np.float64)))
    np.testing.assert_allclose(read_aprt(tmp_path / "layer-0" / "ffn_silu.bin").values, want.ravel(), rtol=1e-6)
    np.testing.assert_allclose(read_aprt(tmp_path / "layer-0" / "ffn_swigl.bin").values, 2 * want.ravel(), rtol=1e-6)
