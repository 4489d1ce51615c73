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

from edgecompress.core.errors import UnknownNameError, UsageError
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
    # What a method may keep between calls on copies of one parent model with these samples (the inverse Fisher of
    # WoodFisher, the same at every ratio): the meta-features prune one parent at every level. None: nothing kept.
    cache: dict | None = dataclasses.field(default=None, compare=False)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoSettings:
    """A method with nothing to set."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeSettings:
    scope: str = "global"  # "global": one threshold over all layers; "local": the same ratio in every layer


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelL1Settings:
    norm: int = 1  # L1 norm of each channel's weights ranks the channels
    round_to: int = 4  # channel counts stay multiples of 4 (vector widths of the CPU and Jetson kernels)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WoodFisherSettings:
    samples: int = 128  # per-sample gradients in the empirical Fisher
    block: int = 32  # consecutive weights per block of the block-diagonal Fisher
    # Relative to the mean Fisher diagonal. On lcnet_050 at 70% one-shot (test top-1): 1e-2 gives 93.9%,
    # 1e-1 gives 95.6%, magnitude pruning 93.3% (blocks of 32, 128 samples).
    dampening: float = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class SemiStructuredSettings:
    n: int = 2  # weights kept ...
    m: int = 4  # ... in every group of m consecutive input channels, at each output channel and kernel position
    min_weights: int = 64  # smaller layers stay dense (the stem's few weights carry too much)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankSettings:
    bisection_steps: int = 40  # of the shared spectral-energy threshold


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegularizedSettings:
    """NNCF's regularization-based masks (see Regularizer for why the mask logits get their own learning rate)."""

    mask_lr: float = 0.1
    freeze_at: float = 0.5  # share of the fine-tuning steps after which the masks are frozen at exactly the ratio
    density_penalty: float = 0.05  # RBLoss's p


KINDS = ("none", "unstructured", "semi-structured", "channel", "lowrank")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneMethod:
    """One registered method: its settings (in every stage hash and meta-dataset key), level grid, traits and code.

    ``prepare(model, ratio, example_input, data, settings)`` returns a model ready for fine-tuning (masked or
    physically smaller); ``finalize(model, example_input)`` a plain torch model to export;
    ``regularizer(model, ratio, settings)`` the term a learned method adds to fine-tuning.
    """

    name: str
    kind: str  # one of KINDS
    description: str
    settings: object  # a frozen settings dataclass: everything besides the ratio that changes the result
    # The ratio grid `meta collect` sweeps and `plan`/`build --method` offer: one grid, so that every candidate of a
    # zoo model is a measured row (its features read from the meta-dataset, its accuracy predicted from its
    # neighbours at the same levels). Four levels or so: each one is a compression per model and task to collect.
    levels: tuple[float, ...]
    impl_prepare: Callable
    impl_finalize: Callable
    impl_regularizer: Callable | None = None
    # Traits, read by the meta-features and the cost model instead of the method's name.
    local: bool = False  # the ratio applies per layer rather than over the whole model
    second_order: bool = False  # weights chosen by loss curvature, the rest updated to compensate (OBS)
    fixed_ratio: float | None = None  # a pattern that fixes the ratio (2:4 is 0.5)
    sparse_pattern: str | None = None  # "2:4" where sparse kernels can use it
    default: bool = False  # in the sweep `plan` and `build` use without --method

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if not dataclasses.is_dataclass(self.settings) or not self.settings.__dataclass_params__.frozen:
            raise TypeError(f"method {self.name}: settings must be a frozen dataclass instance")

    @property
    def learned(self) -> bool:
        """The mask is learned during fine-tuning (nothing is pruned before it)."""
        return self.impl_regularizer is not None

    @property
    def structural(self) -> bool:
        """The compressed model runs other kernels than its parent (channels removed, layers factorized)."""
        return self.kind in ("channel", "lowrank")

    @property
    def data_samples(self) -> int:
        """Labelled train samples the method uses while pruning (second-order methods need gradients)."""
        return getattr(self.settings, "samples", 0)

    def prune_data(self, data) -> "PruneData":
        """The first ``data_samples`` images of ``data``'s train split, as the method's ``prepare`` takes them."""
        import torch

        x, y = data.split("train")
        n = self.data_samples
        return PruneData(torch.from_numpy(x[:n]), torch.from_numpy(y[:n]))

    def uses_sparse_kernels(self, target) -> bool:
        """The target has kernels that skip this method's zeros (2:4 on Jetson); elsewhere its masks run dense."""
        return self.sparse_pattern is not None and self.sparse_pattern in target.sparse_kernels

    def settings_hash(self) -> str:
        """Names the settings in stage hashes and meta-dataset rows: a changed setting is a new key."""
        return spec_hash(self.name, self.settings)

    def prepare(self, model, ratio: float, example_input, data: "PruneData | None" = None):
        return self.impl_prepare(model, ratio, example_input, data, self.settings)

    def finalize(self, model, example_input):
        return self.impl_finalize(model, example_input)

    def regularizer(self, model, ratio: float) -> "Regularizer | None":
        return self.impl_regularizer(model, ratio, self.settings) if self.impl_regularizer else None

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


