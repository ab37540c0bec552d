"""Triton plugin kernels on a GPU: bf16 correctness at real Gemma 4 layer sizes, then speed against PyTorch.

    python benchmarks/gpu_kernels.py              # on a CUDA GPU (PyTorch + Triton; no TensorRT, no network)
    python benchmarks/gpu_kernels.py --dry-run    # tiny shapes on the CPU interpreter: checks the script itself

Attention (`kernels.attention`) is checked against `ops.attention_reference` evaluated in fp32 on the same
bf16 inputs and timed against PyTorch SDPA with an explicit boolean mask over (ring ++ new tokens), the
way an engine without a plugin has to run it; MoE (`kernels.moe`) against `ops.moe_reference` (eager, a loop
over the experts that were hit). Layers: 26B-A4B (16 q heads; sliding 8 KV x 256, W 1024; global 2 KV x 512;
128 experts top-8, width 704, hidden 2816) and 31B (32 q heads; sliding 16 KV x 256; global 4 KV x 512).
Prefill is 4096 tokens; decode is one token on a 32K global cache or on a W-slot ring that has wrapped.
Quantized MoE rows (int4 block 32, fp8 block 128: the export's defaults) run the same kernels on random codes in
the export's layout, checked against `ops.moe_reference` on the dequantized weights and timed against the float
kernel on those weights in bf16 (the "base ms" column of those rows).

Timings are medians of `triton.testing.do_bench` ("ms": eager, each Python launch included) and of
`do_bench_cudagraph` ("graph ms": the same launches replayed in a CUDA graph, the GPU time alone, which is what
an engine's plugin costs: TensorRT launches from C++). Throughput columns use graph ms where there is one, and
`speedup` compares graph with graph where the baseline can be captured too (SDPA can; the eager MoE reference
cannot: it syncs with the host), else eager with eager. FLOP/s count the useful work (visible query-key pairs for
attention, 6 T K I H for MoE); GB/s count the bytes each op must move at least once (inputs read, outputs
written; for MoE the weights of the experts that were hit). Ceilings are the H200 figures measured on this
project's machines (~790 TFLOP/s dense bf16, ~4.3 TB/s copy). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

PEAK_TFLOPS = 790.0
PEAK_GBPS = 4300.0
ATOL = RTOL = 3e-2  # bf16 output vs the fp32 reference (the kernel rounds p and the output once each)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU interpreter (no GPU needed)"
    )
    p.add_argument("--only", choices=("attention", "moe"), help="run one family")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also time candidate tiles / split counts (graph ms), for the choosers",
    )
    return p.parse_args(argv)


ARGS = _parse(None) if __name__ == "__main__" else argparse.Namespace(dry_run=False, only=None, sweep=False)
if ARGS.dry_run:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Row:
    name: str
    shape: str
    ok: bool | None = None
    max_err: float = float("nan")
    ms: float = float("nan")
    graph_ms: float = float("nan")
    base_ms: float = float("nan")
    base_graph_ms: float = float("nan")  # the baseline in a CUDA graph, where it can be captured
    flops: float = 0.0
    bytes: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def gpu_ms(self) -> float:
        return self.graph_ms if self.graph_ms == self.graph_ms else self.ms

    def speedup(self) -> float:
        """Baseline over ours, graph against graph where both were captured, else eager against eager."""
        if self.graph_ms == self.graph_ms and self.base_graph_ms == self.base_graph_ms:
            return self.base_graph_ms / self.graph_ms
        return self.base_ms / self.ms if self.ms == self.ms and self.ms > 0 else float("nan")

    def tflops(self) -> float:
        ms = self.gpu_ms()
        return self.flops / ms / 1e9 if ms == ms and ms > 0 else float("nan")

    def gbps(self) -> float:
        ms = self.gpu_ms()
        return self.bytes / ms / 1e6 if ms == ms and ms > 0 else float("nan")


# ----- timing --------------------------------------------------------------------------------------------


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds: do_bench on a GPU; one timed call after a warm-up on the interpreter."""
    if ARGS.dry_run:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def bench_graph(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn replayed in a CUDA graph; NaN on the interpreter (no graphs there)."""
    if ARGS.dry_run:
        return float("nan")
    import triton

    fn()  # compile outside the capture
    return float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))


# ----- attention -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnCase:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    window: int  # 0: global
    slots: int  # C
    new: int  # S
    past: int  # past_len
    blocks: tuple[
        tuple[int, int], ...
    ] = ()  # image runs [start, end) of the new tokens (block_ids 0, 1, ...)


IMAGES = ((100, 380), (2011, 2291))


def attention_cases(dry: bool) -> list[AttnCase]:
    if dry:
        return [
            AttnCase("tiny sliding prefill", 4, 2, 32, 16, 16, 64, 0),
            AttnCase("tiny sliding +2 images", 4, 2, 32, 16, 16, 64, 0, ((5, 23), (40, 50))),
            AttnCase("tiny global prefill", 4, 1, 32, 0, 64, 48, 0),
            AttnCase("tiny sliding decode", 4, 2, 32, 16, 16, 1, 100),
            AttnCase("tiny global decode", 4, 1, 32, 0, 128, 1, 127),
        ]
    out = []
    for model, hq, (skv, gkv) in (("26B-A4B", 16, (8, 2)), ("31B", 32, (16, 4))):
        out += [
            AttnCase(f"{model} sliding prefill", hq, skv, 256, 1024, 1024, 4096, 0),
            # two images of 280 soft tokens (Gemma 4's default budget), one crossing a key tile
            AttnCase(f"{model} sliding +2 images", hq, skv, 256, 1024, 1024, 4096, 0, IMAGES),
            AttnCase(f"{model} global prefill", hq, gkv, 512, 0, 4096, 4096, 0),
            AttnCase(f"{model} sliding decode", hq, skv, 256, 1024, 1024, 1, 32767),
            AttnCase(f"{model} global decode", hq, gkv, 512, 0, 32768, 1, 32767),
        ]
    return out


def attention_inputs(c: AttnCase, device: str, dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    blocks = {}
    if c.blocks:
        ids = torch.full((1, c.new), -1, dtype=torch.int64)
        for i, (start, end) in enumerate(c.blocks):
            ids[0, start:end] = i
        blocks["block_ids"] = ids.to(device)
    return dict(
        **blocks,
        q=rnd(1, c.heads, c.new, c.head_dim),
        k=rnd(1, c.kv_heads, c.new, c.head_dim),
        v=rnd(1, c.kv_heads, c.new, c.head_dim),
        past_k=rnd(1, c.kv_heads, c.slots, c.head_dim),
        past_v=rnd(1, c.kv_heads, c.slots, c.head_dim),
        past_len=torch.tensor([c.past], device=device),
        seq_len=torch.tensor([c.new], device=device),
        window=c.window,
        scale=c.head_dim**-0.5,
    )


def sdpa_baseline(inp: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """SDPA over (ring ++ new) with the contract's boolean mask; keys and mask are built outside the timing."""
    from torch.nn import functional as F

    from gemma4_compile.model import ops

    C, S = inp["past_k"].shape[2], inp["q"].shape[2]
    visible, _ = ops.attention_mask(
        inp["past_len"], inp["seq_len"], C, S, inp["window"], inp.get("block_ids")
    )
    mask = visible[:, None]  # [B, 1, S, C+S]
    keys = torch.cat([inp["past_k"], inp["k"]], dim=2)
    values = torch.cat([inp["past_v"], inp["v"]], dim=2)
    group = inp["q"].shape[1] // keys.shape[1]
    try:
        F.scaled_dot_product_attention(
            inp["q"][:, :, :1], keys, values, attn_mask=mask[:, :, :1], scale=inp["scale"], enable_gqa=True
        )
        return lambda: F.scaled_dot_product_attention(
            inp["q"], keys, values, attn_mask=mask, scale=inp["scale"], enable_gqa=True
        )
    except (TypeError, RuntimeError):  # older torch or a backend without GQA: expand the KV heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        return lambda: F.scaled_dot_product_attention(
            inp["q"], keys, values, attn_mask=mask, scale=inp["scale"]
        )


