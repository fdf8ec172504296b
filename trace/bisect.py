"""Bisection against llama.cpp: both engines' captures of every stage of every layer, compared in forward order.

``run_bisect`` captures our forward (trace.capture) and llama.cpp's (trace.llama_capture)
over the same token ids into a temporary folder that is removed afterwards, compares
each (layer, stage) both expose, and classifies it:

- ``ok``: cosine >= min_cosine (and, only when given, every value within atol + rtol*|llama|).
- ``cancellation``: a residual add (post_attn_residual / post_ffn_residual) below the
  threshold whose difference is no larger than the sum of its summands' differences
  (||d_sum|| <= ||d_a|| + ||d_b||, up to float rounding), while the summands themselves
  agree. Addition is exact up to rounding, so the add did nothing wrong: the sum
  cancelled (e.g. Qwen2.5-1.5B's first token carries a ~3900-sized residual that
  layer 26 cancels down to ~100; llama.cpp's 8-bit activation rounding of the huge
  values, harmless before, then dominates the small result).
- ``inherited``: below the threshold, but its relative error ||d||/||llama|| is at most
  INHERIT_GROWTH times that of an input it is computed from (one that is not itself a
  divergence): the difference was passed on, not made here. Drift concentrates on some
  positions: at the 1.5B's 14th chat-prompt token (" You") layer 6's residual is at rel err
  0.14 and layer 7's ffn_out at 0.25 from its input ffn_swigl's 0.24 (cosine 0.973), so a
  one-row comparison falls below the threshold with no stage at fault (--isolate: every
  layer agrees to 0.9998 there).
- ``fail``: anything else. The first ``fail`` in forward order is the divergence.

``attn_scores`` are compared less each row's mean over its unmasked keys (masked entries are 0
in both captures and stay 0): softmax ignores a constant added to a row, and such constants are
what two correct forwards' scores can differ by. A query that differs along a direction on which
every key has the same projection shifts a whole row: the 0.5B's decode of ", , ," put layer 4's
head-8 scores 21 above its own prefill's (cosine 0.991, norm ratio 1.13) with the softmax, the
attention output and everything after at >= 0.9999. (The mean, not the maximum: a wrong entry
that was the row's maximum would move every other entry of a max-centred row with it.)

Default min_cosine 0.99: on correct engines llama.cpp's 8-bit activation quantization
and f16 KV cache put per-stage cosines at >= 0.9995 in early layers, drifting down to
0.9951 (ffn_out, layer 24 of the 1.5B) in late layers (measured; SmolLM2's attention
reaches 0.9984 by layer 3), so 0.999 would flag noise; a wrong weight, kernel or
layout moves a stage's cosine far below 0.99 (a flipped tensor scale: below 0.5).
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import failpoints
from trace.aprt import read_aprt
from trace.diff import compare
from trace.plan import ATTENTION_STAGES
from trace.stages import STAGE_INDEX, STAGES, WEIGHT_MATMUL_STAGES, WHOLE_MODEL_STAGES

DEFAULT_MIN_COSINE = 0.99
# Generation bisects against llama.cpp compare one token's row at a time, noisier than a whole
# prompt's matrix: correct engines measured down to 0.9912 (SmolLM2, ffn_out of one decode step),
# 0.9942 (0.5B), 0.9981 (1.5B) over 8-16 decode steps; the planted decode faults fall to 0.97 or
# lower. Against our own prefill the noise is far smaller (>= 0.9971, 0.9990, 0.99991).
GEN_LLAMA_MIN_COSINE = 0.98
INHERIT_GROWTH = 3.0
UNIT_MIN_ROWS = 8
UNIT_MIN_ENERGY = 0.01


@dataclass(frozen=True)
class Thresholds:
    """What a stage must meet, beside cosine >= min_cosine, to agree: its norm within
    max_norm_dev of the reference's (| ||ours|| / ||ref|| - 1 |: a cosine cannot see a scaled
    or offset stage) and, where set, relative error ||ours - ref|| / ||ref|| <= max_rel_err and,
    for a weight matmul's output over T >= UNIT_MIN_ROWS positions, every unit's scale within
    unit_scale_coeff / sqrt(T) of 1 (unit_scale_dev: a few rows of a matrix scaled)."""
    mode: str
    max_norm_dev: float
    max_rel_err: float | None = None
    unit_scale_coeff: float | None = None


# Measured on the three known models (correct engines), 3 prompts each, every stage of every
# layer: the norm ratio of a prompt's stage stays within 0.0135 of 1 (SmolLM2's residuals), of a
# single decode row against llama.cpp within 0.19 (the 1.5B, layer 7 ffn_out of one position).
# A whole matrix scaled by 1.6 moves its stage's norm by 0.6 at a cosine of 0.9993.
DRIFTING = Thresholds("drifting", max_norm_dev=0.1)
DRIFTING_ROWS = Thresholds("drifting", max_norm_dev=0.3)   # one position's row at a time, against llama.cpp
# Isolated layers (each run on llama.cpp's own input to it) are far quieter: over the same runs
# and over 8-step generations, cosine >= 0.99988, relative error <= 0.0153 and norm ratio within
# 0.0057 of 1 (the worst stage is ffn_out, then lm_head), whatever the depth. The thresholds sit
# at about twice that noise; 64 of the 896 rows of the 0.5B's blk.9.ffn_down scaled by 1.1
# give ffn_out cosine 0.99966 (rel err 0.027), which the drifting bisect cannot tell from noise.
ISOLATE_MIN_COSINE = 0.9998
# Per unit, isolated: max |s_j - 1| x sqrt(T) of the weight matmuls' outputs measured <= 0.093
# (the 1.5B's ffn_out, T = 36; 7-91 positions, the three models); the coefficient is 3x that.
# 64 rows x 1.1 give |s_j - 1| = 0.107 on all three models: caught from T = 9 on. (SmolLM2's
# 64 rows carry 0.6% of ffn_out's energy: cosine 0.99993, rel err 0.012, inside the noise.)
ISOLATED = Thresholds("isolated", max_norm_dev=0.015, max_rel_err=0.03, unit_scale_coeff=0.3)
ADD_SLACK = 1.01
RESIDUAL_ADDS = ("post_attn_residual", "post_ffn_residual")
SHORT = {
    "embedding": "emb", "attn_norm": "anorm", "qkv_matmul": "qkv", "qkv_bias": "bias", "q_post_rope": "qrope",
    "k_post_rope": "krope", "attn_scores": "score", "attn_softmax": "smax", "attention": "attn", "attn_out": "aout",
    "post_attn_residual": "res1", "ffn_norm": "fnorm", "ffn_gate": "gate", "ffn_up": "up", "ffn_silu": "silu",
    "ffn_swigl": "swigl", "ffn_out": "fout", "post_ffn_residual": "res2", "final_norm": "fnl", "lm_head": "lm",
    "q_norm": "qnorm", "k_norm": "knorm", "post_attn_norm": "panorm", "ffn_gelu": "gelu", "ffn_geglu": "geglu",
    "post_ffn_norm": "pfnorm",
}


@dataclass
class StageResult:
    layer: int | None
    stage: str
    status: str
    cosine: float | None
    rel_err: float | None  # ||ours - llama|| / ||llama||
    stats: dict
    note: str = ""

    @property
    def where(self) -> str:
        return self.stage if self.layer is None else f"layer {self.layer} {self.stage}"


@dataclass
class BisectReport:
    min_cosine: float
    atol: float | None
    rtol: float | None
    results: list[StageResult] = field(default_factory=list)
    thresholds: Thresholds = None
    unavailable: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    # generation bisects: the position `results` are of (the first divergent one, else the last)
    position: int | None = None
    positions: list[dict] = field(default_factory=list)

    @property
    def first_divergence(self) -> StageResult | None:
        return next((r for r in self.results if r.status == "fail"), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def before(self, r: StageResult) -> StageResult | None:
        i = self.results.index(r)
        return self.results[i - 1] if i > 0 else None

    def to_json(self) -> dict:
        first = self.first_divergence
        prev = None if first is None else self.before(first)
        return {
            "ok": self.ok, "min_cosine": self.min_cosine, "atol": self.atol, "rtol": self.rtol,
            **({} if self.thresholds is None else {"max_norm_dev": self.thresholds.max_norm_dev,
                                                   "max_rel_err": self.thresholds.max_rel_err}), **self.info,
            "first_divergence": None if first is None else (_result_json(first) if self.position is None else
                                                            {"position": self.position, **_result_json(first)}),
            "before_divergence": None if prev is None else _result_json(prev),
            "unavailable": self.unavailable, "results": [_result_json(r) for r in self.results],
            **({"position": self.position, "positions": self.positions} if self.positions else {}),
        }


def _result_json(r: StageResult) -> dict:
    return {"layer": r.layer, "stage": r.stage, "status": r.status, "cosine": r.cosine, "rel_err": r.rel_err,
            "note": r.note, **{k: v for k, v in r.stats.items() if k != "cosine"}}


def _key_order(key):
    stage, layer = key
    if stage == "embedding":
        return (-1, 0)
    if layer is None:
        return (1 << 30, STAGE_INDEX[stage])
    return (layer, STAGE_INDEX[stage])


def _inputs(stage: str, layer: int | None, n_layers: int, have) -> list[tuple[str, int | None]]:
    """The captured stages (stage, layer) this one is computed from (first available of each alternative)."""
    def first(*keys):
        return [next((k for k in keys if k in have), None)]

    resid_in = ("embedding", None) if layer == 0 else ("post_ffn_residual", None if layer is None else layer - 1)
    qkv = first(("qkv_bias", layer), ("qkv_matmul", layer))
    table = {
        "attn_norm": [resid_in],
        "qkv_matmul": [("attn_norm", layer)],
        "qkv_bias": [("qkv_matmul", layer)],
        "q_post_rope": qkv, "k_post_rope": qkv,
        "attn_scores": [("q_post_rope", layer), ("k_post_rope", layer)],
        "attn_softmax": first(("attn_scores", layer)) + [("q_post_rope", layer), ("k_post_rope", layer)],
        "attention": first(("attn_softmax", layer)) + qkv,
        "attn_out": [("attention", layer)],
        "post_attn_residual": [resid_in, ("attn_out", layer)],
        "ffn_norm": [("post_attn_residual", layer)],
        "ffn_gate": [("ffn_norm", layer)], "ffn_up": [("ffn_norm", layer)],
        "ffn_silu": [("ffn_gate", layer)],
        "ffn_swigl": [("ffn_gate", layer), ("ffn_up", layer)],
        "ffn_out": [("ffn_swigl", layer)],
        "post_ffn_residual": [("post_attn_residual", layer), ("ffn_out", layer)],
        "final_norm": [("post_ffn_residual", n_layers - 1)],
        "lm_head": [("final_norm", None)],
        "embedding": [],
    }
    return [k for k in table[stage] if k is not None and k in have]


def _load(root: Path, entry) -> np.ndarray:
    return np.asarray(read_aprt(root / entry["path"]).values, dtype=np.float64).reshape(entry["shape"])


def unit_scale_dev(ours: np.ndarray, ref: np.ndarray) -> float | None:
    """max_j |s_j - 1| over the units (columns) j of a [T, width] stage that hold at least
    UNIT_MIN_ENERGY of the mean unit energy, s_j = <ours_j, ref_j> / <ref_j, ref_j> the
    least-squares scale of our unit on the reference's; None under UNIT_MIN_ROWS rows. A few
    rows of a weight matrix scaled by k put s_j = k on their units while moving the stage's
    cosine and norm less than noise; position noise averages out of s_j."""
    if ours.ndim != 2 or ours.shape != ref.shape or ours.shape[0] < UNIT_MIN_ROWS:
        return None
    energy = np.einsum("tj,tj->j", ref, ref)
    mean = energy.mean()
    if not mean > 0:
        return None
    keep = energy >= UNIT_MIN_ENERGY * mean
    s = np.einsum("tj,tj->j", ours[:, keep], ref[:, keep]) / energy[keep]
    return float(np.max(np.abs(s - 1.0)))


def softmax_invariant(ours: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention scores ([..., keys]) less each row's mean over its unmasked keys, for both captures:
    an entry is unmasked where either capture has it nonzero (both write masked entries as 0),
    and masked entries stay 0. Softmax is invariant to a constant per row, so this is what the
    scores decide downstream."""
    valid = (ours != 0) | (ref != 0)

    count = np.maximum(valid.sum(axis=-1, keepdims=True), 1)

    def center(x):
        return np.where(valid, x - np.where(valid, x, 0.0).sum(axis=-1, keepdims=True) / count, 0.0)
    return center(ours), center(ref)


