"""User-facing errors.

Every problem a user can fix (a bad file, a bad value, a missing model) is raised as :class:`SafeFTError` with a
one-line message that names the file, line or field and says what to do. The CLI prints it and exits with code 2,
never with a traceback.
"""

from __future__ import annotations


class SafeFTError(Exception):
    """An error the user can fix. ``str(err)`` is a complete one-line message."""

    exit_code = 2


def require(condition: bool, message: str) -> None:
    """Raise :class:`SafeFTError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SafeFTError(message)
