"""Trace sinks: the forward computes planned stages straight into APRT files.

``TraceSink`` serves one prefill forward (each file is that forward's whole stage);
``GenerationSink`` serves a whole generation (each file has a row per position, and every
forward gets the window of its own rows).

The sink protocol and the scratch sink (``NullSink``) live in ``engine.sink``; NullSink is
re-exported here for callers that build trace sinks around it.
"""
from __future__ import annotations

import math
import os
import shutil
import weakref
from pathlib import Path

import numpy as np

from engine import failpoints
from engine.errors import EngineError
from engine.sink import NullSink  # noqa: F401  (re-exported)
from trace.aprt import DTYPE, HEADER, create_aprt, header_bytes, partial_path, stage_path
from trace.plan import ATTENTION_STAGES, planned_keys


class _PlannedSink:
    """What both trace sinks share: scratch for unplanned stages, one request per (stage, layer)
    per forward."""

    def __init__(self):
        self._scratch = NullSink()
        self._requested: set[tuple[str, int | None]] = set()

    def reserve(self, stage: str, size: int) -> None:
        """Preallocate scratch for unplanned stages (see NullSink.reserve)."""
        self._scratch.reserve(stage, size)

    def _claim(self, stage: str, layer: int | None) -> None:
        key = (stage, layer)
        if key in self._requested:
            raise ValueError(f"stage {stage} layer {layer} was requested twice in one forward")
        self._requested.add(key)


