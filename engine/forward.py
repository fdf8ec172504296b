"""The transformer forward: one function over a loaded model and a session's run state.

Every stage's values are computed into `sink.buffer(stage, layer, shape)`, so a
trace sink can hand out memory-mapped file windows and capture them with no copy.
"""
from __future__ import annotations

import numpy as np

from engine import failpoints
from engine.arch import ACTIVATION_STAGES, ARCHS
from engine.errors import EngineError
from engine.model import Config, Weights
from kernels.attention import attend, attention, softmax_causal, store_kv
from kernels import elementwise, norm
from kernels import rope as rope_mod
from kernels.matmul import Int8Activations, MatmulGroup, get_rows, matmul_group
from kernels.rope import rope_inv_freq


class LayerMatmuls:
    """One layer's matmuls by shared input: q/k/v, the output projection, gate/up, down."""

    MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

    def __init__(self, layer, exact: bool, model_types=()):
        """model_types: the GGML types of all the model's matrices, so every group's kernel is
        compiled once for all of them (kernels.matmul.Int8Group)."""
        group = lambda *ws: MatmulGroup([(w.data, w.qtype) for w in ws], exact, compile_types=model_types)  # noqa: E731
        self.qkv = group(layer.wq, layer.wk, layer.wv)
        self.wo = group(layer.wo)
        self.gate_up = group(layer.w_gate, layer.w_up)
        self.down = group(layer.w_down)


class Model:
    """Config + Weights + the small derived constants the forward needs.

    By default the forward rounds as llama.cpp does, which is what keeps its logits
    close to llama.cpp's (tests/test_parity_llamacpp.py): every matmul against a type with
    an integer path runs on int8 activations (ggml's Q8_K and Q8_0 paths; which kernel runs
    is kernels.matmul.MatmulGroup's choice), and K/V are rounded to float16 as they enter
    the cache (llama.cpp's f16 KV cache). In activations with outliers (repeated text drives some channels into the
    thousands) that rounding is not noise but a systematic shift, and a float32
    forward of such prompts ends up further from llama.cpp than the int8 one. The
    one exception is a prompt's lm_head, in float32 (see MatmulGroup).

    exact=True keeps every matmul in float32 (each weight dequantized exactly) and
    K/V in float32, and sums attention scores in float64 (see kernels.attention), for
    stage-by-stage comparison with a float reference."""

    def __init__(self, cfg: Config, weights: Weights, exact: bool = False):
        self.cfg = cfg
        self.weights = weights
        self.exact = exact
        model_types = frozenset([getattr(layer, m).qtype for layer in weights.layers for m in LayerMatmuls.MATRICES]
                                + [weights.output.qtype])
        self.matmuls = [LayerMatmuls(layer, exact, model_types) for layer in weights.layers]
        self.output = MatmulGroup([(weights.output.data, weights.output.qtype)], exact, float_prompts=True,
                                  compile_types=model_types)
        self.arch = ARCHS[cfg.arch]
        # the rotary frequencies of each layer: base^(-2i/n_rot), times the linear scale (llama.cpp's
        # freq_scale: positions / rope.scaling.factor), over Llama 3's per-pair factors (rope_freqs.weight:
        # ggml's rope divides each theta by freq_factors[i])
        self.inv_freq = [rope_inv_freq(cfg.n_rot, cfg.rope_base_of(li)) * cfg.rope_scale_of(li)
                         for li in range(cfg.n_layers)]
        if weights.rope_freqs is not None:
            self.inv_freq = [f / weights.rope_freqs.astype(np.float64) for f in self.inv_freq]
        self.attn_scale = 1.0 / np.sqrt(cfg.head_dim)
        # gemma: embeddings times sqrt(dim), in float32 as ggml_scale does
        self.embed_scale = np.float32(np.sqrt(np.float32(cfg.dim))) if self.arch.embed_scale else None
        self.act_stages = ACTIVATION_STAGES[self.arch.activation]
        # q, k and v biases side by side, matching the qkv_matmul layout
        self.qkv_bias = [np.concatenate([l.bq, l.bk, l.bv]) if cfg.qkv_bias else None
                         for l in weights.layers]


# One row (decode): the elementwise kernels run serially. A parallel launch costs more than their
# work, and on a busy machine it waits for a descheduled worker thread (measured: ~4 ms per launch).
def rmsnorm(x, w, eps, out):
    (norm.rmsnorm_serial if x.shape[0] == 1 else norm.rmsnorm)(x, w, eps, out)


def rmsnorm_heads(x, w, eps, n_heads, out):
    (norm.rmsnorm_heads_serial if x.shape[0] == 1 else norm.rmsnorm_heads)(x, w, eps, n_heads, out)