def compare_captures(ours: Path, llama: Path, ours_manifest: dict, llama_manifest: dict, min_cosine: float,
                     atol: float | None = None, rtol: float | None = None, thresholds: Thresholds | None = None,
                     ours_values: dict | None = None) -> BisectReport:
    """Classify every (stage, layer) both captures hold (see the module docstring).
    ours_values: {(stage, layer): array} taking the place of our capture's file for those keys
    (an isolated run's own outputs, whose files hold the reference's values patched in)."""
    ours_files = {(e["stage"], e["layer"]): e for e in ours_manifest["files"]}
    llama_files = {(e["stage"], e["layer"]): e for e in llama_manifest["files"]}
    keys = sorted(ours_files.keys() & llama_files.keys(), key=_key_order)
    ours_values = ours_values or {}
    pairs = [(key, ours_values[key] if key in ours_values else _load(ours, ours_files[key]),
              _load(llama, llama_files[key])) for key in keys]
    return classify(pairs, ours_manifest["n_layers"], min_cosine, atol, rtol,
                    unavailable=dict(llama_manifest.get("unavailable", {})), thresholds=thresholds)


def classify(pairs, n_layers: int, min_cosine: float, atol: float | None = None, rtol: float | None = None,
             unavailable: dict | None = None, thresholds: Thresholds | None = None) -> BisectReport:
    """Classify (key, ours, reference) value pairs, keys in forward order (see the module docstring)."""
    th = thresholds or DRIFTING
    report = BisectReport(min_cosine, atol, rtol, unavailable=dict(unavailable or {}), thresholds=th)
    diffs: dict = {}  # key -> (||d||, ||llama||, rel_err, status)
    for key, a, b in pairs:
        stage, layer = key
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if stage == "attn_scores" and a.shape == b.shape and a.ndim >= 2:
            a, b = softmax_invariant(a, b)
        unit_dev = unit_scale_dev(a, b) if th.unit_scale_coeff is not None and stage in WEIGHT_MATMUL_STAGES \
            else None
        unit_max = None if unit_dev is None else th.unit_scale_coeff / math.sqrt(a.shape[0])
        a, b = a.reshape(-1), b.reshape(-1)
        if a.size != b.size:
            report.results.append(StageResult(layer, stage, "fail", None, None, {"n": int(a.size)},
                                              f"sizes differ: ours {a.size}, llama.cpp {b.size}"))
            diffs[key] = (math.inf, 0.0, math.inf, "fail")
            continue
        check_elems = atol is not None or rtol is not None
        stats = compare(a, b, atol if atol is not None else 0.0, rtol if rtol is not None else 0.0)
        if not check_elems:
            stats.pop("n_bad")
        cos = stats["cosine"]
        dn, bn = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
        rel = dn / bn if bn > 0 else (0.0 if dn == 0 else math.inf)
        an = float(np.linalg.norm(a))
        ratio = an / bn if bn > 0 else (1.0 if an == 0 else math.inf)
        stats["norm_ratio"] = ratio
        if unit_dev is not None:
            stats["unit_scale_dev"], stats["max_unit_scale_dev"] = unit_dev, unit_max
        good = cos is not None and cos >= min_cosine and stats["nan_mismatch"] == 0
        if not failpoints.active("bisect.cosine_only"):
            good = good and abs(ratio - 1.0) <= th.max_norm_dev and (th.max_rel_err is None or rel <= th.max_rel_err)
            good = good and (unit_max is None or unit_dev <= unit_max)
        if check_elems:
            good = good and stats["n_bad"] == 0
        status, note = ("ok", "") if good else _explain(stage, layer, n_layers, diffs, dn, rel)
        diffs[key] = (dn, bn, rel, status)
        report.results.append(StageResult(layer, stage, status, cos, rel, stats, note))
    return report


