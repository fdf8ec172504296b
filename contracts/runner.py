"""Validate contracts/<name>-v<major>.yaml and run their falsification tests.

A test is a pytest node id (``tests/test_x.py::test_y[param]``) or a shell command
(``sh:CMD``, run from the repo root; exit 0 = pass). Tests of one contract run in one
pytest process; with ``mutate`` each test runs again with its mutation switched on
(``NUMGGUF_FAILPOINTS=<mutation>``, see engine/failpoints.py) and must fail.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.failpoints import CATALOGUE, ENV

REPO = Path(__file__).resolve().parents[1]
DIR = REPO / "contracts"
FILE_RE = re.compile(r"([a-z0-9][a-z0-9-]*)-v([0-9]+)\.yaml")
SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?")
TOP_KEYS = ("metadata", "equations", "falsification_tests", "proof_obligations", "verification_summary")
META_KEYS = ("kind", "version", "status", "description", "references")
EQ_KEYS = ("formula", "domain", "codomain", "invariants")
TEST_KEYS = ("id", "rule", "prediction", "test", "binds_to", "if_fails", "status", "mutation")
TEST_STATUSES = ("ALGORITHM_LEVEL", "LIVE")
MUTATION_ENV = "NUMGGUF_CONTRACT_MUTATION"  # set (to the mutation's name) in mutation runs


class ContractError(ValueError):
    """A malformed contract; the message is one line naming the file (and the test id)."""


@dataclass
class FTest:
    id: str
    contract: str
    binds_to: str
    status: str
    test: str
    mutation: str
    result: str = "NOT_RUN"
    seconds: float = 0.0
    mutated: str | None = None
    mutated_seconds: float = 0.0
    detail: str = ""


@dataclass
class Contract:
    name: str
    path: Path
    data: dict
    tests: list[FTest] = field(default_factory=list)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _check_test_exists(spec: str, root: Path) -> str | None:
    """None if the test exists, else why not."""
    if spec.startswith("sh:"):
        return None if spec[3:].strip() else "empty shell command"
    parts = spec.split("::")
    if len(parts) < 2 or not parts[0].endswith(".py"):
        return f"test {spec!r} is neither a pytest node id (path.py::name) nor 'sh:COMMAND'"
    f = root / parts[0]
    if not f.is_file():
        return f"test file {parts[0]} does not exist"
    func = parts[-1].split("[", 1)[0]
    if not re.search(rf"^\s*(async\s+)?def {re.escape(func)}\(", f.read_text(), re.M):
        return f"test function {func} not found in {parts[0]}"
    return None


def load_contract(path: Path, root: Path = REPO) -> Contract:
    """Parse and validate one contract file (everything but cross-file id uniqueness)."""
    where = _rel(path)
    m = FILE_RE.fullmatch(path.name)
    if not m:
        raise ContractError(f"{where}: file name must be <name>-v<major>.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ContractError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ContractError(f"{where}: top level must be a mapping")
    for k in TOP_KEYS:
        if k not in data:
            raise ContractError(f"{where}: missing required key {k!r}")
    meta = data["metadata"]
    if not isinstance(meta, dict):
        raise ContractError(f"{where}: metadata must be a mapping")
    for k in META_KEYS:
        if k not in meta:
            raise ContractError(f"{where}: metadata: missing required key {k!r}")
    sv = SEMVER.fullmatch(str(meta["version"]))
    if not sv:
        raise ContractError(f"{where}: metadata.version {meta['version']!r} is not semver (MAJOR.MINOR.PATCH)")
    if sv[1] != m[2]:
        raise ContractError(f"{where}: metadata.version {meta['version']} does not match the file's v{m[2]}")
    if not isinstance(meta["references"], list):
        raise ContractError(f"{where}: metadata.references must be a list")
    eqs = data["equations"]
    if not isinstance(eqs, dict) or not eqs:
        raise ContractError(f"{where}: equations must be a non-empty mapping name -> equation")
    for name, eq in eqs.items():
        if not isinstance(eq, dict):
            raise ContractError(f"{where}: equation {name!r} must be a mapping")
        for k in EQ_KEYS:
            if k not in eq:
                raise ContractError(f"{where}: equation {name!r}: missing required key {k!r}")
        if not isinstance(eq["invariants"], list) or not eq["invariants"]:
            raise ContractError(f"{where}: equation {name!r}: invariants must be a non-empty list")
    tests = data["falsification_tests"]
    if not isinstance(tests, list) or not tests:
        raise ContractError(f"{where}: falsification_tests must be a non-empty list")
    c = Contract(m[1], path, data)
    seen = set()
    for i, t in enumerate(tests):
        if not isinstance(t, dict):
            raise ContractError(f"{where}: falsification_tests[{i}] must be a mapping")
        tid = t.get("id", f"#{i}")
        for k in TEST_KEYS:
            if k not in t:
                raise ContractError(f"{where}: test id {tid!r}: missing required key {k!r}")
        if tid in seen:
            raise ContractError(f"{where}: test id {tid!r}: duplicate id")
        seen.add(tid)
        if t["binds_to"] not in eqs:
            raise ContractError(f"{where}: test id {tid!r}: binds_to {t['binds_to']!r} names no equation "
                                f"(equations: {', '.join(eqs)})")
        if t["status"] not in TEST_STATUSES:
            raise ContractError(f"{where}: test id {tid!r}: status {t['status']!r} is not one of "
                                f"{', '.join(TEST_STATUSES)}")
        if t["mutation"] not in CATALOGUE:
            raise ContractError(f"{where}: test id {tid!r}: mutation {t['mutation']!r} is not a fail point "
                                f"in engine/failpoints.py")
        why = _check_test_exists(str(t["test"]), root)
        if why:
            raise ContractError(f"{where}: test id {tid!r}: {why}")
        c.tests.append(FTest(str(tid), c.name, t["binds_to"], t["status"], str(t["test"]), t["mutation"]))
    for k in ("proof_obligations",):
        if not isinstance(data[k], list):
            raise ContractError(f"{where}: {k} must be a list")
    return c


def load_all(directory: Path = DIR, root: Path = REPO) -> list[Contract]:
    """Every contract in `directory`, validated; test ids unique across all of them."""
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise ContractError(f"{_rel(Path(directory))}: no contracts (*.yaml)")
    contracts = [load_contract(f, root) for f in files]
    owner: dict[str, Path] = {}
    names: dict[str, Path] = {}
    for c in contracts:
        if c.name in names:
            raise ContractError(f"{_rel(c.path)}: contract {c.name!r} also defined in {_rel(names[c.name])}")
        names[c.name] = c.path
        for t in c.tests:
            if t.id in owner:
                raise ContractError(f"{_rel(c.path)}: test id {t.id!r}: duplicate id (also in {_rel(owner[t.id])})")
            owner[t.id] = c.path
    return contracts


def _nodeid(case: ET.Element) -> str:
    cls, name = case.get("classname", ""), case.get("name", "")
    parts = cls.split(".")
    # module-level functions: classname is the module; methods: module.Class
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (REPO / path).is_file():
            return "::".join([path, *parts[cut:], name])
    return f"{cls}::{name}"


def _run_pytest(nodes: list[str], env: dict, root: Path) -> dict[str, tuple[str, float, str]]:
    """Run node ids in one pytest process; {node: (PASS|FAIL|SKIP, seconds, detail)}."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={xml}", *nodes]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        out: dict[str, tuple[str, float, str]] = {}
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                skip = case.find("skipped")
                res = "FAIL" if bad is not None else "SKIP" if skip is not None else "PASS"
                el = bad if bad is not None else skip
                detail = (el.get("message") or "").splitlines()[0][:200] if el is not None and el.get("message") else ""
                out[_nodeid(case)] = (res, float(case.get("time") or 0), detail)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    for n in nodes:
        if n in out:
            continue
        # a node without [params] whose function (or fixture) is parametrized: all of its cases
        cases = [v for k, v in out.items() if "[" not in n and k.startswith(n + "[")]
        if not cases:
            out[n] = ("FAIL", 0.0, f"not collected (pytest exit {proc.returncode}): {tail[0][:200]}")
            continue
        results = [r for r, _, _ in cases]
        res = "FAIL" if "FAIL" in results else "PASS" if "PASS" in results else "SKIP"
        detail = next((d for r, _, d in cases if r == res and d), "")
        out[n] = (res, sum(sec for _, sec, _ in cases), detail)
    return out


