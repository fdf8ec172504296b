"""Benchmarks live here, outside the unit tests' testpaths (tests/); run them explicitly:

    python -m pytest bench/bench_trace.py            # from the repository root

Files are named bench_*.py so a plain `pytest` never collects them; a file given on the
command line is collected whatever its name.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cached_engine():
    """get(key) -> one Engine per cached model for the session; skips when the model is not cached."""
    engines = {}

    def get(key):
        from engine.api import Engine
        from engine.fetch import model_path
        path = model_path(key)
        if not path.exists():
            pytest.skip(f"{key} is not in the model cache ({path}); `python -m cli fetch {key}` first")
        if key not in engines:
            engines[key] = Engine(path, n_ctx=256)
        return engines[key]

    return get


@pytest.fixture(scope="session")
def trace_results(pytestconfig):
    """(model, n_tokens, sink) -> (min, median) seconds; printed as ratios at the end of the run."""
    return pytestconfig.__dict__.setdefault("_trace_bench_results", {})


def pytest_terminal_summary(terminalreporter, config):
    results = getattr(config, "_trace_bench_results", None)
    if not results:
        return
    tr = terminalreporter
    tr.section("trace overhead: forward time with the sink / with NullSink")
    tr.write_line(f"{'model':<27} {'tokens':>6}  {'sink':<23} {'min ms':>9} {'median ms':>10} "
                  f"{'ratio(min)':>10} {'ratio(median)':>13}")
    order = {"null": 0, "ffn_swigl L0-3": 1, "all stages, all layers": 2}
    for (model, n, sink), (lo, med) in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                               order.get(kv[0][2], 9))):
        base = results.get((model, n, "null"))
        r_lo = f"{lo / base[0]:10.2f}" if base else f"{'-':>10}"
        r_med = f"{med / base[1]:13.2f}" if base else f"{'-':>13}"
        tr.write_line(f"{model:<27} {n:>6}  {sink:<23} {lo * 1e3:>9.1f} {med * 1e3:>10.1f} {r_lo} {r_med}")
