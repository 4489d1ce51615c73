"""The build's outcome: :class:`BuildReport`, written as a versioned report.json and a self-contained report.html.

``write_report`` and ``read_report`` are the one pair of functions that write and read report.json; everything that
reads a finished build (the CLI, ``targets refit``) goes through :class:`BuildReport`. The HTML is inline SVG with
no network fetches.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path

from edgecompress.core.errors import UsageError
from edgecompress.core.fsutil import write_json, write_text

REPORT_FORMAT = 2  # 1: the same layout without a format field (read as such)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measured:
    """What was measured of a built candidate: latency and memory by the benchmark, accuracy by verify."""

    latency_ms_median: float | None = None
    latency_ms_p90: float | None = None
    latency_ms_p99: float | None = None
    latency_ci_ms: dict | None = None  # stat -> [low, high], 95% bootstrap over the timing rounds
    timings: int = 1  # fresh-process timings merged (re-timed when the interval straddled the budget)
    peak_memory_mb: float | None = None
    model_size_mb: float | None = None
    accuracy: float | None = None
    accuracy_ci: tuple[float, float] | None = None  # 95% Wilson interval for the test split's size
    baseline_accuracy: float | None = None
    # The runtime's inference threads the latency was measured on, and the bundle runs on (None: its own choice).
    threads: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CandidateRecord:
    """One planned candidate: its prediction, and what happened to it if it was built."""

    id: str
    model: str
    prune_method: str
    prune_ratio: float
    precision: str
    predicted: dict  # latency_ms, memory_mb, accuracy, accuracy_low, macs, params
    fits_budget_predicted: bool
    tried: bool = False
    outcome: str | None = None  # "chosen" or "rejected: <why>"
    measured: Measured | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildReport:
    tool_version: str
    command: str
    target: str
    runtime: str
    runtime_version: str
    budget: dict
    dataset: dict  # name, num_classes, image_size, train_samples
    test_samples: int
    accuracy_basis: str
    plan_ms: float
    candidates: tuple[CandidateRecord, ...]
    run_dir: str
    wall_seconds: float | None = None
    reused_stages: tuple[str, ...] = ()
    # The chosen candidate; all None when nothing met the budget.
    choice: dict | None = None  # model, prune_method, prune_ratio, precision, method_description
    choice_id: str | None = None
    artifact: str | None = None  # relative to run_dir, inside the bundle
    bundle: str | None = None
    measured: Measured | None = None
    measured_where: str | None = None
    benchmark: dict | None = None  # the benchmark's own output
    verified_in: str | None = None
    calibration: dict | None = None
    finetune: dict | None = None
    predicted: dict | None = None  # latency_ms, memory_mb, accuracy, accuracy_low, latency_model
    device: dict | None = None  # name, accuracy and eval_samples measured on the device
    per_class_accuracy: dict | None = None
    deploy: dict | None = None
    transfer: dict | None = None  # probes, backbones transferred (steps, seconds), recipe; None when none was

    def to_json(self) -> dict:
        return {"format": REPORT_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = "report.json") -> "BuildReport":
        version = data.get("format", 1)
        if not isinstance(version, int) or version > REPORT_FORMAT:
            raise UsageError(f"{where} has report format {version!r}; this edgecompress reads up to {REPORT_FORMAT}")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        fields["candidates"] = tuple(
            CandidateRecord(**{**c, "measured": _measured(c.get("measured"))})
            for c in (dict(c) for c in fields.get("candidates", ())))
        fields["measured"] = _measured(fields.get("measured"))
        fields["reused_stages"] = tuple(fields.get("reused_stages") or ())
        try:
            return cls(**fields)
        except TypeError as exc:
            raise UsageError(f"{where} is not a build report ({exc})") from exc

    @property
    def chosen(self) -> CandidateRecord | None:
        return next((c for c in self.candidates if c.id == self.choice_id), None)


def _measured(data: dict | None) -> Measured | None:
    if data is None:
        return None
    names = {f.name for f in dataclasses.fields(Measured)}
    fields = {k: v for k, v in data.items() if k in names}
    if fields.get("accuracy_ci") is not None:
        fields["accuracy_ci"] = tuple(fields["accuracy_ci"])
    return Measured(**fields)


def _scatter_svg(points: list[dict], budget_ms: float | None, *, width=720, height=400) -> str:
    """Accuracy vs latency. points: {x, y, kind: predicted|measured|chosen, label}."""
    pad_l, pad_r, pad_t, pad_b = 60, 20, 20, 70
    xs = [p["x"] for p in points if p["x"] and p["x"] > 0] + ([budget_ms] if budget_ms else [])
    ys = [p["y"] for p in points if p["y"] is not None]
    if not xs or not ys:
        return "<p>No candidates to plot.</p>"
    x_lo, x_hi = math.log10(min(xs) * 0.8), math.log10(max(xs) * 1.25)
    y_lo, y_hi = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.02)
    if y_hi - y_lo < 0.05:
        y_lo = y_hi - 0.05

    def sx(x):
        return pad_l + (math.log10(x) - x_lo) / (x_hi - x_lo) * (width - pad_l - pad_r)

    def sy(y):
        return height - pad_b - (y - y_lo) / (y_hi - y_lo) * (height - pad_t - pad_b)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot" role="img" aria-label="accuracy versus latency">']
    parts.append(f'<rect x="{pad_l}" y="{pad_t}" width="{width - pad_l - pad_r}" height="{height - pad_t - pad_b}" fill="#fafafa" stroke="#ccc"/>')
    for i in range(6):  # axis ticks
        lx = x_lo + (x_hi - x_lo) * i / 5
        parts.append(f'<text x="{sx(10 ** lx):.1f}" y="{height - pad_b + 16}" font-size="11" text-anchor="middle">{10 ** lx:.3g}</text>')
        ly = y_lo + (y_hi - y_lo) * i / 5
        parts.append(f'<text x="{pad_l - 6}" y="{sy(ly) + 4:.1f}" font-size="11" text-anchor="end">{ly * 100:.1f}%</text>')
    parts.append(f'<text x="{(width + pad_l) / 2}" y="{height - pad_b + 34}" font-size="12" text-anchor="middle">latency, ms (log scale)</text>')
    parts.append(f'<text x="14" y="{(height - pad_b) / 2}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {(height - pad_b) / 2})">top-1 accuracy</text>')
    if budget_ms:
        bx = sx(budget_ms)
        parts.append(f'<line x1="{bx:.1f}" y1="{pad_t}" x2="{bx:.1f}" y2="{height - pad_b}" stroke="#d33" stroke-dasharray="5,4"/>')
        parts.append(f'<text x="{bx + 4:.1f}" y="{pad_t + 12}" font-size="11" fill="#d33">budget {budget_ms:g} ms</text>')
    style = {
        "predicted": 'r="3" fill="#8aa8d8" fill-opacity="0.6"',
        "measured": 'r="5" fill="#f0a030" stroke="#815"',
        "chosen": 'r="8" fill="none" stroke="#080" stroke-width="3"',
    }
    for kind in ("predicted", "measured", "chosen"):
        for p in points:
            if p["kind"] == kind and p["x"] and p["y"] is not None:
                parts.append(f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" {style[kind]}><title>{html.escape(p["label"])}</title></circle>')
    legend = [("predicted (not built)", "#8aa8d8"), ("built and measured", "#f0a030"), ("chosen", "#080")]
    for i, (text, colour) in enumerate(legend):  # one row under the axis, clear of the points
        x = pad_l + 10 + 190 * i
        parts.append(f'<circle cx="{x}" cy="{height - 12}" r="5" fill="{colour}"/><text x="{x + 10}" y="{height - 8}" font-size="11">{text}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value, digits=3, suffix=""):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _calibration_text(calibration: dict | None) -> str:
    if not calibration or calibration.get("source") == "none":
        return "none needed (no int8)"
    if calibration["source"] == "synthetic":
        text = (f"{calibration['samples']} images synthesized by a class-conditional diffusion model from "
                f"{calibration['from_real_images']} real ones (calibration/manifest.json)")
        quality = calibration.get("quality")
        if quality:
            text += (f"; the uncompressed model recognises {quality['model_top1_on_synthetic'] * 100:.1f}% of them, "
                     f"feature Fréchet distance to the real images {quality['feature_frechet_distance']:.2f}")
    else:
        text = f"{calibration['samples']} images from the real calibration split"
    preset = calibration.get("quant_preset")
    if preset:
        text += (f"; quantized by {preset.get('made_by') or preset.get('quantizer', '?')} ({preset.get('activation_type', '?')} activations, "
                 f"{preset.get('weight_type', '?')} weights)")
    control = calibration.get("accuracy_control")
    if control:
        text += (f"; accuracy-aware (NNCF accuracy control: sensitive layers kept in float until the drop on "
                 f"{control['validation_samples']} validation images is within {control['max_drop'] * 100:.2g} pp)")
    return text


def _transfer_html(transfer: dict | None) -> str:
    if not transfer:
        return ""
    done = "".join(f"<tr><td>{html.escape(b['backbone'])}</td><td>{html.escape(b['model'])}</td><td>{b['steps']}</td>"
                   f"<td>{_fmt(b['seconds'], 1)}</td><td>{_fmt((transfer.get('probes') or {}).get(b['backbone']), 3)}</td></tr>"
                   for b in transfer.get("backbones", []))
    probes = transfer.get("probes") or {}
    ranked = ", ".join(f"{html.escape(n)} {a:.3f}" for n, a in list(probes.items())[:8])
    return f"""<h2>Transfer</h2>