def attention_row(c: AttnCase, device: str, dtype: torch.dtype) -> Row:
    from gemma4_compile.model import ops
    from gemma4_compile.plugins.kernels import attention as A

    inp = attention_inputs(c, device, dtype)
    row = Row(
        c.name,
        f"Hq{c.heads} Hkv{c.kv_heads} D{c.head_dim} W{c.window or '-'} C{c.slots} S{c.new} past{c.past}",
    )
    out, pk, pv = A.attention(**inp)
    with torch.no_grad():
        ref = ops.attention_reference(
            **{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}
        )
    err = (out.float() - ref[0]).abs()
    row.max_err = float(err.max())
    row.ok = (
        bool((err <= ATOL + RTOL * ref[0].abs()).all())
        and torch.equal(pk.float(), ref[1])
        and torch.equal(pv.float(), ref[2])
    )
    del ref, err
    visible, _ = ops.attention_mask(
        inp["past_len"], inp["seq_len"], c.slots, c.new, c.window, inp.get("block_ids")
    )
    pairs = float(visible.sum()) * c.heads
    row.flops = 4.0 * pairs * c.head_dim
    item = inp["q"].element_size()
    keys_read = min(c.slots, c.past) + c.new if c.window == 0 else min(c.window - 1 + c.new, c.past + c.new)
    row.bytes = item * c.head_dim * (2 * c.heads * c.new + 2 * c.kv_heads * keys_read)  # q, out, k and v
    if c.new == 1:
        row.ms = bench(lambda: A.attention_decode(**inp))  # the attention itself; the cache write is below
        row.graph_ms = bench_graph(lambda: A.attention_decode(**inp))
        row.extra["full_op_ms"] = bench(
            lambda: A.attention(**inp)
        )  # + copying the whole ring (functional op)
        row.extra["fused_single_launch_ms"] = bench(lambda: A.attention(**inp, num_splits=0))
        ring = inp["past_k"].clone()
        row.extra["ring_write_in_place_ms"] = bench(
            lambda: A.ring_update(ring, inp["k"], inp["past_len"], inp["seq_len"], out=ring)
        )
        row.note = "decode = split + combine; full op adds a copy-mode ring of C slots"
    else:
        row.ms = bench(lambda: A.attention(**inp))  # one fused launch: attention + presents
        row.graph_ms = bench_graph(lambda: A.attention(**inp))
        row.bytes += item * c.head_dim * 2 * c.kv_heads * c.slots  # writing both presents
        row.note = "one launch incl. ring presents"
        if c.blocks:  # what the image blocks cost over the causal launch on the same tensors
            causal = {k: v for k, v in inp.items() if k != "block_ids"}
            row.extra["causal_ms"] = bench(lambda: A.attention(**causal))
            row.note += f"; image blocks {list(c.blocks)}"
    baseline = sdpa_baseline(inp)
    row.base_ms = bench(baseline)
    row.base_graph_ms = bench_graph(baseline)
    return row


