"""What each supported architecture's layer computes: one description per architecture.

The forward reads these traits; the stage list of a model (what `trace`, `diff`, `bisect`
and the hooks accept) is derived from them here, once. Facts come from llama.cpp's graph
for the architecture (src/models/*.cpp, llama-model.cpp's hyperparameters), which is what
"correct" means for us.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """One architecture's layer.

    activation: the gated FFN's nonlinearity, "silu" (SwiGLU) or "gelu" (GeGLU, tanh form).
    rope_neox: rotate the two halves of each head (NeoX) rather than adjacent pairs.
    qk_norm: an RMSNorm over each head of Q and of K (attn_q_norm / attn_k_norm), before RoPE.
    post_norms: an RMSNorm on the attention output and on the FFN output, before each residual
        add (post_attention_norm / post_ffw_norm).
    embed_scale: the embeddings are multiplied by sqrt(dim) before the first layer.
    swa_pattern: when the file sets `<arch>.attention.sliding_window`, every layer but the last
        of each group of this many uses the window (llama.cpp's set_swa_pattern); 0: the
        architecture has no sliding window and the key, if present, is ignored. llama.cpp
        0.3.36 ignores it on llama files (llama_model_llama::load_arch_hparams never reads it
        and its graph builds the plain KV-cache attention input, so Mistral-style files
        converted as "llama" run with full attention) and on phi3 files
        (llama_model_phi3::load_arch_hparams reads it, logs "Phi SWA is currently disabled"
        and sets swa_type NONE, n_swa 0): both measured in tests/test_synthetic_archs.py.
    rope_base_swa: the RoPE base of the sliding-window layers (llama.cpp's
        rope_freq_base_train_swa), unless the file sets `<arch>.rope.freq_base_swa`.
    rope_scale_swa: the RoPE frequency scale of the sliding-window layers (llama.cpp's
        rope_freq_scale_train_swa); None: the file's own (1 / rope.scaling.factor).
    rope_freqs: the architecture takes Llama 3's per-pair frequency factors (the tensor
        rope_freqs.weight, [n_rot/2]: each rotary frequency is divided by its factor, ggml's
        rope with freq_factors); llama.cpp loads it for llama only (load_arch_tensors).
    fused: Q, K and V come as one matrix attn_qkv (rows q, then k, then v: build_qkv's views)
        and gate and up as one ffn_up of 2*ffn rows, gate first (LLM_FFN_SWIGLU with
        ggml_swiglu: silu of the first half times the second); the loader splits them into
        row views, so the forward and the stages are the unfused ones.
    """
    name: str
    activation: str = "silu"
    rope_neox: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    swa_pattern: int = 0
    rope_base_swa: float = 10000.0
    rope_scale_swa: float | None = None
    rope_freqs: bool = False
    fused: bool = False


ARCHS = {a.name: a for a in (
    Arch("llama", rope_freqs=True),
    Arch("qwen2", rope_neox=True),
    # llama.cpp's qwen3 graph (src/models/qwen3.cpp): Q/K RMS norms per head before RoPE, no
    # biases, SwiGLU; LLAMA_ROPE_TYPE_NEOX (llama_model_rope_type)
    Arch("qwen3", rope_neox=True, qk_norm=True),
    # src/models/phi3.cpp: fused QKV and gate-up, NeoX RoPE; Q is scaled by 1/sqrt(head_dim)
    # before the attention (kq_scale 1), the same product as ours
    Arch("phi3", rope_neox=True, fused=True),
    Arch("gemma3", activation="gelu", rope_neox=True, qk_norm=True, post_norms=True, embed_scale=True,
         swa_pattern=6, rope_scale_swa=1.0),
)}

# Every stage any architecture has, in forward order, with the trait that decides whether a
# model has it (None: every model). The names are our hook points (see DESIGN.md).
_STAGES = (
    ("embedding", None), ("attn_norm", None), ("qkv_matmul", None), ("qkv_bias", "qkv_bias"),
    ("q_norm", "qk_norm"), ("k_norm", "qk_norm"), ("q_post_rope", None), ("k_post_rope", None),
    ("attn_scores", None), ("attn_softmax", None), ("attention", None), ("attn_out", None),
    ("post_attn_norm", "post_norms"), ("post_attn_residual", None), ("ffn_norm", None),
    ("ffn_gate", None), ("ffn_up", None), ("ffn_silu", "silu"), ("ffn_swigl", "silu"),
    ("ffn_gelu", "gelu"), ("ffn_geglu", "gelu"), ("ffn_out", None), ("post_ffn_norm", "post_norms"),
    ("post_ffn_residual", None), ("final_norm", None), ("lm_head", None),
)
ALL_STAGES = tuple(name for name, _ in _STAGES)
# the activation stages of each activation: (nonlinearity alone, gated product)
ACTIVATION_STAGES = {"silu": ("ffn_silu", "ffn_swigl"), "gelu": ("ffn_gelu", "ffn_geglu")}


def _has(trait: str | None, arch: Arch, qkv_bias: bool) -> bool:
    if trait is None:
        return True
    if trait == "qkv_bias":
        return qkv_bias
    if trait in ACTIVATION_STAGES:
        return arch.activation == trait
    return getattr(arch, trait)


def model_stages(arch_name: str, qkv_bias: bool) -> tuple[str, ...]:
    """The stages a model of this architecture computes, in forward order."""
    arch = ARCHS[arch_name]
    return tuple(name for name, trait in _STAGES if _has(trait, arch, qkv_bias))


def stage_absent_reason(stage: str, arch_name: str, qkv_bias: bool) -> str:
    """Why a model of this architecture has no such stage (for one clear error line)."""
    trait = dict(_STAGES)[stage]
    if trait == "qkv_bias":
        return "it has no q/k/v bias"
    if trait in ACTIVATION_STAGES:
        return f"its FFN activation is {ARCHS[arch_name].activation}: its stages are " + \
               ", ".join(ACTIVATION_STAGES[ARCHS[arch_name].activation])
    return {"qk_norm": "it has no Q/K norms", "post_norms": "it has no post-attention/FFN norms"}[trait]
