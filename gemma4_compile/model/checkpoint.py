"""Random-weight checkpoints in the released Hugging Face layout, written tensor by tensor.

Values are deterministic for a seed and independent of write order: every chunk of every tensor draws from
its own generator seeded by (seed, tensor name, chunk). Scales that default to 1.0 in transformers (norm
weights, `layer_scalar`, router `scale` and `per_expert_scale`, the vision `std_scale`, the audio tower's
`norm_*` weights) are drawn from 1 ± U(0.1, 0.5), so tests see them. Vision and audio clip bounds (±inf in
transformers) are drawn at ±U(1.5, 3), tight enough that random activations hit them; the audio
`per_dim_scale` (0 in transformers) is drawn N(0, 1).
Large tensors are generated in row chunks, so peak memory stays far below the model size.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import DType
from ..errors import CheckpointError
from ..fsutil import atomic_directory
from .audio_config import AudioSpec, AudioTokens
from .audio_weights import audio_shapes
from .config import Gemma4Spec
from .tokenizer import write_tokenizer
from .vision import CLIP_BOUNDS
from .vision_config import ImageTokens, VisionSpec
from .vision_weights import VISION_PREFIX, vision_shapes
from .weights import ST_NAMES, TEXT_PREFIXES, expected_shapes, leftover_shapes

CHUNK_ELEMENTS = 1 << 24  # 16M values (64 MiB in fp32) per generated chunk
DEFAULT_MAX_SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    spec: Gemma4Spec
    dtype: torch.dtype
    files: tuple[str, ...]
    total_bytes: int
    num_tensors: int


def _is_unit_scale(name: str) -> bool:
    return name.endswith(
        ("norm.weight", "layer_scalar", "router.scale", "router.per_expert_scale", "std_scale")
    ) or (name.startswith("audio_tower.layers.") and ".norm_" in name)


def _is_clip_bound(name: str) -> bool:
    return name.endswith(CLIP_BOUNDS)


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + chunk) % (2**63))
    return g


def random_chunks(
    name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype
) -> Callable[[], list[torch.Tensor]]:
    """A generator of row chunks of one tensor (each chunk a contiguous slice along dim 0)."""
    row = 1
    for d in shape[1:]:
        row *= d
    rows = shape[0] if shape else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row, 1))

    def chunks():
        for c, start in enumerate(range(0, rows, rows_per_chunk)):
            n = min(rows_per_chunk, rows - start)
            g = _generator(seed, name, c)
            sub = (n, *shape[1:]) if shape else ()
            if _is_unit_scale(name):  # 1 ± U(0.1, 0.5): never close to 1, so a dropped scale is visible
                sign = torch.randint(0, 2, sub, generator=g) * 2 - 1
                t = 1 + sign * (0.1 + 0.4 * torch.rand(sub, generator=g))
            elif _is_clip_bound(name):  # min < 0 < max, about 1.5-3 sigma of the activations they clamp
                sign = -1 if name.endswith("min") else 1
                t = sign * (1.5 + 1.5 * torch.rand(sub, generator=g))
            else:
                fan_in = shape[-1] if len(shape) >= 2 else 1
                t = torch.randn(sub, generator=g) * fan_in**-0.5
            yield t.to(dtype)

    return chunks


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...], Callable]], dtype: torch.dtype
) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape, _ in tensors:
        n = itemsize
        for d in shape:
            n *= d
        header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, chunks in tensors:
            for t in chunks():  # flattened first: a 0-d scalar (a clip bound) cannot be viewed as bytes
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


def write_random_checkpoint(
    spec: Gemma4Spec,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    multimodal: bool = True,
    force: bool = False,
    with_leftovers: bool = True,
    vision: VisionSpec | None = None,
    audio: AudioSpec | None = None,
) -> CheckpointInfo:
    """Write config.json + safetensors (sharded above `max_shard_bytes`) into `out_dir`, atomically.

    With `vision`, the checkpoint also holds the vision tower (`model.vision_tower.*`, `model.embed_vision.*`)
    and config.json its `vision_config`; with `audio`, likewise the audio tower (`model.audio_tower.*`,
    `model.embed_audio.*`, `audio_config`); without them, the text weights are written exactly as before."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"output directory {out} exists and is not empty (use --force to replace it)")
    for what, tower in (("vision", vision), ("audio", audio)):
        if tower is not None and not multimodal:
            raise CheckpointError(f"a {what} tower needs the multimodal layout (drop --text-only)")
        if tower is not None and tower.text_hidden_size != spec.hidden_size:
            raise CheckpointError(
                f"{what} projector width {tower.text_hidden_size} != text hidden size {spec.hidden_size}"
            )
    text_prefix = TEXT_PREFIXES[0] if multimodal else TEXT_PREFIXES[1]
    shapes = dict(expected_shapes(spec))
    if with_leftovers:
        shapes.update(leftover_shapes(spec))
    prefixes = dict.fromkeys(shapes, text_prefix)  # our name -> checkpoint key prefix
    towers = [vision_shapes(vision)] if vision is not None else []
    towers += [audio_shapes(audio)] if audio is not None else []
    for tower in towers:  # names start with vision_tower. / embed_audio. ...: no clash with text
        shapes.update(tower)
        prefixes.update(dict.fromkeys(tower, VISION_PREFIX))
    itemsize = torch.empty((), dtype=dtype).element_size()
    names = sorted(shapes)
    sizes = [(n, itemsize * _numel(shapes[n])) for n in names]
    shards = _plan_shards(sizes, max_shard_bytes)
    with atomic_directory(out, CheckpointError, force=force, marker="checkpoint") as tmp:
        files = []
        weight_map: dict[str, str] = {}
        total = 0
        for i, shard in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            tensors = [(prefixes[n] + n, shapes[n], random_chunks(n, shapes[n], seed, dtype)) for n in shard]
            total += _write_safetensors(tmp / fname, tensors, dtype)
            files.append(fname)
            weight_map.update({prefixes[n] + n: fname for n in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        config = spec.to_hf_config(multimodal=multimodal)
        dtype_name = DType.parse(dtype).onnx_name  # transformers spells dtypes as numpy does
        config["dtype"] = dtype_name
        if multimodal:
            config["text_config"]["dtype"] = dtype_name
        if vision is not None:
            config["vision_config"] = {**vision.to_hf_dict(), "dtype": dtype_name}
            config.update(
                ImageTokens.for_vocab(spec.vocab_size).hf_config()
            )  # the prompt's ids around images
        if audio is not None:
            config["audio_config"] = {**audio.to_hf_dict(), "dtype": dtype_name}
            config.update(AudioTokens.for_vocab(spec.vocab_size).hf_config())  # the ids around clips
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(spec, tmp)
    return CheckpointInfo(out, spec, dtype, tuple(files), total, len(names))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
