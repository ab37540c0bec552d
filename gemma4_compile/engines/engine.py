"""Stage 3: network + config -> serialized engine on disk (`EngineFromNetwork`, eager twin `engine_from_network`).

The plan is streamed to the file while TensorRT serializes it (`build_serialized_network_to_stream`), so a
multi-GB engine is never held twice in host RAM; the sha256 is computed on the way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from .config import BuildConfig
from .network import ParsedNetwork
from .trt_logger import first_line


@dataclass(frozen=True)
class PlanFile:
    path: Path
    sha256: str
    bytes: int


def _writer(flavour_module: Any, fh, digest):
    class FileWriter(flavour_module.IStreamWriter):
        def __init__(self) -> None:
            flavour_module.IStreamWriter.__init__(self)
            self.written = 0

        def write(self, data) -> int:
            view = memoryview(data)
            fh.write(view)
            digest.update(view)
            self.written += view.nbytes
            return view.nbytes

    return FileWriter()


def _build_failure(parsed: ParsedNetwork, target_name: str) -> BuildError:
    errors = parsed.logger.errors()
    reason = first_line(errors[0]) if errors else "the builder returned no engine and logged no error"
    return BuildError(f"{target_name}: {parsed.flavour.title} could not build the engine: {reason}")


def engine_from_network(parsed: ParsedNetwork, build: BuildConfig, path: Path, target_name: str,
                        monitor: Any = None) -> PlanFile:  # fmt: skip
    """Build and write the plan to `path` (the caller picks a staging path); BuildError on failure."""
    if monitor is not None:
        build.config.progress_monitor = monitor
    digest = hashlib.sha256()
    trt = parsed.flavour.module
    with open(path, "wb") as fh:
        if hasattr(parsed.builder, "build_serialized_network_to_stream"):
            writer = _writer(trt, fh, digest)
            ok = parsed.builder.build_serialized_network_to_stream(parsed.network, build.config, writer)
            size = writer.written if ok else 0
        else:  # older TensorRT: one in-memory plan
            plan = parsed.builder.build_serialized_network(parsed.network, build.config)
            ok = plan is not None
            size = 0
            if ok:
                view = memoryview(plan)
                fh.write(view)
                digest.update(view)
                size = view.nbytes
    if not ok or size == 0:
        path.unlink(missing_ok=True)
        raise _build_failure(parsed, target_name)
    _save_timing_cache(build)
    return PlanFile(path, digest.hexdigest(), size)


def _save_timing_cache(build: BuildConfig) -> None:
    """Write the (possibly grown) timing cache back for the next build of this target, atomically."""
    path = build.timing_cache.path
    if path is None:
        return
    data = memoryview(build.config.get_timing_cache().serialize())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


class EngineFromNetwork:
    """Lazy `engine_from_network` over a config loader (`ConfigFromNetwork`)."""

    def __init__(self, config_loader, path: Path, target_name: str, monitor: Any = None):
        self.config_loader, self.path, self.target_name, self.monitor = (
            config_loader,
            path,
            target_name,
            monitor,
        )

    def __call__(self) -> PlanFile:
        parsed, build = self.config_loader()
        return engine_from_network(parsed, build, self.path, self.target_name, self.monitor)
