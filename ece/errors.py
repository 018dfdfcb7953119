"""One exception type for every user-facing failure, so stages can print it without a traceback."""

from __future__ import annotations


class EceError(Exception):
    """A problem the user can fix: the message says what is wrong, `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base
