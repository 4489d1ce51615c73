"""Budget benchmark: does `edgecompress build` keep its latency budget on this machine?

    python tools/bench_budget.py --json                       # every case, resumable (finished cases are skipped)
    python tools/bench_budget.py --targets ort-cpu --cases 1 --work /tmp/bb --cache /tmp/bb/cache.jsonl --json
    python tools/bench_budget.py --markdown                   # tables for docs/benchmarks.md, from the cache only

Cases: (model, target, budget). Models: every zoo model (edgecompress.models.list_models()), then USER_ARCHS,
timm architectures in neither the digits zoo nor the Fashion-MNIST zoo (the latency profile's networks are random
CNNs, not timm architectures), trained here as a user would: the zoo's training loop (tools/train_zoo.py's
train_one, its recipe with USER_EPOCHS epochs instead of 60) on the digits, the best-validation fp32 state dict
saved under WORK/user_models/ and passed as `--model timm:ARCH=WORK/user_models/ARCH.pth`. They are trained only
when a case of theirs runs, and once (the checkpoint is reused). Budgets: FACTORS times the model's dense fp32
latency on the target (the budget statistic, p90, measured by the exhaustive timing below, kept in WORK so
reruns use the same budgets), in the order they run (1.2x first, so a short --cases run sees a delivery).

Each case is one `edgecompress build --target T --latency Bms --latency-stat p90 --max-accuracy-drop 2%
--model SPEC --out WORK/runs/...`, run in-process through the CLI's own click command (the real option parsing
and defaults; exceptions are kept, so "no candidate met the budget" (BudgetError, exit 2) is recorded as a
non-delivery, and any other failure as an error). The report is read back with edgecompress.report.read_report.

Metrics, per target and overall:

- ``budget_kept``: of the delivered artifacts, the share whose independent re-timing meets the budget within its
  confidence interval: the bundle's artifact is timed again in a fresh process (runtime.benchmark_interleaved,
  20 warm-up, 10 interleaved rounds of 200 runs, as the build's benchmark), in rounds interleaved with the
  model's dense fp32 artifact as a reference, and kept when the low end of the 95% bootstrap interval of p90
  (edgecompress.deploy.timing.with_statistics) is at most the budget. ``budget_kept_point`` is the share whose p90
  itself is within budget. The reference's p90 over its own p90 in the exhaustive timing on the same threads
  (``reference_drift``) shows how much the machine's speed moved between the two. ``budget_kept_steady`` judges each on a re-timing whose reference
  ran within DRIFT_TOLERANCE of its earlier p90 (re-timed up to RETIME_ATTEMPTS times while the reference drifted;
  the first attempt's verdict when none was steady): a slow spell of the machine slows the reference too.
- ``feasible_found``: of the cases where an exhaustive timing shows a fitting candidate exists, the share where
  the build delivered (errors count as not delivered). Exhaustive timing: the build's own plan for the model
  (same data, models, accuracy model, calibration and default sweep; planned here with a placeholder budget,
  its candidates do not depend on the budget) is handed to edgecompress.plan.premeasure.premeasure with
  premeasure.to_time's limit lifted, so every distinct structure (planner.speed_key: pruned structure x
  precision; masks run dense on these targets) is made one-shot and timed in one fresh process in interleaved
  rounds: 16 structures on ort-cpu, 24 on openvino-cpu. This is done once per (target, model) and shared by its
  budgets. A fitting candidate exists when some candidate's structure has a measured p90 within the budget AND
  the planner's expected accuracy for it is within the allowed drop (planner.Budget.admits), or it is the
  uncompressed fp32 model (drop nil by construction). Accuracy is not measured (the fine-tuned accuracy is the
  build's business). ``feasible_found_bound`` asks the planner's lower bound instead of its expectation (the
  guarantee rank() puts first); the shipped predictor's bound can put even the uncompressed model more than
  the allowed drop below its own accuracy, so the uncompressed fp32 model is exempt there too.
  ``delivered_when_infeasible`` counts deliveries the exhaustive timing did not predict (noise between the two
  timings, or an accuracy the planner did not expect).
- ``build_seconds``: median wall time of the builds (the CLI call, training of user models excluded).
- ``plan_seconds_user_model``: median of the build's report.plan_ms (which includes featurizing the user
  model's unseen candidates, done inside plan()) over the user-model cases; ``featurize_seconds_user_model``
  separates that part, from a second planning here (the exhaustive step) with the accuracy model's call timed.
  ``plan_seconds_zoo_model`` is the same for zoo models, whose features are read from the shipped meta-dataset.

--latency-stat median|p90|p99 picks the budget statistic (default p90, as build); it is part of a case's key
and the exhaustive timings are kept per statistic. --cases N keeps the first N cases of the ordered list (finished ones still count towards N). Errors are
recorded in the cache and not rerun unless --retry-errors. The summary covers every cached case of the chosen
targets and records the machine (edgecompress.costmodel.devicecal.machine_fingerprint), the load average and the date;
each cache line has its own date and load average. The machine may be shared: read single cases with care.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgecompress.core.fsutil import append_jsonl, atomic_path, read_jsonl, write_json  # noqa: E402

TARGETS = ("ort-cpu", "openvino-cpu")
FACTORS = (1.2, 0.5, 2.0, 0.8)  # budget / dense fp32 p90, in the order the cases run
USER_ARCHS = ("lcnet_100", "tinynet_c", "regnety_002")  # 1.7 M, 1.2 M, 2.8 M parameters
USER_EPOCHS = 10  # the zoo's recipe has 60; about 16 steps an epoch on the digits' 970 training images
USER_TASK = "bench-budget-user"  # the training recipe's name in train_zoo.TASKS (registered here, in-process)
LATENCY_STAT = "p90"  # the budget statistic: the CLI's default --latency-stat (this script's --latency-stat sets it)
MAX_DROP = 0.02  # the CLI's default --max-accuracy-drop, passed explicitly
RETIME_WARMUP, RETIME_RUNS, RETIME_ROUNDS = 20, 200, 10  # the build's own benchmark (pipeline.BENCH_*)
DRIFT_TOLERANCE = 1.25  # a reference within 1.25x of its earlier p90: the machine runs as it did (+-25% round to round)
RETIME_ATTEMPTS = 3


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)


# --- user models: trained here as a user would ------------------------------------------------------------------


def user_model(arch: str, work: Path, data) -> tuple[str, dict]:
    """``timm:ARCH=path`` for ``arch`` trained on the digits (cached in ``work``), and what its training gave."""
    import torch
    import train_zoo

    directory = work / "user_models"
    weights, info_path = directory / f"{arch}.pth", directory / f"{arch}.json"
    if weights.is_file() and info_path.is_file():
        return f"timm:{arch}={weights}", json.loads(info_path.read_text())
    import timm
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgecompress.compress.finetune import evaluate_torch

    recipe = {**train_zoo.DEFAULT, "epochs": USER_EPOCHS}
    train_zoo.TASKS[USER_TASK] = train_zoo.Task(USER_TASK, "digits-32", recipe, {a: {} for a in USER_ARCHS})
    started = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True) as progress:
        (directory / ".train").mkdir(parents=True, exist_ok=True)
        best = train_zoo.train_one(arch, USER_TASK, {}, data, directory / ".train", progress)
    model = timm.create_model(arch, pretrained=False, num_classes=data.num_classes)
    model.load_state_dict(best["state"])
    info = {"architecture": arch, "recipe": recipe, "best_epoch": best["epoch"], "val_accuracy": best["val"],
            "test_accuracy": evaluate_torch(model, *data.split("test")), "train_seconds": round(time.time() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    with atomic_path(weights) as tmp:
        torch.save(best["state"], tmp)
    write_json(info_path, info)
    _log(f"{arch}: trained {USER_EPOCHS} epochs in {info['train_seconds']:.0f} s, test accuracy {info['test_accuracy']:.4f}")
    return f"timm:{arch}={weights}", info


# --- the build's plan, and every structure in it timed ------------------------------------------------------------


class _TimedAccuracyModel:
    """The accuracy model with its calls timed (featurizing unseen candidates happens there)."""

    def __init__(self, model):
        self.model, self.basis, self.seconds = model, model.basis, 0.0

    def __call__(self, candidates):
        t0 = time.perf_counter()
        try:
            return self.model(candidates)
        finally:
            self.seconds += time.perf_counter() - t0


def plan_as_build(target, spec: str, data, console):
    """The plan `build --model SPEC` makes (default sweep and precisions), with a placeholder budget, and timings."""
    from edgecompress.build import model_facts, resolve_models
    from edgecompress.compress.methods import sweep_for
    from edgecompress.costmodel.devicecal import ensure_calibrated
    from edgecompress.meta.predictor import AccuracyModel
    from edgecompress.plan.planner import Budget, plan

    entries = resolve_models((spec,), data)
    graphs, accuracies = model_facts(entries, data)
    accuracy_model = AccuracyModel.shipped(entries, data, accuracies, console, target=target)
    timed = _TimedAccuracyModel(accuracy_model) if accuracy_model is not None else None
    ensure_calibrated(target, console)
    placeholder = Budget(latency_ms=1e9, max_accuracy_drop=MAX_DROP, latency_stat=LATENCY_STAT)
    t0 = time.perf_counter()
    the_plan = plan(target, placeholder, graphs, accuracies, sweep=sweep_for(()), accuracy_model=timed)
    plan_ms = (time.perf_counter() - t0) * 1e3
    return the_plan, entries, {"plan_ms": plan_ms, "accuracy_model_ms": timed.seconds * 1e3 if timed else None}


@contextlib.contextmanager
def _every_structure():
    """premeasure() with to_time's limit (premeasure.MAX_ARTIFACTS, bound as a default argument) lifted."""
    from edgecompress.plan import premeasure as pm

    original = pm.to_time
    pm.to_time = lambda the_plan, target, limit=None: original(the_plan, target, limit=10**9)
    try:
        yield
    finally:
        pm.to_time = original


