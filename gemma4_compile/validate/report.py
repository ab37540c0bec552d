"""Reports: OUT/reports/{accuracy,latency}.{json,md}, PNG plots and summary.md, from the report dataclasses.

Every file is written to a temporary name and renamed, so a reader never sees half a report. summary.md is
rebuilt from whichever of accuracy.json / latency.json the folder holds, so `validate` and `bench` can run
separately and the summary still covers both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fsutil import atomic_file, write_atomic

if TYPE_CHECKING:
    from .bench import LatencyReport
    from .validate import AccuracyReport

REPORTS = "reports"
ERROR_PLOT, LATENCY_PLOT = "accuracy_error_by_position.png", "latency_decode.png"


def accuracy_stem(reference: str) -> str:
    """accuracy (against our torch model) or accuracy-<reference>: `--reference hf` never overwrites the first."""
    return "accuracy" if reference == "torch" else f"accuracy-{reference}"


def error_plot_name(reference: str) -> str:
    return ERROR_PLOT.replace("accuracy", accuracy_stem(reference), 1)


# ----- files ------------------------------------------------------------------------------------


def jsonable(x: Any) -> Any:
    """Strict JSON from asdict() output: numpy scalars to Python, non-finite floats to strings ("inf", "nan")."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else str(float(x))
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    return x


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    with atomic_file(path) as tmp:
        write(tmp)
    return path


def _write_text(path: Path, text: str) -> Path:
    return write_atomic(path, text)


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    return _write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_reports(
    out_dir: str | Path, accuracy: AccuracyReport | None = None, latency: LatencyReport | None = None
) -> list[Path]:
    """Write the given reports (and a fresh summary.md) into out_dir/reports; returns the files written."""
    folder = Path(out_dir) / REPORTS
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if accuracy is not None:
        stem = accuracy_stem(accuracy.reference)
        written.append(_write_json(folder / f"{stem}.json", accuracy.to_dict()))
        plot = folder / error_plot_name(accuracy.reference)
        written.append(_atomic(plot, lambda p: plot_error_by_position(accuracy, p)))
        written.append(_write_text(folder / f"{stem}.md", accuracy_markdown(accuracy)))
    if latency is not None:
        written.append(_write_json(folder / "latency.json", latency.to_dict()))
        written.append(_atomic(folder / LATENCY_PLOT, lambda p: plot_decode_latency(latency, p)))
        written.append(_write_text(folder / "latency.md", latency_markdown(latency)))
    accuracies = [a for f in sorted(folder.glob("accuracy*.json")) if (a := _read_json(f))]
    summary = summary_markdown(accuracies, _read_json(folder / "latency.json"))
    written.append(_write_text(folder / "summary.md", summary))
    return written


# ----- markdown ---------------------------------------------------------------------------------


