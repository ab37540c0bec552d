"""Vision-tower tensors of a multimodal checkpoint: the names a VisionSpec expects, resolved and loaded.

Checkpoint keys are `model.` + our names (`model.vision_tower.*`, `model.embed_vision.*`), as in the
released Gemma 4 checkpoints. The resolve / load steps are shared with the audio tower (audio_weights.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .vision_config import VisionSpec
from .weights import CheckpointReader, TensorEntry, check_complete, check_entry

VISION_PREFIX = "model."
VISION_ROOTS = ("vision_tower.", "embed_vision.")
TOWER_PREFIX = VISION_PREFIX  # every tower's keys are `model.` + our names


def module_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Our tensor names (no `model.` prefix) -> shape, of a tower built on the meta device."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def vision_shapes(spec: VisionSpec) -> dict[str, tuple[int, ...]]:
    """Our tensor names (no `model.` prefix) -> shape, read off the tower built on the meta device."""
    from .vision import Gemma4Vision

    with torch.device("meta"):
        return module_shapes(Gemma4Vision(spec))


def resolve_tower_weights(
    reader: CheckpointReader, expected: dict[str, tuple[int, ...]], roots: tuple[str, ...], source: str
) -> dict[str, TensorEntry]:
    """Our names -> checkpoint entries of the tower under `roots`; error on a missing, unexpected or
    mis-shaped tensor (`source` names the config section that sizes them)."""
    found: dict[str, TensorEntry] = {}
    for key, entry in reader.entries.items():
        name = key.removeprefix(TOWER_PREFIX)
        if not (key.startswith(TOWER_PREFIX) and name.startswith(roots)):
            continue
        if name not in expected:
            raise CheckpointError(
                f"unexpected tensor '{key}' in {entry.file.name}: the {source} has no such weight"
            )
        check_entry(entry, expected[name], source)
        found[name] = entry
    check_complete(expected, found, TOWER_PREFIX, reader)
    return found


def resolve_vision_weights(reader: CheckpointReader, spec: VisionSpec) -> dict[str, TensorEntry]:
    """Our names -> checkpoint entries; error on a missing, unexpected or mis-shaped vision tensor."""
    return resolve_tower_weights(reader, vision_shapes(spec), VISION_ROOTS, "vision_config")


def fill_tower(
    model: torch.nn.Module, reader: CheckpointReader, entries: dict[str, TensorEntry], dtype: torch.dtype
) -> torch.nn.Module:
    """Replace a meta-device tower's parameters and buffers by the checkpoint's tensors, one at a time."""
    for name, entry in entries.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = reader.load(entry).to(dtype)
        if attr in module._buffers:
            module._buffers[attr] = tensor
        else:
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    return model.eval()


def load_vision_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, spec: VisionSpec | None = None
):
    """Build `Gemma4Vision` on the meta device and fill it tensor by tensor."""
    from .vision import Gemma4Vision

    spec = spec or VisionSpec.from_pretrained(checkpoint_dir)
    if spec is None:
        raise CheckpointError(f"{checkpoint_dir} has no vision tower (config.json vision_config is null)")
    reader = CheckpointReader(checkpoint_dir)
    with torch.device("meta"):
        model = Gemma4Vision(spec)
    return fill_tower(model, reader, resolve_vision_weights(reader, spec), dtype)
