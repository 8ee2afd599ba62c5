"""Terminal output and who may write it: which of several training processes this one is (RANK / WORLD_SIZE from
accelerate or torchrun; only the first one prints, writes files and publishes a stage), one rich console on
stderr, progress bars for long steps."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


# With several training processes only the first one talks.
console = Console(stderr=True, highlight=False, quiet=not is_main())


def progress(transient: bool = False) -> Progress:
    """A progress bar with a free-text 'info' field (tokens/s, loss) next to the count."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=os.environ.get("DISTILLERY_NO_PROGRESS") == "1" or not is_main(),
    )
