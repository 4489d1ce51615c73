"""plan: enumerate candidates, predict their cost, rank them inside the budget.

Until the meta-predictor lands (issue 3), a candidate's predicted accuracy is
its parent's uncompressed accuracy, and candidates inside the budget are
ranked by that accuracy, then by how severe their compression is
(methods.severity), then by predicted latency: the most accurate model,
compressed as little as the budget allows. Candidates outside the budget
follow, fastest first, as fallbacks.
"""

from __future__ import annotations

import dataclasses
import itertools

from edgecompress.costmodel import CostPrediction, predict_cost
from edgecompress.errors import BudgetError, UsageError
from edgecompress.layers import LayerProfile
from edgecompress.methods import DEFAULT_SWEEP, Candidate, PruneSpec, QuantSpec, get_method, severity
from edgecompress.targets import Target

ACCURACY_BASIS = "parent's uncompressed accuracy (no accuracy model yet)"


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
    fits: bool

    def to_dict(self) -> dict:
        return {
            **self.candidate.to_dict(),
            "id": self.candidate.id,
            "predicted": {
                "latency_ms": self.cost.latency_ms,
                "memory_mb": self.cost.memory_mb,
                "accuracy": self.accuracy,
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


def enumerate_candidates(models: list[str], target: Target, sweep: dict | None = None) -> list[Candidate]:
    sweep = DEFAULT_SWEEP if sweep is None else sweep
    out = []
    for model, (method, ratios), precision in itertools.product(models, sweep.items(), target.precisions):
        get_method(method)
        for ratio in ratios:
            out.append(Candidate(model=model, prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec(precision=precision)))
    return out


def plan(
    target: Target,
    budget: Budget,
    profiles: dict[str, list[LayerProfile]],
    accuracies: dict[str, float | None],
    sweep: dict | None = None,
) -> Plan:
    validate_budget(budget, target)
    estimates = []
    for cand in enumerate_candidates(sorted(profiles), target, sweep):
        keep = get_method(cand.prune.method).channel_keep(cand.prune.ratio)
        cost = predict_cost(profiles[cand.model], target, cand.quant.precision, channel_keep=keep)
        fits = (budget.latency_ms is None or cost.latency_ms <= budget.latency_ms) and (
            budget.memory_mb is None or cost.memory_mb <= budget.memory_mb
        )
        estimates.append(Estimate(cand, cost, accuracies.get(cand.model), fits))
    inside = sorted(
        (e for e in estimates if e.fits),
        key=lambda e: (-(e.accuracy or 0.0), severity(e.candidate), e.cost.latency_ms),
    )
    outside = sorted((e for e in estimates if not e.fits), key=lambda e: e.cost.latency_ms)
    return Plan(target=target.name, budget=budget, ranked=tuple(inside + outside))


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
