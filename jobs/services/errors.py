"""What the services refuse with, whichever module refuses."""

from __future__ import annotations


class JobStateError(Exception):
    """The job is not in a state that allows this action (e.g. cancelling a finished job)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
