#!/usr/bin/env bash
# Every GPU check in one run, for a lent device (see the developers' guide): versions, then the Triton plugin
# kernels (attention, MoE; bf16 at real layer sizes), then the vision-tower attention. Each log goes to
# $OUT (or ./gpu-out) so a run killed at its limit still returns what it printed.
#   bash benchmarks/gpu_checks.sh            # SWEEP=1: also time the tile / split candidates (gpu_kernels --sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $py -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
} 2>&1 | tee "$out/versions.txt"
rc=0
for family in attention moe; do
  $py benchmarks/gpu_kernels.py --only "$family" ${SWEEP:+--sweep} 2>&1 | tee "$out/gpu_kernels_$family.txt" || rc=1
done
$py benchmarks/gpu_vision_attention.py 2>&1 | tee "$out/gpu_vision_attention.txt" || rc=1
exit $rc
