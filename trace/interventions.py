"""Interventions from the command line: ``--patch``, ``--steer`` and ``--ablate`` specs as hooks.

    --patch  STAGE:LAYER=CAPTURE[@POSITIONS]        values replaced by a capture's (ours or llama.cpp's)
    --steer  STAGE:LAYER=FILE.npy[*ALPHA][@POSITIONS] add ALPHA * a vector [width] or matrix [positions, width]
    --ablate STAGE:LAYER[/hHEAD][@POSITIONS]        zero the values (attention, attn_softmax: one head)

Whole-model stages take no layer (``lm_head=CAP``). POSITIONS: ``5``, ``0-3``, ``-1`` (the
prompt's last position), comma lists of those; default all. Positions are absolute: in a
generation a spec acts on every forward whose rows include them. Everything that can be checked
before the model runs is (stage, layer, head, file, shape, the capture's model); a capture too
short for a position is an error when that position comes.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from trace.plan import ATTENTION_STAGES, PlanError, parse_stages
from trace.stages import WHOLE_MODEL_STAGES

_SPEC = re.compile(r"(?P<stage>[A-Za-z_]+)(?::(?P<layer>[0-9]+))?(?:/h(?P<head>[0-9]+))?"
                   r"(?:=(?P<source>[^@]+?)(?:\*(?P<alpha>[-+0-9.eE]+))?)?(?:@(?P<pos>[-0-9, ]+))?")
_POS = re.compile(r"(-?[0-9]+)(?:-([0-9]+))?")


def parse_positions(text: str | None, n_prompt: int, flag: str) -> frozenset | None:
    """``5``, ``0-3``, ``-1`` (the prompt's last position) or a comma list; None (all) without text."""
    if text is None:
        return None
    out = set()
    for item in text.split(","):
        m = _POS.fullmatch(item.strip())
        if not m:
            raise EngineError(f"{flag}: bad positions {text!r}: expected N, A-B, -1 or a comma list")
        lo = int(m[1])
        if lo < 0:
            if lo != -1 or m[2]:
                raise EngineError(f"{flag}: bad positions {text!r}: the only negative position is -1 (the last)")
            lo = n_prompt - 1
        hi = int(m[2]) if m[2] else lo
        if hi < lo:
            raise EngineError(f"{flag}: position range {item.strip()!r} is reversed")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def _rows(positions: np.ndarray, wanted) -> np.ndarray:
    """Indices of the forward's rows whose position is wanted (all rows when wanted is None)."""
    if wanted is None:
        return np.arange(len(positions))
    return np.flatnonzero(np.isin(positions, np.fromiter(wanted, np.int64)))


def _width(stage: str, cfg) -> int:
    from trace.sink import stage_file_shape
    return stage_file_shape(stage, cfg, 1, 1)[-1]


class _Spec:
    def __init__(self, flag: str, text: str, cfg, n_prompt: int):
        m = _SPEC.fullmatch(text.strip())
        if not m:
            raise EngineError(f"{flag} {text!r}: expected STAGE:LAYER" + {"--patch": "=CAPTURE[@POSITIONS]",
                              "--steer": "=FILE.npy[*ALPHA][@POSITIONS]", "--ablate": "[/hHEAD][@POSITIONS]"}[flag])
        try:
            (stage,) = parse_stages(m["stage"])
        except (PlanError, ValueError) as e:
            raise EngineError(f"{flag} {text!r}: {e}") from None
        if stage == "qkv_bias" and not cfg.qkv_bias:
            raise EngineError(f"{flag} {text!r}: this {cfg.arch} model has no qkv_bias stage")
        whole = stage in WHOLE_MODEL_STAGES
        if whole and m["layer"] is not None:
            raise EngineError(f"{flag} {text!r}: {stage} is a whole-model stage: give no layer")
        if not whole and m["layer"] is None:
            raise EngineError(f"{flag} {text!r}: give the layer, {stage}:N (the model has {cfg.n_layers} layers)")
        layer = None if whole else int(m["layer"])
        if layer is not None and layer >= cfg.n_layers:
            raise EngineError(f"{flag} {text!r}: layer {layer} is out of range: the model has {cfg.n_layers} "
                              f"layers (0-{cfg.n_layers - 1})")
        self.flag, self.text, self.stage, self.layer = flag, text, stage, layer
        self.head = None if m["head"] is None else int(m["head"])
        if self.head is not None:
            if flag != "--ablate" or stage not in ("attention", "attn_softmax", "attn_scores"):
                raise EngineError(f"{flag} {text!r}: /hHEAD is for --ablate of attention, attn_scores or attn_softmax")
            if self.head >= cfg.n_heads:
                raise EngineError(f"{flag} {text!r}: head {self.head} is out of range: {cfg.n_heads} heads")
        self.positions = parse_positions(m["pos"], n_prompt, f"{flag} {text!r}")
        self.source, self.alpha = m["source"], float(m["alpha"]) if m["alpha"] else 1.0
        if (flag == "--ablate") != (self.source is None):
            raise EngineError(f"{flag} {text!r}: " + ("--ablate takes no =SOURCE" if flag == "--ablate"
                                                     else "missing =SOURCE"))
        if flag != "--steer" and m["alpha"]:
            raise EngineError(f"{flag} {text!r}: *ALPHA is for --steer")
        self.head_dim = cfg.head_dim

    def key(self):
        return (self.stage, self.layer)


def _ablate(spec: _Spec):
    hd, head, stage = spec.head_dim, spec.head, spec.stage

    def fn(values, positions):
        rows = _rows(positions, spec.positions)
        if stage in ATTENTION_STAGES:
            if head is None:
                values[:, rows] = 0.0
            else:
                values[head, rows] = 0.0
        elif head is not None:
            values[rows, head * hd:(head + 1) * hd] = 0.0
        else:
            values[rows] = 0.0
    return fn


def _steer(spec: _Spec, cfg):
    path = Path(spec.source)
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EngineError(f"--steer {spec.text!r}: cannot read {path}: {e}") from None
    if spec.stage in ATTENTION_STAGES:
        raise EngineError(f"--steer {spec.text!r}: steering adds a vector to [token, dim] stages, not {spec.stage}")
    width = _width(spec.stage, cfg)
    if vec.ndim not in (1, 2) or vec.shape[-1] != width or not np.isfinite(vec).all():
        raise EngineError(f"--steer {spec.text!r}: {path} holds shape {vec.shape}; {spec.stage} needs [{width}] "
                          f"or [positions, {width}] of finite numbers")
    vec = (np.float32(spec.alpha) * vec.astype(np.float32))

    def fn(values, positions):
        rows = _rows(positions, spec.positions)
        if vec.ndim == 1:
            values[rows] += vec
            return
        pos = positions[rows]
        if len(pos) and pos.max() >= len(vec):
            raise EngineError(f"--steer {spec.text!r}: {path} has {len(vec)} rows, position {int(pos.max())} "
                              "needs more")
        values[rows] += vec[pos]
    return fn


def _patch(spec: _Spec, cfg, model_sha256: str | None, n_positions: int | None):
    from trace.aprt import AprtError
    from trace.reader import load
    try:
        cap = load(spec.source)
    except AprtError as e:
        raise EngineError(f"--patch {spec.text!r}: {e}") from None
    sha = cap.manifest.get("sha256")
    if model_sha256 is not None and sha is not None and sha != model_sha256:
        raise EngineError(f"--patch {spec.text!r}: the capture is of another model (sha256 {sha[:16]}..., "
                          f"this one {model_sha256[:16]}...)")
    if spec.key() not in cap:
        raise EngineError(f"--patch {spec.text!r}: {spec.source} holds no {spec.stage}"
                          + ("" if spec.layer is None else f" of layer {spec.layer}"))
    src = cap[spec.key()]
    generation = cap.manifest.get("layout") == "generation"
    first_logit = cap.manifest.get("prompt_tokens", 1) - 1 if generation else cap.manifest.get("n_tokens", 1) - 1
    if spec.stage in ATTENTION_STAGES:
        if src.shape[0] != cfg.n_heads:
            raise EngineError(f"--patch {spec.text!r}: capture shape {src.shape} does not fit {cfg.n_heads} heads")
    elif src.shape[-1] != _width(spec.stage, cfg):
        raise EngineError(f"--patch {spec.text!r}: the capture's rows have {src.shape[-1]} values, this model's "
                          f"{spec.stage} has {_width(spec.stage, cfg)}")

    def row_of(p: int) -> int:
        i = p - first_logit if spec.stage == "lm_head" else p
        n = src.shape[1] if spec.stage in ATTENTION_STAGES else src.shape[0]
        if not 0 <= i < n:
            raise EngineError(f"--patch {spec.text!r}: the capture has no row for position {p} "
                              f"({cap.manifest.get('n_tokens')} tokens)")
        return i

    if n_positions is not None:   # every position the run will patch must be in the capture: say so now
        wanted = range(n_positions) if spec.positions is None else sorted(spec.positions)
        if spec.stage == "lm_head":
            wanted = [p for p in wanted if p >= first_logit] if spec.positions is not None else \
                range(first_logit, n_positions)
        for p in wanted:
            if p < n_positions:
                row_of(p)

    def fn(values, positions):
        for r in _rows(positions, spec.positions):
            i = row_of(int(positions[r]))
            if spec.stage in ATTENTION_STAGES and values.shape[2] > src.shape[2]:
                raise EngineError(f"--patch {spec.text!r}: the capture has {src.shape[2]} keys, "
                                  f"the forward needs {values.shape[2]}")
            put_row(spec.stage, values, r, src, i)
    return fn


def put_row(stage: str, values: np.ndarray, r: int, source: np.ndarray, i: int) -> None:
    """The forward's row r of a stage's values := row i of `source` ([T, width]; for attention
    stages [heads, T, keys], every head's query row i over the keys the forward has)."""
    if stage in ATTENTION_STAGES:
        values[:, r, :] = source[:, i, :values.shape[2]]
    else:
        values[r] = source[i]


def build_hooks(cfg, n_prompt: int, patches=(), steers=(), ablations=(), model_sha256: str | None = None,
                n_positions: int | None = None) -> dict:
    """{(stage, layer): fn} for the specs, applied in the order patch, steer, ablate per stage.
    n_positions: the positions the run computes (prompt + generated - 1), to check up front that
    each patch's capture has rows for all it will patch."""
    fns: dict = {}
    for flag, specs in (("--patch", patches), ("--steer", steers), ("--ablate", ablations)):
        for text in specs:
            spec = _Spec(flag, text, cfg, n_prompt)
            fn = (_patch(spec, cfg, model_sha256, n_positions) if flag == "--patch" else
                  _steer(spec, cfg) if flag == "--steer" else _ablate(spec))
            fns.setdefault(spec.key(), []).append(fn)
    return {key: (lambda values, positions, _fs=tuple(fs): [f(values, positions) for f in _fs]) for key, fs in
            fns.items()}
