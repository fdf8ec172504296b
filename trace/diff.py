"""Compare two captures (directories of APRT files, or two single files) stage by stage."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trace.aprt import read_aprt
from trace.stages import STAGE_INDEX, STAGES, WHOLE_MODEL_STAGES

# numpy.isclose's defaults: a value fails when |a - b| > atol + rtol * |b|.
DEFAULT_ATOL = 1e-8
DEFAULT_RTOL = 1e-5
_LAYER_DIR = re.compile(r"layer-([0-9]+)")


class DiffError(ValueError):
    """Captures that cannot be compared; the message is one line."""


def compare(a: np.ndarray, b: np.ndarray, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> dict:
    """Difference statistics of two equally sized arrays, in float64, over their flat values.

    max_abs_diff / argmax (flat index) / rms_diff are over positions where neither
    value is NaN (equal infinities differ by 0); None when there are none. cosine is
    over positions where both are finite: 1.0 if both vectors are zero there, 0.0 if
    one is, None if no position is finite on both sides. nan_mismatch counts positions
    where exactly one side is NaN. n_bad counts positions failing
    numpy.isclose(a, b, rtol, atol, equal_nan=True).
    """
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"cannot compare {x.size} values with {y.size}")
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    valid = ~(nan_x | nan_y)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.where(valid & (x != y), np.abs(x - y), 0.0)
        rms = float(np.sqrt(np.mean(d[valid] ** 2))) if valid.any() else None
    argmax = int(np.argmax(np.where(valid, d, -1.0))) if valid.any() else None
    return {
        "n": int(x.size),
        "max_abs_diff": None if argmax is None else float(d[argmax]),
        "argmax": argmax,
        "rms_diff": rms,
        "cosine": _cosine(x, y),
        "nan_mismatch": int(np.count_nonzero(nan_x ^ nan_y)),
        "n_bad": int(np.count_nonzero(~np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True))),
    }


def _cosine(x: np.ndarray, y: np.ndarray) -> float | None:
    finite = np.isfinite(x) & np.isfinite(y)
    if x.size and not finite.any():
        return None
    u, v = x[finite], y[finite]
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return 1.0 if nu == nv else 0.0
    return max(-1.0, min(1.0, float(np.dot(u, v)) / (nu * nv)))


@dataclass
class PairResult:
    """One (layer, stage) present on both sides. ``layer`` is the file's layer-N directory, None at top level.

    status: 'ok', 'fail' (values differ beyond tolerance) or 'mismatch' (headers disagree;
    ``stats`` is then None and ``message`` says how).
    """

    layer: int | None
    stage: str
    status: str
    stats: dict | None = None
    message: str | None = None
    position: int | None = None   # generation captures: the first position whose row fails


@dataclass
class DiffReport:
    """All pairs in forward order, plus the (layer, stage) keys found on one side only."""

    a: str
    b: str
    atol: float
    rtol: float
    pairs: list[PairResult] = field(default_factory=list)
    only_a: list[tuple[int | None, str]] = field(default_factory=list)
    only_b: list[tuple[int | None, str]] = field(default_factory=list)

    @property
    def first_divergence(self) -> PairResult | None:
        """The first failing pair, or None when all pairs agree: in forward order, and for
        generation captures first by position (the earliest forward), then in forward order."""
        bad = [p for p in self.pairs if p.status != "ok"]
        if not bad:
            return None
        return min(bad, key=lambda p: -1 if p.position is None else p.position)  # min keeps forward order on ties

    @property
    def ok(self) -> bool:
        """True when every pair agrees (unpaired files do not count)."""
        return self.first_divergence is None

    def to_json(self) -> dict:
        first = self.first_divergence
        return {
            "a": self.a, "b": self.b, "atol": self.atol, "rtol": self.rtol, "ok": self.ok,
            "first_divergence": None if first is None else (
                {"layer": first.layer, "stage": first.stage} if first.position is None else
                {"position": first.position, "layer": first.layer, "stage": first.stage}),
            "pairs": [asdict(p) for p in self.pairs],
            "only_a": [{"layer": layer, "stage": stage} for layer, stage in self.only_a],
            "only_b": [{"layer": layer, "stage": stage} for layer, stage in self.only_b],
        }


def _forward_order(key: tuple[int | None, str]):
    layer, stage = key
    return (layer is None, layer or 0, STAGE_INDEX.get(stage, len(STAGES)), stage)


def _collect(root: Path) -> dict[tuple[int | None, str], Path]:
    """Map (layer dir or None, stage) to file for ``<root>/<stage>.bin`` and ``<root>/layer-N/<stage>.bin``."""
    files = {(None, f.stem): f for f in root.glob("*.bin") if f.is_file()}
    for d in root.iterdir():
        m = _LAYER_DIR.fullmatch(d.name)
        if m and d.is_dir():
            files.update({(int(m[1]), f.stem): f for f in d.glob("*.bin") if f.is_file()})
    if not files:
        raise DiffError(f"{root}: no trace files (expected layer-N/<stage>.bin or <stage>.bin)")
    return files


def _sides(path_a: Path, path_b: Path):
    for p in (path_a, path_b):
        if not p.exists():
            raise DiffError(f"{p}: no such file or directory")
    if path_a.is_dir() != path_b.is_dir():
        raise DiffError(f"cannot compare a directory with a single file: {path_a} vs {path_b}")
    if path_a.is_dir():
        return _collect(path_a), _collect(path_b)
    key = (read_aprt(path_a).layer, path_a.stem)
    return {key: path_a}, {key: path_b}


def _generation_layout(root: Path) -> dict | None:
    """{(stage, layer): shape} and the prompt length of a generation capture, else None."""
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text())
        if m.get("layout") != "generation":
            return None
        return {"prompt_tokens": int(m["prompt_tokens"]),
                "shapes": {(e["stage"], e["layer"]): tuple(e["shape"]) for e in m["files"]}}
    except (ValueError, KeyError, TypeError) as e:
        raise DiffError(f"{manifest}: not a capture manifest ({e})") from None


def first_bad_position(a: np.ndarray, b: np.ndarray, stage: str, shape: tuple, prompt_tokens: int,
                       atol: float, rtol: float) -> int | None:
    """The first position whose row differs beyond numpy.isclose(a, b, rtol, atol) in a
    generation capture's file of `shape`: row t of [T, dim], rows [:, t, :] of attention
    [heads, T, T], row i of lm_head [G, vocab] (position prompt_tokens - 1 + i); None if none."""
    x, y = np.asarray(a).reshape(shape), np.asarray(b).reshape(shape)
    bad = ~np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    rows = bad.any(axis=(0, 2)) if len(shape) == 3 else bad.reshape(shape[0], -1).any(axis=1)
    if not rows.any():
        return None
    first = int(np.argmax(rows))
    return prompt_tokens - 1 + first if stage == "lm_head" else first


def _diff_pair(key, path_a: Path, path_b: Path, atol: float, rtol: float, layout=None) -> PairResult:
    a, b = read_aprt(path_a), read_aprt(path_b)
    if (a.layer, a.count) != (b.layer, b.count):
        msg = f"header mismatch: layer {a.layer} vs {b.layer}, count {a.count} vs {b.count}"
        return PairResult(*key, "mismatch", message=msg)
    stats = compare(a.values, b.values, atol, rtol)
    if not stats["n_bad"]:
        return PairResult(*key, "ok", stats)
    position = None
    layer, stage = key
    shape = None if layout is None else layout["shapes"].get((stage, None if stage in WHOLE_MODEL_STAGES else layer))
    if shape is not None and int(np.prod(shape)) == a.count:
        position = first_bad_position(a.values, b.values, stage, shape, layout["prompt_tokens"], atol, rtol)
    return PairResult(*key, "fail", stats, position=position)


def diff_captures(path_a, path_b, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> DiffReport:
    """Compare two capture directories (or two single .bin files) pair by pair."""
    path_a, path_b = Path(path_a), Path(path_b)
    files_a, files_b = _sides(path_a, path_b)
    common = sorted(files_a.keys() & files_b.keys(), key=_forward_order)
    if not common:
        raise DiffError(f"no stage is present in both {path_a} ({len(files_a)} files) and {path_b} ({len(files_b)} files)")
    layout = None
    if path_a.is_dir():   # both generation captures (same prompt length): divergences get a position
        la, lb = _generation_layout(path_a), _generation_layout(path_b)
        if la is not None and lb is not None and la["prompt_tokens"] == lb["prompt_tokens"]:
            layout = la
    return DiffReport(
        str(path_a), str(path_b), atol, rtol,
        pairs=[_diff_pair(k, files_a[k], files_b[k], atol, rtol, layout) for k in common],
        only_a=sorted(files_a.keys() - files_b.keys(), key=_forward_order),
        only_b=sorted(files_b.keys() - files_a.keys(), key=_forward_order),
    )


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _row(p: PairResult) -> str:
    s = p.stats or {}
    layer = "-" if p.layer is None else str(p.layer)
    return (f"{layer:>5}  {p.stage:<18} {_num(s.get('n'), 'd'):>9} {_num(s.get('max_abs_diff'), '.3e'):>10} "
            f"{_num(s.get('argmax'), 'd'):>9} {_num(s.get('rms_diff'), '.3e'):>10} {_num(s.get('cosine'), '.6f'):>9} "
            f"{_num(s.get('n_bad'), 'd'):>9}  {p.status.upper()}" + (f"  {p.message}" if p.message else ""))


def _where(key: tuple[int | None, str]) -> str:
    layer, stage = key
    return stage if layer is None else f"layer {layer} {stage}"


def format_report(report: DiffReport) -> str:
    """A table of every pair, the unpaired stages, then a last line naming the first divergence."""
    lines = [f"{'layer':>5}  {'stage':<18} {'n':>9} {'max_abs':>10} {'at':>9} {'rms':>10} {'cosine':>9} {'bad':>9}  status"]
    lines += [_row(p) for p in report.pairs]
    for side, keys in (("A", report.only_a), ("B", report.only_b)):
        if keys:
            lines.append(f"only in {side}: " + ", ".join(_where(k) for k in keys))
    lines.append(_verdict(report))
    return "\n".join(lines)


def _verdict(report: DiffReport) -> str:
    first = report.first_divergence
    tol = f"atol={report.atol:g}, rtol={report.rtol:g}"
    if first is None:
        return f"all {len(report.pairs)} pairs agree ({tol})"
    where = _where((first.layer, first.stage))
    if first.position is not None:
        where = f"position {first.position}, {where}"
    if first.status == "mismatch":
        return f"first divergence: {where} ({first.message})"
    s = first.stats
    notes = [f"{s['n_bad']} of {s['n']} values differ beyond {tol}"]
    if s["max_abs_diff"] is not None:
        notes.append(f"max |a-b| {s['max_abs_diff']:.3e} at {s['argmax']}")
    if s["nan_mismatch"]:
        notes.append(f"{s['nan_mismatch']} NaN mismatches")
    return f"first divergence: {where} ({'; '.join(notes)})"
