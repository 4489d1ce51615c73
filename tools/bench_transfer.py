"""Transfer benchmark (issue 17): the zoos' checkpoints as pretrained backbones for a user's data.

    python tools/bench_transfer.py --json             # everything, resumable (finished units are skipped)
    python tools/bench_transfer.py --quick --json     # a smoke run of a few minutes (own cache under /tmp)
    python tools/bench_transfer.py --parts 1,2 --json # only the library measurements (no builds)

Two directions, each treating the target data as a user's data:

- ``A``: the Fashion-MNIST zoo's backbones (``transfer.backbones(["fashion-mnist"])``) to the digits at 48x48
  (``load_digits(48)``, mean = std = 0.5 as loaded; 971 train, 306 calib, 160 val, 360 test images).
- ``B``: the digits zoo's backbones (``transfer.backbones(["digits"])``) to a Fashion-MNIST subset,
  ``load_fashion_mnist(32, limit_per_class=200)``: the limit applies to every split, so 200 images a class
  in train, val and test (2,000 each) and 100 in calib (1,000, the whole calibration split).

Parts (``--parts``, default all):

1. Per backbone: the probe's top-1 (``transfer.probe`` on ``transfer.load_backbone``), with its seconds; then, for
   the backbones transferred (all of them when a direction has at most MAX_ALL; else a subset fixed in advance
   by probe rank: the top 2, the 2 around the median, the bottom 2, plus the backbones part 2 chooses), the
   test-split top-1 after ``transfer.transfer`` with ``transfer.recipe_for(data)`` and its seconds; and the
   same architecture from scratch (``timm.create_model(arch, num_classes=...)``, seed 0, the same finetune
   function and recipe) for as many steps as fit in the transfer's time (SCRATCH_TIMED_STEPS scratch steps timed
   first, after a warm-up step), and its top-1. "Time" is the process's CPU seconds with torch on one thread:
   the machine is shared (load 4-7 on 2 cores from other jobs), and wall seconds per step varied up to 10x
   between consecutive measurements, so wall-time matching would measure the neighbours. Wall seconds are
   recorded too.
2. The choice: target openvino-cpu, latency budget = the median over the direction's backbones of the
   planner's predicted dense fp32 latency (its cost model, calibrated to this machine), max accuracy drop 2%
   (build's default). ``transfer.choose`` (top 1 and top 2) on the probes; regret = best transferred top-1
   among the transferred backbones whose cheapest planned candidate fits the budget, minus the chosen
   backbone's transferred top-1 (top 2: the better of the two), in pp. With a subset transferred the best is
   over the subset, so the regret is a lower bound. Spearman's rho between probe and transferred top-1 over
   the transferred backbones.
3. ``edgecompress build`` on the direction's data written as an ImageFolder (grey PNGs; train/ holds the
   train and calib splits, val/ and test/ their splits, so the build's test split is part 1's), at the part-2
   budget, ``--time-budget 10min --transfer-top 2``, in a subprocess with the background job paused. The
   subprocess is the CLI's ``main`` behind a wrapper that limits ``transfer.backbones`` to the direction's
   source zoo: unrestricted, build would also probe the zoo trained on the very same images (for A the digits
   zoo, trained on these digits), which would not be a transfer.
4. A 224x224 build on tools/bench_data.py's 10,000-image, 5-class 256x256 JPEG folder (its generator, reused
   when complete): ``--image-size 224 --latency 50ms --time-budget 15min --transfer-top 1``, every zoo's
   backbones, in a subprocess (wrapper as above, no restriction) with the background job paused. Peak RSS of
   the build process (its ``RUSAGE_SELF``) and of its largest child (benchmark processes, decoding workers),
   wall time, the lines it printed, and the stage reached when it is cut at BUILD_224_LIMIT_S.

MAX_ALL, the subset's size and the 25-minute cut of part 4 keep the whole run near 90 minutes on this machine.

Each finished unit (a direction's probes and choice, one transfer, one scratch run, one build) is one JSON line
in the cache (default docs/bench_transfer.jsonl; ``--quick`` uses /tmp/bench_transfer.quick.jsonl) and is
skipped when rerun. Torch uses TORCH_THREADS threads. The background zoo job (``train_zoo.py --task fashion``)
is paused with ../shared/tools/quiet around parts 3 and 4 (``--no-pause`` to skip); parts 1 and 2 run beside
it (accuracies do not depend on load; the scratch step count is set from timings made under the same load).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edgecompress.core.fsutil import append_jsonl, read_jsonl

TARGET = "openvino-cpu"
MAX_DROP = 0.02  # build's default --max-accuracy-drop
TORCH_THREADS = 1  # part 1: one thread, so process CPU time is the work done (see the docstring)
BUILD_THREADS = 2  # the builds' subprocesses
MAX_ALL = 10  # directions with more backbones transfer a subset
SCRATCH_TIMED_STEPS = 3
BUILD_TIME_BUDGET = "10min"
BUILD_224_LIMIT_S = 25 * 60
BUILD_LIMIT_S = 20 * 60
DIRECTIONS = {
    "A": {"source": "fashion-mnist", "target": "digits-48", "image_size": 48},
    "B": {"source": "digits", "target": "fashion-mnist-200", "image_size": 32},
}
QUIET = ROOT.parent / "shared" / "tools" / "quiet"
BENCH_DATA_DIR = Path("/tmp/edgecompress-bench-data")

# The CLI's main in a subprocess, with transfer.backbones limited to one zoo (argv[1], "" for all), and the
# process's peak memory written to argv[2] on the way out.
WRAPPER = r"""
import json, resource, sys
from edgecompress.compress import transfer as tr
task, rusage_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if task:
    everything = tr.backbones
    tr.backbones = lambda tasks=None: everything([task])
