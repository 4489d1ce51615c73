"""Predicted latency and memory of a candidate, from its parent's exported graph.

Latency: targets that can be measured (the CPU runtimes) carry a kernel-level
model fitted on this machine's measurements (:mod:`edgecompress.costmodel.latency`):
one regressor per kernel family over the kernel's configuration and
precision, summed over the graph's kernels (:mod:`edgecompress.costmodel.kernels`) plus
the runtime's per-inference and per-kernel cost. Targets that cannot be
measured here (Jetson) use a roofline per kernel, ``max(compute, memory
traffic)`` with the target's peak throughput for the precision scaled by a
per-kernel-kind efficiency, plus a fixed dispatch cost per conv/linear kernel
(TensorRT fuses the rest into them); the numbers and their sources live in
the target's TOML. A sparsity pattern the target lists in ``sparse_kernels``
(2:4 on Ampere's sparse tensor cores) doubles the math rate of dense conv,
1x1 and linear kernels at fp16/int8 and stores half the weights plus 2-bit
indices; the dispatch cost is unchanged, which is why small models gain far
less than 2x (NVIDIA gives 1.24-1.47x for ResNet-50 on the AGX Orin's DLA). Unstructured
sparsity changes nothing on dense kernels; channel pruning shrinks every
kernel's channels.

A kernel model fitted on another machine (or on one it does not name, as the
shipped ones) is rescaled here by the target's active device calibration
(:mod:`edgecompress.costmodel.devicecal`: measured / predicted on reference networks
timed on this machine), which ``plan`` and ``build`` activate before
planning; :func:`describe` says which calibration was applied.

Memory: weights at the precision, plus the peak of the activations alive at
once over the execution order, plus the runtime's own overhead.
"""

from __future__ import annotations

import dataclasses

from edgecompress.costmodel.devicecal import active_calibration
from edgecompress.costmodel.kernels import MAC_KINDS, ModelGraph
from edgecompress.targets import Target

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclasses.dataclass(frozen=True)
class CostPrediction:
    latency_ms: float
    memory_mb: float  # weights + peak activations + runtime overhead
    weights_mb: float
    macs: int
    params: int


SPARSE_KINDS = ("conv", "pointwise", "linear")


def roofline_ms(graph: ModelGraph, target: Target, precision: str, *, sparse: bool = False) -> float:
    model = target.latency
    peak_ops = target.peak_gops[precision] * 1e9
    efficiency = model.int8_efficiency if precision == "int8" else model.efficiency
    bandwidth = target.memory_bandwidth_gbs * 1e9
    total_s = model.overhead_ms / 1e3
    for k in graph.kernels:
        if k.kind not in MAC_KINDS:
            continue  # fused into the conv/linear kernels by TensorRT
        compute_s = 2 * k.macs / (peak_ops * efficiency[k.kind])
        weight_bytes = k.weights * BYTES[precision]
        if sparse and k.kind in SPARSE_KINDS:
            compute_s /= 2.0
            weight_bytes = k.weights * (BYTES[precision] / 2 + 1 / 8)  # half the values + 2-bit index each
        traffic = weight_bytes + (k.in_elements + k.out_elements) * BYTES[precision]
        total_s += max(compute_s, traffic / bandwidth) + model.per_layer_us / 1e6
    return total_s * 1e3


def predict_cost(graph: ModelGraph, target: Target, precision: str, *, channel_keep: float = 1.0,
                 sparse_pattern: str | None = None) -> CostPrediction:
    graph = graph.pruned(channel_keep)
    sparse = sparse_pattern is not None and sparse_pattern in target.sparse_kernels and precision in ("fp16", "int8")
    kernel_model = target.kernel_model()
    if kernel_model is not None and precision in kernel_model.composition:
        latency_ms = kernel_model.predict_ms(graph, precision)
        calibration = active_calibration(target.name)
        if calibration is not None:
            latency_ms *= calibration.scale(precision)
    else:
        latency_ms = roofline_ms(graph, target, precision, sparse=sparse)
    weight_bytes = sum(k.weights * (BYTES[precision] / 2 + 1 / 8 if sparse and k.kind in SPARSE_KINDS else BYTES[precision])
                       for k in graph.kernels)
    weights_mb = weight_bytes / 1e6
    return CostPrediction(
        latency_ms=latency_ms,
        memory_mb=weights_mb + graph.peak_activation_elements * BYTES[precision] / 1e6 + target.runtime_overhead_mb,
        weights_mb=weights_mb,
        macs=graph.macs,
        params=graph.params,
    )