def _row(values: np.ndarray, shape: tuple, stage: str, t: int, n_prompt: int, logits_from: int):
    """Position t's row of a capture's file: [t] of [T, dim], [:, t, :t+1] of attention
    [heads, T, T], and for lm_head the row of the logits computed at position t (its row
    0 is position `logits_from`); None where the file has no row for t."""
    arr = values.reshape(shape)
    if stage in ATTENTION_STAGES:
        return arr[:, t, :t + 1] if t < shape[1] else None
    if stage == "lm_head":
        i = t - logits_from
        return arr[i] if 0 <= i < shape[0] else None
    return arr[t] if t < shape[0] else None


def compare_positions(ours: Path, ref: Path, ours_manifest: dict, ref_manifest: dict, min_cosine: float,
                      atol: float | None = None, rtol: float | None = None, thresholds: Thresholds | None = None,
                      ours_values: dict | None = None) -> BisectReport:
    """Classify two captures of the same token sequence position by position, in order, and
    stop at the first position with a divergence: the report's results are that position's
    (or the last position's when all agree), ``position`` names it and ``positions`` holds a
    summary of every position compared. ``ours`` is a generation capture; ``ref`` a generation
    capture (llama.cpp decoding the same tokens) or a prefill capture with every position's logits.
    ours_values: as in compare_captures."""
    tokens = ours_manifest["token_ids"]
    if ref_manifest["token_ids"] != tokens:
        raise ValueError("the two captures are not of the same token sequence")
    n_prompt = ours_manifest["prompt_tokens"]
    sides = []
    for root, manifest in ((ours, ours_manifest), (ref, ref_manifest)):
        logits_from = n_prompt - 1 if manifest.get("layout") == "generation" else 0
        sides.append({(e["stage"], e["layer"]): (read_aprt(root / e["path"]).values, tuple(e["shape"]), logits_from)
                      for e in manifest["files"]})
    for key, values in (ours_values or {}).items():
        if key in sides[0]:
            sides[0][key] = (values, sides[0][key][1], sides[0][key][2])
    keys = sorted(sides[0].keys() & sides[1].keys(), key=_key_order)
    summary, report = [], None
    for t in range(len(tokens)):
        pairs = []
        for key in keys:
            rows = [_row(v, shape, key[0], t, n_prompt, lf) for v, shape, lf in (side[key] for side in sides)]
            if rows[0] is not None and rows[1] is not None:
                pairs.append((key, rows[0], rows[1]))
        report = classify(pairs, ours_manifest["n_layers"], min_cosine, atol, rtol,
                          unavailable=ref_manifest.get("unavailable", {}), thresholds=thresholds)
        scored = [r for r in report.results if r.cosine is not None]
        low = min(scored, key=lambda r: r.cosine) if scored else None
        first = report.first_divergence
        summary.append({"position": t, "token_id": int(tokens[t]), "phase": "prefill" if t < n_prompt else "decode",
                        "min_cosine": None if low is None else low.cosine,
                        "min_at": None if low is None else {"layer": low.layer, "stage": low.stage},
                        "first_divergence": None if first is None else {"layer": first.layer, "stage": first.stage}})
        if first is not None:
            break
    report.position = summary[-1]["position"] if summary else None
    report.positions = summary
    return report


