"""`run_matrix`: expand a plan, run its jobs in dependency order on an executor, write the index.

The scheduler lives here, in the driver, whatever the executor: a job starts when its dependencies are done (or
up to date); a job whose dependency failed or was skipped is skipped with that reason, and everything else goes
on. Before a job is submitted, an earlier run's record with the same fingerprint and intact outputs makes it
'up-to-date' instead, so a rerun resumes a half-finished matrix and a finished one does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..fsutil import check_output_path, marker_kind, output_lock, write_marker
from . import index
from .executors import check_executor, make_executor
from .jobs import attempts_file, fingerprint, store, stored
from .plan import Job, Plan, expand, load_plan

OK = ("done", "up-to-date")


@dataclass
class MatrixResult:
    out: Path
    plan: Plan
    jobs: list[Job]
    records: dict[str, dict[str, Any]]  # job id -> record
    rows: list[dict[str, Any]]

    @property
    def failed(self) -> list[str]:
        return [j.id for j in self.jobs if self.records[j.id]["status"] == "failed"]

    @property
    def failed_validations(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["verdict"] == "failed"]


def run_matrix(
    plan_path: str | Path,
    out: str | Path,
    *,
    executor: str = "local",
    address: str | None = None,
    concurrency: int | None = None,
    retries: int | None = None,
    on_record: Callable[[Job, dict[str, Any]], None] | None = None,
) -> MatrixResult:
    """Run the plan into `out` (created, or an earlier matrix output to resume) and write OUT/index.{json,md}."""
    check_executor(executor, address)
    plan = load_plan(plan_path)
    out = Path(out).resolve()
    check_output_path(out, [c.path for c in plan.checkpoints if c.path], UsageError)
    jobs = expand(plan)
    with output_lock(out, UsageError):
        _check_matrix_output(out)
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "matrix")
        ex = make_executor(
            executor,
            out,
            concurrency or plan.concurrency,
            plan.retries if retries is None else retries,
            address,
        )
        try:
            records = schedule(jobs, ex, out, on_record or (lambda job, record: None))
        finally:
            ex.close()
        rows = index.write_index(out, plan, ex.name, jobs, records)
    return MatrixResult(out, plan, jobs, records, rows)


def _check_matrix_output(out: Path) -> None:
    """Resume only into a matrix output: any other non-empty directory is refused, not mixed into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and marker_kind(out) != "matrix":
        raise UsageError(f"{out} exists and is not a matrix output; choose an empty or new directory")


def schedule(jobs: list[Job], ex: Any, out: Path, on_record: Callable[[Job, dict], None]) -> dict[str, dict]:
    """Run `jobs` (in dependency order) on `ex`; returns every job's record."""
    records: dict[str, dict[str, Any]] = {}
    waiting, running = list(jobs), {}

    def finish(job: Job, record: dict[str, Any]) -> None:
        records[job.id] = record
        on_record(job, record)

    while waiting or running:
        for job in list(waiting):
            if any(d not in records for d in job.deps):
                continue
            decided, fp = _decide(job, ex, out, records)
            if decided is not None:
                waiting.remove(job)
                finish(job, decided)
            elif ex.can_start(job, [j for j, _ in running.values()]):
                waiting.remove(job)
                attempts_file(out, job.id).unlink(missing_ok=True)
                running[ex.submit(job)] = (job, fp)
        if not running:
            continue  # everything ready was decided without running; its dependents are ready now
        for handle, record in ex.wait(list(running)):
            job, fp = running.pop(handle)
            if record["status"] == "done" or job.resources.gpu:  # 'not executed' stands while the GPUs do
                store(out, job, fp, record)
            finish(job, record)
    return records


def _decide(job: Job, ex: Any, out: Path, records: dict[str, dict]) -> tuple[dict[str, Any] | None, str]:
    """(the record of a job that needs no run, its fingerprint): skipped (a dependency did not succeed, or the
    executor cannot run it) or up to date; the record is None when the job must run."""
    blocked = next((d for d in job.deps if records[d]["status"] not in OK), None)
    if blocked is not None:
        return {"status": "skipped", "reason": f"depends on {records[blocked]['status']} {blocked}"}, ""
    reason = ex.refusal(job)
    if reason is not None:
        return {"status": "skipped", "reason": reason}, ""
    fp = fingerprint(job, [records[d]["output"] for d in job.deps], ex.capacity())
    earlier = stored(out, job, fp)
    if earlier is None:
        return None, fp
    return {**earlier, "status": "up-to-date" if earlier["status"] == "done" else earlier["status"]}, fp
