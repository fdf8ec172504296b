"""Dataset collection (trace.collect, `cli collect`), reading it back (trace.collection) and export.

Every prompt's rows must equal a standalone prefill trace of it, bit for bit, whoever computed
the shard (this process, local worker processes, Ray actors); a collection killed with SIGKILL
and run again must end complete, without recomputing finished shards and without a lost or
duplicated row.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, engine_for, model_file
from tests.test_trace_cli import assert_one_line_error, run_cli
from trace.capture import capture, plan_for_model
from trace.collect import collect, collection_plan, plan_shards
from trace.collection import load_collection

MODEL = "smollm2-135m-q4_1"
STAGES, LAYERS = "embedding,ffn_swigl,post_ffn_residual,final_norm", "0,7,29"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived an old "
           "fisherman who had never once caught a fish.", "2+2=", "def reverse(s):\n    return s[::-1]",
           "Hello", "Photosynthesis converts light into chemical energy in plants.", "A B C D E F G H I J K",
           "Why is the sky blue?"]

pytestmark = pytest.mark.model


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def eng():
    return engine_for(MODEL)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def local(eng, prompts_file, tmp_path_factory):
    """An in-process collection: several shards, one prompt truncated."""
    out = tmp_path_factory.mktemp("coll") / "local"
    plan = collection_plan(STAGES, LAYERS, eng.config)
    manifest = collect(eng, prompts_file, plan, out, raw=True, max_prompt_tokens=20, shard_tokens=25,
                       progress=False)
    return out, manifest


def all_rows(coll):
    return {k: np.asarray(coll[k]) for k in coll.keys}


def test_rows_equal_standalone_traces(eng, local, tmp_path):
    """Prompt i's rows of each (stage, layer) are a prefill trace of its (truncated) ids, bit for bit."""
    out, manifest = local
    coll = load_collection(out)
    assert manifest["complete"] and manifest["counts"]["shards"] > 2
    assert coll.n_prompts == len(PROMPTS) and coll.offsets[0] == 0 and coll.offsets[-1] == coll.n_tokens
    assert manifest["counts"]["truncated_prompts"] == 1 and manifest["counts"]["truncated_tokens"] > 0
    plan = plan_for_model(STAGES, LAYERS, eng.config)
    for i, text in enumerate(PROMPTS):
        ids = eng.prompt_ids(text, raw=True)[:20]
        p = coll.prompt(i)
        assert p.text == text and list(p.token_ids) == ids
        assert p.truncated_tokens == len(eng.prompt_ids(text, raw=True)) - len(ids)
        cap_dir = tmp_path / f"p{i}"
        cap_dir.mkdir()
        m = capture(eng, ids, plan, cap_dir, text)
        for e in m["files"]:
            want = np.fromfile(cap_dir / e["path"], dtype="<f4", offset=12).reshape(e["shape"])
            got = p[e["stage"], e["layer"]]
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), (i, e["stage"], e["layer"])


def test_shards_group_prompts_in_order():
    shards = plan_shards([5, 10, 30, 1, 1, 1], 12)
    assert [(s.first, s.n_prompts, s.rows) for s in shards] == [(0, 2, 15), (2, 1, 30), (3, 3, 3)]
    assert plan_shards([3], 1)[0].rows == 3


def test_reading_rows_across_shards(local):
    coll = load_collection(local[0])
    x = coll["post_ffn_residual", 7]
    whole = np.concatenate(list(x.chunks()))
    assert x.shape == whole.shape == (coll.n_tokens, 576) and len(list(x.chunks())) == len(coll.manifest["shards"])
    cut = int(x.starts[1])   # a shard boundary
    for key in (slice(None), slice(cut - 3, cut + 4), slice(cut, cut + 1), slice(None, None, 3), -1, cut,
                [0, cut, -1, cut - 1], np.arange(coll.n_tokens) % 2 == 0, (slice(cut - 2, cut + 2), 5), (cut, 7)):
        assert np.array_equal(x[key], whole[key]), key
    assert isinstance(x[1:3], np.memmap)   # rows inside one shard: a view, no copy
    assert np.array_equal(np.asarray(coll["embedding"]), np.asarray(coll["embedding", None]))
    with pytest.raises(KeyError, match="not in this collection"):
        coll["ffn_swigl", 3]
    with pytest.raises(IndexError):
        x[coll.n_tokens]
    assert np.array_equal(coll.token_ids[coll.offsets[2]:coll.offsets[3]], coll.prompt(2).token_ids)