class TraceSink(_PlannedSink):
    """Hands out, for each (stage, layer) the plan wants, a memmap of a new APRT file's body.

    The file is created as ``<final path>.partial`` at its final size, so the forward's
    kernels write straight into it (zero copy). ``finish()`` publishes the files by
    renaming; ``abort()`` deletes them, so a failed forward leaves nothing that looks
    complete. Unwanted stages get scratch from an internal NullSink. Used as a context
    manager it finishes on a clean exit and aborts on an exception.
    """

    def __init__(self, out_dir, plan, n_layers: int):
        bad = [layer for layer in plan.layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"plan layer {bad[0]} is out of range: the model has {n_layers} layers")
        self.out_dir = Path(out_dir)
        self.plan = plan
        self.n_layers = n_layers
        super().__init__()
        self._copies: list = []
        # the sink keeps only a weak reference to each file's map: once the forward drops a
        # buffer its pages are unmapped (they stay in the page cache, not in this process's RSS),
        # so a capture of every stage of every layer costs about one layer of resident memory
        self._open: list[tuple[str, int | None, tuple, Path, weakref.ref]] = []

    def begin(self, pos0: int, n: int) -> None:
        """A prefill-only trace is one forward: nothing to do per forward."""

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
        """The float32 array of `shape` the forward computes (stage, layer) into."""
        self._claim(stage, layer)
        if not self.plan.wants(stage, layer):
            return self._scratch.buffer(stage, layer, shape)
        path = stage_path(self.out_dir, stage, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = create_aprt(partial_path(path), layer, math.prod(shape))
        if failpoints.active("sink.publish_early"):
            path.unlink(missing_ok=True)
            os.link(partial_path(path), path)
        if failpoints.active("sink.copy"):
            self._copies.append((body, scratch := np.zeros(shape, np.float32)))
            self._open.append((stage, layer, tuple(shape), path, weakref.ref(body)))
            return scratch
        self._open.append((stage, layer, tuple(shape), path, weakref.ref(body)))
        return body.reshape(shape)

    def finish(self) -> list[tuple[str, int | None, tuple, Path]]:
        """Flush and publish every file of this forward; return (stage, layer, shape, path) for each."""
        written = []
        for body, scratch in self._copies:  # only under the sink.copy fail point
            body[:] = scratch.reshape(-1)
        for stage, layer, shape, path, ref in self._open:
            body = ref()
            if body is not None:  # still mapped (held by the caller): write it back now
                body.flush()
            os.replace(partial_path(path), path)
            written.append((stage, layer, shape, path))
        self._reset()
        return written

    def abort(self) -> None:
        """Delete this forward's unfinished files."""
        for _, _, _, path, _ in self._open:
            partial_path(path).unlink(missing_ok=True)
        self._reset()

    def _reset(self) -> None:
        self._copies = []
        self._open = []
        self._requested = set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        else:
            self.abort()
        return False


def stage_file_shape(stage: str, cfg, n_rows: int, n_logit_rows: int) -> tuple[int, ...]:
    """The shape of a generation capture's file for `stage` on a model with config `cfg`:
    [n_rows, width] per token, [heads, n_rows, n_rows] for attention, [n_logit_rows, vocab]
    for lm_head. The forward's buffer requests are checked against it (GenerationSink.buffer)."""
    if stage in ATTENTION_STAGES:
        return (cfg.n_heads, n_rows, n_rows)
    if stage == "lm_head":
        return (n_logit_rows, cfg.vocab)
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    width = {"qkv_matmul": qkv, "qkv_bias": qkv, "q_post_rope": cfg.q_dim, "attention": cfg.q_dim,
             "k_post_rope": cfg.kv_dim, "ffn_gate": cfg.ffn_dim, "ffn_up": cfg.ffn_dim, "ffn_silu": cfg.ffn_dim,
             "ffn_swigl": cfg.ffn_dim}.get(stage, cfg.dim)
    return (n_rows, width)


class _GenFile:
    """One planned (stage, layer) of a generation capture: its path and full shape."""

    def __init__(self, stage, layer, path, shape):
        self.stage, self.layer, self.path, self.shape = stage, layer, path, shape

    @property
    def partial(self) -> Path:
        return partial_path(self.path)

    @property
    def row_floats(self) -> int:
        return math.prod(self.shape[1:])


class GenerationSink(_PlannedSink):
    """A sink for a whole generation: one APRT file per planned (stage, layer) covering every
    forward (the prompt's prefill, in chunks of any length, then each decode step).

    Files are created at their final size before the first forward (`n_rows` positions:
    per-token stages [n_rows, dim], attention [heads, n_rows, n_rows], lm_head
    [n_rows - n_prompt + 1, vocab], row i = the logits generated token i is sampled from).
    The forward announces its positions (``begin(pos0, n)``) and, for a planned stage, gets a
    memory-mapped window of exactly its rows, so its kernels compute straight into the file:
    rows pos0..pos0+n-1 of a per-token file, ``[:, pos0:pos0+n, :pos0+n]`` of an attention file
    (later keys stay 0: masked), the logits row of a forward that ends at or after the prompt's
    last position (earlier prefill chunks' logits go to scratch). The windows of one forward are
    unmapped when the next begins, so resident memory is what one forward touches.

    ``finish(n_computed)`` cuts every file to the rows computed (an early stop: end of
    generation, full context), fixes its header count and publishes it by renaming; ``abort()``
    deletes the files. Nothing is published before ``finish``.
    """

    def __init__(self, out_dir, plan, cfg, n_rows: int, n_prompt: int):
        if not 1 <= n_prompt <= n_rows:
            raise ValueError(f"a generation capture needs 1 <= prompt tokens ({n_prompt}) <= rows ({n_rows})")
        bad = [layer for layer in plan.layers if not 0 <= layer < cfg.n_layers]
        if bad:
            raise ValueError(f"plan layer {bad[0]} is out of range: the model has {cfg.n_layers} layers")
        self.out_dir = Path(out_dir)
        self.plan, self.cfg = plan, cfg
        self.n_rows, self.n_prompt = n_rows, n_prompt
        self.n_logit_rows = n_rows - n_prompt + 1
        super().__init__()
        self.files: dict[tuple[str, int | None], _GenFile] = {}
        for stage, layer in planned_keys(plan):
            shape = stage_file_shape(stage, cfg, n_rows, self.n_logit_rows)
            self.files[stage, layer] = _GenFile(stage, layer, stage_path(self.out_dir, stage, layer), shape)
        self._pos0, self._n = 0, 0
        self._maps: list = []
        self._copies: list = []
        self.rows_computed = 0

    def bytes_needed(self) -> int:
        """The bytes the files take on disk at their full size."""
        return sum(HEADER.size + 4 * math.prod(f.shape) for f in self.files.values())

    def create(self) -> None:
        """Create every file at its full size, after checking the disk can hold them all."""
        need = self.bytes_needed()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.out_dir).free
        if need > free:
            raise EngineError(f"the capture needs {need} bytes ({need / 1e9:.2f} GB) but {self.out_dir} has "
                                  f"{free} bytes ({free / 1e9:.2f} GB) free; capture fewer stages, layers or tokens")
        for f in self.files.values():
            f.path.parent.mkdir(parents=True, exist_ok=True)
            create_aprt(f.partial, f.layer, math.prod(f.shape))   # the returned map is dropped: unmapped
            if failpoints.active("sink.publish_early"):
                f.path.unlink(missing_ok=True)
                os.link(f.partial, f.path)

    def begin(self, pos0: int, n: int) -> None:
        """The next forward runs n tokens at positions pos0..pos0+n-1."""
        if pos0 + n > self.n_rows:
            raise ValueError(f"forward at positions {pos0}..{pos0 + n - 1} is past the capture's {self.n_rows} rows")
        self._flush_copies()
        self._maps = []   # the last forward's windows: unmapped once the forward drops them too
        self._requested = set()
        self._pos0, self._n = pos0, n
        self.rows_computed = max(self.rows_computed, pos0 + n)

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
        """The float32 array of `shape` the forward computes (stage, layer) into."""
        self._claim(stage, layer)
        f = self.files.get((stage, layer))
        if f is None:
            return self._scratch.buffer(stage, layer, shape)
        pos0, n = self._pos0, self._n
        if stage in ATTENTION_STAGES:
            want = (f.shape[0], n, pos0 + n)
        elif stage == "lm_head":
            want = (1, f.shape[1])
        else:
            want = (n, f.shape[1])
        if tuple(shape) != want:
            raise ValueError(f"stage {stage} layer {layer}: the forward asked for {tuple(shape)}, "
                             f"the capture expects {want} at positions {pos0}..{pos0 + n - 1}")
        if stage in ATTENTION_STAGES:
            body = np.memmap(f.partial, dtype=DTYPE, mode="r+", offset=HEADER.size, shape=f.shape)
            view = body[:, pos0:pos0 + n, :pos0 + n]
        else:
            row = pos0 if stage != "lm_head" else pos0 + n - self.n_prompt
            if failpoints.active("sink.row_offset") and n == 1 and stage != "lm_head" and row + 1 < self.n_rows:
                row += 1
            if row < 0:   # the logits of a prefill chunk before the prompt's last: nobody samples them
                return self._scratch.buffer(stage, layer, shape)
            body = np.memmap(f.partial, dtype=DTYPE, mode="r+", offset=HEADER.size + 4 * row * f.row_floats,
                             shape=want)
            view = body
        self._maps.append(body)
        if failpoints.active("sink.copy"):
            scratch = np.zeros(want, np.float32)
            self._copies.append((view, scratch))
            return scratch
        return view

    def _flush_copies(self) -> None:
        for view, scratch in self._copies:   # only under the sink.copy fail point
            view[...] = scratch
        self._copies = []

    def finish(self, n_computed: int | None = None) -> list[tuple[str, int | None, tuple, Path]]:
        """Cut every file to the rows computed (default: the furthest position any forward
        reached), fix its header and publish it; return (stage, layer, shape, path) for each."""
        self._flush_copies()
        self._maps = []
        t = self.rows_computed if n_computed is None else n_computed
        if not self.n_prompt <= t <= self.n_rows:
            raise ValueError(f"{t} rows computed; a generation capture holds {self.n_prompt}..{self.n_rows}")
        written = []
        for f in self.files.values():
            if failpoints.active("sink.no_cut"):
                shape = f.shape
            else:
                shape = _cut(f, t, t - self.n_prompt + 1)
            os.replace(f.partial, f.path)
            written.append((f.stage, f.layer, shape, f.path))
        return written

    def abort(self) -> None:
        """Delete the capture's unfinished files."""
        self._copies, self._maps = [], []
        for f in self.files.values():
            f.partial.unlink(missing_ok=True)
            if failpoints.active("sink.publish_early"):
                f.path.unlink(missing_ok=True)


