"""Planning a model the meta-dataset has not seen (issue 15 item 6): the meta-features of its candidates.

    python tools/bench_plan.py --models mobilenetv3_small_100 resnet10t lcnet_050 --threads 1 2 --json

For each zoo model, loaded as a user's model would be (its features are computed on the spot: the
meta-dataset is not consulted), and each torch thread count: the seconds `Featurizer` takes for every
candidate of the default sweep at the target's precisions (78 on jetson-orin), in a fresh process, and
the share of it spent in the one-shot proxies. Run it on a quiet machine (pause other jobs with
`../shared/tools/quiet PID -- ...`): the proxies are hundreds of small forward passes, and threads
waiting on a busy core slow them several-fold.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(model_name: str, threads: int, target_name: str) -> dict:
    import torch

    from edgecompress.data.datasets import load_digits
    from edgecompress.meta import features
    from edgecompress.models import get_model, load_model
    from edgecompress.plan.planner import enumerate_candidates
    from edgecompress.targets import get_target

    torch.set_num_threads(threads)
    data = load_digits(32)
    entry = get_model(model_name)
    candidates = enumerate_candidates([model_name], get_target(target_name))
    oneshot = 0.0
    original = getattr(features.Featurizer, "_one_shot_all_precisions", None)  # None: a tree from before it

    def timed(self, *args):
        nonlocal oneshot
        start = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            oneshot += time.perf_counter() - start

    if original is not None:
        features.Featurizer._one_shot_all_precisions = timed
    start = time.perf_counter()
    featurizer = features.Featurizer(load_model(entry, data.num_classes), data, entry.test_accuracy)
    for c in sorted(candidates, key=lambda c: (c.prune.method, c.prune.ratio)):  # as AccuracyModel orders them
        featurizer.candidate_features(c.prune.method, c.prune.ratio, c.quant.precision)
    total = time.perf_counter() - start
    return {"model": model_name, "threads": threads, "candidates": len(candidates), "featurize_s": round(total, 2),
            "oneshot_s": round(oneshot, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenetv3_small_100", "resnet10t", "lcnet_050"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--target", default="jetson-orin")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.target)))
        return
    rows = []
    for model in args.models:
        for threads in args.threads:  # a fresh process each: no warm caches from the previous model
            out = subprocess.run([sys.executable, __file__, "--one", model, str(threads), "--target", args.target],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            if not args.json:
                print(rows[-1], flush=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
