"""Low-rank decomposition of convolutions and linear layers under a MAC budget.

Linear layers and 1x1 convolutions are split by truncated SVD into two
(``in -> r -> out``); k x k convolutions by Tucker-2 (HOSVD on the input- and
output-channel unfoldings) into ``1x1 (in -> r_in)``, ``k x k (r_in -> r_out)``
with the original stride and padding, and ``1x1 (r_out -> out)``.

Ranks are chosen per layer, automatically: every layer keeps the smallest rank
whose singular values hold a share ``tau`` of its spectral energy, and a layer
is left whole where the factorization would not save MACs. ``tau`` is found
by bisection so that the decomposable layers' MACs drop by ``ratio`` (the
"FLOPs budget"): one global threshold, so layers with a fast-decaying
spectrum are compressed harder than layers without. Depthwise convolutions,
the 3-channel stem and the classifier are left alone.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class _Layer:
    parent: nn.Module
    attr: str
    module: nn.Module
    macs: int  # at full rank
    hw_in: int  # spatial positions in (1 for linear)
    hw_out: int
    spectra: tuple  # normalized cumulative energy per mode (1 or 2 tensors)


def _cumulative_energy(matrix: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(matrix.float())
    e = s.square().cumsum(0)
    return (e / e[-1]).float()


def _decomposable(model: nn.Module, example: torch.Tensor) -> list[_Layer]:
    shapes = {}
    hooks = []
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: shapes.__setitem__(name, (i[0].shape, o.shape))))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was_training)
    for h in hooks:
        h.remove()
    layers = []
    for parent_name, parent in model.named_modules():
        for attr, m in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if name not in shapes or m is classifier:
                continue
            (in_shape, out_shape) = shapes[name]
            if isinstance(m, nn.Linear):
                hw = int(in_shape[:-1].numel() // in_shape[0])
                w = m.weight.detach()
                layers.append(_Layer(parent, attr, m, hw * w.numel(), hw, hw, (_cumulative_energy(w),)))
            elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 3:
                w = m.weight.detach()
                hw_in, hw_out = in_shape[-1] * in_shape[-2], out_shape[-1] * out_shape[-2]
                macs = hw_out * w.numel()
                if m.kernel_size == (1, 1):
                    layers.append(_Layer(parent, attr, m, macs, hw_in, hw_out, (_cumulative_energy(w.flatten(1)),)))
                else:
                    out_unfold = w.flatten(1)  # mode 0: output channels
                    in_unfold = w.transpose(0, 1).flatten(1)  # mode 1: input channels
                    layers.append(_Layer(parent, attr, m, macs, hw_in, hw_out,
                                         (_cumulative_energy(in_unfold), _cumulative_energy(out_unfold))))
    return layers


def _rank(cum: torch.Tensor, tau: float) -> int:
    return int(torch.searchsorted(cum, torch.tensor(tau)).item()) + 1


def _ranks_and_macs(layer: _Layer, tau: float) -> tuple[tuple[int, ...] | None, int]:
    m = layer.module
    if isinstance(m, nn.Linear) or m.kernel_size == (1, 1):
        r = min(_rank(layer.spectra[0], tau), len(layer.spectra[0]))
        c_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        c_out = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        macs = layer.hw_out * (c_in + c_out) * r  # a 1x1's stride moves to the first factor
    else:
        r_in = min(_rank(layer.spectra[0], tau), m.in_channels)
        r_out = min(_rank(layer.spectra[1], tau), m.out_channels)
        k = m.kernel_size[0] * m.kernel_size[1]
        macs = layer.hw_in * m.in_channels * r_in + layer.hw_out * (r_in * r_out * k + r_out * m.out_channels)
        r = (r_in, r_out)
    if macs >= layer.macs:
        return None, layer.macs  # no saving: keep the layer whole
    return (r,) if isinstance(r, int) else r, macs


def select_ranks(layers: list[_Layer], ratio: float, bisection_steps: int) -> tuple[list, float]:
    """One energy threshold for all layers, bisected so that MACs fall by ``ratio``; returns ranks and the achieved ratio."""
    full = sum(l.macs for l in layers)
    target = (1 - ratio) * full
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(bisection_steps):
        tau = (lo + hi) / 2
        plan = [_ranks_and_macs(l, tau) for l in layers]
        macs = sum(m for _, m in plan)
        if macs <= target:
            best, lo = plan, tau  # fits: try keeping more energy
        else:
            hi = tau
    if best is None:
        best = [_ranks_and_macs(l, 1e-9) for l in layers]
    achieved = 1 - sum(m for _, m in best) / full if full else 0.0
    return [r for r, _ in best], achieved


class Factorized(nn.Sequential):
    """A layer replaced by its low-rank factors, applied in turn. ``weight`` is their product in the replaced
    layer's shape (read-only, recomputed on each read): model code that reads a layer's weight keeps working (timm's
    EdgeNeXt reads its positional encoding's projection weight for its device)."""

    @property
    def weight(self) -> torch.Tensor:
        factors = [m.weight.detach() for m in self]
        if len(factors) == 3:  # Tucker-2: 1x1 in, k x k core, 1x1 out
            first, core, last = factors
            return torch.einsum("or,rskl,si->oikl", last.flatten(1), core, first.flatten(1))
        first, second = factors
        product = second.flatten(1) @ first.flatten(1)
        return product if first.dim() == 2 else product[:, :, None, None]


def _factor_linear(m: nn.Module, r: int) -> nn.Module:
    is_linear = isinstance(m, nn.Linear)
    w = m.weight.detach().flatten(1).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).float()  # r x in
    second = (u[:, :r] * root[None, :]).float()  # out x r
    if is_linear:
        a, b = nn.Linear(m.in_features, r, bias=False), nn.Linear(r, m.out_features, bias=m.bias is not None)
        a.weight.data.copy_(first)
        b.weight.data.copy_(second)
    else:
        a = nn.Conv2d(m.in_channels, r, 1, m.stride, 0, bias=False)
        b = nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None)
        a.weight.data.copy_(first[:, :, None, None])
        b.weight.data.copy_(second[:, :, None, None])
    if m.bias is not None:
        b.bias.data.copy_(m.bias.detach())
    return Factorized(a, b)


