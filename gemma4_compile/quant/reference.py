"""The fake-quant reference: our PyTorch model with every quantized weight replaced by its dequantized values.

A quantized export computes with exactly these weights, so on random weights it must match this reference at
the unquantized tolerances (a packing bug moves logits by ~100% of their size, while rounding is not
modelled at all). The codes come from the same `quantize_rows` the writer uses; what the gate checks is
everything after it (packing, layout, scales, the graph rewrite, the kernel). An imported checkpoint's weights
(method "imported") are its own codes and scales, read again from the checkpoint (quant/imported.py).
"""

from __future__ import annotations

import types

import torch

from ..errors import ValidateError
from .encode import dequantized_rows, global_scale, rounded
from .formats import EMBED_ROWS, GRAPH_NBITS, IMPORTED, LM_HEAD, QuantSpec
from .imported import dequantize_imported


def _dequantized(
    weight: torch.Tensor, name: str, quant: QuantSpec, dtype: str, expert_scale: torch.Tensor | None = None
) -> torch.nn.Parameter:
    """codes x scales as the graph computes them: DequantizeLinear's scales are stored in the export dtype
    `dtype`, so they are rounded to it first (a code times a half-precision scale then rounds once, as in DQ).
    `expert_scale` [E]: a per_expert_scale folded into experts' weights [E, N, K] in fp32 first, as the writer
    does (QuantSpec.folded)."""
    fmt, graph = quant.format_of(name), quant.graph_of(name)
    w = weight.detach().float()
    if expert_scale is not None:
        w = w * expert_scale.detach().float()[:, None, None]
    w = w.numpy()
    shape = w.shape
    w = w.reshape(-1, shape[-1])  # MoE experts [E, N, K]: E*N rows, blocked along K like any weight
    g = global_scale(float(abs(w).max(initial=0.0)), dtype) if fmt == "nvfp4" else None
    deq = dequantized_rows(fmt, w, quant.block_of(fmt), graph, dtype, g, quant.method).reshape(shape)
    return torch.nn.Parameter(torch.from_numpy(deq).to(weight.dtype), requires_grad=False)


def _imported(model: torch.nn.Module, weight: torch.Tensor, name: str, quant: QuantSpec, dtype: str):
    """A pre-quantized checkpoint's codes x its scales as the graph stores them (MatMulNBits: fp32, exact for
    the checkpoint's bf16/fp16/fp32; DequantizeLinear: the export dtype): never re-rounded."""
    read = getattr(model, "imported_codes", {}).get(name)
    if read is None:
        raise ValidateError(
            f"the export imported '{name}' ({quant.source}), but the checkpoint has no packed codes"
        )
    codes, scales = read()
    if quant.graph_of(name) != GRAPH_NBITS:
        scales = rounded(scales, dtype)
    deq = dequantize_imported(codes, scales, quant.block_size)
    return torch.nn.Parameter(torch.from_numpy(deq).to(weight.dtype), requires_grad=False)


def apply_fake_quant(model: torch.nn.Module, quant: QuantSpec, dtype: str) -> torch.nn.Module:
    """Replace, in place, each weight `quant` quantizes by its dequantized copy, as an export in `dtype` stores
    it (the drift gate's fp64 model too); returns `model`.

    The tied embedding has two readers with their own copies: the embed graph's gather (`embed_rows`) and the
    logits projection (`lm_head`); each sees its dequantized copy, or the float table where it is not quantized."""
    table = model.embed_tokens.weight
    for name in quant.tensors:
        if name in (LM_HEAD, EMBED_ROWS):
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        module._parameters[attr] = (
            _imported(model, weight, name, quant, dtype)
            if quant.method == IMPORTED
            else _dequantized(weight, name, quant, dtype, _take_expert_scale(model, quant.folded.get(name)))
        )
    if EMBED_ROWS in quant.tensors:
        model.embed_tokens._parameters["weight"] = _dequantized(table, EMBED_ROWS, quant, dtype)
    if LM_HEAD in quant.tensors or EMBED_ROWS in quant.tensors:
        _fake_quant_lm_head(
            model, _dequantized(table, LM_HEAD, quant, dtype) if LM_HEAD in quant.tensors else table
        )
    return model


def _take_expert_scale(model: torch.nn.Module, name: str | None) -> torch.Tensor | None:
    """The per_expert_scale `name` (None: none folded), set to ones in `model`: the export reads ones there."""
    if name is None:
        return None
    router = model.get_submodule(name.rpartition(".")[0])
    p = router.per_expert_scale.detach().clone()
    router._parameters["per_expert_scale"] = torch.nn.Parameter(torch.ones_like(p), requires_grad=False)
    return p


def _fake_quant_lm_head(model: torch.nn.Module, head: torch.nn.Parameter) -> None:
    """Point the instance's `logits` at `head` for the duration of each call (the class method is untouched)."""
    logits = type(model).logits

    def quantized_logits(self, h: torch.Tensor) -> torch.Tensor:
        table = self.embed_tokens.weight
        self.embed_tokens.weight = head
        try:
            return logits(self, h)
        finally:
            self.embed_tokens.weight = table

    model.logits = types.MethodType(quantized_logits, model)