def _g(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def tolerance_rows(t: Any) -> list[list[str]]:
    return [
        ["max abs logit diff", "≤ " + _g(t.max_abs) if t.max_abs is not None else "reported only"],
        ["mean KL(reference ‖ backend)", f"≤ {_g(t.kl_mean)} nats"],
        ["top-1 agreement (near-ties count)", f"≥ {_pct(t.top1)}"],
        ["near-tie margin", f"{_g(t.tie_abs)} + {_g(t.tie_rel)} × |top logit|"],
        ["greedy decode", "must match (or part on a near-tie)" if t.greedy_exact else "reported only"],
        ["MoE routing agreement", "≥ " + _pct(t.routing) if t.routing is not None else "reported only"],
        ["divergent layer", f"relative hidden-state error > {_g(t.layer_rel)}"],
        [
            "drift gate (replaces the max abs / KL limit when the reference also ran one precision up)",
            f"backend's distance ≤ max({_g(t.drift_floor)}, {_g(t.drift_factor)} × the reference's own)",
        ],
    ]


def _images_md(images: dict[str, Any] | None, kind: str = "image") -> list[str]:
    """The staged image- (or audio-) prompt check (validate/images.py, validate/audio.py): one row per stage
    with the gate that decided it, the first failure named."""
    if images is None:
        return []
    counts = images[f"{kind}_tokens"]
    items = "images" if kind == "image" else "audio clips"
    precision = images.get("precision", "fp32")
    if precision == "fp32":
        rule = (
            "A stage over its bound passes when ours is within 2x transformers' own fp32-vs-fp64 distance "
            "of its fp64 run."
        )
        own = "transformers fp32 vs fp64"
    else:
        rule = (
            f"{precision} export: the encoder and end-to-end stages are gated against transformers' fp32 "
            "run (issue #13), max abs Δ and greedy tokens are reported; a gate missed by at most 2x "
            f"transformers' own {precision}-vs-fp32 shortfall passes."
        )
        own = f"transformers {precision} vs fp32"
    lines = [
        f"## {kind.capitalize()} prompt vs transformers (Gemma4ForConditionalGeneration)",
        "",
        f"{len(counts)} {items} ({counts} soft tokens) in a {images['prompt_tokens']}-token prompt. {rule}",
        "",
    ]
    rows = [
        [
            s["name"],
            _g(s["value"]),
            s["gate"],
            _g(s["exact"]),
            _g(s["noise"]),
            s["detail"],
            "ok" if s["passed"] else "**FAIL**",
        ]
        for s in images["stages"]
    ]
    header = ["stage", "max abs Δ", "gate", "vs fp64", f"{own} (max abs Δ)", "what", "verdict"]
    lines += [*_table(header, rows), ""]
    if not images["passed"]:
        lines += [f"First failure: {images['failure']}.", ""]
    if images.get("skipped"):
        lines += [f"End to end not run: {images['skipped']}.", ""]
    return lines


def accuracy_markdown(r: AccuracyReport) -> str:
    verdict = "PASSED" if r.passed else "FAILED"
    lines = [
        f"# Accuracy: {r.backend} vs {r.reference} ({r.precision}) — {verdict}",
        "",
        f"Export: `{r.export_dir}`. Sliding window W = {r.sliding_window}; {r.steps} greedy decode steps per case, "
        "the reference's tokens teacher-forced into the backend.",
        "",
        f"## Tolerances ({r.tolerance.precision})",
        "",
        *_table(["metric", "limit"], tolerance_rows(r.tolerance)),
        "",
        "## Cases",
        "",
    ]
    header = [
        "case",
        "batch",
        "lengths",
        "max abs Δ",
        "< W",
        "≥ W",
        "mean abs Δ",
        "cos min",
        "top-1",
        "top-5",
        "KL mean",
        "KL max",
        "greedy match",
        "routing",
        "verdict",
    ]
    rows = [
        [
            c.name,
            str(c.batch),
            str(c.lengths),
            _g(c.max_abs),
            _g(c.max_abs_in_window),
            _g(c.max_abs_past_window),
            _g(c.mean_abs),
            f"{c.cosine_min:.6f}",
            _pct(c.top1),
            _pct(c.top5),
            _g(c.kl_mean),
            _g(c.kl_max),
            " / ".join(f"{m}/{c.steps}" for m in c.greedy_match),
            _pct(c.routing),
            "ok" if c.passed else "**FAIL**",
        ]
        for c in r.cases
    ]
    lines += [*_table(header, rows), "", f"![logit error by position]({error_plot_name(r.reference)})", ""]
    lines += _drift_md(r)
    lines += _quality_md(r)
    lines += _perplexity_md(r)
    failed = [c for c in r.cases if not c.passed]
    if failed:
        lines += ["## Failures", "", *(f"- {c.message()}" for c in failed), ""]
        lines += _localization_md(failed, r.layer_kinds)
    lines += _overflow_md(r)
    lines += _images_md(r.images)
    lines += _images_md(r.audio, "audio")
    if r.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in r.warnings), ""]
    if r.polygraphy:
        p = r.polygraphy
        lines += [
            "## Reproduce with Polygraphy",
            "",
            f"The decoder's reference I/O ({p['iterations']} iterations: a prefill past the window, one decode step):",
            "",
            "```sh",
            p["command"],
            "```",
            "",
        ]
        if p.get("note"):
            lines += [p["note"], ""]
    return "\n".join(lines)


