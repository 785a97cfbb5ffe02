"""Errors shared by the daemon and its clients.

Every failure is one code from :class:`ErrorCode` plus a message that says what to do, raised
as one exception type on both sides::

    LoraCacheError            .code: ErrorCode, .message: str
      raised by the daemon's handlers  -> sent as {"code", "message"}; the client raises it
                                          again from the reply
      BadRequest                       a request the daemon could not take as it came
                                          (BAD_REQUEST, VERSION_MISMATCH), with .request_id
                                          when the envelope was read that far
      raised by the client itself      the client-side codes below: DAEMON_UNAVAILABLE,
                                          TIMEOUT, MAPPING_FAILED, CLIENT_CLOSED,
                                          BAD_SOCKET_PATH
    ValueError                         a call that misuses the API (an argument out of its
                                          allowed values, a lease asked of a session=False
                                          client, a duplicate adapter name): fix the code

Foreign errors (ZeroMQ, OS, torch) are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """The closed set of error codes; the wire carries the name."""

    BAD_REQUEST = "BAD_REQUEST"  # malformed message, unknown op, wrong field types
    VERSION_MISMATCH = "VERSION_MISMATCH"  # client and daemon speak different protocol versions
    FORBIDDEN_PATH = "FORBIDDEN_PATH"  # outside the allowed roots, not a regular file, wrong suffix
    FORBIDDEN_SOURCE = "FORBIDDEN_SOURCE"  # a URL outside the operator's allow_sources
    SOURCE_FAILED = "SOURCE_FAILED"  # fetching a remote LoRA failed (away, cut off, timed out)
    SOURCE_DENIED = "SOURCE_DENIED"  # the source refused the daemon's credentials (401, 403)
    NOT_FOUND = "NOT_FOUND"  # the file does not exist
    INVALID_LORA = "INVALID_LORA"  # the safetensors header or data is malformed
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"  # a valid file in a format we do not handle
    TOO_LARGE = "TOO_LARGE"  # larger than the device's whole budget
    CACHE_FULL = "CACHE_FULL"  # no room after waiting for releases
    UNKNOWN_DEVICE = "UNKNOWN_DEVICE"  # the daemon does not serve this device
    UNKNOWN_LEASE = "UNKNOWN_LEASE"  # no such lease in this session
    UNKNOWN_SESSION = "UNKNOWN_SESSION"  # session expired or daemon restarted
    NOT_ALLOWED = "NOT_ALLOWED"  # the operation is refused by the daemon's policy
    DAEMON_UNAVAILABLE = "DAEMON_UNAVAILABLE"  # client side: nobody answers on the socket
    TIMEOUT = "TIMEOUT"  # client side: the daemon did not reply in time
    MAPPING_FAILED = "MAPPING_FAILED"  # client side: this process cannot map the daemon's memory
    CLIENT_CLOSED = "CLIENT_CLOSED"  # client side: the client is closed, or from before a fork
    BAD_SOCKET_PATH = "BAD_SOCKET_PATH"  # client side: the socket path cannot be connected to
    INTERNAL = "INTERNAL"  # a bug in the daemon; the request failed, the daemon carries on


class LoraCacheError(Exception):
    """The one exception type of loracache; ``code`` says what kind of failure it is."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"[{self.code.value}] {message}")

    def __reduce__(self):  # keep the two fields across pickling (multiprocessing, pytest-xdist)
        return (type(self), (self.code, self.message))


class BadRequest(LoraCacheError):
    """A request the daemon could not take as it came. ``request_id``: the request's id, when
    the envelope was read that far (else 0), so the reply still reaches the right caller."""

    def __init__(self, code: ErrorCode | str, message: str, request_id: int = 0) -> None:
        super().__init__(code, message)
        self.request_id = request_id

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.request_id))
