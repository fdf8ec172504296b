"""One traced prefill forward: files through a TraceSink, a manifest, optional statistics.

``capture`` runs ``engine.forward`` once over the prompt with a TraceSink; the
kernels write the planned stages straight into memory-mapped ``.partial`` files,
which are renamed to their final names only after the forward returned. Then
``manifest.json`` is written (atomically, last), so a capture directory with a
manifest is complete; an interrupted or failed forward leaves neither ``.bin``
files nor a manifest behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from engine.arch import model_stages, stage_absent_reason
from engine.errors import EngineError
from trace.aprt import partial_path, read_aprt, stage_path
from trace.plan import ATTENTION_STAGES, PlanError, TracePlan, parse_layers, parse_stages, planned_keys  # noqa: F401
from trace.sink import GenerationSink, TraceSink
from trace.stats import attention_rows, stage_stats

MANIFEST = "manifest.json"
_OUR_FILES = ("*.bin", "*.bin.partial", MANIFEST, MANIFEST + ".partial")


def _named(text: str, stage: str) -> bool:
    return any(item.strip().lower() == stage for item in text.split(","))


def plan_for_model(stages_text: str, layers_text: str, cfg) -> TracePlan:
    """The plan for ``--stages``/``--layers`` on a model with config ``cfg``.

    Some stages exist only in some models (``qkv_bias`` in qwen2's, ``q_norm`` in gemma3's,
    the activation stages by the FFN's activation; engine.arch.model_stages): naming one this
    model lacks is an error; ``all`` then simply leaves it out.
    """
    try:
        stages = parse_stages(stages_text)
        layers = parse_layers(layers_text, cfg.n_layers)
    except PlanError as e:
        raise EngineError(str(e)) from None
    present = model_stages(cfg.arch, cfg.qkv_bias)
    for stage in stages:
        if stage not in present and _named(stages_text, stage):
            raise EngineError(f"stage {stage} does not exist in this {cfg.arch} model "
                              f"({stage_absent_reason(stage, cfg.arch, cfg.qkv_bias)})")
    return TracePlan(tuple(s for s in stages if s in present), layers)


def check_out_dir(out: Path, force: bool) -> list[Path]:
    """Raise if `out` cannot take a new capture; return the old capture's files `--force` would remove."""
    if out.exists() and not out.is_dir():
        raise EngineError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not force:
        raise EngineError(f"--out {out} is not empty; choose a new folder or pass --force to replace its capture")
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    others = [p for p in files if not any(p.match(g) for g in _OUR_FILES)]
    if others:
        raise EngineError(f"--out {out} holds files that are not a capture ({others[0]}); not replacing it")
    return files


def prepare_out_dir(out: Path, force: bool) -> None:
    """Refuse to mix a new capture into an existing one, unless `force` (then remove the old capture's files)."""
    for p in check_out_dir(out, force):
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def default_out_dir(name: str, root: Path = Path("traces"), now: float | None = None) -> Path:
    """``<root>/<name>-<YYYYmmdd-HHMMSS>``, with ``-2``, ``-3``... if that folder already exists."""
    base = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    out, i = base, 1
    while out.exists():
        i += 1
        out = base.with_name(f"{base.name}-{i}")
    return out


def check_computed(plan: TracePlan, requested) -> None:
    """Raise unless the forward asked its sink for every (stage, layer) the plan captures."""
    missing = [k for k in planned_keys(plan) if k not in requested]
    if missing:
        stage, layer = missing[0]
        raise EngineError(f"the forward never computed stage {stage}" + ("" if layer is None else
                          f" of layer {layer}") + f" ({len(missing)} planned files missing)")


class Recorder:
    """Wraps a sink: records every (stage, layer) the forward asks for; reports progress per layer."""

    def __init__(self, sink, n_layers: int, progress: bool):
        self.sink, self.n_layers, self.progress, self._last = sink, n_layers, progress, -1
        self.requested: set[tuple[str, int | None]] = set()

    def begin(self, pos0, n):
        self.sink.begin(pos0, n)

    def buffer(self, stage, layer, shape):
        self.requested.add((stage, layer))
        if self.progress and layer is not None and layer != self._last:
            self._last = layer
            sys.stderr.write(f"\rtracing layer {layer + 1}/{self.n_layers}")
            sys.stderr.flush()
        return self.sink.buffer(stage, layer, shape)

    def done(self):
        if self.progress and self._last >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(obj, indent=1, allow_nan=False))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def check_ids(ids, cfg) -> None:
    """Raise unless a capture of these token ids fits the model."""
    if len(ids) == 0:
        raise EngineError("the prompt has no tokens; nothing to trace")
    if len(ids) > cfg.context:
        raise EngineError(f"the prompt has {len(ids)} tokens, which exceeds the model's context length {cfg.context}")


