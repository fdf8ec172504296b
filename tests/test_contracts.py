"""The contract runner: malformed contracts are rejected naming the file and the id; the ledger's shape."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contracts import runner
from contracts.runner import ContractError, load_all

REPO = Path(__file__).resolve().parents[1]


def _contract(tests, equations=("eq",)):
    return {
        "metadata": {"kind": "k", "version": "1.0.0", "status": "active", "description": "d", "references": []},
        "equations": {e: {"formula": "f", "domain": "d", "codomain": "c", "invariants": ["i"]} for e in equations},
        "falsification_tests": tests,
        "proof_obligations": [],
        "verification_summary": {},
    }


def _test(tid, test="sh:true", binds_to="eq", mutation="plan.range_exclusive"):
    return {"id": tid, "rule": "r", "prediction": "p", "test": test, "binds_to": binds_to, "if_fails": "x",
            "status": "ALGORITHM_LEVEL", "mutation": mutation}


def _write(d: Path, name: str, data) -> Path:
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _error(d: Path) -> str:
    with pytest.raises(ContractError) as e:
        load_all(d, REPO)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_real_contracts_validate():
    contracts = load_all()
    names = {c.name for c in contracts}
    assert {"aprt-format", "trace-zero-copy", "trace-plan", "quant-kernels", "tokenizer-parity",
            "forward-parity", "kv-cache-equivalence", "trace-stage-parity", "cli-signature"} <= names
    ids = [t.id for c in contracts for t in c.tests]
    assert len(ids) == len(set(ids))


def test_dangling_binds_to_names_file_and_id(tmp_path):
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("A-1", binds_to="nope")]))
    msg = _error(tmp_path / "c")
    assert "a-v1.yaml" in msg and "'A-1'" in msg and "binds_to 'nope'" in msg


def test_duplicate_id_across_files(tmp_path):
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("X-1")]))
    _write(tmp_path / "c", "b-v1.yaml", _contract([_test("X-1")]))
    msg = _error(tmp_path / "c")
    assert "b-v1.yaml" in msg and "'X-1'" in msg and "duplicate" in msg and "a-v1.yaml" in msg


def test_duplicate_id_within_a_file(tmp_path):
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("X-1"), _test("X-1")]))
    msg = _error(tmp_path / "c")
    assert "a-v1.yaml" in msg and "'X-1'" in msg and "duplicate" in msg


@pytest.mark.parametrize("test, why", [
    ("tests/test_no_such_file.py::test_x", "does not exist"),
    ("tests/test_plan.py::test_no_such_function", "test_no_such_function not found"),
    ("tests/test_plan.py", "neither a pytest node id"),
])
def test_missing_test(tmp_path, test, why):
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("M-1", test=test)]))
    msg = _error(tmp_path / "c")
    assert "a-v1.yaml" in msg and "'M-1'" in msg and why in msg


@pytest.mark.parametrize("drop", ["rule", "mutation", "if_fails", "status"])
def test_missing_test_key(tmp_path, drop):
    t = _test("K-1")
    del t[drop]
    _write(tmp_path / "c", "a-v1.yaml", _contract([t]))
    msg = _error(tmp_path / "c")
    assert "a-v1.yaml" in msg and "'K-1'" in msg and repr(drop) in msg


@pytest.mark.parametrize("top", ["metadata", "equations", "falsification_tests", "proof_obligations",
                                 "verification_summary"])
def test_missing_top_level_key(tmp_path, top):
    data = _contract([_test("T-1")])
    del data[top]
    _write(tmp_path / "c", "a-v1.yaml", data)
    assert _error(tmp_path / "c") == f"contracts/a-v1.yaml: missing required key {top!r}".replace(
        "contracts/", f"{tmp_path}/c/")


def test_unknown_mutation_bad_status_bad_version_bad_name(tmp_path):
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("U-1", mutation="no.such")]))
    assert "'U-1'" in _error(tmp_path / "c") and "no.such" in _error(tmp_path / "c")
    data = _contract([_test("U-1")])
    data["metadata"]["version"] = "2.0.0"
    _write(tmp_path / "d", "a-v1.yaml", data)
    assert "does not match the file's v1" in _error(tmp_path / "d")
    _write(tmp_path / "e", "A_v1.yml.yaml", _contract([_test("U-1")]))
    assert "<name>-v<major>.yaml" in _error(tmp_path / "e")


def test_unknown_failpoint_in_env_is_an_error():
    res = subprocess.run([sys.executable, "-c", "import engine.failpoints"], cwd=REPO, capture_output=True,
                         text=True, env={"NUMGGUF_FAILPOINTS": "plan.range_exclusive,bogus", "PATH": ""})
    assert res.returncode != 0 and "unknown fail point 'bogus'" in res.stderr


def test_run_ledger_json_shape_and_mutation_outcomes(tmp_path, capsys):
    """sh: tests: one that fails only under its mutation (caught), one that ignores it (unfalsifiable)."""
    probe = "python -c \"import os,sys; sys.exit('plan.range_exclusive' in os.environ.get('NUMGGUF_FAILPOINTS',''))\""
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("R-1", test=f"sh:{probe}"), _test("R-2", test="sh:true")]))
    rc = runner.main([], mutate=False, as_json=True, directory=tmp_path / "c", root=REPO)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] is True and out["mutate"] is False
    assert out["contracts"] == [{"name": "a", "file": f"{tmp_path}/c/a-v1.yaml", "version": "1.0.0", "tests": 2}]
    row = out["tests"][0]
    assert set(row) >= {"id", "contract", "equation", "status", "result", "seconds", "mutation", "mutated"}
    assert (row["id"], row["equation"], row["status"], row["result"]) == ("R-1", "eq", "ALGORITHM_LEVEL", "PASS")
    rc = runner.main([], mutate=True, as_json=True, directory=tmp_path / "c", root=REPO)
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["ok"] is False
    assert [t["mutated"] for t in out["tests"]] == ["CAUGHT", "UNFALSIFIABLE"]


def test_pytest_node_ledger_text(tmp_path, capsys):
    node = "tests/test_plan.py::test_parse_layers[0-3-expected0]"
    _write(tmp_path / "c", "p-v1.yaml", _contract([_test("P-1", test=node)]))
    rc = runner.main(["p"], mutate=True, directory=tmp_path / "c", root=REPO)
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "P-1" in text and "p/eq" in text and "CAUGHT" in text and text.rstrip().endswith("- OK")


def test_unknown_contract_name(tmp_path, capsys):
    _write(tmp_path / "c", "a-v1.yaml", _contract([_test("N-1")]))
    assert runner.main(["zzz"], directory=tmp_path / "c", root=REPO) == 2
    assert "unknown contract 'zzz'" in capsys.readouterr().err
