"""Dataset-scale activation collection: a prompts file's planned stages, in shards, resumable.

Each prompt is one prefill forward from position 0 (exactly the forward a prefill ``trace`` of it
runs, so its rows equal that trace's bit for bit). Prompts are grouped, in file order, into
shards of about ``shard_tokens`` rows; a shard is a folder::

    <out>/shard-00003/layer-10/ffn_swigl.bin   APRT [rows, width], the shard's prompts one after another
                     /token_ids.npy             int32 [rows]
                     /offsets.npy               int64 [prompts + 1]: prompt j's rows are offsets[j]:offsets[j+1]
                     /prompts.jsonl             per prompt: index, source line, text, tokens, truncated tokens
                     /shard.json                the shard's record (written last)

computed straight into memory-mapped files (trace.sink.ShardSink) inside ``shard-00003.partial``
and published by renaming the folder, so a shard is complete or absent. ``manifest.json`` is
written before the first shard with ``"complete": false`` and everything that determines the
result (the model's sha256, the plan, the prompts file's sha256, the settings, the shard
layout); running again with the same settings skips finished shards, deletes unfinished
``.partial`` folders and computes the rest; other settings are refused in one line. A lock on
``<out>/.collect.lock`` keeps two collections from writing into one folder at once.

Shards run in this process, in ``workers`` local processes (``spawn``, each with its own loaded
model and ``threads`` Numba threads), or as Ray actors (``ray_address``). Ray workers write their
shards into ``out`` themselves, so on a cluster ``out`` (and the model file) must be at the same
path on every node (a shared filesystem): returning shards through Ray's object store would copy
every row twice (serialise, then write on the driver) and make the driver's disk the bottleneck,
where writing in place keeps the collection zero-copy. The driver checks each shard's folder
is visible to it and says so if not.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine import failpoints
from engine.errors import EngineError
from trace.capture import Recorder, _named, _write_json_atomic, check_computed, file_sha256, plan_for_model
from trace.plan import ATTENTION_STAGES, TracePlan, planned_keys
from trace.sink import ShardSink

FORMAT = "numgguf-collection"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".collect.lock"
SHARD_JSON = "shard.json"
MAX_AUTO_SHARD_TOKENS = 16384   # the default shard size: total tokens / 64, within [512, 16384]
MIN_AUTO_SHARD_TOKENS = 512
AUTO_SHARDS = 64


def auto_shard_tokens(total_tokens: int) -> int:
    """The default --shard-tokens for a dataset of total_tokens: about AUTO_SHARDS shards (enough
    to keep many workers busy and to lose little on a stop), each 512 to 16,384 tokens. It
    depends on the dataset only, so a collection resumes with any number of workers."""
    return min(MAX_AUTO_SHARD_TOKENS, max(MIN_AUTO_SHARD_TOKENS, -(-total_tokens // AUTO_SHARDS)))
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


# -- prompts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """One prompt of the collection: its index among collected prompts, source line (1-based),
    text, token ids (after truncation) and how many tokens truncation dropped."""
    index: int
    line: int
    text: str
    ids: tuple
    truncated: int


def read_prompts(path: Path) -> list[tuple[int, str]]:
    """(line number, text) for each prompt of a prompts file: JSON Lines (``.jsonl``, ``.ndjson``,
    ``.json``: one object per line with a ``"text"`` string) or plain text (one prompt per line,
    taken literally). Blank lines are skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise EngineError(f"--prompts {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise EngineError(f"--prompts {path} line {line}: not UTF-8 text") from None
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append((n, line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EngineError(f"--prompts {path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise EngineError(f"--prompts {path} line {n}: expected an object with a \"text\" string")
        prompts.append((n, obj["text"]))
    if not prompts:
        raise EngineError(f"--prompts {path} holds no prompts")
    return prompts


def tokenize_prompts(engine, lines: list[tuple[int, str]], raw: bool, max_prompt_tokens: int,
                     progress: bool = False) -> tuple[list[Prompt], int]:
    """The collected prompts (token ids truncated to max_prompt_tokens), and how many prompts
    had no tokens at all (skipped)."""
    prompts, empty, t0 = [], 0, time.perf_counter()
    for k, (line, text) in enumerate(lines):
        ids = engine.prompt_ids(text, raw=raw)
        if not ids:
            empty += 1
            continue
        kept = ids[:max_prompt_tokens]
        prompts.append(Prompt(len(prompts), line, text, tuple(int(i) for i in kept), len(ids) - len(kept)))
        if progress and k % 1000 == 999 and time.perf_counter() - t0 > 2:
            sys.stderr.write(f"\rtokenizing prompts: {k + 1}/{len(lines)}")
            sys.stderr.flush()
    if progress and time.perf_counter() - t0 > 2:
        sys.stderr.write(f"\rtokenizing prompts: {len(lines)}/{len(lines)}\n")
    return prompts, empty


# -- shards ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """Shard `index`: prompts first..first+n_prompts-1, `rows` tokens in all."""
    index: int
    first: int
    n_prompts: int
    rows: int

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    """The folder of shard `index` under a collection's --out."""
    return f"shard-{index:05d}"


def plan_shards(token_counts: list[int], shard_tokens: int) -> list[ShardSpec]:
    """Consecutive prompts grouped into shards: a shard closes once it holds at least
    shard_tokens rows (a prompt never spans two shards)."""
    shards, first, rows = [], 0, 0
    for i, n in enumerate(token_counts):
        rows += n
        if rows >= shard_tokens:
            shards.append(ShardSpec(len(shards), first, i + 1 - first, rows))
            first, rows = i + 1, 0
    if rows:
        shards.append(ShardSpec(len(shards), first, len(token_counts) - first, rows))
    return shards


def check_plan(plan: TracePlan) -> None:
    """Refuse stages without a row per token (attention [heads, T, T], lm_head)."""
    for stage in plan.stages:
        if stage in ATTENTION_STAGES:
            raise EngineError(f"stage {stage} is [heads, tokens, tokens] per prompt, not a row per token: "
                              f"collect takes per-token stages (use trace for attention patterns)")
        if stage == "lm_head":
            raise EngineError("stage lm_head is one row per prompt, not a row per token: collect takes "
                              "per-token stages (final_norm is the last per-token stage)")


def compute_shard(engine, plan: TracePlan, out: Path, spec: ShardSpec, prompts: list[Prompt],
                  on_prompt=None) -> dict:
    """Compute shard `spec` (its prompts, in order) into ``out/<name>.partial`` and publish it as
    ``out/<name>``; return its record (also written as shard.json). `on_prompt(n_tokens)` is
    called after each prompt's forward. On any exception the partial folder is removed."""
    out = Path(out)
    final = out / spec.name
    partial = out / (spec.name + ".partial")
    if failpoints.active("collect.publish_early"):
        partial = final   # planted fault: the shard is visible under its final name while computed
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        partial.mkdir(parents=True)
        if failpoints.active("collect.publish_early"):
            (partial / SHARD_JSON).write_text("{}")
        sink = ShardSink(partial, plan, engine.config, spec.rows)
        sink.create()
        offsets = np.zeros(spec.n_prompts + 1, np.int64)
        for j, p in enumerate(prompts):
            offsets[j + 1] = offsets[j] + len(p.ids)
        if offsets[-1] != spec.rows or [p.index for p in prompts] != list(range(spec.first, spec.first + spec.n_prompts)):
            raise EngineError(f"internal: shard {spec.index} got prompts that do not match its plan")
        session = engine.new_session(n_ctx=max(len(p.ids) for p in prompts))
        for j, p in enumerate(prompts):
            sink.start_prompt(int(offsets[j]))
            recorder = Recorder(sink, engine.config.n_layers, progress=False)
            session.forward_view(p.ids, 0, sink=recorder)
            if j == 0:
                check_computed(plan, recorder.requested)
            if on_prompt is not None:
                on_prompt(len(p.ids))
        sink.finish()
        np.save(partial / "token_ids.npy", np.concatenate([np.asarray(p.ids, np.int32) for p in prompts]))
        np.save(partial / "offsets.npy", offsets)
        with open(partial / "prompts.jsonl", "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps({"index": p.index, "line": p.line, "text": p.text, "n_tokens": len(p.ids),
                                    "truncated_tokens": p.truncated}, ensure_ascii=False) + "\n")
        seconds = time.perf_counter() - t0
        record = {**asdict(spec), "name": spec.name, "seconds": round(seconds, 4),
                  "tok_s": round(spec.rows / seconds, 2) if seconds > 0 else None,
                  "worker": f"{socket.gethostname()}:{os.getpid()}",
                  "files": [{"stage": f.stage, "layer": f.layer, "shape": list(f.shape),
                             "path": f.path.relative_to(partial).as_posix()} for f in sink.files.values()]}
        (partial / SHARD_JSON).write_text(json.dumps(record, indent=1))
        if partial != final:
            os.rename(partial, final)   # publish: the shard appears complete or not at all
        return record
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


# -- the output folder -----------------------------------------------------------------------
_IDENTITY_NAMES = {"model_sha256": "model (sha256)", "arch": "architecture", "stages": "--stages",
                   "layers": "--layers", "raw": "--raw", "exact": "--exact", "max_prompt_tokens": "--max-prompt-tokens",
                   "shard_tokens": "--shard-tokens", "prompts_sha256": "prompts file (sha256)"}


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:18] + "..." + s[-18:]