def exhaustive(target, label: str, spec: str, work: Path, data) -> dict:
    """Every distinct structure of the model's plan timed here (cached per (target, model) in ``work``)."""
    from edgecompress.models import load_model
    from edgecompress.plan.premeasure import premeasure
    from edgecompress.runtimes.base import export_onnx

    directory = work / "exhaustive" / target.name / LATENCY_STAT / _safe(label)
    summary_path = directory / "summary.json"
    if summary_path.is_file():
        return {**json.loads(summary_path.read_text()), "dense_fp32_ms_by_threads": _dense_by_threads(directory)}
    console = _console()
    started = time.time()
    the_plan, entries, timings = plan_as_build(target, spec, data, console)
    (name, entry), = entries.items()
    _log(f"{target.name} {label}: timing all {len({e.candidate.id for e in the_plan.ranked})} candidates' distinct "
         f"structures (planned in {timings['plan_ms']:.0f} ms)")
    with _every_structure():
        latencies = premeasure(the_plan, target, entries, data, directory / "premeasure", console).latency_ms
    dense = [ms for key, ms in latencies.items() if _dense_fp32(key)]
    if not dense or dense[0] is None:
        raise RuntimeError(f"{target.name} {label}: the dense fp32 structure was not timed")
    # The re-timing's reference: the uncompressed model's fp32 artifact.
    reference_dir = directory / "reference"
    (reference_dir / "fp32").mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(load_model(entry, data.num_classes), data.input_shape, reference_dir / "model.onnx")
    reference = target.runtime().export(onnx_path, "fp32", reference_dir / "fp32")
    from edgecompress.plan.planner import speed_key

    summary = {
        "target": target.name, "model": label, "entry": name, "date": time.strftime("%Y-%m-%d %H:%M"),
        "statistic": LATENCY_STAT, "dense_fp32_ms": dense[0],
        "structures": [[list(key), ms] for key, ms in latencies.items()],
        "candidates": [{"id": e.candidate.id, "key": list(speed_key(e.candidate, target)),
                        "method": e.candidate.prune.method, "precision": e.candidate.quant.precision,
                        "parent_accuracy": e.parent_accuracy, "accuracy": e.accuracy, "accuracy_low": e.accuracy_low}
                       for e in the_plan.ranked],
        "plan_ms": timings["plan_ms"], "accuracy_model_ms": timings["accuracy_model_ms"],
        "accuracy_basis": the_plan.accuracy_basis, "reference_artifact": str(reference),
        "seconds": round(time.time() - started, 1),
    }
    write_json(summary_path, summary)
    summary["dense_fp32_ms_by_threads"] = _dense_by_threads(directory)
    _log(f"{target.name} {label}: {len(latencies)} structures timed in {summary['seconds']:.0f} s; dense fp32 "
         f"{LATENCY_STAT} {dense[0]:.3f} ms")
    return summary


