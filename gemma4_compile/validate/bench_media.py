"""The reference sides of bench's media rows (validate/bench.py): our torch towers and transformers'
`Gemma4ForConditionalGeneration` (eager, fp32, loaded as validation loads it), each taking the same
preprocessed arrays as the export's encoders and returning (soft tokens, counts per item) as numpy.

transformers' side also times the multimodal prompt from the decoded image and waveform: its own processor
(`Gemma4ImageProcessorPil`, `Gemma4AudioFeatureExtractor`), then `generate` of one token. Ours has no TTFT row:
our torch text model does not merge soft tokens.

Imports torch (and transformers): bench loads it for its reference turns only, never for a backend's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable
from ..export.manifest import ExportManifest, MultimodalSpec
from .bench import MediaPrompt
from .reference import torch_dtype


class TorchMedia:
    """Our towers (model/vision.py, model/audio.py) in the bench's precision."""

    def __init__(self, vision: Any, audio: Any = None):
        self.vision, self.audio = vision, audio

    @classmethod
    def load(cls, checkpoint: str | Path, precision: str, audio: bool) -> TorchMedia:
        from ..model.audio_weights import load_audio_model
        from ..model.vision_weights import load_vision_model

        dtype = torch_dtype(precision)
        return cls(
            load_vision_model(checkpoint, dtype), load_audio_model(checkpoint, dtype) if audio else None
        )

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dtype = self.vision.embed_vision.embedding_projection.weight.dtype
        soft, valid = self.vision(torch.from_numpy(pixels).to(dtype), torch.from_numpy(positions))
        return soft.float().numpy(), valid.sum(-1).numpy()

    @torch.inference_mode()
    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dtype = self.audio.embed_audio.embedding_projection.weight.dtype
        soft, valid = self.audio(torch.from_numpy(features).to(dtype), torch.from_numpy(mask))
        return soft.float().numpy(), valid.sum(-1).numpy()


class HFMedia:
    """transformers' towers through `get_image_features` / `get_audio_features`, and its generate."""

    def __init__(self, model: Any, mm: MultimodalSpec):
        self.model, self.mm = model, mm
        self._processors: dict[int, Any] = {}

    @classmethod
    def load(cls, checkpoint: str | Path, mm: MultimodalSpec) -> HFMedia:
        from .images import load_reference

        return cls(load_reference(checkpoint), mm)

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.model.model.get_image_features(torch.from_numpy(pixels), torch.from_numpy(positions))
        per_image = list(out.pooler_output)  # [n_i, E] each: the real soft tokens only
        return torch.cat(per_image).numpy(), np.array([len(t) for t in per_image])

    @torch.inference_mode()
    def encode_audio(self, features: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.model.model.get_audio_features(torch.from_numpy(features), torch.from_numpy(mask))
        return out.pooler_output.numpy(), out.attention_mask.sum(-1).numpy()

    def _image_processor(self, budget: int) -> Any:
        if budget not in self._processors:
            from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

            v = self.mm.vision
            self._processors[budget] = Gemma4ImageProcessorPil(
                max_soft_tokens=budget, patch_size=v.patch_size, pooling_kernel_size=v.pooling_kernel_size
            )
        return self._processors[budget]

    @torch.inference_mode()
    def first_token(self, prompt: MediaPrompt) -> int:
        """Its processor on the image and waveform, then `generate` of one greedy token."""
        from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

        feeds = dict(self._image_processor(prompt.budget)(images=[prompt.image], return_tensors="pt"))
        feeds = {k: feeds[k] for k in ("pixel_values", "image_position_ids")}
        if prompt.wave is not None:
            audio = Gemma4AudioFeatureExtractor()([prompt.wave], return_tensors="pt")
            feeds.update(
                input_features=audio["input_features"], input_features_mask=audio["input_features_mask"]
            )
        ids = torch.from_numpy(prompt.ids)
        if self.mm.bidirectional_image_blocks:  # 26B/31B: its sliding layers need the image runs marked
            feeds["mm_token_type_ids"] = (ids == self.mm.tokens.image).long()
        out = self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, **feeds
        )
        return int(out[0, -1])


def media_side(name: str, checkpoint: str | Path, manifest: ExportManifest, precision: str) -> Any:
    """The reference media side `name` (torch: our towers; hf: transformers) for an export with towers."""
    audio = "audio" in manifest.graphs
    if name == "torch":
        return TorchMedia.load(checkpoint, precision, audio)
    if name == "hf":
        return HFMedia.load(checkpoint, manifest.multimodal)
    raise BackendUnavailable(f"{name}: no media side; choose torch or hf")