def capture(engine, ids: list[int], plan: TracePlan, out: Path, prompt: str, with_stats: bool = False,
            model_sha256: str | None = None, progress: bool = False, all_logits: bool = False,
            hooks=None) -> dict:
    """Run one prefill forward over ids with `plan`'s stages written under `out`; return the manifest.
    lm_head holds the last position's logits, or with all_logits every position's ([n, vocab]).

    `out` must exist. On any exception (including KeyboardInterrupt) during the forward
    the partial files are deleted and the exception propagates; no manifest is written.
    """
    out = Path(out)
    cfg = engine.config
    if "qkv_bias" in plan.stages and not cfg.qkv_bias:
        raise EngineError(f"stage qkv_bias does not exist in this {cfg.arch} model (it has no q/k/v bias)")
    check_ids(ids, cfg)
    session = engine.new_session(n_ctx=len(ids))  # its own KV cache: the engine's sessions are left alone
    sink = TraceSink(out, plan, cfg.n_layers)
    recorder = Recorder(sink, cfg.n_layers, progress)
    t0 = time.perf_counter()
    try:
        try:
            session.forward_view(ids, 0, sink=recorder, all_logits=all_logits, hooks=hooks)
            check_computed(plan, recorder.requested)
        except BaseException:
            sink.abort()
            raise
        finally:
            recorder.done()
        seconds = time.perf_counter() - t0
        written = sink.finish()
        return _write_manifest(engine, ids, plan, out, prompt, with_stats, model_sha256, seconds, written)
    except BaseException as e:
        # interrupted or failed after the forward too (publishing, statistics, manifest): remove this
        # capture's files, so a folder without a complete manifest holds nothing that looks complete
        _discard(out, plan, e)


def _discard(out: Path, plan: TracePlan, e: BaseException):
    """Remove the capture's files after `e`, then raise it (an OSError as a one-line EngineError)."""
    remove_capture(out, plan)
    if isinstance(e, OSError):
        why = e.strerror or str(e)
        raise EngineError(f"cannot write the capture to {out}: {why}"
                          + (f" ({e.filename})" if e.filename else "") + "; partial files removed") from None
    raise e


def remove_capture(out: Path, plan: TracePlan) -> None:
    """Delete every file (final or .partial) the plan would write under out, and empty layer folders."""
    for key in planned_keys(plan):
        path = stage_path(out, *key)
        for p in (path, partial_path(path)):
            p.unlink(missing_ok=True)
    for d in out.glob("layer-*"):
        try:
            d.rmdir()  # only if empty
        except OSError:
            pass


