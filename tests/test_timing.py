"""Latency statistics over timed rounds, re-timing of a candidate whose interval straddles the budget, and the
budget's named statistic."""

import dataclasses

import numpy as np
import pytest

from edgecompress import build, pipeline
from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec
from edgecompress.deploy.timing import accuracy_interval, merged, straddles, summarize, with_statistics
from edgecompress.plan.planner import Budget


def _rounds(centre, spread, rounds=10, per_round=20, seed=0):
    rng = np.random.default_rng(seed)
    return [list(centre + spread * rng.standard_normal(per_round) ** 2) for _ in range(rounds)]


def test_summary_orders_its_statistics_and_brackets_them():
    s = summarize(_rounds(1.0, 0.1))
    assert s["rounds"] == 10 and s["timed_runs"] == 200
    assert s["latency_ms_median"] <= s["latency_ms_p90"] <= s["latency_ms_p99"]
    for stat in ("median", "p90", "p99"):
        low, high = s["latency_ci_ms"][stat]
        assert low <= s[f"latency_ms_{stat}"] <= high


def test_a_slow_round_moves_the_median_of_round_medians_little():
    rounds = _rounds(1.0, 0.01)
    rounds[3] = [5.0] * 20  # another process woke up for one round
    assert summarize(rounds)["latency_ms_median"] < 1.1


def test_interval_narrows_with_more_rounds_and_straddles_only_near_the_budget():
    few, many = summarize(_rounds(1.0, 0.3, rounds=3)), summarize(_rounds(1.0, 0.3, rounds=40))
    width = lambda s: s["latency_ci_ms"]["p90"][1] - s["latency_ci_ms"]["p90"][0]  # noqa: E731
    assert width(many) < width(few)
    p90 = many["latency_ms_p90"]
    assert straddles(many, "p90", p90) and not straddles(many, "p90", 10 * p90) and not straddles(many, "p90", p90 / 10)


def test_merged_timings_pool_their_rounds():
    a = with_statistics({"rounds_ms": _rounds(1.0, 0.1, seed=1), "runs": 200, "peak_memory_mb": 10.0})
    b = {"rounds_ms": _rounds(1.0, 0.1, seed=2), "runs": 200, "peak_memory_mb": 12.0}
    m = merged(a, b)
    assert m["rounds"] == 20 and m["runs"] == 400 and m["timings"] == 2 and m["peak_memory_mb"] == 12.0


def test_accuracy_interval_for_the_test_size():
    low, high = accuracy_interval(0.95, 126)
    assert 0.025 < 0.95 - low < 0.06 and 0.02 < high - 0.95 < 0.04  # about +-3 pp on 126 images
    assert accuracy_interval(0.95, 5000)[1] - accuracy_interval(0.95, 5000)[0] < 0.015


def _benched(rounds):
    cand = Candidate(model="m", prune=PruneSpec(), quant=QuantSpec())
    return pipeline.BenchmarkResult(candidate=cand, artifact=None, measured=with_statistics({"rounds_ms": rounds, "runs": 200}),
                                    where="this machine")


class _Console:
    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(text)


def test_a_straddling_candidate_is_timed_again(monkeypatch):
    """The first timing's p90 interval holds the budget: it is re-timed (fresh processes), at most RETIME_MAX times."""
    first = _benched(_rounds(1.0, 0.3, rounds=3, seed=3))
    budget = Budget(latency_ms=first.measured["latency_ms_p90"])
    calls = []

    def fake_retimed(benched, target, device=None):
        calls.append(benched.measured["rounds"])
        return merged(benched.measured, {"rounds_ms": _rounds(0.6, 0.05, rounds=10, seed=len(calls)), "runs": 200})

    monkeypatch.setattr(build, "retimed", fake_retimed)
    console = _Console()
    settled = build._settled(first, budget, target=None, device=None, console=console)
    assert calls and settled["timings"] == 1 + len(calls) <= 1 + build.RETIME_MAX
    assert "timing again" in console.lines[0]
    clear = _benched(_rounds(1.0, 0.01))
    assert build._settled(clear, Budget(latency_ms=5.0), target=None, device=None, console=console).get("timings", 1) == 1


