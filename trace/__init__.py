"""Zero-copy activation tracing: APRT files, stage plans, sinks, statistics and diffs.

Note: this package shadows the standard library's ``trace`` module when the
repository root is first on ``sys.path`` (as with ``python -m cli`` and pytest
here); ``tests/test_imports.py`` proves the documented commands import this one.
"""
IS_NUMGGUF_TRACE = True
