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