def _localization_md(failed: list[Any], kinds: list[str]) -> list[str]:
    lines = []
    for c in failed:
        loc = c.localization
        if loc is None or not loc.available or not loc.layer_errors:
            continue
        lines += [f"### Per-layer error, case {c.name}", ""]
        rows = [
            [str(i), kinds[i], _g(e), _g(g), "← first divergent" if i == loc.first_layer else ""]
            for i, (e, g) in enumerate(zip(loc.layer_errors, loc.growth))
        ]
        lines += [*_table(["layer", "kind", "rel. error", "growth", ""], rows), ""]
    return lines


def _perplexity_md(r: AccuracyReport) -> list[str]:
    p = r.perplexity
    if p is None:
        return []
    rows = [["backend", f"{p.backend:.6g}"], ["reference", f"{p.reference:.6g}"]]
    if p.unquantized is not None:
        rows += [["unquantized", f"{p.unquantized:.6g}"], ["ratio backend / unquantized", f"{p.ratio:.4f}"]]
    gate = (
        f"gate: ratio ≤ {p.gate:g}" if p.gate is not None else "not gated (--quality-gate, quantized exports)"
    )
    verdict = "" if not p.failures else " — **FAILED**: " + "; ".join(p.failures)
    return [
        f"## Perplexity on `{p.file}`{verdict}",
        "",
        f"{p.tokens} tokens scored in {p.windows} non-overlapping windows of {p.window}; {gate}.",
        "",
        *_table(["model", "perplexity"], rows),
        "",
    ]


def _quality_md(r: AccuracyReport) -> list[str]:
    q = r.quality
    if q is None:
        return []
    if q.gate is None:
        gate = "no threshold for this format"
    else:
        gate = f"gate: KL mean ≤ {_g(q.gate.kl_mean)}, top-1 ≥ {_pct(q.gate.top1)}"
        gate += "" if q.gated else " (not applied: pass --quality-gate on real weights)"
    header = ["case", "KL mean", "KL max", "top-1", "top-5", "greedy match"]
    rows = [
        [
            c.name,
            _g(c.quality.kl_mean),
            _g(c.quality.kl_max),
            _pct(c.quality.top1),
            _pct(c.quality.top5),
            " / ".join(f"{m}/{c.steps}" for m in c.quality.greedy_match),
        ]
        for c in r.cases
        if c.quality is not None
    ]
    verdict = "" if not q.failures else " — **FAILED**: " + "; ".join(q.failures)
    return [
        f"## Quantization quality ({q.format} vs the unquantized model){verdict}",
        "",
        "The same prompts and tokens through the float model: how far rounding moved the logits. Random-weight "
        f"checkpoints make these numbers meaningless as quality; {gate}.",
        "",
        *_table(header, rows),
        "",
    ]


def _drift_md(r: AccuracyReport) -> list[str]:
    """The reference's own error beside the backend's, both measured against the reference one precision up."""
    drifts = [(c, c.drift) for c in r.cases if c.drift is not None]
    if not drifts:
        return []
    exact, metric = drifts[0][1].exact, drifts[0][1].metric
    rows = [
        [
            c.name,
            w,
            _g(ref),
            _g(b),
            _g(b / ref if ref > 0 else float("inf")),
            _g(g),
            _pct(d.routing),
            "ok" if b <= g else "**over**",
        ]
        for c, d in drifts
        for w, ref, b, g in zip(d.where, d.reference, d.backend, d.gate)
    ]
    return [
        f"## The reference's own error ({metric} to the reference in {exact})",
        "",
        f"Reference {r.precision} vs {exact} is the model's own numerical noise at {r.precision}; a backend "
        "far beyond it computes something else, one near it is as faithful as the reference.",
        "",
        *_table(
            ["case", "where", "reference", "backend", "backend / reference", "gate", "ref. routing", ""], rows
        ),
        "",
    ]


def _overflow_md(r: AccuracyReport) -> list[str]:
    s = r.overflow
    if s is None:
        return []
    head = "no layer is at risk" if s.ok else f"**at risk: {', '.join(s.at_risk)}**"
    rows = [[k, _g(v, 4), "at risk" if k in s.at_risk else ""] for k, v in s.maxima.items()]
    return [
        "## fp16 overflow scan (reference residual stream)",
        "",
        f"Limit 65504 / {_g(s.headroom)} = {s.limit:.0f}; largest {s.worst} = {_g(s.worst_value, 4)}; {head}.",
        "",
        *_table(["activation", "max abs", ""], rows),
        "",
    ]


