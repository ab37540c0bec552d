"""Peak host RAM of one build: RSS sampled in a background thread.

`resource.getrusage().ru_maxrss` is the peak of the whole process lifetime, so it cannot tell the second
build of a session from the first; sampling can. The lifetime peak is recorded too, as an upper bound.
"""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MemoryUsage:
    peak_rss_bytes: int  # sampled during the measured block (every `interval` seconds)
    start_rss_bytes: int
    process_max_rss_bytes: int  # getrusage: lifetime peak of this process

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _max_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # Linux reports KiB, macOS bytes


class PeakRss:
    """Context manager: `with PeakRss() as m: ...; m.usage` -> MemoryUsage."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.usage: MemoryUsage | None = None
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._start = self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.usage = MemoryUsage(self._peak, self._start, _max_rss())
