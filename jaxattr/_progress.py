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
    for i, item in enumerate(items):
        yield item
        elapsed = time.perf_counter() - start
        width = 24
        filled = int(width * (i + 1) / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        stream.write(f"\r{desc}: [{bar}] {i + 1}/{total} {elapsed:6.1f}s")
        stream.flush()
    stream.write("\n")
    stream.flush()
