"""Exceptions raised by pulldocker, each with the exit code the CLI returns.

PulldockerError (exit 1)
├── UsageError (2)                  a command-line value is invalid
├── InvalidInputError (3)           an archive, layer, manifest or config is malformed
│   ├── UnsafePathError             a tar name or hardlink target leaves the root
│   └── UnsupportedError            a format or feature pulldocker does not read
├── NotFoundError (4)               an image, tag, platform or blob does not exist
│   └── PlatformNotFoundError       no image for the requested platform
├── AuthenticationError (5)         registry or token server refused the credentials
├── RegistryError (6)               registry error, or the network failed
│   ├── RateLimitError              429 after all retries
│   ├── NetworkError                connection failed, timed out or dropped
│   └── RegistryResponseError       error status, with the registry's codes
├── IntegrityError (7)              a digest, diff_id or size does not match
└── LimitExceededError (8)          a configured limit (expanded size, entries) reached

Messages are one line that names the value at fault and, where one exists, the fix.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "IntegrityError",
    "InvalidInputError",
    "LimitExceededError",
    "NetworkError",
    "NotFoundError",
    "PlatformNotFoundError",
    "PulldockerError",
    "RateLimitError",
    "RegistryError",
    "RegistryResponseError",
    "UnsafePathError",
    "UnsupportedError",
    "UsageError",
]


class PulldockerError(Exception):
    """Base class of every error that pulldocker reports to its user."""

    exit_code = 1


class UsageError(PulldockerError, ValueError):
    """A command-line value is invalid."""

    exit_code = 2


class InvalidInputError(PulldockerError, ValueError):
    """An archive, layer, manifest or config is malformed."""

    exit_code = 3


class UnsafePathError(InvalidInputError):
    """A tar entry name or hardlink target leaves the root filesystem."""


class UnsupportedError(InvalidInputError):
    """The input uses a format or feature that pulldocker does not read."""


class NotFoundError(PulldockerError):
    """An image, tag, platform or blob does not exist."""

    exit_code = 4


class PlatformNotFoundError(NotFoundError):
    """No image in an index matches the requested platform."""


class AuthenticationError(PulldockerError):
    """The registry or its token server refused the credentials."""

    exit_code = 5


class RegistryError(PulldockerError):
    """The registry returned an error, or the connection failed."""

    exit_code = 6


class RateLimitError(RegistryError):
    """The registry still returned 429 after every retry."""


class IntegrityError(PulldockerError):
    """A digest, diff_id or size does not match what was expected."""

    exit_code = 7


class LimitExceededError(PulldockerError):
    """A configured safety limit, such as the expanded layer size, was reached."""

    exit_code = 8


class NetworkError(RegistryError):
    """A connection to a registry failed, timed out or dropped mid-transfer."""


class RegistryResponseError(RegistryError):
    """The registry returned an error status and error codes."""

    def __init__(self, message: str, *, status: int, codes: tuple[str, ...] = ()):
        super().__init__(message)
        self.status = status
        self.codes = codes
