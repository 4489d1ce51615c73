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
        fixed = get_method(self.method).fixed_ratio
        if fixed is not None and self.ratio != fixed:
            raise UsageError(f"pruning method {self.method} has a fixed ratio of {fixed:g}, not {self.ratio:g}")

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
class PruneData:
    """Labelled samples a method may use while pruning (second-order methods need gradients)."""

    images: "torch.Tensor"  # noqa: F821
    labels: "torch.Tensor"  # noqa: F821


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A method's extra term in the fine-tuning loss, and the parameters it trains at their own learning rate.

    NNCF's regularization-based masks are logits that start at logit(0.99) = 4.6 and prune a weight once they
    cross 0; at the weights' learning rate (1e-3, Adam moves a parameter about that much per step) they move
    0.15 in 150 steps and nothing is ever pruned, so their group gets ``lr`` and no weight decay.
    At ``freeze_at`` (a share of the steps) ``freeze()`` fixes them, and the rest of the steps fine-tune the
    weights under fixed masks (the freeze epoch of NNCF's earlier RB controller).
    """

    loss: Callable  # () -> scalar tensor added to every step's loss until the freeze
    params: tuple = ()
    lr: float = 0.0
    freeze: Callable | None = None
    freeze_at: float = 1.0


@dataclasses.dataclass(frozen=True)
class PruneMethod:
    name: str
    kind: str  # "none", "unstructured", "semi-structured", "channel", "lowrank"
    description: str
    prepare: Callable  # (model, ratio, example_input, data: PruneData) -> model to fine-tune
    finalize: Callable  # (model, example_input) -> plain torch model
    regularizer: Callable | None = None  # (model, ratio) -> Regularizer used while fine-tuning
    fixed_ratio: float | None = None  # a pattern that fixes the ratio (2:4 is 0.5)
    sparse_pattern: str | None = None  # "2:4" where sparse kernels can use it

    def channel_keep(self, ratio: float) -> float:
        """Share of channels left, for the cost model (1.0 unless channels are removed)."""
        return 1.0 - ratio if self.kind == "channel" else 1.0

    def graph_after(self, graph, ratio: float):
        """The kernels the compressed model will run, predicted from its parent's graph (for the cost model)."""
        if self.kind == "channel":
            return graph.pruned(self.channel_keep(ratio))
        if self.kind == "lowrank":
            return graph.low_rank(ratio)
        return graph


def _identity(model, *_, **__):
    return model


def _masked(model, masks: dict):
    """Keep pruned weights at zero through fine-tuning (torch's pruning parametrization)."""
    from torch.nn.utils import prune

    for layer, mask in masks.items():
        prune.custom_from_mask(layer, "weight", mask)
    return model


def _unmask(model, example_input=None):
    from torch.nn.utils import prune

    for layer in list(model.modules()):
        if prune.is_pruned(layer) and hasattr(layer, "weight_mask"):
            prune.remove(layer, "weight")
    return model


def _woodfisher(model, ratio, example_input, data=None):
    from edgecompress.woodfisher import DEFAULT_SAMPLES, woodfisher_prune

    if data is None:
        raise UsageError("woodfisher needs labelled samples for its Fisher estimate")
    n = min(DEFAULT_SAMPLES, len(data.labels))
    return _masked(model, woodfisher_prune(model, ratio, data.images[:n], data.labels[:n]))


def _low_rank(model, ratio, example_input, data=None):
    from edgecompress.lowrank import decompose

    return decompose(model, ratio, example_input)[0]


def _two_four(model, ratio, example_input, data=None):
    """2:4 semi-structured: in every group of 4 consecutive input weights of a conv/linear row, keep the 2 largest."""
    import torch
    from torch import nn

    masks = {}
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight[0].numel() % 4 == 0 and layer.weight.numel() >= 64:
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1, 4).abs()
            keep = torch.zeros_like(w).scatter_(-1, w.topk(2, dim=-1).indices, 1.0)
            masks[layer] = keep.reshape(layer.weight.shape)
            with torch.no_grad():
                layer.weight.mul_(masks[layer])
    return _masked(model, masks)


RB_MASK_LR = 0.1
RB_FREEZE_AT = 0.5
_RB_SATURATED = 4.6  # logit(0.99), NNCF's initial mask value


