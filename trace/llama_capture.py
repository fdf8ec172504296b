"""A capture of llama.cpp's own forward, in our APRT layout, names and manifest.

``capture_llama`` decodes the token ids (tokenized by OUR tokenizer) with llama.cpp
(``trace.llama_graph.run_graph``), reads the graph nodes trace/llama_names.py maps to
our stages, and writes them through the same ``TraceSink`` our engine's capture uses,
so the files, headers and paths are identical and ``cli diff`` compares the two
captures directly. Only the nodes the plan's stages of its layers are built from are
read (``_needed_stems``). Values are held one layer at a time: when a layer's ``l_out-N``
arrives, that layer's stages are written in forward order and its nodes dropped.

``capture_llama_generation`` captures llama.cpp DECODING a token sequence as a
generation does: the prompt in one llama_decode, then one llama_decode per later token,
KV cache kept, one context throughout (``trace.llama_graph.LlamaGraph``). The same
collector maps each forward's nodes to stages; ``trace.sink.GenerationSink`` writes its rows into
memory-mapped ``.partial`` files of the whole sequence's shape as each forward arrives
(per-token stages ``[T, dim]``, row t from the forward that consumed token t; attention
``[heads, T, T]``; lm_head ``[T - n_prompt + 1, vocab]``, row i = the logits at position
n_prompt - 1 + i, which generated token i is sampled from).

Graph node -> dump stem (as in ../shared/reference/trace/*/): ``Qcur-N`` etc. by op
(``MUL_MAT`` -> ``Qcur-N.mul_mat``, ``ADD`` -> ``Qcur-N``, ``ROPE`` -> ``Qcur-N.rope``);
the attention output projection is ``attn_out-N`` in the llama graph and an unnamed
``node_K`` in the qwen2 graph, found by position: the first MUL_MAT after
``kqv_out-N``. Every other stem is the node's name. Layout: ggml ``ne[0]`` is the
fastest dimension (``ne=[dim, n_tok]`` -> ``[n_tok, dim]``; ROPE ``[hd, heads, n_tok]``
-> ``[n_tok, heads*hd]``); ``kq``/``kq_soft_max`` ``[n_kv_padded, n_q, heads]`` ->
``[heads, n_q, n_kv]`` trimmed to the real KV cells: a forward of n_q tokens at
positions p..p+n_q-1 sees cells 0..p+n_q-1 (a fresh context fills cells 0, 1, ... in
position order; llama.cpp pads n_kv to a multiple of 256 with empty, masked cells).
Checked on every softmax: each query puts probability exactly 0 on every cell after its
own position (later positions and padding), or the capture fails.

Stages llama.cpp has no node for:
- ``attn_scores`` (ours: q.k/sqrt(d), masked entries 0): llama.cpp's ``kq-N`` holds the
  raw products and ``kq_soft_max-N`` applies the scale (its op parameter) and the causal
  mask inside the softmax; we write ``kq-N * scale`` with the masked entries set to 0,
  the exact pre-softmax values llama.cpp's softmax consumes (noted as derived in the manifest).
- ``ffn_silu``: ggml fuses silu(gate)*up into one SWIGLU op, so silu(gate) alone is
  never computed; naming it is an error, ``--stages all`` leaves it out.
"""
from __future__ import annotations

import re
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from engine.arch import model_stages
from engine.errors import EngineError
from trace.capture import ATTENTION_STAGES, MANIFEST, _write_json_atomic, planned_keys, remove_capture
from trace.aprt import read_aprt
from trace.llama_names import names_for
from trace.plan import TracePlan
from trace.sink import GenerationSink, TraceSink
from trace.stats import attention_rows, stage_stats