<p class="note">No model was trained on this data: backbones from the zoos were given a new head and fine-tuned on it,
and their compressed candidates were fine-tuned with the transferred model as teacher.
{f"Linear-probe top-1 of the best backbones on the validation split: {ranked}." if probes else ""}</p>
<table><tr><th>backbone</th><th>transferred model</th><th>steps</th><th>seconds</th><th>probe</th></tr>{done}</table>
"""


def render_html(report: BuildReport) -> str:
    choice = report.choice or {}
    measured = report.measured or Measured()
    predicted = report.predicted or {}
    budget = report.budget
    points = []
    for c in report.candidates:
        m = c.measured or Measured()
        acc = m.accuracy if m.accuracy is not None else c.predicted.get("accuracy")
        lat = m.latency_ms_median or c.predicted.get("latency_ms")
        if lat is None:
            continue
        kind = "chosen" if c.id == report.choice_id else ("measured" if c.measured else "predicted")
        label = f'{c.id}: {lat:.3f} ms, {"measured" if c.measured else "predicted"}'
        points.append({"x": lat, "y": acc, "kind": kind, "label": label})
        if kind == "chosen":
            points.append({"x": lat, "y": acc, "kind": "measured", "label": label})
    rows = []
    for c in report.candidates:
        if not c.tried:
            continue
        m = c.measured or Measured()
        rows.append(
            f'<tr><td>{html.escape(c.id)}</td><td>{_fmt(c.predicted.get("latency_ms"))}</td>'
            f'<td>{_fmt(c.predicted.get("premeasured_latency_ms"))}</td>'
            f'<td>{_fmt(m.latency_ms_p90)}{_interval((m.latency_ci_ms or {}).get("p90"))}</td>'
            f'<td>{_fmt(m.accuracy, 4)}{_interval(m.accuracy_ci, 4)}</td>'
            f'<td>{html.escape(c.outcome or "")}</td></tr>'
        )
    latency_note = html.escape(report.measured_where or "")

    def _threads(n):
        return (f"{n} (timed before training as fast as or faster than the runtime's own choice; the bundle's "
                "runtime.json sets it)") if n else "the runtime's own choice"

    per_class = report.per_class_accuracy or {}
    class_rows = "".join(
        f"<tr><td>{html.escape(str(name))}</td><td>{_fmt(a, 3)}</td><td>{_fmt(b, 3)}</td></tr>"
        for name, a, b in zip(per_class.get("classes", []), per_class.get("original", []), per_class.get("compressed", []))
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgecompress report: {html.escape(report.target)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 900px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
th {{ background: #f3f3f3; }} code {{ background: #f3f3f3; padding: 2px 4px; }} .note {{ color: #555; }}
</style></head><body>
<h1>edgecompress build for {html.escape(report.target)}</h1>
<p>Command: <code>{html.escape(report.command)}</code></p>
<h2>Choice</h2>
<table>
<tr><th>model</th><td>{html.escape(str(choice.get("model")))}</td></tr>
<tr><th>pruning</th><td>{html.escape(str(choice.get("prune_method")))} at ratio {_fmt(choice.get("prune_ratio"), 2)}</td></tr>
<tr><th>precision</th><td>{html.escape(str(choice.get("precision")))}</td></tr>
<tr><th>artifact</th><td><code>{html.escape(str(report.artifact))}</code></td></tr>
<tr><th>inference threads</th><td>{_threads(measured.threads)}</td></tr>
</table>
{_transfer_html(report.transfer)}<h2>Budget, predicted and measured</h2>
<table><tr><th></th><th>budget</th><th>predicted</th><th>measured</th></tr>
{_latency_rows(budget, predicted, measured)}
<tr><th>memory, MB</th><td>{_fmt(budget.get("memory_mb"), 1)}</td><td>{_fmt(predicted.get("memory_mb"), 1)}</td><td>{_fmt(measured.peak_memory_mb, 1)}</td></tr>
<tr><th>model file, MB</th><td></td><td></td><td>{_fmt(measured.model_size_mb, 2)}</td></tr>
<tr><th>top-1 accuracy</th><td>max drop {_fmt(budget.get("max_accuracy_drop"), 3)}</td><td>{_fmt(predicted.get("accuracy"), 4)}
(lower bound {_fmt(predicted.get("accuracy_low"), 4)})</td><td>{_fmt(measured.accuracy, 4)}{_interval(measured.accuracy_ci, 4)} (uncompressed {_fmt(measured.baseline_accuracy, 4)})</td></tr>
{_device_row(report)}</table>
<p class="note">Latency and memory: {latency_note}. Predicted latency: {html.escape(predicted.get("latency_model", ""))}.
Predicted memory: weights at the precision, peak live activations over the execution order, and the runtime's overhead. Accuracy: {html.escape(report.verified_in or "")}, on {report.test_samples} held-out test images.
Predicted accuracy is the {html.escape(report.accuracy_basis)}. Calibration: {html.escape(_calibration_text(report.calibration))}.</p>
<h2>Candidates</h2>
{_scatter_svg(points, budget.get("latency_ms"))}
<p class="note">{len(report.candidates)} candidates considered; those built are listed below.</p>
<p class="note">Latency three ways: predicted by the cost model; pre-measured (the candidate's structure timed here
before any fine-tuning, budget statistic); measured (the built artifact, p90 with its 95% interval). Accuracy on the test split with its 95% interval.</p>
<table><tr><th>candidate</th><th>predicted ms</th><th>pre-measured ms</th><th>measured p90 ms</th><th>accuracy</th><th>outcome</th></tr>
{"".join(rows)}</table>
<h2>Per-class accuracy</h2>
<table><tr><th>class</th><th>original</th><th>compressed</th></tr>{class_rows}</table>
</body></html>
"""


