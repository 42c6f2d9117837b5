"""The one exception hierarchy for requests that get an error reply: each carries its stable code."""

from __future__ import annotations

from schemas.codes import ErrorCode


class InferenceError(Exception):
    """A request that gets an error reply; ``code`` is what the client sees.

    ``request_id`` and ``model`` are set where the error knows them better than its catcher
    (a rejection of bytes that never became a request); otherwise they stay None.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, request_id: str | None = None, model: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.model = model
