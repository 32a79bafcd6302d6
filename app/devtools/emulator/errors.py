"""The emulator's Kallglot error envelope, shared by its REST modules."""
from __future__ import annotations

from typing import Any

from flask import Response, g, jsonify


class ApiError(Exception):
    """An error answered with the Kallglot error envelope (``{"error": {"type", "code", "message", …}}``, see
    https://developer.kallglot.com/errors)."""

    def __init__(self, status: int, type_: str, code: str, message: str, *, param: str | None = None,
                 retry_after: int | float | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.message = status, type_, code, message
        self.param, self.retry_after = param, retry_after

    def response(self) -> Response:
        """Render the envelope, with ``Retry-After`` when the error carries one."""
        error: dict[str, Any] = {"type": self.type, "code": self.code, "message": self.message}
        if self.param:
            error["param"] = self.param
        error["request_id"] = g.request_id
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        response = jsonify({"error": error})
        response.status_code = self.status
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response
