"""Predicted latency and memory of a candidate, from its parent's layer profile.

Per layer: a roofline, ``max(compute, memory traffic)``, with the target's
peak throughput for the precision scaled by a per-kernel-kind efficiency, plus
a fixed dispatch cost per layer; the model adds a per-inference overhead. The
numbers live in the target's TOML. Channel pruning is modelled by shrinking
each layer's channels; unstructured sparsity changes nothing on dense
kernels. A sparsity pattern the target lists in ``sparse_kernels`` (2:4 on
Ampere's sparse tensor cores) doubles the math rate of dense conv, 1x1 and
linear layers at fp16/int8 and stores half the weights plus 2-bit indices;
the per-layer dispatch cost is unchanged, which is why small models gain far
less than 2x (FACTS.md: 1.24-1.47x for ResNet-50 on the DLA).

This is the spine's model; issue 4 replaces the roofline with per-kernel
regressors fitted on measurements.
"""

from __future__ import annotations

import dataclasses

from edgecompress.layers import LayerProfile
from edgecompress.targets import Target

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclasses.dataclass(frozen=True)
class CostPrediction:
    latency_ms: float
    memory_mb: float  # weights + peak activations + runtime overhead
    weights_mb: float
    macs: int
    params: int


def pruned_layers(layers: list[LayerProfile], channel_keep: float) -> list[LayerProfile]:
    """Layers after removing ``1 - channel_keep`` of every prunable layer's channels.

    The image input (3 channels) and the classifier's outputs are kept, as
    torch-pruning does with the classifier in ``ignored_layers``.
    """
    if channel_keep >= 1.0:
        return layers
    out = []
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        k_in = 1.0 if layer.in_channels <= 3 else channel_keep
        k_out = 1.0 if i == last else channel_keep
        if layer.kind == "depthwise":
            scale_macs = scale_w = k_out
        else:
            scale_macs = scale_w = k_in * k_out
        out.append(dataclasses.replace(
            layer,
            in_channels=max(1, round(layer.in_channels * k_in)),
            out_channels=max(1, round(layer.out_channels * k_out)),
            macs=int(layer.macs * scale_macs),
            weights=int(layer.weights * scale_w),
            in_elements=int(layer.in_elements * k_in),
            out_elements=int(layer.out_elements * k_out),
        ))
    return out


SPARSE_KINDS = ("conv", "pointwise", "linear")


def predict_cost(layers: list[LayerProfile], target: Target, precision: str, *, channel_keep: float = 1.0,
                 sparse_pattern: str | None = None) -> CostPrediction:
    layers = pruned_layers(layers, channel_keep)
    sparse = sparse_pattern is not None and sparse_pattern in target.sparse_kernels and precision in ("fp16", "int8")
    model = target.latency
    peak_ops = target.peak_gops[precision] * 1e9
    efficiency = model.int8_efficiency if precision == "int8" else model.efficiency
    weight_bytes = BYTES[precision]
    act_bytes = BYTES[precision]
    bandwidth = target.memory_bandwidth_gbs * 1e9
    total_s = model.overhead_ms / 1e3
    peak_act = 0
    for layer in layers:
        compute_s = 2 * layer.macs / (peak_ops * efficiency[layer.kind])
        layer_weight_bytes = layer.weights * weight_bytes
        if sparse and layer.kind in SPARSE_KINDS:
            compute_s /= 2.0
            layer_weight_bytes = layer.weights * (weight_bytes / 2 + 1 / 8)  # half the values + 2-bit index each
        traffic = layer_weight_bytes + (layer.in_elements + layer.out_elements) * act_bytes
        total_s += max(compute_s, traffic / bandwidth) + model.per_layer_us / 1e6
        peak_act = max(peak_act, (layer.in_elements + layer.out_elements) * act_bytes)
    params = sum(l.weights for l in layers)
    weights_mb = params * weight_bytes / 1e6
    return CostPrediction(
        latency_ms=total_s * 1e3,
        memory_mb=weights_mb + peak_act / 1e6 + target.runtime_overhead_mb,
        weights_mb=weights_mb,
        macs=sum(l.macs for l in layers),
        params=params,
    )