def _woodfisher(model, ratio, example_input, data, settings: WoodFisherSettings):
    from edgecompress.compress.woodfisher import woodfisher_prune

    if data is None:
        raise UsageError("woodfisher needs labelled samples for its Fisher estimate")
    n = min(settings.samples, len(data.labels))
    return _masked(model, woodfisher_prune(model, ratio, data.images[:n], data.labels[:n], block=settings.block,
                                           dampening=settings.dampening, cache=data.cache))


def _low_rank(model, ratio, example_input, data, settings: LowRankSettings):
    from edgecompress.compress.lowrank import decompose

    return decompose(model, ratio, example_input, bisection_steps=settings.bisection_steps)[0]


def n_of_m_mask(weight, n: int, m: int):
    """Keep the ``n`` largest of every ``m`` consecutive input channels, for each output channel and kernel position:
    TensorRT's structured-sparsity rule (2:4 along C for every (k, r, s) of a KCRS weight; along the inputs of a
    linear layer). None where the layer has no group of ``m`` input channels (depthwise, or C not a multiple of m)."""
    import torch

    out_c, in_c = weight.shape[:2]
    if in_c % m:
        return None
    w = weight.detach().abs().reshape(out_c, in_c, -1).transpose(1, 2)  # K, R*S, C
    w = w.reshape(out_c, w.shape[1], in_c // m, m)
    keep = torch.zeros_like(w).scatter_(-1, w.topk(n, dim=-1).indices, 1.0)
    return keep.reshape(out_c, -1, in_c).transpose(1, 2).reshape(weight.shape)


def _n_of_m(model, ratio, example_input, data, settings: SemiStructuredSettings):
    import torch
    from torch import nn

    masks = {}
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.numel() >= settings.min_weights:
            mask = n_of_m_mask(layer.weight, settings.n, settings.m)
            if mask is not None:
                masks[layer] = mask
                with torch.no_grad():
                    layer.weight.mul_(mask)
    return _masked(model, masks)


_RB_SATURATED = 4.6  # logit(0.99), NNCF's initial mask value


def _nncf_rb_regularizer(model, ratio, settings: RegularizedSettings):
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

    return Regularizer(RBLoss(model, target_ratio=ratio, p=settings.density_penalty), tuple(h.mask for h in hooks.values()),
                       settings.mask_lr, freeze=freeze, freeze_at=settings.freeze_at)


_NNCF_MODES = {("magnitude", "global"): "UNSTRUCTURED_MAGNITUDE_GLOBAL", ("magnitude", "local"): "UNSTRUCTURED_MAGNITUDE_LOCAL"}


def _nncf_magnitude(model, ratio, example_input, data, settings: MagnitudeSettings):
    return _nncf_prune(model, _NNCF_MODES[("magnitude", settings.scope)], example_input, ratio=ratio)


def _nncf_regularized(model, ratio, example_input, data, settings: RegularizedSettings):
    # The masks learn their ratio from RBLoss (the regularizer); nothing is pruned here.
    return _nncf_prune(model, "UNSTRUCTURED_REGULARIZATION_BASED", example_input)


def _nncf_prune(model, mode_name: str, example_input, **kwargs):
    import nncf

    from edgecompress.runtimes.base import nncf_quiet

    with nncf_quiet():
        mode = getattr(nncf.PruneMode, mode_name)
    return nncf.prune(model, mode, examples_inputs=example_input, **kwargs)


def _nncf_strip(model, example_input):
    import nncf

    # IN_PLACE multiplies the masks into the weights; NATIVE would keep them as hooks.
    return nncf.strip(model, do_copy=False, strip_format=nncf.StripFormat.IN_PLACE, example_input=example_input)


# Blocks whose channel axis torch-pruning's dependency graph cannot follow, by timm class name: EdgeNeXt's
# SplitTransposeBlock splits it into chunks of sizes fixed at construction (an IndexError in its group's importance);
# timm's multi-head Attention reshapes qkv by a fixed head count (MobileViT: a shape error in the first forward);
# MobileViT v2's LinearSelfAttention splits its qkv projection into sizes fixed at construction (at ratios 0.1-0.3).
# Kept whole; the rest of the network is pruned.
UNPRUNABLE_BLOCKS = ("SplitTransposeBlock", "Attention", "LinearSelfAttention")


def _torch_pruning_l1(model, ratio, example_input, data, settings: ChannelL1Settings):
    import torch_pruning as tp

    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [classifier] if classifier is not None else []
    ignored += [m for m in model.modules() if type(m).__name__ in UNPRUNABLE_BLOCKS]
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_input,
        importance=tp.importance.MagnitudeImportance(p=settings.norm),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=settings.round_to,
    )
    pruner.step()
    return model


