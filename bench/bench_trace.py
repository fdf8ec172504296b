"""Cost of tracing: one prefill forward with NullSink vs TraceSink, as a ratio over NullSink.

    python -m pytest bench/bench_trace.py            # from the repository root

Sinks: ``null`` (scratch only), ``ffn_swigl L0-3`` (4 files), ``all stages, all layers``.
Each TraceSink round is what ``cli trace`` pays per capture: create the ``.partial`` files at
their final size, the forward writing straight into their memory maps, then ``finish()``
(flush + rename). Prompts: the 7-token "What is 2+2?" and a 128-token text, both raw.
Models: SmolLM2-135M and the default Qwen2.5-Coder-1.5B, each only if already in the model
cache (benchmarks never download). The summary at the end prints each sink's time over
NullSink's for the same model and prompt, from the minimum (least disturbed by other load on the
machine) and from the median of the rounds.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

MODELS = ("smollm2-135m-q4_1", "qwen2.5-coder-1.5b-q4_k_m")
SINKS = ("null", "ffn_swigl L0-3", "all stages, all layers")
PLANS = {"ffn_swigl L0-3": ("ffn_swigl", "0-3"), "all stages, all layers": ("all", "all")}
LONG_TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "def fibonacci(n):\n    a, b = 0, 1\n"
             "    for _ in range(n):\n        a, b = b, a + b\n    return a\n") * 6
def _prompt(eng, n_tokens):
    if n_tokens == 7:
        ids = eng.prompt_ids("What is 2+2?", raw=True)
    else:
        ids = eng.prompt_ids(LONG_TEXT, raw=True)[:n_tokens]
    assert len(ids) == n_tokens, (len(ids), n_tokens)
    return ids


@pytest.fixture
def out_dir():
    d = Path(tempfile.mkdtemp(prefix="bench-trace-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.model
@pytest.mark.parametrize("sink_name", SINKS)
@pytest.mark.parametrize("n_tokens", [7, 128])
@pytest.mark.parametrize("key", MODELS)
def test_forward_with_sink(benchmark, trace_results, cached_engine, key, n_tokens, sink_name, out_dir):
    from trace.capture import plan_for_model
    from trace.sink import NullSink, TraceSink
    eng = cached_engine(key)
    ids = _prompt(eng, n_tokens)
    if sink_name == "null":
        sink = NullSink()

        def run():
            eng.forward(ids, sink=sink)
    else:
        plan = plan_for_model(*PLANS[sink_name], eng.config)
        sink = TraceSink(out_dir, plan, eng.config.n_layers)

        def run():
            eng.forward(ids, sink=sink)
            sink.finish()

    run()  # compile/warm caches outside the timing
    slow = key.startswith("qwen") and n_tokens > 7
    benchmark.group = f"{key} {n_tokens} tokens"
    benchmark.extra_info.update(model=key, n_tokens=n_tokens, sink=sink_name)
    benchmark.pedantic(run, rounds=5 if slow else 15, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        trace_results[key, n_tokens, sink_name] = (benchmark.stats.stats.min, benchmark.stats.stats.median)
