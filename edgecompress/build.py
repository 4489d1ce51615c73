"""``edgecompress build``: plan, then build candidates until one meets the budget."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import statistics
import time
from pathlib import Path

from edgecompress import __version__
from edgecompress.bundle import make_bundle
from edgecompress.costmodel import describe as describe_cost_model
from edgecompress.data import DIGITS_NAME, Dataset, load_dataset
from edgecompress.errors import BudgetError, NumericalError, RunDirError, UsageError
from edgecompress.fsutil import write_json
from edgecompress.kernels import model_graph
from edgecompress.methods import FinetuneSpec
from edgecompress.models import ModelEntry, list_models, load_model, parse_model_spec
from edgecompress.pipeline import Pipeline, per_class_accuracy
from edgecompress.predictor import AccuracyModel
from edgecompress.planner import Budget, Plan, check_reachable, plan, validate_budget
from edgecompress.report import write_report
from edgecompress.targets import Target
from edgecompress.train import predict_torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildOptions:
    target: Target
    budget: Budget
    data_dir: Path | None = None
    model_specs: tuple[str, ...] = ()
    sweep: dict | None = None  # method -> ratios (None: methods.DEFAULT_SWEEP)
    precisions: tuple[str, ...] = ()  # () : every precision the target runs
    out: Path | None = None
    resume: bool = False
    force: bool = False
    max_tries: int = 4
    archive: bool = False
    image_size: int = 32
    finetune: FinetuneSpec = FinetuneSpec()
    command: str = ""
    device: tuple | None = None  # (remote.DeviceSpec, remote.SshOptions): benchmark there over SSH
    calib: str = "auto"  # int8 calibration data: "real", "synth", or "auto" (synth below AUTO_SYNTH_BELOW real images)
    synth_steps: int = 1000  # training steps of the calibration synthesizer

    def synth_spec(self):
        from edgecompress.calib.synth import SynthSpec

        return SynthSpec(train_steps=self.synth_steps)


AUTO_SYNTH_BELOW = 300
SYNTH_COUNT = 512


def synthesizes(options: BuildOptions, data: Dataset) -> bool:
    """--calib synth, or auto with fewer than AUTO_SYNTH_BELOW real calibration images."""
    return options.calib == "synth" or (options.calib == "auto" and len(data.split("calib")[1]) < AUTO_SYNTH_BELOW)


def calibration_key(options: BuildOptions, data: Dataset) -> str:
    """What the calibration images will be, known before any is synthesized (for the stage cache)."""
    from edgecompress.methods import spec_hash

    if not synthesizes(options, data):
        return "real"
    return spec_hash("synthetic", data.fingerprint(), options.synth_spec(), SYNTH_COUNT)


def calibration_set(options: BuildOptions, data: Dataset, entries, accuracies, run_dir: Path, console):
    """The int8 calibration images: the real calibration split, or images synthesized from the real ones.

    Returns (images or None for the real split, what the report says about them).
    """
    if not synthesizes(options, data):
        return None, {"source": "real", "samples": int(len(data.split("calib")[1]))}
    from edgecompress.calib.synth import few_shot, synthesize

    images, labels = few_shot(data, None)
    best = max(accuracies, key=lambda name: accuracies[name] or 0.0)
    console.print(f"synthesizing {SYNTH_COUNT} calibration images from {len(labels)} real ones "
                  f"({'asked' if options.calib == 'synth' else f'fewer than {AUTO_SYNTH_BELOW} real calibration images'})")
    synthetic, _, manifest = synthesize(data, images, labels, count=SYNTH_COUNT, spec=options.synth_spec(),
                                        model=load_model(entries[best], data.num_classes), console=console)
    write_json(run_dir / "calibration" / "manifest.json", manifest)
    return synthetic, {"source": "synthetic", "samples": SYNTH_COUNT, "from_real_images": int(len(labels)),
                       "manifest": "calibration/manifest.json", "quality": manifest.get("quality"),
                       "synthesizer": manifest["synthesizer"]}


def resolve_models(specs: tuple[str, ...], data: Dataset) -> dict[str, ModelEntry]:
    if not specs:
        if data.name != DIGITS_NAME:
            raise UsageError(
                "the embedded zoo is trained on the digits; with --data, pass your models as --model timm:ARCH=weights.pth"
            )
        specs = tuple(list_models())
        if not specs:
            raise UsageError("the embedded zoo is empty; run tools/train_zoo.py")
    entries = [parse_model_spec(s) for s in specs]
    return {e.name: e for e in entries}


def model_facts(entries: dict[str, ModelEntry], data: Dataset):
    """Exported kernel graphs and uncompressed accuracies (the zoo's manifest on the digits, else measured)."""
    graphs, accuracies = {}, {}
    for name, entry in entries.items():
        model = load_model(entry, data.num_classes)
        graphs[name] = model_graph(model, data.input_shape)
        if entry.source == "zoo" and data.name == DIGITS_NAME and entry.test_accuracy is not None:
            accuracies[name] = entry.test_accuracy
        else:
            x, y = data.split("test")
            accuracies[name] = float((predict_torch(model, x).argmax(1) == y).mean())
    return graphs, accuracies


def check_run_dir(options: BuildOptions) -> Path:
    """Where the run goes; refuses to touch an existing run without --resume/--force. No side effects."""
    out = options.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    exists = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if exists and not out.is_dir():
        raise RunDirError(f"output path {out} exists and is not a directory")
    if exists and not (options.resume or options.force):
        raise RunDirError(f"output directory {out} exists; pass --resume {out} to continue it or --force to replace it")
    if options.resume and not exists:
        raise RunDirError(f"nothing to resume: {out} does not exist")
    return out


def prepare_run_dir(options: BuildOptions, out: Path) -> Path:
    if options.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _next_candidate(the_plan: Plan, tried: set[str], correction: float):
    """First untried candidate still inside the budget after correcting predictions by what was measured."""
    budget = the_plan.budget
    untried = [e for e in the_plan.ranked if e.candidate.id not in tried]
    if not untried:
        return None
    for est in untried:
        latency_ok = budget.latency_ms is None or est.cost.latency_ms * correction <= budget.latency_ms
        memory_ok = budget.memory_mb is None or est.cost.memory_mb <= budget.memory_mb
        if latency_ok and memory_ok:
            return est
    return min(untried, key=lambda e: e.cost.latency_ms)


def run_build(options: BuildOptions, console=None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    started = time.time()
    target = options.target
    validate_budget(options.budget, target)
    data = load_dataset(options.data_dir, options.image_size)
    if data.skipped_files:
        console.print(f"[yellow]skipped {data.skipped_files} unreadable images in {options.data_dir}[/]")
    entries = resolve_models(options.model_specs, data)
    out = check_run_dir(options)
    graphs, accuracies = model_facts(entries, data)
    accuracy_model = AccuracyModel.shipped(entries, data, accuracies, console)
    t_plan = time.perf_counter()
    the_plan = plan(target, options.budget, graphs, accuracies, sweep=options.sweep, accuracy_model=accuracy_model,
                    precisions=options.precisions or None)
    plan_ms = (time.perf_counter() - t_plan) * 1e3
    check_reachable(the_plan)
    run_dir = prepare_run_dir(options, out)
    write_json(run_dir / "build.json", {"command": options.command, "version": __version__, "target": target.name,
                                        "budget": options.budget.to_dict()})
    budget = options.budget
    inside = sum((budget.latency_ms is None or e.cost.latency_ms <= budget.latency_ms)
                 and (budget.memory_mb is None or e.cost.memory_mb <= budget.memory_mb) for e in the_plan.ranked)
    promised = sum(e.fits for e in the_plan.ranked)
    console.print(f"planned {len(the_plan.ranked)} candidates for {target.name} in {plan_ms:.1f} ms: {inside} predicted "
                  f"inside the latency/memory budget, {promised} of them with the accuracy bound inside the allowed drop")

    calibration = functools.cache(lambda: calibration_set(options, data, entries, accuracies, run_dir, console))
    pipeline = Pipeline(run_dir, target, data, entries, options.finetune, options.device,
                        int8_max_drop=options.budget.max_accuracy_drop, calibration=calibration,
                        calibration_key=calibration_key(options, data))
    outcomes: dict[str, dict] = {}
    ratios: list[float] = []
    chosen = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        for attempt in range(options.max_tries):
            correction = statistics.median(ratios) if ratios else 1.0
            est = _next_candidate(the_plan, set(outcomes), correction)
            if est is None:
                break
            cand = est.candidate
            task = progress.add_task(f"[{attempt + 1}/{options.max_tries}] {cand.id}", total=options.finetune.steps)
            try:
                compressed, calibrated, verified, benched = pipeline.run_candidate(
                    cand, progress=lambda step: progress.update(task, completed=step + 1))
            except NumericalError as exc:
                outcomes[cand.id] = {"outcome": f"rejected: {exc}"}
                console.print(f"[red]{cand.id}: rejected, {exc}[/]")
                continue
            finally:
                progress.remove_task(task)
            measured = dict(benched.measured) if benched.measured else None
            latency = measured["latency_ms_median"] if measured else est.cost.latency_ms
            if measured:
                ratios.append(measured["latency_ms_median"] / est.cost.latency_ms)
            # trtexec reports no resident memory: the prediction stands in for it, and the report says measured is null.
            memory = (measured or {}).get("peak_memory_mb") or est.cost.memory_mb
            record = {
                "measured": {
                    **({k: measured.get(k) for k in ("latency_ms_median", "latency_ms_p90", "peak_memory_mb", "model_size_mb")} if measured else
                       {"latency_ms_median": None, "latency_ms_p90": None, "peak_memory_mb": None, "model_size_mb": None}),
                    "accuracy": verified.accuracy,
                    "baseline_accuracy": compressed.baseline_accuracy,
                },
                "stages": (compressed, calibrated, verified, benched),
            }
            budget = options.budget
            drop = compressed.baseline_accuracy - verified.accuracy
            if budget.latency_ms is not None and latency > budget.latency_ms:
                record["outcome"] = f"rejected: latency {latency:.3f} ms > budget {budget.latency_ms:g} ms"
            elif budget.memory_mb is not None and memory > budget.memory_mb:
                record["outcome"] = f"rejected: memory {memory:.1f} MB > budget {budget.memory_mb:g} MB"
            elif budget.max_accuracy_drop is not None and drop > budget.max_accuracy_drop:
                record["outcome"] = f"rejected: accuracy drop {drop * 100:.2f} pp > allowed {budget.max_accuracy_drop * 100:.2f} pp"
            else:
                record["outcome"] = "chosen"
            outcomes[cand.id] = record
            console.print(f"{cand.id}: {latency:.3f} ms {'measured' if measured else 'predicted'}, "
                          f"accuracy {verified.accuracy:.4f}: {record['outcome']}")
            if record["outcome"] == "chosen":
                chosen = (est, record)
                break

    report = _report(options, the_plan, outcomes, chosen, data, entries, run_dir, plan_ms, started)
    report["reused_stages"] = pipeline.reused
    write_report(run_dir, report)
    if chosen is None:
        built = [(cid, o) for cid, o in outcomes.items() if "measured" in o]
        if built:
            cid, o = min(built, key=lambda item: item[1]["measured"]["latency_ms_median"] or float("inf"))
            best = f"the fastest built was {cid} at {o['measured']['latency_ms_median']:.3f} ms"
        else:
            best = f"the fastest predicted is {the_plan.fastest().candidate.id} at {the_plan.fastest().cost.latency_ms:.3f} ms"
        raise BudgetError(f"no candidate met the budget after {len(outcomes)} tries; {best} (report: {run_dir / 'report.html'})")
    return report


def _report(options, the_plan, outcomes, chosen, data, entries, run_dir: Path, plan_ms: float, started: float) -> dict:
    target = options.target
    candidates = []
    for est in the_plan.ranked:
        row = est.to_dict()
        outcome = outcomes.get(est.candidate.id)
        row["tried"] = outcome is not None
        if outcome:
            row["outcome"] = outcome["outcome"]
            row["measured"] = outcome.get("measured")
        candidates.append(row)
    report = {
        "tool_version": __version__,
        "command": options.command,
        "target": target.name,
        "runtime": target.runtime_name,
        "runtime_version": target.runtime().version(),
        "budget": options.budget.to_dict(),
        "dataset": {"name": data.name, **data.features(), "test_samples": int(len(data.split("test")[1]))},
        "test_samples": int(len(data.split("test")[1])),
        "accuracy_basis": the_plan.accuracy_basis,
        "plan_ms": plan_ms,
        "choice": None,
        "choice_id": None,
        "artifact": None,
        "measured": None,
        "predicted": None,
        "candidates": candidates,
        "wall_seconds": None,
        "run_dir": str(run_dir),
    }
    if chosen:
        est, record = chosen
        compressed, calibrated, verified, benched = record["stages"]
        from edgecompress.methods import get_method

        sparse = get_method(est.candidate.prune.method).sparse_pattern in target.sparse_kernels
        notes = target.runtime().deploy_notes(calibrated.artifact, est.candidate.quant.precision, data.input_shape, sparse=sparse)
        bundle_dir = make_bundle(
            run_dir / "bundle", artifact=calibrated.artifact, runtime_name=target.runtime_name,
            runtime_version=report["runtime_version"], target_name=target.name, precision=est.candidate.quant.precision,
            class_names=data.class_names, preprocess=data.preprocess.to_dict(), command=options.command,
            deploy_notes=notes, archive=options.archive,
        )
        x, y = data.split("test")
        original = load_model(entries[est.candidate.model], data.num_classes)
        original_pred = predict_torch(original, x).argmax(1)
        report.update({
            "choice": {**est.candidate.to_dict(), "method_description": _method_description(est.candidate)},
            "choice_id": est.candidate.id,
            "artifact": str((bundle_dir / calibrated.artifact.name).relative_to(run_dir)),
            "bundle": str(bundle_dir.relative_to(run_dir)),
            "measured": record["measured"],
            "measured_where": benched.where,
            "benchmark": benched.measured,
            "verified_in": verified.verified_in,
            "calibration": calibrated.calibration,
            "finetune": dataclasses.asdict(options.finetune) if compressed.finetune_steps else None,
            "predicted": {"latency_ms": est.cost.latency_ms, "memory_mb": est.cost.memory_mb, "accuracy": est.accuracy,
                          "accuracy_low": est.accuracy_low,
                          "latency_model": describe_cost_model(options.target, est.candidate.quant.precision)},
            "device": ({"name": str(options.device[0]), "accuracy": (benched.measured or {}).get("accuracy"),
                        "eval_samples": (benched.measured or {}).get("eval_samples")} if options.device else None),
            "per_class_accuracy": {
                "classes": list(data.class_names),
                "original": per_class_accuracy(original_pred, y, data.num_classes),
                "compressed": verified.per_class_accuracy,
            },
            "deploy": notes,
        })
    report["wall_seconds"] = round(time.time() - started, 1)
    return report


def _method_description(candidate) -> str:
    from edgecompress.methods import get_method

    method = get_method(candidate.prune.method)
    return method.description if method.kind == "none" else f"{method.description}, ratio {candidate.prune.ratio:.2f}"


def command_line(argv: list[str]) -> str:
    import shlex

    return shlex.join(["edgecompress", *argv])