def _explain(stage, layer, n_layers, diffs, dn, rel) -> tuple[str, str]:
    inputs = _inputs(stage, layer, n_layers, diffs)
    if stage in RESIDUAL_ADDS and len(inputs) == 2 and all(diffs[k][3] != "fail" for k in inputs):
        bound = sum(diffs[k][0] for k in inputs)
        scale = sum(diffs[k][1] for k in inputs)
        if dn <= ADD_SLACK * bound + 1e-6 * scale:
            off = [k for k in inputs if diffs[k][3] != "ok"]
            if not off:
                return "cancellation", (f"|d| {dn:.3g} <= |d| of its summands {bound:.3g}, which agree: "
                                        f"the sum cancels (|llama| {scale:.3g} in, {dn / rel if rel else 0:.3g} out)")
            return "inherited", f"|d| {dn:.3g} <= |d| of its summands {bound:.3g} (" + \
                ", ".join(_name(k) for k in off) + " already differ)"
    off = [k for k in inputs if diffs[k][3] != "fail"]
    if off:
        worst = max(off, key=lambda k: diffs[k][2])
        if rel <= INHERIT_GROWTH * diffs[worst][2]:
            return "inherited", f"rel err {rel:.3g} <= {INHERIT_GROWTH:g} x its input {_name(worst)}'s {diffs[worst][2]:.3g}"
    return "fail", ""


