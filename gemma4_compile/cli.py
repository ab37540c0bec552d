"""`gemma4-compile`: parse, call one stage, print. Errors become one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .dtypes import DType
from .engines.profiles import DEFAULT_MAX_BATCH
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, Gemma4CompileError, UsageError, ValidationFailed
from .model.presets import DEFAULT_PRESET, PRESETS
from .model.vision_config import SOFT_TOKEN_BUDGETS
from .passes.lowerings import LOWERINGS
from .quant.formats import BLOCK_SIZES, KEPT_BY_DEFAULT, METHODS, OVERRIDABLE, QUANT_CHOICES, ROLES

console = Console(stderr=True)
out = Console()

TARGET_HELP = "GPU target: sm75..sm121, a GPU name (h100, l4, rtx4090, ...) or 'native'. Repeatable."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="gemma4-compile")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
@click.option(
    "--verbose", is_flag=True, help="Show third-party warnings (torch, transformers, onnx) [default: hidden]."
)
def cli(debug: bool, verbose: bool) -> None:
    """Compile Gemma 4 checkpoints to ONNX and TensorRT engines, with proof they compute what PyTorch computes.

    \b
    Pipeline:  export -> build (TensorRT, per GPU target) -> validate -> bench
               `compile` runs all of it; `init-random` makes test checkpoints.
    """
    third_party_output(verbose)


THIRD_PARTY = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "onnxruntime", "triton", "tensorrt")


def third_party_output(verbose: bool) -> None:
    """Hide other libraries' warnings and log lines (torch.onnx's "Skipping torchvision::nms", transformers'
    notices) unless --verbose; our own log lines and errors are unaffected."""
    level = logging.WARNING if verbose else logging.ERROR
    if not verbose:
        for var, value in (("TORCH_LOGS", "-onnx"), ("TRANSFORMERS_VERBOSITY", "error")):
            if not os.environ.get(var):  # torch resets its loggers' levels when it is imported
                os.environ[var] = value
        warnings.filterwarnings("ignore", module="|".join(rf"{m}(\.|$)" for m in THIRD_PARTY))
    for name in ("torch.onnx", "transformers", "onnxscript", "onnx_ir"):  # those imported already
        logging.getLogger(name).setLevel(level)


# ----- checkpoints --------------------------------------------------------------------------------


@cli.command("init-random")
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, type=click.Choice(list(PRESETS)))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Checkpoint directory."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp32"]))
@click.option(
    "--max-shard-size", default="2GiB", show_default=True, help="Shard above this size (e.g. 500MB, 2GiB)."
)
@click.option(
    "--text-only",
    is_flag=True,
    help="Write a gemma4_text config with 'model.' names and no vision or audio tower instead of the released layout.",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def init_random(
    preset: str, output: Path, seed: int, dtype: str, max_shard_size: str, text_only: bool, force: bool
) -> None:
    """Write a random-weight checkpoint in the released Hugging Face layout (deterministic for a seed)."""

    from .fsutil import check_output_path
    from .model.checkpoint import write_random_checkpoint
    from .model.presets import AUDIO_PRESETS, VISION_PRESETS

    check_output_path(output, error=UsageError)  # before the writer looks inside it

    info = write_random_checkpoint(
        PRESETS[preset],
        output,
        seed=seed,
        dtype=DType.parse(dtype).torch,
        max_shard_bytes=_parse_size(max_shard_size),
        multimodal=not text_only,
        vision=None if text_only else VISION_PRESETS[preset],
        audio=None if text_only else AUDIO_PRESETS.get(preset),  # E2B / E4B only
        force=force,
    )
    out.print(
        f"wrote {info.path}: {preset}, {info.num_tensors} tensors, {info.total_bytes / 2**20:.1f} MiB in {len(info.files)} file(s)"
    )


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num) :]])
    except (ValueError, KeyError):
        raise UsageError(f"cannot read size {text!r} (examples: 500MB, 2GiB)") from None
    if value <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return value


_QUANT_OPTIONS = [
    click.option(
        "--quant",
        default="none",
        show_default=True,
        type=click.Choice(QUANT_CHOICES),
        help="Weight-only quantization, symmetric per block. int4/int8 with --dtype fp32: onnxruntime's "
        "MatMulNBits; otherwise DequantizeLinear for TensorRT (fp8: sm89+, nvfp4: sm120+). The LM head goes int8.",
    ),
    click.option(
        "--block-size",
        type=click.Choice([str(b) for b in BLOCK_SIZES]),
        help="Quantization block along each weight's input dimension [default: 32; fp8 128; nvfp4 is fixed at 16].",
    ),
    click.option(
        "--quant-method",
        default="rtn",
        show_default=True,
        type=click.Choice(METHODS),
        help="int4/int8 scales: rtn = absmax per block; mse = per block the scale (absmax x 0.7..1) with the "
        "least squared error (no calibration data; slower export).",
    ),
    click.option(
        "--quant-keep",
        multiple=True,
        type=click.Choice(ROLES),
        help=f"Leave this role in --dtype (repeatable). Always kept: {', '.join(KEPT_BY_DEFAULT)}.",
    ),
    click.option(
        "--quant-override",
        multiple=True,
        metavar="ROLE=FORMAT",
        help=f"Give one role its own format (repeatable), e.g. lm_head=int4. Roles: {', '.join(OVERRIDABLE)}.",
    ),
    click.option(
        "--accuracy-level",
        default=0,
        show_default=True,
        type=click.IntRange(0, 4),
        help="MatMulNBits accuracy_level: 0 keeps fp32 activations (what validate checks); 4 uses int8 activations "
        "(faster on CPU, not exact).",
    ),
]


def quant_options(command):
    """export's and inspect's --quant, --block-size, --quant-keep, --quant-override, --accuracy-level."""
    for option in reversed(_QUANT_OPTIONS):
        command = option(command)
    return command


def _quant_request(
    quant: str,
    block_size: str | None,
    quant_method: str,
    quant_keep: tuple[str, ...],
    quant_override: tuple[str, ...],
    accuracy_level: int,
):
    """The QuantRequest the options ask for; bad overrides are one-line errors."""
    from .quant.formats import QuantRequest, parse_override

    if quant_override and quant == "none":
        raise UsageError("--quant-override needs --quant")
    overrides = tuple(parse_override(o) for o in quant_override)
    block = int(block_size) if block_size else None
    return QuantRequest(quant, block, quant_keep, accuracy_level, overrides, quant_method)


@cli.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Inspect a preset instead of a directory.")
@click.option(
    "--dtype",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "fp16", "bf16"]),
    help="The export dtype --quant sizes are for.",
)
@quant_options
def inspect(path: Path | None, preset: str | None, dtype: str, **quant: Any) -> None:
    """Show the spec and per-layer plan of a checkpoint, an export (export.json) or a preset; with --quant, or for
    a pre-quantized checkpoint, what each weight role would weigh in that export, before any work."""
    from .export.manifest import MANIFEST, ExportManifest
    from .model.config import Gemma4Spec
    from .quant.sizes import plan_sizes

    manifest, checkpoint = None, None
    if preset:
        spec = PRESETS[preset]
    elif path is None:
        raise UsageError("give a checkpoint or export directory, or --preset")
    elif (path / MANIFEST).is_file():
        manifest = ExportManifest.load(path)
        spec = manifest.spec
    else:
        spec, checkpoint = Gemma4Spec.from_pretrained(path), path
    plan = plan_sizes(spec, _quant_request(**quant), dtype, checkpoint)  # refusals before any output
    if manifest is not None:
        _print_export(manifest)
    _print_spec(spec)
    if plan is not None:
        _print_quant_sizes(plan)


def _print_quant_sizes(plan) -> None:
    table = Table(title=plan.title)
    for col in ("role", "format", "tensors", "params", f"{plan.dtype} MiB", "exported MiB"):
        table.add_column(col, justify="right")
    for r in plan.rows:
        table.add_row(r.role, r.format, str(r.tensors), f"{r.params:,}", _mib(r.before), _mib(r.after))
    before, after = sum(r.before for r in plan.rows), sum(r.after for r in plan.rows)
    params = sum(r.params for r in plan.rows if r.role != "lm_head")  # the tied embedding counts once
    table.add_row("total", "", "", f"{params:,}", _mib(before), _mib(after))
    out.print(table)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _print_spec(spec) -> None:
    table = Table(
        title=f"{spec.num_hidden_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}, "
        f"window {spec.sliding_window}, PLE {spec.hidden_size_per_layer_input}, "
        f"MoE {spec.num_experts or 0}/{spec.top_k_experts or 0}"
    )
    for col in ("layer", "kind", "head_dim", "kv_heads", "v_proj", "kv_from", "cache", "mlp", "moe"):
        table.add_column(col, justify="right")
    for p in spec.layers:
        table.add_row(
            str(p.index),
            p.kind,
            str(p.head_dim),
            str(p.num_kv_heads),
            "yes" if p.has_v_proj else "K=V",
            "-" if p.kv_producer is None else str(p.kv_producer),
            "-" if p.cache_index is None else str(p.cache_index),
            str(p.mlp_width),
            "yes" if p.moe else "-",
        )
    out.print(table)


def _print_export(manifest) -> None:
    table = Table(
        title=f"export {manifest.path} ({manifest.dtype}, opset {manifest.opset}, max_seq_len {manifest.max_seq_len})"
    )
    for col in ("graph", "tensor", "dtype", "shape"):
        table.add_column(col)
    for gname, g in manifest.graphs.items():
        for kind, tensors in (("in", g.inputs), ("out", g.outputs)):
            for t in tensors:
                table.add_row(f"{gname} {kind}", t.name, t.dtype, str(list(t.shape)))
    out.print(table)


# ----- stages ---------------------------------------------------------------------------------------


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Export directory."
)
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option(
    "--max-seq-len", type=int, help="Longest sequence the caches must hold [default: the config's]."
)
@click.option("--debug-outputs", is_flag=True, help="Add per-layer hidden states / router logits as outputs.")
@click.option(
    "--lowering",
    type=click.Choice(list(LOWERINGS)),
    help="; ".join(f"{n}: {lw.description}" for n, lw in LOWERINGS.items()),
)
@quant_options
@click.option(
    "--modalities",
    default=None,
    help="Comma-separated graphs to export: text,vision,audio [default: every tower the checkpoint has].",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def export(
    checkpoint: Path,
    output: Path,
    dtype: str,
    max_seq_len: int | None,
    debug_outputs: bool,
    lowering: str | None,
    quant: str,
    block_size: str | None,
    quant_method: str,
    quant_keep: tuple[str, ...],
    quant_override: tuple[str, ...],
    accuracy_level: int,
    modalities: str | None,
    force: bool,
) -> None:
    """Export a checkpoint to ONNX: embed.onnx, decoder.onnx (gemma4 custom nodes), weights.data, export.json;
    vision.onnx / audio.onnx for the towers the checkpoint has (--modalities)."""
    from .export import export_checkpoint

    _check_max_seq_len(checkpoint, max_seq_len)
    request = _quant_request(quant, block_size, quant_method, quant_keep, quant_override, accuracy_level)

    with console.status("exporting") as status:
        result = export_checkpoint(
            checkpoint,
            output,
            dtype=dtype,
            max_seq_len=max_seq_len,
            force=force,
            debug=debug_outputs,
            lowering=lowering,
            progress=lambda stage: status.update(f"export: {stage}"),
            quant=request,
            modalities=modalities.split(",") if modalities else None,
        )
    m = result.manifest
    weights = (
        f", weights {m.weight_format} b{m.quant.block_of(m.quant.format)}" if m.quant is not None else ""
    )
    out.print(
        f"exported {m.spec.num_hidden_layers} layers ({m.dtype}{weights}) to {result.path}: "
        f"{len(m.custom_nodes)} gemma4 nodes, {len(m.caches)} caches"
    )


def _check_max_seq_len(checkpoint: Path, max_seq_len: int | None) -> None:
    """--max-seq-len within what the checkpoint's RoPE and int32 shapes allow, before any work."""
    if max_seq_len is None:
        return
    from .model.config import Gemma4Spec, check_max_seq_len

    problem = check_max_seq_len(Gemma4Spec.from_pretrained(checkpoint), max_seq_len)
    if problem:
        raise UsageError(problem)


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, required=True, help=TARGET_HELP)
@click.option(
    "--plugins", is_flag=True, help="Register the gemma4 TensorRT plugins (else function bodies are inlined)."
)
@click.option(
    "--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="Builder optimization level."
)
@click.option("--max-batch", default=DEFAULT_MAX_BATCH, show_default=True, type=int)
@click.option(
    "--max-seq", type=int, help="Largest prefill / cache length in the profiles [default: the export's]."
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    type=click.Choice(["prefill", "decode"]),
    default=("prefill", "decode"),
    show_default=True,
    help="Optimization profiles to build (decode-only engines need far less build memory).",
)
@click.option(
    "--flavour",
    type=click.Choice(["tensorrt", "tensorrt_rtx"]),
    help="Force a TensorRT flavour [default: full TensorRT on its own GPU, else TensorRT-RTX ahead of time].",
)
@click.option("--force", is_flag=True, help="Rebuild even when an up-to-date engine exists.")
@click.option(
    "--graphs",
    help="Comma-separated graphs to build engines for (decoder,embed,vision,audio) [default: all the export has].",
)
@click.option(
    "--max-images",
    type=click.IntRange(1),
    help="Images per vision call [default: the export's max_images, 8].",
)
@click.option(
    "--max-image-tokens",
    type=click.IntRange(1),
    help="Soft tokens per image (x9 patches) [default: the vision default_output_length, 280].",
)
@click.option(
    "--max-clips", default=1, show_default=True, type=click.IntRange(1), help="Audio clips per call."
)
def build(
    export_dir: Path,
    targets: tuple[str, ...],
    plugins: bool,
    opt_level: int,
    max_batch: int,
    max_seq: int | None,
    profiles: tuple[str, ...],
    flavour: str | None,
    force: bool,
    graphs: str | None,
    max_images: int | None,
    max_image_tokens: int | None,
    max_clips: int,
) -> None:
    """Build a TensorRT engine per graph and GPU target from an export (TensorRT or TensorRT-RTX)."""
    from .engines import BuildOptions, build_engines

    options = BuildOptions(
        plugins=plugins,
        opt_level=opt_level,
        max_batch=max_batch,
        max_seq=max_seq,
        profiles=profiles,
        flavour=flavour,
        force=force,
        graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()) if graphs is not None else None,
        max_images=max_images,
        max_image_tokens=max_image_tokens,
        max_clips=max_clips,
    )
    for art in build_engines(export_dir, list(targets), options):
        for line in engine_lines(art):
            out.print(line)


