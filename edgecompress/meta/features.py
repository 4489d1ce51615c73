"""Meta-features of a (model, pruning method, ratio, precision) candidate, without compressing it.

Each feature is documented in one line in FEATURE_DOCS; the meta-dataset and the
meta-predictor use exactly these names. :class:`Featurizer` does the per-model
work once (weight statistics, the parent's outputs on the calibration images),
so the features of every candidate of a model cost a few sorts and, for the
one-shot proxies, one forward pass each.

The one-shot proxies (``f_oneshot_*``) are the cheap sensitivity measurements
the meta-compression literature calls zero-cost proxies: the candidate's
pruning mask is applied with the method's own code, BatchNorm statistics
are re-estimated on the calibration images, int8 or fp16 arithmetic is
simulated in torch (per-channel symmetric int8 weights, per-tensor min/max
activations, as NNCF's defaults do), and the result is compared with the
parent on ``ONESHOT_SAMPLES`` calibration images. No fine-tuning, no export,
no runtime: tens of milliseconds per candidate for the zoo.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from torch import nn

from edgecompress.costmodel.layers import profile_layers

FEATURES_VERSION = 8
# What each version changed, by group ("model": Featurizer.model_features, "probe": probe_features); a refresh of a
# row from a version listed here recomputes the groups changed since and keeps the rest (the one-shot proxies, its
# cost); an older row is recomputed whole.
#   6: a linear layer's MACs count every row it computes (MobileViT's and EdgeNeXt's token MLPs): f_flops, MAC shares.
#   7: f_probe_agreement, a short fine-tune of the one-shot candidate at high ratios.
#   8: the probe seeds torch's generator (dropout in training mode, GhostNet's head, drew from it unseeded).
VERSION_CHANGES = {6: ("model",), 7: ("probe",), 8: ("probe",)}
# The probe: PROBE_STEPS steps of plain fine-tuning (Adam, cross-entropy, PROBE_BATCH training images, the masks
# kept), then top-1 agreement with the parent on held-out calibration images. Only where the ratio is
# PROBE_MIN_RATIO or more: there the outcome is fine-tuning's to decide (session 15: 81% of the held-out error of
# Fashion-MNIST is at ratios of 0.7 and above, where the one-shot proxies cannot tell a collapse from a recovery),
# and below it the probe would only add planning time.
PROBE_MIN_RATIO = 0.7
PROBE_STEPS = 20
PROBE_BATCH = 64
PROBE_LR = 1e-3
ONESHOT_SAMPLES = 128
NOT_PROBED = {"f_probe_agreement": 1.0}
_BITS = {"fp32": 32, "fp16": 16, "int8": 8}

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
    "f_method_semistructured": "1 if the zeros follow an N:M pattern (2:4)",
    "f_method_lowrank": "1 if layers are factorized into low-rank pairs (the ratio is the share of their MACs removed)",
    "f_method_second_order": "1 if the weights to prune are chosen by loss curvature and the rest updated to compensate (OBS)",
    "f_method_learned": "1 if the mask is learned during fine-tuning (nothing is pruned before it)",
    "f_mass_below_global": "share of total |w| mass in the weights a global magnitude threshold at the ratio removes",
    "f_mass_below_local": "mean over layers of the |w| mass share a per-layer threshold at the ratio removes",
    "f_max_layer_pruned_global": "largest share of one layer's weights under the global threshold (1 = a layer wiped out)",
    "f_channel_l1_mass_pruned": "mean over layers of the L1-norm share of the ratio's weakest output channels",
    "f_channel_keep_macs": "predicted share of MACs left after channel pruning at the ratio (1 otherwise)",
    "f_kept_weights": "share of the parent's conv/linear weights left nonzero in the one-shot pruned model (channel "
                      "pruning of grouped or ghost convolutions keeps a share that does not follow the ratio)",
    "f_precision_bits": "bits of the precision (32, 16, 8)",
    "f_oneshot_agreement": "share of calibration images where the one-shot candidate (mask + simulated precision, no fine-tuning) agrees with the parent's top-1",
    "f_oneshot_logit_rel_err": "relative L2 error of the one-shot candidate's logits against the parent's on the calibration images",
    "f_oneshot_output_spread": "spread of the one-shot candidate's logits over the calibration images (per-class std, "
                               "averaged) against the parent's: 0 when a layer on the only path is pruned away and "
                               "every image gets the same answer, which fine-tuning with fixed masks cannot undo",
    "f_oneshot_classes": "share of the classes the one-shot candidate predicts for at least one calibration image",
    "f_probe_agreement": f"share of held-out calibration images where the pruned candidate, fine-tuned {PROBE_STEPS} "
                         f"steps, agrees with the parent's top-1; 1 below a ratio of {PROBE_MIN_RATIO} (not probed)",
    "f_num_classes": "number of classes in the dataset",
    "f_image_size": "input resolution (square)",
    "f_train_samples": "training samples available for fine-tuning",
    "f_grayscale": "1 if the task's images are grey (three equal channels)",
    "f_images_per_class": "training samples per class",
    "f_parent_accuracy": "top-1 accuracy of the uncompressed model on the test split",
    "f_parent_confidence": "mean top-1 softmax probability of the uncompressed model on the calibration images",
    "f_parent_margin": "mean gap between the uncompressed model's two largest logits on the calibration images "
                       "(a small margin flips under small perturbations)",
}


def _kurtosis(x: np.ndarray) -> float:
    x = x - x.mean()
    var = float((x**2).mean())
    return float((x**4).mean() / var**2 - 3.0) if var > 0 else 0.0


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _mass_share(sorted_cumsum: np.ndarray, ratio: float) -> float:
    k = int(round(ratio * len(sorted_cumsum)))
    return float(sorted_cumsum[k - 1] / sorted_cumsum[-1]) if k > 0 and sorted_cumsum[-1] > 0 else 0.0


class Featurizer:
    """Features of every candidate of one model on one dataset; per-model work is done once."""

    def __init__(self, model: nn.Module, data, parent_accuracy: float):
        self.model = model.eval()
        self.input_shape = data.input_shape
        self.parent_accuracy = float(parent_accuracy)
        self.data_features = {f"f_{k}": v for k, v in data.features().items()}
        calib_images, calib_labels = data.split("calib")
        self.images = torch.from_numpy(calib_images[:ONESHOT_SAMPLES])
        self.labels = torch.from_numpy(calib_labels[:ONESHOT_SAMPLES])
        with torch.no_grad():
            self.parent_logits = model(self.images)
        top2 = self.parent_logits.topk(min(2, self.parent_logits.shape[1]), dim=1).values
        self.parent_features = {
            "f_parent_confidence": float(torch.softmax(self.parent_logits, 1).max(1).values.mean()),
            "f_parent_margin": float((top2[:, 0] - top2[:, -1]).mean()),
        }
        weights = [m.weight.detach().float().abs().numpy() for m in _weighted_layers(model)]
        self._layer_sorted = [np.sort(w.ravel()) for w in weights]
        self._layer_cumsum = [np.cumsum(s, dtype=np.float64) for s in self._layer_sorted]
        flat = np.sort(np.concatenate(self._layer_sorted))
        self._global_sorted, self._global_cumsum = flat, np.cumsum(flat, dtype=np.float64)
        self._channel_cumsum = [
            np.cumsum(np.sort(w.reshape(w.shape[0], -1).sum(1)), dtype=np.float64) for w in weights if w.shape[0] > 1
        ]
        self._weights = max(nonzero_weights(model), 1)
        self._prune_cache = {}  # every one-shot prunes a fresh copy of this model with these images (PruneData.cache)
        self._model_features = None
        self._oneshot = {}  # (method, ratio) -> precision -> proxies; one kept at a time
        self._probe = {}  # (method, ratio) -> probe features; one kept at a time
        self._data = data

    # ------------------------------------------------------------ per model
    def model_features(self) -> dict:
        if self._model_features is None:
            model = self.model
            layers = profile_layers(model, self.input_shape)
            macs = sum(l.macs for l in layers) or 1
            params_w = sum(l.weights for l in layers) or 1
            signed = [m.weight.detach().float().numpy().ravel() for m in _weighted_layers(model)]
            kurt = [_kurtosis(w) for w in signed if w.size > 8]
            ranges = [float(np.abs(w).max() / (w.std() + 1e-12)) for w in signed if w.size > 8]
            norm_types = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
            q = self._global_sorted
            self._model_features = {
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
                "f_w_abs_q10": float(q[int(0.1 * (len(q) - 1))]),
                "f_w_abs_q50": float(q[int(0.5 * (len(q) - 1))]),
                "f_w_abs_q90": float(q[int(0.9 * (len(q) - 1))]),
                "f_w_kurtosis_mean": float(np.mean(kurt)),
                "f_w_kurtosis_max": float(np.max(kurt)),
                "f_w_range_ratio_max": float(np.max(ranges)),
            }
        return self._model_features

    # ------------------------------------------------------------ per method and ratio
    def method_features(self, method_name: str, ratio: float) -> dict:
        """What kind of method it is, and weight-magnitude sensitivity proxies for pruning at ``ratio`` (sorted once,
        O(layers) per ratio)."""
        from edgecompress.compress.methods import get_method

        method = get_method(method_name)
        kind = method.kind
        below_global = below_local = channel_mass = max_layer = 0.0
        if ratio > 0:
            below_global = _mass_share(self._global_cumsum, ratio)
            k = int(round(ratio * len(self._global_sorted)))
            threshold = self._global_sorted[k - 1] if k > 0 else -1.0
            max_layer = max(float(np.searchsorted(s, threshold, side="right")) / len(s) for s in self._layer_sorted)
            below_local = float(np.mean([_mass_share(c, ratio) for c in self._layer_cumsum if len(c) > 1]))
            channel_mass = float(np.mean([_mass_share(c, ratio) for c in self._channel_cumsum])) if self._channel_cumsum else 0.0
        return {
            "f_ratio": ratio,
            "f_method_unstructured": int(kind in ("unstructured", "semi-structured")),
            "f_method_channel": int(kind == "channel"),
            "f_method_local": int(method.local),
            "f_method_semistructured": int(method.sparse_pattern is not None),
            "f_method_lowrank": int(kind == "lowrank"),
            "f_method_second_order": int(method.second_order),
            "f_method_learned": int(method.learned),
            "f_mass_below_global": below_global,
            "f_mass_below_local": below_local,
            "f_max_layer_pruned_global": max_layer,
            "f_channel_l1_mass_pruned": channel_mass,
            "f_channel_keep_macs": (1.0 - ratio) ** 2 if kind == "channel" else 1.0,
        }

    # ------------------------------------------------------------ one-shot proxies
    def _one_shot_pruned(self, method_name: str, ratio: float) -> nn.Module:
        from edgecompress.compress.methods import PruneData, get_method

        method = get_method(method_name)
        model = copy.deepcopy(self.model)
        if method.kind != "none":
            example = torch.zeros(self.input_shape)
            model = method.finalize(method.prepare(model, ratio, example, PruneData(self.images, self.labels,
                                                                                    cache=self._prune_cache)), example)
            recalibrate_batchnorm(model, self.images)
        return model.eval()

    # ------------------------------------------------------------ the fine-tuning probe
    @staticmethod
    def probed(method_name: str, ratio: float) -> bool:
        return method_name != "none" and ratio >= PROBE_MIN_RATIO

    def probe_features(self, method_name: str, ratio: float, pruned: nn.Module | None = None) -> dict:
        """The probe's features of a (method, ratio), one set for its three precisions; ``pruned``: its one-shot
        model when there is one at hand (else pruned again)."""
        key = (method_name, ratio)
        if key not in self._probe:
            value = NOT_PROBED
            if self.probed(method_name, ratio):
                value = self._run_probe(pruned if pruned is not None else self._one_shot_pruned(method_name, ratio))
            self._probe = {key: value}
        return dict(self._probe[key])

    @functools.cached_property
    def _probe_set(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(training images, their labels, held-out images, the parent's top-1 on them): the same for every probe of
        this model, made at the first."""
        train_x, train_y = self._data.split("train")
        calib_x = self._data.split("calib")[0]
        # Held out from what the pruning saw (the first ONESHOT_SAMPLES); a task with fewer probes on those.
        held = calib_x[ONESHOT_SAMPLES:ONESHOT_SAMPLES + 256]
        held = torch.from_numpy(held) if len(held) >= 32 else self.images
        with torch.no_grad():
            reference = self.model(held).argmax(1)
        return torch.from_numpy(train_x[:2048]), torch.from_numpy(train_y[:2048]).long(), held, reference

    def _run_probe(self, pruned: nn.Module) -> dict:
        import torch.nn.functional as F

        train_x, train_y, held, reference = self._probe_set
        model = copy.deepcopy(pruned).train()
        masks = [(m, m.weight.detach() != 0) for m in _weighted_layers(model)]
        opt = torch.optim.Adam(model.parameters(), lr=PROBE_LR)
        gen = torch.Generator().manual_seed(0)
        # Dropout in training mode (GhostNet's head) draws from torch's global generator: seeded here, and the
        # caller's state restored, so that a probe does not depend on what ran before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for _ in range(PROBE_STEPS):
                idx = torch.randint(0, len(train_x), (min(PROBE_BATCH, len(train_x)),), generator=gen)
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m, mask in masks:
                        m.weight.mul_(mask)
        model.eval()
        with torch.no_grad():
            return {"f_probe_agreement": float((model(held).argmax(1) == reference).float().mean())}

    def _one_shot_all_precisions(self, method_name: str, ratio: float) -> dict[str, dict]:
        """The one-shot proxies of every precision of a (method, ratio): one pruning, and one fp32 pass that also
        records the int8 activation ranges; fp16 and int8 are simulated on that copy and undone (no copy each);
        the fine-tuning probe on the same pruned model."""
        model = self._one_shot_pruned(method_name, ratio)
        self.probe_features(method_name, ratio, model)
        kept = {"f_kept_weights": nonzero_weights(model) / self._weights}
        with torch.no_grad():
            ranges = observed_ranges(model)
            with ranges:
                out = {"fp32": {**kept, **oneshot_proxies(model(self.images), self.parent_logits)}}
            for precision in ("fp16", "int8"):
                with simulated(model, precision, ranges.ranges):
                    out[precision] = {**kept, **oneshot_proxies(model(self.images), self.parent_logits)}
        return out

    def oneshot_features(self, method_name: str, ratio: float, precision: str) -> dict:
        key = (method_name, ratio)
        if key not in self._oneshot:  # the precisions of a (method, ratio) come together
            self._oneshot = {key: self._one_shot_all_precisions(method_name, ratio)}
        return dict(self._oneshot[key][precision])

    # ------------------------------------------------------------ everything
    def candidate_features(self, method_name: str, ratio: float, precision: str) -> dict:
        return {
            **self.model_features(),
            **self.method_features(method_name, ratio),
            "f_precision_bits": _BITS[precision],
            **self.oneshot_features(method_name, ratio, precision),
            **self.probe_features(method_name, ratio),
            **self.data_features,
            "f_images_per_class": self.data_features["f_train_samples"] / max(self.data_features["f_num_classes"], 1),
            "f_parent_accuracy": self.parent_accuracy,
            **self.parent_features,
        }


