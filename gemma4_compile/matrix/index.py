"""OUT/index.json and OUT/index.md: one row per (model, precision, target), each written atomically.

A row gathers the jobs that report into it: the export (target 'onnxruntime') or the engine build, and the
validation and bench of that artifact. Its status is the worst of them (failed > skipped > done > up-to-date),
its reason the first failure or skip among them, prefixed with the job kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import write_atomic
from .plan import ORT_TARGET, Job, Plan

FORMAT = "gemma4-compile/matrix-index"
COLUMNS = (
    ("model", "model"),
    ("precision", "precision"),
    ("target", "target"),
    ("status", "status"),
    ("artifact", "engine / export"),
    ("size_mib", "MiB"),
    ("build_s", "export/build s"),
    ("peak_rss_gib", "peak GiB"),
    ("verdict", "validation"),
    ("decode_tok_s", "decode tok/s"),
    ("prefill_ms", "prefill ms"),
    ("attempts", "attempts"),
    ("reason", "reason"),
)
TERMINAL_COLUMNS = tuple(
    c for c in COLUMNS if c[0] in ("model", "precision", "target", "status", "verdict", "reason")
)
_RANK = {"failed": 0, "skipped": 1, "done": 2, "up-to-date": 3}


def rows(jobs: list[Job], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, str, str], list[Job]] = {}
    for job in jobs:
        if job.kind != "checkpoint":  # a checkpoint's failure reaches its exports' rows as their reason
            grouped.setdefault(job.row, []).append(job)
    return [_row(key, [(j, records[j.id]) for j in members]) for key, members in grouped.items()]


def _row(key: tuple[str, str, str], members: list[tuple[Job, dict[str, Any]]]) -> dict[str, Any]:
    by_kind = {job.kind: record for job, record in members}
    main = by_kind.get("build") or by_kind["export"]
    validation, bench = by_kind.get("validate"), by_kind.get("bench", {})
    trouble = [(j.kind, r) for j, r in members if r["status"] in ("failed", "skipped")]
    status = min((r["status"] for _, r in members), key=_RANK.__getitem__)
    if main["status"] not in ("failed", "skipped") and status == "skipped":
        status = main[
            "status"
        ]  # the artifact is there; a validation that could not run says so in its reason
    size = main.get("engine_bytes", main.get("export_bytes"))
    reason = next((f"{kind}: {r['reason']}" for kind, r in trouble), "")
    if not reason and validation and validation.get("verdict") == "failed":
        reason = f"validate: {validation.get('message', '')}"
    return {
        "model": key[0],
        "precision": key[1],
        "target": key[2],
        "status": status,
        "builder": main.get("builder", "onnxruntime" if key[2] == ORT_TARGET else ""),
        "artifact": main.get("engine", main.get("export_dir", "")),
        "size_mib": round(size / 2**20, 1) if size else None,
        "build_s": main.get("build_seconds", main.get("seconds")),
        "peak_rss_gib": round(main["peak_rss_bytes"] / 2**30, 2) if main.get("peak_rss_bytes") else None,
        "verdict": _verdict(validation),
        "decode_tok_s": bench.get("decode_tokens_per_s"),
        "prefill_ms": bench.get("prefill_p50_ms"),
        "attempts": max((r.get("attempts", 0) for _, r in members), default=0),
        "reason": reason,
    }


def _verdict(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    if record["status"] in ("done", "up-to-date"):
        return record["verdict"]
    return "not executed" if record["status"] == "skipped" else "error"


def write_index(
    out: Path, plan: Plan, executor: str, jobs: list[Job], records: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Write OUT/index.json (rows and every job's record) and OUT/index.md; returns the rows."""
    table = rows(jobs, records)
    listed = [
        {"id": j.id, "kind": j.kind, "deps": list(j.deps), **_declared(j), **records[j.id]} for j in jobs
    ]
    doc = {"format": FORMAT, "version": 1, "plan": str(plan.source), "executor": executor}
    write_atomic(out / "index.json", json.dumps({**doc, "rows": table, "jobs": listed}, indent=1) + "\n")
    write_atomic(out / "index.md", markdown(table, plan, executor))
    return table


def _declared(job: Job) -> dict[str, Any]:
    return {"declared_memory_bytes": job.resources.memory, "gpu": job.resources.gpu}


def cell(row: dict[str, Any], key: str) -> str:
    value = row[key]
    return "-" if value is None or value == "" else str(value)


def markdown(table: list[dict[str, Any]], plan: Plan, executor: str) -> str:
    head = [title for _, title in COLUMNS]
    lines = [f"# Matrix: {plan.source.name} ({executor} executor)", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for row in table:
        lines.append("| " + " | ".join(cell(row, key).replace("|", "\\|") for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"
