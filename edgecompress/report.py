"""report.json and a self-contained report.html (inline SVG, no network fetches)."""

from __future__ import annotations

import html
import math
from pathlib import Path

from edgecompress.fsutil import write_json, write_text


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
    control = calibration.get("accuracy_control")
    if control:
        text += (f"; accuracy-aware (NNCF accuracy control: sensitive layers kept in float until the drop on "
                 f"{control['validation_samples']} validation images is within {control['max_drop'] * 100:.2g} pp)")
    return text


def render_html(report: dict) -> str:
    choice = report.get("choice") or {}
    measured = report.get("measured") or {}
    predicted = report.get("predicted") or {}
    budget = report["budget"]
    points = []
    chosen_id = report.get("choice_id")
    for c in report["candidates"]:
        m = c.get("measured") or {}
        acc = m.get("accuracy") if m.get("accuracy") is not None else c["predicted"]["accuracy"]
        lat = m.get("latency_ms_median") or c["predicted"]["latency_ms"]
        kind = "chosen" if c["id"] == chosen_id else ("measured" if m else "predicted")
        label = f'{c["id"]}: {lat:.3f} ms, {"measured" if m else "predicted"}'
        points.append({"x": lat, "y": acc, "kind": kind, "label": label})
        if kind == "chosen":
            points.append({"x": lat, "y": acc, "kind": "measured", "label": label})
    rows = []
    for c in report["candidates"]:
        if not c.get("tried"):
            continue
        m = c.get("measured") or {}
        rows.append(
            f'<tr><td>{html.escape(c["id"])}</td><td>{_fmt(c["predicted"]["latency_ms"])}</td>'
            f'<td>{_fmt(m.get("latency_ms_median"))}</td><td>{_fmt(m.get("accuracy"), 4)}</td>'
            f'<td>{html.escape(c.get("outcome", ""))}</td></tr>'
        )
    latency_note = html.escape(report.get("measured_where", ""))
    per_class = report.get("per_class_accuracy") or {}
    class_rows = "".join(
        f"<tr><td>{html.escape(str(name))}</td><td>{_fmt(a, 3)}</td><td>{_fmt(b, 3)}</td></tr>"
        for name, a, b in zip(per_class.get("classes", []), per_class.get("original", []), per_class.get("compressed", []))
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgecompress report: {html.escape(report["target"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 900px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
th {{ background: #f3f3f3; }} code {{ background: #f3f3f3; padding: 2px 4px; }} .note {{ color: #555; }}
</style></head><body>
<h1>edgecompress build for {html.escape(report["target"])}</h1>
<p>Command: <code>{html.escape(report.get("command", ""))}</code></p>
<h2>Choice</h2>
<table>
<tr><th>model</th><td>{html.escape(str(choice.get("model")))}</td></tr>
<tr><th>pruning</th><td>{html.escape(str(choice.get("prune_method")))} at ratio {_fmt(choice.get("prune_ratio"), 2)}</td></tr>
<tr><th>precision</th><td>{html.escape(str(choice.get("precision")))}</td></tr>
<tr><th>artifact</th><td><code>{html.escape(str(report.get("artifact")))}</code></td></tr>
</table>
<h2>Budget, predicted and measured</h2>
<table><tr><th></th><th>budget</th><th>predicted</th><th>measured</th></tr>
<tr><th>latency (median), ms</th><td>{_fmt(budget.get("latency_ms"))}</td><td>{_fmt(predicted.get("latency_ms"))}</td><td>{_fmt(measured.get("latency_ms_median"))}</td></tr>
<tr><th>latency p90, ms</th><td></td><td></td><td>{_fmt(measured.get("latency_ms_p90"))}</td></tr>
<tr><th>memory, MB</th><td>{_fmt(budget.get("memory_mb"), 1)}</td><td>{_fmt(predicted.get("memory_mb"), 1)}</td><td>{_fmt(measured.get("peak_memory_mb"), 1)}</td></tr>
<tr><th>model file, MB</th><td></td><td></td><td>{_fmt(measured.get("model_size_mb"), 2)}</td></tr>
<tr><th>top-1 accuracy</th><td>max drop {_fmt(budget.get("max_accuracy_drop"), 3)}</td><td>{_fmt(predicted.get("accuracy"), 4)}
(lower bound {_fmt(predicted.get("accuracy_low"), 4)})</td><td>{_fmt(measured.get("accuracy"), 4)} (uncompressed {_fmt(measured.get("baseline_accuracy"), 4)})</td></tr>
{_device_row(report)}</table>
<p class="note">Latency and memory: {latency_note}. Predicted latency: {html.escape(predicted.get("latency_model", ""))}.
Predicted memory: weights at the precision, peak live activations over the execution order, and the runtime's overhead. Accuracy: {html.escape(report.get("verified_in", ""))}, on {report.get("test_samples", "?")} held-out test images.
Predicted accuracy is the {html.escape(report.get("accuracy_basis", ""))}. Calibration: {html.escape(_calibration_text(report.get("calibration")))}.</p>
<h2>Candidates</h2>
{_scatter_svg(points, budget.get("latency_ms"))}
<p class="note">{len(report["candidates"])} candidates considered; those built are listed below.</p>
<table><tr><th>candidate</th><th>predicted ms</th><th>measured ms</th><th>accuracy</th><th>outcome</th></tr>
{"".join(rows)}</table>
<h2>Per-class accuracy</h2>
<table><tr><th>class</th><th>original</th><th>compressed</th></tr>{class_rows}</table>
</body></html>
"""


def _device_row(report: dict) -> str:
    device = report.get("device")
    if not device:
        return ""
    acc = device.get("accuracy")
    text = (f"{_fmt(acc, 4)} on {device.get('eval_samples')} test images, run on the device" if acc is not None
            else "not measured on the device (trtexec times the engine; accuracy is the host's)")
    return f'<tr><th>top-1 on {html.escape(device["name"])}</th><td></td><td></td><td>{text}</td></tr>'


def write_report(run_dir: Path, report: dict) -> None:
    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.html", render_html(report))