def add(a, b, out):
    (elementwise.add_serial if a.shape[0] == 1 else elementwise.add)(a, b, out)


def add_bias(x, b, out):
    (elementwise.add_bias_serial if x.shape[0] == 1 else elementwise.add_bias)(x, b, out)


def rope(x, positions, n_heads, head_dim, n_rot, inv_freq, neox, out):
    (rope_mod.rope_serial if x.shape[0] == 1 else rope_mod.rope)(x, positions, n_heads, head_dim, n_rot,
                                                                   inv_freq, neox, out)


def silu_and_swiglu(gate, up, silu_out, swiglu_out):
    (elementwise.silu_and_swiglu_serial if gate.shape[0] == 1 else elementwise.silu_and_swiglu)(
        gate, up, silu_out, swiglu_out)


def gelu_and_geglu(gate, up, gelu_out, geglu_out, f16):
    (elementwise.gelu_and_geglu_serial if gate.shape[0] == 1 else elementwise.gelu_and_geglu)(
        gate, up, gelu_out, geglu_out, f16)


def softcap(logits, cap):
    """logits = cap * tanh(logits / cap), in place (final logit soft-capping; nothing allocated)."""
    if cap:
        np.divide(logits, np.float32(cap), out=logits)
        np.tanh(logits, out=logits)
        np.multiply(logits, np.float32(cap), out=logits)


def _post_norm(sink, hk, stage: str, li: int, x, w, eps):
    """A post-norm stage (gemma: the attention or FFN output RMS-normed before its residual add)."""
    normed = sink.buffer(stage, li, x.shape)
    rmsnorm(x, w, eps, normed)
    if hk:
        hk(stage, li, normed)
    return normed


def _mm(int8: Int8Activations, x, group: MatmulGroup, *outs, prompt=None):
    """outs[i] = x @ W_i.T for the group's matrices; `int8` holds the session's int8 buffers;
    `prompt` as matmul_group's (the lm_head of a prompt's forward reads one row)."""
    matmul_group(group, int8, x, list(outs), prompt=prompt)
    if failpoints.active("quant.matmul_scale"):
        for out in outs:
            out *= np.float32(1.01)


class Hooks:
    """Functions run on stages' values once they are final, before anything downstream reads
    them (TransformerLens's hook points; our stage names play their role).

    ``{(stage, layer): fn}`` (layer None, or the bare stage name, for embedding, final_norm and
    lm_head); ``fn(values, positions)`` gets the stage's buffer ([n, dim]; attention stages
    [heads, n, keys]) and the absolute positions of its rows, and may change ``values`` in place
    (patch, steer, ablate) or only read it. A hook on a stage that a fused kernel computes
    (ffn_silu with ffn_swigl; attn_scores and attn_softmax with the attention output) makes the
    forward compute what follows from the hooked values. A hook that never fires (no such stage
    or layer in this model) is an error at the end of the forward."""

    def __init__(self, hooks: dict):
        self.fns = {}
        for key, fn in hooks.items():
            stage, layer = (key, None) if isinstance(key, str) else key
            if not callable(fn):
                raise EngineError(f"hook for {stage} layer {layer} is not callable")
            self.fns[stage, None if layer is None else int(layer)] = fn
        self.stages = {stage for stage, _ in self.fns}
        self.fired: set = set()
        self.positions = np.zeros(0, np.int64)

    def wants(self, stage: str, layer: int | None) -> bool:
        return (stage, layer) in self.fns

    def __call__(self, stage: str, layer: int | None, values: np.ndarray, positions=None) -> None:
        fn = self.fns.get((stage, layer))
        if fn is not None:
            self.fired.add((stage, layer))
            if failpoints.active("hooks.copy"):
                values = values.copy()
            fn(values, self.positions if positions is None else positions)

    def check_fired(self) -> None:
        missed = sorted(set(self.fns) - self.fired, key=str)
        if missed:
            stage, layer = missed[0]
            raise EngineError(f"hook on stage {stage}" + ("" if layer is None else f" layer {layer}")
                              + " never ran: this model's forward has no such stage or layer")


