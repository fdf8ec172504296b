"""Zero-copy activation tracing: APRT files, stage plans, sinks, captures, statistics and diffs.

``trace.load(DIR)`` opens a finished capture (see trace.reader). Note: this package shares its
name with the standard library's ``trace`` module; an installed numgguf makes ``import trace``
find this one from any folder (numgguf-trace.pth, see _numgguf_trace.py), and from the
repository root it is found first anyway.
"""
IS_NUMGGUF_TRACE = True


def load(path):
    """Open the capture in folder `path`: ``cap["ffn_swigl", 3]`` is a read-only memmap [T, dim]."""
    from trace.reader import load as _load
    return _load(path)