def latency_markdown(r: LatencyReport) -> str:
    env = ", ".join(f"{k} {v}" for k, v in r.environment.items())
    lines = [
        f"# Latency ({r.precision}), sliding window W = {r.sliding_window}",
        "",
        f"Export: `{r.export_dir}`. {r.config.decode_steps} timed decode steps and {r.config.prefill_repeats} prefills "
        f"per row after {r.config.warmup} warm-up; all backends in one process, one after another. {env}.",
        "",
        "## Backends",
        "",
    ]
    rows = [
        [
            s.backend,
            _g(s.load_s),
            _mb(s.base_rss_mb),
            _mb(s.peak_rss_mb),
            _g(s.device_peak_mb),
            "; ".join(
                filter(
                    None,
                    [
                        s.error or s.memory_note,
                        s.media_error and f"no media rows: {s.media_error}",
                        s.kernels and f"CPU kernels: {s.kernels}",
                        s.huge_pages and f"huge pages: {s.huge_pages}",
                    ],
                )
            ),
        ]
        for s in r.backends
    ]
    header = ["backend", "load s", "process base MB", "peak RSS MB", "device peak MB", "note"]
    lines += _table(header, rows)
    lines += [
        "",
        "Host memory is measured per backend in a fresh process of its own (validate/memory.py): `process base` is",
        "that interpreter with gemma4_compile imported, `peak RSS` its lifetime peak with the backend's libraries,",
        "model and the largest (batch, context) timed below.",
    ]
    lines += ["", "## Rows", ""]
    rows = [
        [
            x.backend,
            x.phase,
            str(x.batch),
            str(x.context),
            f"{x.p50_ms:.3f}",
            f"{x.p90_ms:.3f}",
            f"{x.p99_ms:.3f}",
            f"{x.tokens_per_s:.1f}",
            _g(x.vs_torch),
            _g(x.vs_hf),
        ]
        for x in r.rows
        if not x.media
    ]
    header = [
        "backend",
        "phase",
        "batch",
        "context",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "tokens/s",
        "× torch",
        "× hf",
    ]
    lines += _table(header, rows)
    lines += [
        "",
        "Prefill p50 at batch 1 is the time to first token; decode rows are labelled by the context",
        "at which their steps start. `× torch` / `× hf` is this row's p50 over torch eager's / transformers",
        "eager's p50 on the same row (below 1: faster).",
        "",
        *_media_rows(r),
    ]
    lines += [
        f"![decode latency by context length]({LATENCY_PLOT})",
        "",
    ]
    return "\n".join(lines)


def _media_rows(r: LatencyReport) -> list[str]:
    """The encoder and multimodal-TTFT rows, when the export has towers."""
    media = [x for x in r.rows if x.media]
    if not media:
        return []
    rows = [
        [
            x.backend,
            x.phase,
            "–" if x.budget is None else str(x.budget),
            _g(x.audio_s),
            str(x.context),
            f"{x.p50_ms:.3f}",
            f"{x.p90_ms:.3f}",
            _g(x.ms_per_audio_s),
            f"{x.tokens_per_s:.1f}",
            _g(x.vs_torch),
            _g(x.vs_hf),
            "–" if x.first_token is None else str(x.first_token),
        ]
        for x in media
    ]
    header = [
        "backend", "phase", "budget", "audio s", "tokens", "p50 ms", "p90 ms", "ms per audio s", "tokens/s",
        "× torch", "× hf", "first token",
    ]  # fmt: skip
    return [
        "## Media",
        "",
        *_table(header, rows),
        "",
        "`vision` rows time one image through the tower at each soft-token budget and `audio` rows one clip",
        "(`ms per audio s`: p50 per second of audio); every side gets the same preprocessed arrays",
        "(preprocessing excluded) and `tokens` is the soft tokens it made. `ttft` times one image(+audio)+text",
        "prompt from the decoded image and waveform to the first token: preprocessing, encoders, embed and",
        "prefill (transformers: its processor, then `generate` of one token); `tokens` is the prompt length.",
        "Our torch text model merges no soft tokens, so torch has no `ttft` row.",
        *([f"No `ttft` rows: {r.media_note}."] if r.media_note else []),
        "",
    ]


