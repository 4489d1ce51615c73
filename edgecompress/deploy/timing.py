"""Latency statistics that hold on a noisy machine, and accuracy intervals for a test split's size.

A benchmark times an artifact in rounds (the runner's ``rounds_ms``: one list of per-inference times per round,
rounds of several artifacts interleaved when they are compared). :func:`summarize` turns rounds into the figures a
budget is judged on: the median of the round medians (a slow round, from another process waking up, moves it
less than it moves the pooled median), p90 and p99 over every run, and for each a bootstrap confidence interval
that resamples whole rounds, so drift between rounds widens the interval instead of hiding in it.
"""

from __future__ import annotations

import math

import numpy as np

LATENCY_STATS = ("median", "p90", "p99")  # what a latency budget can name; p90 is MLPerf SingleStream's
DEFAULT_LATENCY_STAT = "p90"
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


def _stat(rounds: list[np.ndarray], stat: str) -> float:
    if stat == "median":
        return float(np.median([np.median(r) for r in rounds]))
    return float(np.percentile(np.concatenate(rounds), 90 if stat == "p90" else 99))


def _resampled(rounds: list[np.ndarray], picks: np.ndarray, stat: str) -> np.ndarray:
    """``stat`` over each resample of whole rounds (rows of ``picks``)."""
    if stat == "median":
        return np.median(np.asarray([np.median(r) for r in rounds])[picks], axis=1)
    if len({len(r) for r in rounds}) == 1:
        pooled = np.stack(rounds)[picks].reshape(len(picks), -1)
        return np.percentile(pooled, 90 if stat == "p90" else 99, axis=1)
    return np.asarray([_stat([rounds[i] for i in pick], stat) for pick in picks])


def summarize(rounds_ms: list[list[float]], *, seed: int = 0) -> dict:
    """``latency_ms_<stat>`` and ``latency_ci_ms[<stat>] = [low, high]`` for every stat, from per-round times."""
    rounds = [np.asarray(r, dtype=np.float64) for r in rounds_ms if len(r)]
    if not rounds:
        raise ValueError("no timed runs to summarize")
    rng = np.random.default_rng(seed)
    out: dict = {"rounds": len(rounds), "timed_runs": int(sum(len(r) for r in rounds)), "latency_ci_ms": {}}
    alpha = (1 - CONFIDENCE) / 2
    for stat in LATENCY_STATS:
        out[f"latency_ms_{stat}"] = _stat(rounds, stat)
        if len(rounds) < 2:
            out["latency_ci_ms"][stat] = [out[f"latency_ms_{stat}"]] * 2
            continue
        picks = rng.integers(0, len(rounds), size=(BOOTSTRAP_RESAMPLES, len(rounds)))
        out["latency_ci_ms"][stat] = [float(q) for q in np.quantile(_resampled(rounds, picks, stat), [alpha, 1 - alpha])]
    return out


def straddles(summary: dict, stat: str, budget_ms: float) -> bool:
    """The interval of ``stat`` holds the budget: one more timing could land on either side of it."""
    low, high = summary["latency_ci_ms"][stat]
    return low <= budget_ms <= high and low < high


def accuracy_interval(accuracy: float, samples: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a top-1 accuracy measured on ``samples`` images (126 images at 95%: about +-3 pp)."""
    if samples <= 0:
        return (0.0, 1.0)
    z = _z(confidence)
    centre = (accuracy + z * z / (2 * samples)) / (1 + z * z / samples)
    half = z / (1 + z * z / samples) * math.sqrt(accuracy * (1 - accuracy) / samples + z * z / (4 * samples * samples))
    return (max(0.0, centre - half), min(1.0, centre + half))


def _z(confidence: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


def with_statistics(measured: dict) -> dict:
    """A benchmark's output with :func:`summarize`'s figures, where it timed in rounds (trtexec does not)."""
    if not measured.get("rounds_ms"):
        return measured
    return {**measured, **summarize(measured["rounds_ms"])}


def merged(first: dict, again: dict) -> dict:
    """Two timings of the same artifact (a re-timing in a fresh process) as one: every round counts."""
    rounds = list(first.get("rounds_ms") or []) + list(again.get("rounds_ms") or [])
    out = {**first, "rounds_ms": rounds, "runs": first.get("runs", 0) + again.get("runs", 0),
           "timings": first.get("timings", 1) + 1}
    for key in ("peak_memory_mb", "process_peak_rss_mb"):
        if first.get(key) is not None and again.get(key) is not None:
            out[key] = max(first[key], again[key])
    return with_statistics(out)
