"""Render progress events as rich progress bars on stderr."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["RichProgress"]


class RichProgress:
    """A ``ProgressListener`` that draws one row per task on stderr."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def start(self, key: str, description: str, total: int | None) -> None:
        with self.lock:
            self.tasks[key] = self.progress.add_task(description, total=total, note="")

    def advance(self, key: str, amount: int) -> None:
        task = self.tasks.get(key)
        if task is not None:
            self.progress.advance(task, amount)

    def finish(self, key: str, note: str = "") -> None:
        task = self.tasks.get(key)
        if task is None:
            return
        total = self.progress.tasks[task].total
        if total is None:
            total = self.progress.tasks[task].completed
        self.progress.update(task, total=total, completed=total, note=note)