def summary_markdown(
    accuracy: dict[str, Any] | list[dict[str, Any]] | None, latency: dict[str, Any] | None
) -> str:
    """One page from the JSON reports (either may be missing; one accuracy report per reference)."""
    lines = ["# gemma4-compile summary", ""]
    for acc in accuracy if isinstance(accuracy, list) else [accuracy] * bool(accuracy):
        lines += _accuracy_summary(acc)
    if latency:
        lines += ["## Latency", "", *_latency_summary_rows(latency), "", "Details: latency.md.", ""]
    lines += _engines_summary(
        accuracy if isinstance(accuracy, list) else [accuracy] * bool(accuracy), latency
    )
    if not accuracy and not latency:
        lines += ["No reports yet: run `gemma4-compile validate` and `gemma4-compile bench`.", ""]
    return "\n".join(lines)


def _accuracy_summary(accuracy: dict[str, Any]) -> list[str]:
    verdict = "PASSED" if accuracy.get("passed") else "FAILED"
    cases = accuracy.get("cases", [])
    worst = max((c["max_abs"] for c in cases if isinstance(c["max_abs"], (int, float))), default=0.0)
    top1 = min((c["top1"] for c in cases), default=1.0)
    return [
        f"## Accuracy — {verdict}",
        "",
        f"{accuracy['backend']} vs {accuracy['reference']} ({accuracy['precision']}), {len(cases)} cases: "
        f"max |Δlogit| {_g(worst)}, lowest top-1 agreement {_pct(top1)}. "
        f"Details: {accuracy_stem(accuracy['reference'])}.md.",
        "",
        *(f"- {c['name']}: " + "; ".join(c["failures"]) for c in cases if c["failures"]),
        *(f"- warning: {w}" for w in accuracy.get("warnings", [])),
        "",
    ]


def _latency_summary_rows(latency: dict[str, Any]) -> list[str]:
    """One row per backend; every figure of a row comes from one context, named in the header."""
    rows: list[list[str]] = []
    ok = [s for s in latency.get("backends", []) if not s.get("error")]
    timed = [r for r in latency["rows"] if any(r["backend"] == s["backend"] for s in ok)]
    if not timed:
        return [f"- {s['backend']}: not run ({s['error']})" for s in latency.get("backends", [])]
    prompt = max(r["context"] for r in timed if r["phase"] == "prefill")
    context = max(r["context"] for r in timed if r["phase"] == "decode")
    big = max(r["batch"] for r in timed)
    torch_p50 = _find(timed, "torch", "decode", 1, context)
    for s in latency.get("backends", []):
        name = s["backend"]
        if s.get("error"):
            rows.append([name, "–", "–", "–", "–", "–", s["error"]])
            continue
        ttft = _find(timed, name, "prefill", 1, prompt)
        dec1, decb = _find(timed, name, "decode", 1, context), _find(timed, name, "decode", big, context)
        ratio = torch_p50["p50_ms"] / dec1["p50_ms"] if torch_p50 and dec1 else None
        rows.append(
            [
                name,
                _g(ttft and ttft["p50_ms"]),
                _g(dec1 and dec1["p50_ms"]),
                f"{dec1['tokens_per_s']:.0f}" if dec1 else "–",
                *([f"{decb['tokens_per_s']:.0f}" if decb else "–"] * (big > 1)),
                f"{ratio:.2f}×" if ratio else "–",
                f"peak RSS {_mb(s.get('peak_rss_mb'))} MB (own process)"
                if s.get("peak_rss_mb")
                else s.get("memory_note") or "",
            ]
        )
    header = [
        "backend",
        f"TTFT ms ({prompt}-token prompt)",
        f"decode p50 ms (context {context})",
        f"tok/s batch 1 (context {context})",
        *([f"tok/s batch {big} (context {context})"] * (big > 1)),
        "decode speed-up vs torch (torch p50 / p50)",
        "memory",
    ]
    return _table(header, rows)


def _find(rows: list[dict[str, Any]], backend: str, phase: str, batch: int, context: int) -> dict | None:
    return next(
        (
            r
            for r in rows
            if (r["backend"], r["phase"], r["batch"], r["context"]) == (backend, phase, batch, context)
        ),
        None,
    )


