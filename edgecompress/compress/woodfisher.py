"""Second-order one-shot pruning: WoodFisher (Singh and Alistarh, NeurIPS 2020), Optimal Brain Surgeon with an empirical Fisher.

For every conv and linear weight tensor, split into blocks of ``block`` consecutive
weights, the empirical Fisher ``F = damp*I + (1/N) sum_n g_n g_n^T`` is built from
per-sample gradients ``g_n`` of the loss on ``N`` samples, and its inverse is
accumulated directly by the Woodbury identity, one rank-1 update per sample
(the WoodFisher recursion, batched over all blocks of a layer):

    F_n^-1 = F_{n-1}^-1 - (F_{n-1}^-1 g g^T F_{n-1}^-1) / (N + g^T F_{n-1}^-1 g),   F_0^-1 = I / damp

The dampening is relative: ``damp = dampening * mean(diag of (1/N) sum g g^T)`` per
layer, estimated on the first samples, so one default works across models.
Saliency of weight q is the OBS loss increase ``w_q^2 / (2 [F^-1]_qq)``; the
``ratio`` weights of lowest saliency over the whole model are removed, and the
remaining weights of each block get the joint OBS update for everything pruned
in that block, ``dw = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DAMP_PROBE = 16


def prunable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-flat.numel()) % block
    return F.pad(flat, (0, pad)).reshape(-1, block)


def _per_sample_grads(model, layers, images, labels):
    """Yield, for each sample, the flattened weight gradient of every layer (eval mode: BN uses running stats)."""
    model.eval()
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1])
        loss.backward()
        yield [layer.weight.grad.detach().reshape(-1) for layer in layers]


def inverse_fisher_blocks(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, block: int,
                          dampening: float) -> list[torch.Tensor]:
    """Per layer, the (num_blocks, block, block) inverse of the dampened empirical Fisher (Woodbury recursion)."""
    layers = prunable_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.weight.requires_grad_(True)
    n = len(labels)
    probe = min(n, _DAMP_PROBE)
    diag = [torch.zeros(()) for _ in layers]
    for grads in _per_sample_grads(model, layers, images[:probe], labels[:probe]):
        for j, g in enumerate(grads):
            diag[j] += (g * g).mean()
    damp = [max(float(d / probe) * dampening, 1e-12) for d in diag]
    inverses = [torch.eye(block).repeat(_blocks(l.weight.reshape(-1), block).shape[0], 1, 1) / d for l, d in zip(layers, damp)]
    for grads in _per_sample_grads(model, layers, images, labels):
        for j, g in enumerate(grads):
            gb = _blocks(g, block).unsqueeze(-1)  # (nb, B, 1)
            u = inverses[j] @ gb  # F^-1 g
            denom = n + (gb.transpose(1, 2) @ u)  # (nb, 1, 1)
            inverses[j] -= (u @ u.transpose(1, 2)) / denom
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    return inverses


@torch.no_grad()
def woodfisher_prune(model: nn.Module, ratio: float, images: torch.Tensor, labels: torch.Tensor, *,
                     block: int, dampening: float, cache: dict | None = None) -> dict[nn.Module, torch.Tensor]:
    """Prune ``ratio`` of all conv/linear weights in place with OBS updates; returns each layer's keep-mask.

    The inverse Fisher does not depend on the ratio, and it is nearly all the cost. ``cache`` (a dict that belongs to
    one parent model and these samples, for copies of that model that are not yet pruned) keeps it for the next ratio.
    """
    layers = prunable_layers(model)
    key = ("inverse_fisher", block, dampening, len(labels))
    inverses = cache.get(key) if cache is not None else None
    if inverses is None:
        with torch.enable_grad():
            inverses = inverse_fisher_blocks(model, images, labels, block=block, dampening=dampening)
        if cache is not None:
            cache[key] = inverses
    weights, saliencies = [], []
    for layer, inv in zip(layers, inverses):
        w = _blocks(layer.weight.reshape(-1), block)
        d = torch.diagonal(inv, dim1=1, dim2=2).clamp_min(1e-20)
        s = w * w / (2 * d)
        valid = _blocks(torch.ones(layer.weight.numel()), block).bool()
        s[~valid] = float("inf")  # padding is never pruned
        weights.append(w)
        saliencies.append(s)
    flat = torch.cat([s.reshape(-1) for s in saliencies])
    total = sum(layer.weight.numel() for layer in layers)
    k = int(round(ratio * total))
    if k == 0:
        return {layer: torch.ones_like(layer.weight) for layer in layers}
    threshold = torch.kthvalue(flat, k).values
    masks = {}
    eye = torch.eye(block)
    for layer, inv, w, s in zip(layers, inverses, weights, saliencies):
        pruned = (s <= threshold).float()  # (nb, B)
        # Joint OBS update per block: solve F^-1[Q,Q] z_Q = w_Q (identity rows outside Q keep z = 0 there).
        m = pruned.unsqueeze(-1)
        system = m * inv * m.transpose(1, 2) + eye * (1 - m)
        z = torch.linalg.solve(system, (w * pruned).unsqueeze(-1))
        updated = (w - (inv @ z).squeeze(-1)) * (1 - pruned)
        n = layer.weight.numel()
        layer.weight.copy_(updated.reshape(-1)[:n].reshape(layer.weight.shape))
        masks[layer] = (1 - pruned).reshape(-1)[:n].reshape(layer.weight.shape)
    return masks
