"""Audio-tower tensors of an E2B / E4B checkpoint: the names an AudioSpec expects, resolved and loaded.

Checkpoint keys are `model.` + our names (`model.audio_tower.*`, `model.embed_audio.*`), as in the
released Gemma 4 checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .audio_config import AudioSpec
from .vision_weights import fill_tower, module_shapes, resolve_tower_weights
from .weights import CheckpointReader, TensorEntry

AUDIO_ROOTS = ("audio_tower.", "embed_audio.")


def audio_shapes(spec: AudioSpec) -> dict[str, tuple[int, ...]]:
    """Our tensor names (no `model.` prefix) -> shape, read off the tower built on the meta device."""
    from .audio import Gemma4Audio

    with torch.device("meta"):
        return module_shapes(Gemma4Audio(spec))


def resolve_audio_weights(reader: CheckpointReader, spec: AudioSpec) -> dict[str, TensorEntry]:
    """Our names -> checkpoint entries; error on a missing, unexpected or mis-shaped audio tensor."""
    return resolve_tower_weights(reader, audio_shapes(spec), AUDIO_ROOTS, "audio_config")


def load_audio_model(
    checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32, spec: AudioSpec | None = None
):
    """Build `Gemma4Audio` on the meta device and fill it tensor by tensor."""
    from .audio import Gemma4Audio

    spec = spec or AudioSpec.from_pretrained(checkpoint_dir)
    if spec is None:
        raise CheckpointError(f"{checkpoint_dir} has no audio tower (config.json audio_config is null)")
    reader = CheckpointReader(checkpoint_dir)
    with torch.device("meta"):
        model = Gemma4Audio(spec)
    return fill_tower(model, reader, resolve_audio_weights(reader, spec), dtype)