def engine_lines(art) -> list[str]:
    """One line per engine of a target's build: graph, target, size, build seconds, device memory."""
    from .validate.report import device_memory_text

    verb = "reused" if art.reused else "built"
    lines = []
    for role, g in art.manifest.graphs.items():
        size = art.manifest.files[g.engine_file]["bytes"] / 2**20
        memory = device_memory_text(g.device_memory)
        lines.append(
            f"{verb} {role} {art.target}: {art.engine_paths[role]} ({size:.1f} MiB, {g.build_seconds:.1f} s "
            f"build, {memory})"
        )
    return lines


@cli.command()
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(path_type=Path),
    help="Kernel directory; use OUT/kernels so `build` fingerprints the kernels into engine manifests.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    default=("sm80", "sm86", "sm89", "sm90", "sm100", "sm120"),
    show_default=True,
    help=TARGET_HELP,
)
def kernels(output: Path, targets: tuple[str, ...]) -> None:
    """Compile every Triton kernel variant to PTX/cubin per target and write the resource table (kernels.json)."""
    from .plugins.aot import compile_kernels, kernel_table_markdown

    with console.status("compiling kernels"):
        artifacts = compile_kernels(output, list(targets))
    click.echo(kernel_table_markdown(artifacts))


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]))
@click.option("--reference", default="torch", show_default=True, type=click.Choice(["torch", "hf"]))
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="Reference checkpoint [default: the export's source].",
)
@click.option("--prompts", type=click.Path(path_type=Path), help="JSON file of token-id prompts.")
@click.option("--steps", type=int, help="Greedy decode steps per case.")
@click.option(
    "--quality-gate",
    is_flag=True,
    help="Quantized exports: also fail when KL / top-1 against the unquantized model miss the format's "
    "thresholds (docs/export-format.md); always reported.",
)
@click.option(
    "--text",
    type=click.Path(path_type=Path),
    help="UTF-8 text file: report its perplexity (backend, reference, and the unquantized model of a "
    "quantized export; the ratio is gated with --quality-gate).",
)
@click.option("--target", help="Engine target for --backend trt.")
def validate(
    export_dir: Path,
    backend: str,
    reference: str,
    checkpoint: Path | None,
    prompts: Path | None,
    steps: int | None,
    quality_gate: bool,
    text: Path | None,
    target: str | None,
) -> None:
    """Compare a backend with the PyTorch reference; write reports; exit non-zero if any case fails."""
    from .validate import validate as run_validate

    _check_steps(export_dir, steps)

    report = run_validate(
        export_dir,
        backend=backend,
        reference=reference,
        checkpoint=checkpoint,
        prompts=prompts,
        steps=steps,
        target=target,
        quality_gate=quality_gate,
        text=text,
    )
    click.echo(report.summary())
    if not report.passed:
        raise ValidationFailed(report.failure_message())


