"""The one seam over full TensorRT (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`), imported lazily: the
flavour, its logger, and its plugin registry.

The two builders differ in what they can target (docs/tensorrt.md: what installs where, engines are tied
to a GPU and a version):
* TensorRT-RTX compiles ahead of time for the compute capabilities in its `ComputeCapability` enum, on a CPU,
  with no GPU (`IBuilderConfig.set_compute_capability`). It has no SM90/SM100, so no data-center engines.
* Full TensorRT tunes on the GPU it runs on, so it builds only for that GPU's SM.
Everything else in `engines/` goes through a `TrtFlavour`, never through `import tensorrt` directly.
Our `gemma4` plugins are registered only when asked, and what gets embedded in engines is fingerprinted here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..errors import BuildError
from ..fsutil import sha256_file
from ..targets import GpuTarget

log = logging.getLogger("gemma4_compile.engines")

FULL, RTX = "tensorrt", "tensorrt_rtx"
TITLES = {FULL: "TensorRT", RTX: "TensorRT-RTX"}
INSTALL_HINTS = {
    FULL: "full TensorRT on a machine with that GPU (pip install tensorrt, from NVIDIA's package index)",
    RTX: "TensorRT-RTX (pip install 'gemma4-compile[rtx]')",
}


@dataclass(frozen=True)
class TrtFlavour:
    """An installed TensorRT: its module, name, version and which SMs it can build, and how."""

    name: str  # 'tensorrt' | 'tensorrt_rtx'
    version: str
    module: ModuleType = field(repr=False, compare=False)
    aot_sms: tuple[int, ...] = ()  # SMs it compiles for without a GPU (RTX); empty for full TensorRT

    @property
    def title(self) -> str:
        return f"{TITLES[self.name]} {self.version}"

    @property
    def is_rtx(self) -> bool:
        return self.name == RTX

    @property
    def has_timing_cache(self) -> bool:
        return not self.is_rtx  # "Timing cache operations are no-ops in TensorRT-RTX" (deprecated since 1.2)

    def buildable_sms(self, device_sm: int | None) -> tuple[int, ...]:
        """SMs this flavour can build on this machine: RTX's AOT list, or the local GPU for full TensorRT."""
        if self.is_rtx:
            return self.aot_sms
        return () if device_sm is None else (device_sm,)

    def refusal(self, target: GpuTarget, device_sm: int | None) -> str | None:
        """Why this flavour cannot build `target` here, or None if it can."""
        if target.sm in self.buildable_sms(device_sm):
            return None
        if self.is_rtx:
            return f"{self.title} builds only {_sm_list(self.aot_sms)}"
        if device_sm is None:
            return f"{self.title} builds only for the GPU it runs on, and this machine has no CUDA GPU"
        return f"{self.title} builds only for the GPU it runs on (sm{device_sm})"

    def compute_capability(self, target: GpuTarget):
        """RTX's `ComputeCapability` member for a target (AOT builds only)."""
        return getattr(self.module.ComputeCapability, f"SM{target.sm}")


def _sm_list(sms: tuple[int, ...]) -> str:
    return ", ".join(f"sm{sm}" for sm in sms) or "no SM"


def _rtx_sms(module: ModuleType) -> tuple[int, ...]:
    names = module.ComputeCapability.__members__
    return tuple(sorted(int(n[2:]) for n in names if n.startswith("SM") and n[2:].isdigit()))


def load_trt(name: str | None = None) -> TrtFlavour:
    """Import a flavour: 'tensorrt', 'tensorrt_rtx', or None for whichever is installed (full TensorRT first).

    BuildError (one line, with the install hint) if it is not importable.
    """
    if name is None:
        flavours = installed_flavours()
        if not flavours:
            raise BuildError(
                f"no TensorRT is installed; install {INSTALL_HINTS[RTX]} or {INSTALL_HINTS[FULL]}"
            )
        return flavours[0]
    if name not in TITLES:
        raise BuildError(f"unknown TensorRT flavour {name!r}; choose {FULL!r} or {RTX!r}")
    try:
        module = importlib.import_module(name)
    except (ImportError, OSError) as e:  # OSError: bindings present but their shared libraries missing
        raise BuildError(f"{TITLES[name]} is not importable ({e}); install {INSTALL_HINTS[name]}") from None
    aot = _rtx_sms(module) if name == RTX else ()
    return TrtFlavour(name, str(module.__version__), module, aot)


