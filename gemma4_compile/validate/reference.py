"""The PyTorch references: our model (`TorchRunner`) and transformers' own Gemma 4 (`HFRunner`), behind the
runner interface of gemma4_compile.runners. Only validation and benchmarks import this (it pulls in torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dtypes import DType
from ..errors import BackendUnavailable
from ..model.config import Gemma4Spec
from ..runners.base import BaseRunner, DecodeState, lengths_of


# "fp64" is a reference-only precision (the exact side of validation's drift gate), so DType does not list it
def torch_dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "fp64" else DType.parse(name).torch


class TorchRunner(BaseRunner):
    """Our reference model (gemma4_compile.model) on the CPU."""

    name = "torch"

    def __init__(self, checkpoint_dir: str | Path, dtype: str = "fp32", model: Any = None):
        super().__init__()
        from ..model.weights import load_model

        self.dtype = torch_dtype(dtype)
        self.model = model if model is not None else load_model(checkpoint_dir, self.dtype)
        self.spec = self.model.spec
        self.max_seq_len = self.spec.max_position_embeddings

    def _new_caches(self, batch: int, max_len: int) -> Any:
        return self.model.new_cache(batch, max_len, self.dtype)

    @torch.inference_mode()
    def _forward(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray, debug: bool = False):
        ids = torch.from_numpy(input_ids)
        embeds, tok = self.model.embed(ids)
        logits, state.caches, hs = self.model(
            embeds, tok, torch.from_numpy(state.past_len), torch.from_numpy(seq_len), state.caches, debug
        )
        return logits, hs

    def _step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        return self._forward(state, input_ids, seq_len)[0].numpy()

    def debug_outputs(
        self, input_ids: np.ndarray, lengths: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        from ..model.model import debug_output_names

        input_ids = np.asarray(input_ids, dtype=np.int64)
        state = self.start(*input_ids.shape)
        _, extra = self._forward(
            state, *self._checked(state, input_ids, lengths_of(input_ids, lengths)), debug=True
        )
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
            raise BackendUnavailable(
                "hf: transformers is not installed (pip install 'gemma4-compile[test]')"
            ) from None
        self.spec = Gemma4Spec.from_pretrained(checkpoint_dir)
        self.max_seq_len = self.spec.max_position_embeddings
        self.dtype = DType.parse(dtype).torch
        kwargs = dict(dtype=self.dtype, attn_implementation="eager", experts_implementation="eager")
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, **kwargs)
        self.model = model.eval()

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, cache: Any = None):
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=cache is not None)
        return out.logits.float(), out.past_key_values

    def _new_caches(self, batch: int, max_len: int) -> Any:
        from transformers import DynamicCache

        return [DynamicCache(config=self.model.config.get_text_config()) for _ in range(batch)]

    def _step(self, state: DecodeState, input_ids: np.ndarray, seq_len: np.ndarray) -> np.ndarray:
        B, S = input_ids.shape
        out = np.zeros((B, S, self.spec.vocab_size), dtype=np.float32)
        for b in range(B):
            n = int(seq_len[b])
            if n == 0:
                continue
            ids = torch.from_numpy(np.ascontiguousarray(input_ids[b : b + 1, :n]))
            logits, state.caches[b] = self._run(ids, state.caches[b])
            out[b, :n] = logits[0].numpy()
        return out

    @torch.inference_mode()
    def full_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """One uncached forward over the whole sequence (the strictest reference for cached decode)."""
        return self._run(torch.from_numpy(np.asarray(input_ids, dtype=np.int64)))[0].numpy()

    @torch.inference_mode()
    def hidden_states(self, input_ids: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        seq_len = lengths_of(input_ids, lengths)
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
        inner = (
            self.model.model.language_model
            if hasattr(self.model.model, "language_model")
            else self.model.model
        )
        handle = inner.layers[-1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
        try:
            self.model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        out = captured["h"]
        return (out[0] if isinstance(out, tuple) else out)[0].float()