@pytest.mark.parametrize("stat", ["median", "p90", "p99"])
def test_the_budget_holds_the_named_statistic(stat):
    measured = summarize(_rounds(1.0, 0.5))
    budget = Budget(latency_ms=measured["latency_ms_median"] * 1.01, latency_stat=stat)
    admitted = budget.admits(latency_ms=budget.measured_latency_ms(measured))
    assert admitted == (stat == "median")


def test_cli_passes_the_latency_stat(monkeypatch):
    from edgecompress import cli

    seen = {}
    monkeypatch.setattr("edgecompress.build.run_build", lambda options: seen.setdefault("budget", options.budget) and 1 / 0)
    assert cli.main(["build", "--target", "ort-cpu", "--latency", "1ms", "--latency-stat", "p99"]) == 1
    assert seen["budget"].latency_stat == "p99"
    assert cli.main(["build", "--target", "ort-cpu", "--latency", "1ms", "--latency-stat", "mean"]) == 2
    assert dataclasses.asdict(seen["budget"])["latency_stat"] == "p99"


def test_a_timing_that_contradicts_the_premeasurement_is_taken_again(monkeypatch):
    """Pre-measured inside the budget, built and timed well outside it (a slow process): one more fresh timing."""
    first = _benched(_rounds(2.0, 0.01, seed=4))
    calls = []

    def fake_retimed(benched, target, device=None):
        calls.append(1)
        return merged(benched.measured, {"rounds_ms": _rounds(1.0, 0.01, rounds=10, seed=5), "runs": 200})

    monkeypatch.setattr(build, "retimed", fake_retimed)
    console = _Console()
    settled = build._settled(first, Budget(latency_ms=1.5, latency_stat="median"), target=None, device=None,
                             console=console, premeasured_ms=1.1)
    assert calls and "contradicts" in console.lines[0] and settled["timings"] >= 2
    # Agreeing figures: no re-timing.
    assert build._settled(first, Budget(latency_ms=1.5, latency_stat="median"), target=None, device=None,
                          console=console, premeasured_ms=1.9).get("timings", 1) == 1


def test_the_next_try_is_one_that_can_keep_the_allowed_drop():
    """A candidate expected to break the allowed drop comes after one that keeps it and that a timing's noise can still
    let in (within NEAR_BUDGET of the budget); without such a one, the plan's first inside the budget."""
    from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec
    from edgecompress.costmodel.cost import CostPrediction
    from edgecompress.plan.planner import Estimate, Plan

    def est(name, ms, accuracy):
        cand = Candidate(model="m", prune=PruneSpec(method="torch_pruning.l1", ratio=name), quant=QuantSpec(precision="fp32"))
        return Estimate(cand, CostPrediction(latency_ms=ms, memory_mb=1.0, weights_mb=0.1, macs=1, params=1), accuracy,
                        False, accuracy - 0.01, 0.98, premeasured_ms=ms)

    collapsed, near, far = est(0.7, 0.19, 0.85), est(0.5, 0.22, 0.965), est(0.3, 0.30, 0.975)
    nearer = est(0.4, 0.218, 0.97)
    budget = Budget(latency_ms=0.2168, max_accuracy_drop=0.02)
    the_plan = Plan(target="t", budget=budget, ranked=(collapsed, near, far))
    assert build._next_candidate(the_plan, set(), 1.0) is near  # 0.22 ms is within NEAR_BUDGET of 0.2168
    assert build._next_candidate(the_plan, {near.candidate.id}, 1.0) is collapsed  # the far one is hopeless
    # One near-budget try per build: after it, the candidate inside the budget.
    with_nearer = Plan(target="t", budget=budget, ranked=(collapsed, near, nearer, far))
    assert build._next_candidate(with_nearer, set(), 1.0) is nearer
    assert build._next_candidate(with_nearer, {nearer.candidate.id}, 1.0) is collapsed
    assert build._next_candidate(the_plan, {near.candidate.id, collapsed.candidate.id}, 1.0) is far
    # Inside the budget and keeping the drop: first, whatever comes before it in the plan.
    inside = est(0.1, 0.15, 0.975)
    assert build._next_candidate(Plan(target="t", budget=budget, ranked=(collapsed, near, inside)), set(), 1.0) is inside
    # No allowed drop: the plan's order inside the budget.
    loose = Plan(target="t", budget=Budget(latency_ms=0.2168), ranked=(collapsed, near, far))
    assert build._next_candidate(loose, set(), 1.0) is collapsed


