"""Build progress on the terminal (TensorRT's own IProgressMonitor phases as rich bars, a spinner otherwise) and
the build's peak host RAM."""

from __future__ import annotations

import contextlib
import resource
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from .seam import TrtFlavour

MAX_DEPTH = 2  # deeper phases (per-layer reformat timing, ...) are too chatty to draw


def _console():
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def spinner(message: str, enabled: bool) -> Iterator[None]:
    """A spinner while a phase with no progress callback runs (parsing, writing)."""
    console = _console()
    if not enabled or not console.is_terminal:  # logs and CI get no spinner frames
        yield
        return
    with console.status(message):
        yield


def make_monitor(flavour: TrtFlavour, progress: Any, label: str, cancel: threading.Event):
    """An IProgressMonitor of the flavour that mirrors TensorRT's phases into a rich `Progress` (None: draws
    nothing) and cancels the build once `cancel` is set."""
    trt = flavour.module

    class RichMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT may call from several threads
            self._tasks: dict[str, Any] = {}
            self._depth: dict[str, int] = {}
            self.phases: list[str] = []  # every phase TensorRT started, in order

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self.phases.append(phase_name)
                if progress is not None and depth < MAX_DEPTH:
                    indent = "  " * depth
                    self._tasks[phase_name] = progress.add_task(
                        f"{label} {indent}{phase_name}", total=num_steps
                    )

        def step_complete(self, phase_name, step):
            with self._lock:
                if phase_name in self._tasks:
                    progress.update(self._tasks[phase_name], completed=step + 1)
            return not cancel.is_set()  # False cancels the build

        def phase_finish(self, phase_name):
            with self._lock:
                task = self._tasks.pop(phase_name, None)
                if task is not None:
                    progress.remove_task(task)

    return RichMonitor()


@contextlib.contextmanager
def interruptible() -> Iterator[threading.Event]:
    """Ctrl-C during the block sets the event (the monitor then cancels the build) instead of raising inside a
    TensorRT callback; KeyboardInterrupt is raised once TensorRT has returned."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield cancel
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    try:
        yield cancel
    except Exception:
        if cancel.is_set():
            raise KeyboardInterrupt from None  # the cancelled build's own error is only a consequence
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if cancel.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def build_progress(flavour: TrtFlavour, label: str, enabled: bool) -> Iterator[Any]:
    """-> an IProgressMonitor, drawing into a transient rich display when enabled on a terminal; Ctrl-C cancels
    the build and raises KeyboardInterrupt after it (`interruptible`)."""
    console = _console()
    if not enabled or not console.is_terminal:
        with interruptible() as cancel:
            yield make_monitor(flavour, None, label, cancel)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress, interruptible() as cancel:
        yield make_monitor(flavour, progress, label, cancel)


# ----- peak host RAM ------------------------------------------------------------------------------------


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
    """`with PeakRss() as m: ...; m.usage` -> MemoryUsage. RSS is sampled in a thread, because getrusage's peak
    is the whole process lifetime's and cannot tell the second build of a session from the first."""

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
