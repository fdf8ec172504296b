"""A capture of llama.cpp's own forward, in our APRT layout, names and manifest.

``capture_llama`` decodes the token ids (tokenized by OUR tokenizer) with llama.cpp
(``trace.llama_graph.run_graph``), reads the graph nodes trace/llama_names.py maps to
our stages, and writes them through the same ``TraceSink`` our engine's capture uses,
so the files, headers and paths are identical and ``cli diff`` compares the two
captures directly. Values are held one layer at a time: when a layer's ``l_out-N``
arrives, that layer's stages are written in forward order and its nodes dropped.

Graph node -> dump stem (as in ../shared/reference/trace/*/): ``Qcur-N`` etc. by op
(``MUL_MAT`` -> ``Qcur-N.mul_mat``, ``ADD`` -> ``Qcur-N``, ``ROPE`` -> ``Qcur-N.rope``);
the attention output projection is ``attn_out-N`` in the llama graph and an unnamed
``node_K`` in the qwen2 graph, found by position: the first MUL_MAT after
``kqv_out-N``. Every other stem is the node's name. Layout: ggml ``ne[0]`` is the
fastest dimension (``ne=[dim, n_tok]`` -> ``[n_tok, dim]``; ROPE ``[hd, heads, n_tok]``
-> ``[n_tok, heads*hd]``); ``kq``/``kq_soft_max`` ``[n_kv_padded, n_q, heads]`` ->
``[heads, n_q, n_kv]`` trimmed to the ``n_tok`` real KV cells (a fresh context puts
positions 0..n-1 in cells 0..n-1; checked: the padded cells get probability 0).

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
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from trace.capture import ATTENTION_STAGES, MANIFEST, _write_json_atomic
from trace.aprt import read_aprt
from trace.llama_names import LLAMA_NAMES
from trace.plan import TracePlan
from trace.sink import TraceSink
from trace.stages import STAGES
from trace.stats import attention_rows, stage_stats

UNEXPOSED = {
    "ffn_silu": "llama.cpp never computes silu(gate) on its own (ggml fuses silu(gate)*up into one SWIGLU op, "
                "ffn_swigl); compare ffn_gate and ffn_swigl instead",
}
DERIVED = {
    "attn_scores": "kq-N (raw q.k products) times kq_soft_max-N's scale, masked entries set to 0",
}
_QKV = re.compile(r"([QKV])cur-([0-9]+)")
_LAYER = re.compile(r"(.+)-([0-9]+)")
_STEM_SUFFIX = {"MUL_MAT": ".mul_mat", "ADD": "", "ROPE": ".rope"}
# base names (without -N) of the nodes we read
_WANTED = {"embd", "result_norm", "result_output", "attn_norm", "kq", "kq_soft_max", "kqv_out", "attn_out",
           "ffn_inp", "ffn_norm", "ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out", "l_out"}


def unavailable_stages(stages) -> list[str]:
    return [s for s in stages if s in UNEXPOSED]


def check_stages(stages_text: str, stages) -> tuple[str, ...]:
    """The stages a llama.cpp capture writes; naming a stage llama.cpp does not expose is an error."""
    from trace.capture import _named
    for s in stages:
        if s in UNEXPOSED and _named(stages_text, s):
            raise EngineError(f"stage {s} is not available from llama.cpp: {UNEXPOSED[s]}")
    return tuple(s for s in stages if s not in UNEXPOSED)


class _Collector:
    """Maps graph nodes to dump stems, keeps the current layer's, and writes finished stages to the sink."""

    def __init__(self, sink, plan: TracePlan, n_tok: int, n_layers: int, progress: bool):
        self.sink, self.plan, self.n, self.n_layers, self.progress = sink, plan, n_tok, n_layers, progress
        self.pending: dict[int, str] = {}  # tensor identity (name, op, ne) in ask order -> stem
        self.after_kqv: int | None = None
        self.held: dict[str, np.ndarray] = {}
        self.scale: dict[int, float] = {}
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
        if base in _WANTED and base != "attn_out":
            return name
        return None

    def want(self, name: str, op: str) -> bool:
        s = self.stem(name, op)
        self._next = s
        return s is not None

    def take(self, node) -> None:
        stem = self._next
        v = node.values
        if stem.startswith(("kq-", "kq_soft_max-")):
            heads, n_q, n_kv = v.shape[1:]
            if n_q != self.n or n_kv < self.n:
                raise EngineError(f"llama.cpp node {node.name} has shape {node.ne}; expected {self.n} queries")
            if stem.startswith("kq_soft_max-"):
                if np.any(v[0, :, :, self.n:] != 0):
                    raise EngineError(f"{node.name}: probability on KV cells beyond the prompt; the cache is not "
                                      "laid out as positions 0..n-1")
                self.scale[int(stem.split("-")[1])] = struct.unpack("<f", struct.pack("<i", node.op_params[0]))[0]
            v = v[0, :, :, :self.n]
        elif stem == "result_output":
            v = v.reshape(self.n, -1)[-1:]
        else:
            v = v.reshape(self.n, -1)
        self.held[stem] = np.ascontiguousarray(v, dtype=np.float32)
        if stem == "embd":
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
        elif stem == "result_output":
            self._emit("final_norm", None)
            self._emit("lm_head", None)

    # -- our stages from held stems ----------------------------------------------------
    def _value(self, stage: str, layer: int | None) -> np.ndarray:
        if stage == "attn_scores":
            kq = self.held[f"kq-{layer}"] * np.float32(self.scale[layer])
            return np.where(np.tri(self.n, dtype=bool)[None], kq, np.float32(0)).astype(np.float32)
        spec = LLAMA_NAMES[stage]
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


def capture_llama(model_path, ids: list[int], plan: TracePlan, out: Path, prompt: str, cfg,
                  with_stats: bool = False, model_sha256: str | None = None, progress: bool = False,
                  n_threads: int = 2) -> dict:
    """llama.cpp's forward over ids with `plan`'s stages written under `out` (which must exist); the manifest.

    Like trace.capture.capture: on any failure the files are removed and no manifest is written.
    """
    from trace.llama_graph import llama_cpp_version, run_graph
    out = Path(out)
    stages = tuple(s for s in plan.stages if s not in UNEXPOSED)
    plan = TracePlan(stages, plan.layers)
    if not ids:
        raise EngineError("the prompt has no tokens; nothing to trace")
    sink = TraceSink(out, plan, cfg.n_layers)
    col = _Collector(sink, plan, len(ids), cfg.n_layers, progress)
    t0 = time.perf_counter()
    try:
        run_graph(model_path, ids, col.want, col.take, n_threads=n_threads)
        from trace.capture import planned_keys
        missing = [k for k in planned_keys(plan) if k not in col.written]
        if missing:
            stage, layer = missing[0]
            raise EngineError(f"llama.cpp's graph gave no value for stage {stage}"
                              + ("" if layer is None else f" of layer {layer}"))
    except BaseException:
        sink.abort()
        raise
    finally:
        if progress:
            sys.stderr.write("\n")
    seconds = time.perf_counter() - t0
    entries = []
    for stage, layer, shape, path in sink.finish():
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
        "token_ids": [int(i) for i in ids], "n_tokens": len(ids), "stages": list(stages),
        "layers": list(plan.layers), "forward_seconds": round(seconds, 4), "files": entries,
        "derived": {s: DERIVED[s] for s in stages if s in DERIVED},
        "unavailable": {s: UNEXPOSED[s] for s in STAGES if s in UNEXPOSED},
    }
    _write_json_atomic(out / MANIFEST, manifest)
    return manifest