METHODS: dict[str, PruneMethod] = {}


def register_method(method: PruneMethod) -> PruneMethod:
    """Add a method to the registry (a third-party method registers the same way); names are unique."""
    if method.name in METHODS:
        raise ValueError(f"pruning method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


register_method(PruneMethod(
    name="none", kind="none", description="no pruning", settings=NoSettings(), levels=(0.0,),
    impl_prepare=_identity, impl_finalize=_identity, default=True,
))
register_method(PruneMethod(
    name="nncf.magnitude_global", kind="unstructured",
    description="NNCF unstructured magnitude pruning, one threshold over all layers",
    settings=MagnitudeSettings(scope="global"), levels=(0.3, 0.5, 0.7, 0.9),
    impl_prepare=_nncf_magnitude, impl_finalize=_nncf_strip, default=True,
))
register_method(PruneMethod(
    name="nncf.magnitude_local", kind="unstructured",
    description="NNCF unstructured magnitude pruning, the same ratio in every layer",
    settings=MagnitudeSettings(scope="local"), levels=(0.3, 0.5, 0.7, 0.9),
    impl_prepare=_nncf_magnitude, impl_finalize=_nncf_strip, local=True, default=True,
))
register_method(PruneMethod(
    name="torch_pruning.l1", kind="channel",
    description="torch-pruning (DepGraph) L1-norm channel pruning; channels are removed",
    settings=ChannelL1Settings(), levels=(0.1, 0.3, 0.5, 0.7),
    impl_prepare=_torch_pruning_l1, impl_finalize=_identity, default=True,
))
register_method(PruneMethod(
    name="woodfisher", kind="unstructured",
    description="WoodFisher second-order one-shot pruning (OBS saliency and update, block-diagonal empirical Fisher "
                "inverted by Woodbury recursion)",
    settings=WoodFisherSettings(), levels=(0.3, 0.5, 0.7, 0.8, 0.9),
    impl_prepare=_woodfisher, impl_finalize=_unmask, second_order=True,
))
register_method(PruneMethod(
    name="sparse24", kind="semi-structured",
    description="2:4 semi-structured magnitude sparsity (2 of every 4 consecutive input channels kept at each output "
                "channel and kernel position, TensorRT's rule; sparse tensor cores run it on Jetson Orin with "
                "trtexec --sparsity=enable)",
    settings=SemiStructuredSettings(n=2, m=4), levels=(0.5,),
    impl_prepare=_n_of_m, impl_finalize=_unmask, fixed_ratio=0.5, sparse_pattern="2:4",
))
register_method(PruneMethod(
    name="lowrank", kind="lowrank",
    description="low-rank decomposition (truncated SVD for linear and 1x1 layers, Tucker-2 for kxk convolutions); per-layer "
                "ranks from one spectral-energy threshold, bisected so the decomposable layers' MACs fall by the ratio",
    settings=LowRankSettings(), levels=(0.25, 0.5, 0.75, 0.9),  # share of the decomposable layers' MACs removed
    impl_prepare=_low_rank, impl_finalize=_identity,
))
register_method(PruneMethod(
    name="nncf.rb", kind="unstructured",
    description="NNCF regularization-based sparsity: mask logits learned with RBLoss during the first part of fine-tuning "
                "at their own learning rate, then frozen at exactly the ratio (lowest logits pruned) for the rest",
    settings=RegularizedSettings(), levels=(0.3, 0.5, 0.7, 0.9),
    impl_prepare=_nncf_regularized, impl_finalize=_nncf_strip, impl_regularizer=_nncf_rb_regularizer,
))


def default_sweep() -> dict:
    """What `plan` and `build` sweep unless --method says otherwise: the methods marked default (those the shipped
    meta-dataset covers, so every default candidate's accuracy is predicted from measured neighbours)."""
    return {m.name: m.levels for m in METHODS.values() if m.default}


def sweep_for(methods) -> dict:
    """The sweep for ``--method`` names (none always included: the uncompressed model is a candidate)."""
    if not methods:
        return default_sweep()
    return {m: get_method(m).levels for m in ("none", *methods)}


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