def _dense_fp32(key: tuple) -> bool:
    """Whether a planner.speed_key is the uncompressed model's fp32 structure."""
    return key[1] == "dense" and key[3] == "fp32"


def _dense_by_threads(directory: Path) -> dict[str, float]:
    """The dense fp32 structure's p90 on each thread count pre-measurement tried (repr(threads) -> ms): the re-timing's
    reference runs on the shipped artifact's threads, and its drift is against its own earlier figure on those."""
    found = json.loads((directory / "premeasure" / "latencies.json").read_text())
    j = next(i for i, key in enumerate(found["measured"]) if _dense_fp32(ast.literal_eval(key)))
    return {t: figures[j] for t, figures in found["all_threads"].items()}


def fitting(ex: dict, budget_ms: float) -> tuple[list[str], list[str]]:
    """Candidates whose structure's measured p90 is within the budget and whose accuracy the planner expects within
    the allowed drop (the uncompressed fp32 model always: its drop is nil by construction); and those of them
    whose planner lower bound is within it too (the guarantee rank() asks for)."""
    from edgecompress.plan.planner import Budget

    budget = Budget(latency_ms=budget_ms, max_accuracy_drop=MAX_DROP, latency_stat=LATENCY_STAT)
    measured = {tuple(key): ms for key, ms in ex["structures"]}
    expected, bound = [], []
    for c in ex["candidates"]:
        ms = measured.get(tuple(c["key"]))
        if ms is None or not budget.admits(latency_ms=ms):
            continue
        parent, mean, low = c["parent_accuracy"], c.get("accuracy"), c["accuracy_low"]
        exact = c.get("method") == "none" and c.get("precision") == "fp32"
        if exact or parent is None or mean is None or budget.admits(accuracy_drop=parent - mean):
            expected.append(c["id"])
        if exact or parent is None or low is None or budget.admits(accuracy_drop=parent - low):
            bound.append(c["id"])
    return expected, bound


