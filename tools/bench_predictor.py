"""The meta-predictor's settings against each other on the same meta-dataset (issue 16).

    python tools/bench_predictor.py [--data edgecompress/zoo/meta.parquet] [--json]

For each variant (what the regressors learn: the drop, the drop as a share of the parent's headroom above
chance, or the drop less the one the fine-tuning probe implies; LightGBM's number of trees), `edgecompress.meta.predictor.evaluate`: leave-one-architecture-out error and
Spearman per task, regret against the exhaustive oracle and win rate against static ERM on openvino-cpu and a
Jetson target, leave-one-task-out error, and the time to score 1,000 candidates. The shipped settings are the
ones `meta train` uses (predictor.DEFAULT_TARGET, LGBM_PARAMS, UPPER_LGBM_OVERRIDES, LINEAR_LEAVES): in sessions 15-18
the variant "absolute, 70 trees of 10 leaves, bound 30, constant leaves, l1", since session 19 "residual, 70 trees of
10 leaves, bound 30, constant leaves, l1, 50 rows a leaf, bound 5". A variant's name says what it
changes; the rest is 100 trees of 15 leaves at 0.15 for both models, with linear leaves and the Huber loss for the
expected drop (the settings of sessions 8-14).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BOUND_30 = {"n_estimators": 30, "learning_rate": 0.4}  # the bound model of the session-15 variants
VARIANTS = {
    "absolute, 300 trees": {"target": "absolute", "n_estimators": 300, "learning_rate": 0.05},
    "headroom, 300 trees": {"target": "headroom", "n_estimators": 300, "learning_rate": 0.05},
    "absolute, 100 trees": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15},
    "headroom, 100 trees": {"target": "headroom", "n_estimators": 100, "learning_rate": 0.15},
    "absolute, 100 trees, bound 40": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15,
                                      "upper": {"n_estimators": 40, "learning_rate": 0.3}},
    "absolute, 60 trees, bound 40": {"target": "absolute", "n_estimators": 60, "learning_rate": 0.25,
                                     "upper": {"n_estimators": 40, "learning_rate": 0.3}},
    "absolute, 100 trees, bound 30": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15,
                                      "upper": BOUND_30},
    "absolute, 60 trees, bound 30": {"target": "absolute", "n_estimators": 60, "learning_rate": 0.25,
                                     "upper": BOUND_30},
    "headroom, 100 trees, bound 30": {"target": "headroom", "n_estimators": 100, "learning_rate": 0.15,
                                      "upper": BOUND_30},
    "headroom, 60 trees, bound 30": {"target": "headroom", "n_estimators": 60, "learning_rate": 0.25,
                                     "upper": BOUND_30},
    "headroom, 100 trees, bound 30, constant leaves": {"target": "headroom", "n_estimators": 100, "learning_rate": 0.15,
                                                       "upper": BOUND_30,
                                                       "linear_leaves": False},
    "headroom, 60 trees, bound 30, constant leaves": {"target": "headroom", "n_estimators": 60, "learning_rate": 0.25,
                                                      "upper": BOUND_30,
                                                      "linear_leaves": False},
    "absolute, 100 trees, bound 30, constant leaves": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15,
                                                       "upper": BOUND_30,
                                                       "linear_leaves": False},
    "absolute, 100 trees, bound 30, constant leaves, l1": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15,
                                                           "upper": BOUND_30,
                                                           "linear_leaves": False, "objective": "l1"},
    "absolute, 70 trees of 10 leaves, bound 30, constant leaves, l1": {
        "target": "absolute", "n_estimators": 70, "learning_rate": 0.2, "num_leaves": 10,
        "upper": {**BOUND_30, "num_leaves": 15}, "linear_leaves": False, "objective": "l1"},
    # Session 19: the same, learning the drop less the one the fine-tuning probe implies.
    "residual, 70 trees of 10 leaves, bound 30, constant leaves, l1": {
        "target": "residual", "n_estimators": 70, "learning_rate": 0.2, "num_leaves": 10,
        "upper": {**BOUND_30, "num_leaves": 15}, "linear_leaves": False, "objective": "l1"},
    "residual, 70 trees of 10 leaves, bound 30, constant leaves, l1, 50 rows a leaf": {
        "target": "residual", "n_estimators": 70, "learning_rate": 0.2, "num_leaves": 10, "min_child_samples": 50,
        "upper": {**BOUND_30, "num_leaves": 15}, "linear_leaves": False, "objective": "l1"},
    # The bound model keeps 5 rows a leaf: with 50 it scored 1,000 candidates in 0.90 ms instead of 0.60-0.68.
    "residual, 70 trees of 10 leaves, bound 30, constant leaves, l1, 50 rows a leaf, bound 5": {
        "target": "residual", "n_estimators": 70, "learning_rate": 0.2, "num_leaves": 10, "min_child_samples": 50,
        "upper": {**BOUND_30, "num_leaves": 15, "min_child_samples": 5}, "linear_leaves": False, "objective": "l1"},
    # The Huber threshold caps each tree's step (gradients clipped at it): with 0.02, 100 trees at 0.15 reach about
    # 30 pp above the start, short of the 60-78 pp of collapsed candidates (magnitude 0.9 on Fashion-MNIST).
    "absolute, 100 trees, huber 0.02": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15, "huber_delta": 0.02},
    "absolute, 100 trees, huber 0.1": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15, "huber_delta": 0.1},
    "absolute, 100 trees, huber 0.3": {"target": "absolute", "n_estimators": 100, "learning_rate": 0.15, "huber_delta": 0.3},
}
# What a variant that does not name them gets (the settings of sessions 8-14; 5 rows a leaf until 18), whatever is
# shipped now: LightGBM parameters, then the variant keys that are not (no "upper": the bound model has the mean's trees).
UNNAMED = {"n_estimators": 100, "learning_rate": 0.15, "num_leaves": 15, "min_child_samples": 5}
UNNAMED_SETTINGS = {"upper": {}, "huber_delta": 0.1, "linear_leaves": True, "objective": "huber"}
SETTINGS = ("target", *UNNAMED_SETTINGS)  # variant keys that are not LightGBM parameters
KEYS = ("loao_mae_pp", "loao_median_abs_error_pp", "loao_spearman", "upper_bound_coverage", "regret_vs_oracle_pp",
        "regret_vs_oracle_mean_pp", "win_rate_vs_static_erm", "win_rate_vs_static_erm_within_one_test_image",
        "recommendation_feasible_share")


@contextlib.contextmanager
def variant_settings(predictor, variant: dict):
    """The predictor module set as ``variant`` says (and UNNAMED where it is silent), the shipped settings back after."""
    shipped = (dict(predictor.LGBM_PARAMS), dict(predictor.UPPER_LGBM_OVERRIDES), predictor.HUBER_DELTA,
               predictor.LINEAR_LEAVES, predictor.MEAN_OBJECTIVE)
    settings = {**UNNAMED_SETTINGS, **{k: v for k, v in variant.items() if k in SETTINGS}}
    params = {**shipped[0], **UNNAMED, **{k: v for k, v in variant.items() if k not in SETTINGS}}
    try:
        _set(predictor, params, settings["upper"], settings["huber_delta"], settings["linear_leaves"],
             settings["objective"])
        yield
    finally:
        _set(predictor, *shipped)


def _set(predictor, params: dict, upper: dict, huber_delta: float, linear_leaves: bool, objective: str) -> None:
    predictor.LGBM_PARAMS.clear()
    predictor.LGBM_PARAMS.update(params)
    predictor.UPPER_LGBM_OVERRIDES.clear()
    predictor.UPPER_LGBM_OVERRIDES.update(upper)
    predictor.HUBER_DELTA, predictor.LINEAR_LEAVES, predictor.MEAN_OBJECTIVE = huber_delta, linear_leaves, objective


def main() -> None:
    from edgecompress.meta import predictor
    from edgecompress.meta.collect import current_rows, read_rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=predictor.shipped_meta_dataset())
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1,
                        help="evaluate each variant with LightGBM's random_state 0 .. SEEDS-1 (row and feature "
                             "subsampling): differences of a tenth of a point are within one seed's spread")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = current_rows(read_rows(args.data))
    out = []
    for name, seed in ((n, s) for n in args.variants for s in range(args.seeds)):
        variant = {**VARIANTS[name], "random_state": seed}
        started = time.time()
        with variant_settings(predictor, variant):
            result = predictor.evaluate(rows, variant["target"])
        entry = {"variant": name, "seed": seed, "seconds": round(time.time() - started, 1),
                 "recommend_ms_median": round(result["recommend_ms_median"], 2), "per_task": {}, "leave_one_task_out": {}}
        for kind in (*predictor.REGRESSORS, predictor.NEAREST, predictor.MEASURED):
            for task, figures in result[kind]["per_task"].items():
                entry["per_task"].setdefault(task, {})[kind] = {k: figures[k] for k in KEYS if k in figures}
        for kind, tasks in result.get("leave_one_task_out", {}).items():
            for task, figures in tasks.items():
                entry["leave_one_task_out"].setdefault(task, {})[kind] = {
                    k: figures[k] for k in ("loto_mae_pp", "loto_median_abs_error_pp", "loto_spearman", "upper_bound_coverage")}
        out.append(entry)
        if not args.json:
            print(json.dumps(entry), flush=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                          "data": str(args.data), "rows": len(rows), "variants": out}, indent=1))


if __name__ == "__main__":
    main()
