"""Shared fixtures: real models (fetched into the user's cache on first use) and llama.cpp references."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
MODEL_KEYS = ("qwen2.5-coder-1.5b-q4_k_m", "qwen2.5-coder-0.5b-q4_k_m", "smollm2-135m-q4_1")


def reference_dir(key: str | None = None) -> Path:
    """../shared/reference[/key], or skip the test when it is absent."""
    d = REFERENCE if key is None else REFERENCE / key
    if not d.is_dir():
        pytest.skip(f"llama.cpp reference data not found at {d}")
    return d


def load_reference(key: str, name: str):
    return json.loads((reference_dir(key) / name).read_text())


def model_file(key: str) -> Path:
    """Path of a real model, fetched on first use. NUMGGUF_OFFLINE=1 skips instead of fetching."""
    from engine.fetch import fetch, model_path
    if os.environ.get("NUMGGUF_OFFLINE") == "1" and not model_path(key).exists():
        pytest.skip(f"model {key} not in the cache and NUMGGUF_OFFLINE=1")
    return fetch(key, quiet=True)


_ENGINES = {}


def engine_for(key: str, exact: bool = False):
    """One loaded Engine per model and mode for the whole session (the KV cache is reused).

    exact=True keeps decode steps in float32 too (no int8 activations)."""
    from engine.api import Engine
    if (key, exact) not in _ENGINES:
        _ENGINES[key, exact] = Engine(model_file(key), n_ctx=512, exact=exact)
    return _ENGINES[key, exact]
