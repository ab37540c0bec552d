"""What each job kind does (through the existing stages, never a copy of them), and when it is already done.

Worker side: `execute(job, out)` runs one job in the calling process and returns a small JSON-able record:
{"status": "done" | "skipped" | "failed", "reason" (one line, unless done), "seconds", "peak_rss_bytes",
"attempts", "output" (the fingerprint dependents build on), kind fields}. Every executor runs it in a fresh
process (a subprocess, or a Ray worker with max_calls=1), so `peak_rss_bytes` (VmHWM) is that job's peak,
interpreter and imports included. A crash never returns: the executor sees the process die and retries.

Driver side: `fingerprint` (the job's parameters plus its inputs' output fingerprints: the checkpoint's files,
the export's sha256, the engine's build key with the TensorRT version and plugin hashes in it) and `stored`
(the record of an earlier run with that fingerprint whose outputs are still intact): a rerun skips such jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, Gemma4CompileError
from ..fsutil import sha256_files, write_atomic
from ..validate.memory import peak_rss_bytes
from .plan import GPU_BUILDER, Job, slug

JOBS_DIR = "jobs"  # OUT/jobs/<slug>.json: the record of each finished job, with its fingerprint


def job_to_dict(job: Job) -> dict[str, Any]:
    return asdict(job)


# ----- worker side -----------------------------------------------------------------------------------------


def execute(job: dict[str, Any], out: str) -> dict[str, Any]:
    """Run one job (a `job_to_dict` dict) against the output directory `out`; never raises for a job's own
    failure: a Gemma4CompileError (or any other exception) becomes status "failed" with one line."""
    root = Path(out)
    attempts = _count_attempt(root, job)
    t0 = time.perf_counter()
    try:
        record = RUNNERS[job["kind"]](job, root)
        record.setdefault("status", "done")
    except BackendUnavailable as e:  # the node lacks a module or device: not the job's fault
        record = {"status": "skipped", "reason": _one_line(e)}
    except Exception as e:
        record = {"status": "failed", "reason": _one_line(e)}
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["peak_rss_bytes"] = peak_rss_bytes()  # VmHWM: ru_maxrss would carry the parent's peak over exec
    record["attempts"] = attempts
    return record


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, Gemma4CompileError) else f"{type(e).__name__}: {text}"


def attempts_file(root: Path, job_id: str) -> Path:
    return root / JOBS_DIR / f"{slug(job_id)}.attempts"


def _count_attempt(root: Path, job: dict[str, Any]) -> int:
    """Append this attempt to the job's attempts file (the driver empties it before the first attempt); a
    retried job, on whichever node, sees the earlier attempts on the shared directory."""
    path = attempts_file(root, job["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


def _checkpoint(job: dict, root: Path) -> dict:
    import torch

    from ..model.checkpoint import write_random_checkpoint
    from ..model.presets import PRESETS, VISION_PRESETS

    p = job["params"]
    vision = VISION_PRESETS[p["preset"]] if p["vision"] else None
    path = root / p["dir"]
    write_random_checkpoint(
        PRESETS[p["preset"]], path, seed=p["seed"], dtype=torch.float32, force=True, vision=vision
    )
    return {"output": checkpoint_stamp(path)}


def _export(job: dict, root: Path) -> dict:
    from ..export import export_checkpoint
    from ..quant.formats import QuantRequest

    p = job["params"]
    result = export_checkpoint(
        root / p["checkpoint"],  # an absolute path (a checkpoint of the plan) stays as it is
        root / p["export"],
        dtype=p["dtype"],
        max_seq_len=p["max_seq_len"],
        force=True,
        quant=QuantRequest(p["quant"]),
        text_only=p["text_only"],
    )
    m = result.manifest
    size = sum((root / p["export"] / name).stat().st_size for name in m.files)
    return {"output": m.sha256, "export_dir": p["export"], "export_bytes": size}


def _build(job: dict, root: Path) -> dict:
    from ..engines import build_engines

    p = job["params"]
    if job["testing"].get("kill_once"):
        _kill_before_manifest(root, job["id"])
    options = {"max_batch": p["max_batch"], "opt_level": p["opt_level"], "plugins": p["plugins"]}
    (art,) = build_engines(root / p["export"], [p["target"]], flavour=p["builder"], progress=False, **options)
    m = art.manifest
    return {
        "output": m.tools.get("build_key", ""),
        "engine": str(art.engine_path.relative_to(root)),
        "engine_bytes": art.engine_path.stat().st_size,
        "builder": m.trt_title,
        "trt_version": m.trt_version,
        "build_seconds": m.build_seconds,
        "reused": art.reused,
    }


def _kill_before_manifest(root: Path, job_id: str) -> None:
    """Test hook ([testing] kill_once): on the first attempt, SIGKILL this process after the engine is written
    into its staging directory and before its manifest is, the worst moment for a half-written artifact."""
    marker = attempts_file(root, job_id).with_suffix(".killed")
    if marker.exists():
        return
    marker.touch()
    from ..engines import build as build_module

    def killed(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    build_module.write_manifest = killed


def gpu_refusal(target: str) -> str | None:
    """Why an engine of `target` cannot run on this node, or None if it has a GPU of that SM."""
    from ..targets import TARGETS, local_device_sm

    t, sm = TARGETS[target], local_device_sm()
    if sm == t.sm:
        return None
    here = "this node has none" if sm is None else f"this node has sm{sm}"
    return f"not executed: needs a GPU of {t.describe()}; {here}"


def _validate(job: dict, root: Path) -> dict:
    from ..validate import validate

    p = job["params"]
    if p["backend"] == "trt" and (reason := gpu_refusal(p["target"])):
        return {"status": "skipped", "reason": reason, "verdict": "not executed"}
    report = validate(
        root / p["export"],
        backend=p["backend"],
        steps=p["steps"],
        out_dir=root / p["reports"],
        target=p.get("target"),
    )
    verdict = "passed" if report.passed else "failed"
    return {
        "output": verdict,
        "verdict": verdict,
        "message": report.failure_message(),
        "reports": p["reports"],
    }


def _bench(job: dict, root: Path) -> dict:
    from ..validate import bench

    p = job["params"]
    if p["backend"] == "trt" and (reason := gpu_refusal(p["target"])):
        return {"status": "skipped", "reason": reason}
    report = bench(
        root / p["export"],
        backends=[p["backend"]],
        compare=(),
        out_dir=root / p["reports"],
        target=p["target"],
        memory=False,  # this job runs in a process of its own already: its peak is the record's
    )
    rows = [r for r in report.rows if r.backend == p["backend"] and r.batch == 1]
    decode = max((r for r in rows if r.phase == "decode"), key=lambda r: r.context, default=None)
    prefill = max((r for r in rows if r.phase == "prefill"), key=lambda r: r.context, default=None)
    return {
        "output": "bench",
        "decode_tokens_per_s": round(decode.tokens_per_s, 1) if decode else None,
        "prefill_p50_ms": round(prefill.p50_ms, 2) if prefill else None,
        "prefill_context": prefill.context if prefill else None,
    }


RUNNERS = {
    "checkpoint": _checkpoint,
    "export": _export,
    "build": _build,
    "validate": _validate,
    "bench": _bench,
}


def main() -> int:
    """`python -m gemma4_compile.matrix.jobs OUT JOB.json RESULT.json`: the local executor's child process."""
    out, job_file, result_file = sys.argv[1:4]
    record = execute(json.loads(Path(job_file).read_text()), out)
    write_atomic(Path(result_file), json.dumps(record))
    return 0


