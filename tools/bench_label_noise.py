"""How much of the meta-predictor's error is in the labels themselves (issue 16): the same compressions, fine-tuned
again with another seed.

    python tools/bench_label_noise.py [--task fashion-mnist] [--models 4] [--seed 1] [--workers 2] [--json]

A meta-dataset row's label is the accuracy of one fine-tuning run. Where fine-tuning decides the outcome (pruning
at high ratios), another seed gives another accuracy. Take two runs a and b of one compression that differ only in
the fine-tuning seed. For any prediction m, |a - m| + |b - m| >= |a - b|. So no predictor that does not run the
fine-tune itself can score a mean absolute error below mean(|a - b|) / 2 against such labels: that is the floor.

The script fine-tunes CONFIGS again with seed ``--seed`` for ``--models`` zoo architectures, drawn at random
(seeded), with `edgecompress meta collect --seed`. The rows go to their own file (``--out``): the seed is part of a
row's recipe key, and only seed 0 trains the predictor. The collection resumes where it stopped. Then, for each
replicate row paired with its seed-0 row in the meta-dataset, it reports by ratio band:
- |a - b| and the floor |a - b| / 2;
- the shipped predictor's leave-one-architecture-out error on the same rows (what `meta eval` reports);
- the floor carried over to the whole task: each meta-dataset row of the task counts its compression's floor where
  it was replicated, else its band's, and dense rows count 0 (nothing is fine-tuned).
Compressions are heavy: run it with nothing else running, or accept a slower run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "label_noise.parquet"
# Where the held-out error is (the high ratios of every method), and a middle level of four methods for comparison.
CONFIGS = {
    "nncf.magnitude_local": (0.5, 0.7, 0.9),
    "nncf.magnitude_global": (0.5, 0.9),
    "woodfisher": (0.5, 0.8, 0.9),
    "lowrank": (0.5, 0.9),
    "torch_pruning.l1": (0.3, 0.7),
    "nncf.rb": (0.9,),
}


def sample_models(task: str, count: int) -> list[str]:
    from edgecompress.models import list_models

    return sorted(random.Random(0).sample(sorted(list_models(task=task)), count))


def collect(task: str, models: list[str], seed: int, workers: int, out: Path) -> float:
    start = time.perf_counter()
    for method, ratios in CONFIGS.items():
        cmd = [sys.executable, "-m", "edgecompress", "meta", "collect", "--out", str(out), "--data", task,
               "--methods", method, "--ratios", ",".join(map(str, ratios)), "--seed", str(seed),
               "--workers", str(workers)]
        for m in models:
            cmd += ["--models", m]
        print(f"{method} at {', '.join(map(str, ratios))}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def band(ratio: float) -> str:
    """Dense, or below or above the ratio where the probe starts (and the held-out error is)."""
    from edgecompress.meta.features import PROBE_MIN_RATIO as HIGH

    return "dense" if ratio == 0 else f"ratio >= {HIGH}" if ratio >= HIGH else f"ratio < {HIGH}"


def analyse(task: str, out: Path, with_predictor: bool) -> dict:
    from edgecompress.meta.collect import KEY_COLUMNS, current_rows, read_rows
    from edgecompress.meta.predictor import loao_predictions, row_task, shipped_meta_dataset

    rows = current_rows(read_rows(shipped_meta_dataset()))
    pair_columns = [c for c in KEY_COLUMNS if c != "recipe"]
    index = {tuple(r.get(c) for c in pair_columns): i for i, r in enumerate(rows)}
    pairs = [(index[k], r) for r in read_rows(out) if (k := tuple(r.get(c) for c in pair_columns)) in index]
    if not pairs:
        raise SystemExit(f"no replicate in {out} has a seed-0 row in the meta-dataset")
    gap = {i: abs(rows[i]["accuracy"] - r["accuracy"]) * 100 for i, r in pairs}
    errors = None
    if with_predictor:
        mean, _ = loao_predictions(rows, "lightgbm")
        errors = {i: abs(mean[i] - rows[i]["accuracy_drop"]) * 100 for i in gap}
    report = {"task": task, "pairs": len(gap), "bands": {}, "by_config": {}}
    for name in sorted({band(rows[i]["ratio"]) for i in gap}):
        ids = [i for i in gap if band(rows[i]["ratio"]) == name]
        entry = {"pairs": len(ids), "mean_gap_pp": float(np.mean([gap[i] for i in ids])),
                 "median_gap_pp": float(np.median([gap[i] for i in ids])),
                 "floor_pp": float(np.mean([gap[i] for i in ids]) / 2)}
        if errors:
            entry["loao_mae_pp"] = float(np.mean([errors[i] for i in ids]))
        report["bands"][name] = entry
    for key in sorted({(rows[i]["method"], rows[i]["ratio"]) for i in gap}):
        ids = [i for i in gap if (rows[i]["method"], rows[i]["ratio"]) == key]
        entry = {"pairs": len(ids), "mean_gap_pp": float(np.mean([gap[i] for i in ids]))}
        if errors:
            entry["loao_mae_pp"] = float(np.mean([errors[i] for i in ids]))
        report["by_config"][f"{key[0]} {key[1]}"] = entry
    # The floor over the task's whole meta-dataset: each row counts its (method, ratio)'s floor where replicated,
    # else its band's (dense rows: 0, nothing is fine-tuned).
    task_rows = [r for r in rows if row_task(r) == task]
    floors = {name: e["floor_pp"] for name, e in report["bands"].items()}
    config_floors = {name: e["mean_gap_pp"] / 2 for name, e in report["by_config"].items()}
    counted = [0.0 if r["ratio"] == 0 else config_floors.get(f"{r['method']} {r['ratio']}", floors.get(band(r["ratio"]), 0.0))
               for r in task_rows]
    report["task_rows"] = len(task_rows)
    report["task_floor_pp"] = float(np.mean(counted))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fashion-mnist")
    parser.add_argument("--models", type=int, default=4, help="zoo architectures, drawn at random (seed 0)")
    parser.add_argument("--seed", type=int, default=1, help="the replicate's fine-tuning seed (the meta-dataset's: 0)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-collect", action="store_true", help="analyse the rows already in --out")
    parser.add_argument("--no-predictor", action="store_true", help="skip the leave-one-architecture-out errors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    models = sample_models(args.task, args.models)
    seconds = None if args.no_collect else collect(args.task, models, args.seed, args.workers, args.out)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}",
              "models": models, "seed": args.seed, "collect_s": seconds,
              **analyse(args.task, args.out, not args.no_predictor)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['task']}: {report['pairs']} rows fine-tuned again with seed {args.seed} ({', '.join(models)})")
    print(f"{'band':16s} {'rows':>5s} {'|a-b| mean':>11s} {'median':>7s} {'floor':>6s} {'LOAO MAE':>9s}")
    for name, e in report["bands"].items():
        print(f"{name:16s} {e['pairs']:5d} {e['mean_gap_pp']:11.2f} {e['median_gap_pp']:7.2f} {e['floor_pp']:6.2f} "
              f"{e.get('loao_mae_pp', float('nan')):9.2f}")
    for name, e in report["by_config"].items():
        print(f"  {name:28s} {e['pairs']:3d} |a-b| {e['mean_gap_pp']:6.2f}  LOAO {e.get('loao_mae_pp', float('nan')):6.2f}")
    print(f"floor over the task's {report['task_rows']} rows: {report['task_floor_pp']:.2f} pp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