FP16_MAX = 65504.0


def oneshot_proxies(logits: torch.Tensor, parent_logits: torch.Tensor) -> dict:
    """The one-shot features of a candidate's logits against its parent's on the same images.

    Logits that overflowed (simulated fp16 of a model pruned hard: 3 of 3,057 rows) count at fp16's largest value,
    what saturating arithmetic gives, and NaN as 0: every feature stays a number (ridge takes no NaN). Norms and
    spreads are taken in float64: finite float32 logits near its largest value (a model whose fine-tuning diverged,
    semnasnet_050 at local magnitude 0.9 on the digits) made the float32 norm inf."""
    logits = torch.nan_to_num(logits.double(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    parent_logits = parent_logits.double()
    top1 = logits.argmax(1)
    return {
        "f_oneshot_agreement": float((top1 == parent_logits.argmax(1)).float().mean()),
        "f_oneshot_logit_rel_err": float(torch.linalg.norm(logits - parent_logits)
                                         / (torch.linalg.norm(parent_logits) + 1e-12)),
        "f_oneshot_output_spread": float(logits.std(0).mean() / (parent_logits.std(0).mean() + 1e-12)),
        "f_oneshot_classes": len(torch.unique(top1)) / logits.shape[1],
    }


def nonzero_weights(model: nn.Module) -> int:
    """Nonzero weights of the model's conv and linear layers (what pruning of any kind leaves)."""
    return sum(int(torch.count_nonzero(m.weight)) for m in _weighted_layers(model))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Re-estimate BatchNorm statistics after pruning (a cheap stand-in for the first steps of fine-tuning)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(0, len(images), 32):
        model(images[i:i + 32])
    model.eval()
    for m, momentum in saved:
        m.momentum = momentum


class observed_ranges:
    """While active, record the (min, max) of every conv/linear layer's input over the forward passes made."""

    def __init__(self, model: nn.Module):
        self.layers = _weighted_layers(model)
        self.ranges: dict[nn.Module, list[float]] = {}
        self._hooks = []

    def _observe(self, module, inp):
        lo, hi = float(inp[0].min()), float(inp[0].max())
        old = self.ranges.setdefault(module, [lo, hi])
        old[0], old[1] = min(old[0], lo), max(old[1], hi)

    def __enter__(self):
        self._hooks = [layer.register_forward_pre_hook(self._observe) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


class simulated:
    """While active, ``model`` computes as the runtime would at ``precision``, in fp32 torch (see simulate_precision);
    on exit its weights and hooks are as they were. int8 needs the layers' input ``ranges`` (observed_ranges)."""

    def __init__(self, model: nn.Module, precision: str, ranges: dict | None = None):
        if precision not in _BITS:
            raise ValueError(f"unknown precision {precision!r}")
        self.layers, self.precision, self.ranges = _weighted_layers(model), precision, ranges or {}
        self._saved, self._hooks = [], []

    def __enter__(self):
        if self.precision == "fp32":
            return self
        self._saved = [(layer, layer.weight.data) for layer in self.layers]
        for layer in self.layers:
            w = layer.weight.data
            if self.precision == "fp16":
                layer.weight.data = w.half().float()
                self._hooks.append(layer.register_forward_pre_hook(lambda _m, inp: (inp[0].half().float(),)))
                continue
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127.0
            layer.weight.data = torch.clamp(torch.round(w / scale), -127, 127) * scale
            if layer in self.ranges:
                self._hooks.append(layer.register_forward_pre_hook(self._fake_quant))
        return self

    def _fake_quant(self, module, inp):
        lo, hi = self.ranges[module]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-12) / 255.0
        zero = round(-lo / scale)
        q = torch.clamp(torch.round(inp[0] / scale) + zero, 0, 255)
        return ((q - zero) * scale,)

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        for layer, weight in self._saved:
            layer.weight.data = weight
        self._saved, self._hooks = [], []


def simulate_precision(model: nn.Module, precision: str, calib_images: torch.Tensor) -> nn.Module:
    """Make ``model`` (modified in place, for good) compute as the runtime would at ``precision``, in fp32 torch.

    int8: per-output-channel symmetric int8 weights and per-tensor asymmetric uint8
    inputs to every conv/linear, ranges from min/max on ``calib_images``.
    fp16: weights and conv/linear inputs rounded to half precision.
    """
    ranges = observed_ranges(model)
    if precision == "int8":
        with torch.no_grad(), ranges:
            model.eval()(calib_images)
    simulated(model, precision, ranges.ranges).__enter__()
    return model