from edgecompress.cli import main
try:
    code = main(argv)
finally:
    with open(rusage_path, "w") as f:
        json.dump({"self_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}, f)
sys.exit(code)
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unit_key(record: dict) -> tuple:
    return (record["unit"], record.get("direction"), record.get("backbone"))


# --- data ------------------------------------------------------------------------------------------------------


def load_target(direction: str):
    from edgecompress.data.datasets import load_digits, load_fashion_mnist

    return load_digits(48) if direction == "A" else load_fashion_mnist(32, limit_per_class=200)


def split_sizes(data) -> dict:
    return {s: len(data.split(s)[1]) for s in ("train", "calib", "val", "test")}


def write_folder(data, root: Path) -> Path:
    """The dataset as grey PNGs: train/ (train + calib), val/, test/ (load_image_folder's three-folder layout)."""
    from PIL import Image

    for part, splits in (("train", ("train", "calib")), ("val", ("val",)), ("test", ("test",))):
        for split in splits:
            images, labels = data.split(split)
            for i, (row, label) in enumerate(zip(images.rows, labels)):
                folder = root / part / data.class_names[label].replace("/", "-")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images.pixels[row][:, :, 0]).save(folder / f"{split}-{i:05d}.png")
    return root


# --- part 1 and 2: probes, the choice, transfers, scratch ---------------------------------------------------------


def probe_and_choose(direction: str, data, pool: dict, quick: bool) -> dict:
    """Every backbone's probe (timed one by one), predicted latencies, the budget and transfer.choose's picks."""
    from edgecompress.compress import transfer as tr
    from edgecompress.costmodel import devicecal
    from edgecompress.costmodel.devicecal import ensure_calibrated
    from edgecompress.costmodel.kernels import model_graph
    from edgecompress.plan.planner import Budget, plan
    from edgecompress.targets import get_target

    probes, graphs, seconds = {}, {}, {}
    for name, entry in pool.items():
        t0 = time.perf_counter()
        model = tr.load_backbone(entry, data.num_classes)
        probes[name] = tr.probe(model, data)
        seconds[name] = round(time.perf_counter() - t0, 2)
        graphs[name] = model_graph(model, data.input_shape)
        _log(f"{direction} probe {name}: {probes[name]:.4f} ({seconds[name]:.1f} s)")
    target = get_target(TARGET)
    # build chooses its backbones before it calibrates the target (build.run_build calls transferred_parents before
    # ensure_calibrated), so its choice uses the uncalibrated kernel model: recorded apart, at the same budget.
    devicecal._ACTIVE.pop(target.name, None)  # private; an earlier direction in this process activated it
    uncalibrated = plan(target, Budget(latency_ms=1e9, max_accuracy_drop=MAX_DROP), graphs, probes)
    ensure_calibrated(target)
    everything = plan(target, Budget(latency_ms=1e9, max_accuracy_drop=MAX_DROP), graphs, probes)
    dense, cheapest = {}, {}
    for est in everything.ranked:
        c = est.candidate
        cheapest[c.model] = min(cheapest.get(c.model, float("inf")), est.cost.latency_ms)
        if c.prune.method == "none" and c.quant.precision == "fp32":
            dense[c.model] = est.cost.latency_ms
    import numpy as np

    budget_ms = float(np.median(list(dense.values())))
    budget = Budget(latency_ms=budget_ms, max_accuracy_drop=MAX_DROP)
    t0 = time.perf_counter()
    top1 = tr.choose(probes, graphs, target, budget, 1)
    top2 = tr.choose(probes, graphs, target, budget, 2)
    choose_seconds = time.perf_counter() - t0
    calibration = devicecal._ACTIVE.pop(target.name)  # private, but the only way to plan as build's choice does
    top2_uncalibrated = tr.choose(probes, graphs, target, budget, 2)
    devicecal.activate(calibration)
    dense_uncalibrated = {e.candidate.model: e.cost.latency_ms for e in uncalibrated.ranked
                          if e.candidate.prune.method == "none" and e.candidate.quant.precision == "fp32"}
    ranked = sorted(probes, key=lambda n: -probes[n])
    if len(ranked) <= MAX_ALL or quick:
        subset = ranked if not quick else ranked[:1] + ranked[-1:]
        rule = "all" if not quick else "quick: best and worst probe"
    else:
        mid = len(ranked) // 2
        subset = ranked[:2] + ranked[mid - 1:mid + 1] + ranked[-2:]
        rule = "probe ranks 1-2, the 2 around the median, the last 2"
    extra = [n for n in dict.fromkeys(top2 + top2_uncalibrated) if n not in subset]
    return {"unit": "probes", "direction": direction, "pool": list(pool), "probes": probes,
            "probe_seconds": seconds, "dense_fp32_ms": dense, "cheapest_ms": cheapest, "budget_ms": budget_ms,
            "chosen_top1": top1, "chosen_top2": top2, "choose_seconds_both": round(choose_seconds, 2),
            "chosen_top2_uncalibrated": top2_uncalibrated, "dense_fp32_ms_uncalibrated": dense_uncalibrated,
            "calibration_scales": dict(calibration.scales),
            "transfer_subset": subset + extra, "subset_rule": rule, "subset_added_for_choice": extra,
            "split_sizes": split_sizes(data), "data": data.name}


def run_transfer(direction: str, data, entry, work: Path, max_steps: int | None) -> dict:
    from edgecompress.compress import transfer as tr
    from edgecompress.compress.finetune import evaluate_torch
    from edgecompress.models import load_model

    recipe = tr.recipe_for(data, max_steps=max_steps)
    out = work / direction / entry.name.replace("@", "-")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0, c0 = time.perf_counter(), time.process_time()
    parent = tr.transfer(entry, data, recipe, out)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    top1 = evaluate_torch(load_model(parent, data.num_classes), *data.split("test"))
    info = json.loads((out / "transfer.json").read_text())
    return {"unit": "transfer", "direction": direction, "backbone": entry.name, "architecture": entry.architecture,
            "steps": recipe.steps, "recipe": dataclasses.asdict(recipe), "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),
            "finetune_seconds": info["seconds"], "test_top1": top1, "load_1min": round(os.getloadavg()[0], 2)}


def run_scratch(direction: str, data, entry, transfer_record: dict) -> dict:
    """The same architecture from random weights, as many steps as fit in the transfer's time (CPU seconds of
    this one-thread process: the machine is shared, and wall time per step varied up to 10x between minutes)."""
    import timm
    import torch

    from edgecompress.compress import transfer as tr
    from edgecompress.compress.finetune import evaluate_torch, finetune

    recipe = tr.TransferRecipe(**transfer_record["recipe"])
    x, y = data.split("train")
    t0 = time.perf_counter()
    probe_model = timm.create_model(entry.architecture, num_classes=data.num_classes)
    finetune(probe_model, x, y, steps=1, batch_size=recipe.batch_size)  # warm-up
    t1, c1 = time.perf_counter(), time.process_time()
    finetune(probe_model, x, y, steps=SCRATCH_TIMED_STEPS, batch_size=recipe.batch_size,
             augmentation=recipe.augmentation())
    step_s = (time.process_time() - c1) / SCRATCH_TIMED_STEPS
    step_wall_s = (time.perf_counter() - t1) / SCRATCH_TIMED_STEPS
    timing_seconds = time.perf_counter() - t0
    steps = max(1, int(transfer_record["cpu_seconds"] / step_s))
    own = dataclasses.replace(recipe, steps=steps, warmup_steps=min(recipe.warmup_steps, steps // 10))
    torch.manual_seed(0)
    model = timm.create_model(entry.architecture, num_classes=data.num_classes)
    t2, c2 = time.perf_counter(), time.process_time()
    model = finetune(model, x, y, steps=own.steps, lr=own.lr, batch_size=own.batch_size, seed=own.seed,
                     augmentation=own.augmentation(), weight_decay=own.weight_decay, warmup_steps=own.warmup_steps,
                     label_smoothing=own.label_smoothing)
    seconds, cpu_seconds = time.perf_counter() - t2, time.process_time() - c2
    top1 = evaluate_torch(model, *data.split("test"))
    return {"unit": "scratch", "direction": direction, "backbone": entry.name, "architecture": entry.architecture,
            "step_cpu_seconds_timed": round(step_s, 4), "step_wall_seconds_timed": round(step_wall_s, 4),
            "timing_seconds": round(timing_seconds, 2), "steps": steps, "transfer_steps": transfer_record["steps"],
            "transfer_cpu_seconds": transfer_record["cpu_seconds"], "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2), "test_top1": top1,
            "load_1min": round(os.getloadavg()[0], 2)}


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    rho = spearmanr(a, b).statistic
    return None if math.isnan(rho) else float(rho)


def choice_summary(probes_rec: dict, transfers: dict) -> dict:
    budget = probes_rec["budget_ms"]
    fitting = [n for n in transfers if probes_rec["cheapest_ms"][n] <= budget]
    best = max(fitting, key=lambda n: transfers[n]["test_top1"]) if fitting else None

    def regret(chosen: list[str]) -> float | None:
        known = [transfers[n]["test_top1"] for n in chosen if n in transfers]
        if best is None or len(known) < len(chosen):
            return None
        return round(100 * (transfers[best]["test_top1"] - max(known)), 2)

    names = list(transfers)
    return {"budget_ms": budget, "fitting_transferred": fitting, "best_fitting": best,
            "best_fitting_top1": transfers[best]["test_top1"] if best else None,
            "chosen_top1": probes_rec["chosen_top1"], "chosen_top2": probes_rec["chosen_top2"],
            "regret_top1_pp": regret(probes_rec["chosen_top1"]), "regret_top2_pp": regret(probes_rec["chosen_top2"]),
            "chosen_top2_uncalibrated": probes_rec.get("chosen_top2_uncalibrated"),
            "regret_top2_uncalibrated_pp": (regret(probes_rec["chosen_top2_uncalibrated"])
                                            if probes_rec.get("chosen_top2_uncalibrated") else None),
            "spearman_probe_vs_transferred": spearman([probes_rec["probes"][n] for n in names],
                                                      [transfers[n]["test_top1"] for n in names]),
            "transferred": len(names), "pool": len(probes_rec["pool"])}


# --- parts 3 and 4: builds in a subprocess ---------------------------------------------------------------------------


def zoo_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "train_zoo.py --task fashion"], capture_output=True, text=True,
                           check=False).stdout.split()
    pids = [int(p) for p in found if int(p) != os.getpid()]
    return pids[0] if pids else None


def run_cli_build(task: str, argv: list[str], log: Path, pause: bool, limit_s: int) -> dict:
    """``edgecompress build`` (the CLI's main, backbones limited to ``task``) in a subprocess; paused neighbour."""
    rusage = log.with_suffix(".rusage.json")
    command = [sys.executable, "-c", WRAPPER, task, str(rusage), *argv]
    pid = zoo_pid() if pause else None
    if pid is not None and QUIET.exists():
        command = [str(QUIET), str(pid), "--", *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(BUILD_THREADS), "COLUMNS": "160"}
    _log(f"running (log {log}): edgecompress {' '.join(argv)}" + (f" (pid {pid} paused)" if pid else ""))
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGINT)  # the wrapper writes its rusage and quiet resumes the job
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            timed_out = True
    wall = time.perf_counter() - t0
    peak = json.loads(rusage.read_text()) if rusage.is_file() else {}
    return {"exit_code": code, "timed_out": timed_out, "wall_seconds": round(wall, 1), "paused_pid": pid,
            **{k: round(v) for k, v in peak.items()},
            "printed": [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()][-40:]}


