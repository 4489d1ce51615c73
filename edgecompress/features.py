"""Meta-features of a (model, pruning method, ratio) candidate, from the model alone: no compression.

Each feature is documented in one line in FEATURE_DOCS; the meta-dataset and the
meta-predictor use exactly these names.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgecompress.layers import profile_layers

FEATURE_DOCS = {
    "f_params": "parameter count of the uncompressed model",
    "f_flops": "FLOPs of one forward pass at the dataset's resolution (2 x MACs)",
    "f_depth": "number of conv and linear layers",
    "f_n_conv": "number of dense (groups=1, k>1) convolutions",
    "f_n_depthwise": "number of depthwise convolutions",
    "f_n_pointwise": "number of 1x1 convolutions",
    "f_n_linear": "number of linear layers",
    "f_n_norm": "number of normalisation layers (BatchNorm, LayerNorm, GroupNorm)",
    "f_share_depthwise_macs": "share of MACs in depthwise convolutions",
    "f_share_pointwise_macs": "share of MACs in 1x1 convolutions",
    "f_share_depthwise_params": "share of weights in depthwise convolutions",
    "f_w_abs_q10": "10th percentile of |w| over all conv/linear weights",
    "f_w_abs_q50": "median of |w| over all conv/linear weights",
    "f_w_abs_q90": "90th percentile of |w| over all conv/linear weights",
    "f_w_kurtosis_mean": "mean over layers of the excess kurtosis of the layer's weights (outliers hurt int8)",
    "f_w_kurtosis_max": "largest per-layer excess kurtosis",
    "f_w_range_ratio_max": "largest per-layer max|w| / std(w) (per-tensor int8 range pressure)",
    "f_ratio": "pruning ratio asked for (0 for none)",
    "f_method_unstructured": "1 if the method zeroes single weights",
    "f_method_channel": "1 if the method removes whole channels",
    "f_method_local": "1 if the ratio applies per layer rather than over the whole model",
    "f_mass_below_global": "share of total |w| mass in the weights a global magnitude threshold at the ratio removes",
    "f_mass_below_local": "mean over layers of the |w| mass share a per-layer threshold at the ratio removes",
    "f_channel_l1_mass_pruned": "mean over layers of the L1-norm share of the ratio's weakest output channels",
    "f_channel_keep_macs": "predicted share of MACs left after channel pruning at the ratio (1 otherwise)",
    "f_precision_bits": "bits of the precision (32, 16, 8)",
    "f_num_classes": "number of classes in the dataset",
    "f_image_size": "input resolution (square)",
    "f_train_samples": "training samples available for fine-tuning",
    "f_parent_accuracy": "top-1 accuracy of the uncompressed model on the test split",
}


def _kurtosis(x: np.ndarray) -> float:
    x = x - x.mean()
    var = float((x**2).mean())
    return float((x**4).mean() / var**2 - 3.0) if var > 0 else 0.0


def model_features(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """The method-independent part (cache it per model)."""
    layers = profile_layers(model, input_shape)
    macs = sum(l.macs for l in layers) or 1
    params_w = sum(l.weights for l in layers) or 1
    weights = [m.weight.detach().float().numpy().ravel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    allw = np.abs(np.concatenate(weights))
    kurt = [_kurtosis(w) for w in weights if w.size > 8]
    ranges = [float(np.abs(w).max() / (w.std() + 1e-12)) for w in weights if w.size > 8]
    norm_types = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    return {
        "f_params": sum(p.numel() for p in model.parameters()),
        "f_flops": 2 * macs,
        "f_depth": len(layers),
        "f_n_conv": sum(l.kind == "conv" for l in layers),
        "f_n_depthwise": sum(l.kind == "depthwise" for l in layers),
        "f_n_pointwise": sum(l.kind == "pointwise" for l in layers),
        "f_n_linear": sum(l.kind == "linear" for l in layers),
        "f_n_norm": sum(isinstance(m, norm_types) for m in model.modules()),
        "f_share_depthwise_macs": sum(l.macs for l in layers if l.kind == "depthwise") / macs,
        "f_share_pointwise_macs": sum(l.macs for l in layers if l.kind == "pointwise") / macs,
        "f_share_depthwise_params": sum(l.weights for l in layers if l.kind == "depthwise") / params_w,
        "f_w_abs_q10": float(np.quantile(allw, 0.1)),
        "f_w_abs_q50": float(np.quantile(allw, 0.5)),
        "f_w_abs_q90": float(np.quantile(allw, 0.9)),
        "f_w_kurtosis_mean": float(np.mean(kurt)),
        "f_w_kurtosis_max": float(np.max(kurt)),
        "f_w_range_ratio_max": float(np.max(ranges)),
    }


def method_features(model: nn.Module, kind: str, ratio: float, local: bool) -> dict:
    """Cheap sensitivity proxies for pruning ``model`` at ``ratio`` with a method of ``kind``."""
    weights = [m.weight.detach().float().abs() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    flat = torch.cat([w.ravel() for w in weights])
    total = float(flat.sum()) or 1.0
    if ratio > 0:
        threshold = torch.quantile(flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:1_000_000]], ratio)
        below_global = float(flat[flat <= threshold].sum()) / total
        below_local = float(np.mean([
            float(w.ravel()[w.ravel() <= torch.quantile(w.ravel(), ratio)].sum()) / (float(w.sum()) or 1.0)
            for w in weights if w.numel() > 1
        ]))
        channel = []
        for w in weights:
            if w.shape[0] > 1:
                norms = w.reshape(w.shape[0], -1).sum(1).sort().values
                k = int(round(ratio * len(norms)))
                channel.append(float(norms[:k].sum() / (norms.sum() or 1.0)))
        channel_mass = float(np.mean(channel)) if channel else 0.0
    else:
        below_global = below_local = channel_mass = 0.0
    keep = 1.0 - ratio
    return {
        "f_ratio": ratio,
        "f_method_unstructured": int(kind == "unstructured"),
        "f_method_channel": int(kind == "channel"),
        "f_method_local": int(local),
        "f_mass_below_global": below_global,
        "f_mass_below_local": below_local,
        "f_channel_l1_mass_pruned": channel_mass,
        "f_channel_keep_macs": keep * keep if kind == "channel" else 1.0,
    }