def _cut(f: _GenFile, n_rows: int, n_logit_rows: int) -> tuple[int, ...]:
    """Cut f's .partial file to its first n_rows positions (n_logit_rows for lm_head): a
    prefix for [rows, width] files; attention [heads, T, T] is compacted to [heads, t, t] in
    place (each row moves to a lower offset, so copying in order never overwrites a row not yet
    moved). The header count is rewritten. Returns the new shape."""
    if f.stage in ATTENTION_STAGES:
        heads, full, _ = f.shape
        shape = (heads, n_rows, n_rows)
        if n_rows < full:
            body = np.memmap(f.partial, dtype=DTYPE, mode="r+", offset=HEADER.size, shape=(heads * full * full,))
            for h in range(heads):
                for r in range(n_rows):
                    src = (h * full + r) * full
                    dst = (h * n_rows + r) * n_rows
                    body[dst:dst + n_rows] = body[src:src + n_rows]
            del body
    else:
        shape = ((n_logit_rows if f.stage == "lm_head" else n_rows),) + tuple(f.shape[1:])
    count = math.prod(shape)
    with open(f.partial, "r+b") as fh:
        fh.truncate(HEADER.size + 4 * count)
        fh.seek(0)
        fh.write(header_bytes(f.partial, f.layer, count))
    return shape


