"""Tiny synthetic GGUF models written with gguf.GGUFWriter, for fast tests and bad-input tests.

The tokenizer is a real gpt2 byte-level BPE vocabulary (256 byte tokens, a few
merges, ChatML specials); weights are random, quantized by our own quantizer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize as gguf_quantize


def _byte_unicode():
    """gpt2's bytes -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tokenizer_vocab():
    bu = _byte_unicode()
    tokens = [bu[b] for b in range(256)]
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    types = [TokenType.NORMAL] * len(tokens)
    tokens += SPECIALS
    types += [TokenType.CONTROL] * len(SPECIALS)
    return tokens, types, merges


def _quantize(w: np.ndarray, qtype: int):
    """Encode float32 [rows, cols] as qtype bytes (or return it for float types)."""
    if qtype == GGMLQuantizationType.F32:
        return w.astype(np.float32), None
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16), None
    qt = GGMLQuantizationType(qtype)
    try:  # gguf's own reference quantizer where it has one (Q4_0, Q8_0, ...)
        return gguf_quantize(w, qt), qt
    except NotImplementedError:
        from kernels.quantize import quantize  # ours: Q4_K and friends
        return quantize(w, int(qtype)), qt


def write_tiny_model(path, arch: str = "qwen2", qtype: int = GGMLQuantizationType.Q4_K, n_layers: int = 2,
                     dim: int = 256, ffn: int = 512, n_heads: int = 4, n_kv: int = 2, seed: int = 0,
                     skip_tensors=(), overrides=None, extra_tensors=None, tied: bool | None = None) -> Path:
    """Write a small random model; `skip_tensors`/`overrides` let tests break it on purpose.

    The tensors are each architecture's as llama.cpp's load_arch_tensors asks for them:
    qwen2 has q/k/v biases; qwen3 per-head Q/K norms (attn_q_norm / attn_k_norm), gemma3 those
    and post-attention / post-FFN norms (set gemma3.attention.sliding_window in `overrides`); phi3 a fused
    attn_qkv (rows q, k, v) and a fused ffn_up of 2*ffn rows (gate first, then up) and no
    ffn_gate. `overrides` maps a GGUF value kind ("uint32", "float32", "string") to
    {key without the "<arch>." prefix: value}; `tied` (default: every arch but qwen2 and qwen3)
    leaves output.weight out."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tokenizer_vocab()
    vocab = len(tokens)
    w = GGUFWriter(str(path), arch)
    meta = {
        "block_count": n_layers, "context_length": 256, "embedding_length": dim,
        "feed_forward_length": ffn, "attention.head_count": n_heads, "attention.head_count_kv": n_kv,
    }
    meta.update((overrides or {}).get("uint32", {}))
    for k, v in meta.items():
        w.add_uint32(f"{arch}.{k}", v)
    floats = {"rope.freq_base": 10000.0, "attention.layer_norm_rms_epsilon": 1e-6}
    floats.update((overrides or {}).get("float32", {}))
    for k, v in floats.items():
        w.add_float32(f"{arch}.{k}", v)
    for k, v in (overrides or {}).get("string", {}).items():
        w.add_string(f"{arch}.{k}", v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    hd = dim // n_heads

    def mat(name, rows, cols, scale=0.08):
        if name in skip_tensors:
            return
        data, raw = _quantize((rng.standard_normal((rows, cols)) * scale).astype(np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=raw)

    def vec(name, n, base=1.0, scale=0.05):
        if name in skip_tensors:
            return
        w.add_tensor(name, (base + rng.standard_normal(n) * scale).astype(np.float32))

    mat("token_embd.weight", vocab, dim, 0.5)
    vec("output_norm.weight", dim)
    if (arch in ("qwen2", "qwen3")) if tied is None else not tied:
        mat("output.weight", vocab, dim)
    for i in range(n_layers):
        b = f"blk.{i}."
        vec(b + "attn_norm.weight", dim)
        if arch == "phi3":
            mat(b + "attn_qkv.weight", (n_heads + 2 * n_kv) * hd, dim)
        else:
            mat(b + "attn_q.weight", n_heads * hd, dim)
            mat(b + "attn_k.weight", n_kv * hd, dim)
            mat(b + "attn_v.weight", n_kv * hd, dim)
        if arch in ("qwen3", "gemma3"):
            vec(b + "attn_q_norm.weight", hd, 1.0, 0.2)
            vec(b + "attn_k_norm.weight", hd, 1.0, 0.2)
        if arch == "qwen2":
            vec(b + "attn_q.bias", n_heads * hd, 0.0, 0.1)
            vec(b + "attn_k.bias", n_kv * hd, 0.0, 0.1)
            vec(b + "attn_v.bias", n_kv * hd, 0.0, 0.1)
        mat(b + "attn_output.weight", dim, n_heads * hd)
        if arch == "gemma3":
            vec(b + "post_attention_norm.weight", dim)
            vec(b + "post_ffw_norm.weight", dim)
        vec(b + "ffn_norm.weight", dim)
        if arch == "phi3":
            mat(b + "ffn_up.weight", 2 * ffn, dim)
        else:
            mat(b + "ffn_gate.weight", ffn, dim)
            mat(b + "ffn_up.weight", ffn, dim)
        mat(b + "ffn_down.weight", dim, ffn)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
