"""Zero-copy activation tracing: APRT files, stage plans, sinks, captures, statistics and diffs.

``trace.record(engine, ids, DIR, ...)`` captures a prefill or a whole generation and returns it;
``trace.load(DIR)`` opens a finished capture (see trace.reader); ``trace.load_collection(DIR)`` a
dataset collection (trace.collect, trace.collection). Note: this package shares its
name with the standard library's ``trace`` module; an installed numgguf makes ``import trace``
find this one from any folder (numgguf-trace.pth, see _numgguf_trace.py), and from the
repository root it is found first anyway.
"""
IS_NUMGGUF_TRACE = True


def load(path):
    """Open the capture in folder `path`: ``cap["ffn_swigl", 3]`` is a read-only memmap [T, dim]."""
    from trace.reader import load as _load
    return _load(path)


def load_collection(path):
    """Open the collection in folder `path` (``collect --out``): ``coll["ffn_swigl", 10]`` is
    [n_tokens, width] over all shards, memory-mapped; ``coll.token_ids``, ``coll.offsets``, ``coll.prompt(i)``."""
    from trace.collection import load_collection as _load_collection
    return _load_collection(path)


def record(engine, ids, out, stages: str = "all", layers: str = "all", max_tokens: int | None = None,
           sampler=None, stop_at_eog: bool = True, prompt: str = ""):
    """Capture `stages` x `layers` of the prompt ids' prefill (max_tokens None) or of a whole
    generation of up to max_tokens tokens (greedy unless `sampler`) into the new or empty folder
    `out`, in its own session (the engine's are left alone); return the capture (see load)."""
    from pathlib import Path
    from trace.capture import capture, capture_generation, plan_for_model, prepare_out_dir
    out = Path(out)
    plan = plan_for_model(stages, layers, engine.config)
    prepare_out_dir(out, force=False)
    if max_tokens is None:
        capture(engine, list(ids), plan, out, prompt)
    else:
        capture_generation(engine, list(ids), plan, out, prompt, max_tokens, sampler, stop_at_eog=stop_at_eog)
    return load(out)