def forward(model: Model, session, tokens: np.ndarray, pos0: int, sink=None, all_logits: bool = False,
            hooks: Hooks | None = None):
    """Run tokens (int array [n]) at positions pos0..pos0+n-1 of `session`; return logits.

    The session's KV cache must hold positions 0..pos0-1; the forward writes positions
    pos0..pos0+n-1 into it. Stages are computed into `sink` (default: the session's); `hooks`
    (a Hooks) run on stages as they become final. Returns the lm_head buffer: [n, vocab] if
    all_logits else [1, vocab] (last position only).
    """
    cfg, w = model.cfg, model.weights
    kv, int8 = session.kv, session.int8
    sink = session.sink if sink is None else sink
    n = len(tokens)
    if n == 0:
        raise EngineError("forward: no tokens")
    if pos0 + n > kv.n_ctx:
        raise EngineError(f"context full: {pos0 + n} tokens exceed the context size {kv.n_ctx}")
    if tokens.min() < 0 or tokens.max() >= cfg.vocab:
        raise EngineError(f"token id out of range [0, {cfg.vocab})")
    kv.reserve(pos0 + n)
    begin = getattr(sink, "begin", None)
    if begin is not None:
        begin(pos0, n)
    positions = kv.positions[pos0:pos0 + n]
    # planted faults (engine.failpoints; off unless NUMGGUF_FAILPOINTS names them)
    kv_pos0 = attn_pos0 = pos0
    if n == 1 and pos0 > 0:
        if failpoints.active("forward.decode_position"):
            positions = kv.positions[0:1]
        if failpoints.active("forward.kv_slot") and pos0 + 1 < kv.n_ctx:
            kv.reserve(pos0 + 2)
            kv_pos0 = pos0 + 1
        if failpoints.active("forward.decode_mask"):
            attn_pos0 = pos0 - 1   # the query sees keys 0..pos0-1: itself masked out
    skip_kv = min(max(kv.stale - pos0, 0), n) if failpoints.active("session.stale_cache") else 0
    attn_scale = model.attn_scale * (1.5 if failpoints.active("forward.attn_scale") else 1.0)
    qd, kvd, n_keys = cfg.q_dim, cfg.kv_dim, pos0 + n
    hk = hooks   # no hooks: every `if hk` below is one test of None
    if hk:
        hk.positions = np.arange(pos0, pos0 + n, dtype=np.int64)

    x = sink.buffer("embedding", None, (n, cfg.dim))
    get_rows(w.token_embd.data, w.token_embd.qtype, tokens, x)
    if failpoints.active("quant.get_rows_ulp"):
        x[:, -1] = np.nextafter(x[:, -1], np.float32(np.inf))
    if model.embed_scale is not None:
        x *= model.embed_scale
    if hk:
        hk("embedding", None, x)
    for li, layer in enumerate(w.layers):
        g = model.matmuls[li]
        h = sink.buffer("attn_norm", li, (n, cfg.dim))
        rmsnorm(x, layer.attn_norm, cfg.eps, h)
        if hk:
            hk("attn_norm", li, h)
        qkv = sink.buffer("qkv_matmul", li, (n, qd + 2 * kvd))
        _mm(int8, h, g.qkv, qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:])
        if hk:
            hk("qkv_matmul", li, qkv)
        if model.qkv_bias[li] is not None:
            biased = sink.buffer("qkv_bias", li, (n, qd + 2 * kvd))
            add_bias(qkv, model.qkv_bias[li], biased)
            qkv = biased
            if hk:
                hk("qkv_bias", li, qkv)
        q, k = qkv[:, :qd], qkv[:, qd:qd + kvd]
        if layer.q_norm is not None:   # an RMSNorm over each head of Q and of K, before RoPE
            q = sink.buffer("q_norm", li, (n, qd))
            rmsnorm_heads(qkv[:, :qd], layer.q_norm, cfg.eps, cfg.n_heads, q)
            k = sink.buffer("k_norm", li, (n, kvd))
            rmsnorm_heads(qkv[:, qd:qd + kvd], layer.k_norm, cfg.eps, cfg.n_kv_heads, k)
            if hk:
                hk("q_norm", li, q)
                hk("k_norm", li, k)
        inv_freq, window = model.inv_freq[li], cfg.window(li)
        if window and failpoints.active("forward.no_sliding_window"):
            window = 0
        q_rope = sink.buffer("q_post_rope", li, (n, qd))
        rope(q, positions, cfg.n_heads, cfg.head_dim, cfg.n_rot, inv_freq, cfg.rope_neox, q_rope)
        k_rope = sink.buffer("k_post_rope", li, (n, kvd))
        rope(k, positions, cfg.n_kv_heads, cfg.head_dim, cfg.n_rot, inv_freq, cfg.rope_neox, k_rope)
        if hk:   # before K enters the cache: a hooked k_post_rope is what later positions attend to
            hk("q_post_rope", li, q_rope)
            hk("k_post_rope", li, k_rope)
        if skip_kv:   # planted fault session.stale_cache: rows an earlier session left are not rewritten
            store_kv(k_rope[skip_kv:], qkv[skip_kv:, qd + kvd:], kv.k[li], kv.v[li], kv_pos0 + skip_kv,
                     cfg.n_kv_heads, cfg.head_dim, not model.exact)
        else:
            store_kv(k_rope, qkv[:, qd + kvd:], kv.k[li], kv.v[li], kv_pos0, cfg.n_kv_heads, cfg.head_dim,
                     not model.exact)
        scores = sink.buffer("attn_scores", li, (cfg.n_heads, n, n_keys))
        probs = sink.buffer("attn_softmax", li, (cfg.n_heads, n, n_keys))
        att = sink.buffer("attention", li, (n, qd))
        attention(q_rope, kv.k[li], kv.v[li], attn_pos0, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                  attn_scale, scores, probs, att, f64_scores=model.exact, window=window)
        if hk:   # one fused kernel: unfused from the first hooked stage on, only while hooked
            unfuse = not failpoints.active("hooks.no_unfuse")
            if hk.wants("attn_scores", li) and unfuse:
                hk("attn_scores", li, scores)
                softmax_causal(scores, attn_pos0, probs, window=window)
            if hk.wants("attn_softmax", li):
                hk("attn_softmax", li, probs)
            if (hk.wants("attn_scores", li) or hk.wants("attn_softmax", li)) and unfuse:
                attend(probs, kv.v[li], attn_pos0, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, att, window=window)
            hk("attention", li, att)
        att_out = sink.buffer("attn_out", li, (n, cfg.dim))
        _mm(int8, att, g.wo, att_out)
        if hk:
            hk("attn_out", li, att_out)
        if layer.post_attn_norm is not None:
            att_out = _post_norm(sink, hk, "post_attn_norm", li, att_out, layer.post_attn_norm, cfg.eps)
        resid = sink.buffer("post_attn_residual", li, (n, cfg.dim))
        add(x, att_out, resid)
        if hk:
            hk("post_attn_residual", li, resid)
        h = sink.buffer("ffn_norm", li, (n, cfg.dim))
        rmsnorm(resid, layer.ffn_norm, cfg.eps, h)
        if hk:
            hk("ffn_norm", li, h)
        gate = sink.buffer("ffn_gate", li, (n, cfg.ffn_dim))
        up = sink.buffer("ffn_up", li, (n, cfg.ffn_dim))
        _mm(int8, h, g.gate_up, gate, up)
        if hk:
            hk("ffn_gate", li, gate)
            hk("ffn_up", li, up)
        act_stage, gated_stage = model.act_stages
        act = sink.buffer(act_stage, li, (n, cfg.ffn_dim))
        gated = sink.buffer(gated_stage, li, (n, cfg.ffn_dim))
        if model.arch.activation == "gelu":
            gelu_and_geglu(gate, up, act, gated, not model.exact)
        else:
            silu_and_swiglu(gate, up, act, gated)
        if hk:
            if hk.wants(act_stage, li):   # fused with the product: recompute it from the hooked activation
                hk(act_stage, li, act)
                if not failpoints.active("hooks.no_unfuse"):
                    np.multiply(act, up, out=gated)
            hk(gated_stage, li, gated)
        down = sink.buffer("ffn_out", li, (n, cfg.dim))
        _mm(int8, gated, g.down, down)
        if hk:
            hk("ffn_out", li, down)
        if layer.post_ffn_norm is not None:
            down = _post_norm(sink, hk, "post_ffn_norm", li, down, layer.post_ffn_norm, cfg.eps)
        x_next = sink.buffer("post_ffn_residual", li, (n, cfg.dim))
        add(resid, down, x_next)
        if hk:
            hk("post_ffn_residual", li, x_next)
        x = x_next
    normed = sink.buffer("final_norm", None, (n, cfg.dim))
    rmsnorm(x, w.output_norm, cfg.eps, normed)
    if hk:
        hk("final_norm", None, normed)
    rows = normed if all_logits else normed[n - 1:]
    logits = sink.buffer("lm_head", None, (rows.shape[0], cfg.vocab))
    _mm(int8, rows, model.output, logits, prompt=n > 1)
    softcap(logits, cfg.logit_softcap)
    if hk:
        hk("lm_head", None, logits, hk.positions[n - rows.shape[0]:])
        hk.check_fired()
    return logits


def output_head(model: Model, session, x: np.ndarray) -> np.ndarray:
    """The model's output head on residual-stream rows x [n, dim]: the final RMSNorm, then
    lm_head, exactly as a prompt's forward computes them (so the last layer's residual gives
    the forward's own logits, bit for bit). Returns new float32 logits [n, vocab]."""
    cfg, w = model.cfg, model.weights
    x = np.ascontiguousarray(x, dtype=np.float32)
    normed = np.empty_like(x)
    rmsnorm(x, w.output_norm, cfg.eps, normed)
    logits = np.empty((x.shape[0], cfg.vocab), np.float32)
    _mm(session.int8, normed, model.output, logits)
    softcap(logits, cfg.logit_softcap)
    return logits