def device_memory_text(device_memory: dict[str, Any]) -> str:
    """'device memory: activation 150 MiB + weights 1.7 MiB' from an engine manifest, or why it is missing."""
    activation, weights = device_memory.get("activation_bytes"), device_memory.get("weights_bytes")
    if activation is None:
        return f"device memory {device_memory.get('how', 'not recorded (built before it was recorded)')}"
    text = f"device memory: activation {activation / 2**20:.1f} MiB"
    return text + (f" + weights {weights / 2**20:.1f} MiB" if weights is not None else "")


def _engines_summary(accuracies: list[dict[str, Any]], latency: dict[str, Any] | None) -> list[str]:
    """Every engine under the reported export, one row per graph (decoder, embed, vision, audio), and whether
    validate or bench executed it here (they execute the decoder engine)."""
    reports = [*accuracies, *([latency] if latency else [])]
    exports = sorted({r["export_dir"] for r in reports if r.get("export_dir")})
    ran = {(a.get("engine_target"), "validate") for a in accuracies}
    ran |= {
        (s.get("engine_target"), "bench") for s in (latency or {}).get("backends", []) if not s.get("error")
    }
    rows = []
    for export in exports:
        for path in sorted(Path(export).glob("engines/*/manifest.json")):
            m = _read_json(path) or {}
            target = m.get("target", path.parent.name)
            by = [stage for t, stage in sorted(ran) if t == target]
            for role, g in _graph_engines(m).items():
                engine = path.parent / g.get("engine_file", f"{role}.engine")
                executed = "no: built but never executed here"
                if by and role == "decoder":
                    executed = f"yes ({', '.join(by)})"
                rows.append(
                    [
                        target,
                        role,
                        f"{m.get('flavour', '?')} {m.get('trt_version', '')}".strip(),
                        f"{engine.stat().st_size / 2**20:.1f}" if engine.is_file() else "missing",
                        _g(g.get("build_seconds")),
                        device_memory_text(g.get("device_memory") or {}),
                        executed,
                    ]
                )
    if not rows:
        return []
    header = ["target", "graph", "TensorRT", "engine MB", "build s", "device memory", "executed"]
    return ["## Engines", "", *_table(header, rows), ""]


def _graph_engines(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """role -> that graph's manifest entry; a version-1 manifest holds the decoder only, at the top level."""
    if isinstance(m.get("graphs"), dict):
        return m["graphs"]
    return {"decoder": {k: m[k] for k in ("engine_file", "build_seconds", "device_memory") if k in m}}


# ----- plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; a user's interactive backend is left alone if already set
    import matplotlib.pyplot as plt

    return plt


def plot_error_by_position(r: AccuracyReport, path: Path) -> None:
    """max |Δlogit| per position for every case, log scale, the window boundary W marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    floor = 1e-9  # log axis: exact agreement plotted at the floor
    for c in r.cases:
        y = [max(float(v), floor) if isinstance(v, (int, float)) else 1e9 for v in c.error_by_position]
        ax.plot(range(len(y)), y, marker=".", label=c.name)
    ax.axvline(r.sliding_window, color="k", linestyle="--", label=f"W = {r.sliding_window}")
    if r.tolerance.max_abs is not None:
        ax.axhline(r.tolerance.max_abs, color="r", linestyle=":", label=f"tolerance {r.tolerance.max_abs:g}")
    ax.set(
        yscale="log",
        xlabel="position (prompt, then decode)",
        ylabel="max |Δ logit|",
        title=f"{r.backend} vs {r.reference} ({r.precision})",
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_decode_latency(r: LatencyReport, path: Path) -> None:
    """Decode-step p50 by context length, one line per (backend, batch), the window boundary W marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for x in r.rows:
        if x.phase == "decode":
            series.setdefault((x.backend, x.batch), []).append((x.context, x.p50_ms))
    for (backend, batch), pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend}, batch {batch}")
    ax.axvline(r.sliding_window, color="k", linestyle="--", label=f"W = {r.sliding_window}")
    ax.set(
        yscale="log",  # backends differ by orders of magnitude; on a linear axis the fast ones lie flat at 0
        xlabel="context length (tokens cached)",
        ylabel="decode step p50 (ms, log scale)",
        title=f"Decode latency ({r.precision})",
    )
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
