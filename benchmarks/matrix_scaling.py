"""The tiny build matrix (examples/matrix-tiny.toml) on this machine: wall time with 1 and 2 workers, locally
and on a local Ray cluster, and the per-job overhead Ray adds.

    python benchmarks/matrix_scaling.py                      # local x1, local x2, ray x1, ray x2
    python benchmarks/matrix_scaling.py --runs local:1,ray:1

Each run starts from an empty output directory (nothing is up to date). A run's overhead per job is
(wall - the sum of the jobs' own seconds) / jobs, with one worker (jobs in sequence): what the executor spends
outside the jobs (a fresh process per job, submission, results). Ray adds the difference between the ray x1 and
local x1 overheads. Measured within each run, so a machine whose load changes between runs (a shared one)
still compares; walls of different runs do not. Starting the Ray cluster is timed apart. Also prints the time
and peak RSS per job kind of the first run (docs/scaling.md extrapolates from them). Prints a table, then one
JSON line. Benchmarks report; they never assert.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import report

from gemma4_compile.matrix import run_matrix

PLAN = Path(__file__).resolve().parents[1] / "examples" / "matrix-tiny.toml"
FAKE_GPUS = {"accelerator_type:L4": 1, "accelerator_type:GeForce-RTX-5090": 1}  # as the tests declare them


def bench_plan(work: Path) -> Path:
    """The tiny plan without engine validations: locally they are decided in the driver (no GPU here), on the
    fake-GPU Ray cluster they run as tasks; without them both executors run the same jobs."""
    text = PLAN.read_text().replace("[validate]\n", "[validate]\nengines = false\n")
    assert "engines = false" in text
    (work / PLAN.name).write_text(text)
    return work / PLAN.name


def one_run(executor: str, workers: int, work: Path) -> dict:
    out = work / f"{executor}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    init_s = 0.0
    if executor == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=workers, num_gpus=2, resources=FAKE_GPUS, object_store_memory=128 << 20,
                 include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # fmt: skip
        init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        result = run_matrix(bench_plan(work), out, executor=executor, concurrency=workers)
        wall = time.perf_counter() - t0
    finally:
        if executor == "ray":
            ray.shutdown()
    ran = {i: r for i, r in result.records.items() if "seconds" in r and r["status"] != "up-to-date"}
    return {
        "executor": executor,
        "workers": workers,
        "wall_s": round(wall, 1),
        "cluster_start_s": round(init_s, 1),
        "jobs_run": len(ran),
        "job_s_sum": round(sum(r["seconds"] for r in ran.values()), 1),
        "failed": len(result.failed),
        "kinds": _by_kind(result),
    }


def _by_kind(result) -> dict:
    """Per job kind: how many ran, mean seconds, max peak RSS (GiB)."""
    kinds: dict[str, list[dict]] = {}
    for job in result.jobs:
        record = result.records[job.id]
        if "seconds" in record and record["status"] == "done":
            kinds.setdefault(job.kind, []).append(record)
    return {
        kind: {
            "n": len(rs),
            "mean_s": round(statistics.mean(r["seconds"] for r in rs), 1),
            "peak_rss_gib": round(max(r["peak_rss_bytes"] for r in rs) / 2**30, 2),
        }
        for kind, rs in kinds.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", default="local:1,local:2,ray:1,ray:2", help="executor:workers, comma-separated"
    )
    parser.add_argument("--work", type=Path, help="where the outputs go (default: a temporary directory)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="matrix-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = [one_run(name, int(n), work) for name, n in (r.split(":") for r in args.runs.split(","))]
    for r in runs:
        r["overhead_per_job_s"] = round(
            (r["wall_s"] - r["job_s_sum"] / r["workers"]) / max(r["jobs_run"], 1), 2
        )
    serial = {r["executor"]: r for r in runs if r["workers"] == 1}
    overhead = None
    if {"local", "ray"} <= set(serial):
        overhead = round(serial["ray"]["overhead_per_job_s"] - serial["local"]["overhead_per_job_s"], 2)
    rows = [
        [
            r["executor"],
            r["workers"],
            r["wall_s"],
            r["cluster_start_s"],
            r["jobs_run"],
            r["job_s_sum"],
            r["overhead_per_job_s"],
            r["failed"],
        ]
        for r in runs
    ]
    columns = [
        "executor",
        "workers",
        "wall s",
        "cluster start s",
        "jobs run",
        "sum of job s",
        "overhead/job s",
        "failed",
    ]
    title = f"{PLAN.name}: wall time by executor and workers; Ray adds {overhead} s per job"
    report(title, columns, rows, {"runs": runs, "ray_overhead_per_job_s": overhead, "plan": PLAN.name})
    first = runs[0]
    for kind, k in first["kinds"].items():
        where = f"{first['executor']} x{first['workers']}"
        print(f"{where}: {kind}: {k['n']} jobs, {k['mean_s']} s each, peak {k['peak_rss_gib']} GiB")


if __name__ == "__main__":
    main()