def _mismatch(out: Path, old: dict, new: dict) -> str | None:
    for key, name in _IDENTITY_NAMES.items():
        if old.get(key) != new.get(key):
            return (f"--out {out} holds a collection with another {name} ({_short(old.get(key))} there, "
                    f"{_short(new.get(key))} here); use a new --out, or the command that made it to resume")
    return None


class _Lock:
    """An exclusive lock on <out>/.collect.lock for the collection's lifetime."""

    def __init__(self, out: Path):
        import fcntl
        self.fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise EngineError(f"another collect is writing to --out {out}; wait for it or use another folder") from None

    def release(self) -> None:
        os.close(self.fd)


def open_out(out: Path, identity: dict, shards: list[ShardSpec]) -> tuple[dict | None, set[int]]:
    """Check that `out` is new, or holds this same collection; return its manifest (None when
    new) and the indices of its finished shards. Unfinished ``.partial`` folders are removed.
    Call with the lock held."""
    mpath = out / MANIFEST
    if not mpath.exists():
        others = [p for p in out.iterdir() if p.name not in (LOCK, MANIFEST + ".partial")]
        if others:
            raise EngineError(f"--out {out} is not empty and holds no collection ({others[0].name}); "
                              f"choose a new folder")
        return None, set()
    try:
        manifest = json.loads(mpath.read_text())
        old = manifest["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EngineError(f"--out {out}: {MANIFEST} is not a collection manifest") from None
    if manifest.get("format") != FORMAT:
        raise EngineError(f"--out {out} holds a {manifest.get('format')!r} folder, not a collection")
    if not failpoints.active("collect.no_identity_check"):
        why = _mismatch(out, old, identity)
        if why:
            raise EngineError(why)
        if manifest.get("shards") != [asdict(s) for s in shards]:
            raise EngineError(f"--out {out}: its shard layout differs from this run's (another tokenizer?); "
                              f"use a new --out")
    for p in out.glob("shard-*.partial"):
        shutil.rmtree(p, ignore_errors=True)
    done = set()
    by_name = {s.name: s for s in shards}
    for d in out.glob("shard-*"):
        spec = by_name.get(d.name)
        if spec is None or not d.is_dir():
            continue
        try:
            rec = json.loads((d / SHARD_JSON).read_text())
        except (OSError, ValueError):
            raise EngineError(f"--out {out}: {d.name} has no readable {SHARD_JSON}; remove that folder to "
                              f"recompute it") from None
        if failpoints.active("collect.publish_early") and rec == {}:
            done.add(spec.index)
            continue
        if (rec.get("first"), rec.get("n_prompts"), rec.get("rows")) != (spec.first, spec.n_prompts, spec.rows):
            raise EngineError(f"--out {out}: {d.name} does not hold the prompts this collection plans for it")
        done.add(spec.index)
    return manifest, done


def disk_bytes(out: Path) -> int:
    """Bytes of the files under out."""
    return sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())


