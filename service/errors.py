"""The one error shape of the service: ``{"error": code, "detail": text}`` with a 4xx/5xx status."""

from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail}
