"""Where jobs run: `LocalExecutor` (this machine, a concurrency limit) or `RayExecutor` (Ray tasks).

Both run every job in a fresh process (`jobs.execute`): a subprocess here, a Ray worker with max_calls=1 there.
So a crash (TensorRT, the OOM killer, a kill) costs that job an attempt and nothing else, and a job's peak RSS
is its own. The scheduler (run.py) asks an executor three things before it submits a job: `refusal` (why it
can never run here: recorded as skipped), `capacity` (the GPUs a 'not executed' outcome was judged against)
and `can_start` (room now); then `submit` and `wait`, which turns a crash after the last retry into a failed
record, never an exception.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .jobs import attempts_file, gpu_refusal, job_to_dict, needs_gpu_builder
from .plan import CPU_BUILDER, Job


def _crash_record(root: Path, job: Job, why: str) -> dict[str, Any]:
    """The record of a job whose process died on its last attempt (it could not write one itself)."""
    path = attempts_file(root, job.id)
    attempts = len(path.read_text().splitlines()) if path.exists() else 0
    return {"status": "failed", "reason": f"worker died ({why}) on every attempt", "attempts": attempts}


def _gpu_words(target: str) -> str:
    from ..targets import TARGETS

    return "/".join(g.upper() for g in TARGETS[target].gpus[:2])


def gpu_builder_refusal(target: str, where: str) -> str:
    """The reason a full-TensorRT build is not run: the index's words for it."""
    return f"{target} needs full TensorRT on an {_gpu_words(target)} node; {where}"


# ----- local -------------------------------------------------------------------------------------------------