# -- progress --------------------------------------------------------------------------------
class _Progress:
    """Prompts, tokens, tokens/s and ETA on stderr: in place on a terminal, else a line every 10 s."""

    def __init__(self, total_prompts, total_tokens, done_prompts, done_tokens, enabled=True):
        self.total_p, self.total_t = total_prompts, total_tokens
        self.done_p, self.done_t = done_prompts, done_tokens
        self.run_t, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.enabled, self.tty = enabled, sys.stderr.isatty()

    def add(self, prompts: int, tokens: int) -> None:
        self.done_p += prompts
        self.done_t += tokens
        self.run_t += tokens
        self.show()

    def show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        rate = self.run_t / (now - self.t0) if now > self.t0 else 0.0
        left = self.total_t - self.done_t
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        line = (f"collect: {self.done_p}/{self.total_p} prompts, {self.done_t:,}/{self.total_t:,} tokens, "
                f"{rate:.1f} tok/s, ETA {eta}")
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


# -- running the shards ----------------------------------------------------------------------
def _run_here(engine, plan, out, todo, prompts, progress, on_shard):
    for spec in todo:
        rec = compute_shard(engine, plan, out, spec, prompts[spec.first:spec.first + spec.n_prompts],
                            on_prompt=lambda n: progress.add(1, n))
        on_shard(rec)


