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

_LAYER_PREFIX = "layer-"  # keys that convert.py gives the layers it applies
_LAYERS_ROW = "layers"


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
            if key.startswith(_LAYER_PREFIX):
                self._start_layer(key, description, total)
                return
            self.tasks[key] = self.progress.add_task(description, total=total, note="")

    def _start_layer(self, key: str, description: str, total: int | None) -> None:
        # Applying layers is quick per layer, and images have up to a hundred,
        # so one row counts them all and names the current one.
        task = self.tasks.get(_LAYERS_ROW)
        if task is None:
            task = self.progress.add_task(description, total=total or 0, note="")
            self.tasks[_LAYERS_ROW] = task
        else:
            row = self.progress.tasks[task]
            grown = (row.total or 0) + (total or 0)
            self.progress.update(task, total=grown, description=description)
        self.tasks[key] = task

    def advance(self, key: str, amount: int) -> None:
        task = self.tasks.get(key)
        if task is not None:
            self.progress.advance(task, amount)

    def finish(self, key: str, note: str = "") -> None:
        if key.startswith(_LAYER_PREFIX):
            return  # the shared layers row ends when its last layer does
        task = self.tasks.get(key)
        if task is None:
            return
        total = self.progress.tasks[task].total
        if total is None:
            total = self.progress.tasks[task].completed
        self.progress.update(task, total=total, completed=total, note=note)
