"""Errors that the `dd` command turns into one clear line and a non-zero exit code."""


class StageError(Exception):
    """A stage could not do its work; the message says what, where and how to fix it (exit 1)."""
