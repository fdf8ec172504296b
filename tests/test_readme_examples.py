"""Every example command in README.md runs as written: a README example that breaks fails CI.

The examples are the `python -m cli ...`, `numgguf ...` and `python -c ...` (making an input
file for the next line) lines of the README's ```sh blocks (grammar lines with [OPTIONS]
placeholders are not examples). Each runs in order in one
temporary folder, with three substitutions that keep the suite fast and self-contained:
- a forward-running command that names no model (run, score, trace, bisect, collect) gets the small
  model, and `path/to/model.gguf` becomes the small model's file;
- `/tmp/` becomes the test's temporary folder;
- `bench` and `contracts` are not run here (a measurement and the whole suite again).
The expected output a `# [...]` comment shows (tokenize) is checked too.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, model_file

SMALL = "smollm2-135m-q4_1"
FORWARD_COMMANDS = {"run", "score", "trace", "bisect", "collect"}
NOT_RUN = {"bench", "contracts"}


def readme_examples() -> list[str]:
    """The example command lines of README.md's ```sh blocks, in order."""
    lines, in_sh = [], False
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_sh = line.strip() == "```sh"
            continue
        if in_sh and re.match(r"(python -m cli|numgguf|python -c) ", line) and not re.search(r"\[(--|[A-Z])", line):
            lines.append(line)
    return lines


def argv_for(line: str, tmp: Path) -> tuple[list[str], str | None]:
    """(argv to run, expected stdout or None) for one README line."""
    words, comment = shlex.split(line, comments=True), None
    for m in re.finditer(r"\s#\s", line):   # the comment: the first " # " outside quotes
        try:
            if shlex.split(line[:m.start()]) == words:
                comment = line[m.end():].strip()
                break
        except ValueError:
            continue
    words = [w.replace("/tmp/", f"{tmp}/") for w in words]
    if words[:2] == ["python", "-c"]:
        return [sys.executable, "-c", *words[2:]], None
    prog, rest = (words[:3], words[3:]) if words[0] == "python" else (words[:1], words[1:])
    cmd = rest[0]
    small = str(model_file(SMALL))
    rest = [small if w == "path/to/model.gguf" else w for w in rest]
    if cmd in FORWARD_COMMANDS and (len(rest) == 1 or rest[1].startswith("-")):
        rest.insert(1, SMALL)
    exe = [sys.executable, "-m", "cli"] if prog[0] == "python" else [shutil.which(
        "numgguf", path=str(Path(sys.executable).parent)) or "numgguf"]
    want = comment if comment and comment.startswith("[") else None
    return exe + rest, want


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks."""
    blocks, current = [], None
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is not None:
                blocks.append("\n".join(current))
                current = None
            elif line.strip() == "```python":
                current = []
            continue
        if current is not None:
            current.append(line)
    return blocks


@pytest.mark.model
def test_readme_python_examples_run_as_written(tmp_path):
    blocks = readme_python_blocks()
    assert blocks, "README.md has no python example"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    model_file(SMALL)
    for code in blocks:
        res = subprocess.run([sys.executable, "-c", code.replace("/tmp/", f"{tmp_path}/")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=900, env=env)
        assert res.returncode == 0, f"README python example failed:\n{code}\n{res.stderr}"


def test_readme_has_examples():
    lines = readme_examples()
    assert len(lines) >= 10, lines
    assert any(line.startswith("numgguf ") for line in lines)
    assert any(" tokenize " in line for line in lines)


@pytest.mark.model
def test_readme_examples_run_as_written(tmp_path):
    have_llama = importlib.util.find_spec("llama_cpp") is not None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = 0
    for line in readme_examples():
        argv, want = argv_for(line, tmp_path)
        cmd = argv[1] if argv[1] == "-c" else argv[3] if argv[0] == sys.executable else argv[1]
        if cmd in NOT_RUN or (cmd == "bisect" and not have_llama):
            continue
        if cmd == "tokenize":
            model_file("qwen2.5-coder-1.5b-q4_k_m")  # the documented ids are the default model's
        res = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
        ok = (0, 1) if cmd == "diff" else (0,)  # diff's 1 = "they differ" (int8 vs --exact): a result
        assert res.returncode in ok, f"README example failed: {line}\n{res.stderr}"
        assert "Traceback" not in res.stderr, f"{line}\n{res.stderr}"
        if want is not None:
            assert json.loads(res.stdout) == json.loads(want), f"{line}: printed {res.stdout!r}"
        ran += 1
    assert ran >= 10