def _name(key) -> str:
    stage, layer = key
    return stage if layer is None else f"{stage}@{layer}"


# -- output ---------------------------------------------------------------------------------------

def _metrics(r: StageResult) -> str:
    s = r.stats
    parts = [f"cosine {r.cosine:.6f}" if r.cosine is not None else "cosine n/a"]
    if r.rel_err is not None:
        parts.append(f"rel err {r.rel_err:.3e}")
    if s.get("norm_ratio") is not None:
        parts.append(f"norm ratio {s['norm_ratio']:.4f}")
    if s.get("unit_scale_dev") is not None:
        parts.append(f"worst unit's scale off by {s['unit_scale_dev']:.4f} (max {s['max_unit_scale_dev']:.4f})")
    if s.get("max_abs_diff") is not None:
        parts.append(f"max |ours-ref| {s['max_abs_diff']:.3e} at {s['argmax']}")
    if s.get("n_bad") is not None:
        parts.append(f"{s['n_bad']} of {s['n']} values beyond atol/rtol")
    if s.get("nan_mismatch"):
        parts.append(f"{s['nan_mismatch']} NaN mismatches")
    return ", ".join(parts)


_MARK = {"ok": " ", "cancellation": "~", "inherited": "~", "fail": "*"}


def format_table(report: BisectReport) -> str:
    """Per-layer rows of per-stage cosine (4 decimals; '*' fails, '~' below threshold but explained)."""
    per_layer = [s for s in STAGES if s not in WHOLE_MODEL_STAGES and any(r.stage == s for r in report.results)]
    cells = {(r.stage, r.layer): r for r in report.results}
    layers = sorted({r.layer for r in report.results if r.layer is not None})
    lines = ["layer " + " ".join(f"{SHORT[s]:>7}" for s in per_layer)]
    for layer in layers:
        row = []
        for s in per_layer:
            r = cells.get((s, layer))
            row.append(f"{'-':>7}" if r is None or r.cosine is None else f"{_trunc4(r.cosine)}{_MARK[r.status]}")
        lines.append(f"{layer:>5} " + " ".join(row))
    whole = [cells[k] for k in (("embedding", None), ("final_norm", None), ("lm_head", None)) if k in cells]
    if whole:
        lines.append("model " + "  ".join(f"{r.stage} {_trunc4(r.cosine)}{_MARK[r.status]}" for r in whole
                                          if r.cosine is not None))
    return "\n".join(lines)


