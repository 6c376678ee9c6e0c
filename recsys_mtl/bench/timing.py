"""Small timing helpers shared by the contenders."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class StepTimer:
    """Accumulates wall time per named phase over timed steps."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str, timed: bool = True) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if timed:
            self.total[name] += time.perf_counter() - t0
            self.steps[name] += 1

    def ms_per_step(self) -> dict[str, float]:
        return {k: 1e3 * v / max(1, self.steps[k]) for k, v in self.total.items()}


def progress(it: Iterable[T], desc: str, enabled: bool = True) -> Iterable[T]:
    """tqdm progress bar on stderr (disabled for short or non-interactive runs)."""
    return tqdm(it, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
