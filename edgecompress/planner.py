"""plan: enumerate candidates, predict their cost and accuracy, rank them inside the budget.

Cost comes from the target's model (costmodel); accuracy from an accuracy
model, normally the meta-predictor (predictor.AccuracyModel): an expected
accuracy and a lower bound. The ranking:

1. inside the latency and memory budget, and, when ``max_accuracy_drop`` is
   set, with the lower bound inside the allowed drop (the plan does not
   promise what it cannot keep): highest expected accuracy first, then the
   least severe compression (methods.severity), then the lowest latency;
2. inside the budget but without that guarantee, in the same order;
3. outside the budget, fastest first, as fallbacks.

Without an accuracy model, a candidate's accuracy is its parent's.
"""

from __future__ import annotations

import dataclasses
import itertools

from edgecompress.costmodel import CostPrediction, predict_cost
from edgecompress.errors import BudgetError, UsageError
from edgecompress.kernels import ModelGraph
from edgecompress.methods import DEFAULT_SWEEP, Candidate, PruneSpec, QuantSpec, get_method, severity
from edgecompress.targets import Target

ACCURACY_BASIS = "parent's uncompressed accuracy (no accuracy model)"


@dataclasses.dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None
    memory_mb: float | None = None
    max_accuracy_drop: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Estimate:
    candidate: Candidate
    cost: CostPrediction
    accuracy: float | None
    fits: bool  # latency and memory inside the budget (predicted), and the accuracy bound when one is set
    accuracy_low: float | None = None
    parent_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {
            **self.candidate.to_dict(),
            "id": self.candidate.id,
            "predicted": {
                "latency_ms": self.cost.latency_ms,
                "memory_mb": self.cost.memory_mb,
                "accuracy": self.accuracy,
                "accuracy_low": self.accuracy_low,
                "macs": self.cost.macs,
                "params": self.cost.params,
            },
            "fits_budget_predicted": self.fits,
        }


@dataclasses.dataclass(frozen=True)
class Plan:
    target: str
    budget: Budget
    ranked: tuple[Estimate, ...]
    accuracy_basis: str = ACCURACY_BASIS

    def fastest(self) -> Estimate:
        return min(self.ranked, key=lambda e: e.cost.latency_ms)


def validate_budget(budget: Budget, target: Target) -> None:
    """Cross-field checks, reported once at the root cause."""
    if budget.latency_ms is None and budget.memory_mb is None:
        raise UsageError("give a budget: --latency and/or --memory")
    if budget.memory_mb is not None and budget.memory_mb > target.host_ram_mb():
        raise BudgetError(
            f"memory budget {budget.memory_mb:.0f} MB exceeds {target.name}'s RAM ({target.host_ram_mb():.0f} MB)"
        )


def enumerate_candidates(models: list[str], target: Target, sweep: dict | None = None,
                         precisions: tuple[str, ...] | None = None) -> list[Candidate]:
    sweep = DEFAULT_SWEEP if sweep is None else sweep
    if precisions:
        unsupported = [p for p in precisions if p not in target.precisions]
        if unsupported:
            raise UsageError(f"{target.name} does not run {', '.join(unsupported)}; it runs {', '.join(target.precisions)}")
    out = []
    for model, (method, ratios), precision in itertools.product(models, sweep.items(), precisions or target.precisions):
        get_method(method)
        for ratio in ratios:
            out.append(Candidate(model=model, prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec(precision=precision)))
    return out


def estimate_cost(model: str, method: str, ratio: float, precision: str,
                  graphs: dict[str, ModelGraph], target: Target, cache: dict | None = None) -> CostPrediction:
    """The candidate's predicted cost; ``cache`` shares it between candidates that differ only in what costs nothing."""
    m = get_method(method)
    key = (model, m.kind, ratio if m.kind in ("channel", "lowrank") else 0.0, precision, m.sparse_pattern)
    if cache is not None and key in cache:
        return cache[key]
    cost = predict_cost(m.graph_after(graphs[model], ratio), target, precision, sparse_pattern=m.sparse_pattern)
    if cache is not None:
        cache[key] = cost
    return cost


def plan(
    target: Target,
    budget: Budget,
    graphs: dict[str, ModelGraph],
    accuracies: dict[str, float | None],
    sweep: dict | None = None,
    accuracy_model=None,
    precisions: tuple[str, ...] | None = None,
) -> Plan:
    """``accuracy_model(candidates) -> (expected, lower)`` arrays; None: the parents' accuracies."""
    validate_budget(budget, target)
    candidates = enumerate_candidates(sorted(graphs), target, sweep, precisions)
    if accuracy_model is not None:
        expected, lower = accuracy_model(candidates)
        basis = accuracy_model.basis
    else:
        expected = lower = [accuracies.get(c.model) for c in candidates]
        basis = ACCURACY_BASIS
    groups: tuple[list, list, list] = ([], [], [])
    costs: dict = {}
    for cand, acc, low in zip(candidates, expected, lower):
        cost = estimate_cost(cand.model, cand.prune.method, cand.prune.ratio, cand.quant.precision, graphs, target, costs)
        inside = (budget.latency_ms is None or cost.latency_ms <= budget.latency_ms) and (
            budget.memory_mb is None or cost.memory_mb <= budget.memory_mb
        )
        parent = accuracies.get(cand.model)
        trusted = (budget.max_accuracy_drop is None or parent is None or low is None
                   or parent - low <= budget.max_accuracy_drop + 1e-9)
        est = Estimate(cand, cost, None if acc is None else float(acc), inside and trusted,
                       None if low is None else float(low), parent)
        groups[0 if est.fits else 1 if inside else 2].append(est)
    by_accuracy = lambda e: (-(e.accuracy or 0.0), severity(e.candidate), e.cost.latency_ms)  # noqa: E731
    ranked = sorted(groups[0], key=by_accuracy) + sorted(groups[1], key=by_accuracy) + sorted(
        groups[2], key=lambda e: e.cost.latency_ms)
    return Plan(target=target.name, budget=budget, ranked=tuple(ranked), accuracy_basis=basis)


def check_reachable(the_plan: Plan, *, slack: float = 2.0) -> None:
    """Refuse budgets far below anything predicted, before compressing anything."""
    fastest = the_plan.fastest()
    budget = the_plan.budget
    if budget.latency_ms is not None and fastest.cost.latency_ms > slack * budget.latency_ms:
        raise BudgetError(
            f"latency budget {budget.latency_ms:g} ms is out of reach on {the_plan.target}: the fastest candidate, "
            f"{fastest.candidate.id}, is predicted at {fastest.cost.latency_ms:.3f} ms"
        )
    if budget.memory_mb is not None:
        smallest = min(the_plan.ranked, key=lambda e: e.cost.memory_mb)
        if smallest.cost.memory_mb > budget.memory_mb:
            raise BudgetError(
                f"memory budget {budget.memory_mb:g} MB is out of reach on {the_plan.target}: the smallest candidate, "
                f"{smallest.candidate.id}, needs {smallest.cost.memory_mb:.1f} MB"
            )
