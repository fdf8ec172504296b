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

from engine.errors import EngineError
from engine.gguf_reader import GGUFFile
from kernels import quants
from kernels.quants import type_name

SUPPORTED_ARCHS = ("qwen2", "llama")
MATRIX_TYPES = (quants.F32, quants.F16, quants.Q4_1, quants.Q5_0, quants.Q8_0, quants.Q4_K, quants.Q6_K)
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


@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple
    output_norm: np.ndarray
    output: QTensor


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
    return Config(
        arch=arch, n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, n_rot=n_rot,
        rope_base=rope_base,
        rope_neox=(arch == "qwen2"),
        eps=eps,
        vocab=vocab,
        context=context,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
        tied_output="output.weight" not in gf.tensors and emb is not None,
    )


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
    layers = []
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        layers.append(Layer(
            attn_norm=ld.vector(b + "attn_norm.weight", cfg.dim),
            wq=ld.matrix(b + "attn_q.weight", cfg.q_dim, cfg.dim),
            wk=ld.matrix(b + "attn_k.weight", cfg.kv_dim, cfg.dim),
            wv=ld.matrix(b + "attn_v.weight", cfg.kv_dim, cfg.dim),
            bq=ld.vector(b + "attn_q.bias", cfg.q_dim) if cfg.qkv_bias else None,
            bk=ld.vector(b + "attn_k.bias", cfg.kv_dim) if cfg.qkv_bias else None,
            bv=ld.vector(b + "attn_v.bias", cfg.kv_dim) if cfg.qkv_bias else None,
            wo=ld.matrix(b + "attn_output.weight", cfg.dim, cfg.q_dim),
            ffn_norm=ld.vector(b + "ffn_norm.weight", cfg.dim),
            w_gate=ld.matrix(b + "ffn_gate.weight", cfg.ffn_dim, cfg.dim),
            w_up=ld.matrix(b + "ffn_up.weight", cfg.ffn_dim, cfg.dim),
            w_down=ld.matrix(b + "ffn_down.weight", cfg.dim, cfg.ffn_dim),
        ))
    token_embd = ld.matrix("token_embd.weight", cfg.vocab, cfg.dim)
    output = token_embd if cfg.tied_output else ld.matrix("output.weight", cfg.vocab, cfg.dim)
    return Weights(token_embd=token_embd, layers=tuple(layers),
                   output_norm=ld.vector("output_norm.weight", cfg.dim), output=output)


def open_model(path) -> tuple[GGUFFile, Config, Weights]:
    """Parse, configure and validate a GGUF model file."""
    gf = GGUFFile(path)
    cfg = read_config(gf)
    return gf, cfg, load_weights(gf, cfg)
