"""plan: enumerate candidates, predict their cost and accuracy, rank them inside the budget.

Cost comes from the target's model (costmodel); accuracy from an accuracy
model, normally the meta-predictor (predictor.AccuracyModel): an expected
accuracy and a lower bound. The ranking:

1. inside the latency and memory budget, and, when ``max_accuracy_drop`` is
   set, with the lower bound inside the allowed drop (the plan does not
   promise what it cannot keep): highest expected accuracy first, then the
   least severe compression (methods.severity), then the lowest latency;
   except that the candidates whose expected accuracy is within ``accuracy_resolution``
   of the best (one test image: what the test split cannot tell apart) lead, fastest
   (then smallest) first;
2. inside the budget but without that guarantee, in the same order;
3. outside the budget, fastest first, as fallbacks.

Without an accuracy model, a candidate's accuracy is its parent's.
"""

from __future__ import annotations

import dataclasses
import itertools

from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec, default_sweep, get_method, severity
from edgecompress.core.errors import BudgetError, UsageError
from edgecompress.costmodel.cost import CostPrediction, predict_cost
from edgecompress.costmodel.kernels import ModelGraph
from edgecompress.deploy.timing import DEFAULT_LATENCY_STAT, LATENCY_STATS
from edgecompress.targets import Target

ACCURACY_BASIS = "parent's uncompressed accuracy (no accuracy model)"


@dataclasses.dataclass(frozen=True)
class Budget:
    latency_ms: float | None = None
    memory_mb: float | None = None
    max_accuracy_drop: float | None = None
    latency_stat: str = DEFAULT_LATENCY_STAT  # which measured latency the budget holds: median, p90 or p99

    def __post_init__(self):
        if self.latency_stat not in LATENCY_STATS:
            raise UsageError(f"latency statistic {self.latency_stat!r}: choose one of {', '.join(LATENCY_STATS)}")

    def measured_latency_ms(self, measured: dict) -> float | None:
        """The benchmark's figure for the budget's statistic (trtexec gives no p99: its p90 and then median stand in)."""
        return self.measured_stat(measured)[1]

    def measured_stat(self, measured: dict) -> tuple[str | None, float | None]:
        """(statistic, figure) that measured_latency_ms reads: the budget's own, else the first that stands in."""
        for stat in (self.latency_stat, "p90", "median"):
            if measured.get(f"latency_ms_{stat}") is not None:
                return stat, measured[f"latency_ms_{stat}"]
        return None, None

    def violation(self, *, latency_ms: float | None = None, memory_mb: float | None = None,
                  accuracy_drop: float | None = None) -> str | None:
        """Why these figures break the budget, in one line; None when it admits them. A figure not given is not checked.

        The one budget check: the plan, the choice of the next candidate to build and the verdict on a built one
        all ask it, with predicted or measured figures.
        """
        if self.latency_ms is not None and latency_ms is not None and latency_ms > self.latency_ms:
            return f"latency ({self.latency_stat}) {latency_ms:.3f} ms > budget {self.latency_ms:g} ms"
        if self.memory_mb is not None and memory_mb is not None and memory_mb > self.memory_mb:
            return f"memory {memory_mb:.1f} MB > budget {self.memory_mb:g} MB"
        # The tolerance keeps a drop equal to the allowed one (up to float rounding) inside.
        if self.max_accuracy_drop is not None and accuracy_drop is not None and accuracy_drop > self.max_accuracy_drop + 1e-9:
            return f"accuracy drop {accuracy_drop * 100:.2f} pp > allowed {self.max_accuracy_drop * 100:.2f} pp"
        return None

    def admits(self, **figures) -> bool:
        return self.violation(**figures) is None

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
    premeasured_ms: float | None = None  # the artifact's structure timed on the device before any fine-tuning
    threads: int | None = None  # the runtime's inference threads it was fastest on there (None: the runtime's choice)

    @property
    def latency_ms(self) -> float:
        """The best figure known before building: pre-measured where it was, else predicted."""
        return self.premeasured_ms if self.premeasured_ms is not None else self.cost.latency_ms

    def predicted_dict(self) -> dict:
        return {
            "premeasured_latency_ms": self.premeasured_ms,
            "premeasured_threads": self.threads,
            "latency_ms": self.cost.latency_ms,
            "memory_mb": self.cost.memory_mb,
            "accuracy": self.accuracy,
            "accuracy_low": self.accuracy_low,
            "macs": self.cost.macs,
            "params": self.cost.params,
        }

    def to_dict(self) -> dict:
        return {**self.candidate.to_dict(), "id": self.candidate.id, "predicted": self.predicted_dict(),
                "fits_budget_predicted": self.fits}


@dataclasses.dataclass(frozen=True)
class Plan:
    target: str
    budget: Budget
    ranked: tuple[Estimate, ...]
    accuracy_basis: str = ACCURACY_BASIS
    accuracy_resolution: float = 0.0  # expected accuracies closer than this count as equal (rank)

    def fastest(self) -> Estimate:
        return min(self.ranked, key=lambda e: e.latency_ms)

    def with_premeasured(self, premeasured, target: Target) -> "Plan":
        """The plan re-ranked with pre-measured latencies (a premeasure.Premeasured: ``speed_key`` -> ms, and the
        thread count each was timed at) in place of the predictions, without the structures the runtime refused."""
        estimates = []
        for e in self.ranked:
            key = speed_key(e.candidate, target)
            if key in premeasured.failed:
                continue  # the runtime cannot make or run it here: nothing to build
            if key in premeasured.latency_ms:
                e = dataclasses.replace(e, premeasured_ms=premeasured.latency_ms[key], threads=premeasured.threads.get(key))
            estimates.append(e)
        return dataclasses.replace(self, ranked=rank(estimates, self.budget, self.accuracy_resolution))


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
    sweep = default_sweep() if sweep is None else sweep
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


