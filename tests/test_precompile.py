"""A first run compiles its kernels in two processes (engine.precompile).

The invariant: the plan recorded with every kernel a no-op holds every kernel the warm-up
then asks Numba for, so after `warm_in_parallel` the warm-up forward compiles and loads
nothing, and the helper process records the same plan (its exit code 0 says so). Run in a
fresh process with an empty Numba cache, as a first run is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.synthetic import write_tiny_model

SCRIPT = r"""
import json, sys
import numba.core.dispatcher as dispatcher
from engine.api import Engine, numba_cache_empty
from engine.precompile import warm_in_parallel
empty = numba_cache_empty()
eng = Engine(sys.argv[1])
helper = warm_in_parallel(eng, eng.warm_forward)
asked = []
compile_ = dispatcher.Dispatcher.compile
dispatcher.Dispatcher.compile = lambda self, sig: asked.append(self.py_func.__qualname__) or compile_(self, sig)
eng.warm_forward()
print(json.dumps({"empty": empty, "helper": helper, "asked": sorted(set(asked))}))
"""


def run_first_warm_up(model, cache_dir, failpoints=""):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), NUMGGUF_FAILPOINTS=failpoints)
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(model)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plan_holds_every_kernel_the_warm_up_asks_for(tmp_path):
    """With an empty cache (a first run), the helper records the same plan, and after the
    two processes compiled it the warm-up forward asks Numba for no kernel."""
    model = write_tiny_model(tmp_path / "tiny.gguf")   # Q4_K: the int8 and panel GEMMs, as real models
    failpoints = os.environ.get("NUMGGUF_FAILPOINTS", "")
    r = run_first_warm_up(model, tmp_path / "numba-cache", failpoints)
    assert r["empty"], "the cache was not empty: this is not a first run"
    assert r["helper"] == 0, f"the helper exited {r['helper']} (1: it recorded another plan)"
    assert not r["asked"], f"kernels the plan left out, compiled or loaded by the warm-up: {r['asked']}"