def fit_roofline(target: Target, samples: list[tuple[ModelGraph, str, str | None, float]]):
    """Refit the roofline's fixed costs and per-kernel efficiencies to measurements.

    ``samples``: (graph as run, precision, sparse pattern or None, measured median ms). Least squares on log
    latency over overhead_ms, per_layer_us and the efficiencies (int8's too where int8 was measured); the
    peaks and bandwidth stay the data sheet's. Returns the new LatencyModel and the RMS log error.
    """
    import dataclasses as dc

    import numpy as np
    from scipy.optimize import least_squares

    from edgecompress.targets import KERNEL_KINDS

    kinds = list(KERNEL_KINDS)
    lat = target.latency
    fit_int8 = any(p == "int8" for _, p, _, _ in samples) and bool(lat.int8_efficiency)

    def model_of(p):
        return dc.replace(lat, overhead_ms=float(p[0]), per_layer_us=float(p[1]),
                          efficiency={k: float(v) for k, v in zip(kinds, p[2:6])},
                          int8_efficiency={k: float(v) for k, v in zip(kinds, p[6:10])} if fit_int8 else lat.int8_efficiency)

    def residuals(p):
        t = dc.replace(target, latency=model_of(p))
        return [np.log(roofline_ms(g, t, prec, sparse=bool(sp) and sp in t.sparse_kernels) / ms) for g, prec, sp, ms in samples]

    x0 = [lat.overhead_ms, lat.per_layer_us, *[lat.efficiency[k] for k in kinds]]
    lo, hi = [0.0, 0.0] + [1e-3] * 4, [10.0, 1000.0] + [1.0] * 4
    if fit_int8:
        x0 += [lat.int8_efficiency[k] for k in kinds]
        lo, hi = lo + [1e-3] * 4, hi + [1.0] * 4
    result = least_squares(residuals, np.clip(x0, lo, hi), bounds=(lo, hi))
    return model_of(result.x), float(np.sqrt(np.mean(np.square(result.fun))))


def describe(target: Target, precision: str) -> str:
    """One line on what predicts ``target``'s latency at ``precision`` (for reports)."""
    kernel_model = target.kernel_model()
    if kernel_model is not None and precision in kernel_model.composition:
        info = kernel_model.info
        fit = kernel_model.composition[precision]
        return (f"kernel-level model fitted on {info.get('date', '?')} by `{info.get('command', 'edgecompress targets profile')}` "
                f"({info.get('runtime', target.runtime_name)} {info.get('runtime_version', '?')}, {fit.get('networks', '?')} "
                f"profiled networks, {fit.get('mape', float('nan')) * 100:.0f}% mean error on them); "
                + _describe_calibration(target, kernel_model, precision))
    return f"roofline per kernel from {target.path.name} (peak throughput, bandwidth and efficiencies; sources there)"


def _describe_calibration(target: Target, kernel_model, precision: str) -> str:
    calibration = active_calibration(target.name)
    if calibration is None:
        machine = kernel_model.info.get("machine")
        fitted_on = f"{machine['cpu']}, {machine['logical_cores']} cores" if isinstance(machine, dict) else "an unknown machine"
        return f"fitted on {fitted_on}; no device calibration applied (`edgecompress targets calibrate {target.name}`)"
    networks = len({m.network for m in calibration.measurements if m.precision == precision})
    here = "the machine it was fitted on, " if calibration.fitted_on_this_machine else ""
    return (f"rescaled x{calibration.scale(precision):.2f} for {precision} by calibration on this machine ({here}"
            f"{calibration.where()}; median measured / predicted over {networks} reference networks "
            f"on {calibration.date}; cached {calibration.cache_path})")
