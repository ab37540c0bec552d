"""Optimization profiles derived from export.json: one for prefill, one for decode.

Each decoder input's shape names its dims (export-format.md). Per profile a dim resolves to (min, opt, max):
    batch               1 .. max_batch                    (opt 1: interactive decoding)
    sequence            prefill 1 .. max_seq; decode 1    (prefill opt: half of max_seq)
    sliding_cache_len   W, fixed                          (sliding caches are exactly W slots)
    cache_len           1 .. max_seq                      (global caches hold every position)
Fixed ints stay fixed; any other name must be an int in export.json "dims".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BuildError, Gemma4CompileError
from ..export.manifest import DECODER, ExportManifest

PROFILE_NAMES = ("prefill", "decode")
DEFAULT_MAX_BATCH = 8  # the one default, for the CLI, `build_engines` and `BuildOptions`


@dataclass(frozen=True)
class ProfileLimits:
    max_batch: int = DEFAULT_MAX_BATCH
    max_seq: int | None = None  # None: the export's max_seq_len
    profiles: tuple[str, ...] = PROFILE_NAMES


@dataclass(frozen=True)
class InputShape:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class ShapeProfile:
    name: str
    inputs: tuple[InputShape, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": {
                s.name: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)} for s in self.inputs
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeProfile:
        shapes = (
            InputShape(n, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for n, r in d["inputs"].items()
        )
        return cls(d["name"], tuple(shapes))

    def shape(self, name: str) -> InputShape:
        return next(s for s in self.inputs if s.name == name)


def resolve_max_seq(export: ExportManifest, limits: ProfileLimits) -> int:
    max_seq = export.max_seq_len if limits.max_seq is None else limits.max_seq
    if max_seq < 1 or (export.max_seq_len and max_seq > export.max_seq_len):
        raise BuildError(
            f"max_seq must be in 1..{export.max_seq_len} (the export's max_seq_len), got {max_seq}"
        )
    return max_seq


def _dim_range(
    dim: int | str, profile: str, export: ExportManifest, max_batch: int, max_seq: int, where: str
):
    if isinstance(dim, int):
        return dim, dim, dim
    half = max(1, (max_seq + 1) // 2)
    if dim == "batch":
        return 1, 1, max_batch
    if dim == "sequence":
        return (1, half, max_seq) if profile == "prefill" else (1, 1, 1)
    if dim == "cache_len":
        return 1, half, max_seq
    value = export.dims.get(dim)
    if isinstance(value, int):  # sliding_cache_len = W and any other fixed dim
        return value, value, value
    raise BuildError(f"{where} has dimension {dim!r}, which export.json 'dims' does not fix to an int")


def derive_profiles(export: ExportManifest, limits: ProfileLimits) -> tuple[ShapeProfile, ...]:
    """Shape profiles for every decoder input, in `limits.profiles` order."""
    if limits.max_batch < 1:
        raise BuildError(f"max_batch must be >= 1, got {limits.max_batch}")
    unknown = [p for p in limits.profiles if p not in PROFILE_NAMES]
    if unknown or not limits.profiles:
        raise BuildError(f"unknown profiles {unknown or '(none)'}; choose from {', '.join(PROFILE_NAMES)}")
    max_seq = resolve_max_seq(export, limits)
    out = []
    for profile in limits.profiles:
        shapes = []
        for t in export.graphs[DECODER].inputs:
            ranges = [
                _dim_range(d, profile, export, limits.max_batch, max_seq, f"decoder input {t.name!r}")
                for d in t.shape
            ]
            lo, opt, hi = (tuple(r[i] for r in ranges) for i in range(3))
            shapes.append(InputShape(t.name, lo, opt, hi))
        out.append(ShapeProfile(profile, tuple(shapes)))
    return tuple(out)


def tokens_per_step(profiles: tuple[ShapeProfile, ...]) -> int:
    """The most tokens (batch x sequence at opt) one step of these profiles carries: what MoE tiles tune for."""
    return max(max(1, p.inputs[0].opt[0] * p.inputs[0].opt[1]) for p in profiles)


def profile_index(profiles: tuple[ShapeProfile, ...], seq: int) -> int:
    """Which profile a step with `seq` new tokens should run in (decode when it exists and seq == 1)."""
    names = [p.name for p in profiles]
    if seq == 1 and "decode" in names:
        return names.index("decode")
    if "prefill" in names:
        return names.index("prefill")
    raise Gemma4CompileError(f"the engine has only a decode profile, which cannot run {seq} tokens at once")
