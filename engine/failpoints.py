"""Fail points: named faults the contract runner switches on to prove its tests can fail.

``NUMGGUF_FAILPOINTS`` (a comma list of names from CATALOGUE) is read once, at import, into
a frozenset. A hook is one Python-level line, ``if failpoints.active("name"): ...``, in a
wrapper (never inside an @njit kernel), so with the variable unset a hook costs one set lookup.
Unknown names are an error at import, so a typo cannot silently switch nothing on.
(The idea is TiKV's and etcd's fail points; `python -m cli contracts --mutate` drives them.)
"""
from __future__ import annotations

import os

ENV = "NUMGGUF_FAILPOINTS"

CATALOGUE: dict[str, str] = {
    # kernels/ hold no fail points: these two act on what the forward (engine.forward) and the
    # kernel tests (tests/test_quant_kernels.py, through its wrappers) receive from the kernels
    "quant.matmul_scale": "every quantized matmul's output is scaled by 1.01",
    "quant.get_rows_ulp": "each embedding row's last value moves up by one ulp",
    "aprt.header_layer": "trace.aprt writes the layer field off by one",
    "aprt.nan_canonical": "trace.aprt.write_aprt replaces NaN payloads by the canonical quiet NaN",
    "sink.copy": "TraceSink.buffer hands out scratch and copies it into the file at finish",
    "sink.publish_early": "TraceSink.buffer makes the final file name visible before finish",
    "sink.row_offset": "GenerationSink hands a decode step the window one row after its own",
    "sink.no_cut": "GenerationSink.finish publishes files at full size after an early stop (no cut, no header fix)",
    "hooks.copy": "a hook gets a copy of the stage's values: what it changes never reaches the forward",
    "hooks.no_unfuse": "hooks on fused stages (ffn_silu, attn_scores, attn_softmax) run, but what follows is not "
                       "recomputed from the hooked values",
    "patching.wrong_source": "the patch sweep keeps the corrupted run's activations as the clean run's",
    "bisect.cosine_only": "bisect verdicts ignore the norm ratio, the relative error and the units' scale (cosine only)",
    "bisect.no_isolation": "bisect --isolate keeps our values but does not patch the reference's in",
    "kv.grow_no_copy": "KVCache.reserve grows the cache without copying the positions it held",
    "plan.range_exclusive": "trace.plan reads the layer range A-B as exclusive of B",
    "tokenizer.merge_order": "the BPE merge ranks are reversed (last merge first)",
    "tokenizer.no_special": "encode ignores parse_special=True",
    "forward.decode_position": "a one-token forward ropes at position 0 instead of pos0",
    "forward.attn_scale": "the forward scales attention logits by 1.5 too much",
    "forward.kv_slot": "a decode step writes its K/V into the cache slot after its own position",
    "forward.decode_mask": "a decode step's attention mask is off by one: the token does not see itself",
    "forward.no_sliding_window": "sliding-window layers attend to every earlier position (no window)",
    "session.stale_cache": "a new session reuses its engine's previous session's KV cache and does not rewrite "
                           "the positions that session left",
    "collect.row_offset": "a collection shard writes each prompt after its first one row before its own rows",
    "collect.publish_early": "a collection shard is computed under its final folder name, with its shard.json "
                             "written first, so a stopped shard looks finished",
    "collect.no_identity_check": "collect resumes into an --out made with another model, plan or prompts file",
    "cli.tokenize_special": "`cli tokenize --special` does not parse special tokens",
    "precompile.drop_entry": "engine.precompile's kernel plan leaves out the last kernel the warm-up asks for",
}


def _parse(text: str) -> frozenset:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - CATALOGUE.keys())
    if unknown:
        raise ValueError(f"{ENV}: unknown fail point {unknown[0]!r}; known: {', '.join(sorted(CATALOGUE))}")
    return names


ACTIVE: frozenset = _parse(os.environ.get(ENV, ""))


def active(name: str) -> bool:
    """Whether fail point `name` is switched on (always False unless NUMGGUF_FAILPOINTS names it)."""
    return name in ACTIVE
