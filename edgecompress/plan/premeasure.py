"""Time candidate architectures on the device before fine-tuning anything.

A candidate's speed does not depend on its accuracy: its pruned or factorized graph, made one-shot, exported and
turned into the target's artifact (int8 calibrated on a few images), runs the kernels the fine-tuned candidate will
run. So before anything is trained, the plan's most promising structures are built this way and timed in fresh
processes, a few to a process in interleaved rounds; the plan is re-ranked on those figures, and only what already
fits is fine-tuned. Predictions narrow the space first (only candidates predicted within ``SLACK`` times the budget are
timed) and stand alone where the device cannot be reached from here.

Each structure is timed at each of the runtime's thread counts (``thread_choices``: its own choice, and one thread on
a machine with more cores) and runs on the fewest threads among the fastest (fastest_threads): how many threads an
artifact runs on is part of what is built, timed and shipped (the bundle's runtime.json), like its precision.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from edgecompress.core.errors import OWN_MISTAKES, one_line
from edgecompress.core.fsutil import atomic_path, write_json
from edgecompress.deploy.timing import with_statistics
from edgecompress.plan.planner import Plan, speed_key
from edgecompress.targets import Target

MAX_ARTIFACTS = 16  # distinct (structure, precision) pairs timed per build; an int8 one takes a few seconds to make
SLACK = 2.0  # predictions on another machine are off by up to about 2x either way
CALIB_IMAGES = 16  # int8 ranges for timing only: the kernels, not the accuracy, matter here
WARMUP, RUNS, ROUNDS = 5, 60, 6
# Artifacts interleaved in one timing process. Inside builds, 16 OpenVINO models in one process timed up to 1.7x
# slower than the same structures built and timed alone (mobilenetv3_small_100 L1 0.60 fp16: 0.402 against 0.244 ms
# p90), which turned the plan away from candidates that fit; a few per process keep the comparison fair.
INTERLEAVE = 4
# Thread counts whose figures are within this share of the fastest count as equally fast, and the fewest threads win
# among them: the same latency with the other cores free. On 2 cores here, processes running a small network on the
# runtimes' default two threads ran in one of two speeds, 1x or 1.5-2.2x (ONNX Runtime: 0.062 or 0.134 ms, one
# thread 0.063 every time): a pre-measurement that drew the fast one saw a tie, and the shipped default then ran at
# the slow one in later processes.
THREADS_GAIN = 0.05


@dataclasses.dataclass(frozen=True)
class Premeasured:
    """What pre-measurement found, per ``speed_key``: the budget statistic in ms at the fastest thread count, and that
    count (None: the runtime's own choice); ``failed``: the structures the runtime could not make or run here, with
    why (ONNX Runtime's int8 of tf_mobilenetv3_small_minimal_100 at 32x32 stops in a QLinearConv), which the plan
    leaves out."""

    latency_ms: dict
    threads: dict
    failed: dict = dataclasses.field(default_factory=dict)


def fastest_threads(figures: dict) -> int | None:
    """The thread count of ``figures`` (threads -> ms; None is the runtime's own choice, a thread per core) to run
    with: the fewest threads within THREADS_GAIN of the fastest."""
    best = min(figures.values())
    by_threads = sorted(figures, key=lambda t: float("inf") if t is None else t)
    return next(t for t in by_threads if figures[t] <= (1 + THREADS_GAIN) * best)


def can_premeasure(target: Target, device) -> str | None:
    """None when the target's artifacts can be timed from here before training; else why not."""
    if device is not None:
        return "a remote device is timed only for the candidates built"
    return target.runtime().unavailable_here() if target.local else f"{target.name} is not on this machine"


def to_time(the_plan: Plan, target: Target, limit: int = MAX_ARTIFACTS) -> list:
    """The plan's estimates worth timing, one per distinct structure: those predicted within SLACK of the budget, taken
    alternately in the plan's order and by expected accuracy.

    The plan's order puts what is predicted to fit first, and the prediction is what timing is there to check: on
    Fashion-MNIST the 16 slots went to pruned structures predicted to fit, the dense starnet_s050 (89.0%, predicted
    0.197 ms against a 0.172 ms budget, 0.114 ms measured) was never timed, and the build shipped lcnet_035 at 84.7%.
    """
    budget = the_plan.budget
    within = [e for e in the_plan.ranked
              if budget.latency_ms is None or e.cost.latency_ms <= SLACK * budget.latency_ms]
    by_accuracy = sorted(within, key=lambda e: -(e.accuracy or 0.0))  # stable: the plan's order among equals
    keys, out = set(), []
    for est in (e for pair in zip(within, by_accuracy) for e in pair):
        key = speed_key(est.candidate, target)
        if key not in keys:
            keys.add(key)
            out.append(est)
        if len(out) >= limit:
            break
    return out


def _make_artifacts(estimates: list, entry, data, target: Target, out: Path) -> tuple[list, list]:
    """One artifact per estimate, all of one model and structure: pruned and exported once, then made at each
    precision (int8 from the fp32 artifact). A user's ONNX graph (dense only) is rewritten as the export stage does.

    Returns ([(estimate, artifact)], [(estimate, why it could not be made)]): a runtime that cannot make or run one
    precision of a structure (a converter or kernel that refuses the graph) leaves that candidate out, not the build.
    """
    from edgecompress.runtimes.base import make_artifact

    out.mkdir(parents=True)
    if entry.source == "onnx":
        from edgecompress.onnx_model import canonical_onnx

        onnx_path = canonical_onnx(entry.weights, out / "model_fp32.onnx", data.input_shape)
    else:
        onnx_path = _exported_torch(estimates[0].candidate, entry, data, out)
    runtime, calib = target.runtime(), data.split("calib")[0][:CALIB_IMAGES]
    made, failed = [], []
    for e in estimates:
        try:
            made.append((e, make_artifact(runtime, onnx_path, e.candidate.quant.precision, out, calib)))
        except OWN_MISTAKES:
            raise  # our own mistakes stay loud
        except Exception as exc:  # noqa: BLE001 - the runtime's refusal, in whatever type it raises
            failed.append((e, one_line(exc, 300)))
    return made, failed


def _exported_torch(cand, entry, data, out: Path) -> Path:
    import torch

    from edgecompress.compress.methods import get_method
    from edgecompress.models import load_model
    from edgecompress.runtimes.base import export_onnx

    method = get_method(cand.prune.method)
    model = load_model(entry, data.num_classes)
    if method.structural:
        example = torch.zeros(data.input_shape)
        model = method.finalize(method.prepare(model, cand.prune.ratio, example, method.prune_data(data)), example)
    return export_onnx(model.eval(), data.input_shape, out / "model_fp32.onnx")


def premeasure(the_plan: Plan, target: Target, entries: dict, data, workdir: Path, console=None) -> Premeasured:
    """Time the plan's promising structures here, at each of the runtime's thread counts (module docstring).

    Results are kept in ``workdir/latencies.json``; a resumed build reuses them.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    estimates = to_time(the_plan, target)
    if not estimates:
        return Premeasured({}, {})
    wanted = {speed_key(e.candidate, target) for e in estimates}

    def found(measured: dict, threads: dict, failed: dict) -> Premeasured:  # latencies.json's maps, by repr(speed_key)
        timed = [k for k in wanted if repr(k) not in failed]
        return Premeasured({k: measured[repr(k)] for k in timed}, {k: threads[repr(k)] for k in timed},
                           {k: failed[repr(k)] for k in wanted if repr(k) in failed})

    saved = json.loads((workdir / "latencies.json").read_text()) if (workdir / "latencies.json").is_file() else {}
    if all((repr(k) in saved.get("measured", {}) and repr(k) in saved.get("threads", {}))
           or repr(k) in saved.get("failed", {}) for k in wanted):
        return found(saved["measured"], saved["threads"], saved.get("failed", {}))
    started = time.time()
    structures: dict[tuple, list] = {}  # (model, structure) -> its estimates, one per precision
    for est in estimates:
        structures.setdefault(speed_key(est.candidate, target)[:3], []).append(est)
    artifacts, ordered, failed = [], [], {}
    runtime = target.runtime()
    choices = runtime.thread_choices()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("pre-measuring: making artifacts", total=len(estimates))
        for i, group in enumerate(structures.values()):
            final = workdir / f"{i:03d}"
            with atomic_path(final) as tmp:  # a full disk or Ctrl-C leaves no half-made artifact behind
                made, refused = _make_artifacts(group, entries[group[0].candidate.model], data, target, tmp)
                artifacts += [final / p.relative_to(tmp) for _, p in made]
            ordered += [e for e, _ in made]
            for est, why in refused:
                failed[repr(speed_key(est.candidate, target))] = why
                if console is not None:
                    c = est.candidate
                    console.print(f"left out: {c.model} {c.prune.method} {c.prune.ratio:g} {c.quant.precision}, which "
                                  f"{target.name} cannot make or run here: {why}", markup=False, soft_wrap=True)
            progress.advance(task, len(group))
        estimates = ordered
        progress.update(task, description=f"pre-measuring: timing {len(artifacts)} artifacts in interleaved rounds")
        # One process per thread count and few artifacts, the counts of one group timed one after the other, so a slow
        # spell of the machine lands on both.
        results: dict = {t: [] for t in choices}
        for i in range(0, len(artifacts), INTERLEAVE):
            for t in choices:
                results[t] += runtime.benchmark_interleaved(artifacts[i:i + INTERLEAVE], warmup=WARMUP, runs=RUNS,
                                                            rounds=ROUNDS, threads=t)
    # The budget statistic of every timing, per thread count (with_statistics bootstraps: once each).
    figures = {t: [the_plan.budget.measured_latency_ms(with_statistics(r)) for r in results[t]] for t in choices}
    measured, threads = {}, {}
    for j, est in enumerate(estimates):
        key = repr(speed_key(est.candidate, target))
        threads[key] = fastest_threads({t: figures[t][j] for t in choices})
        measured[key] = figures[threads[key]][j]
    write_json(workdir / "latencies.json", {"measured": measured, "threads": threads, "failed": failed,
                                             "all_threads": {repr(t): figures[t] for t in choices},
                                             "seconds": round(time.time() - started, 1),
                                             "statistic": the_plan.budget.latency_stat})
    if console is not None:
        single = sum(t is not None for t in threads.values())
        console.print(f"pre-measured {len(artifacts)} candidate structures on this machine in "
                      f"{time.time() - started:.0f} s before fine-tuning"
                      + (f" ({single} of them as fast or faster on {min(t for t in choices if t)} thread, and run on it)"
                         if single else ""))
    return found(measured, threads, failed)