class ShardSink(_PlannedSink):
    """A sink for one shard of a dataset collection: one APRT file ``[n_rows, width]`` per
    planned per-token (stage, layer), holding the rows of several prompts one after another.

    Each prompt is one prefill forward from position 0; ``start_prompt(row0)`` says where its
    rows begin in the shard, and every forward gets a memory-mapped window of exactly its rows
    (``row0 + pos0 .. row0 + pos0 + n - 1``), so the kernels compute straight into the file. The
    files live in the shard's folder (a ``.partial`` one until trace.collect publishes it by
    renaming the folder); they are created at their full size by ``create()``. Attention
    ([heads, T, T]) and lm_head (one row per prompt) are not per-token stages: trace.collect
    refuses them before a sink is made.
    """

    def __init__(self, out_dir, plan, cfg, n_rows: int):
        bad = [layer for layer in plan.layers if not 0 <= layer < cfg.n_layers]
        if bad:
            raise ValueError(f"plan layer {bad[0]} is out of range: the model has {cfg.n_layers} layers")
        not_rows = [s for s in plan.stages if s in ATTENTION_STAGES or s == "lm_head"]
        if not_rows:
            raise ValueError(f"stage {not_rows[0]} has no row per token; a shard holds per-token stages only")
        super().__init__()
        self.out_dir, self.plan, self.cfg, self.n_rows = Path(out_dir), plan, cfg, n_rows
        self.files = {key: _GenFile(*key, stage_path(self.out_dir, *key), stage_file_shape(key[0], cfg, n_rows, 0))
                      for key in planned_keys(plan)}
        self._row0, self._pos0, self._n = 0, 0, 0
        self._maps: list = []

    def create(self) -> None:
        """Create every file of the shard at its full size (then unmapped until a forward asks)."""
        for f in self.files.values():
            f.path.parent.mkdir(parents=True, exist_ok=True)
            create_aprt(f.path, f.layer, math.prod(f.shape))

    def start_prompt(self, row0: int) -> None:
        """The next prompt's rows start at row0 of the shard."""
        self._row0 = row0

    def begin(self, pos0: int, n: int) -> None:
        """The next forward runs n tokens at positions pos0..pos0+n-1 of the current prompt."""
        if self._row0 + pos0 + n > self.n_rows:
            raise ValueError(f"a forward at rows {self._row0 + pos0}..{self._row0 + pos0 + n - 1} is past the "
                             f"shard's {self.n_rows} rows")
        self._maps, self._requested = [], set()
        self._pos0, self._n = pos0, n

    def buffer(self, stage: str, layer: int | None, shape: tuple) -> np.ndarray:
        """The float32 array of `shape` the forward computes (stage, layer) into."""
        self._claim(stage, layer)
        f = self.files.get((stage, layer))
        if f is None:
            return self._scratch.buffer(stage, layer, shape)
        want = (self._n, f.shape[1])
        if tuple(shape) != want:
            raise ValueError(f"stage {stage} layer {layer}: the forward asked for {tuple(shape)}, the shard "
                             f"expects {want}")
        row = self._row0 + self._pos0
        if failpoints.active("collect.row_offset") and self._row0 > 0:
            row -= 1
        body = np.memmap(f.path, dtype=DTYPE, mode="r+", offset=HEADER.size + 4 * row * f.row_floats, shape=want)
        self._maps.append(body)
        return body

    def finish(self) -> None:
        """Write the last forward's rows back to the files (the folder is published by the caller)."""
        for body in self._maps:
            body.flush()
        self._maps = []