def speed_key(candidate: Candidate, target: Target) -> tuple:
    """Candidates with equal keys run the same kernels on ``target``: their latency is one figure (masks that the
    target's kernels cannot skip run dense)."""
    m = get_method(candidate.prune.method)
    sparse = m.sparse_pattern if m.uses_sparse_kernels(target) else None
    return (candidate.model, m.kind if m.structural else "dense", candidate.prune.ratio if m.structural else 0.0,
            candidate.quant.precision, sparse)


def estimate_cost(model: str, method: str, ratio: float, precision: str,
                  graphs: dict[str, ModelGraph], target: Target, cache: dict | None = None) -> CostPrediction:
    """The candidate's predicted cost; ``cache`` shares it between candidates that differ only in what costs nothing."""
    m = get_method(method)
    key = speed_key(Candidate(model=model, prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec(precision=precision)),
                    target)
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
    accuracy_resolution: float = 0.0,
) -> Plan:
    """``accuracy_model(candidates) -> (expected, lower)`` arrays; None: the parents' accuracies.

    ``accuracy_resolution``: the smallest accuracy difference the test split measures (1 / its size);
    candidates that close to the best are ranked by speed (module docstring). Without an accuracy model
    every candidate of a parent has the parent's accuracy: that is not knowing, not a tie, so it is ignored."""
    validate_budget(budget, target)
    candidates = enumerate_candidates(sorted(graphs), target, sweep, precisions)
    # A graph without a torch model behind it (a user's ONNX) is not pruned: its dense candidates only.
    candidates = [c for c in candidates if graphs[c.model].prunable or get_method(c.prune.method).kind == "none"]
    if accuracy_model is not None:
        expected, lower = accuracy_model(candidates)
        basis = accuracy_model.basis
    else:
        expected = lower = [accuracies.get(c.model) for c in candidates]
        basis = ACCURACY_BASIS
    costs: dict = {}
    estimates = [
        Estimate(cand, estimate_cost(cand.model, cand.prune.method, cand.prune.ratio, cand.quant.precision, graphs, target,
                                     costs),
                 None if acc is None else float(acc), False, None if low is None else float(low), accuracies.get(cand.model))
        for cand, acc, low in zip(candidates, expected, lower)
    ]
    resolution = accuracy_resolution if accuracy_model is not None else 0.0
    return Plan(target=target.name, budget=budget, ranked=rank(estimates, budget, resolution),
                accuracy_basis=basis, accuracy_resolution=resolution)


def _faster_among_equals(ordered: list[Estimate], resolution: float) -> list[Estimate]:
    """``ordered`` (by accuracy) with its leading candidates that are within ``resolution`` of the first put
    fastest first: a measurement that cannot tell their accuracies apart cannot justify the slower one."""
    if not ordered or ordered[0].accuracy is None or resolution <= 0:
        return ordered
    best = ordered[0].accuracy
    n = next((i for i, e in enumerate(ordered) if (e.accuracy or 0.0) < best - resolution - 1e-9), len(ordered))
    lead = sorted(ordered[:n], key=lambda e: (e.latency_ms, e.cost.memory_mb, severity(e.candidate)))
    return lead + ordered[n:]


def rank(estimates: list[Estimate], budget: Budget, accuracy_resolution: float = 0.0) -> tuple[Estimate, ...]:
    """The plan's order (module docstring), with ``fits`` set from the best latency known for each candidate."""
    groups: tuple[list, list, list] = ([], [], [])
    for est in estimates:
        inside = budget.admits(latency_ms=est.latency_ms, memory_mb=est.cost.memory_mb)
        parent, low = est.parent_accuracy, est.accuracy_low
        trusted = parent is None or low is None or budget.admits(accuracy_drop=parent - low)
        est = dataclasses.replace(est, fits=inside and trusted)
        groups[0 if est.fits else 1 if inside else 2].append(est)
    by_accuracy = lambda e: (-(e.accuracy or 0.0), severity(e.candidate), e.latency_ms)  # noqa: E731
    return tuple(_faster_among_equals(sorted(groups[0], key=by_accuracy), accuracy_resolution)
                 + _faster_among_equals(sorted(groups[1], key=by_accuracy), accuracy_resolution)
                 + sorted(groups[2], key=lambda e: e.latency_ms))


def check_reachable(the_plan: Plan, *, slack: float = 2.0) -> None:
    """Refuse budgets far below anything predicted, before compressing anything."""
    fastest = the_plan.fastest()
    budget = the_plan.budget
    if budget.latency_ms is not None and fastest.latency_ms > slack * budget.latency_ms:
        how = "measured" if fastest.premeasured_ms is not None else "predicted"
        raise BudgetError(
            f"latency budget {budget.latency_ms:g} ms is out of reach on {the_plan.target}: the fastest candidate, "
            f"{fastest.candidate.id}, is {how} at {fastest.latency_ms:.3f} ms"
        )
    if budget.memory_mb is not None:
        smallest = min(the_plan.ranked, key=lambda e: e.cost.memory_mb)
        if smallest.cost.memory_mb > budget.memory_mb:
            raise BudgetError(
                f"memory budget {budget.memory_mb:g} MB is out of reach on {the_plan.target}: the smallest candidate, "
                f"{smallest.candidate.id}, needs {smallest.cost.memory_mb:.1f} MB"
            )