class ShardWorker:
    """A worker's state: one loaded model computing shards into `out`. A local worker process
    holds one; as a Ray actor (made one by _run_ray, so that importing this module needs no Ray)
    it writes into a folder every node shares."""

    def __init__(self, model_path, exact, threads, stages, layers, out):
        from engine.api import Engine, set_threads
        set_threads(threads)
        self.engine = Engine(Path(model_path), exact=exact)
        self.plan, self.out = TracePlan(stages, layers), Path(out)

    def run(self, spec, prompts) -> dict:
        try:
            return compute_shard(self.engine, self.plan, self.out, spec, prompts)
        except EngineError as e:
            raise RuntimeError(str(e)) from None


def _local_worker(model_path, exact, threads, stages, layers, out, tasks, events):
    """A local worker process: load the model once, then compute shards from `tasks` until None."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the driver's: it stops the workers
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:   # the driver died before prctl took effect
        os._exit(1)
    try:
        worker = ShardWorker(model_path, exact, threads, stages, layers, out)
        while (task := tasks.get()) is not None:
            spec, prompts = task
            rec = compute_shard(worker.engine, worker.plan, worker.out, spec, prompts,
                                on_prompt=lambda n: events.put(("prompt", n)))
            events.put(("shard", rec))
    except BaseException as e:  # noqa: BLE001  (reported to the driver, which stops the collection)
        events.put(("error", f"{type(e).__name__}: {e}" if not isinstance(e, EngineError) else str(e)))


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG):
    a driver killed with -9 must not leave workers computing shards that nobody collects."""
    import ctypes
    import signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_local(engine, plan, out, todo, prompts, progress, on_shard, workers, threads):
    import multiprocessing as mp
    import queue
    ctx = mp.get_context("spawn")   # fork after Numba/OpenMP started threads is unsafe
    tasks, events = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_local_worker, daemon=True,
                         args=(str(engine.path), bool(engine.model.exact), threads, plan.stages, plan.layers,
                               str(out), tasks, events)) for _ in range(workers)]
    pending = list(todo)

    def feed():
        spec = pending.pop(0)
        tasks.put((spec, prompts[spec.first:spec.first + spec.n_prompts]))

    for _ in range(min(2 * workers, len(pending))):
        feed()
    for p in procs:
        p.start()
    left = len(todo)
    try:
        while left:
            try:
                kind, what = events.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive()]
                if dead:
                    raise EngineError(f"a collect worker died (exit code {dead[0].exitcode}); finished shards are "
                                      f"kept: run the same command to resume") from None
                continue
            if kind == "prompt":
                progress.add(1, what)
            elif kind == "shard":
                left -= 1
                progress.add(0, 0)
                on_shard(what)
                if pending:
                    feed()
            else:
                raise EngineError(f"a collect worker failed: {what}")
        for _ in procs:
            tasks.put(None)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def import_ray():
    try:
        import ray
    except ImportError:
        ray = None
    # a folder named ray on sys.path (Ray's own session folder /tmp/ray, when run from /tmp)
    # imports as an empty namespace package
    if ray is None or not hasattr(ray, "remote"):
        raise EngineError("--ray needs Ray: pip install 'numgguf[ray]'")
    return ray


