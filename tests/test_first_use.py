"""What a new user does first, from any folder: the commands, the Python API, strict JSON.

The installed commands must not depend on the working directory: our `trace` package shares
its name with the standard library's module, which comes first on sys.path unless
numgguf-trace.pth (installed with the package) claims the name (see _numgguf_trace.py).
These tests run the CLI and `import engine` in subprocesses whose working directory is a
temporary folder, so the repository root is not on their path.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, model_file
from tests.synthetic import write_tiny_model

INSTALLED = any((Path(p) / "numgguf-trace.pth").is_file()
                for p in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
needs_install = pytest.mark.skipif(not INSTALLED, reason="numgguf is not installed in this Python "
                                   "(pip install -e . puts numgguf-trace.pth into site-packages)")


def strict_loads(text: str):
    """json.loads that rejects NaN/Infinity, which are not JSON."""
    def bad(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=bad)


def run_elsewhere(args, cwd, timeout=300, **kw):
    """Run a command with cwd outside the repository and without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("first-use") / "tiny.gguf")


# -- 1. any working directory ---------------------------------------------------------------------

@needs_install
def test_import_engine_and_trace_from_another_folder(tmp_path):
    code = ("import engine, trace, trace.sink, trace.capture; engine.Engine; "
            "from engine.api import Engine; print(trace.__file__)")
    res = run_elsewhere([sys.executable, "-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve() == REPO / "trace" / "__init__.py"
    # `trace` alone, first thing in a fresh interpreter, is ours too
    res = run_elsewhere([sys.executable, "-c", "import trace; print(trace.IS_NUMGGUF_TRACE)"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr


@needs_install
def test_cli_runs_from_another_folder(tmp_path, tiny):
    res = run_elsewhere([sys.executable, "-m", "cli", "run", str(tiny), "--prompt", "the theater",
                         "--max-tokens", "3"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "cap"
    res = run_elsewhere([sys.executable, "-m", "cli", "trace", str(tiny), "--stages", "ffn_swigl", "--layers", "0",
                         "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (out / "layer-0" / "ffn_swigl.bin").is_file() and (out / "manifest.json").is_file()


@needs_install
def test_numgguf_console_script(tmp_path, tiny):
    exe = shutil.which("numgguf", path=str(Path(sys.executable).parent)) or shutil.which("numgguf")
    assert exe, "the numgguf console script is not installed next to this Python"
    res = run_elsewhere([exe, "--help"], tmp_path)
    assert res.returncode == 0 and "Usage:" in res.stdout, res.stderr
    res = run_elsewhere([exe, "tokenize", str(tiny), "the theater"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(subprocess.run(
        [sys.executable, "-m", "cli", "tokenize", str(tiny), "the theater"], cwd=REPO, capture_output=True,
        text=True, check=True).stdout)


@pytest.mark.slow
@needs_install
def test_non_editable_install_works_from_another_folder(tmp_path, tiny):
    """`pip install .` (a real wheel, not editable) into a fresh venv; the venv borrows this
    environment's dependencies through a path entry, so nothing else is downloaded."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]  # numpy, numba, gguf... (a plain path: its .pth files are not run)
    (Path(site) / "borrowed-deps.pth").write_text(deps + "\n")
    src = tmp_path / "src"  # a copy of the sources, as a fresh clone would be
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                                            "traces", ".pytest_cache", ".benchmarks"))
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(src)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.rmtree(src)
    work = tmp_path / "work"
    work.mkdir()
    res = run_elsewhere([str(py), "-c", "import engine, trace; engine.Engine; print(trace.__file__)"], work)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(Path(site)), res.stdout
    res = run_elsewhere([str(venv / "bin" / "numgguf"), "tokenize", str(tiny), "the theater"], work)
    assert res.returncode == 0, res.stderr
    assert isinstance(json.loads(res.stdout), list)


# -- 2. the documented tokenize form -------------------------------------------------------------

def test_tokenize_with_text_only_uses_the_default_model_argument_order():
    from docopt import docopt
    import cli
    args = docopt(cli.__doc__, argv=["tokenize", "Hello, world!"])
    assert args["TEXT"] == "Hello, world!" and args["MODEL"] is None
    args = docopt(cli.__doc__, argv=["tokenize", "m.gguf", "Hello, world!", "--special"])
    assert (args["MODEL"], args["TEXT"], args["--special"]) == ("m.gguf", "Hello, world!", True)


@pytest.mark.model
@needs_install
def test_readme_tokenize_example_from_another_folder(tmp_path):
    model_file("qwen2.5-coder-1.5b-q4_k_m")
    res = run_elsewhere([sys.executable, "-m", "cli", "tokenize", "Hello, world!"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == [9707, 11, 1879, 0]


# -- 3. escapes in prompts, as llama.cpp's CLI processes them ------------------------------------

@pytest.mark.parametrize("text,want", [
    (r"a\nb", "a\nb"), (r"tab\there", "tab\there"), (r"\r", "\r"), (r"q\"q\'", "q\"q'"), (r"back\\n", "back\\n"),
    (r"\x41\x42", "AB"), (r"\xc3\xa9", "é"), (r"\q stays", r"\q stays"), (r"\x4", r"\x4"), ("end\\", "end\\"),
    ("no escapes", "no escapes"), (r"é\n", "é\n"),
])
def test_process_escapes(text, want):
    import cli
    assert cli.process_escapes(text) == want


def test_bad_utf8_escape_is_one_line_error(tiny):
    from tests.test_model_errors import assert_one_line_error, run_cli
    assert_one_line_error(run_cli("tokenize", tiny, r"\xff"), "UTF-8", "--no-escape")
    res = run_cli("tokenize", tiny, r"\xff", "--no-escape")
    assert res.returncode == 0, res.stderr


def test_prompt_escapes_reach_the_tokenizer(tiny):
    from tests.test_model_errors import run_cli
    escaped = json.loads(run_cli("tokenize", tiny, r"<|im_start|>user\nhi", "--special").stdout)
    literal = json.loads(run_cli("tokenize", tiny, "<|im_start|>user\nhi", "--special", "--no-escape").stdout)
    assert escaped == literal
    assert json.loads(run_cli("tokenize", tiny, r"a\nb", "--no-escape").stdout) != \
        json.loads(run_cli("tokenize", tiny, "a\nb", "--no-escape").stdout)
    res = run_cli("run", tiny, "--raw", "--prompt", r"<|im_start|>user\nhi<|im_end|>\n", "--max-tokens", "1")
    assert res.returncode == 0, res.stderr
    assert f"prompt tokens: {len(literal) + 2}," in res.stderr  # <|im_end|> and the newline after it


@pytest.mark.model
def test_readme_smollm2_chat_example_answers_briefly():
    """The README's SmolLM2 example: a real chat turn, so the model answers and stops."""
    from tests.test_model_errors import run_cli
    model_file("smollm2-135m-q4_1")
    res = run_cli("run", "smollm2-135m-q4_1", "--raw", "--prompt",
                  r"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  r"<|im_start|>assistant\n", "--max-tokens", "64", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "stop: eog" in res.stderr, (res.stdout, res.stderr)
    assert 0 < len(res.stdout.split()) <= 20, res.stdout


# -- 4. the KV cache's resident memory grows with the positions used -----------------------------

def test_kv_cache_grows_with_positions_used(tiny):
    """A session's cache starts small and doubles as positions are written, keeping its contents:
    decode steps on the grown cache agree with a recompute of the whole sequence."""
    from engine.api import Engine
    from engine.kv_cache import INITIAL_POSITIONS, KVCache
    eng = Engine(tiny, n_ctx=256, exact=True)  # float32 in prompts and decode steps alike
    assert eng.new_session().kv.capacity == min(256, INITIAL_POSITIONS)
    assert Engine(tiny).new_session().kv.capacity <= INITIAL_POSITIONS  # not the whole context up front
    s = eng.new_session()
    s.kv = KVCache(eng.config, 256, initial=8)   # small, so a short test crosses several doublings
    seq = eng.tokenizer.encode("the theater is on the other side")
    steps = [s.forward(seq)[0]]
    while len(seq) < 40:
        seq.append(int(np.argmax(steps[-1])))
        steps.append(s.forward([seq[-1]])[0])
    assert s.kv.capacity == 64 and s.pos == 40
    full = eng.new_session().forward(seq, all_logits=True)[len(seq) - len(steps):]
    np.testing.assert_allclose(np.array(steps), full, rtol=0, atol=2e-3 * np.abs(full).max())
    with pytest.raises(Exception, match="context full"):
        s.kv.reserve(257)


@pytest.mark.model
def test_default_run_peak_rss_under_1_5_gb(tmp_path):
    """`run --prompt hi --max-tokens 1` on the 1.5B at the default context (32,768): the child's
    peak RSS stays under 1.5 GB (it was 2.2 GB with the whole context's K cache touched)."""
    model_file("qwen2.5-coder-1.5b-q4_k_m")
    code = ("import resource, sys, cli; rc = cli.main(['run', '--prompt', 'hi', '--max-tokens', '1']); "
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    # once to fill Numba's on-disk cache (compiling a kernel takes LLVM's memory, once per install),
    # then the run a user makes every time after
    subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    peak_kib = int(res.stderr.split("peak ")[-1].split()[0])
    print(f"peak RSS {peak_kib / 2**20:.2f} GiB")
    assert peak_kib * 1024 < 1.5e9, res.stderr


# -- 5. run reports load time apart from the prefill ---------------------------------------------

def test_run_reports_load_and_kernel_time_on_their_own_line(tiny):
    from tests.test_model_errors import run_cli
    res = run_cli("run", tiny, "--prompt", "the theater", "--max-tokens", "3")
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    load = [line for line in lines if line.startswith("loaded ")]
    assert load and "kernels ready in" in load[0], res.stderr
    assert lines.index(load[0]) < next(i for i, line in enumerate(lines) if line.startswith("prompt tokens:"))


def test_prefill_rate_excludes_kernel_loading(tiny):
    """After warm_up(), a generation's first prefill costs about what a second one does."""
    from engine.api import Engine
    from engine.generate import GenStats
    eng = Engine(tiny, n_ctx=64)
    eng.warm_up()
    ids = eng.tokenizer.encode("the theater is on the other side of the river")
    times = []
    for _ in range(2):
        st = GenStats()
        list(eng.new_session().generate(ids, max_tokens=2, stats=st))
        times.append(st.prefill_s)
    assert times[0] < 0.5, times  # no compile or cache load (those take seconds) in the first


@pytest.mark.model
@pytest.mark.parametrize("prompt_tokens", [3, 12])
def test_warm_up_gets_every_kernel_a_prompt_runs(monkeypatch, prompt_tokens):
    """After warm_up(), generating a prompt asks Numba for no kernel (neither a compile nor a
    cache load): a prompt long enough for the panel GEMM (kernels.matmul's PANEL_MIN_TOKENS)
    has it from the warm-up's 2-token prompt (an Int8Group binds both its kernels on its first
    launch), not in its own timed prefill."""
    import numba.core.dispatcher as dispatcher
    from engine.api import Engine
    eng = Engine(model_file("qwen2.5-coder-1.5b-q4_k_m"), n_ctx=64)   # Q4_K and Q6_K: panel types
    ids = list(range(100, 100 + prompt_tokens))
    eng.warm_up()
    asked = []
    compile_ = dispatcher.Dispatcher.compile
    monkeypatch.setattr(dispatcher.Dispatcher, "compile",
                        lambda self, sig: asked.append(self.py_func.__qualname__) or compile_(self, sig))
    list(eng.new_session().generate(ids, max_tokens=3, stop_at_eog=False))
    assert not asked, f"kernels asked for after the warm-up: {sorted(set(asked))}"


# -- 6. every --json output is strict JSON --------------------------------------------------------

def test_print_json_writes_non_finite_numbers_as_strings(capsys):
    import cli
    cli.print_json({"a": float("inf"), "b": [float("-inf"), float("nan"), 1.5], "c": (None, "x")})
    assert strict_loads(capsys.readouterr().out) == {"a": "inf", "b": ["-inf", "nan", 1.5], "c": [None, "x"]}


def test_bisect_report_with_infinite_relative_error_prints_strict_json(tmp_path, capsys):
    """A stage llama.cpp computed as all zeros: our nonzero values have an infinite relative error."""
    import cli
    from tests.test_bisect import _compare
    a = np.ones((2, 8), np.float32)
    report = _compare(tmp_path, {("embedding", None): a}, {("embedding", None): np.zeros_like(a)})
    assert report.results[0].rel_err == float("inf")
    cli.print_json(report.to_json())
    out = strict_loads(capsys.readouterr().out)
    assert out["first_divergence"]["stage"] == "embedding"


@pytest.mark.parametrize("argv", [
    ["score", "{m}", "--text", "the theater", "--raw", "--json"],
    ["bench", "{m}", "--prompt-tokens", "4", "--gen-tokens", "2", "--repeat", "1", "--json"],
    ["diff", "{a}", "{b}", "--json"],
    ["contracts", "trace-plan", "--json"],
])
def test_every_json_output_parses_strictly(tmp_path, tiny, argv):
    from tests.test_model_errors import run_cli
    a, b = tmp_path / "a", tmp_path / "b"
    if argv[0] == "diff":
        for out, flags in ((a, []), (b, ["--exact"])):
            res = run_cli("trace", tiny, "--stages", "ffn_swigl,lm_head", "--layers", "0", "--out", out, *flags)
            assert res.returncode == 0, res.stderr
    res = run_cli(*[x.format(m=tiny, a=a, b=b) for x in argv], timeout=600)
    assert res.returncode in (0, 1), res.stderr
    assert isinstance(strict_loads(res.stdout), dict)
