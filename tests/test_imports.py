"""Our `trace` package shadows the stdlib module when run from the repo root, as documented."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_repo_root_imports_our_trace_package():
    out = subprocess.run([sys.executable, "-c", "import trace; print(trace.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve() == REPO / "trace" / "__init__.py"


def test_in_process_trace_is_ours():
    import trace
    assert hasattr(trace, "IS_NUMGGUF_TRACE")
    assert Path(trace.__file__).resolve().parent == REPO / "trace"


def _imported_packages(path: Path) -> set[str]:
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_one_way():
    """kernels <- engine <- trace <- cli (DESIGN.md): no module imports a layer above its own,
    and no fail point lives in kernels/."""
    above = {"kernels": {"engine", "trace", "cli", "contracts"}, "engine": {"trace", "cli", "contracts"},
             "trace": {"cli", "contracts"}}
    for package, forbidden in above.items():
        for path in sorted((REPO / package).glob("*.py")):
            bad = _imported_packages(path) & forbidden
            assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
    for path in sorted((REPO / "kernels").glob("*.py")):
        assert "failpoints" not in path.read_text(), f"{path.relative_to(REPO)} holds a fail point"