def _interval(bounds, digits=3) -> str:
    return f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]" if bounds else ""


def _latency_rows(budget: dict, predicted: dict, measured: Measured) -> str:
    """Median, p90 and p99 with their 95% intervals; the budget sits on the row of the statistic it holds."""
    stat = budget.get("latency_stat", "median")
    intervals = measured.latency_ci_ms or {}
    rows = []
    for name in ("median", "p90", "p99"):
        held = name == stat
        rows.append(f'<tr><th>latency {name}, ms{" (budget)" if held else ""}</th>'
                    f'<td>{_fmt(budget.get("latency_ms")) if held else ""}</td>'
                    f'<td>{_fmt(predicted.get("latency_ms")) if name == "median" else ""}</td>'
                    f'<td>{_fmt(getattr(measured, f"latency_ms_{name}"))}{_interval(intervals.get(name))}</td></tr>')
    timings = f"{measured.timings} timings" if measured.timings > 1 else "one timing"
    rows.append(f'<tr><th></th><td colspan="3" class="note">measured: {timings} in fresh processes, rounds of runs; '
                f'[interval] is the 95% bootstrap interval over the rounds</td></tr>')
    return "\n".join(rows)


def _device_row(report: BuildReport) -> str:
    device = report.device
    if not device:
        return ""
    acc = device.get("accuracy")
    text = (f"{_fmt(acc, 4)} on {device.get('eval_samples')} test images, run on the device" if acc is not None
            else "not measured on the device (trtexec times the engine; accuracy is the host's)")
    return f'<tr><th>top-1 on {html.escape(device["name"])}</th><td></td><td></td><td>{text}</td></tr>'


def write_report(run_dir: Path, report: BuildReport) -> None:
    write_json(run_dir / "report.json", report.to_json())
    write_text(run_dir / "report.html", render_html(report))


def read_report(run_dir: Path) -> BuildReport:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no report.json (give run directories of finished builds)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a build report")
    return BuildReport.from_json(data, str(path))
