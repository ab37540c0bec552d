"""Backends behind one interface: `logits(ids)` and `generate(ids, steps)`, all numpy in, numpy out.

A runner implements two primitives, `start(batch, max_len)` (fresh caches) and `step(state, ids, seq_len)`
(run S new tokens through the caches, return their logits). Prefill and decode are both `step`; the shared
`logits` and `generate` are written once here on top of them. Rows of a batch may have different lengths:
`lengths[b]` tokens of row b are real, the rest is right padding.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailable, Gemma4CompileError
from ..model.config import Gemma4Spec


@dataclass
class DecodeState:
    """Per-sequence bookkeeping shared by all runners; `caches` is backend-specific."""

    past_len: np.ndarray  # [B] int64
    max_len: int
    caches: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _lengths(input_ids: np.ndarray, lengths: np.ndarray | None) -> np.ndarray:
    B, S = input_ids.shape
    if lengths is None:
        return np.full(B, S, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() > S:
        raise Gemma4CompileError(f"lengths must be {B} values in [1, {S}], got {lengths.tolist()}")
    return lengths


class BaseRunner(abc.ABC):
    """Template for backends; subclasses implement `start` and `step`."""

    name = "base"
    spec: Gemma4Spec

    def __init__(self) -> None:
        self.last_latency_s = 0.0

    # ----- primitives ---------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self, batch: int, max_len: int) -> DecodeState:
        """Fresh caches for `batch` rows of up to `max_len` tokens."""

    @abc.abstractmethod
    def step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        """Run [B, S] tokens (row b: seq_len[b] real ones) -> logits [B, S, V] float32; advances the state."""

    # ----- shared API ---------------------------------------------------------------------------
    def timed_step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.step(state, input_ids, seq_len)
        self.last_latency_s = time.perf_counter() - t0
        return out

    def logits(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        seq_len = _lengths(input_ids, lengths)
        state = self.start(input_ids.shape[0], input_ids.shape[1])
        return self.timed_step(state, input_ids, seq_len)

    def generate_with_logits(
        self, input_ids: np.ndarray, steps: int, lengths: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy decode: prefill once, then one-token steps. -> tokens [B, steps], their logits [B, steps, V]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        seq_len = _lengths(input_ids, lengths)
        B = input_ids.shape[0]
        state = self.start(B, input_ids.shape[1] + steps)
        logits = self.timed_step(state, input_ids, seq_len)
        last = logits[np.arange(B), seq_len - 1]  # [B, V]
        tokens, chosen = [], []
        ones = np.ones(B, dtype=np.int64)
        for i in range(steps):
            nxt = last.argmax(-1).astype(np.int64)
            tokens.append(nxt)
            chosen.append(last)
            if i + 1 < steps:
                last = self.timed_step(state, nxt[:, None], ones)[:, 0]
        return np.stack(tokens, 1), np.stack(chosen, 1)

    def generate(self, input_ids: np.ndarray, steps: int, lengths: np.ndarray | None = None) -> np.ndarray:
        return self.generate_with_logits(input_ids, steps, lengths)[0]

    def debug_outputs(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-layer tensors by name: `hidden_states.I` [B, S, H] (residual after layer I) and, on MoE layers,
        `router_logits.I` [B, S, E]. Backends without them raise BackendUnavailable."""
        raise BackendUnavailable(f"{self.name}: per-layer debug outputs are not available")

    def hidden_states(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        """Residual stream after each decoder layer, [L, B, S, H] float32 (for localizing divergence)."""
        out = self.debug_outputs(input_ids, lengths)
        return np.stack([out[f"hidden_states.{i}"] for i in range(self.spec.num_hidden_layers)])

    def router_logits(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> dict[int, np.ndarray]:
        """MoE router logits per layer index, [B, S, E] float32 (for routing agreement)."""
        out = self.debug_outputs(input_ids, lengths)
        return {int(k.split(".")[1]): v for k, v in out.items() if k.startswith("router_logits.")}


def torch_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
    if name not in table:
        raise Gemma4CompileError(f"unsupported dtype {name!r}; choose fp32, bf16 or fp16")
    return table[name]


class TorchRunner(BaseRunner):
    """Our reference model (gemma4_compile.model) on the CPU."""

    name = "torch"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "fp32", model: Any = None):
        super().__init__()
        from ..model.weights import load_model

        self.dtype = torch_dtype(dtype)
        self.model = model if model is not None else load_model(checkpoint_dir, self.dtype)
        self.spec = self.model.spec

    def start(self, batch: int, max_len: int) -> DecodeState:
        return DecodeState(np.zeros(batch, np.int64), max_len, self.model.new_cache(batch, max_len, self.dtype))

    @torch.inference_mode()
    def _forward(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray, debug: bool = False):
        if int((state.past_len + input_ids.shape[1]).max()) > state.max_len:
            raise Gemma4CompileError(f"{self.name}: sequence exceeds the cache length {state.max_len}")
        ids = torch.from_numpy(np.ascontiguousarray(input_ids))
        embeds, tok = self.model.embed(ids)
        logits, state.caches, hs = self.model(
            embeds, tok, torch.from_numpy(state.past_len), torch.from_numpy(seq_len), state.caches, debug
        )
        state.past_len = state.past_len + seq_len
        return logits, hs

    def step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        return self._forward(state, input_ids, seq_len)[0].numpy()

    def debug_outputs(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
        from ..model.model import debug_output_names

        input_ids = np.asarray(input_ids, dtype=np.int64)
        state = self.start(*input_ids.shape)
        _, extra = self._forward(state, input_ids, _lengths(input_ids, lengths), debug=True)
        return {n: t.float().numpy() for n, t in zip(debug_output_names(self.spec), extra)}


class HFRunner(BaseRunner):
    """transformers' own Gemma 4 (eager attention, eager experts): the independent reference.

    Rows of different lengths run one at a time, so padding never reaches transformers' mask code.
    """

    name = "hf"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "fp32"):
        super().__init__()
        try:
            import transformers
        except ImportError:
            raise BackendUnavailable("hf: transformers is not installed (pip install 'gemma4-compile[test]')") from None
        self.spec = Gemma4Spec.from_pretrained(checkpoint_dir)
        self.dtype = torch_dtype(dtype)
        kwargs = dict(dtype=self.dtype, attn_implementation="eager", experts_implementation="eager")
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, **kwargs)
        self.model = model.eval()

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, cache: Any = None):
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
        return out.logits.float(), out.past_key_values

    def start(self, batch: int, max_len: int) -> DecodeState:
        from transformers import DynamicCache

        caches = [DynamicCache(config=self.model.config.get_text_config()) for _ in range(batch)]
        return DecodeState(np.zeros(batch, np.int64), max_len, caches)

    def step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        B, S = input_ids.shape
        out = np.zeros((B, S, self.spec.vocab_size), dtype=np.float32)
        for b in range(B):
            n = int(seq_len[b])
            ids = torch.from_numpy(np.ascontiguousarray(input_ids[b : b + 1, :n]))
            logits, state.caches[b] = self._run(ids, state.caches[b])
            out[b, :n] = logits[0].numpy()
        state.past_len = state.past_len + seq_len
        return out

    @torch.inference_mode()
    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """One uncached forward over the whole sequence (the strictest reference for cached decode)."""
        return self._run(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)))[0].numpy()

    @torch.inference_mode()
    def hidden_states(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        seq_len = _lengths(input_ids, lengths)
        B, S = input_ids.shape
        per_row = []
        for b in range(B):
            ids = torch.from_numpy(input_ids[b : b + 1, : seq_len[b]])
            hs = self.model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
            # transformers' hidden_states[i + 1] is the output of layer i, except the last (after the final norm)
            layers = [h[0].float() for h in hs[1:-1]]
            layers.append(self._last_layer_output(ids))
            stacked = torch.stack(layers)  # [L, n, H]
            padded = torch.zeros(stacked.shape[0], S, stacked.shape[-1])
            padded[:, : seq_len[b]] = stacked
            per_row.append(padded)
        return torch.stack(per_row, 1).numpy()

    def _last_layer_output(self, ids: torch.Tensor) -> torch.Tensor:
        captured = {}
        inner = self.model.model.language_model if hasattr(self.model.model, "language_model") else self.model.model
        handle = inner.layers[-1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
        try:
            self.model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        out = captured["h"]
        return (out[0] if isinstance(out, tuple) else out)[0].float()
