"""Optimization profiles derived from export.json, per graph: decoder and embed get one for prefill and one
for decode, vision one ("images"), audio one ("clips").

Each graph input's shape names its dims (export-format.md). Per profile a dim resolves to (min, opt, max):
    batch               1 .. max_batch                    (opt 1: interactive decoding)
    sequence            prefill 1 .. max_seq; decode 1    (prefill opt: half of max_seq)
    sliding_cache_len   W, fixed                          (sliding caches are exactly W slots)
    cache_len           1 .. max_seq                      (global caches hold every position)
    image_tokens        prefill 0 .. min(max_batch x max_seq, max_images x max_image_tokens); decode 0 .. max_batch
    audio_embed_tokens  prefill 0 .. min(max_batch x max_seq, max_clips x ⌈⌈max_frames/2⌉/2⌉); decode 0 .. max_batch
    images              1 .. max_images                   (default: export.json multimodal.max_images)
    patches             k² .. k² x max_image_tokens       (k² = 9 patches per soft token; opt: the max)
    clips               1 .. max_clips
    frames              1 .. max_frames                   (default 3000 = 30 s; opt: the max)
Fixed ints stay fixed; any other name must be an int in export.json "dims".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BuildError, Gemma4CompileError
from ..export.manifest import AUDIO, DECODER, EMBED, VISION, ExportManifest
from ..model.audio_preprocess import soft_token_count

PROFILE_NAMES = ("prefill", "decode")
IMAGES_PROFILE, CLIPS_PROFILE = "images", "clips"  # the vision and audio graphs' one profile each
DEFAULT_MAX_BATCH = 8  # the one default, for the CLI, `build_engines` and `BuildOptions`
DEFAULT_MAX_CLIPS = 1  # audio clips per encoder call
MAX_FRAMES = 3000  # 30 s of 10 ms log-mel frames: the longest clip the audio graph takes (export-format.md)

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class ProfileLimits:
    max_batch: int = DEFAULT_MAX_BATCH
    max_seq: int | None = None  # None: the export's max_seq_len
    profiles: tuple[str, ...] = PROFILE_NAMES
    max_images: int | None = None  # per vision call; None: export.json multimodal.max_images
    max_image_tokens: int | None = (
        None  # soft tokens per image; None: the vision spec's default_output_length
    )
    max_clips: int = DEFAULT_MAX_CLIPS
    max_frames: int = MAX_FRAMES


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


def _token_dims(export: ExportManifest, limits: ProfileLimits) -> dict[str, dict[str, Range]]:
    """Profile name -> dim ranges of the decoder and embed graphs (one step of prompt tokens)."""
    max_seq = resolve_max_seq(export, limits)
    half = max(1, (max_seq + 1) // 2)
    out = {}
    for profile in limits.profiles:
        prefill = profile == "prefill"
        dims = {
            "batch": (1, 1, limits.max_batch),
            "sequence": (1, half, max_seq) if prefill else (1, 1, 1),
            "cache_len": (1, half, max_seq),
        }
        if export.multimodal is not None:  # the embed graph's image_embeds rows: placeholders of one step
            per_image, images = _image_limits(export, limits)
            most = min(limits.max_batch * max_seq, images * per_image)
            dims["image_tokens"] = (0, min(per_image, most), most) if prefill else (0, 0, limits.max_batch)
        if export.multimodal is not None and export.multimodal.audio is not None:  # and audio_embeds rows
            per_clip = soft_token_count(limits.max_frames)
            most = min(limits.max_batch * max_seq, limits.max_clips * per_clip)
            dims["audio_embed_tokens"] = (
                (0, min(per_clip, most), most) if prefill else (0, 0, limits.max_batch)
            )
        out[profile] = dims
    return out


def _image_limits(export: ExportManifest, limits: ProfileLimits) -> tuple[int, int]:
    """(soft tokens per image, images per call) a build's profiles cover."""
    mm = export.multimodal
    per_image = limits.max_image_tokens or mm.vision.default_output_length
    images = limits.max_images or mm.max_images
    if per_image < 1 or images < 1:
        raise BuildError(f"max_images and max_image_tokens must be >= 1, got {images} and {per_image}")
    return per_image, images


