"""Rich progress bars for long work: training shows loss, measured sparsity and it/s."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, label: str = "train"):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  sparsity {task.fields[sparsity]:.3f}  {task.fields[speed_text]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            label, total=total, completed=start, loss=float("nan"), sparsity=0.0, speed_text=""
        )

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def note(self, text: str) -> None:
        """A line above the bar (e.g. a progressive stage switch)."""
        if self.enabled:
            self.progress.console.print(text, highlight=False)

    def update(self, step: int, loss: float, sparsity: float) -> None:
        speed = self.progress.tasks[0].speed
        self.progress.update(
            self.task, completed=step, loss=loss, sparsity=sparsity, speed_text=f"{speed:.2f} it/s" if speed else ""
        )


def counted_bars(enabled: bool = True, transient: bool = False) -> Progress:
    """Bars of counted work (label, bar, done/total, elapsed, remaining) on stderr; add one task per bar."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=transient,
    )


class WorkProgress:
    """A bar for counted work other than training (sampling, feature extraction); ``advance(n)`` as it goes."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.progress = counted_bars(enabled, transient=True)
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def set(self, completed: int) -> None:
        self.progress.update(self.task, completed=completed)