UNEXPOSED = {
    "ffn_silu": "llama.cpp never computes silu(gate) on its own (ggml fuses silu(gate)*up into one SWIGLU op, "
                "ffn_swigl); compare ffn_gate and ffn_swigl instead",
    "ffn_gelu": "llama.cpp never computes gelu(gate) on its own (ggml fuses gelu(gate)*up into one GEGLU op, "
                "ffn_geglu); compare ffn_gate and ffn_geglu instead",
}
DERIVED = {
    "attn_scores": "kq-N (raw q.k products) times kq_soft_max-N's scale, masked entries set to 0",
}
_QKV = re.compile(r"([QKV])cur-([0-9]+)")
_LAYER = re.compile(r"(.+)-([0-9]+)")
_STEM_SUFFIX = {"MUL_MAT": ".mul_mat", "ADD": "", "ROPE": ".rope"}
# base names (without -N) of the nodes we read


def _wanted(names) -> frozenset[str]:
    """Base names (without -N) of the graph nodes we read, for an architecture's `names`."""
    bases = {"kq", "kqv_out", "l_out"}
    for spec in names.values():
        for stem in (spec.stems if spec is not None else ()):
            bases.add(stem.split("-{N}")[0])
    return frozenset(b for b in bases if not _QKV.fullmatch(b + "-0"))


def unavailable_stages(stages) -> list[str]:
    return [s for s in stages if s in UNEXPOSED]


def check_stages(stages_text: str, stages) -> tuple[str, ...]:
    """The stages a llama.cpp capture writes; naming a stage llama.cpp does not expose is an error."""
    from trace.capture import _named
    for s in stages:
        if s in UNEXPOSED and _named(stages_text, s):
            raise EngineError(f"stage {s} is not available from llama.cpp: {UNEXPOSED[s]}")
    return tuple(s for s in stages if s not in UNEXPOSED)


def _needed_stems(plan: TracePlan, names) -> frozenset[str]:
    """The dump stems `plan`'s stages are built from, for its layers; ``l_out-N`` ends layer N's stages."""
    templates = set()
    for stage in plan.stages:
        if stage == "attn_scores":  # derived: kq-N, scaled by kq_soft_max-N's op parameter
            templates |= {"kq-{N}", "kq_soft_max-{N}"}
        elif stage not in UNEXPOSED:
            templates.update(names[stage].stems)
    per_layer = {t for t in templates if "{N}" in t} | {"l_out-{N}"}
    return frozenset({t for t in templates if "{N}" not in t}
                     | {t.format(N=layer) for t in per_layer for layer in plan.layers})