def _trunc4(c: float) -> str:
    """Cosine rounded DOWN to 4 decimals, so 0.99996 never shows as 1.0000."""
    return f"{math.floor(c * 1e4) / 1e4:6.4f}" if c >= 0 else f"{-math.floor(-c * 1e4) / 1e4:6.3f}"


def format_positions(report: BisectReport) -> str:
    """One line per position compared: phase, token, lowest cosine, verdict."""
    lines = [f"{'pos':>5} {'phase':<7} {'token':>7} {'min cos':>8} {'lowest at':<22} verdict"]
    for p in report.positions:
        first = p["first_divergence"]
        verdict = "ok" if first is None else "DIVERGES at " + _name((first["stage"], first["layer"]))
        cos = "-" if p["min_cosine"] is None else _trunc4(p["min_cosine"])
        at = "" if p["min_at"] is None else _name((p["min_at"]["stage"], p["min_at"]["layer"]))
        lines.append(f"{p['position']:>5} {p['phase']:<7} {p['token_id']:>7} {cos:>8} {at:<22} {verdict}")
    return "\n".join(lines)


def format_report(report: BisectReport) -> str:
    lines = [format_table(report), ""]
    if report.positions:
        lines = [format_positions(report), "", f"stages at position {report.position}:"] + lines
    explained = [r for r in report.results if r.status in ("cancellation", "inherited")]
    first = report.first_divergence
    if explained and (first is None or any(_key_order((r.stage, r.layer)) < _key_order((first.stage, first.layer))
                                           for r in explained)):
        shown = [r for r in explained if first is None or report.results.index(r) < report.results.index(first)]
        lines.append(f"{len(shown)} stage(s) below cosine {report.min_cosine:g} are explained by their inputs:")
        for r in shown[:6]:
            lines.append(f"  {r.where}: {r.status}, {_metrics(r)}; {r.note}")
        if len(shown) > 6:
            lines.append(f"  ... and {len(shown) - 6} more (all {shown[-1].status if len(shown) else ''}; see --json)")
    if report.unavailable:
        lines.append("not compared (llama.cpp has no such node): " + ", ".join(report.unavailable))
    th = report.thresholds or DRIFTING
    tol = f"cosine >= {report.min_cosine:g}, norm ratio 1 +- {th.max_norm_dev:g}"
    if th.max_rel_err is not None:
        tol += f", rel err <= {th.max_rel_err:g}"
    if th.unit_scale_coeff is not None and not report.positions:   # one row at a time: no unit check
        tol += f", matmul units' scale 1 +- {th.unit_scale_coeff:g}/sqrt(T)"
    if report.atol is not None or report.rtol is not None:
        tol += f", |ours-ref| <= {report.atol or 0:g} + {report.rtol or 0:g}*|llama|"
    against = report.info.get("against", "llama.cpp")
    if th.mode == "isolated":
        lines.append("isolated: each of our layers ran on the reference's own input to it")
    if first is None and report.positions:
        lines.append(f"all {len(report.positions)} positions agree with {against}: {len(report.results)} stages "
                     f"each ({tol})")
    elif first is None:
        lines.append(f"all {len(report.results)} stages agree with llama.cpp ({tol})")
    else:
        prev = report.before(first)
        where = first.where if report.position is None else f"position {report.position}, {first.where}"
        lines.append(f"first divergence: {where} ({tol} fails): {_metrics(first)}" +
                     (f"; {first.note}" if first.note else ""))
        if prev is not None:
            lines.append(f"  stage before it: {prev.where} ({prev.status}): {_metrics(prev)}")
        if th.mode == "drifting" and against == "llama.cpp":
            lines.append("  (each of our layers ran on our own upstream values: --isolate tells a layer's own "
                         "error from drift it inherited)")
    return "\n".join(lines)