def read_build_report(run: Path) -> dict | None:
    path = run / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    measured = report.get("measured") or {}
    budget = (report.get("budget") or {}).get("latency_ms")
    stat = (report.get("budget") or {}).get("latency_stat", "p90")
    latency = measured.get(f"latency_ms_{stat}")
    transfer = report.get("transfer") or {}
    return {"choice": (report.get("choice") or {}).get("id") or report.get("choice_id"),
            "choice_model": (report.get("choice") or {}).get("model"),
            "accuracy": measured.get("accuracy"), "baseline_accuracy": measured.get("baseline_accuracy"),
            "latency_stat": stat, "latency_ms": latency, "latency_ms_median": measured.get("latency_ms_median"),
            "peak_memory_mb": measured.get("peak_memory_mb"), "budget_ms": budget,
            "budget_met": latency is not None and budget is not None and latency <= budget,
            "transferred": [{k: b.get(k) for k in ("backbone", "steps", "seconds")} for b in transfer.get("backbones", [])],
            "probes_top3": dict(list((transfer.get("probes") or {}).items())[:3]),
            "tried": [c.get("id") for c in report.get("candidates", []) if c.get("tried")]}


def build_direction(direction: str, data, budget_ms: float, work: Path, pause: bool, quick: bool) -> dict:
    folder = work / "folders" / direction
    if not (folder / ".complete").is_file():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        write_folder(data, folder)
        (folder / ".complete").write_text("ok\n")
    run = work / "runs" / direction
    argv = ["build", "--data", str(folder), "--image-size", str(DIRECTIONS[direction]["image_size"]),
            "--target", TARGET, "--latency", f"{budget_ms:.4g}ms", "--time-budget",
            "2min" if quick else BUILD_TIME_BUDGET, "--transfer-top", "2", "--out", str(run), "--force"]
    result = run_cli_build(DIRECTIONS[direction]["source"], argv, work / f"build-{direction}.log", pause,
                           BUILD_LIMIT_S)
    return {"unit": "build", "direction": direction,
            "command": "edgecompress " + " ".join(argv).replace(str(work), "WORK"),
            "backbones_from": DIRECTIONS[direction]["source"], **result, "report": read_build_report(run)}


