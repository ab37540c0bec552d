"""`gemma4-compile compile`: export -> build -> validate -> bench -> summary, one rich progress line per stage.

Without a checkpoint it first writes the built-in tiny random-weight model (fp32, so validation is tight).
A stage that cannot run on this machine (no TensorRT for a target, no GPU for the engine runner) is recorded
in the summary with its reason; a stage that runs and fails stops the pipeline with its error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .errors import BackendUnavailable, BuildError, Gemma4CompileError, UsageError
from .fsutil import check_output_path, check_replaceable, output_lock, write_marker


@dataclass
class PipelineResult:
    out_dir: Path
    summary_path: Path
    passed: bool
    notes: list[str] = field(default_factory=list)


def run_pipeline(
    checkpoint: Path | None,
    out_dir: Path,
    *,
    targets: list[str] | None = None,
    dtype: str = "fp32",
    preset: str = "tiny-e2b",
    force: bool = False,
    console: Console | None = None,
) -> PipelineResult:
    """Run every stage into `out_dir` (refused if it is the checkpoint or holds it, if another run writes it, or
    if it exists and is not a compile output this project wrote, or without `force`)."""
    out_dir = Path(out_dir)
    check_targets(targets or [])
    check_output_path(out_dir, [checkpoint] if checkpoint else [], UsageError)
    with output_lock(out_dir, UsageError):
        check_replaceable(out_dir, force, UsageError)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_marker(out_dir, "compile")  # first: --force may later replace what this run leaves
        return _run(checkpoint, out_dir, targets, dtype, preset, console)


def check_targets(targets: list[str]) -> None:
    """Unknown target names fail before the export starts, not after it ('native' depends on the GPU here: a
    machine without one records the build as skipped, as for a target no installed TensorRT can build)."""
    from .targets import resolve_target

    for name in targets:
        if name.strip().lower() != "native":
            try:
                resolve_target(name)
            except Gemma4CompileError as e:
                raise UsageError(str(e)) from None


def _run(
    checkpoint: Path | None,
    out_dir: Path,
    targets: list[str] | None,
    dtype: str,
    preset: str,
    console: Console | None,
) -> PipelineResult:
    notes: list[str] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:

        def stage(name: str):
            return progress.add_task(name, total=1)

        def done(task, text: str) -> None:
            progress.update(task, completed=1, description=text)

        if checkpoint is None:
            task = stage(f"checkpoint: writing random {preset}")
            checkpoint = _default_checkpoint(out_dir / "checkpoint", preset)
            done(task, f"checkpoint: {preset} (random weights) -> {checkpoint}")
        task = stage("export")
        export_dir = _export(
            checkpoint, out_dir / "export", dtype, lambda s: progress.update(task, description=f"export: {s}")
        )
        done(task, f"export: {export_dir}")

        task = stage("build")
        engine_note = _build(export_dir, targets)
        notes.append(engine_note)
        done(task, f"build: {engine_note}")

        task = stage("validate (onnxruntime vs PyTorch)")
        from .validate import bench, validate

        accuracy = validate(
            export_dir, backend="ort", reference="torch", checkpoint=checkpoint, out_dir=out_dir
        )
        done(task, f"validate: {'passed' if accuracy.passed else 'FAILED'}")

        task = stage("bench")
        bench(export_dir, backends=["ort"], checkpoint=checkpoint, out_dir=out_dir)
        done(task, "bench: done")
    summary = out_dir / "reports" / "summary.md"
    _append_notes(summary, notes)
    return PipelineResult(out_dir, summary, accuracy.passed, notes)


def _default_checkpoint(path: Path, preset: str) -> Path:
    import torch

    from .model.checkpoint import write_random_checkpoint
    from .model.presets import PRESETS

    write_random_checkpoint(PRESETS[preset], path, seed=0, dtype=torch.float32, force=True)
    return path


def _export(checkpoint: Path, out: Path, dtype: str, progress) -> Path:
    from .export import export_checkpoint

    return export_checkpoint(
        checkpoint, out, dtype=dtype, force=True, max_seq_len=512, progress=progress
    ).path


def _build(export_dir: Path, targets: list[str] | None) -> str:
    """Build engines where an installed TensorRT can; otherwise say why not."""
    from .engines import build_engines, list_targets

    try:
        buildable = [s.target.name for s in list_targets() if s.builder]
        chosen = list(targets) if targets else sorted(buildable, key=lambda t: t != "sm89")[:1]
        if not chosen:
            return "skipped (no TensorRT or TensorRT-RTX installed: pip install 'gemma4-compile[rtx]')"
        built = build_engines(export_dir, chosen, force=True, progress=False)
    except (BuildError, BackendUnavailable) as e:
        return f"skipped ({e})"
    return ", ".join(f"{a.target} -> {a.engine_path}" for a in built)


def _append_notes(summary: Path, notes: list[str]) -> None:
    if summary.is_file():
        text = (
            summary.read_text().rstrip()
            + "\n\n## Build stage\n\n"
            + "\n".join(f"- {n}" for n in notes)
            + "\n"
        )
        summary.write_text(text)
