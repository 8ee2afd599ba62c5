"""Terminal output: one rich console on stderr, progress bars for long steps."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from toolchain.distributed import is_main

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