class LocalExecutor:
    """Jobs as child processes of this one, at most `concurrency` at a time and no more than this machine's
    memory by their declared peaks (one job always runs, whatever it declares)."""

    name = "local"

    def __init__(self, root: Path, concurrency: int, retries: int):
        import psutil

        self.root, self.concurrency, self.retries = root, concurrency, retries
        self.memory = psutil.virtual_memory().total
        self.pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="matrix")
        self.stopping = threading.Event()  # set on close: after Ctrl-C, a child that died is not run again

    def refusal(self, job: Job) -> str | None:
        if needs_gpu_builder(job):
            has_full = any(f.name == "tensorrt" for f in _flavours())
            if gpu_refusal(job.params["target"]) or not has_full:
                return gpu_builder_refusal(job.params["target"], "this machine is not one")
        if (
            job.kind == "build"
            and job.params["builder"] == CPU_BUILDER
            and not any(f.is_rtx for f in _flavours())
        ):
            return "needs TensorRT-RTX on this machine (pip install 'gemma4-compile[rtx]')"
        if job.resources.gpu and job.kind != "build":
            return gpu_refusal(job.resources.gpu)
        return None

    def capacity(self) -> str:
        from ..targets import local_device_sm

        return f"local:sm{local_device_sm()}"

    def can_start(self, job: Job, running: list[Job]) -> bool:
        used = sum(j.resources.memory for j in running)
        return not running or (len(running) < self.concurrency and used + job.resources.memory <= self.memory)

    def submit(self, job: Job) -> cf.Future:
        return self.pool.submit(self._run, job)

    def _run(self, job: Job) -> dict[str, Any]:
        """Run the job in a child process, again after a crash, up to `retries` more times."""
        folder = self.root / "jobs"
        folder.mkdir(parents=True, exist_ok=True)
        spec, result, log = (folder / f"{job.slug}.{ext}" for ext in ("job.json", "result.json", "log"))
        spec.write_text(json.dumps(job_to_dict(job)))
        why = "interrupted"
        for _ in range(self.retries + 1):
            if self.stopping.is_set():
                break
            result.unlink(missing_ok=True)
            with open(log, "a") as out:
                argv = [
                    sys.executable,
                    "-m",
                    "gemma4_compile.matrix.jobs",
                    str(self.root),
                    str(spec),
                    str(result),
                ]
                code = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                ).returncode
            if result.is_file():
                record = json.loads(result.read_text())
                spec.unlink()
                result.unlink()
                return record
            why = signal.Signals(-code).name if code < 0 else f"exit code {code}"
        return _crash_record(self.root, job, why)

    def wait(self, handles: list[cf.Future]) -> list[tuple[cf.Future, dict[str, Any]]]:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    def close(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


@functools.cache
def _flavours():
    from ..engines.seam import installed_flavours

    return installed_flavours()


# ----- Ray ---------------------------------------------------------------------------------------------------


def ray_accelerator_types(target: str) -> tuple[str, ...]:
    """Ray's accelerator_type names of the target's GPUs, as Ray derives them from the device name
    ('NVIDIA H100 80GB HBM3' -> H100, 'NVIDIA GeForce RTX 5090' -> GeForce-RTX-5090)."""
    from ..targets import TARGETS

    names = []
    for gpu in TARGETS[target].gpus:
        digits = gpu.removeprefix("rtx")
        names.append(f"GeForce-RTX-{digits}" if gpu.startswith("rtx") and digits.isdigit() else gpu.upper())
    return tuple(names)


class RayExecutor:
    """Jobs as Ray tasks. CPU jobs ask for `num_cpus` and `memory` (their declared peak); jobs that need a GPU
    also ask `num_gpus=1` and the accelerator type of a GPU of their target that the cluster has, so an sm90
    engine is only ever built on an H100/H200 node. Ray retries a task whose worker died (`max_retries`);
    exceptions are not retried (a job returns its own failure as a record)."""

    name = "ray"

    def __init__(self, root: Path, retries: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'gemma4-compile[ray]'") from None
        self.ray, self.root, self.retries = ray, root, retries
        self.owns = not ray.is_initialized()
        if self.owns:  # a cluster at `address`, or a local one for this run
            ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        self.resources = ray.cluster_resources()
        self.nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.task = ray.remote(max_calls=1)(_ray_execute)  # a fresh worker per job: its own peak RSS
        self.jobs: dict[Any, Job] = {}  # ObjectRef -> its job, to name a crashed one

    def accelerator(self, target: str) -> str | None:
        """A Ray accelerator type of the target's GPUs that some node of the cluster has, else None."""
        if self.resources.get("GPU", 0) < 1:
            return None
        return next(
            (t for t in ray_accelerator_types(target) if f"accelerator_type:{t}" in self.resources), None
        )

    def refusal(self, job: Job) -> str | None:
        """Decided up front, so that no task waits forever for a node the cluster does not have."""
        from ..targets import TARGETS

        r, where = job.resources, "the Ray cluster has none"
        if r.gpu and not self.accelerator(r.gpu):
            if job.kind == "build":
                return gpu_builder_refusal(r.gpu, where)
            return f"not executed: needs a GPU of {TARGETS[r.gpu].describe()}; {where}"
        accelerator = f"accelerator_type:{self.accelerator(r.gpu)}" if r.gpu else None
        if not any(_fits(node, r, accelerator) for node in self.nodes):
            gib = r.memory / 2**30
            return (
                f"declares a {gib:.0f} GiB peak and {r.cpus:g} CPU; no node of the Ray cluster has that room"
            )
        return None

    def capacity(self) -> str:
        gpus = sorted(k for k in self.resources if k.startswith("accelerator_type:"))
        return f"ray:GPU={self.resources.get('GPU', 0)}:{','.join(gpus)}"

    def can_start(self, job: Job, running: list[Job]) -> bool:
        return True  # Ray queues tasks until a node has their resources

    def submit(self, job: Job) -> Any:
        r = job.resources
        options: dict[str, Any] = {"num_cpus": r.cpus, "memory": r.memory}
        options |= {"max_retries": self.retries, "retry_exceptions": False}
        if r.gpu:
            options |= {"num_gpus": 1, "accelerator_type": self.accelerator(r.gpu)}
        ref = self.task.options(**options).remote(job_to_dict(job), str(self.root))
        self.jobs[ref] = job
        return ref

    def wait(self, handles: list[Any]) -> list[tuple[Any, dict[str, Any]]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        out = []
        for ref in ready:
            job = self.jobs.pop(ref)
            try:
                record = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # the worker or its node died, after the last retry
                record = _crash_record(self.root, job, type(e).__name__)
            out.append((ref, record))
        return out

    def close(self) -> None:
        for ref in self.jobs:  # still running: an interrupted matrix leaves no task behind
            self.ray.cancel(ref, force=True)
        if self.owns:
            self.ray.shutdown()


def _fits(node: dict[str, float], r: Any, accelerator: str | None) -> bool:
    """Whether one node's total resources hold a job's request."""
    room = node.get("CPU", 0) >= r.cpus and node.get("memory", 0) >= r.memory
    return room and (accelerator is None or (node.get("GPU", 0) >= 1 and node.get(accelerator, 0) > 0))


def _ray_execute(job: dict[str, Any], out: str) -> dict[str, Any]:
    from .jobs import execute

    return execute(job, out)


def check_executor(name: str, address: str | None) -> None:
    """Refuse an impossible executor request before any output is touched."""
    if name not in ("local", "ray"):
        raise UsageError(f"unknown executor {name!r}; choose local or ray")
    if address and name != "ray":
        raise UsageError("--address is for --executor ray")


def make_executor(name: str, root: Path, concurrency: int, retries: int, address: str | None = None):
    check_executor(name, address)
    if name == "local":
        return LocalExecutor(root, concurrency, retries)
    return RayExecutor(root, retries, address)
