"""Our stage names <-> llama.cpp's graph tensor names, and loading llama.cpp dumps in our layout.

llama.cpp names the nodes of its compute graph (``ggml_tensor.name``); a ``cb_eval``
scheduler callback sees each node as it is computed. The reference dumps in
``../shared/reference/trace/<model>/`` hold those nodes as ``<stem>.npy`` files,
float32 ``[n_tokens, dim]`` (ggml ``ne=[dim, n_tok]`` read row-major), except
``kq_soft_max-N`` which is ``[n_head, n_query, n_key]`` over the real KV cells only.
Several graph nodes share a name (``Qcur-N`` is the matmul, the bias add and the RoPE
output), so the dump's file stems add a suffix: ``Qcur-N.mul_mat`` (before bias),
``Qcur-N`` (after bias), ``Qcur-N.rope``.

The map, for layer N (file stems of the dump; ``{N}`` is the layer):

========================  ===========================================================
our stage                 llama.cpp (qwen2 / llama graph)
========================  ===========================================================
embedding                 ``embd`` (GET_ROWS)
attn_norm                 ``attn_norm-N`` (rms_norm * weight)
qkv_matmul                concat(``Qcur-N.mul_mat``, ``Kcur-N.mul_mat``, ``Vcur-N.mul_mat``) along dim
qkv_bias                  concat(``Qcur-N``, ``Kcur-N``, ``Vcur-N``) (after the bias ADD; qwen2 only)
q_norm / k_norm           ``Qcur_normed-N`` / ``Kcur_normed-N`` (gemma3)
q_post_rope               ``Qcur-N.rope`` ([n_tok, n_head*head_dim], head-major like ours)
k_post_rope               ``Kcur-N.rope``
attn_scores               none: llama.cpp's ``kq-N`` is not dumped (and is scaled/masked in place)
attn_softmax              ``kq_soft_max-N`` ([n_head, n_query, n_key], same as ours for pos 0)
attention                 ``kqv_out-N`` (heads concatenated, before the output projection)
attn_out                  ``attn_out-N`` (an unnamed ``node_K`` MUL_MAT in llama.cpp's qwen2 graph)
post_attn_norm            ``attn_post_norm-N`` (gemma3)
post_attn_residual        ``ffn_inp-N``
ffn_norm                  ``ffn_norm-N``
ffn_gate                  ``ffn_gate-N``
ffn_up                    ``ffn_up-N``
ffn_silu                  none: ggml fuses it into SWIGLU; derived as silu(``ffn_gate-N``)
ffn_swigl                 ``ffn_swiglu-N`` (GLU:SWIGLU)
ffn_gelu                  none: ggml fuses it into GEGLU (gemma3)
ffn_geglu                 ``ffn_geglu-N`` (GLU:GEGLU, gemma3)
ffn_out                   ``ffn_out-N``
post_ffn_norm             ``ffn_post_norm-N`` (gemma3)
post_ffn_residual         ``l_out-N`` (alias ``layer_output``)
final_norm                ``result_norm``
lm_head                   last row of ``result_output`` (a prefill trace holds the last position only; a
                          generation trace one row per forward, see trace.llama_capture)
========================  ===========================================================

llama.cpp's ``norm-N`` (``norm-N.attn`` / ``norm-N.ffn`` in the dump) and ``norm``
(``norm.final``) are the RMS norms before the weight multiply; we have no such stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trace.stages import ALIASES, STAGE_INDEX, WHOLE_MODEL_STAGES


@dataclass(frozen=True)
class LlamaName:
    """How to build our stage from llama.cpp dump files.

    ``stems``: file-stem templates (``{N}`` = layer). ``combine``: ``"one"`` (the single
    file as is), ``"concat"`` (the files side by side along the last axis), ``"last_row"``
    (the last token's row, kept 2-D), ``"silu"`` (silu of the single file: a derived
    value, not a node llama.cpp computes on its own).
    """

    stems: tuple[str, ...]
    combine: str = "one"
    note: str = ""

    @property
    def derived(self) -> bool:
        return self.combine == "silu"


LLAMA_NAMES: dict[str, LlamaName | None] = {
    "embedding": LlamaName(("embd",)),
    "attn_norm": LlamaName(("attn_norm-{N}",)),
    "qkv_matmul": LlamaName(("Qcur-{N}.mul_mat", "Kcur-{N}.mul_mat", "Vcur-{N}.mul_mat"), "concat"),
    "qkv_bias": LlamaName(("Qcur-{N}", "Kcur-{N}", "Vcur-{N}"), "concat", "after the bias ADD (qwen2)"),
    "q_norm": LlamaName(("Qcur_normed-{N}",)),
    "k_norm": LlamaName(("Kcur_normed-{N}",)),
    "q_post_rope": LlamaName(("Qcur-{N}.rope",)),
    "k_post_rope": LlamaName(("Kcur-{N}.rope",)),
    "attn_scores": None,
    "attn_softmax": LlamaName(("kq_soft_max-{N}",)),
    "attention": LlamaName(("kqv_out-{N}",)),
    "attn_out": LlamaName(("attn_out-{N}",), note="llama.cpp leaves this node unnamed (node_K)"),
    "post_attn_norm": LlamaName(("attn_post_norm-{N}",)),
    "post_attn_residual": LlamaName(("ffn_inp-{N}",)),
    "ffn_norm": LlamaName(("ffn_norm-{N}",)),
    "ffn_gate": LlamaName(("ffn_gate-{N}",)),
    "ffn_up": LlamaName(("ffn_up-{N}",)),
    "ffn_silu": LlamaName(("ffn_gate-{N}",), "silu", "derived: ggml fuses silu into SWIGLU"),
    "ffn_swigl": LlamaName(("ffn_swiglu-{N}",)),
    "ffn_gelu": None,
    "ffn_geglu": LlamaName(("ffn_geglu-{N}",)),
    "ffn_out": LlamaName(("ffn_out-{N}",)),
    "post_ffn_norm": LlamaName(("ffn_post_norm-{N}",)),
    "post_ffn_residual": LlamaName(("l_out-{N}",)),
    "final_norm": LlamaName(("result_norm",)),
    "lm_head": LlamaName(("result_output",), "last_row"),
}
assert set(LLAMA_NAMES) == set(STAGE_INDEX)
# Where an architecture's llama.cpp graph names a stage differently (src/models/<arch>.cpp).
ARCH_NAMES: dict[str, dict[str, LlamaName]] = {
    "gemma3": {"embedding": LlamaName(("inp_scaled",), note="the embeddings times sqrt(dim)"),
               "post_attn_residual": LlamaName(("sa_out-{N}",))},
}


def names_for(arch: str) -> dict[str, LlamaName | None]:
    """LLAMA_NAMES as llama.cpp's graph of this architecture names the stages."""
    return {**LLAMA_NAMES, **ARCH_NAMES.get(arch, {})}