def _run_ray(engine, plan, out, todo, prompts, progress, on_shard, workers, threads, address):
    ray = import_ray()
    import logging
    started = not ray.is_initialized()
    if started:
        kw = dict(address=address) if address else dict(num_cpus=os.cpu_count(), include_dashboard=False)
        try:
            ray.init(logging_level=logging.ERROR, log_to_driver=True, **kw)
        except Exception as e:  # noqa: BLE001  (Ray raises many kinds: ConnectionError, RuntimeError, ...)
            raise EngineError(f"--ray {address or '(local)'}: cannot start or reach the Ray cluster: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    actors = []
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        fit = cpus // threads
        if fit < 1:
            raise EngineError(f"--worker-threads {threads} is more than the Ray cluster's {cpus} CPUs")
        if workers is not None and workers > fit:   # actors beyond the CPUs would wait forever
            print(f"note: the Ray cluster has {cpus} CPUs: running {fit} actors of {threads} threads, "
                  f"not {workers}", file=sys.stderr)
        workers = fit if workers is None else min(workers, fit)
        actor_cls = ray.remote(num_cpus=threads)(ShardWorker)
        actors = [actor_cls.remote(str(engine.path), bool(engine.model.exact), threads, plan.stages, plan.layers,
                                   str(Path(out).resolve())) for _ in range(min(workers, len(todo)))]
        pending, running = list(todo), {}

        def submit(actor):
            spec = pending.pop(0)
            ref = actor.run.remote(spec, prompts[spec.first:spec.first + spec.n_prompts])
            running[ref] = (actor, spec)

        for a in actors:
            if pending:
                submit(a)
        while running:
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                actor, spec = running.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # noqa: BLE001  (a task's error, re-raised by Ray)
                    cause = getattr(e, "cause", None) or e
                    raise EngineError(f"a Ray collect worker failed on {spec.name}: "
                                      f"{str(cause).splitlines()[-1] if str(cause) else type(cause).__name__}") from None
                if not (Path(out) / spec.name / SHARD_JSON).exists():
                    raise EngineError(f"Ray worker {rec.get('worker')} wrote {spec.name}, but it is not under --out "
                                      f"{out} here: on a cluster --out must be a filesystem every node shares")
                progress.add(spec.n_prompts, spec.rows)
                on_shard(rec)
                if pending:
                    submit(actor)
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()


# -- the collection --------------------------------------------------------------------------
def collect(engine, prompts_path, plan: TracePlan, out, raw: bool = False, max_prompt_tokens: int | None = None,
            shard_tokens: int | None = None, workers: int | None = None, threads: int | None = None,
            ray_address: str | None = None, use_ray: bool = False, model_sha256: str | None = None,
            progress: bool = True) -> dict:
    """Collect `plan`'s stages for every prompt of `prompts_path` into shards under `out`
    (resuming a collection there made with the same settings); return the final manifest.

    workers: local worker processes (default 1: this process), or with use_ray the Ray actors
    (default: the cluster's CPUs / threads). threads: Numba threads per worker (default: this
    machine's cores / workers; 1 under Ray)."""
    check_plan(plan)
    out = Path(out)
    prompts_path = Path(prompts_path)
    if shard_tokens is not None and shard_tokens < 1:
        raise EngineError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    n_ctx = engine.n_ctx
    max_prompt_tokens = n_ctx if max_prompt_tokens is None else max_prompt_tokens
    if not 1 <= max_prompt_tokens <= engine.config.context:
        raise EngineError(f"--max-prompt-tokens must be between 1 and the model's context length "
                          f"{engine.config.context}, got {max_prompt_tokens}")
    cores = os.cpu_count() or 1
    if threads is None:
        threads = 1 if use_ray else max(1, cores // (workers or 1))
    workers = (None if use_ray else 1) if workers is None else workers
    lines = read_prompts(prompts_path)
    if out.exists() and not out.is_dir():
        raise EngineError(f"--out {out} exists and is not a directory")
    identity = {"model_sha256": model_sha256 or file_sha256(engine.path), "arch": engine.config.arch,
                "stages": list(plan.stages), "layers": list(plan.layers), "raw": bool(raw),
                "exact": bool(engine.model.exact), "max_prompt_tokens": max_prompt_tokens,
                "prompts_sha256": file_sha256(prompts_path)}
    out.mkdir(parents=True, exist_ok=True)
    lock = _Lock(out)
    try:
        prompts, empty = tokenize_prompts(engine, lines, raw, max_prompt_tokens, progress)
        if not prompts:
            raise EngineError(f"--prompts {prompts_path}: no prompt has any token")
        total_tokens = sum(len(p.ids) for p in prompts)
        identity["shard_tokens"] = auto_shard_tokens(total_tokens) if shard_tokens is None else shard_tokens
        shards = plan_shards([len(p.ids) for p in prompts], identity["shard_tokens"])
        manifest, done = open_out(out, identity, shards)
        if manifest is None:
            cfg = engine.config
            manifest = {
                "format": FORMAT, "version": VERSION, "complete": False, "identity": identity,
                "model": str(engine.path), "prompts_file": str(prompts_path.resolve()), "n_layers": cfg.n_layers,
                "files": [{"stage": s, "layer": layer, "width": _width(s, cfg)} for s, layer in planned_keys(plan)],
                "counts": {"prompts_in_file": len(lines), "prompts": len(prompts), "empty_skipped": empty,
                           "truncated_prompts": sum(1 for p in prompts if p.truncated),
                           "truncated_tokens": sum(p.truncated for p in prompts), "tokens": total_tokens,
                           "shards": len(shards)},
                "shards": [asdict(s) for s in shards], "runs": []}
            _write_json_atomic(out / MANIFEST, manifest)
        elif manifest.get("complete"):
            return manifest
        todo = [s for s in shards if s.index not in done]
        done_specs = [s for s in shards if s.index in done]
        prog = _Progress(len(prompts), total_tokens, sum(s.n_prompts for s in done_specs),
                         sum(s.rows for s in done_specs), enabled=progress)
        t0, computed = time.time(), []
        try:
            if use_ray:
                _run_ray(engine, plan, out, todo, prompts, prog, computed.append, workers, threads, ray_address)
            elif workers > 1 and len(todo) > 1:
                _run_local(engine, plan, out, todo, prompts, prog, computed.append, min(workers, len(todo)), threads)
            else:
                _run_here(engine, plan, out, todo, prompts, prog, computed.append)
        except BaseException:
            if progress:
                sys.stderr.write(f"\ncollect stopped: {len(done) + len(computed)} of {len(shards)} shards are "
                                 f"complete in {out}; run the same command to resume\n")
            raise
        prog.show(final=True)
        seconds = time.time() - t0
        run_tokens = sum(r["rows"] for r in computed)
        manifest["runs"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                                 "seconds": round(seconds, 3), "shards": len(computed), "tokens": run_tokens,
                                 "tok_s": round(run_tokens / seconds, 2) if seconds > 0 else None,
                                 "workers": workers, "threads_per_worker": threads, "ray": bool(use_ray)})
        disk = disk_bytes(out)
        manifest["counts"]["disk_bytes"] = disk
        manifest["counts"]["bytes_per_token"] = round(disk / total_tokens, 1)
        total_s = sum(r["seconds"] for r in manifest["runs"])
        manifest["throughput"] = {"tok_s": round(sum(r["tokens"] for r in manifest["runs"]) / total_s, 2)
                                  if total_s > 0 else None, "seconds": round(total_s, 3)}
        manifest["complete"] = True
        _write_json_atomic(out / MANIFEST, manifest)
        return manifest
    finally:
        lock.release()


def _width(stage: str, cfg) -> int:
    from trace.sink import stage_file_shape
    return stage_file_shape(stage, cfg, 1, 1)[1]



def collection_plan(stages_text: str, layers_text: str, cfg) -> TracePlan:
    """The plan of ``collect --stages/--layers``: as trace's, but only per-token stages; ``all``
    leaves out attention and lm_head, naming one of them is an error."""
    plan = plan_for_model(stages_text, layers_text, cfg)
    named = [s for s in plan.stages if _no_rows(s) and _named(stages_text, s)]
    if named:
        check_plan(TracePlan(named, plan.layers))
    return TracePlan(tuple(s for s in plan.stages if not _no_rows(s)), plan.layers)


def _no_rows(stage: str) -> bool:
    return stage in ATTENTION_STAGES or stage == "lm_head"