def installed_flavours() -> tuple[TrtFlavour, ...]:
    """Every importable flavour, full TensorRT first."""
    found = []
    for name in (FULL, RTX):
        try:
            found.append(load_trt(name))
        except BuildError:
            continue
    return tuple(found)


def choose_flavour(target: GpuTarget, flavours: tuple[TrtFlavour, ...], device_sm: int | None) -> TrtFlavour:
    """The first installed flavour that can build `target` here (full TensorRT wins on its own GPU).

    Raises a one-line BuildError that says what each installed flavour lacks and what is needed.
    """
    for flavour in flavours:
        if flavour.refusal(target, device_sm) is None:
            return flavour
    reasons = [flavour.refusal(target, device_sm) for flavour in flavours]
    if not any(f.name == FULL for f in flavours):
        reasons.append("full TensorRT is not installed")
    if not any(f.name == RTX for f in flavours):
        reasons.append("TensorRT-RTX is not installed")
    need = INSTALL_HINTS[FULL] if target.sm not in rtx_sms_or_known(flavours) else INSTALL_HINTS[RTX]
    raise BuildError(f"cannot build {target.describe()}: {'; '.join(reasons)}; needed: {need}")


def rtx_sms_or_known(flavours: tuple[TrtFlavour, ...]) -> tuple[int, ...]:
    rtx = [f for f in flavours if f.is_rtx]
    return rtx[0].aot_sms if rtx else (75, 80, 86, 89, 120, 121)  # TensorRT-RTX 1.7's list


# ----- logging ----------------------------------------------------------------------------------------

# Parser warnings that hold for every export (int64 past_len/seq_len are real int64 inputs by contract).
_QUIET = ("has Int64 binding",)
# Errors TensorRT-RTX logs on every CPU-only build, next to the real cause: never the reason for a failure.
_NO_GPU_NOISE = ("cudaError 35", "CUDA driver version is insufficient", "CUDA initialization failure")
_ORDER = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")
# The parser names an unnamed node "node_of_<first output>", and inlining a model-local function reuses its
# body's names at every call (every layer), so it warns once per node per extra call. Harmless (we query no
# inner tensor of a body) and not ours to rename: counted into one line of build.log instead of dozens.
_REPEATED_NAME = "already exists, the output tensors of this new instance will not be queryable"


@dataclass(frozen=True)
class LogRecord:
    severity: str  # INTERNAL_ERROR | ERROR | WARNING | INFO | VERBOSE
    message: str


def make_logger(flavour: TrtFlavour, min_severity: str = "INFO"):
    """An `ILogger` of the flavour's module that records messages at or above `min_severity` (thread-safe)."""
    trt = flavour.module
    levels = {
        trt.ILogger.INTERNAL_ERROR: "INTERNAL_ERROR",
        trt.ILogger.ERROR: "ERROR",
        trt.ILogger.WARNING: "WARNING",
        trt.ILogger.INFO: "INFO",
        trt.ILogger.VERBOSE: "VERBOSE",
    }

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.keep = set(_ORDER[: _ORDER.index(min_severity) + 1])  # TensorRT calls us for every severity
            self.records: list[LogRecord] = []
            self.repeated_names = 0
            self._lock = threading.Lock()

        def log(self, severity, msg):  # called from TensorRT's threads
            name = levels.get(severity, str(severity))
            if name not in self.keep:
                return
            with self._lock:
                if _REPEATED_NAME in msg:
                    self.repeated_names += 1
                    return
                self.records.append(LogRecord(name, msg))
            if not any(
                q in msg for q in _QUIET
            ):  # DEBUG only: failures become BuildErrors, all is in build.log
                log.debug("%s %s: %s", flavour.title, name, msg)

        def errors(self) -> list[str]:
            """Error messages, the side effects of having no GPU left out."""
            return [
                r.message
                for r in self.records
                if r.severity in ("ERROR", "INTERNAL_ERROR")
                and not any(n in r.message for n in _NO_GPU_NOISE)
            ]

        def text(self) -> str:
            lines = [f"[{r.severity}] {r.message}\n" for r in self.records]
            if self.repeated_names:
                lines.append(
                    f"[WARNING] {self.repeated_names}x 'A node named node_of_... already exists': nodes of "
                    "inlined function bodies reuse their names at every call (harmless; counted, not listed)\n"
                )
            return "".join(lines)

    return RecordingLogger()