# ----- MoE -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeCase:
    name: str
    tokens: int
    hidden: int
    experts: int
    inter: int
    top_k: int
    quant: str = ""  # "" float experts; "int4" / "fp8": QuantizedExperts in the export's layout
    block: int = 0


# The export's default blocks (quant/formats.py DEFAULT_BLOCK): int4 32, fp8 128 (26B-A4B's I = 704 is not a
# multiple of 128, so the fp8 down weight is padded to 768 as the export pads it).
QUANT_MOE = (("int4", 32), ("fp8", 128))


def moe_cases(dry: bool) -> list[MoeCase]:
    if dry:
        base = [MoeCase("tiny moe prefill", 64, 64, 16, 32, 4), MoeCase("tiny moe decode", 1, 64, 16, 32, 4)]
    else:
        base = [MoeCase(f"26B-A4B moe {t} tok", t, 2816, 128, 704, 8) for t in (4096, 64, 1)]
    quant = [replace(c, name=f"{c.name} {f}", quant=f, block=b) for f, b in QUANT_MOE for c in base]
    return base + quant


def moe_inputs(c: MoeCase, device: str, dtype: torch.dtype, experts: bool = True) -> dict[str, Any]:
    """x, router logits and per-expert scales, with random float experts unless `experts` is False."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    # distinct logits: bf16 ties would let the kernel and torch.topk pick different (equally valid) experts
    perms = [torch.randperm(c.experts, generator=g, device=device) for _ in range(c.tokens)]
    logits = torch.stack(perms).float() / 32
    inp = dict(
        x=rnd(c.tokens, c.hidden),
        router_logits=logits.to(dtype),
        per_expert_scale=(torch.rand(c.experts, generator=g, device=device) + 0.5).to(dtype),
        top_k=c.top_k,
    )
    if experts:
        inp["gate_up"] = rnd(c.experts, 2 * c.inter, c.hidden, scale=c.hidden**-0.5)
        inp["down"] = rnd(c.experts, c.hidden, c.inter, scale=c.inter**-0.5)
    return inp


def quantized_experts(
    shape: tuple[int, int, int], fmt: str, block: int, g: torch.Generator, dtype: torch.dtype
) -> tuple[Any, torch.Tensor]:
    """Random codes and block scales in the export's layout (K padded with zero codes to whole blocks; int4
    packed by the exporter's own quant.rtn.pack_signed), and the fp32 weight [E, N, K] they stand for."""
    from gemma4_compile.plugins.kernels.moe import QuantizedExperts
    from gemma4_compile.quant.rtn import pack_signed

    E, N, K = shape
    device = g.device
    padded = -(-K // block) * block
    unit = K**-0.5 / (
        4.0 if fmt == "int4" else 1.0
    )  # codes of std ~4 (int4) or ~1 (fp8) -> weights of std K^-1/2
    scales = ((torch.rand(E, N, padded // block, generator=g, device=device) + 0.5) * unit).to(dtype)
    if fmt == "int4":
        q = torch.randint(-7, 8, (E, N, padded), generator=g, device=device, dtype=torch.int8)
        q[..., K:] = 0
        codes = torch.from_numpy(pack_signed(q.cpu().numpy(), 4)).to(device)
    else:
        q = torch.randn(E, N, padded, generator=g, device=device)
        q[..., K:] = 0
        q = codes = q.to(torch.float8_e4m3fn)
    w = (q.float() * scales.float().repeat_interleave(block, -1))[..., :K].contiguous()
    return QuantizedExperts(codes, scales, fmt, block), w


def quantized_moe_inputs(
    c: MoeCase, device: str, dtype: torch.dtype
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """`moe_inputs` with random QuantizedExperts of c.quant / c.block, and the fp32 gate_up and down they stand for."""
    inp = moe_inputs(c, device, dtype, experts=False)
    g = torch.Generator(device=device).manual_seed(1)
    inp["gate_up"], gu = quantized_experts((c.experts, 2 * c.inter, c.hidden), c.quant, c.block, g, dtype)
    inp["down"], dn = quantized_experts((c.experts, c.hidden, c.inter), c.quant, c.block, g, dtype)
    return inp, gu, dn


def moe_quant_row(c: MoeCase, device: str, dtype: torch.dtype) -> Row:
    """Quantized experts: the kernel vs the reference on the dequantized weights, timed against the float
    kernel on the same weights in the activation dtype."""
    from gemma4_compile.model import ops
    from gemma4_compile.plugins.kernels import moe as M

    inp, gu, dn = quantized_moe_inputs(c, device, dtype)
    gate_up, down = inp.pop("gate_up"), inp.pop("down")
    row = Row(c.name, f"T{c.tokens} H{c.hidden} E{c.experts} I{c.inter} top{c.top_k} {c.quant} b{c.block}")
    y = M.moe(**inp, gate_up=gate_up, down=down)
    with torch.no_grad():
        routing = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inp.items()}
        ref = ops.moe_reference(**routing, gate_up=gu, down=dn)
    err = (y.float() - ref).abs()
    row.max_err = float(err.max())
    row.ok = bool((err <= ATOL + RTOL * ref.abs()).all())
    del ref, err
    _, ref_ids = ops.route(inp["router_logits"], inp["per_expert_scale"], c.top_k)
    hit = int(torch.unique(ref_ids).numel())
    weight_bytes = sum(q.codes.nbytes + q.scales.nbytes for q in (gate_up, down)) // c.experts
    row.flops = 6.0 * c.tokens * c.top_k * c.inter * c.hidden
    row.bytes = (
        hit * weight_bytes + inp["x"].element_size() * 2 * c.tokens * c.hidden + 4 * c.tokens * c.experts
    )
    row.extra["experts_hit"] = hit
    row.ms = bench(lambda: M.moe(**inp, gate_up=gate_up, down=down))
    row.graph_ms = bench_graph(lambda: M.moe(**inp, gate_up=gate_up, down=down))
    gu, dn = gu.to(dtype), dn.to(dtype)  # the float kernel on the same (dequantized) weights
    row.base_ms = bench(lambda: M.moe(**inp, gate_up=gu, down=dn))
    row.extra["float_graph_ms"] = bench_graph(lambda: M.moe(**inp, gate_up=gu, down=dn))
    row.note = f"{hit} experts hit; base = float kernel on the dequantized weights"
    return row


def moe_row(c: MoeCase, device: str, dtype: torch.dtype) -> Row:
    from gemma4_compile.model import ops
    from gemma4_compile.plugins.kernels import moe as M

    inp = moe_inputs(c, device, dtype)
    row = Row(c.name, f"T{c.tokens} H{c.hidden} E{c.experts} I{c.inter} top{c.top_k}")
    y = M.moe(**inp)
    _, ids = M.route(inp["router_logits"], inp["per_expert_scale"], c.top_k)
    _, ref_ids = ops.route(inp["router_logits"], inp["per_expert_scale"], c.top_k)
    row.extra["routing_agreement"] = float((ids.long() == ref_ids).float().mean())
    with torch.no_grad():
        ref = ops.moe_reference(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in inp.items()})
    err = (y.float() - ref).abs()
    row.max_err = float(err.max())
    row.ok = bool((err <= ATOL + RTOL * ref.abs()).all()) and row.extra["routing_agreement"] == 1.0
    del ref, err
    hit = int(torch.unique(ref_ids).numel())
    item = inp["x"].element_size()
    row.flops = 6.0 * c.tokens * c.top_k * c.inter * c.hidden
    row.bytes = item * (3 * hit * c.inter * c.hidden + 2 * c.tokens * c.hidden) + 4 * c.tokens * c.experts
    row.extra["experts_hit"] = hit
    row.ms = bench(lambda: M.moe(**inp))
    row.graph_ms = bench_graph(lambda: M.moe(**inp))
    row.base_ms = bench(lambda: ops.moe_reference(**inp))
    row.note = f"{hit} experts hit"
    return row


# ----- tile sweep (--sweep): what the tile choosers (moe.gemm_configs, attention.decode_splits) should pick ---


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): decode routes ~1 row per hit expert, prefill hundreds
MOE_TILES = {
    1: [(16, 32, 128, 4, 4), (16, 32, 64, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 32, 128, 8, 4),
        (16, 16, 64, 2, 4)],
    4096: [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 64, 64, 8, 4), (128, 32, 64, 4, 4), (128, 64, 128, 8, 3),
           (256, 64, 64, 8, 3), (64, 128, 64, 8, 3)],
}  # fmt: skip
DECODE_SPLITS = (8, 16, 32, 64, 128, 256)


@dataclass
class SweepRow:
    case: str
    candidate: str
    ms: float
    ok: bool


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want.float()).abs() <= ATOL + RTOL * want.float().abs()).all())