def _vision_dims(export: ExportManifest, limits: ProfileLimits) -> dict[str, dict[str, Range]]:
    if export.multimodal is None:
        raise BuildError(f"{export.path / 'export.json'} has a vision graph but no multimodal block")
    per_image, images = _image_limits(export, limits)
    k2 = export.multimodal.vision.pooling_kernel_size**2  # patches per soft token
    return {IMAGES_PROFILE: {"images": (1, 1, images), "patches": (k2, k2 * per_image, k2 * per_image)}}


def _audio_dims(export: ExportManifest, limits: ProfileLimits) -> dict[str, dict[str, Range]]:
    if limits.max_clips < 1 or not 1 <= limits.max_frames <= MAX_FRAMES:
        raise BuildError(
            f"max_clips must be >= 1 and max_frames in 1..{MAX_FRAMES}, got {limits.max_clips} and "
            f"{limits.max_frames}"
        )
    frames = (1, limits.max_frames, limits.max_frames)
    return {CLIPS_PROFILE: {"clips": (1, 1, limits.max_clips), "frames": frames}}


_DIMS = {DECODER: _token_dims, EMBED: _token_dims, VISION: _vision_dims, AUDIO: _audio_dims}


def _dim_range(dim: int | str, dims: dict[str, Range], export: ExportManifest, where: str) -> Range:
    if isinstance(dim, int):
        return dim, dim, dim
    if dim in dims:
        return dims[dim]
    value = export.dims.get(dim)
    if isinstance(value, int):  # sliding_cache_len = W and any other fixed dim
        return value, value, value
    raise BuildError(f"{where} has dimension {dim!r}, which export.json 'dims' does not fix to an int")


def derive_profiles(
    export: ExportManifest, limits: ProfileLimits, role: str = DECODER
) -> tuple[ShapeProfile, ...]:
    """Shape profiles for every input of the `role` graph (decoder and embed: in `limits.profiles` order)."""
    if limits.max_batch < 1:
        raise BuildError(f"max_batch must be >= 1, got {limits.max_batch}")
    unknown = [p for p in limits.profiles if p not in PROFILE_NAMES]
    if unknown or not limits.profiles:
        raise BuildError(f"unknown profiles {unknown or '(none)'}; choose from {', '.join(PROFILE_NAMES)}")
    if role not in _DIMS:
        raise BuildError(f"no engine profiles for graph {role!r}; graphs with engines: {', '.join(_DIMS)}")
    out = []
    for profile, dims in _DIMS[role](export, limits).items():
        shapes = []
        for t in export.graphs[role].inputs:
            ranges = [_dim_range(d, dims, export, f"{role} input {t.name!r}") for d in t.shape]
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


def engine_roles(export: ExportManifest, wanted: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The graphs to build engines for, in the export's pipeline order: `wanted` (e.g. --graphs decoder,embed)
    or, when None, every graph the export has that TensorRT can build. An embed graph gathering int8 rows
    (quantized tables) has none: TensorRT takes INT8 constants only before a DequantizeLinear, and the runners
    run that graph on the CPU reading rows from the data file (runners/rows.py), so it is left out by default
    and refused by name."""
    row_tables = export.quant is not None and bool(export.quant.row_tables)
    if row_tables and wanted is not None and EMBED in wanted:
        raise BuildError(
            "--graphs embed: this export's embed graph gathers int8 rows, which TensorRT cannot build; it runs "
            "on the CPU (export with --quant-keep embed --quant-keep ple_table for a TensorRT embed engine)"
        )
    have = tuple(role for role in export.graphs if role in _DIMS and not (row_tables and role == EMBED))
    if wanted is None:
        return have
    unknown = [role for role in wanted if role not in have]
    if unknown or not wanted:
        raise BuildError(
            f"--graphs: {', '.join(unknown) if unknown else '(none)'} not in this export; "
            f"choose from {', '.join(have)}"
        )
    return tuple(role for role in have if role in wanted)
