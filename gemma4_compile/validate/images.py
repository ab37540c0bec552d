"""An image prompt through the export (vision.onnx -> embed.onnx -> decoder.onnx on onnxruntime) against
transformers' `Gemma4ForConditionalGeneration` on the source checkpoint, staged so a failure names its stage:

1. preprocessing: our patches (numpy + Pillow) vs transformers' Pillow processor: pixels, positions, counts;
2. encoder: vision.onnx's soft tokens vs `get_image_features` (eager, fp32);
3. end to end: prompt logits of an image+text prompt longer than the sliding window with the images inside it,
   then greedy tokens; also the logits with transformers' own soft tokens fed to our embed graph, which
   attributes a failure to the encoder (its round-off, amplified by the decoder) or to the merge and decoder.

The fixed bounds (1e-5, 1e-4) sit below transformers' own fp32 round-off on the tiny random towers (soft
tokens up to ~4: its fp32 run is 1.7e-5 / 2.5e-4 from its fp64 run). So, as the text drift gate does, a stage
over its bound still passes when our output is at least nearly as close to transformers in fp64 as
transformers' fp32 run is (`NOISE_FACTOR`). The end-to-end stage also passes when the logits with
transformers' soft tokens are within its bound: the merge and decoder are then exact, and the rest is the
encoder's round-off (which the encoder stage checks) amplified by the decoder, whose max over the prompt's
logits swings by 2x between two equally accurate fp32 towers (tiny-26b-a4b: ours 1.4e-5 and transformers
1.4e-5 from fp64 at the encoder, 3.5e-4 and 1.7e-4 end to end). Wrong math (a weight x1.05, PLE of
placeholder ids, a causal mask on an image run) is orders of magnitude past all three.

fp16 (and bf16, where a backend runs it) exports are gated as issue #13 asks, against transformers' fp32 run:
the encoder by the minimum per-row cosine of the soft tokens, end to end by top-1 agreement and mean KL over
the prompt positions; max |Δ| and greedy tokens are reported, preprocessing keeps its exact bound. The fp32
noise rule has a half-precision twin: a gate missed by at most NOISE_FACTOR x transformers' own shortfall at
the export's precision (its half run vs its fp32 run) still passes (docs/validation.md, "Reduced precision").

Imports torch and transformers: only `validate` loads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..export.manifest import AUDIO_EMBEDS, IMAGE_EMBEDS, ExportManifest
from ..runtime.images import expand_images, image_support, soft_token_rows
from . import metrics as M

PIXEL_ATOL = 1e-6  # preprocessing: one ulp of the 1/255 rescale (observed 6e-8)
SOFT_TOKEN_ATOL = 1e-5  # encoder, fp32 (issue #13)
LOGIT_ATOL = 1e-4  # end to end, fp32 (issue #13; the text parity bound)
NOISE_FACTOR = 2.0  # ours vs fp64 may be this many times transformers' fp32-vs-fp64 distance
GREEDY_STEPS = 16
BUDGET = 70  # the smallest soft-token budget: tiny towers, cheap prompts


@dataclass(frozen=True)
class HalfGates:
    """What a reduced-precision export must reach against transformers' fp32 run."""

    cosine: float  # minimum over soft-token rows of cos(ours, transformers')
    top1: float  # fraction of prompt positions whose argmax agrees (near-ties count, as for text)
    kl_mean: float  # mean KL(transformers ‖ ours) over the prompt positions, nats


HALF_GATES = HalfGates(cosine=0.999, top1=0.99, kl_mean=1e-3)  # issue #13: "as for text"


