"""Errors the engine raises for things a user can fix; their message is shown as is."""


class EngineError(Exception):
    """A failure explained in words a user understands (no traceback needed)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class PreflightError(EngineError):
    """The job cannot succeed; found before any work was queued."""


class CancelledError(EngineError):
    """The job was cancelled while it ran."""
