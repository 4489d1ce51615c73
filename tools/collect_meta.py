"""Collect meta-dataset v2 on both tasks, in the order that makes a partial collection most useful.

    nohup python tools/collect_meta.py > collect.log 2>&1 &

Each phase is one ``edgecompress meta collect`` (resumable: rows already in the file are skipped), so killing this
and starting it again loses at most the compression in flight. Phases alternate between the tasks so that
leave-one-task-out has the same methods on both: the methods `plan` sweeps by default first, then the newer ones.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "edgecompress" / "zoo" / "meta.parquet"  # the shipped meta-dataset (predictor.shipped_meta_dataset)
PHASES = (
    # The digits are quick (a small calibration and test split): their default methods first, so that a build on
    # the digits finds every zoo candidate's features in the meta-dataset.
    ("digits", ("none", "torch_pruning.l1", "nncf.magnitude_global", "nncf.magnitude_local")),
    ("fashion-mnist", ("none", "torch_pruning.l1", "nncf.magnitude_global")),
    ("fashion-mnist", ("nncf.magnitude_local", "woodfisher")),
    ("digits", ("woodfisher",)),
    ("fashion-mnist", ("nncf.rb", "lowrank", "sparse24")),
    ("digits", ("nncf.rb", "lowrank", "sparse24")),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--phases", default=None, help="comma-separated phase numbers (default: all, in order)")
    parser.add_argument("--workers", type=int, default=2, help="compressions at a time (edgecompress meta collect --workers)")
    args = parser.parse_args(argv)
    chosen = [int(p) for p in args.phases.split(",")] if args.phases else range(len(PHASES))
    for i in chosen:
        task, methods = PHASES[i]
        cmd = [sys.executable, "-m", "edgecompress", "meta", "collect", "--out", str(args.out), "--workers", str(args.workers)]
        if task != "digits":
            cmd += ["--data", task]
        for m in methods:
            cmd += ["--methods", m]
        print(f"phase {i}: {task}: {', '.join(methods)}", flush=True)
        if subprocess.call(cmd) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
