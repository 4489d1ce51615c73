"""``edgecompress build``: plan, then build candidates until one meets the budget."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import statistics
import time
from pathlib import Path

from edgecompress import __version__
from edgecompress.compress.finetune import predict_torch
from edgecompress.compress.methods import FinetuneSpec, get_method
from edgecompress.core.errors import OWN_MISTAKES, BudgetError, NumericalError, RunDirError, UsageError, one_line
from edgecompress.core.fsutil import write_json
from edgecompress.costmodel.cost import describe as describe_cost_model
from edgecompress.costmodel.devicecal import ensure_calibrated
from edgecompress.costmodel.kernels import model_graph
from edgecompress.data.datasets import DIGITS_NAME, Dataset, load_dataset
from edgecompress.deploy.bundle import make_bundle
from edgecompress.deploy.timing import accuracy_interval, straddles
from edgecompress.meta.predictor import AccuracyModel
from edgecompress.models import ModelEntry, list_models, load_model, parse_model_spec, predict, zoo_tasks
from edgecompress.pipeline import Pipeline, per_class_accuracy, retimed
from edgecompress.plan.planner import Budget, Plan, check_reachable, plan, speed_key, validate_budget
from edgecompress.plan.premeasure import can_premeasure, premeasure
from edgecompress.report import BuildReport, CandidateRecord, Measured, write_report
from edgecompress.targets import Target


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildOptions:
    target: Target
    budget: Budget
    data_dir: Path | None = None
    model_specs: tuple[str, ...] = ()
    sweep: dict | None = None  # method -> ratios (None: methods.default_sweep())
    precisions: tuple[str, ...] = ()  # () : every precision the target runs
    out: Path | None = None
    resume: bool = False
    force: bool = False
    max_tries: int = 4
    archive: bool = False
    image_size: int | None = None  # None: the named sources' 32, the model's pretrained_cfg, or a folder's own size
    mean: tuple[float, float, float] | None = None  # None: the model's, else the zoo's for zoo models and transfer
    std: tuple[float, float, float] | None = None
    finetune: FinetuneSpec = FinetuneSpec()
    command: str = ""
    device: tuple | None = None  # (remote.DeviceSpec, remote.SshOptions): benchmark there over SSH
    calib: str = "auto"  # int8 calibration data: "real", "synth", or "auto" (synth below AUTO_SYNTH_BELOW real images)
    synth_steps: int = 1000  # training steps of the calibration synthesizer
    time_budget_s: float | None = None  # wall time for the whole build (--time-budget); None: no limit
    transfer_top: int = 2  # backbones transferred to data no zoo was trained on

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
    from edgecompress.compress.methods import spec_hash

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
    # The quality check of the synthetic images runs a torch model (its features); ONNX graphs have none.
    with_torch = [name for name in accuracies if entries[name].source != "onnx"]
    best = max(with_torch, key=lambda name: accuracies[name] or 0.0) if with_torch else None
    console.print(f"synthesizing {SYNTH_COUNT} calibration images from {len(labels)} real ones "
                  f"({'asked' if options.calib == 'synth' else f'fewer than {AUTO_SYNTH_BELOW} real calibration images'})"
                  + ("" if best else "; their quality check needs a torch model and is skipped (pass --calib real "
                     "to calibrate on the real images)"))
    synthetic, _, manifest = synthesize(data, images, labels, count=SYNTH_COUNT, spec=options.synth_spec(),
                                        model=load_model(entries[best], data.num_classes) if best else None,
                                        console=console)
    write_json(run_dir / "calibration" / "manifest.json", manifest)
    return synthetic, {"source": "synthetic", "samples": SYNTH_COUNT, "from_real_images": int(len(labels)),
                       "manifest": "calibration/manifest.json", "quality": manifest.get("quality"),
                       "synthesizer": manifest["synthesizer"]}


def preprocess_args(options: BuildOptions) -> dict:
    """How a folder's images are normalised: as the models to build from expect.

    The zoos' models (and every backbone transfer starts from) were trained with mean = std = 0.5; a user's
    ``timm:ARCH=...`` weights with ARCH's pretrained_cfg (mean, std, interpolation, crop), at the folder's own
    size (pretrained_cfg's 224 would blow small images up 50-fold in compute); an ONNX graph with the folder
    defaults (ImageNet's). ``--mean``/``--std``/``--image-size`` override any of them.
    The named sources (the digits, Fashion-MNIST) are always 0.5 unless overridden.
    """
    from edgecompress.data.datasets import NAMED_DATASETS, NAMED_MEAN, NAMED_STD, preprocess_for_model

    args = {"mean": options.mean, "std": options.std}
    folder = options.data_dir is not None and not (str(options.data_dir) in NAMED_DATASETS
                                                   and not Path(options.data_dir).is_dir())
    if not folder:
        return args
    timm_archs = {s[len("timm:"):].split("=", 1)[0] for s in options.model_specs if s.startswith("timm:")}
    onnx = any(s.endswith(".onnx") for s in options.model_specs)
    if len(timm_archs) == 1 and len(options.model_specs) == 1:
        cfg = preprocess_for_model(timm_archs.pop())
        args = {"mean": options.mean or cfg.mean, "std": options.std or cfg.std, "interpolation": cfg.interpolation,
                "crop_pct": cfg.crop_pct}
    elif not timm_archs and not onnx:  # the zoos' models, or transfer from them
        args = {"mean": options.mean or NAMED_MEAN, "std": options.std or NAMED_STD}
    return args


def resolve_models(specs: tuple[str, ...], data: Dataset, *, transfer: bool = False) -> dict[str, ModelEntry]:
    """The models to build from: those named, else the zoo trained on the data's task (the digits, Fashion-MNIST).

    With ``transfer`` (``build``), data no zoo was trained on gives no models: the zoos' backbones are
    transferred to it (:func:`transferred_parents`)."""
    task = data.task or DIGITS_NAME
    if not specs:
        if data.task not in zoo_tasks():
            if transfer:
                return {}
            raise UsageError(f"the embedded zoos are trained on {', '.join(zoo_tasks())}; with --data DIR, pass your "
                             "models as --model timm:ARCH=weights.pth (build transfers the zoo to your data)")
        specs = tuple(list_models(task=task))
        if not specs:
            raise UsageError(f"the {task} zoo is empty; run tools/train_zoo.py --task {task}")
    entries = [parse_model_spec(s, task=task) for s in specs]
    return {e.name: e for e in entries}


def transferred_parents(options: BuildOptions, data: Dataset, entries: dict[str, ModelEntry], out: Path,
                        deadline: float | None, console) -> tuple[dict[str, ModelEntry], dict | None, Path | None]:
    """The parents to compress: ``entries`` as they are, or transferred to ``data`` where they must be.

    No model given and data no zoo knows: the zoos' backbones are probed and the ``options.transfer_top``
    best for the budget are transferred (edgecompress.compress.transfer). A user's checkpoint with another
    number of classes is transferred as it is. Returns the parents, what the report says about the transfer
    (None when nothing was transferred) and the run directory, prepared (prepare_run_dir) only when something is
    transferred: transfers are kept in it for --resume. With a deadline, the transfers share 40% of the time left.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgecompress.compress import transfer as tr

    info: dict = {}
    if not entries:
        pool = tr.backbones()
        t0 = time.time()
        # Under a deadline probing gets a fifth of the time left (all 22 backbones at 224x224 took 10 minutes here).
        stop_at = None if deadline is None else t0 + 0.2 * max(deadline - t0, 0.0)
        probes, graphs = tr.probe_all(pool, data, console, stop_at=stop_at, at_least=options.transfer_top)
        chosen = tr.choose(probes, graphs, options.target, options.budget, options.transfer_top, options.sweep,
                           options.precisions or None)
        console.print(f"probed {len(probes)} backbones of the zoos ({', '.join(zoo_tasks())}) on your data in "
                      f"{time.time() - t0:.0f} s; transferring the {len(chosen)} the plan ranks first: "
                      + ", ".join(f"{n} (probe {probes[n]:.1%})" for n in chosen))
        info = {"probes": {n: round(a, 4) for n, a in sorted(probes.items(), key=lambda kv: -kv[1])}}
        todo = {n: pool[n] for n in chosen}
    else:
        classes = {n: tr.checkpoint_classes(e) for n, e in entries.items() if e.source == "user"}
        todo = {n: entries[n] for n, k in classes.items() if k not in (None, data.num_classes)}
        for name in todo:
            console.print(f"{name} was trained for {classes[name]} classes; your data has "
                          f"{data.num_classes}: transferring it (new head, full fine-tune)")
    if not todo:
        return entries, None, None
    run_dir = prepare_run_dir(options, out)
    recipe = tr.recipe_for(data)
    per_model = None if deadline is None else 0.4 * max(deadline - time.time(), 0.0) / len(todo)
    parents = {n: e for n, e in entries.items() if n not in todo}
    info["backbones"] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        for name, entry in todo.items():
            own = recipe
            if per_model is not None:
                own = tr.recipe_for(data, max_steps=per_model / tr.step_seconds(entry, data, recipe))
            bar = progress.add_task(f"transfer {name}", total=own.steps)
            started = time.time()
            parent = tr.transfer(entry, data, own, run_dir / "transfer" / name.replace("@", "-"),
                                 on_step=lambda step, bar=bar: progress.update(bar, completed=step + 1))
            progress.remove_task(bar)
            parents[parent.name] = parent
            info["backbones"].append({"backbone": name, "model": parent.name, "steps": own.steps,
                                      "seconds": round(time.time() - started, 1)})
    info["recipe"] = dataclasses.asdict(recipe)
    return parents, info, run_dir


def model_facts(entries: dict[str, ModelEntry], data: Dataset, console=None):
    """Exported kernel graphs and uncompressed accuracies (the zoo's manifest on the digits, else measured).

    An ONNX graph is checked against the data, read as it will be exported, and measured in ONNX Runtime; its
    graph is marked unprunable (the planner gives it dense candidates only), which ``console`` is told once.
    """
    from edgecompress.costmodel.kernels import onnx_graph
    from edgecompress.onnx_model import check_fits, predict_onnx

    graphs, accuracies = {}, {}
    for name, entry in entries.items():
        if entry.source == "onnx":
            check_fits(entry.weights, data)
            graphs[name] = onnx_graph(entry.weights, data.input_shape)
            x, y = data.split("test")
            accuracies[name] = float((predict_onnx(entry.weights, x).argmax(1) == y).mean())
            if console is None:
                from rich.console import Console

                console = Console(stderr=True)
            console.print(f"{name} is an ONNX graph: pruning needs the torch model, so only dense fp32/fp16/int8 "
                          "candidates are planned for it", markup=False, soft_wrap=True)
            continue
        model = load_model(entry, data.num_classes)
        graphs[name] = model_graph(model, data.input_shape)
        # The manifest's accuracy is on the task's full test split; a subset or another dataset is measured.
        if entry.source == "zoo" and data.name == entry.task and entry.test_accuracy is not None:
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


# A candidate over the budget by at most this factor (by its best known latency) may still be tried before one inside
# it whose expected accuracy breaks the allowed drop: timings of one structure varied by +-25% between processes here.
NEAR_BUDGET = 1.25


def _drop_excess(outcomes: dict) -> dict[tuple, list[tuple[float, float]]]:
    """What the tries built so far say of the accuracy model: (model, method) -> [(ratio, measured drop minus expected
    drop)], one entry per built try of that method on that model."""
    excess: dict[tuple, list[tuple[float, float]]] = {}
    for built in outcomes.values():
        if not isinstance(built, Built) or built.measured.accuracy is None:
            continue
        est, m = built.estimate, built.measured
        if est.accuracy is None or est.parent_accuracy is None or m.baseline_accuracy is None:
            continue
        c = est.candidate
        excess.setdefault((c.model, c.prune.method), []).append(
            (c.prune.ratio, (m.baseline_accuracy - m.accuracy) - (est.parent_accuracy - est.accuracy)))
    return excess


def _next_candidate(the_plan: Plan, tried: set[str], correction: float, excess: dict | None = None,
                    built_ms=None):
    """The next candidate to build, after correcting predictions by what was measured.

    In this order: the first untried candidate inside the budget whose expected accuracy keeps the allowed drop (the
    plan's order); once per build, the fastest untried one that keeps it and is within NEAR_BUDGET of the latency
    budget; the first inside the budget whatever its expected accuracy; the fastest untried. A candidate expected to
    break the allowed drop is rejected unless its prediction errs by more than the drop (and where the meta-dataset
    measured it, it is rejected), so it comes after one that a timing's noise can still let in; but only one such
    near-budget try, for near-budget tries used up all four of a user model's tries in the budget benchmark.

    ``excess`` (_drop_excess) corrects expected drops by the tries: a candidate's is raised by the largest excess
    measured for its model and method at its ratio or below (pruning more loses no less). In the budget benchmark,
    a user's regnety_002 lost 6.4 pp at channel pruning 0.1 in int8 where 1.5 was expected, and the build spent its
    three other tries on channel pruning at 0.3 and 0.5 (6.7 pp and more) while the dense int8 model fitted.

    ``built_ms(candidate)``: the latency a built try of the same structure measured (planner.speed_key), or None.
    It comes before the pre-measured figure: masks run dense on the CPU targets, and a build tried four magnitude
    masks of one int8 structure that its first try had timed over the budget."""
    budget = the_plan.budget
    excess = excess or {}
    untried = [e for e in the_plan.ranked if e.candidate.id not in tried]
    if not untried:
        return None

    def latency(est):  # a pre-measured latency is the device's own figure; a prediction is corrected by the builds'
        built = built_ms(est.candidate) if built_ms else None
        if built is not None:
            return built
        return est.premeasured_ms if est.premeasured_ms is not None else est.cost.latency_ms * correction

    def keeps_drop(est):
        if est.accuracy is None or est.parent_accuracy is None:
            return True
        c = est.candidate
        extra = max((x for ratio, x in excess.get((c.model, c.prune.method), ()) if ratio <= c.prune.ratio), default=0.0)
        return budget.admits(accuracy_drop=est.parent_accuracy - est.accuracy + max(extra, 0.0))

    inside = [e for e in untried if budget.admits(latency_ms=latency(e), memory_mb=e.cost.memory_mb)]
    hopeful = [e for e in inside if keeps_drop(e)]
    if hopeful:
        return hopeful[0]
    near_tried = budget.latency_ms is not None and any(
        e.candidate.id in tried and latency(e) > budget.latency_ms for e in the_plan.ranked)
    near = [e for e in untried if keeps_drop(e) and budget.admits(memory_mb=e.cost.memory_mb)
            and (budget.latency_ms is None or latency(e) <= NEAR_BUDGET * budget.latency_ms)]
    if near and not near_tried:
        return min(near, key=latency)
    if inside:
        return inside[0]
    return min(untried, key=lambda e: e.latency_ms)


@dataclasses.dataclass(frozen=True)
class Built:
    """A candidate that went through every stage, with what was measured and the verdict."""

    estimate: object  # planner.Estimate
    measured: Measured
    outcome: str
    stages: tuple  # (CompressedModel, CalibratedModel, VerifiedModel, BenchmarkResult)


def run_build(options: BuildOptions, console=None) -> BuildReport:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    started = time.time()
    target = options.target
    validate_budget(options.budget, target)
    data = load_dataset(options.data_dir, options.image_size, **preprocess_args(options))
    if data.skipped_files:
        console.print(f"[yellow]skipped {data.skipped_files} unreadable images in {options.data_dir}[/]")
    deadline = None if options.time_budget_s is None else started + options.time_budget_s
    entries = resolve_models(options.model_specs, data, transfer=True)
    out = check_run_dir(options)
    if options.device is None:  # with --device the candidates are timed on that machine, not calibrated to this one
        ensure_calibrated(target, console)  # before transfer too: its choice of backbones plans with the costs
    run_dir = transfer_info = None
    if not entries or any(e.source == "user" for e in entries.values()):
        entries, transfer_info, run_dir = transferred_parents(options, data, entries, out, deadline, console)
    graphs, accuracies = model_facts(entries, data, console)
    if transfer_info is not None and deadline is not None:
        # The meta-predictor featurizes each new parent (minutes a model here); under a time budget the
        # meta-dataset's drops stand in for it.
        from edgecompress.meta.predictor import DropPrior

        accuracy_model = DropPrior.shipped(accuracies)
    else:
        accuracy_model = AccuracyModel.shipped(entries, data, accuracies, console, finetune=options.finetune,
                                               target=target)
    t_plan = time.perf_counter()
    the_plan = plan(target, options.budget, graphs, accuracies, sweep=options.sweep, accuracy_model=accuracy_model,
                    precisions=options.precisions or None, accuracy_resolution=1.0 / len(data.split("test")[1]))
    plan_ms = (time.perf_counter() - t_plan) * 1e3
    check_reachable(the_plan)
    run_dir = run_dir or prepare_run_dir(options, out)
    write_json(run_dir / "build.json", {"command": options.command, "version": __version__, "target": target.name,
                                        "budget": options.budget.to_dict()})
    budget = options.budget
    inside = sum(budget.admits(latency_ms=e.cost.latency_ms, memory_mb=e.cost.memory_mb) for e in the_plan.ranked)
    promised = sum(e.fits for e in the_plan.ranked)
    console.print(f"planned {len(the_plan.ranked)} candidates for {target.name} in {plan_ms:.1f} ms: {inside} predicted "
                  f"inside the latency/memory budget, {promised} of them with the accuracy bound inside the allowed drop")
    why_not = can_premeasure(target, options.device)
    if why_not is None and deadline is not None and deadline - time.time() < 0.5 * options.time_budget_s:
        why_not = f"less than half of the {options.time_budget_s:.0f} s time budget is left"  # a minute or two saved
    if why_not is None:
        the_plan = the_plan.with_premeasured(premeasure(the_plan, target, entries, data, run_dir / "premeasure", console),
                                             target)
        timed = [e for e in the_plan.ranked if e.premeasured_ms is not None]
        console.print(f"{sum(budget.admits(latency_ms=e.premeasured_ms) for e in timed)} of the {len(timed)} "
                      f"candidates timed before training meet the latency budget ({budget.latency_stat})")
    else:
        console.print(f"latency before training is predicted only: {why_not}")

    calibration = functools.cache(lambda: calibration_set(options, data, entries, accuracies, run_dir, console))
    pipeline = Pipeline(run_dir, target, data, entries, options.finetune, options.device,
                        int8_max_drop=options.budget.max_accuracy_drop, calibration=calibration,
                        calibration_key=calibration_key(options, data), teacher=transfer_info is not None,
                        baselines=accuracies)
    outcomes: dict[str, Built | str] = {}  # candidate id -> what was built, or why it could not be
    ratios: list[float] = []
    try_seconds: list[float] = []  # wall time of each try's stages
    structure_ms: dict[tuple, float] = {}  # planner.speed_key -> the budget statistic a built try measured
    chosen = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        for attempt in range(options.max_tries):
            # One candidate is always built; another only if it should end before the deadline, judged by the
            # slowest try so far (a try started just before the deadline used to overrun it by half).
            if deadline is not None and outcomes and time.time() + max(try_seconds) > deadline:
                console.print(f"[yellow]time budget of {options.time_budget_s:.0f} s: no time for another try "
                              f"after {attempt} (the slowest took {max(try_seconds):.0f} s)[/]")
                break
            try_started = time.time()
            correction = statistics.median(ratios) if ratios else 1.0
            est = _next_candidate(the_plan, set(outcomes), correction, _drop_excess(outcomes),
                                  lambda c: structure_ms.get(speed_key(c, target)))
            if est is None:
                break
            cand = est.candidate
            task = progress.add_task(f"[{attempt + 1}/{options.max_tries}] {cand.id}", total=options.finetune.steps)
            try:
                stages = pipeline.run_candidate(cand, progress=lambda step: progress.update(task, completed=step + 1),
                                                threads=est.threads)
            except NumericalError as exc:
                outcomes[cand.id] = f"rejected: {exc}"
                console.print(f"[red]{cand.id}: rejected, {exc}[/]")
                continue
            except OWN_MISTAKES:
                raise
            except Exception as exc:  # noqa: BLE001 - a converter or runtime that refuses this candidate's graph
                # Pre-measurement leaves out what the runtime refuses among the structures it times; a structure it
                # did not time (more than its slots, or a remote --device) is refused here, and the next one tried.
                why = f"it could not be made or run: {one_line(exc, 300)}"
                outcomes[cand.id] = f"rejected: {why}"
                console.print(f"[red]{cand.id}: rejected, {why}[/]")
                continue
            finally:
                progress.remove_task(task)
                try_seconds.append(time.time() - try_started)
            compressed, _, verified, benched = stages
            bench = _settled(benched, budget, target, options.device, console, est.premeasured_ms)
            measured = Measured(
                latency_ms_median=bench.get("latency_ms_median"), latency_ms_p90=bench.get("latency_ms_p90"),
                latency_ms_p99=bench.get("latency_ms_p99"), latency_ci_ms=bench.get("latency_ci_ms"),
                timings=bench.get("timings", 1), peak_memory_mb=bench.get("peak_memory_mb"),
                model_size_mb=bench.get("model_size_mb"), accuracy=verified.accuracy,
                accuracy_ci=accuracy_interval(verified.accuracy, len(data.split("test")[1])),
                baseline_accuracy=compressed.baseline_accuracy, threads=benched.threads)
            latency = budget.measured_latency_ms(bench) if bench else None
            if latency is None:
                latency = est.cost.latency_ms
            elif benched.measured:
                structure_ms[speed_key(cand, target)] = latency
            if measured.latency_ms_median is not None:
                ratios.append(measured.latency_ms_median / est.cost.latency_ms)
            # trtexec reports no resident memory: the prediction stands in for it, and the report says measured is null.
            memory = measured.peak_memory_mb or est.cost.memory_mb
            why = budget.violation(latency_ms=latency, memory_mb=memory,
                                   accuracy_drop=compressed.baseline_accuracy - verified.accuracy)
            built = Built(est, measured, "chosen" if why is None else f"rejected: {why}", stages)
            outcomes[cand.id] = built
            console.print(f"{cand.id}: {latency:.3f} ms {budget.latency_stat + ' measured' if benched.measured else 'predicted'}, "
                          f"accuracy {verified.accuracy:.4f}: {built.outcome}")
            if why is None:
                chosen = built
                break

    report = make_report(options, the_plan, outcomes, chosen, data, entries, run_dir, plan_ms, started, pipeline.reused)
    report = dataclasses.replace(report, transfer=transfer_info)
    if chosen is not None:
        make_bundle_for(report, chosen, data, options, run_dir)
    write_report(run_dir, report)
    if chosen is None:
        built = [(cid, o) for cid, o in outcomes.items() if isinstance(o, Built)]
        if built:
            cid, o = min(built, key=lambda item: item[1].measured.latency_ms_median or float("inf"))
            best = f"the fastest built was {cid} at {o.measured.latency_ms_median:.3f} ms"
        else:
            best = f"the fastest predicted is {the_plan.fastest().candidate.id} at {the_plan.fastest().cost.latency_ms:.3f} ms"
        raise BudgetError(f"no candidate met the budget after {len(outcomes)} tries; {best} (report: {run_dir / 'report.html'})")
    return report


RETIME_MAX = 2  # re-timings of a candidate whose latency interval holds the budget


def _settled(benched, budget, target, device, console, premeasured_ms: float | None = None) -> dict:
    """The benchmark's figures, re-timed in fresh processes (at most RETIME_MAX times) while a verdict could rest
    on one draw: the budget statistic's interval straddles the budget, or the timing contradicts the one taken of
    the same structure before training. A whole process can run slow or fast on a shared machine (round medians
    agree within it, processes differ by up to 1.8x here), which no interval over one process's rounds shows."""
    bench = dict(benched.measured or {})
    stat = budget.latency_stat
    for _ in range(RETIME_MAX):
        if budget.latency_ms is None or stat not in bench.get("latency_ci_ms", {}):
            break
        low, high = bench["latency_ci_ms"][stat]
        if straddles(bench, stat, budget.latency_ms):
            why = f"{stat} interval [{low:.3f}, {high:.3f}] ms holds the budget"
        elif premeasured_ms is not None and (premeasured_ms <= budget.latency_ms) != (bench[f"latency_ms_{stat}"] <= budget.latency_ms):
            why = f"{stat} {bench[f'latency_ms_{stat}']:.3f} ms contradicts {premeasured_ms:.3f} ms timed before training"
        else:
            break
        console.print(f"{benched.candidate.id}: {why}; timing again")
        bench = retimed(dataclasses.replace(benched, measured=bench), target, device)
    return bench


BUNDLE_DIR = "bundle"


def make_report(options, the_plan, outcomes: dict, chosen: Built | None, data, entries, run_dir: Path, plan_ms: float,
                started: float, reused_stages) -> BuildReport:
    target = options.target
    candidates = []
    for est in the_plan.ranked:
        outcome = outcomes.get(est.candidate.id)
        candidates.append(CandidateRecord(
            id=est.candidate.id, **est.candidate.to_dict(), predicted=est.predicted_dict(),
            fits_budget_predicted=est.fits, tried=outcome is not None,
            outcome=outcome.outcome if isinstance(outcome, Built) else outcome,
            measured=outcome.measured if isinstance(outcome, Built) else None,
        ))
    x, y = data.split("test")
    fields = {}
    if chosen:
        est = chosen.estimate
        compressed, calibrated, verified, benched = chosen.stages
        original_logits = predict(entries[est.candidate.model], x, data.num_classes)
        fields = {
            "choice": {**est.candidate.to_dict(), "method_description": _method_description(est.candidate)},
            "choice_id": est.candidate.id,
            "artifact": f"{BUNDLE_DIR}/{calibrated.artifact.name}",
            "bundle": BUNDLE_DIR,
            "measured": chosen.measured,
            "measured_where": benched.where,
            "benchmark": benched.measured,
            "verified_in": verified.verified_in,
            "calibration": calibrated.calibration,
            "finetune": dataclasses.asdict(options.finetune) if compressed.finetune_steps else None,
            "predicted": {"latency_ms": est.cost.latency_ms, "memory_mb": est.cost.memory_mb, "accuracy": est.accuracy,
                          "accuracy_low": est.accuracy_low,
                          "latency_model": describe_cost_model(target, est.candidate.quant.precision)},
            "device": ({"name": str(options.device[0]), "accuracy": (benched.measured or {}).get("accuracy"),
                        "eval_samples": (benched.measured or {}).get("eval_samples")} if options.device else None),
            "per_class_accuracy": {
                "classes": list(data.class_names),
                "original": per_class_accuracy(original_logits.argmax(1), y, data.num_classes),
                "compressed": verified.per_class_accuracy,
            },
            "deploy": target.runtime().deploy_notes(calibrated.artifact, est.candidate.quant.precision, data.input_shape,
                                                    sparse=get_method(est.candidate.prune.method).uses_sparse_kernels(target)),
        }
    return BuildReport(
        tool_version=__version__, command=options.command, target=target.name, runtime=target.runtime_name,
        runtime_version=target.runtime().version(), budget=options.budget.to_dict(),
        dataset={"name": data.name, **data.features(), "test_samples": int(len(y))}, test_samples=int(len(y)),
        accuracy_basis=the_plan.accuracy_basis, plan_ms=plan_ms, candidates=tuple(candidates), run_dir=str(run_dir),
        wall_seconds=round(time.time() - started, 1), reused_stages=tuple(reused_stages), **fields,
    )


def make_bundle_for(report: BuildReport, chosen: Built, data, options, run_dir: Path) -> Path:
    """The deployment bundle of the chosen artifact, where the report says it is."""
    calibrated = chosen.stages[1]
    return make_bundle(
        run_dir / report.bundle, artifact=calibrated.artifact, runtime_name=report.runtime,
        runtime_version=report.runtime_version, target_name=report.target, precision=report.choice["precision"],
        class_names=data.class_names, preprocess=data.preprocess.to_dict(), command=report.command,
        deploy_notes=report.deploy, archive=options.archive, threads=chosen.measured.threads,
    )


def _method_description(candidate) -> str:
    method = get_method(candidate.prune.method)
    return method.description if method.kind == "none" else f"{method.description}, ratio {candidate.prune.ratio:.2f}"


def command_line(argv: list[str]) -> str:
    import shlex

    return shlex.join(["edgecompress", *argv])
