"""Layer-wise profile of a torch model: what each conv/linear layer computes.

One forward pass with hooks gives, per layer, the shapes, MACs and weight
count. The latency/memory model, the zoo manifest and the meta-features all
read this one profile.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    name: str
    kind: str  # "conv", "depthwise", "pointwise", "linear"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    in_hw: int
    out_hw: int
    macs: int
    weights: int
    in_elements: int
    out_elements: int

    @property
    def flops(self) -> int:
        return 2 * self.macs


def _conv_kind(m: nn.Conv2d) -> str:
    if m.groups > 1 and m.groups == m.in_channels:
        return "depthwise"
    if m.kernel_size == (1, 1):
        return "pointwise"
    return "conv"


@torch.no_grad()
def profile_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerProfile]:
    records: list[LayerProfile] = []
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                weights = module.weight.numel()
                out_hw = int(output.shape[-1])
                macs = int(output.numel() // output.shape[0]) * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
                records.append(LayerProfile(
                    name=name, kind=_conv_kind(module), in_channels=module.in_channels,
                    out_channels=module.out_channels, kernel=module.kernel_size[0],
                    stride=module.stride[0], groups=module.groups, in_hw=int(x.shape[-1]),
                    out_hw=out_hw, macs=macs, weights=weights,
                    in_elements=int(x.numel() // x.shape[0]), out_elements=int(output.numel() // output.shape[0]),
                ))
            elif isinstance(module, nn.Linear):
                # A linear layer over tokens (a transformer's, or a channels-last MLP's) computes once per row.
                # Rows per image: the model's batch, not the layer's first axis (MobileViT folds patches into it).
                rows = max(1, x.numel() // (input_shape[0] * module.in_features))
                records.append(LayerProfile(
                    name=name, kind="linear", in_channels=module.in_features,
                    out_channels=module.out_features, kernel=1, stride=1, groups=1, in_hw=1, out_hw=1,
                    macs=rows * module.in_features * module.out_features, weights=module.weight.numel(),
                    in_elements=rows * module.in_features, out_elements=rows * module.out_features,
                ))
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return records


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def total_macs(layers: list[LayerProfile]) -> int:
    return sum(l.macs for l in layers)
