"""The tiny matrix for real: a local Ray cluster (2 CPUs, fake L4 and RTX 5090 accelerators) and the local
executor each run examples/matrix-tiny.toml cut to its tiny-31b checkpoint in fp32 (1 dtype x 2 targets, one per
fake accelerator type; the CI time of a second preset or dtype buys no new path: test_matrix_plan.py covers
the plan's cross product) plus a broken checkpoint; TensorRT-RTX builds on the CPU.

One run per executor per module (module fixtures): Ray runs the whole plan, the local executor a slice of it
(tiny-31b fp32 on sm89, plus the broken checkpoint), whose rows must equal Ray's for the same jobs. Tests that
run more work on a copy of a run's output, so only their own jobs run (everything else is up to date)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gemma4_compile.matrix import run_matrix

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.rtx]

TINY = Path(__file__).resolve().parents[2] / "examples" / "matrix-tiny.toml"
FAKE_GPUS = {"accelerator_type:L4": 1, "accelerator_type:GeForce-RTX-5090": 1}  # sm89, sm120
COMPARED = ("model", "precision", "target", "status", "artifact", "verdict", "reason", "attempts")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(
        num_cpus=2,
        num_gpus=2,
        resources=FAKE_GPUS,
        object_store_memory=128 << 20,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Path]:
    """'tiny': the example; 'broken': it plus a checkpoint whose config.json the export refuses."""
    root = tmp_path_factory.mktemp("plans")
    (root / "broken-ckpt").mkdir()
    (root / "broken-ckpt" / "config.json").write_text('{"model_type": "gemma4"}')
    tiny = (
        TINY.read_text()
        .replace('[[checkpoints]]\npreset = "tiny-e2b"\n', "")
        .replace('"fp32", "fp16"', '"fp32"')
    )
    assert tiny.count("[[checkpoints]]") == 1 and 'dtypes = ["fp32"]' in tiny
    (root / "tiny.toml").write_text(tiny)
    broken = tiny + '\n[[checkpoints]]\nname = "broken"\npath = "broken-ckpt"\n'
    (root / "broken.toml").write_text(broken)
    return {"tiny": root / "tiny.toml", "broken": root / "broken.toml", "root": root}


@pytest.fixture(scope="module")
def ray_run(ray_cluster, plans, tmp_path_factory):
    return run_matrix(plans["broken"], tmp_path_factory.mktemp("ray") / "out", executor="ray")


@pytest.fixture(scope="module")
def local_run(plans, tmp_path_factory):
    broken = plans["broken"].read_text()[len(plans["tiny"].read_text()) :]
    plan = _one_export_plan(plans, "local-slice", "sm89", broken)
    return run_matrix(plan, tmp_path_factory.mktemp("local") / "out", executor="local")


def _rows(result) -> list[dict]:
    return [{k: r[k] for k in COMPARED} for r in result.rows]


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


def _copy(result, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(result.out, dst, symlinks=True)
    return dst


def test_ray_and_local_executors_write_the_same_index(ray_run, local_run):
    local = _rows(local_run)
    keys = {(r["model"], r["precision"], r["target"]) for r in local}
    assert len(keys) == 4  # tiny-31b fp32 on onnxruntime and sm89; broken fp32 on both
    assert [r for r in _rows(ray_run) if (r["model"], r["precision"], r["target"]) in keys] == local
    assert _index(ray_run.out)["executor"] == "ray" and _index(local_run.out)["executor"] == "local"
    engines = [r for r in ray_run.rows if r["target"] in ("sm89", "sm120") and r["model"] != "broken"]
    assert len(engines) == 2 and all(r["status"] == "done" for r in engines)
    assert all(r["verdict"] == "not executed" and "needs a GPU of" in r["reason"] for r in engines)
    exports = [r for r in ray_run.rows if r["target"] == "onnxruntime" and r["model"] != "broken"]
    assert len(exports) == 1 and all(r["verdict"] == "passed" for r in exports)
    assert all((ray_run.out / r["artifact"]).is_file() and r["peak_rss_gib"] > 0 for r in engines)
    assert (ray_run.out / "index.md").read_text().count("\n| tiny-") == 3


def test_a_failed_job_does_not_stop_its_siblings(ray_run):
    records = ray_run.records
    failed = records["export:broken/fp32"]
    assert failed["status"] == "failed" and "text_config" in failed["reason"] and "\n" not in failed["reason"]
    skipped = records["build:broken/fp32/sm89"]
    assert skipped == {"status": "skipped", "reason": "depends on failed export:broken/fp32"}
    assert all(r["status"] == "done" for k, r in records.items() if k.startswith("build:tiny-31b/"))
    assert sum(r["status"] == "failed" for r in records.values()) == 1
    assert ray_run.failed == ["export:broken/fp32"]


def test_rerun_is_a_no_op(ray_run, plans, tmp_path):
    out = _copy(ray_run, tmp_path)
    engine = out / ray_run.records["build:tiny-31b/fp32/sm89"]["engine"]
    stamps = {p: p.stat().st_mtime_ns for p in [engine, *(out / "jobs").glob("*.attempts")]}
    again = run_matrix(plans["tiny"], out, executor="ray")
    for job in again.jobs:
        record = again.records[job.id]
        if job.resources.gpu:  # an engine validation, judged 'not executed' on these GPUs the first time
            assert record["status"] == "skipped" and record["reason"].startswith("not executed"), job.id
        else:
            assert record["status"] == "up-to-date", (job.id, record)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rebuilt, no job submitted
    assert [r["verdict"] for r in again.rows if r["target"] == "onnxruntime"] == ["passed"]


def test_ray_without_a_gpu_node_skips_full_tensorrt_targets_up_front(ray_cluster):
    from gemma4_compile.matrix.executors import RayExecutor
    from gemma4_compile.matrix.plan import Job, Resources

    ex = RayExecutor(Path("/nonexistent"), retries=0)
    sm90 = Job(
        "build:m/bf16/sm90",
        "build",
        (),
        ("m", "bf16", "sm90"),
        {"builder": "tensorrt"},
        Resources(gpu="sm90"),
    )
    sm89 = Job("validate:m/bf16/sm89", "validate", (), ("m", "bf16", "sm89"), {}, Resources(gpu="sm89"))
    assert ex.refusal(sm90) == "sm90 needs full TensorRT on an H100/H200 node; the Ray cluster has none"
    assert ex.refusal(sm89) is None and ex.accelerator("sm89") == "L4"
    assert ex.accelerator("sm120") == "GeForce-RTX-5090"


def _one_export_plan(plans: dict[str, Path], name: str, target: str, extra: str) -> Path:
    """The tiny plan cut to tiny-31b fp32 (up to date in a copy of a run), with `target` and `extra` TOML."""
    text = plans["tiny"].read_text().replace('targets = ["sm89", "sm120"]', f'targets = ["{target}"]')
    text = text.replace('[[checkpoints]]\npreset = "tiny-e2b"\n', "")
    assert text.count("[[checkpoints]]") == 1 and 'dtypes = ["fp32"]' in text
    plan = plans["root"] / f"{name}.toml"
    plan.write_text(text + "\n" + extra)
    return plan


def _kill_plan(plans: dict[str, Path], target: str) -> tuple[Path, str]:
    """One new target whose build kills its worker once."""
    killed = f"build:tiny-31b/fp32/{target}"
    return _one_export_plan(plans, f"kill-{target}", target, f'[testing]\nkill_once = ["{killed}"]\n'), killed


def _assert_survived(result, out: Path, killed: str, target: str) -> None:
    record = result.records[killed]
    assert record["status"] == "done" and record["attempts"] == 2
    engine_dir = out / "exports" / "tiny-31b-fp32" / "engines" / target
    assert (engine_dir / "manifest.json").is_file()
    assert not list(engine_dir.parent.glob(f".{target}.tmp.*"))  # the killed attempt's staging was cleaned up
    row = next(r for r in result.rows if r["target"] == target)
    assert row["attempts"] == 2 and row["status"] == "done"


def test_a_worker_killed_mid_build_is_survived(ray_run, plans, tmp_path):
    """A build whose worker is SIGKILLed after the engine is written and before its manifest: with no retry
    left it fails and leaves no engine that looks valid; with a retry, the same kill costs one attempt and the
    rerun (a resumed matrix: everything else up to date) finishes it."""
    out = _copy(ray_run, tmp_path)
    plan, killed = _kill_plan(plans, "sm86")
    first = run_matrix(plan, out, executor="ray", retries=0)
    assert first.records[killed]["status"] == "failed"
    assert first.records[killed]["reason"].startswith("worker died (")
    assert not (out / "exports" / "tiny-31b-fp32" / "engines" / "sm86" / "manifest.json").exists()
    assert first.records["export:tiny-31b/fp32"]["status"] == "up-to-date"

    (out / "jobs" / "build_tiny-31b_fp32_sm86.killed").unlink()  # arm the kill again
    second = run_matrix(plan, out, executor="ray", retries=1)
    _assert_survived(second, out, killed, "sm86")
    assert second.records["export:tiny-31b/fp32"]["status"] == "up-to-date"


def test_local_executor_retries_a_killed_child(local_run, plans, tmp_path):
    out = _copy(local_run, tmp_path)
    plan, killed = _kill_plan(plans, "sm80")
    result = run_matrix(plan, out, executor="local", retries=1)
    _assert_survived(result, out, killed, "sm80")


def test_bench_rows_carry_latency(local_run, plans, tmp_path):
    out = _copy(local_run, tmp_path)
    plan = _one_export_plan(plans, "bench", "sm89", "[bench]\nenabled = true\n")
    result = run_matrix(plan, out, executor="local")
    assert result.records["build:tiny-31b/fp32/sm89"]["status"] == "up-to-date"
    row = next(r for r in result.rows if r["target"] == "onnxruntime")
    assert row["decode_tok_s"] > 0 and row["prefill_ms"] > 0 and row["status"] == "done"
    assert (out / "reports" / "tiny-31b-fp32" / "reports" / "latency.json").is_file()
    engine = result.records["bench:tiny-31b/fp32/sm89"]
    assert engine["status"] == "skipped" and engine["reason"].startswith("not executed: needs a GPU of sm89")
