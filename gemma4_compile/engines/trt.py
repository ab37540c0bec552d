"""One seam over full TensorRT (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`), imported lazily.

The two builders differ in what they can target (docs/tensorrt.md: what installs where, engines are tied
to a GPU and a version):
* TensorRT-RTX compiles ahead of time for the compute capabilities in its `ComputeCapability` enum, on a CPU,
  with no GPU (`IBuilderConfig.set_compute_capability`). It has no SM90/SM100, so no data-center engines.
* Full TensorRT tunes on the GPU it runs on, so it builds only for that GPU's SM.
Everything else in `engines/` goes through a `TrtFlavour`, never through `import tensorrt` directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from ..errors import BuildError
from ..targets import GpuTarget

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
    need = INSTALL_HINTS[FULL] if target.sm not in _rtx_sms_or_known(flavours) else INSTALL_HINTS[RTX]
    raise BuildError(f"cannot build {target.describe()}: {'; '.join(reasons)}; needed: {need}")


def _rtx_sms_or_known(flavours: tuple[TrtFlavour, ...]) -> tuple[int, ...]:
    rtx = [f for f in flavours if f.is_rtx]
    return rtx[0].aot_sms if rtx else (75, 80, 86, 89, 120, 121)  # TensorRT-RTX 1.7's list