def test_workers_and_ray_equal_this_process(eng, local, prompts_file, tmp_path):
    """Local worker processes and Ray actors write the same bytes as this process."""
    want = all_rows(load_collection(local[0]))
    plan = collection_plan(STAGES, LAYERS, eng.config)
    common = dict(raw=True, max_prompt_tokens=20, shard_tokens=25, progress=False)
    collect(eng, prompts_file, plan, tmp_path / "w2", workers=2, threads=1, **common)
    got = all_rows(load_collection(tmp_path / "w2"))
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
    import ray
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        m = collect(eng, prompts_file, plan, tmp_path / "ray", use_ray=True, workers=2, threads=1, **common)
    finally:
        ray.shutdown()
    assert m["runs"][-1]["ray"] and m["complete"]
    got = all_rows(load_collection(tmp_path / "ray"))
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def _shard_dirs(out):
    return sorted(p for p in out.glob("shard-*") if not p.name.endswith(".partial"))


def test_sigkill_then_resume_completes_without_lost_or_duplicated_rows(eng, tmp_path):
    """kill -9 midway, then the same command: finished shards are kept as they were, the rest
    computed, and the result equals an uninterrupted collection's."""
    texts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(32)]
    prompts = write_jsonl(tmp_path / "many.jsonl", texts)
    out = tmp_path / "killed"
    args = ["collect", model_file(MODEL), "--prompts", prompts, "--out", out, "--stages", "ffn_swigl,post_ffn_residual",
            "--layers", "3,20", "--raw", "--shard-tokens", "50"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(_shard_dirs(out)) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    finished = {d.name: [(p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))]
                for d in _shard_dirs(out)}
    assert 2 <= len(finished) < manifest["counts"]["shards"]
    with pytest.raises(Exception, match="incomplete"):
        load_collection(out)

    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["runs"][-1]["shards"] == manifest["counts"]["shards"] - len(finished)
    for name, stamps in finished.items():   # not recomputed
        assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / name).rglob("*"))] == stamps
    assert not list(out.glob("*.partial"))

    plan = collection_plan("ffn_swigl,post_ffn_residual", "3,20", eng.config)
    collect(eng, prompts, plan, tmp_path / "whole", raw=True, shard_tokens=50, progress=False)
    want, coll = load_collection(tmp_path / "whole"), load_collection(out)
    assert np.array_equal(coll.offsets, want.offsets) and np.array_equal(coll.token_ids, want.token_ids)
    assert coll.n_tokens == sum(len(eng.prompt_ids(t, raw=True)) for t in texts)
    for k in want.keys:
        assert np.asarray(coll[k]).tobytes() == np.asarray(want[k]).tobytes(), k


def test_another_plan_model_or_prompts_is_refused(local, prompts_file, tmp_path):
    out, _ = local
    base = ["collect", model_file(MODEL), "--prompts", prompts_file, "--out", out, "--raw", "--stages", STAGES,
            "--layers", LAYERS, "--max-prompt-tokens", "20", "--shard-tokens", "25"]
    res = run_cli(*base)
    assert res.returncode == 0 and "already complete" in res.stderr, res.stderr
    assert_one_line_error(run_cli(*base[:-1], "26"), "--shard-tokens", "use a new --out")
    layers = base.index("--layers") + 1
    assert_one_line_error(run_cli(*base[:layers], "0,7", *base[layers + 1:]), "another --layers")
    other = write_jsonl(tmp_path / "other.jsonl", PROMPTS[:-1])
    assert_one_line_error(run_cli(*base[:3], other, *base[4:]), "another prompts file")
    assert_one_line_error(run_cli(*[a if a != "--raw" else "--exact" for a in base]), "another --raw")


def test_bad_input_is_one_line(prompts_file, tmp_path):
    m = model_file(MODEL)
    assert_one_line_error(run_cli("collect", m, "--prompts", prompts_file, "--out", tmp_path / "a",
                                  "--stages", "attn_softmax"), "attn_softmax", "per-token")
    assert_one_line_error(run_cli("collect", m, "--prompts", prompts_file, "--out", tmp_path / "a",
                                  "--stages", "lm_head"), "lm_head")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert_one_line_error(run_cli("collect", m, "--prompts", bad, "--out", tmp_path / "b"), "line 2", '"text"')
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("collect", m, "--prompts", prompts_file, "--out", busy, "--layers", "0"),
                          "not empty")
    assert_one_line_error(run_cli("collect", m, "--prompts", prompts_file, "--out", tmp_path / "c", "--layers", "0",
                                  "--shard-tokens", "0"), "--shard-tokens")
    assert_one_line_error(run_cli("export", tmp_path / "nothing", "--format", "arrow", "--out", tmp_path / "x"),
                          "no collection")


