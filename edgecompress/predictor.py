"""The meta-predictor: accuracy drop of a compressed candidate, from meta-features alone.

A LightGBM regressor gives the expected drop; a second one, trained with the
quantile loss at ``UPPER_QUANTILE``, gives an upper bound of the drop (a lower
confidence bound of the accuracy) for planning under ``--max-accuracy-drop``.
A ridge regression on the same features is the baseline it must beat.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgecompress.errors import UsageError
from edgecompress.features import FEATURE_DOCS
from edgecompress.fsutil import atomic_path

UPPER_QUANTILE = 0.9
LGBM_PARAMS = {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 15, "min_child_samples": 5,
               "subsample": 0.9, "subsample_freq": 1, "colsample_bytree": 0.9, "random_state": 0, "verbose": -1}


def feature_names(rows: list[dict]) -> list[str]:
    return [f for f in FEATURE_DOCS if f in rows[0]]


def matrix(rows: list[dict], features: list[str]) -> np.ndarray:
    return np.asarray([[float(r[f]) for f in features] for r in rows], dtype=np.float64)


class Predictor:
    def __init__(self, features: list[str], mean, upper):
        self.features, self.mean, self.upper = features, mean, upper

    @classmethod
    def fit(cls, rows: list[dict], kind: str = "lightgbm") -> "Predictor":
        if len(rows) < 10:
            raise UsageError(f"the meta-dataset has {len(rows)} rows; training needs at least 10")
        features = feature_names(rows)
        x, y = matrix(rows, features), np.asarray([r["accuracy_drop"] for r in rows])
        if kind == "lightgbm":
            import lightgbm as lgb

            mean = lgb.LGBMRegressor(objective="regression", **LGBM_PARAMS).fit(x, y)
            upper = lgb.LGBMRegressor(objective="quantile", alpha=UPPER_QUANTILE, **LGBM_PARAMS).fit(x, y)
        elif kind == "ridge":
            from sklearn.linear_model import Ridge
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            mean = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x, y)
            # Upper bound: the mean plus the residuals' quantile on the training rows.
            margin = float(np.quantile(y - mean.predict(x), UPPER_QUANTILE))
            upper = _Shifted(mean, margin)
        else:
            raise UsageError(f"unknown regressor {kind!r}; use lightgbm or ridge")
        return cls(features, mean, upper)

    def predict(self, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(expected drop, upper bound of the drop), as shares of accuracy."""
        x = matrix(rows, self.features)
        mean = self.mean.predict(x)
        return mean, np.maximum(self.upper.predict(x), mean)

    def save(self, directory: Path) -> None:
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            self.mean.booster_.save_model(str(tmp / "drop_mean.txt"))
            self.upper.booster_.save_model(str(tmp / "drop_upper.txt"))
            (tmp / "predictor.json").write_text(json.dumps(
                {"kind": "lightgbm", "features": self.features, "upper_quantile": UPPER_QUANTILE}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Predictor":
        import lightgbm as lgb

        directory = Path(directory)
        if not (directory / "predictor.json").is_file():
            raise UsageError(f"{directory} holds no trained predictor (predictor.json missing)")
        meta = json.loads((directory / "predictor.json").read_text())
        return cls(meta["features"], _Booster(lgb.Booster(model_file=str(directory / "drop_mean.txt"))),
                   _Booster(lgb.Booster(model_file=str(directory / "drop_upper.txt"))))


class _Shifted:
    def __init__(self, model, margin):
        self.model, self.margin = model, margin

    def predict(self, x):
        return self.model.predict(x) + self.margin


class _Booster:
    def __init__(self, booster):
        self.booster_ = booster

    def predict(self, x):
        return self.booster_.predict(x)


def leave_one_architecture_out(rows: list[dict], kind: str) -> dict:
    """Train without one architecture, predict it; MAE (pp) and within-architecture Spearman."""
    from scipy.stats import spearmanr

    archs = sorted({r["architecture"] for r in rows})
    if len(archs) < 2:
        raise UsageError("leave-one-architecture-out needs rows from at least two architectures")
    errors, spearmans, covered = [], [], []
    for arch in archs:
        train = [r for r in rows if r["architecture"] != arch]
        test = [r for r in rows if r["architecture"] == arch]
        predictor = Predictor.fit(train, kind)
        mean, upper = predictor.predict(test)
        truth = np.asarray([r["accuracy_drop"] for r in test])
        errors.extend(np.abs(mean - truth) * 100)
        covered.extend(truth <= upper)
        if len(test) > 2 and np.ptp(truth) > 0:
            spearmans.append(float(spearmanr(-mean, -truth).statistic))
    return {
        "loao_mae_pp": float(np.mean(errors)),
        "loao_spearman": float(np.mean(spearmans)) if spearmans else None,
        "upper_bound_coverage": float(np.mean(covered)),
        "architectures": len(archs),
        "rows": len(rows),
    }


def recommend_ms(predictor: Predictor, rows: list[dict], repeats: int = 20) -> float:
    """Median time to score every candidate in ``rows`` once (what one recommendation costs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mean, upper = predictor.predict(rows)
        int(np.argmin(upper))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))