def test_the_next_try_learns_the_drop_from_the_tries():
    """A try that lost more than expected raises the expected drop of its method at its ratio and above, so the next
    try goes to what can still keep the allowed drop (the budget benchmark's regnety_002: channel pruning 0.1 in
    int8 lost 6.4 pp against 1.5 expected; 0.3 and 0.5 followed, while the dense model fitted)."""
    from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec
    from edgecompress.costmodel.cost import CostPrediction
    from edgecompress.plan.planner import Estimate, Plan
    from edgecompress.report import Measured

    def est(method, ratio, ms, accuracy):
        cand = Candidate(model="m", prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec(precision="int8"))
        return Estimate(cand, CostPrediction(latency_ms=ms, memory_mb=1.0, weights_mb=0.1, macs=1, params=1), accuracy,
                        False, accuracy - 0.01, 0.9556, premeasured_ms=ms)

    l1_01, l1_03, l1_05 = (est("torch_pruning.l1", r, ms, a) for r, ms, a in ((0.1, 0.26, 0.9402), (0.3, 0.29, 0.9365),
                                                                             (0.5, 0.26, 0.9045)))
    l1_003 = est("torch_pruning.l1", 0.03, 0.30, 0.95)
    dense = est("none", 0.0, 0.363, 0.9556)
    budget = Budget(latency_ms=0.3701, max_accuracy_drop=0.02)
    the_plan = Plan(target="t", budget=budget, ranked=(l1_01, l1_03, l1_05, l1_003, dense))
    assert build._next_candidate(the_plan, set(), 1.0) is l1_01
    measured = Measured(latency_ms_median=0.25, latency_ms_p90=0.26, latency_ms_p99=0.3, peak_memory_mb=1.0,
                        model_size_mb=0.1, accuracy=0.8917, baseline_accuracy=0.9556)
    outcomes = {l1_01.candidate.id: build.Built(l1_01, measured, "rejected: accuracy", ())}
    excess = build._drop_excess(outcomes)
    assert excess[("m", "torch_pruning.l1")] == [(0.1, pytest.approx(0.0639 - 0.0154))]
    # 0.3 is now expected to lose 1.9 + 4.85 pp: the next is the lighter 0.03, which the excess at 0.1 does not touch.
    assert build._next_candidate(the_plan, set(outcomes), 1.0, excess) is l1_003
    # Without the lighter one, the dense model: the other channel-pruned ones come after it.
    without = Plan(target="t", budget=budget, ranked=(l1_01, l1_03, l1_05, dense))
    assert build._next_candidate(without, set(outcomes), 1.0, excess) is dense
    # A structure a try timed over the budget: its masked copies (the same structure on a CPU) are not inside it.
    masked = est("nncf.magnitude_global", 0.3, 0.363, 0.9518)
    same = Plan(target="t", budget=budget, ranked=(dense, masked))
    assert build._next_candidate(same, set(), 1.0) is dense
    timed = {("m", 0.0): 0.41}  # what the build's own key function maps both to
    assert build._next_candidate(same, {dense.candidate.id}, 1.0, {},
                                 lambda c: timed.get(("m", 0.0) if c.prune.method != "torch_pruning.l1" else None)) \
        is masked  # over the budget now, so only "the fastest untried", not "inside the budget"
    with_inside = Plan(target="t", budget=budget, ranked=(dense, masked, l1_003))
    assert build._next_candidate(with_inside, {dense.candidate.id}, 1.0, {},
                                 lambda c: timed.get(("m", 0.0) if c.prune.method != "torch_pruning.l1" else None)) \
        is l1_003
    # A try that lost less than expected changes nothing.
    better = dataclasses.replace(measured, accuracy=0.95)
    assert build._next_candidate(the_plan, set(), 1.0, build._drop_excess(
        {l1_01.candidate.id: build.Built(l1_01, better, "chosen", ())})) is l1_01
