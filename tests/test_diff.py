"""diff_captures: pairing, tolerance, forward-order first divergence, bad input."""
import json
import math
import struct

import numpy as np
import pytest

from trace.aprt import AprtError, read_aprt, stage_path, write_aprt
from trace.diff import DiffError, compare, diff_captures, format_report

PER_LAYER = ("attn_norm", "qkv_matmul", "ffn_up", "post_ffn_residual")


def put(root, stage, layer, values):
    """Write one stage file where a capture keeps it."""
    path = stage_path(root, stage, layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_aprt(path, layer, np.asarray(values, np.float32))


def make_capture(root, n_layers=3, seed=0, per_layer=PER_LAYER):
    """A synthetic capture: embedding, per-layer stages, final_norm, lm_head (16 values each)."""
    rng = np.random.default_rng(seed)
    put(root, "embedding", None, rng.standard_normal((2, 8)))
    for layer in range(n_layers):
        for stage in per_layer:
            put(root, stage, layer, rng.standard_normal((2, 8)))
    put(root, "final_norm", None, rng.standard_normal((2, 8)))
    put(root, "lm_head", None, rng.standard_normal(16))
    return root


def perturb(root, stage, layer, delta=1.0, index=3):
    path = stage_path(root, stage, layer)
    f = read_aprt(path)
    values = np.array(f.values)
    values[index] += delta
    write_aprt(path, f.layer, values)


@pytest.fixture
def pair(tmp_path):
    return make_capture(tmp_path / "a"), make_capture(tmp_path / "b")


def test_identical_captures_agree(pair):
    report = diff_captures(*pair)
    n = 1 + 3 * len(PER_LAYER) + 2
    assert len(report.pairs) == n and report.ok and report.first_divergence is None
    assert all(p.status == "ok" and p.stats["max_abs_diff"] == 0.0 and p.stats["cosine"] == pytest.approx(1.0, abs=1e-12)
               for p in report.pairs)
    assert report.only_a == [] and report.only_b == []
    assert format_report(report).splitlines()[-1] == f"all {n} pairs agree (atol=1e-08, rtol=1e-05)"


def test_pairs_are_in_forward_order(pair):
    keys = [(p.layer, p.stage) for p in diff_captures(*pair).pairs]
    expected = [(0, "embedding")] + [(layer, s) for layer in range(3) for s in PER_LAYER]
    assert keys == expected + [(None, "final_norm"), (None, "lm_head")]


def test_first_divergence_is_earliest_stage_in_layer(pair):
    a, b = pair
    perturb(b, "post_ffn_residual", 1)
    perturb(b, "ffn_up", 1)
    perturb(b, "lm_head", None)
    report = diff_captures(a, b)
    first = report.first_divergence
    assert (first.layer, first.stage, first.status) == (1, "ffn_up", "fail")
    assert first.stats["n_bad"] == 1 and first.stats["argmax"] == 3
    assert first.stats["max_abs_diff"] == pytest.approx(1.0, abs=1e-6)
    assert [p.stage for p in report.pairs if p.status == "fail"] == ["ffn_up", "post_ffn_residual", "lm_head"]
    assert format_report(report).splitlines()[-1] == ("first divergence: layer 1 ffn_up (1 of 16 values differ "
                                                      "beyond atol=1e-08, rtol=1e-05; max |a-b| 1.000e+00 at 3)")


def test_earlier_layers_late_stage_beats_later_layers_early_stage(pair):
    a, b = pair
    perturb(b, "attn_norm", 2)
    perturb(b, "post_ffn_residual", 1)
    first = diff_captures(a, b).first_divergence
    assert (first.layer, first.stage) == (1, "post_ffn_residual")


def test_layers_ordered_numerically(tmp_path):
    a, b = make_capture(tmp_path / "a", n_layers=12), make_capture(tmp_path / "b", n_layers=12)
    perturb(b, "attn_norm", 10)
    perturb(b, "attn_norm", 2)
    assert diff_captures(a, b).first_divergence.layer == 2


def test_embedding_first_and_final_norm_before_lm_head(pair):
    a, b = pair
    perturb(b, "lm_head", None)
    perturb(b, "final_norm", None)
    assert diff_captures(a, b).first_divergence.stage == "final_norm"
    perturb(b, "attn_norm", 0)
    perturb(b, "embedding", None)
    report = diff_captures(a, b)
    assert (report.first_divergence.layer, report.first_divergence.stage) == (0, "embedding")
    assert format_report(report).splitlines()[-1].startswith("first divergence: layer 0 embedding")


def test_final_norm_after_last_layer(pair):
    a, b = pair
    perturb(b, "final_norm", None)
    perturb(b, "post_ffn_residual", 2)
    assert diff_captures(a, b).first_divergence.stage == "post_ffn_residual"


def test_tolerance_isclose_semantics(pair):
    a, b = pair
    perturb(b, "attn_norm", 0, delta=1e-3, index=0)
    assert not diff_captures(a, b).ok
    assert diff_captures(a, b, atol=2e-3, rtol=0.0).ok
    assert not diff_captures(a, b, atol=1e-4, rtol=0.0).ok


def test_rtol_is_relative_to_b(tmp_path):
    write_aprt(tmp_path / "a.bin", 0, np.array([1.0], np.float32))
    write_aprt(tmp_path / "b.bin", 0, np.array([2.0], np.float32))
    # |a-b| = 1: within rtol*|b| = 0.5*2 but not 0.5*|a|
    assert diff_captures(tmp_path / "a.bin", tmp_path / "b.bin", atol=0.0, rtol=0.5).ok
    assert not diff_captures(tmp_path / "b.bin", tmp_path / "a.bin", atol=0.0, rtol=0.5).ok


def test_nan_positions(tmp_path):
    nan = float("nan")
    write_aprt(tmp_path / "a.bin", 0, np.array([nan, 1.0, 2.0], np.float32))
    write_aprt(tmp_path / "b.bin", 0, np.array([nan, 1.0, 2.0], np.float32))
    write_aprt(tmp_path / "c.bin", 0, np.array([1.0, nan, 2.0], np.float32))
    assert diff_captures(tmp_path / "a.bin", tmp_path / "b.bin").ok
    report = diff_captures(tmp_path / "a.bin", tmp_path / "c.bin")
    s = report.pairs[0].stats
    assert not report.ok and s["nan_mismatch"] == 2 and s["n_bad"] == 2
    assert (s["max_abs_diff"], s["argmax"]) == (0.0, 2)


def test_header_layer_mismatch(pair):
    a, b = pair
    path = stage_path(b, "ffn_up", 1)
    write_aprt(path, 7, np.zeros(16, np.float32))
    perturb(b, "post_ffn_residual", 2)
    report = diff_captures(a, b)
    first = report.first_divergence
    assert (first.layer, first.stage, first.status) == (1, "ffn_up", "mismatch")
    assert first.stats is None and first.message == "header mismatch: layer 1 vs 7, count 16 vs 16"
    assert format_report(report).splitlines()[-1] == \
        "first divergence: layer 1 ffn_up (header mismatch: layer 1 vs 7, count 16 vs 16)"


def test_header_count_mismatch(pair):
    a, b = pair
    write_aprt(stage_path(b, "lm_head", None), None, np.zeros(15, np.float32))
    first = diff_captures(a, b).first_divergence
    assert first.status == "mismatch" and first.message == "header mismatch: layer None vs None, count 16 vs 15"


def test_unpaired_files(tmp_path):
    a = make_capture(tmp_path / "a", n_layers=3)
    b = make_capture(tmp_path / "b", n_layers=2, per_layer=("attn_norm", "qkv_matmul", "ffn_up"))
    put(b, "ffn_gate", 0, np.zeros(16))
    report = diff_captures(a, b)
    assert report.only_a == [(0, "post_ffn_residual"), (1, "post_ffn_residual")] + \
        [(2, s) for s in PER_LAYER]
    assert report.only_b == [(0, "ffn_gate")]
    text = format_report(report).splitlines()
    assert text[-3] == "only in A: layer 0 post_ffn_residual, layer 1 post_ffn_residual, layer 2 attn_norm, " \
                       "layer 2 qkv_matmul, layer 2 ffn_up, layer 2 post_ffn_residual"
    assert text[-2] == "only in B: layer 0 ffn_gate"
    json.dumps(report.to_json())


def test_no_pairs_at_all_is_an_error(tmp_path):
    put(tmp_path / "a", "lm_head", None, np.zeros(2))
    put(tmp_path / "b", "final_norm", None, np.zeros(2))
    with pytest.raises(DiffError, match=r"no stage is present in both .*a \(1 files\) and .*b \(1 files\)"):
        diff_captures(tmp_path / "a", tmp_path / "b")


def test_single_file_mode(pair):
    a, b = pair
    fa, fb = stage_path(a, "ffn_up", 1), stage_path(b, "ffn_up", 1)
    report = diff_captures(fa, fb)
    assert [(p.layer, p.stage, p.status) for p in report.pairs] == [(1, "ffn_up", "ok")]
    perturb(b, "ffn_up", 1)
    assert diff_captures(fa, fb).first_divergence.stage == "ffn_up"


def test_file_vs_directory_is_an_error(pair):
    a, b = pair
    with pytest.raises(DiffError, match="cannot compare a directory with a single file"):
        diff_captures(a, stage_path(b, "ffn_up", 1))


def test_manifest_partials_and_other_files_are_ignored(pair):
    a, b = pair
    (a / "manifest.json").write_text("{}")
    (b / "layer-0" / "ffn_gate.bin.partial").write_bytes(b"junk")
    (b / "notes").mkdir()
    (b / "notes" / "x.bin").write_bytes(b"junk")
    assert diff_captures(a, b).ok


def test_missing_path(tmp_path):
    make_capture(tmp_path / "a")
    with pytest.raises(DiffError, match=r"nope: no such file or directory$"):
        diff_captures(tmp_path / "a", tmp_path / "nope")


def test_directory_without_trace_files(tmp_path):
    make_capture(tmp_path / "a")
    (tmp_path / "b" / "layer-0").mkdir(parents=True)
    (tmp_path / "b" / "manifest.json").write_text("{}")
    with pytest.raises(DiffError, match=r"b: no trace files \(expected layer-N/<stage>.bin or <stage>.bin\)"):
        diff_captures(tmp_path / "a", tmp_path / "b")


def test_not_aprt_file(pair):
    a, b = pair
    stage_path(b, "ffn_up", 0).write_bytes(struct.pack("<4sII", b"GGUF", 0, 0))
    with pytest.raises(AprtError, match="ffn_up.bin: not an APRT file"):
        diff_captures(a, b)


def test_format_report_table(pair):
    a, b = pair
    perturb(b, "ffn_up", 1)
    lines = format_report(diff_captures(a, b)).splitlines()
    assert lines[0].split() == ["layer", "stage", "n", "max_abs", "at", "rms", "cosine", "bad", "status"]
    row = next(line for line in lines if "ffn_up" in line and line.split()[0] == "1")
    assert row.split()[1:3] == ["ffn_up", "16"] and row.split()[4] == "3" and row.endswith("FAIL")
    assert next(line for line in lines if "lm_head" in line).split()[0] == "-"
    assert sum(line.endswith("OK") for line in lines) == len(lines) - 3


def test_to_json(pair):
    a, b = pair
    perturb(b, "ffn_up", 1)
    j = json.loads(json.dumps(diff_captures(a, b, atol=0.5, rtol=0.0).to_json()))
    assert j["ok"] is False and j["first_divergence"] == {"layer": 1, "stage": "ffn_up"}
    assert (j["atol"], j["rtol"], j["a"], j["b"]) == (0.5, 0.0, str(a), str(b))
    p = next(p for p in j["pairs"] if p["stage"] == "ffn_up" and p["layer"] == 1)
    assert p["status"] == "fail" and p["stats"]["n_bad"] == 1 and p["message"] is None
    assert j["only_a"] == [] and j["only_b"] == []


def test_compare_values():
    a = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    b = np.array([1.0, 2.5, 3.0, 2.0], np.float32)
    s = compare(a, b)
    assert (s["n"], s["max_abs_diff"], s["argmax"], s["nan_mismatch"], s["n_bad"]) == (4, 2.0, 3, 0, 2)
    assert s["rms_diff"] == pytest.approx(math.sqrt((0.25 + 4.0) / 4))
    assert s["cosine"] == pytest.approx(float(a.astype(float) @ b.astype(float)) / (np.linalg.norm(a.astype(float)) * np.linalg.norm(b.astype(float))))


def test_compare_zero_vectors_and_infinities():
    z = np.zeros(3, np.float32)
    assert compare(z, z)["cosine"] == 1.0
    assert compare(z, np.ones(3, np.float32))["cosine"] == 0.0
    assert compare(np.ones(3, np.float32), z)["cosine"] == 0.0
    assert compare(np.zeros(0, np.float32), np.zeros(0, np.float32))["max_abs_diff"] is None
    inf = float("inf")
    s = compare(np.array([inf, 1.0], np.float32), np.array([inf, 1.0], np.float32))
    assert (s["max_abs_diff"], s["n_bad"], s["cosine"]) == (0.0, 0, 1.0)
    s = compare(np.array([inf, 1.0], np.float32), np.array([-inf, 1.0], np.float32))
    assert (s["max_abs_diff"], s["argmax"], s["n_bad"]) == (inf, 0, 1)


def test_compare_all_nan_mismatch():
    nan = float("nan")
    s = compare(np.array([nan], np.float32), np.array([1.0], np.float32))
    assert (s["max_abs_diff"], s["argmax"], s["rms_diff"], s["nan_mismatch"]) == (None, None, None, 1)
    assert s["cosine"] is None


def test_verdict_for_nan_only_divergence(tmp_path):
    write_aprt(tmp_path / "a.bin", 0, np.array([1.0, 2.0], np.float32))
    write_aprt(tmp_path / "b.bin", 0, np.full(2, np.nan, np.float32))
    lines = format_report(diff_captures(tmp_path / "a.bin", tmp_path / "b.bin")).splitlines()
    assert lines[1].split() == ["0", "a", "2", "-", "-", "-", "-", "2", "FAIL"]
    assert lines[-1] == "first divergence: layer 0 a (2 of 2 values differ beyond atol=1e-08, rtol=1e-05; " \
                        "2 NaN mismatches)"


def test_compare_size_mismatch():
    with pytest.raises(ValueError, match="cannot compare 2 values with 3"):
        compare(np.zeros(2), np.zeros(3))