# ----- driver side: fingerprints and stored records ---------------------------------------------------------


def checkpoint_stamp(path: Path) -> str:
    """A checkpoint's fingerprint: every file's name, size and mtime (hashing many GiB per rerun would cost
    minutes; a changed checkpoint changes these)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()


def fingerprint(job: Job, inputs: list[str], capacity: str = "") -> str:
    """Parameters + the output fingerprints of the job's inputs (+ what it was judged against, for a job that
    needs a GPU: a 'not executed' outcome stands until the executor's GPUs change)."""
    if job.kind == "export" and Path(job.params["checkpoint"]).is_absolute():
        inputs = [*inputs, checkpoint_stamp(Path(job.params["checkpoint"]))]
    if job.kind == "build":
        inputs = [*inputs, _installed_version(job.params["builder"])]
    key = {
        "id": job.id,
        "params": job.params,
        "inputs": inputs,
        "capacity": capacity if job.resources.gpu else "",
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _installed_version(flavour: str) -> str:
    """The TensorRT version a build would use now, if the driver has it installed ('' if not: the node's own
    TensorRT is then taken on trust, and build_engines still rebuilds a stale engine when it runs)."""
    from ..engines.seam import installed_flavours

    return next((f.version for f in installed_flavours() if f.name == flavour), "")


def record_path(root: Path, job: Job) -> Path:
    return root / JOBS_DIR / f"{job.slug}.json"


def store(root: Path, job: Job, fp: str, record: dict[str, Any]) -> None:
    write_atomic(
        record_path(root, job), json.dumps({"id": job.id, "fingerprint": fp, "record": record}, indent=1)
    )


def stored(root: Path, job: Job, fp: str) -> dict[str, Any] | None:
    """The earlier record of this job if its fingerprint is `fp` and its outputs are intact, else None."""
    try:
        saved = json.loads(record_path(root, job).read_text())
    except (OSError, ValueError):
        return None
    record = saved.get("record") if saved.get("fingerprint") == fp else None
    if not isinstance(record, dict) or not _intact(root, job, record):
        return None
    return record


def _intact(root: Path, job: Job, record: dict[str, Any]) -> bool:
    """The outputs a done record describes still exist unchanged."""
    if record.get("status") != "done":
        return True  # a 'not executed' outcome has no output; its fingerprint holds the GPUs it was judged on
    try:
        if job.kind == "checkpoint":
            return checkpoint_stamp(root / job.params["dir"]) == record["output"]
        if job.kind == "export":
            return _export_intact(root / job.params["export"], record["output"])
        if job.kind == "build":
            return _engine_intact(root / record["engine"], record["output"])
        return (root / job.params["reports"]).is_dir()
    except (Gemma4CompileError, OSError, KeyError):
        return False


def _export_intact(path: Path, sha256: str) -> bool:
    from ..export.manifest import ExportManifest

    manifest = ExportManifest.load(path)
    manifest.verify()  # every graph and weight file against export.json (cached hashes while untouched)
    return manifest.sha256 == sha256


def _engine_intact(engine: Path, build_key: str) -> bool:
    from ..engines import read_manifest

    manifest = read_manifest(engine.parent)
    hashes = sha256_files(engine.parent, manifest.files)  # cached while the files are untouched
    same = all(hashes[name] == meta["sha256"] for name, meta in manifest.files.items())
    return same and manifest.tools.get("build_key") == build_key


def needs_gpu_builder(job: Job) -> bool:
    return job.kind == "build" and job.params["builder"] == GPU_BUILDER


if __name__ == "__main__":
    sys.exit(main())