def first_line(message: str, limit: int = 300) -> str:
    """A TensorRT message squeezed onto one line for a user-facing error."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ----- plugins ----------------------------------------------------------------------------------------

REGISTRATION_MODULE = "gemma4_compile.plugins.registration"


@dataclass(frozen=True)
class PluginStatus:
    requested: bool
    registered: tuple[str, ...] = ()  # what register_plugins returned, e.g. ("gemma4::Attention",)
    error: str | None = None  # why registration did not happen (module absent, or it raised)
    plugins_sha256: str | None = None  # over the plugin package's sources, when registered
    kernels_sha256: str | None = None  # kernels.json (AOT kernels), when present
    kernels_file: str | None = None
    creators: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)  # (name, version, namespace)

    def to_dict(self) -> dict:
        return {
            "requested": self.requested,
            "registered": list(self.registered),
            "error": self.error,
            "plugins_sha256": self.plugins_sha256,
            "kernels_sha256": self.kernels_sha256,
            "kernels_file": self.kernels_file,
        }


def _plugins_dir() -> Path | None:
    spec = importlib.util.find_spec("gemma4_compile.plugins")
    return Path(spec.origin).parent if spec and spec.origin else None


def _tree_sha256(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def find_kernels_json(export_dir: Path) -> Path | None:
    """kernels.json next to the export (OUT/, OUT/kernels/, OUT/plugins/) or in the plugins package; first wins."""
    plugins = _plugins_dir()
    candidates = [export_dir / d / "kernels.json" for d in (".", "kernels", "plugins")]
    if plugins is not None:
        candidates.append(plugins / "kernels.json")
    return next((p for p in candidates if p.is_file()), None)


@dataclass(frozen=True)
class KernelsFile:
    """kernels.json (the AOT kernels plugins embed) and its sha256, hashed once per build."""

    path: str | None = None
    sha256: str | None = None

    @classmethod
    def find(cls, export_dir: Path) -> KernelsFile:
        path = find_kernels_json(export_dir)
        return cls() if path is None else cls(str(path), sha256_file(path))


def plugin_creators(flavour: TrtFlavour) -> tuple[tuple[str, str, str], ...]:
    """(name, version, namespace) of every registered plugin creator."""
    # all_creators, not get_creator: a failed get_creator logs an API-usage error into the build log
    registry = flavour.module.get_plugin_registry()
    return tuple((c.name, c.plugin_version, c.plugin_namespace) for c in registry.all_creators)


def _export_kernels_dir(kernels_file: str | None, export_dir: Path) -> Path | None:
    """The export's own kernels directory (writable, unlike the installed package), if it has one."""
    if kernels_file is None or not Path(kernels_file).is_relative_to(export_dir):
        return None
    return Path(kernels_file).parent


def register(flavour: TrtFlavour, requested: bool, export_dir: Path, kernels: KernelsFile) -> PluginStatus:
    """Call `register_plugins(trt_module)` when plugins are requested. A failure is a BuildError naming the
    fix: an engine silently inlined instead needs several times the activation memory (6.97 GB vs 0.80 GB)."""
    kernels_sha, kernels_file = kernels.sha256, kernels.path
    if not requested:
        return PluginStatus(False, kernels_sha256=kernels_sha, kernels_file=kernels_file)
    try:
        module = importlib.import_module(REGISTRATION_MODULE)
    except ImportError as e:
        raise BuildError(
            f"--plugins: {REGISTRATION_MODULE} is not available ({type(e).__name__}: {e})"
        ) from None
    try:
        names = tuple(module.register_plugins(flavour.module, _export_kernels_dir(kernels_file, export_dir)))
    except Exception as e:  # the plugin package may raise anything; the user sees one line
        raise BuildError(
            f"--plugins: the gemma4 plugins cannot be registered ({type(e).__name__}: {e}); "
            "build without --plugins to inline the function bodies instead"
        ) from None
    fingerprint = getattr(module, "plugin_fingerprint", None)  # the plugin package's own, when it has one
    plugins = _plugins_dir()
    sha = fingerprint() if fingerprint else (_tree_sha256(plugins) if plugins else None)
    return PluginStatus(True, names, None, sha, kernels_sha, kernels_file, plugin_creators(flavour))
