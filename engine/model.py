"""Model description read from GGUF metadata (Config) and quantized weight views (Weights).

Everything is validated here, before any forward runs: architecture, tensor
presence, types, shapes and byte ranges. Weight matrices stay as read-only
views of the memory-mapped file in their GGML encoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.arch import ARCHS
from engine.errors import EngineError
from engine.gguf_reader import GGUFFile
from kernels import quants
from kernels.quants import type_name

SUPPORTED_ARCHS = tuple(ARCHS)
MATRIX_TYPES = quants.SUPPORTED      # every type in the kernels' registry
VECTOR_TYPES = (quants.F32, quants.F16)


@dataclass(frozen=True)
class Config:
    arch: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_rot: int
    rope_base: float
    rope_neox: bool
    eps: float
    vocab: int
    context: int
    qkv_bias: bool
    tied_output: bool
    sliding_window: int = 0       # keys a sliding-window layer's query sees (itself included); 0: none
    swa_pattern: int = 0          # layers il with il % swa_pattern < swa_pattern - 1 use the window
    rope_base_swa: float = 10000.0
    logit_softcap: float = 0.0    # logits = c * tanh(logits / c) if set
    rope_freq_scale: float = 1.0  # positions times this (linear RoPE scaling: 1 / rope.scaling.factor)
    rope_scale_swa: float = 1.0   # the same for the sliding-window layers

    def window(self, layer: int) -> int:
        """The attention window of a layer (0: every earlier position), as llama.cpp's
        set_swa_pattern lays the sliding-window layers out."""
        if self.sliding_window and self.swa_pattern and layer % self.swa_pattern < self.swa_pattern - 1:
            return self.sliding_window
        return 0

    def rope_base_of(self, layer: int) -> float:
        """The RoPE base of a layer: sliding-window layers have their own."""
        return self.rope_base_swa if self.window(layer) else self.rope_base

    def rope_scale_of(self, layer: int) -> float:
        """The RoPE frequency scale of a layer (llama.cpp's freq_scale): sliding-window layers have their own."""
        return self.rope_scale_swa if self.window(layer) else self.rope_freq_scale

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class QTensor:
    """A weight matrix [rows, cols] in its GGML encoding: raw bytes [rows, row_bytes]."""
    name: str
    data: np.ndarray
    qtype: int
    rows: int
    cols: int


@dataclass(frozen=True)
class Layer:
    attn_norm: np.ndarray
    wq: QTensor
    wk: QTensor
    wv: QTensor
    bq: np.ndarray | None
    bk: np.ndarray | None
    bv: np.ndarray | None
    wo: QTensor
    ffn_norm: np.ndarray
    w_gate: QTensor
    w_up: QTensor
    w_down: QTensor
    q_norm: np.ndarray | None = None          # [head_dim], architectures with Q/K norms
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # [dim], architectures with post-norms
    post_ffn_norm: np.ndarray | None = None


@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple
    output_norm: np.ndarray
    output: QTensor
    rope_freqs: np.ndarray | None = None      # [n_rot/2] Llama 3 frequency factors (each frequency / factor)


def _meta(md: dict, path: Path, key: str, kind, default=None):
    v = md.get(key, default)
    if v is None:
        raise EngineError(f"{path}: missing metadata key {key}")
    if kind is int and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    if kind is float and isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        return float(v)
    raise EngineError(f"{path}: metadata key {key} has the wrong type ({type(v).__name__}, expected {kind.__name__})")


def read_config(gf: GGUFFile) -> Config:
    """Build the Config from GGUF metadata, checking it is self-consistent."""
    md, path = gf.metadata, gf.path
    arch = md.get("general.architecture")
    if arch is None:
        raise EngineError(f"{path}: missing metadata key general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        shown = repr(arch[:80]) if isinstance(arch, str) else f"(a {type(arch).__name__}, not a string)"
        raise EngineError(f"{path}: unsupported architecture {shown} (supported: {', '.join(SUPPORTED_ARCHS)})")
    p = arch + "."
    n_layers = _meta(md, path, p + "block_count", int)
    dim = _meta(md, path, p + "embedding_length", int)
    ffn_dim = _meta(md, path, p + "feed_forward_length", int)
    n_heads = _meta(md, path, p + "attention.head_count", int)
    n_kv = _meta(md, path, p + "attention.head_count_kv", int, n_heads)
    for key, v in (("block_count", n_layers), ("embedding_length", dim), ("feed_forward_length", ffn_dim),
                   ("attention.head_count", n_heads), ("attention.head_count_kv", n_kv)):
        if not 0 < v < 1 << 20:
            raise EngineError(f"{path}: metadata {p}{key} = {v} is out of range")
    if n_heads % n_kv:
        raise EngineError(f"{path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    head_dim = _meta(md, path, p + "attention.key_length", int, dim // n_heads if dim % n_heads == 0 else 0)
    if not 0 < head_dim < 1 << 20 or head_dim % 2:
        raise EngineError(f"{path}: cannot derive an even head dimension from embedding_length {dim} "
                          f"and head_count {n_heads}")
    n_rot = _meta(md, path, p + "rope.dimension_count", int, head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise EngineError(f"{path}: rope.dimension_count {n_rot} must be even and at most the head dim {head_dim}")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = _meta(md, path, p + "vocab_size", int, len(tokens) if isinstance(tokens, list) else None)
    if not 0 < vocab < 1 << 24:
        raise EngineError(f"{path}: vocabulary size {vocab} is out of range")
    rope_base = _meta(md, path, p + "rope.freq_base", float, 10000.0)
    eps = _meta(md, path, p + "attention.layer_norm_rms_epsilon", float, 1e-5)
    context = _meta(md, path, p + "context_length", int, 2048)
    if not (math.isfinite(rope_base) and rope_base > 0):
        raise EngineError(f"{path}: metadata {p}rope.freq_base = {rope_base} must be a positive number")
    if not (math.isfinite(eps) and 0 <= eps < 1):
        raise EngineError(f"{path}: metadata {p}attention.layer_norm_rms_epsilon = {eps} is out of range [0, 1)")
    if context < 1:
        raise EngineError(f"{path}: metadata {p}context_length = {context} must be positive")
    emb = gf.tensors.get("token_embd.weight")
    traits = ARCHS[arch]
    freq_scale = _rope_freq_scale(md, path, p)
    for name in ("rope_factors_long.weight", "rope_factors_short.weight"):
        if name in gf.tensors:
            raise EngineError(f"{path}: unsupported RoPE scaling: tensor {name} (LongRoPE frequency factors)")
    if "rope_freqs.weight" in gf.tensors and not traits.rope_freqs:
        # llama.cpp creates the tensor for llama only; elsewhere it refuses the file (one tensor too many)
        raise EngineError(f"{path}: unsupported tensor rope_freqs.weight in a {arch} model "
                          "(RoPE frequency factors are a llama feature)")
    # llama and phi3 files may set attention.sliding_window: llama.cpp ignores it (engine.arch.Arch)
    window = _meta(md, path, p + "attention.sliding_window", int, 0) if traits.swa_pattern else 0
    if window < 0:
        raise EngineError(f"{path}: metadata {p}attention.sliding_window = {window} must not be negative")
    rope_base_swa = _meta(md, path, p + "rope.freq_base_swa", float, traits.rope_base_swa)
    softcap = _meta(md, path, p + "final_logit_softcapping", float, 0.0)
    if not (math.isfinite(rope_base_swa) and rope_base_swa > 0) or not (math.isfinite(softcap) and softcap >= 0):
        raise EngineError(f"{path}: metadata {p}rope.freq_base_swa or {p}final_logit_softcapping is out of range")
    return Config(
        arch=arch, n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, n_rot=n_rot,
        rope_base=rope_base,
        rope_neox=traits.rope_neox,
        eps=eps,
        vocab=vocab,
        context=context,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
        tied_output="output.weight" not in gf.tensors and emb is not None,
        sliding_window=window,
        swa_pattern=traits.swa_pattern if window else 0,
        rope_base_swa=rope_base_swa,
        logit_softcap=softcap,
        rope_freq_scale=freq_scale,
        rope_scale_swa=freq_scale if traits.rope_scale_swa is None else traits.rope_scale_swa,
    )


def _rope_freq_scale(md: dict, path: Path, p: str) -> float:
    """llama.cpp's freq_scale (llama_model_base::load_hparams, llama_context): the scaling type
    defaults to "linear", whose scale is 1 / rope.scaling.factor (or the older rope.scale_linear;
    absent or 0: 1); type "none" never scales. Other types (yarn, longrope, ...) we do not run."""
    key = p + "rope.scaling.type"
    scaling = md.get(key, "linear")
    if scaling not in ("none", "linear"):
        shown = repr(scaling[:40]) if isinstance(scaling, str) else f"(a {type(scaling).__name__})"
        raise EngineError(f"{path}: unsupported RoPE scaling type {shown} ({key}; supported: none, linear)")
    attn_factor = _meta(md, path, p + "rope.scaling.attn_factor", float, 1.0)
    if attn_factor != 1.0:
        raise EngineError(f"{path}: unsupported RoPE attention factor {attn_factor} ({p}rope.scaling.attn_factor)")
    fkey = p + "rope.scaling.factor" if p + "rope.scaling.factor" in md else p + "rope.scale_linear"
    factor = _meta(md, path, fkey, float, 0.0)
    if not (math.isfinite(factor) and factor >= 0):
        raise EngineError(f"{path}: metadata {fkey} = {factor} must not be negative")
    return 1.0 if scaling == "none" or factor == 0 else 1.0 / factor


class _Loader:
    """Looks tensors up by name and checks their type and shape."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf

    def _info(self, name: str, ne: tuple, types: tuple):
        info = self.gf.tensors.get(name)
        if info is None:
            raise EngineError(f"{self.gf.path}: missing tensor {name}")
        if info.ggml_type not in types:
            raise EngineError(f"{self.gf.path}: tensor {name} has unsupported type {type_name(info.ggml_type)} "
                              f"(supported here: {', '.join(type_name(t) for t in types)})")
        if tuple(info.ne) != ne:
            raise EngineError(f"{self.gf.path}: tensor {name} has shape {list(info.ne)}, "
                              f"expected {list(ne)} from the model config")
        return info

    def matrix(self, name: str, rows: int, cols: int) -> QTensor:
        info = self._info(name, (cols, rows), MATRIX_TYPES)
        return QTensor(name, self.gf.tensor_bytes(name), info.ggml_type, rows, cols)

    def split_matrix(self, name: str, parts: tuple, cols: int) -> list[QTensor]:
        """A fused matrix as one QTensor per part of its rows (`parts`: (label, rows) in order):
        row views of the memory-mapped tensor, no copy."""
        whole = self.matrix(name, sum(rows for _, rows in parts), cols)
        out, r0 = [], 0
        for label, rows in parts:
            out.append(QTensor(f"{name}[{label}]", whole.data[r0:r0 + rows], whole.qtype, rows, cols))
            r0 += rows
        return out

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self._info(name, (n,), VECTOR_TYPES)
        raw = self.gf.tensor_bytes(name).reshape(-1)
        dtype = np.float32 if info.ggml_type == quants.F32 else np.float16
        vec = raw.view(dtype).astype(np.float32)  # small: a norm weight or bias
        if not np.all(np.isfinite(vec)):
            raise EngineError(f"{self.gf.path}: tensor {name} holds NaN or Inf")
        return vec

    def optional_vector(self, name: str, n: int):
        return self.vector(name, n) if name in self.gf.tensors else None


def load_weights(gf: GGUFFile, cfg: Config) -> Weights:
    """Views of every weight the forward uses, validated against the config."""
    ld = _Loader(gf)
    traits = ARCHS[cfg.arch]
    layers = []
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        attn_norm = ld.vector(b + "attn_norm.weight", cfg.dim)   # first: a missing layer is named by it
        if traits.fused and b + "attn_qkv.weight" in gf.tensors:   # phi3 (llama.cpp also takes separate q/k/v)
            wq, wk, wv = ld.split_matrix(b + "attn_qkv.weight",
                                         (("q", cfg.q_dim), ("k", cfg.kv_dim), ("v", cfg.kv_dim)), cfg.dim)
        else:
            wq, wk, wv = (ld.matrix(b + "attn_q.weight", cfg.q_dim, cfg.dim),
                          ld.matrix(b + "attn_k.weight", cfg.kv_dim, cfg.dim),
                          ld.matrix(b + "attn_v.weight", cfg.kv_dim, cfg.dim))
        if traits.fused:   # ffn_up [2*ffn rows]: the gate half first (ggml_swiglu's silu half), then up
            w_gate, w_up = ld.split_matrix(b + "ffn_up.weight", (("gate", cfg.ffn_dim), ("up", cfg.ffn_dim)), cfg.dim)
        else:
            w_gate, w_up = ld.matrix(b + "ffn_gate.weight", cfg.ffn_dim, cfg.dim), \
                           ld.matrix(b + "ffn_up.weight", cfg.ffn_dim, cfg.dim)
        layers.append(Layer(
            attn_norm=attn_norm,
            wq=wq, wk=wk, wv=wv,
            bq=ld.vector(b + "attn_q.bias", cfg.q_dim) if cfg.qkv_bias else None,
            bk=ld.vector(b + "attn_k.bias", cfg.kv_dim) if cfg.qkv_bias else None,
            bv=ld.vector(b + "attn_v.bias", cfg.kv_dim) if cfg.qkv_bias else None,
            wo=ld.matrix(b + "attn_output.weight", cfg.dim, cfg.q_dim),
            ffn_norm=ld.vector(b + "ffn_norm.weight", cfg.dim),
            w_gate=w_gate, w_up=w_up,
            w_down=ld.matrix(b + "ffn_down.weight", cfg.dim, cfg.ffn_dim),
            q_norm=ld.vector(b + "attn_q_norm.weight", cfg.head_dim) if traits.qk_norm else None,
            k_norm=ld.vector(b + "attn_k_norm.weight", cfg.head_dim) if traits.qk_norm else None,
            post_attn_norm=ld.vector(b + "post_attention_norm.weight", cfg.dim) if traits.post_norms else None,
            post_ffn_norm=ld.vector(b + "post_ffw_norm.weight", cfg.dim) if traits.post_norms else None,
        ))
    token_embd = ld.matrix("token_embd.weight", cfg.vocab, cfg.dim)
    output = token_embd if cfg.tied_output else ld.matrix("output.weight", cfg.vocab, cfg.dim)
    rope_freqs = None
    if "rope_freqs.weight" in gf.tensors:   # only llama gets here (read_config)
        if gf.tensors["rope_freqs.weight"].ggml_type != quants.F32:   # llama.cpp: float32 only (ggml_rope_ext)
            raise EngineError(f"{gf.path}: tensor rope_freqs.weight has type "
                              f"{type_name(gf.tensors['rope_freqs.weight'].ggml_type)}, expected F32")
        rope_freqs = ld.vector("rope_freqs.weight", cfg.n_rot // 2)
        if not np.all(rope_freqs > 0):
            raise EngineError(f"{gf.path}: tensor rope_freqs.weight holds a factor that is not positive")
    return Weights(token_embd=token_embd, layers=tuple(layers),
                   output_norm=ld.vector("output_norm.weight", cfg.dim), output=output, rope_freqs=rope_freqs)


def support_problems(gf: GGUFFile) -> list[str]:
    """What keeps us from running a parsed GGUF file, one line each; empty if it runs.

    The architecture and every tensor type are checked on their own, so a file with several
    problems gets them all; the rest (metadata keys, tensor presence and shapes) is the
    first error loading the model would raise."""
    problems = []
    arch = gf.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        shown = repr(arch[:80]) if isinstance(arch, str) else "(missing)" if arch is None else "(not a string)"
        problems.append(f"unsupported architecture {shown} (supported: {', '.join(SUPPORTED_ARCHS)})")
    unsupported: dict[int, list[str]] = {}
    for name, info in gf.tensors.items():
        if info.ggml_type not in MATRIX_TYPES:
            unsupported.setdefault(info.ggml_type, []).append(name)
    for t, names in sorted(unsupported.items()):
        problems.append(f"unsupported tensor type {type_name(t)}: {len(names)} tensor{'s' if len(names) > 1 else ''}, "
                        f"e.g. {names[0]} (supported: {', '.join(type_name(t) for t in MATRIX_TYPES)})")
    if not problems:
        try:
            load_weights(gf, read_config(gf))
        except EngineError as e:
            prefix = f"{gf.path}: "
            problems.append(str(e)[len(prefix):] if str(e).startswith(prefix) else str(e))
    return problems


def open_model(path) -> tuple[GGUFFile, Config, Weights]:
    """Parse, configure and validate a GGUF model file."""
    gf = GGUFFile(path)
    cfg = read_config(gf)
    return gf, cfg, load_weights(gf, cfg)
