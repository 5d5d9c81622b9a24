"""One error taxonomy for lamina.

Every error a peer can see carries a wire code (:class:`ErrorCode`).  Adapters convert
these in exactly one place each: the wire server (``lamina.wire.connection``) turns a
:class:`LaminaError` into an error frame and back; the CLI turns it into a message and
an exit code.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ErrorCode(IntEnum):
    """Wire codes of errors (0 is success)."""

    OK = 0
    BAD_REQUEST = 1
    STALE = 2
    NO_LEASE = 3
    NOT_FOUND = 4
    DELETED = 5
    CORRUPT = 6
    NO_SPACE = 7
    CONFLICT = 8
    AUTH_FAILED = 9
    UNSUPPORTED_VERSION = 10
    TOO_LARGE = 11
    IO_ERROR = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class LaminaError(Exception):
    """Base of every error lamina reports; ``code`` is its wire code."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str, detail: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class LocalError(LaminaError):
    """A problem with local configuration or files (never sent on the wire)."""

    code = ErrorCode.BAD_REQUEST


class ProtocolError(LaminaError):
    """A frame or message that breaks the wire protocol (malformed, out of range)."""

    code = ErrorCode.BAD_REQUEST


class BadRequest(ProtocolError):
    """A well-formed request that asks for something invalid (e.g. offset past the page)."""

    code = ErrorCode.BAD_REQUEST


class FrameTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class AuthFailed(LaminaError):
    code = ErrorCode.AUTH_FAILED


class StaleEpoch(LaminaError):
    """The request's epoch is older than the volume's fence epoch; ``detail`` is current."""

    code = ErrorCode.STALE

    @property
    def current_epoch(self) -> int:
        return self.detail or 0


class NoLease(LaminaError):
    code = ErrorCode.NO_LEASE


class NotFound(LaminaError):
    code = ErrorCode.NOT_FOUND


class Deleted(LaminaError):
    """The page was tombstoned (moved up): the reader must look again."""

    code = ErrorCode.DELETED


class Corrupt(LaminaError):
    """A checksum did not match: the page is quarantined on this server."""

    code = ErrorCode.CORRUPT


class NoSpace(LaminaError):
    code = ErrorCode.NO_SPACE


class Conflict(LaminaError):
    """A compare-and-set lost: ``detail`` is the current generation."""

    code = ErrorCode.CONFLICT


class StorageIOError(LaminaError):
    code = ErrorCode.IO_ERROR


class InternalError(LaminaError):
    code = ErrorCode.INTERNAL


class Unavailable(LaminaError):
    """The peer is not ready to serve (starting, shutting down, connection lost)."""

    code = ErrorCode.UNAVAILABLE


_BY_CODE: dict[ErrorCode, type[LaminaError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.STALE: StaleEpoch,
    ErrorCode.NO_LEASE: NoLease,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.DELETED: Deleted,
    ErrorCode.CORRUPT: Corrupt,
    ErrorCode.NO_SPACE: NoSpace,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.AUTH_FAILED: AuthFailed,
    ErrorCode.UNSUPPORTED_VERSION: UnsupportedVersion,
    ErrorCode.TOO_LARGE: FrameTooLarge,
    ErrorCode.IO_ERROR: StorageIOError,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.UNAVAILABLE: Unavailable,
}


def error_from_code(code: int, message: str, detail: int | None = None) -> LaminaError:
    """Rebuild the typed error a peer sent; unknown codes become :class:`InternalError`."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except (ValueError, KeyError):
        return InternalError(f"unknown error code {code}: {message}", detail)
    return cls(message, detail)
