"""The one error type of the HTTP layer: a status and a message for the client ({"error": message})."""

from __future__ import annotations


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