def _check_steps(export_dir: Path, steps: int | None) -> None:
    """--steps leaves room for a prompt in the export's max_seq_len."""
    if steps is None:
        return
    from .export.manifest import ExportManifest

    limit = ExportManifest.load(export_dir).max_seq_len - 1
    if not 1 <= steps <= limit:
        raise UsageError(
            f"--steps must be in [1, {limit}] (the export's max_seq_len is {limit + 1}), got {steps}"
        )


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    "backends",
    multiple=True,
    default=("ort",),
    show_default=True,
    type=click.Choice(["ort", "trt"]),
)
@click.option(
    "--checkpoint",
    type=click.Path(path_type=Path),
    help="Checkpoint for the PyTorch baselines [default: the export's source].",
)
@click.option("--target", help="Engine target for --backend trt.")
def bench(export_dir: Path, backends: tuple[str, ...], checkpoint: Path | None, target: str | None) -> None:
    """Latency: prefill by length, decode p50/p90/p99 by context, tokens/s, TTFT, memory; vs PyTorch eager."""
    from .validate import bench as run_bench

    report = run_bench(export_dir, backends=list(backends), checkpoint=checkpoint, target=target)
    click.echo(report.summary())


@cli.command("compile")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help=TARGET_HELP + " Engines are built where a TensorRT can build them.",
)
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]))
@click.option(
    "--preset",
    default=DEFAULT_PRESET,
    show_default=True,
    type=click.Choice(list(PRESETS)),
    help="Built-in random-weight model used when no CHECKPOINT is given.",
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def compile_(
    checkpoint: Path | None, output: Path, targets: tuple[str, ...], dtype: str, preset: str, force: bool
) -> None:
    """export -> build -> validate -> bench -> summary (the built-in tiny model when no CHECKPOINT is given)."""
    from .pipeline import run_pipeline

    result = run_pipeline(checkpoint, output, targets=list(targets), dtype=dtype, preset=preset, force=force)
    click.echo(result.summary_path.read_text())
    if not result.passed:
        raise ValidationFailed(f"validation failed; see {result.summary_path}")


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option("--executor", default="local", show_default=True, type=click.Choice(["local", "ray"]))
@click.option("--address", help="Ray cluster address for --executor ray (e.g. ray://head:10001).")
@click.option("--concurrency", type=click.IntRange(min=1), help="Jobs at a time for --executor local.")
@click.option("--retries", type=click.IntRange(min=0), help="Retries of a job whose worker died.")
def matrix(
    plan: Path, output: Path, executor: str, address: str | None, concurrency: int | None, retries: int | None
) -> None:
    """Every (checkpoint, precision, target) of a plan file: exports, builds, validations -> OUT/index.md."""
    from .matrix import run_matrix
    from .matrix.index import TERMINAL_COLUMNS, cell

    def progress(job, record) -> None:
        why = f": {record['reason']}" if record.get("reason") else ""
        console.print(f"{record['status']:>10}  {job.id}{why}", markup=False, highlight=False)

    result = run_matrix(
        plan,
        output,
        executor=executor,
        address=address,
        concurrency=concurrency,
        retries=retries,
        on_record=progress,
    )
    table = Table(title=f"{result.out / 'index.md'}")
    for _, title in TERMINAL_COLUMNS:
        table.add_column(title, overflow="fold")
    for row in result.rows:
        table.add_row(*(cell(row, key) for key, _ in TERMINAL_COLUMNS))
    out.print(table)
    if result.failed:
        raise Gemma4CompileError(
            f"{len(result.failed)} of {len(result.jobs)} jobs failed (first: {result.failed[0]}); "
            f"see {result.out / 'index.md'}"
        )
    if result.failed_validations:
        row = result.failed_validations[0]
        raise ValidationFailed(f"{row['model']} {row['precision']} {row['target']}: {row['reason']}")


# ----- run an export ------------------------------------------------------------------------------


def _onnxruntime_options(command: Callable) -> Callable:
    """--provider and --threads, as generate and serve take them."""
    command = click.option(
        "--threads", default=None, type=click.IntRange(min=1), help="onnxruntime intra-op threads."
    )(command)
    return click.option(
        "--provider",
        default="cpu",
        show_default=True,
        type=click.Choice(["cpu", "cuda"]),
        help="onnxruntime provider.",
    )(command)


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue (with --chat: the user's message).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the export's chat template as a user turn.")
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="An image for the prompt (repeatable; exports with vision.onnx). The prompt marks where each goes "
    "with <|image|>; without markers the images come first.",
)
@click.option(
    "--image-budget",
    default=None,
    type=click.Choice([str(b) for b in SOFT_TOKEN_BUDGETS]),
    help="Soft tokens per image the resize aims for.  [default: the tower's, 280]",
)
@click.option(
    "--audio",
    "audio",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A 16 kHz mono WAV clip (PCM16 or float32, at most 30 s) for the prompt (repeatable; E2B/E4B "
    "exports). The prompt marks where each goes with <|audio|>; without markers the clips come first.",
)
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]))
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 is greedy."
)
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: no top-k filter.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible output).")
@click.option(
    "--low-memory",
    is_flag=True,
    help="onnxruntime without its memory arena, freed buffers returned to the system, the prompt prefilled "
    "8 tokens per call: the edge recipe (README). [default: off]",
)
@_onnxruntime_options
def generate(
    export_dir: Path,
    prompt: str,
    chat: bool,
    images: tuple[Path, ...],
    image_budget: str | None,
    audio: tuple[Path, ...],
    backend: str,
    provider: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    low_memory: bool,
    threads: int | None,
) -> None:
    """Stream generated text to stdout; stops at eos / end-of-turn. Speed goes to stderr."""
    from .runtime import SamplingParams
    from .runtime.commands import generate_text

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    params = SamplingParams(temperature, top_k, top_p, seed)
    result = generate_text(
        export_dir,
        prompt,
        write,
        chat=chat,
        max_new_tokens=max_new_tokens,
        params=params,
        backend=backend,
        provider=provider,
        threads=threads,
        images=images,
        image_budget=int(image_budget) if image_budget else None,
        audio=audio,
        low_memory=low_memory,
    )
    sys.stdout.write("\n")
    console.print(
        f"{len(result.tokens)} tokens ({result.finish_reason}), time to first token "
        f"{result.ttft_s * 1e3:.1f} ms, {result.tokens_per_s:.1f} tokens/s",
        markup=False,
        highlight=False,
    )


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Rows per decode step."
)
@_onnxruntime_options
def serve(export_dir: Path, host: str, port: int, max_batch: int, provider: str, threads: int | None) -> None:
    """OpenAI-compatible chat completions (/v1/chat/completions, /v1/models, /health), batching requests."""
    from .runtime.commands import serve_export

    serve_export(
        export_dir,
        host=host,
        port=port,
        max_batch=max_batch,
        provider=provider,
        threads=threads,
        announce=lambda line: console.print(line, markup=False, highlight=False),
    )


