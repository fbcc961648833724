"""A tiny progress interface so library code can report progress without knowing about the
terminal: the CLI passes a rich-backed `Reporter`, tests and library callers get `silent`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

Advance = Callable[[int], None]


class Reporter(Protocol):
    def task(self, description: str, total: int | None) -> Advance: ...


class _Silent:
    def task(self, description: str, total: int | None) -> Advance:
        return lambda n=1: None


silent: Reporter = _Silent()


class RichReporter:
    """Progress bars on stderr, one line per task."""

    def __init__(self, progress) -> None:
        self._progress = progress

    def task(self, description: str, total: int | None) -> Advance:
        task_id = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(task_id, n)


@contextmanager
def rich_progress() -> Iterator[Reporter]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        yield RichReporter(progress)
