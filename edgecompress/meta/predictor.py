"""The meta-predictor: accuracy drop of a compressed candidate, from meta-features alone.

A LightGBM regressor (L1 loss: the median) gives the expected drop; a second one, trained with the
quantile loss at ``UPPER_QUANTILE``, gives an upper bound of the drop (a lower
confidence bound of the accuracy) for planning under ``--max-accuracy-drop``.
A ridge regression on the same features is the baseline it must beat.
"""

from __future__ import annotations

import itertools
import json
import operator
import time
from pathlib import Path

import numpy as np

from edgecompress.compress.methods import METHODS
from edgecompress.core.errors import UsageError
from edgecompress.core.fsutil import atomic_path
from edgecompress.meta.features import FEATURE_DOCS, FEATURES_VERSION

UPPER_QUANTILE = 0.9
# A candidate the meta-dataset measured exactly (AccuracyModel.measured) is bounded this far below its measurement:
# what rebuilding it moves the verified accuracy. The float builds of such candidates found in this machine's run
# directories (session 12, docs/benchmarks.md) matched their rows within one of 360 test images at the default
# recipe, and within 3 (0.8 pp) across code versions.
MEASURED_REBUILD_MARGIN = 0.01
# The conformal margin is calibrated over this many folds of architectures (each predicted by a model fitted without
# its fold): one fold per architecture costs a fit per architecture, and the meta-dataset has dozens.
CONFORMAL_FOLDS = 5
# Expected and upper-bound drop of an uncompressed model where no meta-dataset row says otherwise.
DENSE_DROP_WITHOUT_ROWS = {"fp16": (0.0, 0.005), "int8": (0.01, 0.05)}
# The margin is calibrated per group of candidates (Mondrian conformal prediction, Vovk et al. 2005): uncompressed or
# compressed, at each precision. One margin for all held the bound of an uncompressed fp32 model (a drop of nothing
# but the runtime's arithmetic) as far out as a pruned int8 one's, so that no candidate, the parent included, fitted a
# 2% drop. A group with fewer rows than this takes the margin of all rows.
MIN_GROUP_ROWS = 20
# Drops beyond 10 pp off the prediction count linearly, not squared. The threshold also caps each tree's step
# (gradients are clipped at it): at 0.02, 100 trees at 0.15 could not rise above about 40 pp, and Fashion-MNIST's
# collapsed candidates (magnitude 0.9: 60-78 pp) were predicted at 35-40 (tools/bench_predictor.py, "huber" variants).
HUBER_DELTA = 0.1
# The expected-drop model's loss: "huber" (HUBER_DELTA, sessions 9-14) or "l1". At ratios of 0.7 and above a
# candidate keeps within a few points of its parent or falls to chance; a leaf's mean between the two is wrong either
# way, and its median (l1) is the better guess: Fashion-MNIST
# held-out MAE 3.88 pp against 4.27, Spearman 0.872 against 0.849, digits 4.71 against 4.92 (session 15).
MEAN_OBJECTIVE = "l1"
# One thread: a meta-dataset of hundreds of rows fits in a tenth of a second on one; with two OpenMP threads and the
# other core busy (a collection beside it) the same fit took 60-80 times longer (7.5 s against 0.11 s).
# 100 trees at 0.15 rather than 300 at 0.05: the same held-out error on meta-dataset v2, and scoring 1,000
# candidates takes 10 ms instead of 25 (tools/bench_predictor.py). 70 trees of 10 leaves at 0.2 rather than 100 of
# 15 at 0.15 (session 15, l1 loss): Fashion-MNIST held-out MAE 3.86 pp against 3.81, digits 4.91 against 4.96, and
# the expected-drop model scores 1,000 candidates in 1.3 ms instead of 2.3-2.7.
# 50 rows a leaf rather than 5 (session 19, with the residual target): a leaf then speaks for several architectures,
# not one architecture's few rows; Fashion-MNIST held-out MAE 2.95 pp against 3.06, leave-one-task-out 3.54 against
# 3.71 (means of three seeds, tools/bench_predictor.py --seeds 3).
LGBM_PARAMS = {"n_estimators": 70, "learning_rate": 0.2, "num_leaves": 10, "min_child_samples": 50,
               "subsample": 0.9, "subsample_freq": 1, "colsample_bytree": 0.9, "random_state": 0, "verbose": -1,
               "n_jobs": 1}
# The fewest rows a leaf may hold: LGBM_PARAMS's, or 1/MIN_LEAF_DIVISOR of the meta-dataset's rows where that is fewer,
# never under 5 (50 from 2,000 rows up; 5 up to 239).
MIN_LEAF_DIVISOR = 40


# Whether the expected-drop model's leaves are linear in the features (LightGBM's linear_tree). They were (sessions
# 8-14), for unseen architectures at the edge of the feature space; with the version-5 features, constant leaves
# predict held-out architectures as well (Fashion-MNIST MAE 4.13 pp against 4.22, digits 5.04 against 5.04) and
# take half the time (tools/bench_predictor.py, docs/benchmarks.md, session 15).
LINEAR_LEAVES = False
# What the upper-bound (quantile) model changes of LGBM_PARAMS: its raw bound is shifted by the conformal margin
# anyway, so it can be coarser than the mean's. 30 trees at 0.4 rather than 100 at 0.15: held-out coverage 0.93
# against 0.90 on Fashion-MNIST, the same regret, and 1.3 ms less for 1,000 candidates (session 15).
# It keeps 5 rows a leaf: with the mean's 50 its bound was no better and scored 1,000 candidates in 0.90 ms instead of
# 0.60-0.68 (session 19).
UPPER_LGBM_OVERRIDES: dict = {"n_estimators": 30, "learning_rate": 0.4, "num_leaves": 15, "min_child_samples": 5}


def feature_names(rows: list[dict]) -> list[str]:
    return [f for f in FEATURE_DOCS if f in rows[0]]