def plot_report(report: BisectReport, path: Path, title: str) -> None:
    """Heat map of per-layer, per-stage 1 - cosine (log scale), divergent cells outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    per_layer = [s for s in STAGES if s not in WHOLE_MODEL_STAGES and any(r.stage == s for r in report.results)]
    layers = sorted({r.layer for r in report.results if r.layer is not None})
    grid = np.full((len(layers), len(per_layer)), np.nan)
    status = {}
    for r in report.results:
        if r.layer is None or r.cosine is None:
            continue
        i, j = layers.index(r.layer), per_layer.index(r.stage)
        grid[i, j] = max(1.0 - r.cosine, 1e-7)
        status[i, j] = r.status
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(per_layer), 1.5 + 0.28 * len(layers)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1e-6, vmax=max(1.0, np.nanmax(grid))),
                   interpolation="nearest")
    ax.set_xticks(range(len(per_layer)), per_layer, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_ylabel("layer")
    for (i, j), st in status.items():
        if st != "ok":
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5,
                                       ec="red" if st == "fail" else "orange"))
    first = report.first_divergence
    if first is not None and first.layer is not None and first.stage in per_layer:
        i, j = layers.index(first.layer), per_layer.index(first.stage)
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=3, ec="white"))
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("1 - cosine(ours, llama.cpp)")
    thr = 1.0 - report.min_cosine
    cb.ax.axhline(thr, color="red", lw=1)
    verdict = ("all stages agree" if first is None else
               f"first divergence (white): {first.where}, cosine {first.cosine:.4f}")
    ax.set_title(f"{title}\n{verdict}\n(orange: below threshold but explained by inputs; red: divergence)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


@contextmanager
def _capture_folders(tmp_root, reference: str):
    """(folder, ours, reference) in a new temporary folder, removed afterwards whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="numgguf-bisect-", dir=tmp_root))
    try:
        (tmp / "numgguf").mkdir()
        (tmp / reference).mkdir()
        yield tmp, tmp / "numgguf", tmp / reference
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def isolating_hooks(ref_root: Path, ref_manifest: dict, n_layers: int) -> tuple[dict, dict]:
    """Hooks that run each layer on the reference's input to it: the embedding and every layer's
    post_ffn_residual replaced, at the rows each forward computes, by the reference capture's,
    after our own values are kept. Returns (hooks, kept): kept[(stage, layer)] fills with our
    [T, dim] outputs, each computed from the reference's input (the captured files of these
    stages hold the reference's values, patched in)."""
    files = {(e["stage"], e["layer"]): e for e in ref_manifest["files"]}
    hooks, kept = {}, {}
    for key in [("embedding", None)] + [("post_ffn_residual", L) for L in range(n_layers)]:
        if key not in files:
            raise ValueError(f"the reference capture has no {_name(key)}: each layer's input is needed to isolate it")
        ref = read_aprt(ref_root / files[key]["path"]).values.reshape(files[key]["shape"])
        ours = kept[key] = np.full(ref.shape, np.nan, np.float32)

        def fn(values, positions, _ref=ref, _ours=ours):
            _ours[positions] = values
            if not failpoints.active("bisect.no_isolation"):
                values[:] = _ref[positions]
        hooks[key] = fn
    return hooks, kept


def run_bisect(engine, ids: list[int], prompt: str, llama_model: Path, min_cosine: float | None = None,
               atol: float | None = None, rtol: float | None = None, threads: int = 2, progress: bool = False,
               tmp_root: Path | None = None, isolate: bool = False) -> BisectReport:
    """Capture both engines (all stages, all layers) into a temporary folder, compare, remove the folder.
    isolate: each of our layers runs on llama.cpp's input to it (isolating_hooks), so each
    stage's difference is that layer's own; compared against the ISOLATED thresholds."""
    from trace.capture import capture, plan_for_model
    from trace.llama_capture import capture_llama
    cfg = engine.config
    plan = plan_for_model("all", "all", cfg)
    thresholds = ISOLATED if isolate else DRIFTING
    if min_cosine is None:
        min_cosine = ISOLATE_MIN_COSINE if isolate else DEFAULT_MIN_COSINE
    with _capture_folders(tmp_root, "llama.cpp") as (tmp, ours_dir, llama_dir):
        t0 = time.perf_counter()
        ml = capture_llama(llama_model, ids, plan, llama_dir, prompt, cfg, progress=progress, n_threads=threads)
        t1 = time.perf_counter()
        hooks, kept = isolating_hooks(llama_dir, ml, cfg.n_layers) if isolate else (None, None)
        mo = capture(engine, ids, plan, ours_dir, prompt, progress=progress, hooks=hooks)
        t2 = time.perf_counter()
        disk = disk_usage(tmp)
        report = compare_captures(ours_dir, llama_dir, mo, ml, min_cosine, atol, rtol, thresholds, kept)
        report.info = {"model": str(engine.path), "llama_model": str(llama_model), "n_tokens": len(ids),
                       "n_layers": cfg.n_layers, "mode": thresholds.mode, "llama_cpp_python": ml.get("llama_cpp_python"),
                       "ours_seconds": round(t2 - t1, 3), "llama_seconds": round(t1 - t0, 3),
                       "compare_seconds": round(time.perf_counter() - t2, 3), "peak_disk_bytes": disk}
        return report


