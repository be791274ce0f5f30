"""Progress events that long work reports, and a listener that ignores them.

The library reports progress through a ``ProgressListener``; only the CLI picks
a rendering (rich on a terminal, nothing otherwise), so no library module
imports rich.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullProgress", "ProgressListener"]


class ProgressListener(Protocol):
    """Receiver of progress events, one task per layer or blob.

    ``key`` identifies the task (a digest or a layer index); ``total`` is in
    bytes, or None when unknown. Implementations must be thread-safe, because
    parallel downloads report from worker threads.
    """

    def start(self, key: str, description: str, total: int | None) -> None: ...

    def advance(self, key: str, amount: int) -> None: ...

    def finish(self, key: str, note: str = "") -> None: ...


class NullProgress:
    """Progress listener that discards every event."""

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str, note: str = "") -> None:
        pass
