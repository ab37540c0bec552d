"""A matrix plan (TOML, docs/matrix.md) -> a typed `Plan` -> `Job`s with explicit dependency edges.

Expansion: one `checkpoint` job per preset checkpoint (random weights written once, shared by its exports), one
`export` per (checkpoint, dtype, weight format), then per export one `build` per target and the validations and
benches that read it. Every path in a job is relative to the output directory, which every node sees at the same
path (a shared directory, docs/matrix.md "Artifacts").
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import FLOAT_CHOICES
from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

CPU_BUILDER, GPU_BUILDER = "tensorrt_rtx", "tensorrt"  # ahead of time on a CPU node / on a GPU of the target
MODALITIES = ("text", "vision")
QUANTS = ("none", "int4", "int8")
GIB = 1 << 30


# ----- the plan ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSpec:
    name: str  # the model column of the index
    preset: str | None = None  # a random-weight preset, written by a checkpoint job
    path: Path | None = None  # or an existing Hugging Face checkpoint directory
    seed: int = 0


@dataclass(frozen=True)
class Plan:
    source: Path
    checkpoints: tuple[CheckpointSpec, ...]
    dtypes: tuple[str, ...] = ("bf16",)
    quant: tuple[str, ...] = ("none",)
    modalities: tuple[str, ...] = ("text",)
    max_seq_len: int | None = None
    targets: tuple[str, ...] = ()
    builder: str = "auto"  # auto | tensorrt_rtx | tensorrt
    max_batch: int = 1
    opt_level: int = 3
    plugins: bool = False
    validate: bool = True
    validate_steps: int | None = None
    validate_engines: bool = True
    bench: bool = False
    retries: int = 2
    concurrency: int = 2
    testing: dict[str, Any] = field(default_factory=dict)  # test-only hooks (docs/matrix.md, "Testing hooks")


SECTIONS: dict[str, set[str]] = {
    "checkpoints": set(),
    "export": {"dtypes", "quant", "modalities", "max_seq_len"},
    "build": {"targets", "builder", "max_batch", "opt_level", "plugins"},
    "validate": {"enabled", "steps", "engines"},
    "bench": {"enabled"},
    "run": {"retries", "concurrency"},
    "testing": {"kill_once"},
}


def load_plan(path: str | Path) -> Plan:
    """Parse and check a plan file; every mistake is one UsageError naming the file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read plan {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    return _PlanReader(path, data).plan()


class _PlanReader:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    def fail(self, key: str, message: str) -> UsageError:
        return UsageError(f"{self.path}: {key}: {message}")

    def section(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, "expected a table")
        unknown = sorted(set(value) - SECTIONS[name])
        if unknown:
            raise self.fail(
                f"{name}.{unknown[0]}", f"unknown key; known: {', '.join(sorted(SECTIONS[name]))}"
            )
        return value

    def get(self, section: str, key: str, kind: type, default: Any) -> Any:
        value = self.section(section).get(key, default)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if value is not default and not ok:
            raise self.fail(f"{section}.{key}", f"expected {kind.__name__}, got {value!r}")
        return value

    def choices(self, section: str, key: str, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple:
        values = self.get(section, key, list, list(default))
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise self.fail(
                f"{section}.{key}", f"expected a non-empty list from {', '.join(allowed)}, got {values!r}"
            )
        return tuple(dict.fromkeys(values))

    def plan(self) -> Plan:
        unknown = sorted(set(self.data) - set(SECTIONS))
        if unknown:
            raise self.fail(unknown[0], f"unknown section; known: {', '.join(SECTIONS)}")
        kill_once = self.get("testing", "kill_once", list, [])
        if not all(isinstance(i, str) for i in kill_once):
            raise self.fail("testing.kill_once", f"expected a list of job ids, got {kill_once!r}")
        return Plan(
            source=self.path,
            checkpoints=self.checkpoints(),
            dtypes=self.choices("export", "dtypes", FLOAT_CHOICES, ("bf16",)),
            quant=self.choices("export", "quant", QUANTS, ("none",)),
            modalities=self.modalities(),
            max_seq_len=self.positive("export", "max_seq_len", None),
            targets=self.targets(),
            builder=self.builder(),
            max_batch=self.positive("build", "max_batch", 1),
            opt_level=self.opt_level(),
            plugins=self.get("build", "plugins", bool, False),
            validate=self.get("validate", "enabled", bool, True),
            validate_steps=self.positive("validate", "steps", None),
            validate_engines=self.get("validate", "engines", bool, True),
            bench=self.get("bench", "enabled", bool, False),
            retries=self.retries(),
            concurrency=self.positive("run", "concurrency", 2),
            testing=dict(self.section("testing")),
        )

    def positive(self, section: str, key: str, default: int | None) -> int | None:
        value = self.get(section, key, int, default)
        if value is not None and value < 1:
            raise self.fail(f"{section}.{key}", f"expected a positive integer, got {value}")
        return value

    def opt_level(self) -> int:
        value = self.get("build", "opt_level", int, 3)
        if not 0 <= value <= 5:
            raise self.fail(
                "build.opt_level", f"expected 0..5 (TensorRT's builder optimization level), got {value}"
            )
        return value

    def retries(self) -> int:
        value = self.get("run", "retries", int, 2)
        if value < 0:
            raise self.fail("run.retries", f"expected 0 or more, got {value}")
        return value

    def modalities(self) -> tuple[str, ...]:
        values = self.choices("export", "modalities", MODALITIES, ("text",))
        if "text" not in values:
            raise self.fail("export.modalities", "'text' is required (the decoder is the text model)")
        return values

    def builder(self) -> str:
        value = self.get("build", "builder", str, "auto")
        if value not in ("auto", CPU_BUILDER, GPU_BUILDER):
            raise self.fail("build.builder", f"expected auto, {CPU_BUILDER} or {GPU_BUILDER}, got {value!r}")
        return value

    def targets(self) -> tuple[str, ...]:
        from ..targets import resolve_target

        names = self.get("build", "targets", list, [])
        out = []
        for name in names:
            if not isinstance(name, str) or name.strip().lower() == "native":
                raise self.fail("build.targets", f"expected SM or GPU names (not 'native'), got {name!r}")
            try:
                out.append(resolve_target(name).name)
            except Exception as e:  # Gemma4CompileError: unknown target, with the known list
                raise self.fail("build.targets", str(e)) from None
        return tuple(dict.fromkeys(out))

    def checkpoints(self) -> tuple[CheckpointSpec, ...]:
        from ..model.presets import PRESETS

        entries = self.data.get("checkpoints")
        if not isinstance(entries, list) or not entries:
            raise self.fail(
                "checkpoints", "expected at least one [[checkpoints]] entry with a preset or a path"
            )
        out: list[CheckpointSpec] = []
        for i, entry in enumerate(entries):
            key = f"checkpoints[{i}]"
            unknown = (
                sorted(set(entry) - {"name", "preset", "path", "seed"}) if isinstance(entry, dict) else []
            )
            if not isinstance(entry, dict) or unknown or ("preset" in entry) == ("path" in entry):
                raise self.fail(key, "expected a table with exactly one of preset or path (and name, seed)")
            if "preset" in entry and entry["preset"] not in PRESETS:
                raise self.fail(
                    f"{key}.preset", f"unknown preset {entry['preset']!r}; choose one of {', '.join(PRESETS)}"
                )
            path = self.checkpoint_path(f"{key}.path", entry.get("path"))
            name = str(entry.get("name") or entry.get("preset") or path.name)
            if not name or "/" in name or name in {c.name for c in out}:
                raise self.fail(f"{key}.name", f"{name!r} is empty, has a '/', or names another checkpoint")
            out.append(CheckpointSpec(name, entry.get("preset"), path, int(entry.get("seed", 0))))
        return tuple(out)

    def checkpoint_path(self, key: str, value: Any) -> Path | None:
        if value is None:
            return None
        path = (self.path.parent / str(value)).expanduser().resolve()  # relative to the plan file
        if not path.is_dir():
            raise self.fail(key, f"{path} is not a directory")
        return path


# ----- jobs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What a job asks of the node that runs it. `memory` is its declared peak (bytes), from measured peaks
    (MEMORY below); `gpu` names the target whose GPU it needs (None: any CPU node)."""

    cpus: float = 1.0
    memory: int = GIB
    gpu: str | None = None


@dataclass(frozen=True)
class Job:
    id: str  # kind:model/precision[/target]
    kind: str  # checkpoint | export | build | validate | bench
    deps: tuple[str, ...]
    row: tuple[str, str, str]  # (model, precision, target) of the index row it reports into
    params: dict[str, Any]
    resources: Resources = Resources()
    testing: dict[str, Any] = field(default_factory=dict)  # never part of the fingerprint

    @property
    def slug(self) -> str:
        return slug(self.id)


def slug(job_id: str) -> str:
    """A job id as a file name: build:m/bf16/sm89 -> build_m_bf16_sm89."""
    return job_id.replace(":", "_").replace("/", "_")


ORT_TARGET = "onnxruntime"  # the row of an export itself: its onnxruntime validation runs on any CPU

# Declared peak memory per job kind: base + factor x weight bytes at the export's precision. Measured on the
# full-size e2b (benchmarks/RESULTS.md, 2026-11-29): the export streams weights (775 MiB peak for 8.6 GiB), a
# TensorRT-RTX build peaks near 1.8x the weights (15.8 GiB), and validation holds the PyTorch reference and the
# onnxruntime session side by side. Rounded up so a 24 GiB node never takes two full-size builds.
MEMORY = {
    "checkpoint": (1.0, 0.0),
    "export": (1.0, 0.125),
    "build": (1.0, 2.0),
    "validate": (1.0, 2.5),
    "bench": (1.0, 2.5),
}


def declared_memory(kind: str, weight_bytes: int) -> int:
    base, factor = MEMORY[kind]
    return int(math.ceil((base * GIB + factor * weight_bytes) / GIB) * GIB)


def expand(plan: Plan) -> list[Job]:
    """The plan's jobs in dependency order (every dep precedes its dependents)."""
    jobs: list[Job] = []
    builders = {t: builder_for(t, plan.builder) for t in plan.targets}
    for ckpt in plan.checkpoints:
        weights_fp32 = _weight_bytes(ckpt)
        deps: tuple[str, ...] = ()
        source = str(ckpt.path) if ckpt.path else f"checkpoints/{ckpt.name}"
        if ckpt.preset:
            deps = (f"checkpoint:{ckpt.name}",)
            params = {"preset": ckpt.preset, "seed": ckpt.seed, "vision": "vision" in plan.modalities}
            params["dir"] = source
            jobs.append(Job(deps[0], "checkpoint", (), (ckpt.name, "", ""), params))
        for dtype in plan.dtypes:
            for quant in plan.quant:
                weight_bytes = weights_fp32 * (1 if dtype == "fp32" else 2) // 4
                jobs += _export_jobs(plan, ckpt.name, source, deps, dtype, quant, weight_bytes, builders)
    return jobs


def _export_jobs(
    plan: Plan,
    model: str,
    checkpoint: str,
    deps: tuple[str, ...],
    dtype: str,
    quant: str,
    weight_bytes: int,
    builders: dict[str, str],
) -> list[Job]:
    precision = dtype if quant == "none" else f"{dtype}-{quant}"
    export_dir = f"exports/{model}-{precision}"
    export_id = f"export:{model}/{precision}"

    def job(kind: str, target: str, deps: tuple[str, ...], params: dict, gpu: str | None = None) -> Job:
        name = f"{kind}:{model}/{precision}" + ("" if kind == "export" else f"/{target}")
        hooks = {k: True for k, ids in plan.testing.items() if name in ids}
        resources = Resources(1.0, declared_memory(kind, weight_bytes), gpu)
        return Job(
            name, kind, deps, (model, precision, target), {"export": export_dir, **params}, resources, hooks
        )

    export = {"checkpoint": checkpoint, "dtype": dtype, "quant": quant, "max_seq_len": plan.max_seq_len}
    export["text_only"] = "vision" not in plan.modalities
    out = [job("export", ORT_TARGET, deps, export)]
    checks = {"steps": plan.validate_steps, "reports": f"reports/{model}-{precision}"}
    out += _checks(plan, job, ORT_TARGET, export_id, checks, None)
    if quant != "none":
        return out  # weight-only quantized exports are onnxruntime's; TensorRT needs an unquantized export
    for target, builder in builders.items():
        build = {"target": target, "builder": builder, "max_batch": plan.max_batch}
        build |= {"opt_level": plan.opt_level, "plugins": plan.plugins, "max_seq_len": plan.max_seq_len}
        out.append(job("build", target, (export_id,), build, target if builder == GPU_BUILDER else None))
        if plan.validate_engines:
            engine = {**checks, "target": target, "reports": f"{checks['reports']}-{target}"}
            out += _checks(plan, job, target, f"build:{model}/{precision}/{target}", engine, target)
    return out


def _checks(plan: Plan, job, target: str, dep: str, params: dict, gpu: str | None) -> list[Job]:
    """The validation and bench of one row: onnxruntime on a CPU (gpu None), or an engine on its GPU."""
    backend = {"backend": "ort" if gpu is None else "trt"}
    out = [job("validate", target, (dep,), {**params, **backend}, gpu)] if plan.validate else []
    if plan.bench:
        out.append(
            job("bench", target, (dep,), {"reports": params["reports"], "target": gpu, **backend}, gpu)
        )
    return out


def builder_for(target: str, requested: str) -> str:
    """Which TensorRT builds `target`: TensorRT-RTX ahead of time on a CPU where it can (its AOT list, asked of
    the installed TensorRT-RTX, else the list of 1.7), else full TensorRT on a GPU of the target."""
    from ..engines.seam import installed_flavours, rtx_sms_or_known
    from ..targets import TARGETS

    if requested != "auto":
        return requested
    return CPU_BUILDER if TARGETS[target].sm in rtx_sms_or_known(installed_flavours()) else GPU_BUILDER


def _weight_bytes(ckpt: CheckpointSpec) -> int:
    """The checkpoint's text weights in fp32 bytes (what declared memory scales with). A config this cannot
    read falls back to the safetensors on disk (as bf16): its export job then fails with the real error."""
    from ..errors import Gemma4CompileError
    from ..model.config import Gemma4Spec
    from ..model.presets import PRESETS
    from ..model.weights import expected_shapes

    try:
        spec = PRESETS[ckpt.preset] if ckpt.preset else Gemma4Spec.from_pretrained(ckpt.path)
    except Gemma4CompileError:
        return 2 * sum(f.stat().st_size for f in Path(ckpt.path).glob("*.safetensors"))
    return 4 * sum(math.prod(shape) for shape in expected_shapes(spec).values())
