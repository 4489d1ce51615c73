"""The meta-predictor on the meta-dataset shipped with the zoo (real collected rows)."""

import json

import numpy as np
import pytest

from edgecompress.cli import main
from edgecompress.meta.collect import current_rows, read_rows
from edgecompress.meta.predictor import Predictor, leave_one_architecture_out
from edgecompress.models import ZOO_DIR

META = ZOO_DIR / "meta.parquet"
# The predictor's tests fit on the rows of this many architectures (both tasks): leave-one-architecture-out over the
# whole meta-dataset takes minutes (`edgecompress meta eval`; its figures are in docs/benchmarks.md).
ARCHITECTURES = 8


@pytest.fixture(scope="module")
def every_row():
    return read_rows(META)


@pytest.fixture(scope="module")
def rows(every_row):
    keep = sorted({r["architecture"] for r in every_row})[:ARCHITECTURES]
    return [r for r in current_rows(every_row) if r["architecture"] in keep]


def test_shipped_meta_dataset_is_real_and_consistent(every_row):
    rows = every_row
    assert len(rows) >= 30
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy_drop"] == pytest.approx(r["parent_accuracy"] - r["accuracy"])
        assert r["wall_seconds"] > 0
    dense_fp32 = [r for r in rows if r["method"] == "none" and r["precision"] == "fp32"]
    assert dense_fp32
    for r in dense_fp32:
        # No compression: the drop is the runtime's fp32 against torch's, nil but for a few test images (where the
        # CPU computes "fp32" in bfloat16, eval_inference_precision "bf16": up to 0.5 pp on Fashion-MNIST).
        assert abs(r["accuracy_drop"]) <= 0.01, r


@pytest.mark.parametrize("kind", ["lightgbm", "ridge"])
def test_fit_predict(rows, kind):
    predictor = Predictor.fit(rows, kind)
    mean, upper = predictor.predict(rows)
    assert np.isfinite(mean).all() and (upper >= mean).all()
    truth = np.asarray([r["accuracy_drop"] for r in rows])
    assert np.mean(np.abs(mean - truth)) < np.mean(np.abs(truth - truth.mean()))  # beats predicting the mean


def test_rows_with_a_feature_that_is_no_number_are_refused_with_the_fix(rows):
    bad = [dict(r) for r in rows]
    bad[3]["f_oneshot_logit_rel_err"] = float("inf")
    with pytest.raises(Exception, match="1 of .* no number.*--refresh-features"):
        Predictor.fit(bad, "lightgbm")


def test_a_small_meta_dataset_still_gets_splits(rows):
    """LGBM_PARAMS's 50 rows a leaf would leave a user's meta-dataset of a few hundred rows a constant model."""
    from edgecompress.meta.predictor import LGBM_PARAMS, MIN_LEAF_DIVISOR

    few = rows[:200]
    assert len(few) < LGBM_PARAMS["min_child_samples"] * MIN_LEAF_DIVISOR
    mean, _ = Predictor.fit(few, "lightgbm", conformal=False).predict(few)
    truth = np.asarray([r["accuracy_drop"] for r in few])
    assert np.mean(np.abs(mean - truth)) < 0.5 * np.mean(np.abs(truth - np.median(truth)))


