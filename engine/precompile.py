"""A first run's kernel compiles, shared between this process and a helper process.

Numba compiles a kernel in the process that first calls it, one at a time (a global lock), so
a first run of a model compiles its ~20 kernels back to back on one core (~20 s for the 1.5B)
while the other core idles. Here the kernels a warm-up will ask for are found first, without
compiling anything: the warm-up runs with Numba's `Dispatcher.compile` replaced by one that
records (kernel, signature) and returns a no-op (`kernel_plan`). A helper process finds the
same plan from the same file, and the two compile it from opposite ends, each claiming an
entry by creating its file in a shared directory, so the expensive kernels spread over both
cores with no cost model. Both write Numba's on-disk cache; this process then loads what the
helper compiled (`warm_in_parallel`). Whatever goes wrong in the helper costs only time: every
entry it did not finish is compiled here, and the warm-up that follows asks Numba for the rest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from numba.core import sigutils
from numba.core.dispatcher import Dispatcher

from engine import failpoints


def _noop(*args, **kws):
    return None


def kernel_plan(run) -> list[tuple[Dispatcher, tuple, bool]]:
    """The (kernel, signature, explicit) entries that `run()` (a warm-up) asks Numba for, in
    the order it asks, found with every kernel call a no-op: nothing is compiled or loaded, and
    `run`'s arrays hold garbage afterwards. `explicit`: the kernel is compiled for that one
    signature only (njit with a signature list); it is recorded with it alone, and its
    disable_compile waits for `compile_entries`. Compile the plan (compile_entries) before
    any kernel runs again: an explicit-signature kernel first made during `run` has none yet."""
    plan, explicit = [], set()
    real_compile, real_disable = Dispatcher.compile, Dispatcher.disable_compile
    owner = threading.get_ident()   # other threads' kernels compile as usual meanwhile

    def record(self, sig):
        if threading.get_ident() != owner:
            return real_compile(self, sig)
        args, _ = sigutils.normalize_signature(sig)
        if id(self) not in explicit and tuple(args) not in self.overloads:
            plan.append((self, sig, tuple(args)))
        return _noop

    def defer(self, val=True):
        if threading.get_ident() != owner:
            return real_disable(self, val)
        explicit.add(id(self))

    Dispatcher.compile, Dispatcher.disable_compile = record, defer
    try:
        run()
    except Exception:   # noqa: BLE001 - Python code that reads a no-op kernel's result: the plan so far
        pass            # is what this run can share; the warm-up compiles the rest (and raises what is wrong)
    finally:
        Dispatcher.compile, Dispatcher.disable_compile = real_compile, real_disable
    seen, entries = set(), []
    for disp, sig, args in plan:
        if (id(disp), args) not in seen:
            seen.add((id(disp), args))
            entries.append((disp, sig, id(disp) in explicit))
    return entries


def describe(plan) -> list[str]:
    """One line per entry, the same in every process that records the same plan."""
    return [f"{d.py_func.__module__}.{d.py_func.__qualname__}{sigutils.normalize_signature(sig)[0]}"
            for d, sig, _ in plan]


def _claimed(claims: Path) -> int:
    return sum(1 for f in claims.iterdir() if f.name.isdigit())


def compile_entries(plan, order, claims: Path | None = None, progress=None) -> None:
    """Compile (or load from the cache) the plan's entries in `order` (indices); with `claims`,
    only those whose claim file this process creates first, calling progress(claimed, total)
    (claimed by either process) before each. An entry that fails to compile is left to the
    warm-up (which compiles what it calls, and raises what is wrong)."""
    for i in order:
        if claims is not None:
            try:
                os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            if progress is not None:
                progress(_claimed(claims), len(plan))
        disp, sig, explicit = plan[i]
        try:
            disp.compile(sig)
            if explicit:
                disp.disable_compile()
        except Exception:   # noqa: BLE001 - the warm-up compiles it again and reports a real error
            pass


def warm_in_parallel(engine, run, progress=None) -> int | None:
    """Compile what `run()` (the engine's warm-up forward) needs, this process and a helper
    each taking part (see the module doc); `progress(claimed, total)` is called as entries are
    taken. Returns the helper's exit code (0: it recorded the same plan and compiled its part),
    None if none ran; the caller runs `run()` afterwards, which then only loads kernels."""
    plan = kernel_plan(run)
    if failpoints.active("precompile.drop_entry") and plan:
        plan = plan[:-1]
    if len(plan) < 2:
        compile_entries(plan, range(len(plan)))
        return None
    with tempfile.TemporaryDirectory(prefix="numgguf-compile-") as tmp:
        claims = Path(tmp)
        (claims / "plan.json").write_text(json.dumps(describe(plan)))
        cmd = [sys.executable, "-c", "import sys; from engine.precompile import helper_main; "
               "sys.exit(helper_main(sys.argv[1:]))", str(engine.path), str(int(engine.model.exact)), tmp]
        path = [str(Path(__file__).resolve().parents[1])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        try:
            helper = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        except OSError:
            helper = None
        try:
            compile_entries(plan, range(len(plan)), claims, progress)
            if helper is not None:
                while helper.poll() is None:   # its last entries
                    try:
                        helper.wait(timeout=0.25)
                    except subprocess.TimeoutExpired:
                        pass
                    if progress is not None:
                        progress(_claimed(claims), len(plan))
        finally:
            if helper is not None and helper.poll() is None:   # interrupted: the helper goes too
                helper.kill()
                helper.wait()
        compile_entries(plan, range(len(plan)))   # loads what the helper cached; compiles what it did not
    return None if helper is None else helper.returncode


def helper_main(argv: list[str]) -> int:
    """The helper process: load the same model, record the same plan (or do nothing if it
    differs), and compile entries from the end of the plan."""
    from engine.api import Engine
    path, exact, tmp = argv
    claims = Path(tmp)
    engine = Engine(Path(path), exact=bool(int(exact)))
    plan = kernel_plan(engine.warm_forward)
    if failpoints.active("precompile.drop_entry") and plan:
        plan = plan[:-1]
    if describe(plan) != json.loads((claims / "plan.json").read_text()):
        return 1
    compile_entries(plan, reversed(range(len(plan))), claims)
    return 0
