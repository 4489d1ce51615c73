"""Refit a remote target's roofline to what its device measured (`edgecompress targets refit`).

Builds with ``--device`` record, in their ``report.json``, the latency the device
measured for every candidate they built. This reads those reports, rebuilds
each candidate's graph as the planner does (the zoo parent's exported graph,
transformed by the method), refits the roofline's fixed costs and per-kernel
efficiencies (:func:`edgecompress.costmodel.cost.fit_roofline`) and writes the
target's TOML with the new values and a line in ``sources`` saying where they
came from. The data-sheet peaks and bandwidth are kept.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from edgecompress.core.errors import UnknownNameError, UsageError
from edgecompress.core.fsutil import write_text
from edgecompress.report import read_report


def device_samples(target, run_dirs: list[Path]) -> tuple[list, int]:
    """(graph, precision, sparse pattern, measured ms) for every measured candidate; and how many were skipped."""
    from edgecompress.compress.methods import get_method
    from edgecompress.costmodel.kernels import model_graph
    from edgecompress.models import get_model, load_model

    graphs: dict = {}
    samples, skipped = [], 0
    for run in run_dirs:
        report = read_report(Path(run))
        if report.target != target.name:
            raise UsageError(f"{run}: built for {report.target}, not {target.name}")
        if not report.device:
            raise UsageError(f"{run}: built without --device, so nothing in it was measured on {target.name}")
        size, classes = report.dataset["image_size"], report.dataset["num_classes"]
        for c in report.candidates:
            measured = c.measured.latency_ms_median if c.measured else None
            if not measured:
                continue
            try:
                entry = get_model(c.model)
            except UnknownNameError:
                skipped += 1  # a user's model: its weights are not in the report
                continue
            key = (c.model, size, classes)
            if key not in graphs:
                graphs[key] = model_graph(load_model(entry, classes), (1, 3, size, size))
            method = get_method(c.prune_method)
            samples.append((method.graph_after(graphs[key], c.prune_ratio), c.precision, method.sparse_pattern,
                            float(measured)))
    return samples, skipped


def _table(values: dict) -> str:
    return "{ " + ", ".join(f"{k} = {v:.4g}" for k, v in values.items()) + " }"


def refit_toml(target, latency, note: str) -> str:
    """The target's TOML text with the roofline constants replaced and ``note`` added to its sources."""
    text = target.path.read_text()
    head, sep, rest = text.partition("[latency_model]")
    if not sep:
        raise UsageError(f"{target.path} has no [latency_model] table")
    section, nxt, tail = rest.partition("\n[")
    for key, value in (("overhead_ms", f"{latency.overhead_ms:.4g}"), ("per_layer_us", f"{latency.per_layer_us:.4g}"),
                       ("efficiency", _table(latency.efficiency)), ("int8_efficiency", _table(latency.int8_efficiency))):
        if latency.int8_efficiency or key != "int8_efficiency":
            section = re.sub(rf"(?m)^{key}\s*=.*$", f"{key} = {value}", section)
    head = re.sub(r"(?ms)^(sources\s*=\s*\[.*?)(\n\])", lambda m: f"{m.group(1)}\n  {json.dumps(note)},{m.group(2)}", head, count=1)
    return head + sep + section + nxt + tail


def refit(target, run_dirs: list[Path], out: Path, *, force: bool = False) -> dict:
    from edgecompress.costmodel.cost import fit_roofline, roofline_ms
    from edgecompress.targets import load_target_file

    if target.kernel_model() is not None:
        raise UsageError(f"{target.name} is predicted by its kernel model; refit that with `edgecompress targets profile`")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; add --force to replace it")
    samples, skipped = device_samples(target, run_dirs)
    if len(samples) < 3:
        raise UsageError(f"{len(samples)} device measurements of zoo models in those runs; refitting needs at least 3")
    before = [roofline_ms(g, target, p, sparse=bool(sp) and sp in target.sparse_kernels) / ms - 1 for g, p, sp, ms in samples]
    latency, rms = fit_roofline(target, samples)
    note = (f"latency_model refit on {datetime.date.today().isoformat()} by `edgecompress targets refit` from "
            f"{len(samples)} measurements on the device ({len(run_dirs)} build(s) with --device); RMS log error {rms:.3f}")
    write_text(out, refit_toml(target, latency, note))
    fitted = load_target_file(out)  # what was written must load, and predicts what it was fitted to
    after = [roofline_ms(g, fitted, p, sparse=bool(sp) and sp in fitted.sparse_kernels) / ms - 1 for g, p, sp, ms in samples]
    return {"target": target.name, "out": str(out), "measurements": len(samples), "skipped_user_models": skipped,
            "mean_abs_error_before": sum(map(abs, before)) / len(before),
            "mean_abs_error_after": sum(map(abs, after)) / len(after), "rms_log_error": rms}
