"""An audio prompt through the export (audio.onnx -> embed.onnx -> decoder.onnx on onnxruntime) against
transformers' `Gemma4ForConditionalGeneration` on the source checkpoint, staged like images
(validate/images.py, whose stages, bounds and fp64 noise rule it shares):

1. preprocessing: our numpy log-mel (model/audio_preprocess.py) vs transformers' `Gemma4AudioFeatureExtractor`:
   features, mask and soft-token counts;
2. encoder: audio.onnx's real soft tokens vs `get_audio_features` (eager, fp32);
3. end to end: prompt logits of an audio+text prompt longer than the sliding window with the clips inside it,
   then greedy tokens; also the logits with transformers' soft tokens fed to our embed graph.

fp32 exports keep the fixed bounds; half-precision ones get the cosine / top-1 / KL gates (images.py).
Imports torch and transformers: only `validate` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..export.manifest import AUDIO_EMBEDS
from ..model.audio_preprocess import SAMPLE_RATE, AudioFeatures, audio_features, batch_features
from ..runtime.audio import audio_run, audio_support
from ..runtime.images import join_runs, soft_token_rows
from .images import GREEDY_STEPS, Stage, StagedReport, encoder_stage, end_to_end, to_numpy

FEATURE_ATOL = 1e-6  # preprocessing (issue #13)
CLIP_SECONDS = (0.6, 0.37)  # two short clips: 15 and 10 soft tokens, the second padded in the batch


@dataclass(frozen=True)
class AudioReport(StagedReport):
    """Per-stage errors of one audio prompt."""

    kind: ClassVar[str] = "audio"
    prompt_tokens: int
    audio_tokens: list[int]
    stages: list[Stage] = field(default_factory=list)
    precision: str = "fp32"  # the export's: fp32 bounds, or the reduced-precision gates


def synthetic_clips(seed: int = 0) -> list[np.ndarray]:
    """Seeded sine + noise clips at 16 kHz (CLIP_SECONDS long), float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    clips = []
    for i, seconds in enumerate(CLIP_SECONDS):
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        tone = 0.5 * np.sin(2 * np.pi * (220 * (i + 1)) * t) + 0.05 * rng.standard_normal(len(t))
        clips.append(tone.astype(np.float32))
    return clips


def audio_prompt_ids(manifest: Any, counts: list[int], seed: int = 0) -> np.ndarray:
    """[1, S]: random text ids, clip 0 after 5 of them, clip 1 after 4 more, then 2 windows + 5 of text."""
    spec, tokens = manifest.spec, audio_support(manifest)
    rng = np.random.default_rng(seed)
    W = spec.sliding_window
    text = [rng.integers(9, spec.vocab_size, n).tolist() for n in (5, 4, 2 * W + 5)]
    runs = [audio_run(n, tokens) for n in counts]
    return np.asarray([[spec.bos_token_id, *join_runs(text, runs)]], np.int64)


def validate_audio(
    runner: Any,
    hf: Any,
    twin: Any = None,
    *,
    clips: list[np.ndarray] | None = None,
    steps: int = GREEDY_STEPS,
    seed: int = 0,
) -> AudioReport:
    """The staged check of `runner` (an OrtRunner over an export with audio.onnx merged by its embed graph)
    against `hf` (transformers, fp32). `twin`: transformers for the noise allowance (images.reference_twin:
    fp64 for an fp32 export, the export's half dtype otherwise); None: the fixed bounds and gates only."""
    import torch
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    manifest = runner.manifest
    waves = clips or synthetic_clips(seed)
    ours = [audio_features(w, SAMPLE_RATE) for w in waves]
    counts = [c.soft_tokens for c in ours]
    ref_in = Gemma4AudioFeatureExtractor()(waves, return_tensors="np")
    features, mask = ref_in["input_features"], ref_in["input_features_mask"]
    stages = [_preprocessing(ours, features, mask, _processor_counts(waves))]
    soft, soft_len = runner.encode_audio(*batch_features(ours))
    rows = soft_token_rows(soft, soft_len)
    hf_feats = {"input_features": torch.from_numpy(features), "input_features_mask": torch.from_numpy(mask)}
    hf_rows = _hf_soft_tokens(hf, hf_feats)
    exact = twin is not None and twin.dtype == torch.float64
    # transformers computes the audio attention in fp32 and fails on fp64 inputs: no fp64 tower (fp32: the
    # fixed bound only); a half twin runs as is
    twin_rows = None if exact or twin is None else _hf_soft_tokens(twin, hf_feats)
    stages.append(encoder_stage(manifest.dtype, rows, hf_rows, twin_rows))
    if exact:
        fp32_audio_tower(twin)
    ids = audio_prompt_ids(manifest, counts, seed)
    stages += end_to_end(
        runner, (hf, twin), ids, {AUDIO_EMBEDS: rows}, {AUDIO_EMBEDS: hf_rows}, hf_feats, steps
    )
    return AudioReport(int(ids.shape[1]), counts, stages, precision=manifest.dtype)


def _processor_counts(waves: list[np.ndarray]) -> list[int]:
    """The placeholders transformers' processor writes per clip (`_compute_audio_num_tokens`, cap 750)."""
    from types import SimpleNamespace

    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    stub = SimpleNamespace(feature_extractor=Gemma4AudioFeatureExtractor(), audio_seq_length=750)
    return [Gemma4Processor._compute_audio_num_tokens(stub, w, SAMPLE_RATE) for w in waves]


def _preprocessing(
    ours: list[AudioFeatures], features: np.ndarray, mask: np.ndarray, ref_counts: list[int]
) -> Stage:
    """Our per-clip frames, padded as the extractor pads the batch, against its features, mask and counts."""
    mine, my_mask = batch_features(ours)
    frames = features.shape[1]
    if (
        mine.shape[1] > frames
        or not np.array_equal(my_mask, mask[:, : mine.shape[1]])
        or mask[:, mine.shape[1] :].any()
    ):
        return Stage("preprocessing", np.inf, FEATURE_ATOL, "masks differ")
    padded = np.zeros_like(features)
    padded[:, : mine.shape[1]] = mine
    counts = [c.soft_tokens for c in ours]
    if counts != ref_counts:
        return Stage("preprocessing", np.inf, FEATURE_ATOL, f"soft tokens {counts} vs {ref_counts}")
    diff = float(np.abs(padded - features).max())
    return Stage("preprocessing", diff, FEATURE_ATOL, f"log-mel max abs Δ; soft tokens {counts}, masks equal")


def fp32_audio_tower(hf64: Any) -> None:
    """Make transformers' fp64 twin runnable on audio, in place: its audio attention computes in fp32 whatever
    the dtype (and fails on fp64 inputs), so the tower runs in fp32 between casts; the projector and the
    decoder stay fp64. The end-to-end noise allowance then measures the decoder's and projector's round-off."""
    import torch

    tower = hf64.model.audio_tower
    if getattr(tower, "_gemma4_compile_fp32", False):
        return
    tower.float()
    tower.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))

    def to64(module: Any, args: Any, out: Any) -> Any:
        out.last_hidden_state = out.last_hidden_state.to(torch.float64)
        return out

    tower.register_forward_hook(to64)
    tower._gemma4_compile_fp32 = True


def _hf_soft_tokens(hf: Any, feats: dict[str, Any]) -> np.ndarray:
    """transformers' real soft tokens of every clip, concatenated."""
    import torch

    with torch.no_grad():
        out = hf.model.get_audio_features(feats["input_features"].to(hf.dtype), feats["input_features_mask"])
    return to_numpy(out.pooler_output[out.attention_mask])
