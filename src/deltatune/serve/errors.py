"""The errors a request can get: each an HTTP status and OpenAI's error ``type`` (vLLM's names), with the field
at fault as ``param``; ``protocol.error_body`` writes them in OpenAI's shape."""

from __future__ import annotations

from deltatune.errors import DeltaTuneError


class RequestError(DeltaTuneError):
    """A request the server refuses: an HTTP status, OpenAI's error type and the field at fault."""

    status = 400
    type = "BadRequestError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NotFound(RequestError):
    status, type = 404, "NotFoundError"


class Forbidden(RequestError):
    status, type = 403, "PermissionDeniedError"


class Unauthorized(RequestError):
    status, type = 401, "AuthenticationError"


class Unavailable(RequestError):
    status, type = 503, "ServiceUnavailableError"
