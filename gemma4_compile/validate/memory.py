"""Peak memory of one backend, measured in a process of its own.

Timing runs every backend in one process, one after another, so that process's RSS mixes them (ORT's figure
would include torch and transformers loaded for the baselines). Here each backend gets a fresh interpreter
(`python -m gemma4_compile.validate.memory`) that builds only its runner, runs one prefill and a few decode
steps at the largest (batch, context) the benchmark times, and reports its peak RSS (VmHWM).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROBE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ProbeRequest:
    backend: str
    export_dir: str
    checkpoint: str | None
    precision: str
    target: str | None
    batch: int
    context: int
    steps: int


@dataclass(frozen=True)
class ProcessMemory:
    base_mb: float  # the fresh process after importing gemma4_compile, before the backend is built
    peak_mb: float  # its lifetime peak RSS: libraries + model + caches + activations of the probe workload


def own_process_memory(request: ProbeRequest) -> ProcessMemory | str:
    """Run the probe in a child interpreter -> its memory, or a one-line reason it could not be measured."""
    cmd = [sys.executable, "-m", __name__, json.dumps(asdict(request))]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"memory probe timed out after {PROBE_TIMEOUT_S} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"memory probe failed: {lines[-1] if lines else f'exit code {done.returncode}'}"
    return ProcessMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _probe(request: ProbeRequest) -> ProcessMemory:
    from .cases import FIRST_ID
    from .validate import make_runner

    base = _rss_mb()
    runner = make_runner(
        request.backend,
        Path(request.export_dir),
        Path(request.checkpoint) if request.checkpoint else None,
        request.precision,
        request.target,
    )
    b, n = request.batch, request.context
    ids = np.random.default_rng(0).integers(FIRST_ID, runner.spec.vocab_size, (b, n), dtype=np.int64)
    state = runner.start(b, n + request.steps + 1)
    logits = runner.step(state, ids, np.full(b, n, dtype=np.int64))
    for _ in range(request.steps):
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        logits = runner.step(state, token, np.ones(b, dtype=np.int64))
    return ProcessMemory(base, max(peak_rss_bytes() / 2**20, _rss_mb()))


def peak_rss_bytes() -> int:
    """This process image's peak RSS: VmHWM. Not getrusage's ru_maxrss, which Linux carries over from the
    parent through fork + exec (a child would report its parent's size)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: the best there is


if __name__ == "__main__":
    print(json.dumps(asdict(_probe(ProbeRequest(**json.loads(sys.argv[1]))))))