def build_224(work: Path, pause: bool, quick: bool) -> dict:
    import bench_data

    images = 500 if quick else 10000
    folder = bench_data.make_folder(BENCH_DATA_DIR / f"{images}x5", images, 5)
    run = work / "runs" / "224"
    argv = ["build", "--data", str(folder), "--image-size", "224", "--target", TARGET, "--latency", "50ms",
            "--time-budget", "3min" if quick else "15min", "--transfer-top", "1", "--out", str(run), "--force"]
    result = run_cli_build("", argv, work / "build-224.log", pause, 6 * 60 if quick else BUILD_224_LIMIT_S)
    return {"unit": "build224", "direction": None, "images": images,
            "command": "edgecompress " + " ".join(argv).replace(str(work), "WORK"), **result,
            "report": read_build_report(run)}


def _pct(value, none="—") -> str:
    return none if value is None else f"{100 * value:.1f}"


def markdown(results: dict) -> str:
    """Tables per direction, the choice, and the builds, from the results main() assembles."""
    lines = []
    for d, out in results["directions"].items():
        lines += [f"### {d}: the {out['source_zoo']} zoo to {out['data']} (splits {out['split_sizes']})", "",
                  ("| backbone | probe top-1 % | transferred top-1 % | scratch, same time, top-1 % | transfer s (CPU) "
                   "| transfer steps | scratch s (CPU) | scratch steps | probe s | dense fp32 ms (predicted) |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["rows"]:
            lines.append(f"| {r['backbone']} | {_pct(r['probe'])} | {_pct(r['transferred'])} | {_pct(r['scratch'])} "
                         f"| {_fmt_s(r.get('transfer_cpu_seconds'))} | {r['transfer_steps'] or '—'} "
                         f"| {_fmt_s(r.get('scratch_cpu_seconds'))} | {r['scratch_steps'] or '—'} "
                         f"| {r['probe_seconds']:.1f} | {r['dense_fp32_ms']:.3f} |")
        c = out.get("choice")
        if c:
            lines += ["", (f"Budget {c['budget_ms']:.3f} ms (median predicted dense fp32). Chosen: top 1 "
                      f"{', '.join(c['chosen_top1'])}; top 2 {', '.join(c['chosen_top2'])} (uncalibrated, as build "
                      f"chooses: {', '.join(c.get('chosen_top2_uncalibrated') or [])}). Best transferred among those "
                      f"whose cheapest candidate fits: {c['best_fitting']} ({_pct(c['best_fitting_top1'])}). Regret "
                      f"top 1: {c['regret_top1_pp']} pp, top 2: {c['regret_top2_pp']} pp (uncalibrated top 2: "
                      f"{c.get('regret_top2_uncalibrated_pp')} pp). Spearman probe vs transferred over "
                      f"{c['transferred']} backbones: {_fmt_s(c['spearman_probe_vs_transferred'], '.2f')}."), ""]
    return "\n".join(lines)


def _fmt_s(value, spec=".0f") -> str:
    return "—" if value is None else format(value, spec)


# --- main -----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="1,2,3,4", help="comma-separated parts to run (default: %(default)s)")
    parser.add_argument("--directions", default="A,B", help="comma-separated (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 backbones a direction, transfers of 20 steps, 2-3 min builds on small data")
    parser.add_argument("--cache", type=Path, help="JSON lines, one per finished unit (default: docs/bench_transfer.jsonl; "
                        "with --quick /tmp/bench_transfer.quick.jsonl)")
    parser.add_argument("--work", type=Path, help="transfers, folders, runs (default: a folder under /tmp)")
    parser.add_argument("--no-pause", action="store_true", help="do not pause the background zoo job around builds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the per-direction tables (runs what is not cached)")
    args = parser.parse_args(argv)
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    cache = args.cache or (Path("/tmp/bench_transfer.quick.jsonl") if args.quick else ROOT / "docs" / "bench_transfer.jsonl")
    work = args.work or Path(tempfile.gettempdir()) / ("bench_transfer_quick" if args.quick else "bench_transfer")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(TORCH_THREADS)
    done = read_jsonl(cache, key=unit_key)

    def record(rec: dict) -> dict:
        rec = {**rec, "date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick}
        append_jsonl(cache, rec)
        done[unit_key(rec)] = rec
        return rec

    from edgecompress.compress import transfer as tr

    results: dict = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "directions": {}}
    for d in directions:
        if not parts & {1, 2, 3}:
            break
        data = load_target(d)
        pool = tr.backbones([DIRECTIONS[d]["source"]])
        if args.quick:
            pool = dict(list(pool.items())[:3])
        key = ("probes", d, None)
        if key not in done:
            record(probe_and_choose(d, data, pool, args.quick))
        probes_rec = done[key]
        transfers, scratch = {}, {}
        if 1 in parts or 2 in parts:
            every = tr.backbones([DIRECTIONS[d]["source"]])
            for name in probes_rec["transfer_subset"]:
                entry = every[name]
                tkey = ("transfer", d, name)
                if tkey not in done:
                    rec = record(run_transfer(d, data, entry, work / "transfers", 20 if args.quick else None))
                    _log(f"{d} transfer {name}: {rec['test_top1']:.4f} in {rec['seconds']:.0f} s ({rec['steps']} steps)")
                transfers[name] = done[tkey]
                skey = ("scratch", d, name)
                if skey not in done:
                    rec = record(run_scratch(d, data, entry, done[tkey]))
                    _log(f"{d} scratch {name}: {rec['test_top1']:.4f} in {rec['seconds']:.0f} s ({rec['steps']} steps)")
                scratch[name] = done[skey]
        out = {"data": probes_rec["data"], "split_sizes": probes_rec["split_sizes"], "source_zoo": DIRECTIONS[d]["source"],
               "budget_ms": probes_rec["budget_ms"], "subset_rule": probes_rec["subset_rule"],
               "rows": [{"backbone": n, "probe": probes_rec["probes"][n], "probe_seconds": probes_rec["probe_seconds"][n],
                         "dense_fp32_ms": probes_rec["dense_fp32_ms"][n], "cheapest_ms": probes_rec["cheapest_ms"][n],
                         "transferred": transfers[n]["test_top1"] if n in transfers else None,
                         "transfer_seconds": transfers[n]["seconds"] if n in transfers else None,
                         "transfer_cpu_seconds": transfers[n]["cpu_seconds"] if n in transfers else None,
                         "transfer_steps": transfers[n]["steps"] if n in transfers else None,
                         "scratch": scratch[n]["test_top1"] if n in scratch else None,
                         "scratch_seconds": scratch[n]["seconds"] if n in scratch else None,
                         "scratch_cpu_seconds": scratch[n]["cpu_seconds"] if n in scratch else None,
                         "scratch_steps": scratch[n]["steps"] if n in scratch else None}
                        for n in sorted(probes_rec["probes"], key=lambda n: -probes_rec["probes"][n])]}
        if transfers:
            out["choice"] = choice_summary(probes_rec, transfers)
        if 3 in parts:
            bkey = ("build", d, None)
            if bkey not in done:
                rec = record(build_direction(d, data, probes_rec["budget_ms"], work, not args.no_pause, args.quick))
                _log(f"{d} build: exit {rec['exit_code']} in {rec['wall_seconds']:.0f} s: {rec['report']}")
            out["build"] = done[bkey]
        results["directions"][d] = out
    if 4 in parts:
        key = ("build224", None, None)
        if key not in done:
            rec = record(build_224(work, not args.no_pause, args.quick))
            _log(f"224 build: exit {rec['exit_code']} in {rec['wall_seconds']:.0f} s, peak RSS "
                 f"{rec.get('self_peak_rss_mb')} MB (children {rec.get('children_peak_rss_mb')} MB)")
        results["build_224"] = done[key]
    if args.json:
        print(json.dumps(results, indent=2))
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