def run_generation_bisect(engine, ids: list[int], prompt: str, max_tokens: int, against: str = "llama.cpp",
                          llama_model: Path | None = None, min_cosine: float | None = None,
                          atol: float | None = None, rtol: float | None = None, threads: int = 2,
                          progress: bool = False, tmp_root: Path | None = None, isolate: bool = False) -> BisectReport:
    """Our KV-cached generation (greedy, all stages of all layers) against a reference over the
    same token sequence, position by position (see compare_positions):

    - against="llama.cpp": llama.cpp decoding the same tokens step by step (fed our generated
      tokens, so near-ties cannot fork the two);
    - against="prefill": one teacher-forced prefill of the whole sequence by our own engine,
      loaded afresh (no state shared with `engine`): the self-consistency check of the cache.
    isolate: our tokens are generated first; then, after the reference's capture, our
    generation is replayed on those tokens with each layer fed the reference's input to it
    (isolating_hooks) at every forward. Captures go to a temporary folder, removed afterwards."""
    from engine.sampling import Replay, Sampler
    from trace.capture import capture, capture_generation, plan_for_model
    if against not in ("llama.cpp", "prefill"):
        raise ValueError(f"--against must be llama.cpp or prefill, got {against!r}")
    thresholds = ISOLATED if isolate else DRIFTING_ROWS if against == "llama.cpp" else DRIFTING
    if min_cosine is None:
        min_cosine = (ISOLATE_MIN_COSINE if isolate else
                      GEN_LLAMA_MIN_COSINE if against == "llama.cpp" else DEFAULT_MIN_COSINE)
    cfg = engine.config
    plan = plan_for_model("all", "all", cfg)
    if against == "llama.cpp":   # no files for stages llama.cpp cannot be compared on
        from trace.llama_capture import llama_plan
        plan = llama_plan(plan)
    with _capture_folders(tmp_root, "reference") as (tmp, ours_dir, ref_dir):
        t0 = time.perf_counter()
        kept = None
        if isolate:   # the tokens first (no capture), the reference on them, then our isolated replay
            session = engine.new_session(n_ctx=min(cfg.context, len(ids) + max_tokens))
            generated = list(session.generate(ids, max_tokens=max_tokens, sampler=Sampler()))
            tokens, n_prompt = [int(i) for i in ids] + generated[:-1], len(ids)
        else:
            mo = capture_generation(engine, ids, plan, ours_dir, prompt, max_tokens, Sampler(), stop_at_eog=True)
            tokens, n_prompt = mo["token_ids"], mo["prompt_tokens"]
        t1 = time.perf_counter()
        if against == "prefill":
            from engine.api import Engine
            fresh = Engine(engine.path, n_ctx=len(tokens), exact=engine.model.exact)
            mr = capture(fresh, tokens, plan, ref_dir, prompt, all_logits=True)
        else:
            from trace.llama_capture import capture_llama_generation
            mr = capture_llama_generation(llama_model or engine.path, tokens, n_prompt, plan, ref_dir,
                                          prompt, cfg, n_threads=threads, progress=progress)
        t2 = time.perf_counter()
        if isolate:
            hooks, kept = isolating_hooks(ref_dir, mr, cfg.n_layers)
            mo = capture_generation(engine, ids, plan, ours_dir, prompt, len(generated), Replay(generated),
                                    stop_at_eog=False, hooks=hooks)
        t3 = time.perf_counter()
        disk = disk_usage(tmp)
        report = compare_positions(ours_dir, ref_dir, mo, mr, min_cosine, atol, rtol, thresholds, kept)
        report.info = {"model": str(engine.path), "against": against, "mode": thresholds.mode,
                       "n_tokens": len(tokens), "prompt_tokens": n_prompt, "generated_ids": mo["generated_ids"],
                       "n_layers": cfg.n_layers, "ours_seconds": round(t1 - t0 + t3 - t2, 3),
                       "reference_seconds": round(t2 - t1, 3), "compare_seconds": round(time.perf_counter() - t3, 3),
                       "peak_disk_bytes": disk}
        if against == "llama.cpp":
            report.info.update(llama_model=str(llama_model or engine.path),
                               llama_cpp_python=mr.get("llama_cpp_python"))
        return report
