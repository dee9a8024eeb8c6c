"""A minimal progress bar on stderr that callers switch off with a flag."""

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, enabled: bool) -> Iterator[T]:
    """Yields ``items``, drawing ``desc: done/total`` with elapsed time if enabled."""
    if not enabled:
        yield from items
        return
    start = time.perf_counter()
    stream = sys.stderr
    # Into a log file (not a terminal) draw about ten lines, not one per item.
    every = 1 if _is_terminal(stream) else max(1, -(-total // 10))
    for i, item in enumerate(items):
        yield item
        if (i + 1) % every and i + 1 != total:
            continue
        elapsed = time.perf_counter() - start
        width = 24
        filled = int(width * (i + 1) / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"{desc}: [{bar}] {i + 1}/{total} {elapsed:6.1f}s"
        stream.write(f"\r{line}" if every == 1 else f"{line}\n")
        stream.flush()
    if every == 1:
        stream.write("\n")
        stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