def _sweep_ms(fn: Callable[[], object]) -> float:
    return bench(fn) if ARGS.dry_run else bench_graph(fn)


def moe_sweep(device: str, dtype: torch.dtype) -> list[SweepRow]:
    import triton

    from gemma4_compile.plugins.kernels import moe as M

    out = []
    for tokens, tiles in MOE_TILES.items():
        case = MoeCase(f"moe {tokens} tok", tokens, 2816, 128, 704, 8)
        if ARGS.dry_run:
            case = MoeCase(f"tiny moe {tokens} tok", min(tokens, 64), 64, 16, 32, 4)
        for fmt, block in (("", 0), *QUANT_MOE):
            c = replace(case, name=f"{case.name} {fmt or 'float'}", quant=fmt, block=block)
            inp = quantized_moe_inputs(c, device, dtype)[0] if fmt else moe_inputs(c, device, dtype)
            want = M.moe(**inp)
            out.append(SweepRow(c.name, "default", _sweep_ms(partial(M.moe, **inp)), True))
            for bm, bn, bk, w, st in tiles:
                conf = triton.Config(
                    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st
                )
                if not M.keep_gemm(conf, min(c.hidden, c.inter), min(c.hidden, c.inter)):
                    continue
                try:
                    ok = _close(M.moe(**inp, config=conf), want)
                    ms = _sweep_ms(partial(M.moe, **inp, config=conf))
                except Exception as e:  # a tile that does not compile here (shared memory): say so, go on
                    ok, ms = False, float("nan")
                    print(f"    {c.name} {bm}x{bn}x{bk}: {type(e).__name__}", flush=True)
                out.append(SweepRow(c.name, f"{bm}x{bn}x{bk} w{w} s{st}", ms, ok))
            print(f"  sweep {c.name}: done", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def attention_sweep(device: str, dtype: torch.dtype) -> list[SweepRow]:
    from gemma4_compile.plugins.kernels import attention as A

    out = []
    for c in (c for c in attention_cases(ARGS.dry_run) if c.new == 1):
        inp = attention_inputs(c, device, dtype)
        want = A.attention_decode(**inp)
        out.append(SweepRow(c.name, "default splits", _sweep_ms(partial(A.attention_decode, **inp)), True))
        for splits in DECODE_SPLITS:
            ok = _close(A.attention_decode(**inp, num_splits=splits), want)
            ms = _sweep_ms(partial(A.attention_decode, **inp, num_splits=splits))
            out.append(SweepRow(c.name, f"{splits} splits", ms, ok))
    return out


def sweep_table(rows: list[SweepRow]) -> str:
    lines = [f"{'sweep case':<26} {'candidate':<22} {'graph ms':>9} {'vs default':>10}  ok", "-" * 76]
    default = {}
    for r in rows:
        default.setdefault(r.case, r.ms)
        ratio = r.ms / default[r.case] if default[r.case] > 0 else float("nan")
        lines.append(f"{r.case:<26} {r.candidate:<22} {r.ms:>9.4f} {ratio:>10.2f}  {r.ok}")
    return "\n".join(lines)


# ----- report --------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    head = (
        f"{'case':<26} {'shape':<44} {'ok':<5} {'max err':>8} {'ms':>9} {'graph ms':>9} {'base ms':>9} {'speedup':>7} "
        f"{'TFLOP/s':>8} {'%peak':>6} {'GB/s':>7} {'%peak':>6}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = r.speedup()
        lines.append(
            f"{r.name:<26} {r.shape:<44} {r.ok!s:<5} {r.max_err:>8.2e} {r.ms:>9.3f} {r.graph_ms:>9.3f} {r.base_ms:>9.3f} "
            f"{speed:>7.2f} {r.tflops():>8.1f} {100 * r.tflops() / PEAK_TFLOPS:>6.1f} {r.gbps():>7.0f} "
            f"{100 * r.gbps() / PEAK_GBPS:>6.1f}  {r.note}"
        )
        for k, v in r.extra.items():
            lines.append(f"{'':<26} {k} = {v:.4g}" if isinstance(v, float) else f"{'':<26} {k} = {v}")
    return "\n".join(lines)


def main() -> int:
    if not ARGS.dry_run and not torch.cuda.is_available():
        print(
            "gpu_kernels: no CUDA GPU here; nothing to benchmark (use --dry-run to exercise the script on CPU)"
        )
        print(json.dumps({"benchmark": "gpu_kernels", "skipped": "no CUDA GPU"}))
        return 0
    device = "cpu" if ARGS.dry_run else "cuda"
    # The interpreter cannot multiply bf16 (triton-lang/triton#11584): the dry run uses fp16 instead.
    dtype = torch.float16 if ARGS.dry_run else torch.bfloat16
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
    }
    if device == "cuda":  # targets.local_device_sm asks libcuda through ctypes: check it against torch here
        from gemma4_compile.targets import local_device_sm

        major, minor = torch.cuda.get_device_capability()
        env["local_device_sm"] = f"{local_device_sm()} (torch: {major * 10 + minor})"
    print(f"gpu_kernels: {env}", flush=True)
    t0 = time.perf_counter()
    jobs: list[tuple[str, Callable[[], Row]]] = []
    if ARGS.only in (None, "attention"):
        jobs += [(c.name, lambda c=c: attention_row(c, device, dtype)) for c in attention_cases(ARGS.dry_run)]
    if ARGS.only in (None, "moe"):
        jobs += [
            (c.name, lambda c=c: (moe_quant_row if c.quant else moe_row)(c, device, dtype))
            for c in moe_cases(ARGS.dry_run)
        ]
    rows: list[Row] = []
    for name, job in jobs:
        start = time.perf_counter()
        try:
            rows.append(job())
        except Exception as e:  # keep going: one broken case must not hide the others
            rows.append(
                Row(name, "-", ok=False, note=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            )
        print(f"  {name}: {time.perf_counter() - start:.1f}s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    sweep: list[SweepRow] = []
    if ARGS.sweep:
        if ARGS.only in (None, "attention"):
            sweep += attention_sweep(device, dtype)
        if ARGS.only in (None, "moe"):
            sweep += moe_sweep(device, dtype)
        print(sweep_table(sweep))
    summary = {
        "benchmark": "gpu_kernels",
        **env,
        "seconds": round(time.perf_counter() - t0, 1),
        "ceilings": {"tflops": PEAK_TFLOPS, "gbps": PEAK_GBPS},
        "all_ok": all(r.ok for r in rows) and all(r.ok for r in sweep),
        "sweep": [vars(r) for r in sweep],
        "cases": [
            {
                "name": r.name,
                "shape": r.shape,
                "ok": r.ok,
                "max_err": r.max_err,
                "ms": r.ms,
                "graph_ms": r.graph_ms,
                "baseline_ms": r.base_ms,
                "baseline_graph_ms": r.base_graph_ms,
                "speedup": r.speedup(),
                "tflops": r.tflops(),
                "gbps": r.gbps(),
                "note": r.note,
                **r.extra,
            }
            for r in rows
        ],
    }
    print(json.dumps(summary, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
