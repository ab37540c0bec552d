"""Shared helpers for the benchmark scripts: a mid-size spec, quantile timing, a table and a JSON line."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma4_compile.model.config import FULL, SLIDING, Gemma4Spec

# E2B-shaped (PLE, KV sharing, double-wide MLP, 4:1 pattern ending global) at a size a CPU runs in seconds.
MID_E2B = Gemma4Spec(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=10,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=None,
    attention_k_eq_v=False,
    sliding_window=64,
    layer_types=tuple(([SLIDING] * 4 + [FULL]) * 2),
    hidden_size_per_layer_input=64,
    vocab_size_per_layer_input=8192,
    num_kv_shared_layers=4,
    use_double_wide_mlp=True,
    final_logit_softcapping=30.0,
    max_position_embeddings=4096,
    dtype="float32",
)

# 31B-shaped (K=V global layers, plain MLP, 5:1 pattern).
MID_DENSE = Gemma4Spec(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    global_head_dim=128,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    sliding_window=64,
    layer_types=tuple(([SLIDING] * 5 + [FULL]) * 2),
    final_logit_softcapping=30.0,
    max_position_embeddings=4096,
    dtype="float32",
)

# 26B-A4B-shaped: the dense layout with a narrower dense MLP beside a top-k MoE.
MID_MOE = dataclasses.replace(
    MID_DENSE,
    intermediate_size=512,
    enable_moe_block=True,
    num_experts=16,
    top_k_experts=4,
    moe_intermediate_size=256,
)

# llama.cpp (0.3.36) maps a KV-shared layer to layer n_kv_from_start - 1 (global) or - 2 (sliding): it assumes
# the last cache-owning layer is global, as in the released E2B/E4B. MID_E2B's is sliding (4 shared layers of 10)
# and llama.cpp aborts on it (GGML_ASSERT in llama-kv-cache.cpp:268), so the comparisons use 5 shared layers.
MID_E2B_SHARED5 = dataclasses.replace(MID_E2B, num_kv_shared_layers=5)

MID_SPECS = {"e2b": MID_E2B_SHARED5, "moe": MID_MOE, "dense": MID_DENSE}


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Wall-clock quantiles (seconds) over `repeat` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"p20": q[1], "p50": statistics.median(samples), "p80": q[7], "min": min(samples)}


def report(title: str, columns: list[str], rows: list[list[object]], payload: dict) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console().print(table)
    print(json.dumps(payload, sort_keys=True))