def _nncf_rb_regularizer(model, ratio):
    import numpy as np
    import torch
    from nncf.torch.function_hook.pruning.rb.algo import get_pruned_modules
    from nncf.torch.function_hook.pruning.rb.losses import RBLoss
    from nncf.torch.model_graph_manager import get_const_data_by_name

    hooks = get_pruned_modules(model)

    def freeze():
        # RBLoss holds the density near the target, but Adam moves every mask near the threshold by about the
        # learning rate at once, so the kept share at any step swings by several points. The freeze prunes exactly
        # the ratio: the lowest learned logits, ties broken by |w|.
        logits = torch.cat([h.mask.detach().flatten() for h in hooks.values()]).numpy()
        magnitude = torch.cat([get_const_data_by_name(n, model).detach().abs().flatten() for n in hooks]).numpy()
        keep = np.ones(len(logits), dtype=bool)
        keep[np.lexsort((magnitude, logits))[: int(round(ratio * len(logits)))]] = False
        start = 0
        for hook in hooks.values():
            n = hook.mask.numel()
            kept = torch.from_numpy(keep[start:start + n]).reshape(hook.mask.shape)
            start += n
            with torch.no_grad():
                hook.mask.copy_(torch.where(kept, 1.0, -1.0) * _RB_SATURATED)
            hook.mask.requires_grad_(False)
            hook.eval()  # deterministic masks: no logistic noise from here on

    return Regularizer(RBLoss(model, target_ratio=ratio, p=0.05), tuple(h.mask for h in hooks.values()), RB_MASK_LR,
                       freeze=freeze, freeze_at=RB_FREEZE_AT)


def _nncf_magnitude(mode_name: str):
    def prepare(model, ratio, example_input, data=None):
        import nncf

        from edgecompress.runtimes.base import nncf_quiet

        with nncf_quiet():
            mode = getattr(nncf.PruneMode, mode_name)
        # Regularization-based masks learn their ratio from RBLoss; magnitude modes take it here.
        kwargs = {} if mode_name == "UNSTRUCTURED_REGULARIZATION_BASED" else {"ratio": ratio}
        return nncf.prune(model, mode, examples_inputs=example_input, **kwargs)

    return prepare


def _nncf_strip(model, example_input):
    import nncf

    # IN_PLACE multiplies the masks into the weights; NATIVE would keep them as hooks.
    return nncf.strip(model, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE, example_input=example_input)


def _torch_pruning_l1(model, ratio, example_input, data=None):
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
        PruneMethod(
            "woodfisher", "unstructured",
            "WoodFisher second-order one-shot pruning (OBS saliency and update, block-diagonal empirical Fisher "
            "inverted by Woodbury recursion, 128 samples, blocks of 32, dampening 10% of the mean diagonal)",
            _woodfisher, _unmask,
        ),
        PruneMethod(
            "sparse24", "semi-structured",
            "2:4 semi-structured magnitude sparsity (2 of every 4 consecutive weights kept; sparse tensor cores "
            "run it on Jetson Orin with trtexec --sparsity=enable)",
            _two_four, _unmask, fixed_ratio=0.5, sparse_pattern="2:4",
        ),
        PruneMethod(
            "lowrank", "lowrank",
            "low-rank decomposition (truncated SVD for linear and 1x1 layers, Tucker-2 for kxk convolutions); per-layer "
            "ranks from one spectral-energy threshold, bisected so the decomposable layers' MACs fall by the ratio",
            _low_rank, _identity,
        ),
        PruneMethod(
            "nncf.rb", "unstructured",
            "NNCF regularization-based sparsity: mask logits learned with RBLoss during the first half of fine-tuning "
            "(mask learning rate 0.1), then frozen at exactly the ratio (lowest logits pruned) for the second half",
            _nncf_magnitude("UNSTRUCTURED_REGULARIZATION_BASED"), _nncf_strip, regularizer=_nncf_rb_regularizer,
        ),
    ]
}

# Every method's ratio grid (what `meta collect` sweeps, and `plan`/`build --method` offer).
RATIO_GRID = {
    "none": (0.0,),
    "nncf.magnitude_global": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "nncf.magnitude_local": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "torch_pruning.l1": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7),
    "woodfisher": (0.3, 0.5, 0.7, 0.8, 0.9),
    "sparse24": (0.5,),
    "nncf.rb": (0.3, 0.5, 0.7, 0.9),
    "lowrank": (0.25, 0.5, 0.75, 0.9),  # share of the decomposable layers' MACs removed
}
# What `plan` and `build` sweep unless --method says otherwise: the methods the shipped meta-dataset
# covers, so every default candidate's accuracy is predicted from measured neighbours.
DEFAULT_SWEEP = {m: RATIO_GRID[m] for m in ("none", "nncf.magnitude_global", "nncf.magnitude_local", "torch_pruning.l1")}


def sweep_for(methods) -> dict:
    """The sweep for ``--method`` names (none always included: the uncompressed model is a candidate)."""
    if not methods:
        return DEFAULT_SWEEP
    for m in methods:
        get_method(m)
    return {m: RATIO_GRID.get(m, (0.5,)) for m in ("none", *methods)}


# Tie-break at equal predicted accuracy: prefer the least severe compression. Channel pruning is taken as more harmful than the same
# share of unstructured sparsity, int8 as mildly harmful, fp16 as harmless.
_KIND_SEVERITY = {"none": 0.0, "unstructured": 0.5, "semi-structured": 0.6, "channel": 1.0, "lowrank": 1.0}
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
