"""The one exception type the CLI turns into a one-line message."""


class EngineError(Exception):
    """A user-facing error: bad file, bad flag, bad input. Message is one line."""

    exit_code = 2
