"""Domain errors shared by every tier, and their one mapping to gRPC status codes.

Servicers raise or catch these and call `abort_with`/`status_of` at the edge; nothing below the servicers knows
about gRPC.
"""

from __future__ import annotations

import grpc


class SpecdecError(Exception):
    """Base of every error a specdec server reports to its caller."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(SpecdecError, ValueError):
    """The request cannot be served as written; the message says what to change."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Exhausted(SpecdecError):
    """The server is full (KV memory or sessions); retrying later can succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SpecdecError):
    """No pod can take the request now (none reachable, or shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class SessionFailed(SpecdecError):
    """A session failed for a reason reported by another tier, with that tier's status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
