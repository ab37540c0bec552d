"""Registering our `gemma4` plugins (only when asked) and fingerprinting what gets embedded in engines."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .trt import TrtFlavour

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
        return {"requested": self.requested, "registered": list(self.registered), "error": self.error,
                "plugins_sha256": self.plugins_sha256, "kernels_sha256": self.kernels_sha256,
                "kernels_file": self.kernels_file}  # fmt: skip


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


def _kernels(export_dir: Path) -> tuple[str | None, str | None]:
    path = find_kernels_json(export_dir)
    if path is None:
        return None, None
    return hashlib.sha256(path.read_bytes()).hexdigest(), str(path)


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


def register(flavour: TrtFlavour, requested: bool, export_dir: Path) -> PluginStatus:
    """Call `register_plugins(trt_module)` when plugins are requested; record (never raise) any failure."""
    kernels_sha, kernels_file = _kernels(export_dir)
    if not requested:
        return PluginStatus(False, kernels_sha256=kernels_sha, kernels_file=kernels_file)
    try:
        module = importlib.import_module(REGISTRATION_MODULE)
    except ImportError as e:
        error = f"{REGISTRATION_MODULE} is not available ({type(e).__name__}: {e})"
        return PluginStatus(True, error=error, kernels_sha256=kernels_sha, kernels_file=kernels_file)
    try:
        names = tuple(module.register_plugins(flavour.module, _export_kernels_dir(kernels_file, export_dir)))
    except Exception as e:  # a failed registration means "build inline", recorded in the manifest
        error = f"register_plugins failed: {type(e).__name__}: {e}"
        return PluginStatus(True, error=error, kernels_sha256=kernels_sha, kernels_file=kernels_file)
    fingerprint = getattr(module, "plugin_fingerprint", None)  # the plugin package's own, when it has one
    plugins = _plugins_dir()
    sha = fingerprint() if fingerprint else (_tree_sha256(plugins) if plugins else None)
    return PluginStatus(True, names, None, sha, kernels_sha, kernels_file, plugin_creators(flavour))