def _run_shell(cmd: str, env: dict, root: Path) -> tuple[str, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=root, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return ("PASS" if proc.returncode == 0 else "FAIL", time.perf_counter() - t0,
            "" if proc.returncode == 0 else f"exit {proc.returncode}: {tail[0][:200]}")


def _run(tests: list[FTest], mutation: str | None, root: Path) -> dict[str, tuple[str, float, str]]:
    env = dict(os.environ)
    env.pop(ENV, None)
    env.pop(MUTATION_ENV, None)
    if mutation:
        env[ENV] = mutation
        env[MUTATION_ENV] = mutation
    results = {}
    py = [t for t in tests if not t.test.startswith("sh:")]
    if py:
        by_node = _run_pytest(list(dict.fromkeys(t.test for t in py)), env, root)
        for t in py:
            results[t.id] = by_node[t.test]
    for t in tests:
        if t.test.startswith("sh:"):
            results[t.id] = _run_shell(t.test[3:], env, root)
    return results


def run(contracts: list[Contract], mutate: bool = False, root: Path = REPO, log=None) -> bool:
    """Run every test (and, with mutate, every mutation); fill in results; return overall ok."""
    ok = True
    for c in contracts:
        if log:
            log(f"contract {c.name}: {len(c.tests)} tests")
        normal = _run(c.tests, None, root)
        for t in c.tests:
            t.result, t.seconds, t.detail = normal[t.id]
            ok &= t.result != "FAIL"
        if not mutate:
            continue
        for mutation in dict.fromkeys(t.mutation for t in c.tests):
            group = [t for t in c.tests if t.mutation == mutation]
            runnable = [t for t in group if t.result == "PASS"]
            for t in group:
                if t.result != "PASS":
                    t.mutated = "NOT_EXERCISED"  # the normal run did not pass: nothing to falsify
            if not runnable:
                continue
            if log:
                log(f"contract {c.name}: mutation {mutation}: {len(runnable)} tests")
            res = _run(runnable, mutation, root)
            for t in runnable:
                r, sec, detail = res[t.id]
                t.mutated_seconds = sec
                if r == "FAIL":
                    t.mutated = "CAUGHT"
                elif r == "PASS":
                    t.mutated, t.detail = "UNFALSIFIABLE", f"passes with {mutation} switched on"
                    ok = False
                else:  # skipped under the mutation although it ran normally
                    t.mutated, t.detail = "NOT_EXERCISED", f"skipped under {mutation}: {detail}"
                    ok = False
    return ok


def ledger_json(contracts: list[Contract], ok: bool, mutate: bool) -> dict:
    return {
        "ok": ok,
        "mutate": mutate,
        "contracts": [{"name": c.name, "file": _rel(c.path), "version": str(c.data["metadata"]["version"]),
                       "tests": len(c.tests)} for c in contracts],
        "tests": [{"id": t.id, "contract": t.contract, "equation": t.binds_to, "status": t.status,
                   "test": t.test, "result": t.result, "seconds": round(t.seconds, 3),
                   "mutation": t.mutation, "mutated": t.mutated,
                   "mutated_seconds": round(t.mutated_seconds, 3), "detail": t.detail}
                  for c in contracts for t in c.tests],
    }


def format_ledger(contracts: list[Contract], ok: bool, mutate: bool) -> str:
    rows = [("id", "equation", "status", "result", "seconds") + (("mutation", "under mutation") if mutate else ())]
    for c in contracts:
        for t in c.tests:
            rows.append((t.id, f"{c.name}/{t.binds_to}", t.status, t.result, f"{t.seconds:.2f}")
                        + ((t.mutation, t.mutated or "-") if mutate else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    for c in contracts:
        for t in c.tests:
            if t.detail and (t.result == "FAIL" or t.mutated in ("UNFALSIFIABLE", "NOT_EXERCISED")):
                lines.append(f"  {t.id}: {t.detail}")
    tests = [t for c in contracts for t in c.tests]
    count = lambda attr, v: sum(getattr(t, attr) == v for t in tests)  # noqa: E731
    summary = (f"{len(contracts)} contracts, {len(tests)} tests: {count('result', 'PASS')} passed, "
               f"{count('result', 'FAIL')} failed, {count('result', 'SKIP')} skipped")
    if mutate:
        summary += (f"; mutations: {count('mutated', 'CAUGHT')} caught, {count('mutated', 'UNFALSIFIABLE')} "
                    f"unfalsifiable, {count('mutated', 'NOT_EXERCISED')} not exercised")
    lines.append(summary + (" - OK" if ok else " - FAILED"))
    return "\n".join(lines)


def main(names=(), mutate: bool = False, as_json: bool = False, directory: Path = DIR, root: Path = REPO) -> int:
    try:
        contracts = load_all(directory, root)
    except ContractError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if names:
        known = {c.name for c in contracts}
        unknown = [n for n in names if n not in known]
        if unknown:
            print(f"error: unknown contract {unknown[0]!r}; known: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
        contracts = [c for c in contracts if c.name in names]
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    ok = run(contracts, mutate, root, log)
    if as_json:
        out = ledger_json(contracts, ok, mutate)
        out["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(out))
    else:
        print(format_ledger(contracts, ok, mutate))
        print(f"contracts: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0 if ok else 1