def test_export_arrow_and_safetensors(local, tmp_path):
    coll = load_collection(local[0])
    res = run_cli("export", local[0], "--format", "arrow", "--out", tmp_path / "c.arrow")
    assert res.returncode == 0, res.stderr
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install '.[export]')")
    table = pa.ipc.open_stream(str(tmp_path / "c.arrow")).read_all()
    assert table.num_rows == coll.n_tokens
    assert np.array_equal(table["token_id"].to_numpy(), coll.token_ids)
    assert np.array_equal(np.diff(coll.offsets), np.bincount(table["prompt"].to_numpy()))
    assert table["position"].to_numpy()[coll.offsets[3]] == 0
    col = table["post_ffn_residual.7"].combine_chunks()
    assert np.array_equal(col.flatten().to_numpy().reshape(-1, 576), np.asarray(coll["post_ffn_residual", 7]))

    res = run_cli("export", local[0], "--format", "safetensors", "--out", tmp_path / "c.safetensors")
    assert res.returncode == 0, res.stderr
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed (pip install '.[export]')")
    t = st.load_file(str(tmp_path / "c.safetensors"))
    assert np.array_equal(t["ffn_swigl.29"], np.asarray(coll["ffn_swigl", 29]))
    assert np.array_equal(t["final_norm"], np.asarray(coll["final_norm"]))
    assert np.array_equal(t["offsets"], coll.offsets) and np.array_equal(t["token_ids"], coll.token_ids)
    assert_one_line_error(run_cli("export", local[0], "--format", "arrow", "--out", tmp_path / "c.arrow"), "--force")


def test_ray_missing_or_shadowed_is_one_line(monkeypatch):
    """Without Ray (or with only a folder named ray on sys.path, as Ray's /tmp/ray session folder
    is when run from /tmp) --ray says what to install."""
    import types
    from engine.errors import EngineError
    from trace.collect import import_ray
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    with pytest.raises(EngineError, match=r"pip install 'numgguf\[ray\]'"):
        import_ray()


def test_ray_takes_an_optional_address():
    """`--ray ADDRESS` (host:port, ray://..., auto) is --ray-address; a bare --ray is left alone."""
    from cli import _ray_address_argument
    base = ["collect", "--prompts", "p.txt", "--out", "o"]
    assert _ray_address_argument(base + ["--ray", "10.0.0.5:6379"]) == base + ["--ray", "--ray-address", "10.0.0.5:6379"]
    assert _ray_address_argument(base + ["--ray", "auto"])[-2:] == ["--ray-address", "auto"]
    assert _ray_address_argument(["collect", "--ray", "model.gguf"] + base[1:]) == ["collect", "--ray", "model.gguf"] + base[1:]
    assert _ray_address_argument(base + ["--ray"]) == base + ["--ray"]


def test_shard_sink_hands_out_windows_of_the_files(eng, tmp_path):
    """Zero copy: a planned stage's buffer is a memory map of the shard file at the prompt's rows."""
    from trace.sink import ShardSink
    cfg = eng.config
    sink = ShardSink(tmp_path, collection_plan("ffn_swigl", "3", cfg), cfg, n_rows=10)
    sink.create()
    sink.start_prompt(6)
    sink.begin(1, 2)
    buf = sink.buffer("ffn_swigl", 3, (2, cfg.ffn_dim))
    assert isinstance(buf, np.memmap) and str(buf.filename) == str((tmp_path / "layer-3" / "ffn_swigl.bin").resolve())
    buf[:] = np.arange(2 * cfg.ffn_dim, dtype=np.float32).reshape(2, -1)
    assert not isinstance(sink.buffer("attn_norm", 3, (2, cfg.dim)), np.memmap)   # unplanned: scratch
    sink.finish()
    rows = np.fromfile(tmp_path / "layer-3" / "ffn_swigl.bin", dtype="<f4", offset=12).reshape(10, -1)
    assert np.array_equal(rows[7:9], np.arange(2 * cfg.ffn_dim, dtype=np.float32).reshape(2, -1))
    assert not rows[:7].any() and not rows[9:].any()
    with pytest.raises(ValueError, match="past the shard"):
        sink.begin(3, 2)