def matrix(rows: list[dict], features: list[str]) -> np.ndarray:
    # itemgetter into one flat iterator, not a float() per cell nor a list of tuples: at 1,000 candidates the cells
    # took half the time of a recommendation, the tuples a fifth.
    get = operator.itemgetter(*features)  # one feature: the value itself, not a tuple
    cells = itertools.chain.from_iterable(map(get, rows)) if len(features) > 1 else map(get, rows)
    return np.fromiter(cells, dtype=np.float64, count=len(rows) * len(features)).reshape(len(rows), len(features))


# What the regressors learn: "absolute", the drop in accuracy; "headroom", the drop as a share of the parent's
# accuracy above chance (a collapse to chance is 1 on every task, whatever the parent and the class count);
# "residual", the drop less the one the fine-tuning probe implies (probe_implied_drop), so that the trees learn how far
# a full fine-tune recovers beyond the probe rather than the probe's scale again for every method.
TARGETS = ("absolute", "headroom", "residual")
# Measured on meta-dataset v2 (tools/bench_predictor.py, docs/benchmarks.md): neither of the first two wins on both
# tasks, and the absolute target's bound covered better when the task was held out. The residual one (session 19,
# tools/bench_predictor.py --seeds 3, means of three seeds): leave-one-task-out MAE 3.71 pp against 4.38 on
# Fashion-MNIST and 4.52 against 4.90 on the digits; held out by architecture, 3.06 against 3.15 on Fashion-MNIST and
# 4.29 against 4.48 on the digits.
DEFAULT_TARGET = "residual"


def probe_implied_drop(x: np.ndarray, features: list[str]) -> np.ndarray:
    """The drop the probe's agreement implies: the parent's accuracy above chance, times the share of that margin the
    probed candidate lost (agreement at chance loses all of it). 0 for a candidate not probed (agreement 1)."""
    parent, classes, agreement = (x[:, features.index(f)] for f in
                                  ("f_parent_accuracy", "f_num_classes", "f_probe_agreement"))
    chance = 1.0 / np.maximum(classes, 1.0)
    kept = np.clip((agreement - chance) / (1.0 - chance), 0.0, 1.0)
    return np.maximum(parent - chance, 0.0) * (1.0 - kept)


def target_transform(x: np.ndarray, features: list[str], target: str) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) of each row of the feature matrix ``x``: the regressors learn (drop - offset) / scale, and
    their predictions are multiplied by scale and offset added back."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    scale, offset = np.ones(len(x)), np.zeros(len(x))
    if target == "headroom":
        chance = 1.0 / np.maximum(x[:, features.index("f_num_classes")], 1.0)
        scale = np.maximum(x[:, features.index("f_parent_accuracy")] - chance, 0.05)
    elif target == "residual":
        offset = probe_implied_drop(x, features)
    return scale, offset


def margin_groups(x: np.ndarray, features: list[str]) -> np.ndarray:
    """The conformal group (MIN_GROUP_ROWS) of each row of the feature matrix ``x`` (``features`` name its columns):
    "dense/8" is an uncompressed int8 candidate, "compressed/32" a compressed fp32 one."""
    codes, names = _group_codes(x, features)
    return names[codes]