# ----- --help states every default ------------------------------------------------------------------

# Options whose default is computed or absent, in words (command, option name) -> help suffix.
DEFAULT_WORDS = {
    ("validate", "prompts"): "[default: the built-in cases]",
    ("validate", "steps"): "[default: 16]",  # validate.cases.DEFAULT_STEPS (importing it would import torch)
    ("validate", "target"): "[default: native]",
    ("bench", "target"): "[default: native]",
    ("compile", "targets"): "[default: the first target an installed TensorRT can build, else none]",
    ("compile", "checkpoint"): "[default: the --preset model]",
    ("matrix", "address"): "[default: a local Ray cluster for this run]",
    ("matrix", "concurrency"): "[default: the plan's run.concurrency]",
    ("matrix", "retries"): "[default: the plan's run.retries]",
    ("generate", "seed"): "[default: random]",
    ("generate", "threads"): "[default: onnxruntime's choice]",
    ("serve", "threads"): "[default: onnxruntime's choice]",
    ("inspect", "preset"): "[default: none: inspect PATH]",
    ("export", "lowering"): "[default: none: the standard graphs]",
}


def state_defaults(group: click.Group) -> None:
    """Append its default to every option whose help does not state one: flags are off, required options say so,
    the rest come from DEFAULT_WORDS (or 'none')."""
    for name, command in group.commands.items():
        for param in command.params:
            if not isinstance(param, click.Option) or param.hidden or param.name == "help":
                continue
            help_ = param.help or ""
            if "default:" in help_ or (param.show_default and param.default is not None):
                continue
            if param.required:
                suffix = "[required]"
            elif param.is_flag:
                suffix = "[default: off]"
            else:
                suffix = DEFAULT_WORDS.get((name, param.name), "[default: none]")
            param.help = f"{help_} {suffix}".strip()