@dataclass(frozen=True)
class Gate:
    """One reduced-precision criterion of a stage. `own`: the same metric of transformers run at the export's
    precision against its fp32 run (None: not run); missing `bound` by at most NOISE_FACTOR x transformers'
    own shortfall still passes, as the fp32 stages allow for transformers' own fp32 round-off."""

    metric: str  # "min cosine" | "top-1" | "mean KL"
    value: float
    bound: float
    at_least: bool  # value must be >= bound (similarities); else <= (KL)
    own: float | None = None

    def _shortfall(self, v: float) -> float:
        """Distance from a perfect match: 1 - v for a similarity, v for a divergence."""
        return 1.0 - v if self.at_least else v

    @property
    def within_bound(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound  # NaN: False

    @property
    def passed(self) -> bool:
        if self.within_bound:
            return True
        if self.own is None:
            return False
        return self._shortfall(self.value) <= NOISE_FACTOR * self._shortfall(self.own)

    def describe(self) -> str:
        digits = 6 if self.at_least else 3  # similarities sit near 1: their digits are in the tail
        own = f", transformers' own {self.own:.{digits}g}" if self.own is not None else ""
        op = "≥" if self.at_least else "≤"
        return f"{self.metric} {self.value:.{digits}g} (gate {op} {self.bound:g}{own})"


@dataclass(frozen=True)
class Stage:
    name: str  # "preprocessing" | "encoder" | "end-to-end" | "greedy"
    value: float  # max |Δ| (greedy: tokens that differ)
    bound: float | None  # None: reported only (reduced precision: `gates` decide)
    detail: str = ""
    exact: float | None = None  # max |Δ| of ours vs transformers in fp64 (None: no fp64 run)
    noise: float | None = None  # max |Δ| of transformers' twin (fp64, or the export's half) vs its fp32 run
    gates: tuple[Gate, ...] = ()
    # end to end, fp32: max |Δ| with transformers' soft tokens fed to our embed graph (the merge and decoder
    # alone); within the bound, what is left of `value` is the encoder's round-off, amplified by the decoder
    decoder: float | None = None

    @property
    def passed(self) -> bool:
        if self.bound is None:
            return all(g.passed for g in self.gates)
        within_noise = self.exact is not None and self.exact <= NOISE_FACTOR * self.noise
        decoder_exact = self.decoder is not None and self.decoder <= self.bound
        return self.value <= self.bound or within_noise or decoder_exact

    @property
    def gate(self) -> str:
        """The rule that decides this stage, as the reports show it."""
        if self.gates:
            return "; ".join(g.describe() for g in self.gates)
        if self.bound is None:
            return "reported only"
        noise = f", or vs fp64 ≤ {NOISE_FACTOR:g}x transformers' own" if self.exact is not None else ""
        decoder = ", or ≤ it with transformers' soft tokens" if self.decoder is not None else ""
        return f"max abs Δ ≤ {self.bound:g}{noise}{decoder}"

    def why(self) -> str:
        """What failed: the missed gates, or the value over the bound."""
        if self.bound is None:
            return "; ".join(g.describe() for g in self.gates if not g.passed)
        return f"{self.value:.3g} > {self.bound:g}"


class StagedReport:
    """What a staged report (images, audio) shares: `stages`, and `kind` naming the prompt in its failure."""

    kind: ClassVar[str]
    stages: list[Stage]

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.stages)

    def failure(self) -> str:
        bad = next((s for s in self.stages if not s.passed), None)
        if bad is None:
            return ""
        noise = (
            f"; vs fp64 {bad.exact:.3g}, transformers' own {bad.noise:.3g}" if bad.exact is not None else ""
        )
        return f"{self.kind} prompt fails at the {bad.name} stage: {bad.why()} ({bad.detail}{noise})"

    def summary(self) -> str:
        """One phrase per stage: its gated metrics, else its max |Δ| (greedy: tokens that differ)."""
        return ", ".join(
            f"{s.name} " + (", ".join(f"{g.metric} {g.value:.4g}" for g in s.gates) or f"{s.value:.2g}")
            for s in self.stages
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"], d["failure"], d["summary"] = self.passed, self.failure(), self.summary()
        for s, stage in zip(d["stages"], self.stages):
            s["passed"], s["gate"] = stage.passed, stage.gate
            for g, gate in zip(s["gates"], stage.gates):
                g["passed"] = gate.passed
        return d


@dataclass(frozen=True)
class ImageReport(StagedReport):
    """Per-stage errors of one image prompt; `skipped` says why the end-to-end stages did not run."""

    kind: ClassVar[str] = "image"
    prompt_tokens: int
    image_tokens: list[int]
    stages: list[Stage] = field(default_factory=list)
    skipped: str | None = None
    precision: str = "fp32"  # the export's: fp32 bounds, or the reduced-precision gates


def synthetic_images(seed: int = 0) -> list[Any]:
    """A seeded random 96x144 photo (60 soft tokens at budget 70) and a 40x120 gradient strip (56)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (96, 144, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, 120, dtype=np.float32)
    strip = np.stack([np.tile(ramp, (40, 1)), np.tile(ramp[::-1], (40, 1)), np.full((40, 120), 90.0)], -1)
    return [Image.fromarray(photo), Image.fromarray(strip.astype(np.uint8))]


def image_prompt_ids(manifest: ExportManifest, counts: list[int], seed: int = 0) -> np.ndarray:
    """[1, S]: random text ids, image 0 after 5 of them, image 1 after 4 more, then 2 windows + 5 of text."""
    spec, mm = manifest.spec, image_support(manifest)
    rng = np.random.default_rng(seed)
    W = spec.sliding_window
    text = [rng.integers(7, spec.vocab_size, n).tolist() for n in (5, 4, 2 * W + 5)]
    return np.asarray([[spec.bos_token_id, *expand_images(text, counts, mm)]], np.int64)


def load_reference(checkpoint: str | Path) -> Any:
    """transformers' Gemma4ForConditionalGeneration, fp32, eager attention and experts. On 26B/31B its sliding
    layers attend both ways inside image runs (`use_bidirectional_attention="vision"`); the tiny twins' configs
    leave it null, so the family decides, as it does for the export (vision_config.bidirectional_image_blocks)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from ..model.config import Gemma4Spec
    from ..model.vision_config import bidirectional_image_blocks, read_config_json

    hf_logging.disable_progress_bar()  # third-party output; the report says what ran
    model = Gemma4ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    k_eq_v = Gemma4Spec.from_pretrained(checkpoint).attention_k_eq_v
    if bidirectional_image_blocks(read_config_json(checkpoint), k_eq_v):
        model.config.get_text_config().use_bidirectional_attention = "vision"
    return model.eval()


def validate_images(
    runner: Any,
    hf: Any,
    twin: Any = None,
    *,
    images: list[Any] | None = None,
    steps: int = GREEDY_STEPS,
    seed: int = 0,
) -> ImageReport:
    """The staged check of `runner` (an OrtRunner over an export with vision.onnx) against `hf` (transformers,
    fp32). `twin`: transformers for the noise allowance, in fp64 for an fp32 export and at the export's
    precision for a half one (`reference_twin`); None: the fixed bounds and gates only."""
    import torch
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from ..model.vision_preprocess import batch_patches, image_patches

    manifest = runner.manifest
    mm = manifest.multimodal
    images = images or synthetic_images(seed)
    ours = [image_patches(im, mm.vision, BUDGET) for im in images]
    counts = [p.soft_tokens for p in ours]
    processor = Gemma4ImageProcessorPil(
        max_soft_tokens=BUDGET,
        patch_size=mm.vision.patch_size,
        pooling_kernel_size=mm.vision.pooling_kernel_size,
    )
    ref_in = processor(images=images, return_tensors="np")
    stages = [_preprocessing(ours, ref_in, counts)]
    pixels, positions = batch_patches(ours)
    soft, soft_len = runner.encode_images(pixels, positions)
    rows = soft_token_rows(soft, soft_len)
    t = torch.from_numpy
    hf_rows, twin_rows = (
        _hf_soft_tokens(m, t(ref_in["pixel_values"]), t(ref_in["image_position_ids"])) for m in (hf, twin)
    )
    stages.append(encoder_stage(manifest.dtype, rows, hf_rows, twin_rows))
    if runner.image_refusal:  # 26B/31B exports written before mm_block_ids
        return ImageReport(0, counts, stages, skipped=runner.image_refusal, precision=manifest.dtype)
    ids = image_prompt_ids(manifest, counts, seed)
    hf_in = {"pixel_values": t(ref_in["pixel_values"]), "image_position_ids": t(ref_in["image_position_ids"])}
    blocks = mm.tokens.image if mm.bidirectional_image_blocks else None
    stages += end_to_end(
        runner, (hf, twin), ids, {IMAGE_EMBEDS: rows}, {IMAGE_EMBEDS: hf_rows}, hf_in, steps, blocks
    )
    return ImageReport(int(ids.shape[1]), counts, stages, precision=manifest.dtype)


def reference_twin(hf: Any, precision: str) -> Any:
    """transformers' model for the noise allowance of an export at `precision`: fp64 for fp32 (the truth its
    fp32 run misses), the export's own half dtype otherwise (how far transformers itself lands from its fp32)."""
    import copy

    import torch

    dtype = {"fp32": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return copy.deepcopy(hf).to(dtype)


def _preprocessing(ours: list[Any], ref: dict[str, np.ndarray], counts: list[int]) -> Stage:
    from ..model.vision_preprocess import batch_patches

    pixels, positions = batch_patches(ours, pad_to=ref["pixel_values"].shape[1])
    ref_counts = [int(n) for n in ref["num_soft_tokens_per_image"]]
    if counts != ref_counts or not np.array_equal(positions, ref["image_position_ids"]):
        return Stage(
            "preprocessing", np.inf, PIXEL_ATOL, f"soft tokens {counts} vs {ref_counts}, or positions"
        )
    diff = float(np.abs(pixels - ref["pixel_values"]).max())
    return Stage(
        "preprocessing", diff, PIXEL_ATOL, f"pixels max abs Δ; soft tokens {counts}, positions equal"
    )


def _hf_soft_tokens(hf: Any, pixels: Any, positions: Any) -> np.ndarray | None:
    """transformers' real soft tokens of every image, concatenated, in the model's dtype (None: no model)."""
    import torch

    if hf is None:
        return None
    with torch.no_grad():
        out = hf.model.get_image_features(pixels.to(hf.dtype), positions).pooler_output
    return to_numpy(torch.cat(list(out)))


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor as numpy, bf16 widened to fp32 (numpy has no bf16)."""
    import torch

    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def stage(
    name: str, ours: np.ndarray, ref: np.ndarray, ref64: np.ndarray | None, bound: float, detail: str
) -> Stage:
    """max |Δ| of ours vs the fp32 reference, and, with an fp64 run, ours vs it and the reference's own noise."""
    if ours.shape != ref.shape:
        return Stage(name, np.inf, bound, f"shapes {list(ours.shape)} vs {list(ref.shape)}")
    exact = noise = None
    if ref64 is not None:
        exact, noise = float(np.abs(ours - ref64).max()), float(np.abs(ref - ref64).max())
    return Stage(name, float(np.abs(ours - ref).max()), bound, detail, exact, noise)


def encoder_stage(
    precision: str, rows: np.ndarray, hf_rows: np.ndarray, twin_rows: np.ndarray | None
) -> Stage:
    """fp32: max |Δ| of the soft tokens against the bound (`twin_rows`: fp64, for the noise rule); half: the
    minimum per-row cosine against the gate (`twin_rows`: at the export's precision), max |Δ| reported."""
    scale = float(np.abs(hf_rows).max()) if hf_rows.size else 0.0
    detail = f"soft tokens max abs Δ ({len(hf_rows)} rows, values up to {scale:.2g})"
    if precision == "fp32":
        return stage("encoder", rows, hf_rows, twin_rows, SOFT_TOKEN_ATOL, detail)
    if rows.shape != hf_rows.shape:
        return stage("encoder", rows, hf_rows, None, SOFT_TOKEN_ATOL, detail)  # fails, naming the shapes
    own = None if twin_rows is None else M.max_abs_diff(hf_rows, twin_rows)
    gate = cosine_gate(rows, hf_rows, twin_rows)
    return Stage("encoder", M.max_abs_diff(hf_rows, rows), None, detail, noise=own, gates=(gate,))


def cosine_gate(rows: np.ndarray, ref: np.ndarray, own: np.ndarray | None = None) -> Gate:
    """Soft tokens [N, E] against transformers' fp32 ones: the worst row's cosine (`own`: the twin's rows)."""

    def worst(x: np.ndarray) -> float:
        return float(M.cosine_similarity(ref, x).min()) if len(ref) else 1.0

    return Gate("min cosine", worst(rows), HALF_GATES.cosine, True, None if own is None else worst(own))


def logit_gates(
    ours: np.ndarray, ref: np.ndarray, own: np.ndarray | None, precision: str
) -> tuple[Gate, Gate]:
    """Prompt logits [S, V] against transformers' fp32 ones: top-1 agreement (near-ties within the text
    validation's margin for `precision` count) and mean KL (`own`: the twin's logits)."""
    from .validate import tolerance_for

    tie = tolerance_for(precision).tie_margin(ref)

    def top1(x: np.ndarray) -> float:
        return M.top1_agreement(ref, x, tie)

    def kl(x: np.ndarray) -> float:
        return float(M.kl_divergence(ref, x).mean())

    return (
        Gate("top-1", top1(ours), HALF_GATES.top1, True, None if own is None else top1(own)),
        Gate("mean KL", kl(ours), HALF_GATES.kl_mean, False, None if own is None else kl(own)),
    )


def end_to_end(
    runner: Any,
    models: tuple[Any, Any],
    ids: np.ndarray,
    soft: dict[str, np.ndarray],
    hf_soft: dict[str, np.ndarray],
    hf_in: dict[str, Any],
    steps: int,
    block_token: int | None = None,
) -> list[Stage]:
    """Prompt logits and greedy tokens of `ids` with our soft tokens (`soft`, by embed input name) merged,
    against transformers (`models`: fp32, and its twin or None) fed `hf_in`; also the logits with
    transformers' soft tokens (`hf_soft`). fp32 exports: the max |Δ| bound and identical greedy tokens;
    half: the top-1 and KL gates, max |Δ| and greedy tokens reported.
    `block_token`: transformers also gets `mm_token_type_ids` marking this placeholder as image (26B/31B:
    its runs are the bidirectional blocks our runner feeds as mm_block_ids)."""
    hf, precision = models[0], runner.manifest.dtype
    ref, twin = (_hf_logits(m, ids, hf_in, block_token) for m in models)
    ours = _prefill(runner, ids, soft)
    theirs_soft = {n: r.astype(soft[n].dtype) for n, r in hf_soft.items()}
    with_hf_soft = M.max_abs_diff(ref, _prefill(runner, ids, theirs_soft))
    detail = f"prompt logits max abs Δ over {ids.shape[1]} tokens; {with_hf_soft:.2g} with transformers' soft tokens"
    mine, (theirs, gaps) = _greedy(runner, ids, soft, steps), _hf_greedy(hf, ids, hf_in, steps, block_token)
    differ = int(sum(a != b for a, b in zip(mine, theirs)))
    agree = f"{steps - differ}/{steps} greedy tokens identical"
    lead = M.greedy_match_length(theirs, mine)
    if lead < steps:  # a near-tie there (a gap below the round-off) is precision, not a bug
        agree += f"; first differs at step {lead + 1}, transformers' top two logits {gaps[lead]:.2g} apart"
    if precision == "fp32":
        logits = replace(stage("end-to-end", ours, ref, twin, LOGIT_ATOL, detail), decoder=with_hf_soft)
        return [logits, Stage("greedy", differ, 0, agree)]
    if ours.shape != ref.shape:
        return [stage("end-to-end", ours, ref, None, LOGIT_ATOL, detail)]  # fails, naming the shapes
    own = None if twin is None else twin[0]
    gates = logit_gates(ours[0], ref[0], own, precision)
    noise = None if twin is None else M.max_abs_diff(ref, twin)
    logits = Stage("end-to-end", M.max_abs_diff(ref, ours), None, detail, noise=noise, gates=gates)
    return [logits, Stage("greedy", differ, None, agree)]


def _with_token_types(hf_in: dict[str, Any], seq: Any, block_token: int | None) -> dict[str, Any]:
    """`hf_in` plus, with `block_token`, `mm_token_type_ids` of `seq` (1: image, 0: everything else)."""
    if block_token is None:
        return hf_in
    return {**hf_in, "mm_token_type_ids": (seq == block_token).long()}


def _hf_logits(
    hf: Any, ids: np.ndarray, hf_in: dict[str, Any], block_token: int | None = None
) -> np.ndarray | None:
    import torch

    if hf is None:
        return None
    seq = torch.from_numpy(ids)
    feeds = {k: v.to(hf.dtype) if v.is_floating_point() else v for k, v in hf_in.items()}
    with torch.no_grad():
        out = hf(input_ids=seq, **_with_token_types(feeds, seq, block_token))
    return to_numpy(out.logits)


def _attach(runner: Any, state: Any, soft: dict[str, np.ndarray]) -> None:
    for name, rows in soft.items():
        {IMAGE_EMBEDS: runner.attach_images, AUDIO_EMBEDS: runner.attach_audio}[name](state, rows)


def _prefill(runner: Any, ids: np.ndarray, soft: dict[str, np.ndarray]) -> np.ndarray:
    state = runner.start(1, ids.shape[1])
    _attach(runner, state, soft)
    return runner.step(state, ids, np.array([ids.shape[1]]))


def _greedy(runner: Any, ids: np.ndarray, soft: dict[str, np.ndarray], steps: int) -> list[int]:
    state = runner.start(1, ids.shape[1] + steps)
    _attach(runner, state, soft)
    last = runner.step(state, ids, np.array([ids.shape[1]]))[0, -1]
    tokens = []
    for i in range(steps):
        tokens.append(int(last.argmax()))
        if i + 1 < steps:
            last = runner.step(state, np.array([[tokens[-1]]]), np.ones(1, np.int64))[0, -1]
    return tokens


def _hf_greedy(
    hf: Any, ids: np.ndarray, hf_in: dict[str, Any], steps: int, block_token: int | None = None
) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation, one full forward per token (no cache: nothing of ours in it), and
    the gap between its top two logits at each step."""
    import torch

    seq = torch.from_numpy(ids)
    tokens, gaps = [], []
    with torch.no_grad():
        for _ in range(steps):
            last = hf(input_ids=seq, **_with_token_types(hf_in, seq, block_token)).logits[0, -1]
            top = last.topk(2).values
            tokens.append(int(last.argmax()))
            gaps.append(float(top[0] - top[1]))
            seq = torch.cat([seq, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, gaps