class _Collector:
    """Maps graph nodes to dump stems, keeps the current layer's, and writes finished stages to the sink.

    ``sink.buffer(stage, layer, shape)`` gives the array a stage's value of one forward is copied
    into (a TraceSink, or a GenerationSink's rows of the current forward). ``begin`` starts a forward of
    ``n_tok`` tokens at positions ``pos0..``; the constructor starts one at position 0.
    """

    def __init__(self, sink, plan: TracePlan, n_tok: int, cfg, progress: bool):
        self.sink, self.plan, self.n_layers, self.progress = sink, plan, cfg.n_layers, progress
        self.cfg = cfg
        self.names = names_for(cfg.arch)
        self.wanted = _wanted(self.names)
        self.embedding_stem = self.names["embedding"].stems[0]
        self.held: dict[str, np.ndarray] = {}
        self.scale: dict[int, float] = {}
        self.needed = _needed_stems(plan, self.names)
        self.begin(0, n_tok)

    def begin(self, pos0: int, n_tok: int) -> None:
        """Start a forward over ``n_tok`` tokens at positions ``pos0 .. pos0+n_tok-1``."""
        self.pos0, self.n = pos0, n_tok
        self.n_kv = pos0 + n_tok  # the KV cells its queries see: positions 0..pos0+n_tok-1
        self.after_kqv: int | None = None
        self.held.clear()
        self.scale.clear()
        self.written: set[tuple[str, int | None]] = set()

    # -- which nodes, under which stem ------------------------------------------------
    def stem(self, name: str, op: str) -> str | None:
        if " (" in name:
            return None
        if m := _QKV.fullmatch(name):
            suffix = _STEM_SUFFIX.get(op)
            return None if suffix is None else name + suffix
        m = _LAYER.fullmatch(name)
        base = m[1] if m else name
        if base == "kqv_out":
            self.after_kqv = int(m[2])
        elif op == "MUL_MAT" and self.after_kqv is not None and (name.startswith("node_") or base == "attn_out"):
            layer, self.after_kqv = self.after_kqv, None
            return f"attn_out-{layer}"
        if base in self.wanted and base != "attn_out":
            return name
        return None

    def want(self, name: str, op: str) -> bool:
        """Whether the plan needs this node (each one read splits llama.cpp's graph and costs a copy)."""
        s = self.stem(name, op)  # always: stem() tracks the position of the unnamed attn_out
        if s is not None and s not in self.needed and not (self.progress and s.startswith("l_out-")):
            s = None
        self._next = s
        return s is not None

    def take(self, node) -> None:
        stem = self._next
        v = node.values
        if stem.startswith(("kq-", "kq_soft_max-")):
            heads, n_q, n_kv = v.shape[1:]
            if n_q != self.n or n_kv < self.n_kv:
                raise EngineError(f"llama.cpp node {node.name} has shape {node.ne}; expected {self.n} queries "
                                  f"over at least {self.n_kv} KV cells")
            v = v[0]
            if stem.startswith("kq_soft_max-"):
                for i in range(self.n):  # row by row: a mask of a long prompt's [heads, n, n_kv] would be large
                    pos = self.pos0 + i
                    if np.any(v[:, i, pos + 1:] != 0):
                        raise EngineError(f"{node.name}: the query at position {pos} puts probability on a KV "
                                          f"cell after cell {pos}; the cache is not laid out as positions "
                                          "0, 1, ... in cells 0, 1, ...")
                self.scale[int(stem.split("-")[1])] = struct.unpack("<f", struct.pack("<i", node.op_params[0]))[0]
            v = v[:, :, :self.n_kv]
        elif stem == "result_output":
            v = v.reshape(self.n, -1)[-1:]
        else:
            v = v.reshape(self.n, -1)
        self.held[stem] = np.ascontiguousarray(v, dtype=np.float32)
        if stem == self.embedding_stem:
            self._emit("embedding", None)
        elif stem.startswith("l_out-"):
            layer = int(stem.split("-")[1])
            if self.progress:
                sys.stderr.write(f"\rllama.cpp layer {layer + 1}/{self.n_layers}")
                sys.stderr.flush()
            for s in self.plan.stages:
                if s not in ("embedding", "final_norm", "lm_head"):
                    self._emit(s, layer)
            self.held.clear()
        elif stem == "result_norm":
            self._emit("final_norm", None)
        elif stem == "result_output":
            self._emit("lm_head", None)

    # -- our stages from held stems ----------------------------------------------------
    def _value(self, stage: str, layer: int | None) -> np.ndarray:
        if stage == "attn_scores":
            kq = self.held[f"kq-{layer}"] * np.float32(self.scale[layer])
            visible = np.tri(self.n, self.n_kv, self.pos0, dtype=bool)  # query i sees keys 0..pos0+i
            window = self.cfg.window(layer)
            if window:   # ... from pos0+i-window+1 on, in a sliding-window layer
                visible &= ~np.tri(self.n, self.n_kv, self.pos0 - window, dtype=bool)
            return np.where(visible[None], kq, np.float32(0)).astype(np.float32)
        spec = self.names[stage]
        stems = [s.format(N=layer) for s in spec.stems]
        missing = [s for s in stems if s not in self.held]
        if missing:
            raise EngineError(f"llama.cpp's graph has no node {missing[0]} for stage {stage}"
                              + ("" if layer is None else f" of layer {layer}"))
        arrays = [self.held[s] for s in stems]
        if spec.combine == "concat":
            return np.concatenate(arrays, axis=-1)
        return arrays[0]

    def _emit(self, stage: str, layer: int | None) -> None:
        if not self.plan.wants(stage, layer) or stage in UNEXPOSED:
            return
        value = self._value(stage, layer)
        self.sink.buffer(stage, layer, value.shape)[...] = value
        self.written.add((stage, layer))


