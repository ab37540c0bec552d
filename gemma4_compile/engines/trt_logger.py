"""A TensorRT logger that keeps every message (for build.log and error messages) and forwards to `logging`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .trt import TrtFlavour

log = logging.getLogger("gemma4_compile.engines")

# Parser warnings that hold for every export (int64 past_len/seq_len are real int64 inputs by contract).
_QUIET = ("has Int64 binding",)
# Errors TensorRT-RTX logs on every CPU-only build, next to the real cause: never the reason for a failure.
_NO_GPU_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "CUDA initialization failure")
_ORDER = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


@dataclass(frozen=True)
class LogRecord:
    severity: str  # INTERNAL_ERROR | ERROR | WARNING | INFO | VERBOSE
    message: str


def make_logger(flavour: TrtFlavour, min_severity: str = "INFO"):
    """An `ILogger` of the flavour's module that records messages at or above `min_severity` (thread-safe)."""
    trt = flavour.module
    levels = {trt.ILogger.INTERNAL_ERROR: "INTERNAL_ERROR", trt.ILogger.ERROR: "ERROR",
              trt.ILogger.WARNING: "WARNING", trt.ILogger.INFO: "INFO", trt.ILogger.VERBOSE: "VERBOSE"}  # fmt: skip

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.keep = set(_ORDER[: _ORDER.index(min_severity) + 1])  # TensorRT calls us for every severity
            self.records: list[LogRecord] = []
            self._lock = threading.Lock()

        def log(self, severity, msg):  # called from TensorRT's threads
            name = levels.get(severity, str(severity))
            if name not in self.keep:
                return
            with self._lock:
                self.records.append(LogRecord(name, msg))
            if not any(
                q in msg for q in _QUIET
            ):  # DEBUG only: failures become BuildErrors, all is in build.log
                log.debug("%s %s: %s", flavour.title, name, msg)

        def errors(self) -> list[str]:
            """Error messages, the side effects of having no GPU left out."""
            return [r.message for r in self.records if r.severity in ("ERROR", "INTERNAL_ERROR")
                    and not any(n in r.message for n in _NO_GPU_NOISE)]  # fmt: skip

        def text(self) -> str:
            return "".join(f"[{r.severity}] {r.message}\n" for r in self.records)

    return RecordingLogger()


def first_line(message: str, limit: int = 300) -> str:
    """A TensorRT message squeezed onto one line for a user-facing error."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