# --- one case: the build, and its artifact timed again --------------------------------------------------------------


def run_build_cli(argv: list[str]) -> tuple[str, str | None]:
    """The CLI's build command in-process: ("delivered" | "not_delivered" | "error", why)."""
    import logging

    from edgecompress import cli
    from edgecompress.core.errors import BudgetError

    for name in cli.QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the build's own lines; stdout is for --json
            cli.cli.main(args=argv, prog_name="edgecompress", standalone_mode=False, obj={"argv": argv})
    except BudgetError as exc:  # exit 2: no candidate met the budget, or the budget is out of reach
        return "not_delivered", str(exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 — a failed build is a result of the benchmark
        return "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "delivered", None


def _retime_once(target, artifact: Path, reference: Path, budget_ms: float, dense_ms: float, threads: int | None) -> dict:
    from edgecompress.deploy.timing import with_statistics
    from edgecompress.plan.planner import Budget

    results = target.runtime().benchmark_interleaved([artifact, reference], warmup=RETIME_WARMUP, runs=RETIME_RUNS,
                                                     rounds=RETIME_ROUNDS, threads=threads)
    mine, ref = (with_statistics(r) for r in results)
    budget = Budget(latency_ms=budget_ms, latency_stat=LATENCY_STAT)
    value = budget.measured_latency_ms(mine)
    low, high = mine["latency_ci_ms"][LATENCY_STAT]
    ref_value = budget.measured_latency_ms(ref)
    return {
        "latency_ms_median": mine["latency_ms_median"], "latency_ms_p90": mine["latency_ms_p90"],
        "latency_ms_p99": mine["latency_ms_p99"], "latency_ci_ms": mine["latency_ci_ms"], "rounds": mine["rounds"],
        "kept": low <= budget_ms, "point_within": value <= budget_ms, "ci_low": low, "ci_high": high,
        "reference_fp32_ms": ref_value, "reference_drift": ref_value / dense_ms if dense_ms else None,
    }


def _steady(attempt: dict) -> bool:
    drift = attempt["reference_drift"]
    return drift is None or 1 / DRIFT_TOLERANCE <= drift <= DRIFT_TOLERANCE


def retime(target, artifact: Path, reference: Path, budget_ms: float, dense_ms: float, threads: int | None = None) -> dict:
    """The delivered artifact timed again in a fresh process, rounds interleaved with the dense fp32 reference, on
    the inference threads it ships with (the bundle's runtime.json; the reference runs on them too).

    The first re-timing is the verdict (``kept``). When the reference itself ran more than DRIFT_TOLERANCE away
    from its own earlier timing, the machine was in a slow or fast spell, and the re-timing is repeated (at most
    RETIME_ATTEMPTS in all) until one finds the reference steady: ``kept_steady`` is that one's verdict (the first
    one's when none is steady). Every attempt is kept in ``attempts``."""
    attempts = [_retime_once(target, artifact, reference, budget_ms, dense_ms, threads)]
    while not _steady(attempts[-1]) and len(attempts) < RETIME_ATTEMPTS:
        attempts.append(_retime_once(target, artifact, reference, budget_ms, dense_ms, threads))
    steady = next((a for a in attempts if _steady(a)), attempts[0])
    return {**attempts[0], "kept_steady": steady["kept"], "steady_attempt": attempts.index(steady),
            "attempts": [{k: a[k] for k in ("latency_ms_p90", "ci_low", "ci_high", "kept", "reference_drift")}
                         for a in attempts]}


def run_case(case: dict, target, spec: str, ex: dict, work: Path, finetune_steps: int | None) -> dict:
    budget_ms = case["budget_ms"]
    out = work / "runs" / target.name / _safe(case["model"]) / f"{LATENCY_STAT}-x{case['factor']:g}"
    if out.exists():  # an interrupted attempt: start the build afresh
        shutil.rmtree(out)
    argv = ["build", "--target", target.name, "--latency", f"{budget_ms:g}ms", "--latency-stat", LATENCY_STAT,
            "--max-accuracy-drop", f"{MAX_DROP * 100:g}%", "--model", spec, "--out", str(out)]
    if finetune_steps is not None:
        argv += ["--finetune-steps", str(finetune_steps)]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    outcome, why = run_build_cli(argv)
    seconds = time.perf_counter() - t0
    from edgecompress.report import read_report

    report = read_report(out) if (out / "report.json").is_file() else None
    fits, fits_bound = fitting(ex, budget_ms)
    record = {
        **case, "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_1min": round(load, 2),
        "latency_stat": LATENCY_STAT, "command": "edgecompress " + " ".join("RUN_DIR" if a == str(out) else a for a in argv),
        "outcome": outcome, "why": why, "delivered": outcome == "delivered",
        "chosen_id": report.choice_id if report else None, "build_seconds": round(seconds, 1),
        "plan_ms": report.plan_ms if report else None,
        "tried": [c.id for c in report.candidates if c.tried] if report else [],
        "build_measured": ({"latency_ms_median": report.measured.latency_ms_median,
                            "latency_ms_p90": report.measured.latency_ms_p90,
                            "latency_ms_p99": report.measured.latency_ms_p99,
                            "latency_ci_ms": report.measured.latency_ci_ms, "timings": report.measured.timings,
                            "accuracy": report.measured.accuracy,
                            "baseline_accuracy": report.measured.baseline_accuracy}
                           if report and report.measured else None),
        "dense_fp32_ms": ex["dense_fp32_ms"],
        "exhaustive_feasible": bool(fits), "exhaustive_fitting_candidates": len(fits),
        "exhaustive_feasible_bound": bool(fits_bound), "exhaustive_fitting_candidates_bound": len(fits_bound),
        "exhaustive_structures": len(ex["structures"]),
        "exhaustive_fastest_ms": min(ms for _, ms in ex["structures"] if ms is not None),
        "probe_plan_ms": ex["plan_ms"], "probe_accuracy_model_ms": ex["accuracy_model_ms"],
        "retime": None,
    }
    if record["delivered"] and report.artifact:
        threads = report.measured.threads
        record["retime"] = retime(target, out / report.artifact, Path(ex["reference_artifact"]), budget_ms,
                                  ex["dense_fp32_ms_by_threads"].get(repr(threads), ex["dense_fp32_ms"]), threads)
    return record


# --- the cases, the summary, the tables --------------------------------------------------------------------------


def case_key(record: dict) -> tuple:
    return (record["target"], record["model"], float(record["factor"]), record.get("latency_stat", "p90"))


def model_list(names: list[str] | None) -> list[tuple[str, str]]:
    """(label, kind): the zoo first, then the user architectures."""
    from edgecompress.models import list_models

    models = [(m, "zoo") for m in list_models()] + [(f"user:{a}", "user") for a in USER_ARCHS]
    if names:
        wanted = set(names)
        models = [(label, kind) for label, kind in models if label in wanted or label.removeprefix("user:") in wanted]
    return models


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _share(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def summarize(records: list[dict]) -> dict:
    delivered = [r for r in records if r["delivered"]]
    retimed = [r for r in delivered if r.get("retime")]
    feasible = [r for r in records if r["exhaustive_feasible"]]
    feasible_bound = [r for r in records if r.get("exhaustive_feasible_bound")]
    user = [r for r in records if r["kind"] == "user"]
    zoo = [r for r in records if r["kind"] == "zoo"]
    return {
        "cases": len(records),
        "delivered": len(delivered),
        "not_delivered": sum(r["outcome"] == "not_delivered" for r in records),
        "errors": sum(r["outcome"] == "error" for r in records),
        "budget_kept": _share(r["retime"]["kept"] for r in retimed),
        "budget_kept_point": _share(r["retime"]["point_within"] for r in retimed),
        "budget_kept_steady": _share(r["retime"].get("kept_steady", r["retime"]["kept"]) for r in retimed),
        "retimed": len(retimed),
        "feasible_cases": len(feasible),
        "feasible_found": _share(r["delivered"] for r in feasible),
        "feasible_cases_bound": len(feasible_bound),
        "feasible_found_bound": _share(r["delivered"] for r in feasible_bound),
        "delivered_when_infeasible": sum(r["delivered"] and not r["exhaustive_feasible"] for r in records),
        "build_seconds": _median(r["build_seconds"] for r in records),
        "plan_seconds_user_model": _median(r["plan_ms"] / 1e3 for r in user if r["plan_ms"] is not None),
        "featurize_seconds_user_model": _median(r["probe_accuracy_model_ms"] / 1e3 for r in user
                                                if r["probe_accuracy_model_ms"] is not None),
        "plan_seconds_zoo_model": _median(r["plan_ms"] / 1e3 for r in zoo if r["plan_ms"] is not None),
        "reference_drift_median": _median(r["retime"]["reference_drift"] for r in retimed),
    }


def machine(targets: list[str]) -> dict:
    from edgecompress.costmodel.devicecal import machine_fingerprint
    from edgecompress.targets import get_target

    prints = {t: machine_fingerprint(get_target(t).runtime()) for t in targets}
    first = next(iter(prints.values()))
    return {"cpu": first["cpu"], "logical_cores": first["logical_cores"], "isa": first["isa"],
            "runtimes": {t: f"{p['runtime']} {p['runtime_version']}" for t, p in prints.items()},
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _fmt(value, spec=".3f", none="—") -> str:
    return none if value is None else format(value, spec)


def _steady_note(rt: dict | None) -> str:
    """Every re-timing where there was more than one (the reference drifted): p90 and the reference's drift."""
    if not rt or len(rt.get("attempts", ())) < 2:
        return ""
    each = ", ".join(f"{a['latency_ms_p90']:.3f} ({'yes' if a['kept'] else 'no'}, drift {a['reference_drift']:.2f})"
                     for a in rt["attempts"])
    return f"; re-timed {len(rt['attempts'])}x: {each}"


def markdown(records: list[dict], summary: dict) -> str:
    lines = [f"Machine: {summary['machine']['cpu']}, {summary['machine']['logical_cores']} logical cores "
             f"(load average {', '.join(map(str, summary['machine']['load_average']))} now); "
             f"cases measured {summary['first_case']} to {summary['last_case']}; budget statistic {LATENCY_STAT}.", "",
             "| target | cases | delivered | budget kept (CI) | budget kept (point) | budget kept (steady reference) "
             "| feasible | feasible found "
             "| feasible found (bound) | delivered when infeasible | errors | build s (median) | plan s, user model | of it featurizing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in [*summary["targets"].items(), ("all", summary["overall"])]:
        lines.append(f"| {name} | {s['cases']} | {s['delivered']} | {_fmt(s['budget_kept'], '.0%')} "
                     f"| {_fmt(s['budget_kept_point'], '.0%')} | {_fmt(s.get('budget_kept_steady'), '.0%')} "
                     f"| {s['feasible_cases']} | {_fmt(s['feasible_found'], '.0%')} "
                     f"| {_fmt(s['feasible_found_bound'], '.0%')} ({s['feasible_cases_bound']}) "
                     f"| {s['delivered_when_infeasible']} | {s['errors']} | {_fmt(s['build_seconds'], '.0f')} "
                     f"| {_fmt(s['plan_seconds_user_model'], '.1f')} | {_fmt(s['featurize_seconds_user_model'], '.1f')} |")
    lines += ["", f"| target | model | budget ms (x dense fp32) | outcome | chosen | build's {LATENCY_STAT} ms "
                  f"| re-timed {LATENCY_STAT} ms [95% CI] "
                  "| kept | reference drift | fitting candidates (exhaustive; with the bound) | build s | plan ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rt = r.get("retime")
        bm = r.get("build_measured") or {}
        stat = f"latency_ms_{r['latency_stat']}"
        retimed = f"{rt[stat]:.3f} [{rt['ci_low']:.3f}, {rt['ci_high']:.3f}]" if rt else "—"
        lines.append(f"| {r['target']} | {r['model']} | {r['budget_ms']:g} ({r['factor']:g}x) | {r['outcome']} "
                     f"| {r['chosen_id'] or '—'} | {_fmt(bm.get(stat))} | {retimed} "
                     f"| {('yes' if rt['kept'] else 'no') if rt else '—'}{_steady_note(rt)} "
                     f"| {_fmt(rt and rt['reference_drift'], '.2f')} | {r['exhaustive_fitting_candidates']}; "
                     f"{r.get('exhaustive_fitting_candidates_bound', '—')} "
                     f"| {r['build_seconds']:.0f} | {_fmt(r['plan_ms'], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global LATENCY_STAT
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--models", nargs="*", help="zoo names or user architectures (default: all)")
    parser.add_argument("--cases", type=int, help="only the first N cases of the ordered list (quick runs)")
    parser.add_argument("--work", type=Path, default=ROOT / "tools" / ".bench_budget",
                        help="run directories, exhaustive timings, trained user models (default: tools/.bench_budget)")
    parser.add_argument("--cache", type=Path, default=ROOT / "docs" / "bench_budget.jsonl",
                        help="one JSON line per finished case (resume); default: docs/bench_budget.jsonl")
    parser.add_argument("--latency-stat", choices=("median", "p90", "p99"), default=LATENCY_STAT,
                        help="the budget statistic, passed to build (default: %(default)s, build's default)")
    parser.add_argument("--finetune-steps", type=int, help="passed to build (default: build's own, 150)")
    parser.add_argument("--retry-errors", action="store_true", help="run cases that ended in an error again")
    parser.add_argument("--json", action="store_true", help="print the summary per target and overall as JSON")
    parser.add_argument("--markdown", action="store_true", help="print tables from the cache only (runs nothing)")
    args = parser.parse_args(argv)
    LATENCY_STAT = args.latency_stat
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"targets: {', '.join(unknown)}; this benchmark times {', '.join(TARGETS)} on this machine")
    if args.cases is not None and args.cases < 1:
        parser.error("--cases must be at least 1")
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(args.cache, key=case_key)
    models = model_list(args.models)
    cases = [{"target": t, "model": label, "kind": kind, "factor": f, "latency_stat": LATENCY_STAT}
             for label, kind in models for t in targets for f in FACTORS]
    if args.cases is not None:
        cases = cases[:args.cases]

    if not args.markdown:
        from edgecompress.data.datasets import load_digits
        from edgecompress.targets import get_target

        data, skipped = None, 0
        started = time.time()
        for i, case in enumerate(cases, 1):
            key = case_key(case)
            if key in done and not (args.retry_errors and done[key]["outcome"] == "error"):
                continue
            data = data or load_digits(32)
            target = get_target(case["target"])
            try:
                if case["kind"] == "user":
                    spec, info = user_model(case["model"].removeprefix("user:"), args.work, data)
                    case["user_model"] = {k: info[k] for k in ("test_accuracy", "train_seconds", "recipe")}
                else:
                    spec = case["model"]
                ex = exhaustive(target, case["model"], spec, args.work, data)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 — not the build's failure: the case stays to do
                _log(f"[{i}/{len(cases)}] {case['target']} {case['model']}: skipped, preparing it failed: "
                     f"{type(exc).__name__}: {exc}")
                skipped += 1
                continue
            case["finetune_steps"] = args.finetune_steps  # None: build's default
            case["budget_ms"] = round(ex["dense_fp32_ms"] * case["factor"], 4)
            _log(f"[{i}/{len(cases)}] {case['target']} {case['model']} budget {case['budget_ms']:g} ms "
                 f"({case['factor']:g}x dense fp32): building")
            record = run_case(case, target, spec, ex, args.work, args.finetune_steps)
            append_jsonl(args.cache, record)
            done[key] = record
            rt = record["retime"]
            _log(f"[{i}/{len(cases)}] {record['outcome']}{' ' + record['chosen_id'] if record['chosen_id'] else ''} "
                 f"in {record['build_seconds']:.0f} s"
                 + (f"; re-timed {LATENCY_STAT} {rt[f'latency_ms_{LATENCY_STAT}']:.3f} ms [{rt['ci_low']:.3f}, {rt['ci_high']:.3f}], "
                    f"{'kept' if rt['kept'] else 'NOT kept'}" if rt else "")
                 + f"; exhaustive: {record['exhaustive_fitting_candidates']} fitting candidates"
                 + (f" ({record['why']})" if record["why"] else ""))
        _log(f"cases done in {time.time() - started:.0f} s" + (f"; {skipped} skipped (see above)" if skipped else ""))

    records = [r for r in done.values() if r["target"] in targets and r.get("latency_stat", "p90") == LATENCY_STAT
               and (not args.models or r["model"] in {label for label, _ in models})]
    records.sort(key=lambda r: (r["target"], r["model"], r["factor"]))
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(targets),
        "first_case": min((r["date"] for r in records), default=None),
        "last_case": max((r["date"] for r in records), default=None),
        "latency_stat": LATENCY_STAT, "max_accuracy_drop": MAX_DROP, "factors": list(FACTORS),
        "user_architectures": list(USER_ARCHS), "user_epochs": USER_EPOCHS,
        "targets": {t: summarize([r for r in records if r["target"] == t]) for t in targets},
        "overall": summarize(records),
    }
    if args.markdown:
        print(markdown(records, summary))
    elif args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(json.dumps({k: summary[k] for k in ("date", "targets", "overall")}, indent=2))
    return 1 if not args.markdown and skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