def _write_manifest(engine, ids, plan, out, prompt, with_stats, model_sha256, seconds, written,
                    extra: dict | None = None) -> dict:
    cfg = engine.config
    entries = []
    for stage, layer, shape, path in written:
        entry = {"stage": stage, "layer": layer, "shape": list(shape), "path": path.relative_to(out).as_posix(),
                 "count": int(np.prod(shape))}
        if with_stats:
            values = np.asarray(read_aprt(path).values).reshape(shape)
            entry["stats"] = stage_stats(attention_rows(values) if stage in ATTENTION_STAGES else values.reshape(shape[0], -1))
        entries.append(entry)
    manifest = {
        "format": "APRT", "engine": "numgguf", "model": str(engine.path), "sha256": model_sha256,
        "arch": cfg.arch, "n_layers": cfg.n_layers, "prompt": prompt, "token_ids": [int(i) for i in ids],
        "n_tokens": len(ids), "stages": list(plan.stages), "layers": list(plan.layers),
        "forward_seconds": round(seconds, 4), "files": entries,
    }
    if extra:
        manifest.update(extra)
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def capture_generation(engine, ids: list[int], plan: TracePlan, out: Path, prompt: str, max_tokens: int,
                       sampler=None, stop_at_eog: bool = True, with_stats: bool = False,
                       model_sha256: str | None = None, on_token=None, progress: bool = False,
                       hooks=None) -> dict:
    """Generate up to max_tokens after the prompt ids, with `plan`'s stages of every forward
    (prefill chunks, then each decode step) written under `out`; return the manifest.

    One file per planned (stage, layer): per-token stages [T, dim] (row t = the forward that
    consumed token_ids[t]), attention [heads, T, T], lm_head [G, vocab] (row i = the logits
    generated token i was sampled from), T = prompt + generated - 1 (the last sampled token is
    never fed back), G = generated. The files are created at their size for max_tokens before
    the first forward (refused up front if the disk cannot hold them) and cut on an early stop.
    `on_token(id)` is called for each sampled token as it comes (streaming). On any exception the
    files are deleted and no manifest is written. `out` must exist."""
    from engine.generate import GenStats, check_prompt
    from engine.sampling import Sampler
    out = Path(out)
    cfg = engine.config
    if max_tokens < 1:
        raise EngineError(f"--max-tokens must be >= 1, got {max_tokens}")
    if "qkv_bias" in plan.stages and not cfg.qkv_bias:
        raise EngineError(f"stage qkv_bias does not exist in this {cfg.arch} model (it has no q/k/v bias)")
    n_prompt = len(ids)
    n_ctx = min(cfg.context, n_prompt + max_tokens)
    check_prompt(ids, n_ctx)
    n_rows = min(n_prompt + max_tokens - 1, n_ctx)
    sampler = sampler or Sampler()
    session = engine.new_session(n_ctx=n_ctx)
    sink = GenerationSink(out, plan, cfg, n_rows, n_prompt)
    recorder = Recorder(sink, cfg.n_layers, progress=False)
    session.sink = recorder
    stats, generated = GenStats(), []
    t0 = time.perf_counter()
    try:
        try:
            sink.create()
            for tok in session.generate(ids, max_tokens=max_tokens, sampler=sampler, stop_at_eog=stop_at_eog,
                                        stats=stats, hooks=hooks):
                generated.append(int(tok))
                if on_token is not None:
                    on_token(tok)
                if progress:
                    sys.stderr.write(f"\rtraced {len(generated)}/{max_tokens} tokens")
                    sys.stderr.flush()
            check_computed(plan, recorder.requested)
            n_computed = session.pos
            if n_computed != n_prompt + len(generated) - 1:
                raise EngineError(f"internal: {n_computed} positions computed for {n_prompt} prompt and "
                                  f"{len(generated)} generated tokens")
        except BaseException:
            sink.abort()
            raise
        finally:
            if progress and generated:
                sys.stderr.write("\n")
        seconds = time.perf_counter() - t0
        written = sink.finish(n_computed)
        token_ids = [int(i) for i in ids] + generated[:-1]
        extra = {"layout": "generation", "token_ids": token_ids, "n_tokens": len(token_ids),
                 "prompt_tokens": n_prompt, "generated_ids": generated,
                 "sampling": {"temperature": sampler.temperature, "top_k": sampler.top_k, "top_p": sampler.top_p,
                              "seed": sampler.seed, "max_tokens": max_tokens, "stop_at_eog": stop_at_eog},
                 "exact": bool(engine.model.exact), "stop_reason": stats.stop_reason,
                 "prefill_tok_s": round(stats.prefill_tok_s, 2), "decode_tok_s": round(stats.decode_tok_s, 2)}
        return _write_manifest(engine, token_ids, plan, out, prompt, with_stats, model_sha256, seconds, written,
                               extra)
    except BaseException as e:
        _discard(out, plan, e)


def format_stats(manifest: dict) -> str:
    """A table of per-stage statistics (all tokens, then last token)."""
    rows = [f"{'layer':>5} {'stage':<19} {'scope':<4} {'count':>9} {'min':>11} {'max':>11} {'mean':>11} "
            f"{'std':>11} {'nan':>5} {'inf':>5} {'zero':>7}"]

    def num(v):
        return f"{v:11.4g}" if v is not None else f"{'-':>11}"

    for e in manifest["files"]:
        for scope in ("all", "last"):
            s = e["stats"][scope]
            layer = "-" if e["layer"] is None else e["layer"]
            rows.append(f"{layer:>5} {e['stage']:<19} {scope:<4} {s['count']:>9} {num(s['min'])} {num(s['max'])} "
                        f"{num(s['mean'])} {num(s['std'])} {s['nan']:>5} {s['inf']:>5} {s['zero']:>7}")
    return "\n".join(rows)