def llama_stems(stage: str, layer: int | None) -> tuple[str, ...]:
    """The dump file stems our (stage, layer) is built from; () when llama.cpp has no counterpart."""
    stage = ALIASES.get(stage, stage)
    if stage not in LLAMA_NAMES:
        raise ValueError(f"unknown stage {stage!r}")
    spec = LLAMA_NAMES[stage]
    if spec is None:
        return ()
    if (stage in WHOLE_MODEL_STAGES) != (layer is None):
        raise ValueError(f"{stage}: layer must be {'None' if stage in WHOLE_MODEL_STAGES else 'given'}, got {layer!r}")
    return tuple(s.format(N=layer) for s in spec.stems)


def our_stage(stem: str) -> tuple[str, int | None] | None:
    """The (stage, layer) a dump file stem corresponds to directly (not via concat or derivation).

    ``"ffn_swiglu-3"`` -> ``("ffn_swigl", 3)``; ``"embd"`` -> ``("embedding", None)``;
    ``"Qcur-0.mul_mat"`` (one third of qkv_matmul) and unknown names -> None.
    """
    for stage, spec in LLAMA_NAMES.items():
        if spec is None or spec.combine != "one":
            continue
        template = spec.stems[0]
        if "{N}" not in template:
            if stem == template:
                return stage, None
            continue
        head, tail = template.split("{N}")
        if stem.startswith(head) and stem.endswith(tail):
            middle = stem[len(head):len(stem) - len(tail)]
            if middle.isdigit():
                return stage, int(middle)
    return None


def load_llama(ref_dir, stage: str, layer: int | None) -> np.ndarray | None:
    """llama.cpp's value of our (stage, layer), float32 in our layout; None if it has no counterpart.

    Raises FileNotFoundError when the dump lacks a needed file (e.g. layers beyond
    0-3 are only dumped as ``l_out-N``).
    """
    stems = llama_stems(stage, layer)
    if not stems:
        return None
    spec = LLAMA_NAMES[ALIASES.get(stage, stage)]
    arrays = [np.load(Path(ref_dir) / f"{s}.npy") for s in stems]
    if spec.combine == "concat":
        return np.concatenate(arrays, axis=-1).astype(np.float32)
    (a,) = arrays
    if spec.combine == "last_row":
        return a[-1:].astype(np.float32)
    if spec.combine == "silu":
        g = a.astype(np.float64)
        return (g / (1.0 + np.exp(-g))).astype(np.float32)
    return a.astype(np.float32)