state_defaults(cli)


# ----- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="gemma4-compile", standalone_mode=False)
        return EXIT_OK
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # a usage error is bad input: the same exit code as any other
        console.print(f"error: {e.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except (
        click.exceptions.Abort
    ) as e:  # click turns Ctrl-C into Abort (after a blank line ending the ^C echo)
        if isinstance(e.__cause__, KeyboardInterrupt):
            return _interrupted()
        console.print("error: aborted (end of input)", markup=False)
        return EXIT_ERROR
    except Gemma4CompileError as e:
        if debug:
            raise
        console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except (
        OSError
    ) as e:  # the file system refused (read-only, full, a file where a directory goes): not a bug
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"error: {where}{e.strerror or e}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_ERROR
    except KeyboardInterrupt:  # outputs are built beside their final path, so the previous ones are intact
        return _interrupted()
    except Exception as e:  # an internal bug: still one line, the traceback only on request
        if debug:
            raise
        console.print(
            f"error: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_ERROR


def _interrupted() -> int:
    """One line and exit 130; a second Ctrl-C while the interpreter shuts down must not turn that into a death by
    SIGINT (-2), which a CI run once saw after the line was printed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    console.print("error: interrupted", markup=False)
    return EXIT_INTERRUPTED


def entry() -> None:
    """The process entry (console script, `python -m`): main()'s code as the exit status. After Ctrl-C it leaves
    with os._exit once the streams are flushed: even with SIGINT ignored, interpreter shutdown (torch's threads,
    atexit) turned exit 130 into a death by SIGINT (-2) in two CI runs. Cleanup has run by then (main's
    finally blocks); in-process callers of main() are unaffected."""
    code = main()
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