def _factor_tucker2(m: nn.Conv2d, r_in: int, r_out: int) -> nn.Module:
    w = m.weight.detach().double()  # O, I, kh, kw
    u_out = torch.linalg.svd(w.flatten(1), full_matrices=False)[0][:, :r_out]  # O x r_out
    u_in = torch.linalg.svd(w.transpose(0, 1).flatten(1), full_matrices=False)[0][:, :r_in]  # I x r_in
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)  # r_out, r_in, kh, kw
    first = nn.Conv2d(m.in_channels, r_in, 1, bias=False)
    middle = nn.Conv2d(r_in, r_out, m.kernel_size, m.stride, m.padding, m.dilation, bias=False)
    last = nn.Conv2d(r_out, m.out_channels, 1, bias=m.bias is not None)
    first.weight.data.copy_(u_in.t().float()[:, :, None, None])
    middle.weight.data.copy_(core.float())
    last.weight.data.copy_(u_out.float()[:, :, None, None])
    if m.bias is not None:
        last.bias.data.copy_(m.bias.detach())
    return Factorized(first, middle, last)


def decompose(model: nn.Module, ratio: float, example: torch.Tensor, *, bisection_steps: int) -> tuple[nn.Module, dict]:
    """Factorize ``model`` in place so its decomposable layers' MACs fall by about ``ratio``."""
    if not 0 < ratio < 1:
        raise ValueError(f"low-rank ratio must be in (0, 1), got {ratio}")
    layers = _decomposable(model, example)
    ranks, achieved = select_ranks(layers, ratio, bisection_steps)
    replaced = 0
    for layer, r in zip(layers, ranks):
        if r is None:
            continue
        m = layer.module
        new = _factor_linear(m, r[0]) if len(r) == 1 else _factor_tucker2(m, r[0], r[1])
        setattr(layer.parent, layer.attr, new)
        replaced += 1
    return model, {"layers": len(layers), "factorized": replaced, "macs_reduction": achieved}