def _group_codes(x: np.ndarray, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """margin_groups as (an index per row, the names it indexes): a few distinct groups, named once each rather than
    per row (a string per row took 0.4 ms of the 7 of scoring 1,000 candidates)."""
    dense = x[:, features.index("f_ratio")] == 0.0
    bits = x[:, features.index("f_precision_bits")].astype(np.int64)
    unique, codes = np.unique(np.where(dense, -bits, bits), return_inverse=True)
    return codes.reshape(-1), np.asarray([f"{'dense' if u <= 0 else 'compressed'}/{abs(u)}" for u in unique.tolist()])


def margin_group(row: dict) -> str:
    """margin_groups of one candidate's features."""
    features = ["f_ratio", "f_precision_bits"]
    return str(margin_groups(matrix([row], features), features)[0])


class Predictor:
    def __init__(self, features: list[str], mean, upper, kind: str = "lightgbm", rows: int | None = None,
                 margin: float = 0.0, target: str = "absolute", group_margins: dict[str, float] | None = None):
        self.features, self.mean, self.upper, self.kind, self.rows = features, mean, upper, kind, rows
        self.margin = margin  # conformal shift of the upper bound, in target units, for a group without its own
        self.group_margins = dict(group_margins or {})  # margin_group -> its own shift
        self.target = target

    def describe(self) -> str:
        return f"{self.kind}, {self.rows} rows" if self.rows else self.kind

    @classmethod
    def fit(cls, rows: list[dict], kind: str = "lightgbm", *, conformal: bool = True,
            target: str = DEFAULT_TARGET) -> "Predictor":
        """Fit the expected-drop and upper-bound models (on the drop transformed as ``target`` says: target_transform).

        With ``conformal`` (and rows from three or more architectures), the upper bound is calibrated
        for models the predictor has not seen (conformalized quantile regression, Romano et al. 2019,
        with architectures as the exchangeable units): the raw bound is predicted for each of ``CONFORMAL_FOLDS``
        folds of architectures by models fitted without that fold, and shifted by the ``UPPER_QUANTILE`` quantile
        of how far the truth exceeded it, within each margin_group that has MIN_GROUP_ROWS rows (over all rows for
        the rest). Quantile models fitted on a few architectures otherwise cover far less than they claim.
        """
        if len(rows) < 10:
            raise UsageError(f"the meta-dataset has {len(rows)} rows; training needs at least 10")
        stale = sum(r.get("features_version", FEATURES_VERSION) != FEATURES_VERSION for r in rows)
        if stale:
            raise UsageError(f"{stale} of {len(rows)} meta-dataset rows have features of an older version than "
                             f"today's ({FEATURES_VERSION}); recompute them first: edgecompress meta collect --out "
                             "META.parquet --refresh-features")
        features = feature_names(rows)
        x = matrix(rows, features)
        unfinished = int((~np.isfinite(x).all(1)).sum())
        if unfinished:
            raise UsageError(f"{unfinished} of {len(rows)} meta-dataset rows have a feature that is no number (computed "
                             "before a fix); recompute them first: edgecompress meta collect --out META.parquet "
                             "--refresh-features")
        scale, offset = target_transform(x, features, target)
        y = (np.asarray([r["accuracy_drop"] for r in rows]) - offset) / scale
        if kind == "lightgbm":
            import lightgbm as lgb

            # L1 or Huber: a few collapsed candidates (drops of 60-90 pp) must not drag every other prediction.
            loss = {"objective": "huber", "alpha": HUBER_DELTA} if MEAN_OBJECTIVE == "huber" else {"objective": MEAN_OBJECTIVE}
            # A meta-dataset of a few hundred rows (a user's own) gets smaller leaves: 50 rows would leave it few splits.
            params = {**LGBM_PARAMS, "min_child_samples": min(LGBM_PARAMS["min_child_samples"],
                                                              max(5, len(rows) // MIN_LEAF_DIVISOR))}
            mean = lgb.LGBMRegressor(**loss, linear_tree=LINEAR_LEAVES, linear_lambda=1.0, **params).fit(x, y)
            upper = lgb.LGBMRegressor(objective="quantile", alpha=UPPER_QUANTILE,
                                      **{**params, **UPPER_LGBM_OVERRIDES}).fit(x, y)
            # The boosters alone, as load() gives them: scikit-learn's wrapper checks its input on every call.
            mean, upper = _Booster(mean.booster_), _Booster(upper.booster_)
        elif kind == "ridge":
            from sklearn.linear_model import Ridge
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            pipe = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x, y)
            scaler, ridge = pipe.steps[0][1], pipe.steps[-1][1]
            # Inputs clipped to the training range: a linear model extrapolates any feature without bound, and one
            # digits row's one-shot logits at 1.5e9 times its parent's put ridge's leave-one-task-out MAE at 473,504 pp.
            mean = _Linear(scaler.mean_, scaler.scale_, ridge.coef_, float(ridge.intercept_), x.min(0), x.max(0))
            # Raw bound: the mean plus the residuals' quantile on the training rows.
            upper = _Shifted(mean, float(np.quantile(y - mean.predict(x), UPPER_QUANTILE)))
        else:
            raise UsageError(f"unknown regressor {kind!r}; use lightgbm or ridge")
        margin, group_margins = 0.0, {}
        archs = sorted({r["architecture"] for r in rows})
        if conformal and len(archs) >= 3:
            raw = np.zeros(len(rows))
            for fold in (set(archs[i::CONFORMAL_FOLDS]) for i in range(min(CONFORMAL_FOLDS, len(archs)))):
                held = [i for i, r in enumerate(rows) if r["architecture"] in fold]
                inner = cls.fit([r for r in rows if r["architecture"] not in fold], kind, conformal=False, target=target)
                raw[held] = (inner.predict([rows[i] for i in held])[1] - offset[held]) / scale[held]
            margin = float(np.quantile(y - raw, UPPER_QUANTILE))
            groups = margin_groups(x, features)
            group_margins = {str(g): float(np.quantile((y - raw)[groups == g], UPPER_QUANTILE))
                             for g in sorted(set(groups)) if (groups == g).sum() >= MIN_GROUP_ROWS}
        return cls(features, mean, upper, kind, len(rows), margin, target, group_margins)

    def predict(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(expected drop, upper bound of the drop), as shares of accuracy.

        Neither is below zero: fine-tuning sometimes gains a little over the parent, but a planner that
        promised gains would rank an unseen model by noise; at equal predicted drop the better parent wins.
        """
        x = matrix(rows, self.features)
        scale, offset = target_transform(x, self.features, self.target)
        mean = np.clip(self.mean.predict(x) * scale + offset, 0.0, None)
        margin = self._margins(x) if self.group_margins else self.margin
        return mean, np.maximum((self.upper.predict(x) + margin) * scale + offset, mean)

    def _margins(self, x: np.ndarray) -> np.ndarray:
        """Each row's conformal margin: its group's (margin_groups), else the margin of all rows."""
        codes, names = _group_codes(x, self.features)
        return np.asarray([self.group_margins.get(g, self.margin) for g in names.tolist()])[codes]

    def save(self, directory: Path) -> None:
        """LightGBM boosters as their text files, ridge as its coefficients in JSON: no pickles to load."""
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            meta = {"kind": self.kind, "features": self.features, "upper_quantile": UPPER_QUANTILE, "rows": self.rows,
                    "conformal_margin": self.margin, "conformal_group_margins": self.group_margins,
                    "target": self.target}
            if self.kind == "lightgbm":
                self.mean.booster_.save_model(str(tmp / "drop_mean.txt"))
                self.upper.booster_.save_model(str(tmp / "drop_upper.txt"))
            else:
                meta["linear"] = {**self.mean.to_json(), "upper_shift": self.upper.margin}
            (tmp / "predictor.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Predictor":
        directory = Path(directory)
        if not (directory / "predictor.json").is_file():
            raise UsageError(f"{directory} holds no trained predictor (predictor.json missing)")
        meta = json.loads((directory / "predictor.json").read_text())
        if meta["kind"] == "lightgbm":
            import lightgbm as lgb

            mean = _Booster(lgb.Booster(model_file=str(directory / "drop_mean.txt")))
            upper = _Booster(lgb.Booster(model_file=str(directory / "drop_upper.txt")))
        else:
            mean = _Linear(**{k: v for k, v in meta["linear"].items() if k != "upper_shift"})
            upper = _Shifted(mean, meta["linear"]["upper_shift"])
        return cls(meta["features"], mean, upper, meta["kind"], meta.get("rows"), meta.get("conformal_margin", 0.0),
                   meta.get("target", "absolute"), meta.get("conformal_group_margins"))


class _Shifted:
    def __init__(self, model, margin):
        self.model, self.margin = model, margin

    def predict(self, x):
        return self.model.predict(x) + self.margin


class _Linear:
    """A standardised linear model on inputs clipped to [low, high] (the training range; none where not given, as
    predictors saved before it were), kept as JSON."""

    def __init__(self, center, scale, coef, intercept, low=None, high=None):
        self.center, self.scale = np.asarray(center, dtype=float), np.asarray(scale, dtype=float)
        self.coef, self.intercept = np.asarray(coef, dtype=float), float(intercept)
        self.low = None if low is None else np.asarray(low, dtype=float)
        self.high = None if high is None else np.asarray(high, dtype=float)

    def predict(self, x):
        if self.low is not None:
            x = np.clip(x, self.low, self.high)
        return ((x - self.center) / self.scale) @ self.coef + self.intercept

    def to_json(self) -> dict:
        out = {"center": self.center.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
               "intercept": self.intercept}
        if self.low is not None:
            out |= {"low": self.low.tolist(), "high": self.high.tolist()}
        return out


class _Booster:
    def __init__(self, booster):
        self.booster_ = booster

    def predict(self, x):
        # One thread, as in fitting (LGBM_PARAMS): a thousand rows are too few to share, and OpenMP threads beside
        # another busy core wait for it.
        return self.booster_.predict(x, num_threads=1)


def monotone_in_ratio(keys: list[tuple], *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Predicted drops that never fall as the same method prunes more of the same model at the same precision.

    ``keys`` are (model, method, ratio, precision), the model any hashable naming one parent; the dense model (method "none") is the floor of every
    method's curve. Regressors fitted on a handful of architectures wobble along the ratio axis for an
    unseen one; the wobble is noise, and the planner would otherwise pick the noisier, more pruned variant.
    """
    out = [a.copy() for a in arrays]
    groups: dict[tuple, list[int]] = {}
    dense: dict[tuple, int] = {}
    for i, (model, method, ratio, precision) in enumerate(keys):
        if method == "none":
            dense[(model, precision)] = i
        else:
            groups.setdefault((model, method, precision), []).append(i)
    for (model, _, precision), idx in groups.items():
        idx = sorted(idx, key=lambda i: keys[i][2])
        for a in out:
            floor = a[dense[(model, precision)]] if (model, precision) in dense else -np.inf
            a[idx] = np.maximum.accumulate(np.maximum(a[idx], floor))
    return tuple(out)


def accuracies_from_drops(candidates, mean: np.ndarray, upper: np.ndarray, parents: dict[str, float]):
    """(expected accuracy, lower bound) of ``candidates`` from their predicted (expected, upper) drops: drops made
    monotone in the ratio (monotone_in_ratio), taken from each parent's accuracy, clipped to [0, 1]."""
    keys = [(c.model, c.prune.method, c.prune.ratio, c.quant.precision) for c in candidates]
    mean, upper = monotone_in_ratio(keys, mean, upper)
    parent = np.asarray([parents[c.model] for c in candidates])
    return np.clip(parent - mean, 0.0, 1.0), np.clip(parent - upper, 0.0, 1.0)


def row_task(row: dict) -> str:
    """The task a meta-dataset row was measured on; rows of the first meta-dataset (the digits only) have no column."""
    from edgecompress.data.datasets import DIGITS_NAME

    return row.get("task") or DIGITS_NAME


def row_keys(rows: list[dict]) -> list[tuple]:
    """monotone_in_ratio's keys: a parent is a model on a task (the zoos share model names)."""
    return [((row_task(r), r["model"]), r["method"], r["ratio"], r["precision"]) for r in rows]


def loao_predictions(rows: list[dict], kind: str, target: str = DEFAULT_TARGET) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (expected, upper-bound) drop from a predictor trained without its architecture."""
    archs = sorted({r["architecture"] for r in rows})
    if len(archs) < 2:
        raise UsageError("leave-one-architecture-out needs rows from at least two architectures")
    mean, upper = np.zeros(len(rows)), np.zeros(len(rows))
    for arch in archs:
        held = [i for i, r in enumerate(rows) if r["architecture"] == arch]
        predictor = Predictor.fit([r for r in rows if r["architecture"] != arch], kind, target=target)
        m, u = predictor.predict([rows[i] for i in held])
        mean[held], upper[held] = m, u
    return monotone_in_ratio(row_keys(rows), mean, upper)


def error_metrics(rows: list[dict], mean: np.ndarray, upper: np.ndarray, prefix: str) -> dict:
    """MAE and median absolute error (pp), Spearman within each parent (a model on a task), the bound's coverage."""
    from scipy.stats import spearmanr

    truth = np.asarray([r["accuracy_drop"] for r in rows])
    errors = np.abs(mean - truth) * 100
    spearmans = []
    for parent in sorted({(row_task(r), r["model"]) for r in rows}):
        idx = [i for i, r in enumerate(rows) if (row_task(r), r["model"]) == parent]
        if len(idx) > 2 and np.ptp(truth[idx]) > 0 and np.ptp(mean[idx]) > 0:
            spearmans.append(float(spearmanr(mean[idx], truth[idx]).statistic))
    return {
        f"{prefix}_mae_pp": float(np.mean(errors)),
        f"{prefix}_median_abs_error_pp": float(np.median(errors)),
        f"{prefix}_spearman": float(np.mean(spearmans)) if spearmans else None,
        "upper_bound_coverage": float(np.mean(truth <= upper + 1e-9)),
        "architectures": len({r["architecture"] for r in rows}),
        "rows": len(rows),
    }


def leave_one_architecture_out(rows: list[dict], kind: str, predictions=None) -> dict:
    """Train without one architecture (on every task), predict it: MAE (pp), within-model Spearman, bound coverage."""
    mean, upper = predictions if predictions is not None else loao_predictions(rows, kind)
    return error_metrics(rows, mean, upper, "loao")


def leave_one_task_out(rows: list[dict], kind: str, target: str = DEFAULT_TARGET) -> dict:
    """For each task: train on the other tasks' rows only, predict this one's (a task the predictor has not seen)."""
    out = {}
    for task in sorted({row_task(r) for r in rows}):
        train = [r for r in rows if row_task(r) != task]
        test = [r for r in rows if row_task(r) == task]
        mean, upper = monotone_in_ratio(row_keys(test), *Predictor.fit(train, kind, target=target).predict(test))
        out[task] = {**error_metrics(test, mean, upper, "loto"), "train_rows": len(train)}
    return out


# The model-level meta-features: what "nearest architecture" is measured on.
ARCHITECTURE_FEATURES = ("f_params", "f_flops", "f_depth", "f_n_conv", "f_n_depthwise", "f_n_pointwise", "f_n_linear",
                         "f_n_norm", "f_share_depthwise_macs", "f_share_pointwise_macs", "f_share_depthwise_params",
                         "f_w_kurtosis_mean", "f_w_range_ratio_max")


def nearest_architecture_predictions(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The baseline a learned predictor must beat: each held-out architecture's drop is the one measured for the
    nearest other architecture (standardised log model features) with the same compression on the same task, else
    on any task, else the median of that compression. No bound: the upper bound is the prediction."""
    archs = sorted({r["architecture"] for r in rows})
    vectors = {}
    for a in archs:
        mine = [r for r in rows if r["architecture"] == a]
        vectors[a] = np.mean([[np.log1p(abs(float(r[f]))) for f in ARCHITECTURE_FEATURES] for r in mine], axis=0)
    stacked = np.asarray([vectors[a] for a in archs])
    scale = stacked.std(0) + 1e-9
    measured: dict[tuple, float] = {}
    by_config: dict[tuple, list[float]] = {}
    for r in rows:
        config = (r["method"], r["ratio"], r["precision"])
        measured.setdefault((r["architecture"], row_task(r)) + config, r["accuracy_drop"])
        measured.setdefault((r["architecture"], None) + config, r["accuracy_drop"])
        by_config.setdefault(config, []).append(r["accuracy_drop"])
    out = np.zeros(len(rows))
    for i, r in enumerate(rows):
        arch, config = r["architecture"], (r["method"], r["ratio"], r["precision"])
        order = sorted((a for a in archs if a != arch), key=lambda a: float(np.sum(((vectors[a] - vectors[arch]) / scale) ** 2)))
        found = next((measured[k] for task in (row_task(r), None) for a in order
                      if (k := (a, task) + config) in measured), None)
        out[i] = found if found is not None else float(np.median(by_config[config]))
    out = np.clip(out, 0.0, None)
    return monotone_in_ratio(row_keys(rows), out, out.copy())


LATENCY_QUANTILES = (0.05, 0.15, 0.3, 0.5, 0.75)
MAX_DROPS = (0.005, 0.01, 0.02, 0.05, 0.1)


def scenario_eval(rows: list[dict], predictions, costs: dict[str, list]) -> dict:
    """Recommendation quality over (target, latency budget, max drop) scenarios, against the oracle and static ERM.

    ``costs[target]`` is every row's predicted cost (CostPrediction) on that target (the cost model both the
    planner and the oracle see). Budgets are quantiles of those latencies, so every target gets tight and loose ones.
    The recommendation is the planner's own choice (planner.rank) on held-out predictions: inside the latency budget
    with the lower bound inside the max drop (else inside the budget), the highest expected accuracy, the fastest
    first among those one test image apart. The oracle is the best measured accuracy inside both limits. Static ERM
    is the one (method, ratio, precision) that, always used on the most accurate parent it lets fit, scores best over
    all scenarios.
    """
    from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec
    from edgecompress.plan.planner import Budget, Estimate, rank

    mean, upper = predictions
    acc = np.asarray([r["accuracy"] for r in rows])
    drop = np.asarray([r["accuracy_drop"] for r in rows])
    parent = np.asarray([r["parent_accuracy"] for r in rows])
    config = [(r["method"], r["ratio"], r["precision"]) for r in rows]
    latencies = {target: np.asarray([c.latency_ms for c in cost]) for target, cost in costs.items()}
    # One test image, the measurement's resolution (1/360 of top-1 on the digits): the smallest step between
    # measured accuracies.
    steps = np.diff(np.unique(acc))
    resolution = float(steps[steps > 1e-9].min()) if (steps > 1e-9).any() else 0.0
    candidates = [Candidate(model=str(i), prune=PruneSpec(method=r["method"], ratio=r["ratio"]),
                            quant=QuantSpec(precision=r["precision"])) for i, r in enumerate(rows)]
    estimates = {target: [Estimate(candidate=c, cost=cost, accuracy=float(parent[i] - mean[i]), fits=False,
                                   accuracy_low=float(parent[i] - upper[i]), parent_accuracy=float(parent[i]))
                          for i, (c, cost) in enumerate(zip(candidates, costs[target]))] for target in costs}
    scenarios = []
    for target, lat in latencies.items():
        for q in LATENCY_QUANTILES:
            for max_drop in MAX_DROPS:
                scenarios.append((target, float(np.quantile(lat, q)), max_drop))

    def static_choice(cfg, target, budget, max_drop):
        idx = [i for i, c in enumerate(config) if c == cfg and latencies[target][i] <= budget]
        if not idx:
            return None
        i = max(idx, key=lambda i: parent[i])
        return acc[i] if drop[i] <= max_drop else None

    configs = sorted(set(config))
    erm = max(configs, key=lambda c: np.mean([static_choice(c, *sc) or 0.0 for sc in scenarios]))
    regrets, wins, near_wins, feasible, counted = [], [], [], [], 0
    for target, budget, max_drop in scenarios:
        inside = latencies[target] <= budget
        ok = inside & (drop <= max_drop)
        if not ok.any():
            continue  # nothing meets this scenario: no oracle to compare with
        counted += 1
        oracle = acc[ok].max()
        # Every row inside the budget is a candidate the planner could build; the first it ranks is the pick.
        pool = [estimates[target][i] for i in np.flatnonzero(inside)]
        pick = int(rank(pool, Budget(latency_ms=budget, max_accuracy_drop=max_drop), resolution)[0].candidate.model)
        pick_ok = bool(drop[pick] <= max_drop)
        regrets.append((oracle - acc[pick]) * 100)
        feasible.append(pick_ok)
        static = static_choice(erm, target, budget, max_drop)
        wins.append(pick_ok and (static is None or acc[pick] >= static - 1e-9))
        near_wins.append(pick_ok and (static is None or acc[pick] >= static - resolution - 1e-9))
    return {
        "regret_vs_oracle_pp": float(np.median(regrets)),
        "regret_vs_oracle_mean_pp": float(np.mean(regrets)),
        "win_rate_vs_static_erm": float(np.mean(wins)),
        "win_rate_vs_static_erm_within_one_test_image": float(np.mean(near_wins)),
        "recommendation_feasible_share": float(np.mean(feasible)),
        "static_erm": {"method": erm[0], "ratio": erm[1], "precision": erm[2]},
        "resolution_pp": resolution * 100,
        "scenarios": counted,
        "scenarios_without_solution": len(scenarios) - counted,
        "targets": sorted(latencies),
    }


def recommend_ms(predictor: Predictor, rows: list[dict], repeats: int = 20, candidates: int = 1000) -> float:
    """Median time to score ``candidates`` candidates (``rows`` repeated up to that count) once and pick one: what one
    recommendation costs."""
    rows = [rows[i % len(rows)] for i in range(candidates)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mean, upper = predictor.predict(rows)
        int(np.argmin(upper))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


SCENARIO_TARGETS = ("openvino-cpu", "jetson-orin-agx")
REGRESSORS = ("lightgbm", "ridge")


def row_costs(rows: list[dict], target_names=SCENARIO_TARGETS) -> dict[str, list]:
    """Predicted cost (CostPrediction) of every meta-dataset row on each target (zoo models' exported graphs).

    A model's graph is its architecture's: the zoos of different tasks share names and graphs, so one per name."""
    from edgecompress.costmodel.kernels import model_graph
    from edgecompress.data.datasets import load_dataset
    from edgecompress.models import get_model, load_model
    from edgecompress.plan.planner import estimate_cost
    from edgecompress.targets import get_target

    graphs = {}
    for task in sorted({row_task(r) for r in rows}):
        names = sorted({r["model"] for r in rows if row_task(r) == task} - set(graphs))
        if names:
            data = load_dataset(None if task == "digits" else task, 32)
            graphs.update({m: model_graph(load_model(get_model(m, task=task), data.num_classes), data.input_shape)
                           for m in names})
    out = {}
    for name in target_names:
        target, cache = get_target(name), {}
        out[name] = [estimate_cost(r["model"], r["method"], r["ratio"], r["precision"], graphs, target, cache) for r in rows]
    return out


def best_regressor(result: dict) -> str:
    """What wins is what recommends best for unseen models: lowest regret, then highest win rate, then MAE."""
    return min(REGRESSORS, key=lambda k: (result[k]["regret_vs_oracle_pp"], -result[k]["win_rate_vs_static_erm"],
                                          result[k]["loao_mae_pp"]))


NEAREST = "nearest_architecture"  # the baseline of evaluate(), not a regressor one can train
MEASURED = "measured_drops"  # evaluate()'s reference: the planner's rule with the measured drops as predictions
HEADLINE_TASKS = ("fashion-mnist", "digits")  # the task whose figures head the report, the first present


def evaluate(rows: list[dict], target: str = DEFAULT_TARGET) -> dict:
    """``meta eval``: every regressor's held-out accuracy and recommendation quality; the best is reported on top.

    Leave-one-architecture-out leaves an architecture out of every task; its errors and the scenarios (whose
    candidates compete within one task) are reported per task under ``per_task``, and each regressor's top-level
    figures are the headline task's (Fashion-MNIST where present: 5,000 test images, against the digits' 360).
    The regressors learn ``target`` (target_transform).
    With two tasks or more, ``leave_one_task_out`` trains on the other tasks only. The nearest-known-architecture
    baseline is evaluated beside LightGBM and ridge.
    """
    costs = row_costs(rows)
    tasks = sorted({row_task(r) for r in rows})
    headline = next((t for t in HEADLINE_TASKS if t in tasks), tasks[0])
    predictions = {kind: loao_predictions(rows, kind, target) for kind in REGRESSORS}
    predictions[NEAREST] = nearest_architecture_predictions(rows)
    measured = np.asarray([r["accuracy_drop"] for r in rows])
    # Each task's row indices, rows and costs (candidates compete within one task).
    by_task = {}
    for task in tasks:
        idx = np.asarray([i for i, r in enumerate(rows) if row_task(r) == task])
        by_task[task] = (idx, [rows[i] for i in idx], {t: [cost[i] for i in idx] for t, cost in costs.items()})
    result = {}
    for kind, (mean, upper) in predictions.items():
        per_task = {}
        for task, (idx, sub, sub_costs) in by_task.items():
            preds = (mean[idx], upper[idx])
            per_task[task] = {**leave_one_architecture_out(sub, kind, preds), **scenario_eval(sub, preds, sub_costs)}
        result[kind] = {**per_task[headline], "per_task": per_task}
    # The planner's rule fed the measured drops: what perfect predictions would recommend. The rule gives up to one
    # test image of accuracy for speed, so even these lose to static ERM by that image where static ERM's choice is
    # the most accurate; predictions that seldom land within one image of each other can score a higher strict win
    # rate (read win_rate_vs_static_erm_within_one_test_image beside it).
    result[MEASURED] = {"per_task": {task: scenario_eval(sub, (measured[idx], measured[idx]), sub_costs)
                                     for task, (idx, sub, sub_costs) in by_task.items()}}
    best = best_regressor(result)
    summary = {k: result[best][k] for k in ("loao_mae_pp", "loao_spearman", "regret_vs_oracle_pp", "win_rate_vs_static_erm")}
    summary["recommend_ms_median"] = recommend_ms(Predictor.fit(rows, best, target=target), rows)
    summary["task"] = headline
    summary["target"] = target
    if len(tasks) > 1:
        summary["leave_one_task_out"] = {kind: leave_one_task_out(rows, kind, target) for kind in REGRESSORS}
    return {**summary, "regressor": best, **result}


def shipped_predictor_dir() -> Path:
    from edgecompress.models import ZOO_DIR

    return ZOO_DIR / "predictor"


def shipped_meta_dataset() -> Path:
    """The meta-dataset that ships with the zoos (both tasks' rows), which the shipped predictor was trained on."""
    from edgecompress.models import ZOO_DIR

    return ZOO_DIR / "meta.parquet"


class AccuracyModel:
    """Expected accuracy and lower bound of plan candidates, for planner.plan.

    Features of a zoo model on the embedded digits are read from the shipped
    meta-dataset (it holds every candidate of the sweep); anything else is
    featurized on the spot (features.Featurizer: seconds per model, shown as progress).
    """

    def __init__(self, predictor: Predictor, entries: dict, data, accuracies: dict[str, float], *,
                 meta_rows: list[dict] | None = None, console=None, source: str = "shipped",
                 finetune=None, int8_preset: str | None = None):
        from edgecompress.compress.methods import FinetuneSpec, spec_hash

        self.predictor, self.entries, self.data, self.accuracies = predictor, entries, data, accuracies
        self.console = console
        fingerprint = data.fingerprint()
        # Rows of this data measured with today's method settings: their features (the one-shot proxies depend on
        # the settings), and, at the build's recipe, their accuracies (measured).
        today = [r for r in (meta_rows or []) if r["dataset"] == fingerprint
                 and r["method"] in METHODS and r.get("method_settings") == METHODS[r["method"]].settings_hash()]
        self._known = {(r["model"], r["method"], r["ratio"], r["precision"]): r for r in today}
        # The rows that can stand for a build's result: one per key of collect.KEY_COLUMNS that a build fixes, so that
        # an int8 row of another preset is not read for this target's.
        recipe = spec_hash(finetune if finetune is not None else FinetuneSpec())
        self._int8_preset = int8_preset
        self._measured_rows = {(r["model"], r["method"], r["ratio"], r["precision"], r.get("quant_settings") or ""): r
                               for r in today if r.get("recipe") == recipe}
        self._prior = DropPrior(meta_rows or [], accuracies)  # the drops measured on any data, for graphs only
        self._predicted_basis = (f"meta-predictor ({source}, {self.predictor.describe()}): expected accuracy; "
                                 f"lower bound from the {UPPER_QUANTILE:.0%} quantile of the drop")
        self.basis = self._predicted_basis

    @classmethod
    def shipped(cls, entries, data, accuracies, console=None, *, finetune=None,
                target=None) -> "AccuracyModel | None":
        """The predictor and meta-dataset that ship with the zoo; None where they are missing. ``finetune`` (the
        build's recipe; default FinetuneSpec()) and ``target`` (for its int8 preset) say which rows measured exactly
        what the build would make (measured)."""
        from edgecompress.meta.collect import read_rows

        directory = shipped_predictor_dir()
        if not (directory / "predictor.json").is_file():
            return None
        preset = target.runtime().quant_preset().key() if target is not None else None
        return cls(Predictor.load(directory), entries, data, accuracies, meta_rows=read_rows(shipped_meta_dataset()),
                   console=console, finetune=finetune, int8_preset=preset)

    def measured(self, candidate) -> float | None:
        """The accuracy the meta-dataset measured for exactly this candidate, or None.

        Exactly: the same data (fingerprint), a zoo checkpoint whose parent accuracy the row recorded (so the same
        weights), the method at today's settings, the build's fine-tuning recipe, and for int8 the target's own
        quantization preset (float rows hold on any runtime: OpenVINO, ONNX Runtime and TensorRT's float kernels
        agreed to the image in the builds checked). Such a row is no prediction but the build's own result, measured
        on the same test split: the plan reads it (capped at the parent, so that a lucky image is no promised gain),
        and the build verifies its artifact again all the same.
        """
        int8 = candidate.quant.precision == "int8"
        if int8 and self._int8_preset is None:
            return None
        row = self._measured_rows.get((candidate.model, candidate.prune.method, candidate.prune.ratio,
                                       candidate.quant.precision, self._int8_preset if int8 else ""))
        entry, parent = self.entries.get(candidate.model), self.accuracies.get(candidate.model)
        if row is None or entry is None or entry.source != "zoo" or parent is None:
            return None
        if abs(row["parent_accuracy"] - parent) > 1e-6:
            return None
        return min(float(row["accuracy"]), parent)

    def _features(self, candidates) -> list[dict]:
        from edgecompress.meta.features import FEATURE_DOCS, Featurizer
        from edgecompress.models import load_model

        rows: list[dict | None] = []
        missing = []
        for i, c in enumerate(candidates):
            known = self._known.get((c.model, c.prune.method, c.prune.ratio, c.quant.precision))
            rows.append(known)
            if known is None or any(f not in known for f in self.predictor.features):
                missing.append(i)
        if missing:
            import torch
            from rich.progress import Progress

            featurizers = {}
            threads = torch.get_num_threads()
            # One thread: hundreds of small forward passes; on 2 cores 1 thread was 7-13% faster than 2 on a quiet
            # machine (tools/bench_plan.py), and threads waiting on a busy core made them several times slower.
            torch.set_num_threads(1)
            try:
                with Progress(console=self.console, transient=True) as progress:
                    bar = progress.add_task("meta-features of unseen candidates", total=len(missing))
                    # One pruning per (model, method, ratio): its precisions reuse the pruned copy.
                    key = lambda i: (candidates[i].model, candidates[i].prune.method, candidates[i].prune.ratio)  # noqa: E731
                    for i in sorted(missing, key=key):
                        c = candidates[i]
                        if c.model not in featurizers:
                            model = load_model(self.entries[c.model], self.data.num_classes)
                            featurizers = {c.model: Featurizer(model, self.data, self.accuracies[c.model])}
                        rows[i] = featurizers[c.model].candidate_features(c.prune.method, c.prune.ratio,
                                                                          c.quant.precision)
                        progress.advance(bar)
            finally:
                torch.set_num_threads(threads)
        return [{f: r[f] for f in FEATURE_DOCS if f in r} for r in rows]

    def dense_drop(self, precision: str) -> tuple[float, float]:
        """(expected, upper bound) drop of an uncompressed model at ``precision`` without its features, for ONNX
        graphs (their features need a torch model: weight statistics of unfolded layers, the one-shot proxies): what
        the meta-dataset measured for its dense models (DropPrior.drop), a conservative bound for int8 (it holds the
        zoo's int8 collapses)."""
        return self._prior.drop("none", 0.0, precision)

    def __call__(self, candidates) -> tuple[np.ndarray, np.ndarray]:
        # ONNX graphs have no torch model to featurize; their (dense) candidates get dense_drop's figures.
        graph_only = [getattr(self.entries.get(c.model), "source", None) == "onnx" for c in candidates]
        mean, upper = np.zeros(len(candidates)), np.zeros(len(candidates))
        featurized = [i for i, only in enumerate(graph_only) if not only]
        if featurized:
            mean[featurized], upper[featurized] = self.predictor.predict(self._features([candidates[i] for i in featurized]))
        for i, only in enumerate(graph_only):
            if only:
                mean[i], upper[i] = self.dense_drop(candidates[i].quant.precision)
        expected, lower = accuracies_from_drops(candidates, mean, upper, self.accuracies)
        measured = [(i, self.measured(c)) for i, c in enumerate(candidates)]
        measured = [(i, acc) for i, acc in measured if acc is not None]
        for i, acc in measured:
            expected[i], lower[i] = acc, max(0.0, acc - MEASURED_REBUILD_MARGIN)
        self.basis = self._predicted_basis
        if measured:
            self.basis += (f"; {len(measured)} of {len(candidates)} candidates measured exactly by the meta-dataset "
                           f"(same data, checkpoint, settings and recipe): that accuracy, bound "
                           f"{MEASURED_REBUILD_MARGIN * 100:g} pp below")
        return expected, lower


class DropPrior:
    """Expected accuracy of candidates from the meta-dataset's drops alone, for parents known only roughly.

    The drop of a (method, level, precision) is the median, and its bound the UPPER_QUANTILE quantile, of
    that configuration's drops over every architecture in the meta-dataset (the nearest level of the same
    method and precision where that level was not collected; all methods at the nearest level where the
    method was not). Used to rank backbones before transfer, when no parent exists yet to featurize.
    """

    def __init__(self, rows: list[dict], parents: dict[str, float]):
        self.parents = parents
        self.drops: dict[tuple, list[float]] = {}
        for r in rows:
            self.drops.setdefault((r["method"], r["precision"]), []).append((r["ratio"], r["accuracy_drop"]))
        self.basis = (f"meta-dataset prior ({len(rows)} rows): median drop of each compression over every "
                      f"architecture, bound from its {UPPER_QUANTILE:.0%} quantile; parents from a linear probe")

    @classmethod
    def shipped(cls, parents: dict[str, float]) -> "DropPrior":
        from edgecompress.meta.collect import current_rows, read_rows

        path = shipped_meta_dataset()
        return cls(current_rows(read_rows(path)) if path.is_file() else [], parents)

    def _drops(self, method: str, ratio: float, precision: str) -> np.ndarray | None:
        pairs = self.drops.get((method, precision))
        if not pairs and method != "none":  # a dense model's drop is never read off pruned ones
            pairs = [p for (m, prec), ps in self.drops.items() if prec == precision and m != "none" for p in ps]
        if not pairs:
            return None
        levels = np.asarray([p[0] for p in pairs])
        nearest = levels[np.argmin(np.abs(levels - ratio))]
        return np.asarray([d for lv, d in pairs if lv == nearest])

    def drop(self, method: str, ratio: float, precision: str) -> tuple[float, float]:
        """(expected, upper bound) accuracy drop of (method, ratio, precision): the median and UPPER_QUANTILE quantile
        of the matching drops, never below 0. Uncompressed fp32 drops nothing; without any matching row, uncompressed
        fp16 and int8 get DENSE_DROP_WITHOUT_ROWS and the rest nothing."""
        if method == "none" and precision == "fp32":
            return 0.0, 0.0
        drops = self._drops(method, ratio, precision)
        if drops is None:
            return DENSE_DROP_WITHOUT_ROWS.get(precision, (0.0, 0.0)) if method == "none" else (0.0, 0.0)
        return max(float(np.median(drops)), 0.0), max(float(np.quantile(drops, UPPER_QUANTILE)), 0.0)

    def __call__(self, candidates) -> tuple[np.ndarray, np.ndarray]:
        figures = np.asarray([self.drop(c.prune.method, c.prune.ratio, c.quant.precision) for c in candidates])
        figures = figures.reshape(-1, 2)
        return accuracies_from_drops(candidates, figures[:, 0], figures[:, 1], self.parents)
