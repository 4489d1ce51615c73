"""Compression specs and the pruning-method registry.

``PruneSpec(method="torch_pruning.l1", ratio=0.5)`` and
``QuantSpec(precision="int8")`` are frozen, keyword-only and serialisable, so a
report row can be replayed exactly. Each pruning method is one entry in
``METHODS``: ``prepare`` returns a model ready for fine-tuning (masked or
physically smaller), ``finalize`` returns a plain torch model to export.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Callable

from edgecompress.errors import UnknownNameError, UsageError
from edgecompress.targets import PRECISIONS

SPEC_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneSpec:
    method: str = "none"
    ratio: float = 0.0

    def __post_init__(self):
        get_method(self.method)
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"pruning ratio {self.ratio} must be in [0, 1)")
        if self.method == "none" and self.ratio:
            raise UsageError("pruning method 'none' takes no ratio")

    @property
    def label(self) -> str:
        return "none" if self.method == "none" else f"{self.method}@{self.ratio:.2f}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UnknownNameError("precision", self.precision, PRECISIONS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneSpec:
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    model: str
    prune: PruneSpec
    quant: QuantSpec

    @property
    def id(self) -> str:
        prune = "dense" if self.prune.method == "none" else f"{self.prune.method}-{self.prune.ratio:.2f}"
        return f"{self.model}__{prune}__{self.quant.precision}".replace("/", "_").replace(":", "_").replace("@", "_")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "prune_method": self.prune.method,
            "prune_ratio": self.prune.ratio,
            "precision": self.quant.precision,
        }


def spec_hash(*parts) -> str:
    """Stable hash of specs and plain values (for stage caches and resume)."""
    def plain(x):
        if dataclasses.is_dataclass(x):
            return {"type": type(x).__name__, "version": SPEC_VERSION, **dataclasses.asdict(x)}
        return x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PruneMethod:
    name: str
    kind: str  # "none", "unstructured", "channel"
    description: str
    prepare: Callable  # (model, ratio, example_input) -> model to fine-tune
    finalize: Callable  # (model, example_input) -> plain torch model

    def channel_keep(self, ratio: float) -> float:
        """Share of channels left, for the cost model (1.0 unless channels are removed)."""
        return 1.0 - ratio if self.kind == "channel" else 1.0


def _identity(model, *_):
    return model


def _nncf_magnitude(mode_name: str):
    def prepare(model, ratio, example_input):
        import nncf

        from edgecompress.runtimes.base import nncf_quiet

        with nncf_quiet():
            return nncf.prune(model, getattr(nncf.PruneMode, mode_name), ratio=ratio, examples_inputs=example_input)

    return prepare


def _nncf_strip(model, example_input):
    import nncf

    # IN_PLACE multiplies the masks into the weights; NATIVE would keep them as hooks.
    return nncf.strip(model, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE, example_input=example_input)


def _torch_pruning_l1(model, ratio, example_input):
    import torch_pruning as tp

    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_input,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[classifier] if classifier is not None else [],
        round_to=4,
    )
    pruner.step()
    return model


METHODS: dict[str, PruneMethod] = {
    m.name: m
    for m in [
        PruneMethod("none", "none", "no pruning", _identity, _identity),
        PruneMethod(
            "nncf.magnitude_global", "unstructured",
            "NNCF unstructured magnitude pruning, one threshold over all layers",
            _nncf_magnitude("UNSTRUCTURED_MAGNITUDE_GLOBAL"), _nncf_strip,
        ),
        PruneMethod(
            "nncf.magnitude_local", "unstructured",
            "NNCF unstructured magnitude pruning, the same ratio in every layer",
            _nncf_magnitude("UNSTRUCTURED_MAGNITUDE_LOCAL"), _nncf_strip,
        ),
        PruneMethod(
            "torch_pruning.l1", "channel",
            "torch-pruning (DepGraph) L1-norm channel pruning; channels are removed",
            _torch_pruning_l1, _identity,
        ),
    ]
}

# The ratios `plan`, `build` and `meta collect` sweep: method -> ratios. One grid for all three,
# so the meta-dataset holds every candidate the planner can propose for the zoo.
DEFAULT_SWEEP = {
    "none": (0.0,),
    "nncf.magnitude_global": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "nncf.magnitude_local": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "torch_pruning.l1": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
}

# Tie-break at equal predicted accuracy: prefer the least severe compression. Channel pruning is taken as more harmful than the same
# share of unstructured sparsity, int8 as mildly harmful, fp16 as harmless.
_KIND_SEVERITY = {"none": 0.0, "unstructured": 0.5, "channel": 1.0}
_PRECISION_SEVERITY = {"fp32": 0.0, "fp16": 0.001, "int8": 0.02}


def severity(candidate: Candidate) -> float:
    kind = get_method(candidate.prune.method).kind
    return _KIND_SEVERITY[kind] * candidate.prune.ratio + _PRECISION_SEVERITY[candidate.quant.precision]


def list_methods(pattern: str = "*") -> list[str]:
    return sorted(n for n in METHODS if fnmatch.fnmatch(n, pattern))


def get_method(name: str) -> PruneMethod:
    if name not in METHODS:
        raise UnknownNameError("pruning method", name, METHODS)
    return METHODS[name]
