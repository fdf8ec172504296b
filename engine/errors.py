"""The one exception type the CLI turns into a one-line message."""


class EngineError(Exception):
    """A user-facing error: bad file, bad flag, bad input. Message is one line."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds (and cleans up) like Ctrl-C."""

    exit_code = 143


def install_signal_handlers() -> None:
    """SIGTERM becomes Terminated; SIGXFSZ (a write past RLIMIT_FSIZE) is ignored, so that write
    fails with OSError EFBIG and is reported like a full disk instead of killing the process."""
    import signal

    def on_term(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_term)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