def llama_plan(plan: TracePlan) -> TracePlan:
    """`plan` without the stages llama.cpp does not expose."""
    return TracePlan(tuple(s for s in plan.stages if s not in UNEXPOSED), plan.layers)


@contextmanager
def _aborted_on_failure(sink, progress: bool):
    """The forward's frame: on any failure the sink's unpublished files are aborted; the
    progress line is ended either way."""
    try:
        yield
    except BaseException:
        sink.abort()
        raise
    finally:
        if progress:
            sys.stderr.write("\n")


@contextmanager
def _removed_on_failure(out: Path, plan: TracePlan):
    """The capture's frame: a failure anywhere, publishing and the manifest too, removes every
    file the plan would write, so nothing is left that looks whole."""
    try:
        yield
    except BaseException:
        remove_capture(out, plan)
        raise


def _check_complete(plan: TracePlan, written, where: str = "") -> None:
    missing = [k for k in planned_keys(plan) if k not in written]
    if missing:
        stage, layer = missing[0]
        raise EngineError(f"llama.cpp's graph gave no value for stage {stage}"
                          + ("" if layer is None else f" of layer {layer}") + where)


def _write_manifest(out: Path, model_path, cfg, plan: TracePlan, prompt: str, ids, model_sha256, seconds: float,
                    written, with_stats: bool, **extra) -> dict:
    """Write manifest.json (atomically, last) for the published files `written`; return it."""
    from trace.llama_graph import llama_cpp_version
    entries = []
    for stage, layer, shape, path in written:
        entry = {"stage": stage, "layer": layer, "shape": list(shape), "path": path.relative_to(out).as_posix(),
                 "count": int(np.prod(shape))}
        if with_stats:
            values = np.asarray(read_aprt(path).values).reshape(shape)
            entry["stats"] = stage_stats(attention_rows(values) if stage in ATTENTION_STAGES
                                         else values.reshape(shape[0], -1))
        entries.append(entry)
    manifest = {
        "format": "APRT", "engine": "llama.cpp", "llama_cpp_python": llama_cpp_version(), "model": str(model_path),
        "sha256": model_sha256, "arch": cfg.arch, "n_layers": cfg.n_layers, "prompt": prompt,
        "token_ids": [int(i) for i in ids], "n_tokens": len(ids), "stages": list(plan.stages),
        "layers": list(plan.layers), "forward_seconds": round(seconds, 4), "files": entries,
        "derived": {s: DERIVED[s] for s in plan.stages if s in DERIVED},
        "unavailable": {s: UNEXPOSED[s] for s in model_stages(cfg.arch, cfg.qkv_bias) if s in UNEXPOSED},
        **extra,
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest


def capture_llama(model_path, ids: list[int], plan: TracePlan, out: Path, prompt: str, cfg,
                  with_stats: bool = False, model_sha256: str | None = None, progress: bool = False,
                  n_threads: int = 2) -> dict:
    """llama.cpp's forward over ids with `plan`'s stages written under `out` (which must exist); the manifest.

    Like trace.capture.capture: on any failure the files are removed and no manifest is written.
    """
    from trace.llama_graph import run_graph
    out = Path(out)
    plan = llama_plan(plan)
    if not ids:
        raise EngineError("the prompt has no tokens; nothing to trace")
    sink = TraceSink(out, plan, cfg.n_layers)
    col = _Collector(sink, plan, len(ids), cfg, progress)
    t0 = time.perf_counter()
    with _removed_on_failure(out, plan):
        with _aborted_on_failure(sink, progress):
            run_graph(model_path, ids, col.want, col.take, n_threads=n_threads)
            _check_complete(plan, col.written)
        seconds = time.perf_counter() - t0
        return _write_manifest(out, model_path, cfg, plan, prompt, ids, model_sha256, seconds, sink.finish(),
                               with_stats)


def capture_llama_generation(model_path, token_ids: list[int], n_prompt: int, plan: TracePlan, out: Path,
                             prompt: str, cfg, model_sha256: str | None = None, n_threads: int = 2,
                             progress: bool = False) -> dict:
    """llama.cpp decoding `token_ids` as a generation: `plan`'s stages of every forward under `out`; the manifest.

    llama.cpp evaluates ``token_ids[:n_prompt]`` in one llama_decode, then each later token in
    a llama_decode of its own, KV cache kept, in one context. Files (paths and headers as
    capture_llama's): per-token stages ``[T, dim]`` (row t from the forward that consumed
    ``token_ids[t]``), attn_scores / attn_softmax ``[heads, T, T]`` (row t over keys 0..t, zeros
    after), lm_head ``[T - n_prompt + 1, vocab]`` (row i: the logits at position n_prompt-1+i).
    The manifest has capture_llama's keys plus ``layout: "generation"``, ``prompt_tokens``
    (n_prompt) and ``generated_ids`` (``token_ids[n_prompt:]``); ``token_ids`` and ``n_tokens``
    cover the whole sequence. `out` must exist; on any failure (or interrupt) the files are
    removed and no manifest is written. ``progress`` reports each llama_decode on stderr.
    """
    from trace.llama_graph import LlamaGraph
    out = Path(out)
    plan = llama_plan(plan)
    ids = [int(i) for i in token_ids]
    n_tokens = len(ids)
    if not ids:
        raise EngineError("the sequence has no tokens; nothing to trace")
    if not 0 < n_prompt <= n_tokens:
        raise EngineError(f"the prompt must be 1..{n_tokens} of the {n_tokens} tokens, got {n_prompt}")
    if n_tokens > cfg.context:
        raise EngineError(f"the sequence has {n_tokens} tokens, which exceeds the model's context length "
                          f"{cfg.context}")
    bad = [layer for layer in plan.layers if not 0 <= layer < cfg.n_layers]
    if bad:
        raise EngineError(f"plan layer {bad[0]} is out of range: the model has {cfg.n_layers} layers")
    # forward k: (first position, tokens); forward 0 is the whole prompt
    forwards = [(0, ids[:n_prompt])] + [(t, ids[t:t + 1]) for t in range(n_prompt, n_tokens)]
    files = GenerationSink(out, plan, cfg, n_tokens, n_prompt)   # the same files our engine's generation writes
    col = _Collector(files, plan, n_prompt, cfg, False)
    t0 = time.perf_counter()
    with _removed_on_failure(out, plan):
        with _aborted_on_failure(files, progress):
            files.create()
            with LlamaGraph(model_path, n_tokens, col.want, col.take, n_threads=n_threads,
                            n_batch_tokens=n_prompt) as graph:
                for step, (pos0, chunk) in enumerate(forwards):
                    if progress:
                        sys.stderr.write(f"\rllama.cpp: step {step + 1}/{len(forwards)}")
                        sys.stderr.flush()
                    files.begin(pos0, len(chunk))
                    col.begin(pos0, len(chunk))
                    graph.decode(chunk, pos0)
                    _check_complete(plan, col.written, f" in llama_decode {step + 1} of {len(forwards)}")
        seconds = time.perf_counter() - t0
        return _write_manifest(out, model_path, cfg, plan, prompt, ids, model_sha256, seconds, files.finish(n_tokens),
                               False, layout="generation", prompt_tokens=n_prompt, generated_ids=ids[n_prompt:])