@pytest.mark.parametrize("kind, target", [("lightgbm", "absolute"), ("ridge", "absolute"), ("lightgbm", "residual")])
def test_save_load_round_trip(rows, tmp_path, kind, target):
    predictor = Predictor.fit(rows, kind, target=target)
    predictor.save(tmp_path / "p")
    loaded = Predictor.load(tmp_path / "p")
    assert loaded.kind == kind and loaded.target == target and loaded.margin == predictor.margin and loaded.group_margins == predictor.group_margins
    for a, b in zip(predictor.predict(rows), loaded.predict(rows)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_ridge_does_not_extrapolate_a_feature_out_of_range(rows, tmp_path):
    """A feature far past anything trained on (one-shot logits at 1.5e9 times the parent's: one digits row) gives
    ridge's prediction at the edge of the training range, saved and loaded alike, not a drop of 10^5 pp."""
    predictor = Predictor.fit(rows, "ridge", conformal=False)
    predictor.save(tmp_path / "p")
    loaded = Predictor.load(tmp_path / "p")
    feature = "f_oneshot_logit_rel_err"
    edge = max(rows, key=lambda r: r[feature])
    far = edge | {feature: edge[feature] * 1e9}
    for p in (predictor, loaded):
        np.testing.assert_allclose(p.predict([far])[0], p.predict([edge])[0], rtol=1e-9, atol=1e-12)


def test_upper_bound_is_calibrated_for_unseen_architectures(rows):
    """The conformal shift makes the held-out bound cover about what it claims (90%), not the ~65% of raw quantiles."""
    from edgecompress.meta.predictor import UPPER_QUANTILE

    result = leave_one_architecture_out(rows, "lightgbm")
    assert result["upper_bound_coverage"] >= UPPER_QUANTILE - 0.1


def test_bound_is_calibrated_per_group(every_row):
    """Mondrian conformal margins: an uncompressed fp32 model's bound is the runtime's arithmetic, not a pruned int8
    model's spread, so the parent itself fits a 2% allowed drop (on every architecture: a group needs
    MIN_GROUP_ROWS rows for a margin of its own)."""
    from edgecompress.meta.predictor import margin_group

    rows = current_rows(every_row)
    predictor = Predictor.fit(rows, "lightgbm")
    groups = {margin_group(r) for r in rows}
    assert "dense/32" in groups and set(predictor.group_margins) <= groups
    dense = [r for r in rows if margin_group(r) == "dense/32"]
    _, upper = predictor.predict(dense)
    assert np.median(upper) <= 0.02, upper
    compressed = [g for g in predictor.group_margins if g.startswith("compressed/")]
    assert compressed and all(predictor.group_margins["dense/32"] < predictor.group_margins[g] for g in compressed)


def test_scenario_evaluation_against_oracle_and_static_erm(rows):
    from edgecompress.meta.predictor import loao_predictions, row_costs, scenario_eval

    costs = row_costs(rows)
    preds = loao_predictions(rows, "ridge")
    result = scenario_eval(rows, preds, costs)
    assert result["scenarios"] + result["scenarios_without_solution"] >= 50 and len(result["targets"]) == 2
    assert result["regret_vs_oracle_pp"] >= 0 and 0 <= result["win_rate_vs_static_erm"] <= 1
    # Perfect predictions: the planner's choice is the oracle's, or a faster one at most one test image below it.
    truth = np.asarray([r["accuracy_drop"] for r in rows])
    perfect = scenario_eval(rows, (truth, truth), costs)
    assert 0 < perfect["resolution_pp"] < 1
    assert perfect["regret_vs_oracle_mean_pp"] <= perfect["resolution_pp"] + 1e-9
    assert perfect["recommendation_feasible_share"] == 1 and perfect["win_rate_vs_static_erm_within_one_test_image"] == 1
    # Predictions that rank everything backwards (compressed first) recommend worse.
    backwards = scenario_eval(rows, (truth.max() - truth, truth.max() - truth), costs)
    assert backwards["regret_vs_oracle_mean_pp"] > perfect["regret_vs_oracle_mean_pp"] + 1


def test_loao_and_cli(rows, capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len({r["architecture"] for r in rows}) < 2:
        pytest.fail("the shipped meta-dataset must cover at least two architectures")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "meta.parquet")
    assert main(["meta", "eval", "--json", "--data", str(tmp_path / "meta.parquet")]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("loao_mae_pp", "loao_spearman", "recommend_ms_median", "lightgbm", "ridge", "nearest_architecture"):
        assert key in out
    assert out["lightgbm"]["loao_mae_pp"] >= 0 and 0 <= out["lightgbm"]["upper_bound_coverage"] <= 1
    tasks = sorted({r.get("task") or "digits" for r in rows})
    assert sorted(out["lightgbm"]["per_task"]) == tasks and out["task"] in tasks
    assert ("leave_one_task_out" in out) == (len(tasks) > 1)


def test_train_errors(tmp_path, capsys):
    assert main(["meta", "train", "--data", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(Exception, match="at least 10"):
        Predictor.fit(read_rows(META)[:5])


def test_monotone_in_ratio():
    from edgecompress.meta.predictor import monotone_in_ratio

    keys = [("m", "none", 0.0, "int8"), ("m", "p", 0.5, "int8"), ("m", "p", 0.3, "int8"), ("m", "p", 0.7, "int8"),
            ("m", "q", 0.5, "fp32"), ("n", "p", 0.5, "int8")]
    drop = np.array([0.02, 0.01, 0.03, 0.025, 0.04, 0.0])
    (out,) = monotone_in_ratio(keys, drop)
    # int8 dense is the floor (0.02); 0.3 -> 0.5 -> 0.7 never falls; other groups untouched.
    np.testing.assert_allclose(out, [0.02, 0.03, 0.03, 0.03, 0.04, 0.0])


def test_nearest_architecture_baseline_copies_the_nearest_measured_drop():
    from edgecompress.meta.predictor import ARCHITECTURE_FEATURES, nearest_architecture_predictions

    def rows_of(arch, size, drops, task="digits"):
        base = {f: 1.0 for f in ARCHITECTURE_FEATURES}
        return [{**base, "f_params": size, "architecture": arch, "model": arch, "task": task, "method": "p",
                 "ratio": ratio, "precision": "fp32", "accuracy_drop": d} for ratio, d in zip((0.3, 0.5), drops)]

    rows = rows_of("small", 1e5, (0.01, 0.02)) + rows_of("tiny", 2e5, (0.03, 0.04)) + rows_of("huge", 1e8, (0.2, 0.5))
    mean, upper = nearest_architecture_predictions(rows)
    np.testing.assert_allclose(mean, [0.03, 0.04, 0.01, 0.02, 0.03, 0.04])  # huge's nearest is tiny
    np.testing.assert_allclose(upper, mean)


def test_leave_one_task_out_trains_on_the_other_task_only(rows):
    from edgecompress.meta.predictor import leave_one_task_out, row_task

    assert {row_task(r) for r in rows} <= {"digits", "fashion-mnist"}
    digits = [r for r in rows if row_task(r) == "digits"][:200]
    other = [{**r, "task": "fashion-mnist", "accuracy_drop": r["accuracy_drop"] * 0.5} for r in digits]
    result = leave_one_task_out(digits + other, "ridge")
    assert set(result) == {"digits", "fashion-mnist"}
    assert result["fashion-mnist"]["train_rows"] == len(digits) and result["fashion-mnist"]["rows"] == len(other)
    assert result["digits"]["loto_mae_pp"] >= 0 and 0 <= result["digits"]["upper_bound_coverage"] <= 1


def test_targets_transform_the_drop_and_predictions_come_back_as_drops(rows, capsys):
    from edgecompress.cli import META_TARGETS
    from edgecompress.meta.predictor import DEFAULT_TARGET, TARGETS, probe_implied_drop, target_transform

    assert META_TARGETS == TARGETS  # the command line names them without importing the predictor
    for command in ("train", "eval"):
        assert main(["meta", command, "--help"]) == 0
        assert f"default: {DEFAULT_TARGET}" in " ".join(capsys.readouterr().out.split())
    features = ["f_parent_accuracy", "f_num_classes", "f_probe_agreement"]
    # A parent at 85% on 10 classes: not probed (agreement 1), probed and kept, probed at chance, half-way.
    x = np.asarray([[0.85, 10, 1.0], [0.85, 10, 0.97], [0.85, 10, 0.1], [0.85, 10, 0.55]])
    scale, offset = target_transform(x, features, "headroom")
    assert scale == pytest.approx([0.75] * 4) and not offset.any()  # a collapse to chance (10%) is 1
    scale, offset = target_transform(x, features, "absolute")
    assert (scale == 1).all() and not offset.any()
    scale, offset = target_transform(x, features, "residual")
    assert (scale == 1).all() and offset == pytest.approx([0.0, 0.025, 0.75, 0.375])
    assert probe_implied_drop(x, features) == pytest.approx(offset)
    with pytest.raises(Exception, match="unknown target"):
        target_transform(x, features, "relative")
    fitted = {t: Predictor.fit(rows, "ridge", target=t) for t in TARGETS}
    assert [p.target for p in fitted.values()] == list(TARGETS)
    truth = np.asarray([r["accuracy_drop"] for r in rows])
    for predictor in fitted.values():  # whatever they learn, drops in accuracy come out
        assert np.mean(np.abs(predictor.predict(rows)[0] - truth)) < np.mean(np.abs(truth - truth.mean()))


def test_rows_of_an_older_feature_version_are_refused(rows):
    """After a feature change, training on rows whose features were not recomputed says how to recompute them."""
    from edgecompress.core.errors import UsageError
    from edgecompress.meta.features import FEATURES_VERSION

    assert {r["features_version"] for r in rows} == {FEATURES_VERSION}  # the shipped rows are current
    stale = [dict(r, features_version=FEATURES_VERSION - 1) if i % 7 == 0 else r for i, r in enumerate(rows)]
    with pytest.raises(UsageError, match="--refresh-features"):
        Predictor.fit(stale, "ridge")
