"""Vision-tower attention on a GPU: the standard-op form the export runs against PyTorch's fused SDPA kernels, at
the towers' head dims (issue #13: 72 for the 26B/31B tower, 64 for E2B/E4B), one layer's attention per row.

    python benchmarks/gpu_vision_attention.py              # on a CUDA GPU (PyTorch; no TensorRT, no network)
    python benchmarks/gpu_vision_attention.py --dry-run    # tiny shapes on the CPU: checks the script itself

The tower's attention is bidirectional over one image's patches (scale 1.0; padded patches are masked out of the
keys by an additive bias), and vision.onnx writes it in standard ops: MatMul, Add(bias), Softmax in fp32,
MatMul, which is what TensorRT runs unless a custom node is added. Rows, per tower and per soft-token budget
(patches = 9 x budget): `standard ops` (that math in bf16 with fp32 scores, eager PyTorch, the reference for
what an engine's generic kernels must beat), `sdpa mask` (`scaled_dot_product_attention` with the bias as
attn_mask: the memory-efficient / cuDNN kernels) and `sdpa flash` (no mask: one unpadded image, FlashAttention
where it takes the head dim). Each is checked against the fp32 math on the same bf16 inputs (atol / rtol
3e-2); a kernel that is not available is reported, not faked. Timings are medians of
`triton.testing.do_bench` (CUDA events on the CPU dry run: perf_counter). The decision this informs: whether
the towers need a custom attention node for TensorRT (today: standard ops, docs/gemma4-multimodal notes).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

TOWERS = {"26b/31b": (16, 72), "e2b/e4b": (12, 64)}  # (heads, head_dim): model/presets.py VISION_PRESETS
BUDGETS = (70, 280, 1120)  # soft tokens per image (serve's detail low / auto / high); 9 patches each
ATOL = RTOL = 3e-2


@dataclass
class Row:
    tower: str
    budget: int
    patches: int
    kernel: str
    ms: float | None = None
    tflops: float | None = None
    max_err: float | None = None
    ok: bool | None = None
    note: str = ""


def _inputs(torch, heads: int, head_dim: int, patches: int, device: str, padded: int):
    """q, k, v [1, A, P, Dh] bf16 and the key bias [1, 1, 1, P] (0 for real patches, -inf-like for the last
    `padded`). q and k have std Dh^-1/4, so the scores have unit variance: a real tower's learned q/k norm scales
    are not known here, and unit-RMS q, k at scale 1.0 would make bf16 scores round past any tolerance."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shape, std = (1, heads, patches, head_dim), head_dim**-0.25
    q, k = (torch.randn(shape, generator=g) * std for _ in "qk")
    v = torch.randn(shape, generator=g)
    q, k, v = (t.to(device, torch.bfloat16) for t in (q, k, v))
    bias = torch.zeros(1, 1, 1, patches, device=device)
    if padded:
        bias[..., patches - padded :] = torch.finfo(torch.float32).min
    return q, k, v, bias


def _standard_ops(torch, q, k, v, bias):
    scores = (q @ k.transpose(-1, -2)).float() + bias
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def _kernels(torch, dry_run: bool):
    """name -> (run(q, k, v, bias), padded?) for the rows; SDPA backends forced, so a missing one raises (the
    CPU dry run forces the math backend for the masked row: the GPU kernels do not exist there)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional

    def sdpa(backends, with_mask):
        def run(q, k, v, bias):
            with sdpa_kernel(backends):
                mask = bias.to(q.dtype) if with_mask else None
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)

        return run

    masked = [SDPBackend.MATH] if dry_run else [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    return {
        "standard ops": (lambda q, k, v, bias: _standard_ops(torch, q, k, v, bias), True),
        "sdpa mask": (sdpa(masked, True), True),
        "sdpa flash": (sdpa([SDPBackend.FLASH_ATTENTION], False), False),
    }


def _time(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def run(dry_run: bool) -> list[Row]:
    import torch

    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU (use --dry-run to check the script on the CPU)")
    towers = {"tiny": (2, 72)} if dry_run else TOWERS
    budgets = (4,) if dry_run else BUDGETS
    rows = []
    for tower, (heads, head_dim) in towers.items():
        for budget in budgets:
            patches = 9 * budget
            for name, (kernel, padded) in _kernels(torch, dry_run).items():
                pad = patches // 8 if padded else 0  # a padded batch row's tail, for the masked kernels
                q, k, v, bias = _inputs(torch, heads, head_dim, patches, device, pad)
                want = _standard_ops(torch, q.float(), k.float(), v.float(), bias)
                row = Row(tower, budget, patches, name)
                try:
                    got = kernel(q, k, v, bias).float()
                    row.ms = _time(
                        lambda kernel=kernel, q=q, k=k, v=v, bias=bias: kernel(q, k, v, bias), device
                    )
                except RuntimeError as e:  # a forced SDPA backend that does not take this shape here
                    row.note = str(e).strip().splitlines()[0][:60]
                    rows.append(row)
                    continue
                real = patches - pad
                row.max_err = float((got - want)[..., :real, :].abs().max())
                row.ok = bool(torch.allclose(got[..., :real, :], want[..., :real, :], atol=ATOL, rtol=RTOL))
                row.tflops = 4 * heads * real * real * head_dim / (row.ms * 1e-3) / 1e12
                rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args()
    rows = run(args.dry_run)
    from common import report

    columns = ["tower", "budget", "patches", "kernel", "ms", "TFLOP/s", "max err", "ok", "note"]
    table = [[r.tower, r.budget, r.patches, r.kernel, r.ms, r.tflops, r.max_err, r.ok, r.note] for r in rows]
    title = "vision-tower attention, one image, bf16 (scale 1.0, bidirectional, padded keys masked)"
    payload = {
        "benchmark": "gpu_vision_attention",
        "dry_run": args.dry_run,
        "rows": [r.__dict__ for r in rows],
    }
    report(title, columns, [[("-" if v is None else v) for v in r] for r in table], payload)
    if any(r.ok is False for r in rows):
        raise SystemExit(json.dumps({"failed": [r.kernel for r in rows if r.ok is False]}))


if __name__ == "__main__":
    main()
