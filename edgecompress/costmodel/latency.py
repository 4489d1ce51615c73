"""Kernel-level latency models for targets that can be measured (nn-Meter's recipe).

A model's latency on a runtime is the sum of its kernels' latencies plus what
the runtime adds per inference and per kernel (:func:`compose`):

    latency = a + sum(max(c * kernel_latency(k) + b, floor) for k in kernels)

``kernel_latency`` is a LightGBM regressor per kernel family (conv, depthwise,
pointwise, linear, pool, eltwise) over the kernel's configuration
(:data:`FEATURES`: channels, spatial size, kernel size, stride, groups, fused
activation, MACs, weights, activations in and out, precision), fitted on the
log of the time the runtime's profiler gave that kernel over a reference
roofline (:func:`baseline_us`). ``(a, b, c)`` per precision come from the
whole networks' latencies, by robust least squares on relative error.

``profile_target`` measures both on the machine where it runs, on random
networks in the style of the zoo (:func:`random_network`) at every precision:
the runtime's own profiler (ONNX Runtime's trace, OpenVINO's performance
counters) times every executed node in context, :func:`attribute` assigns the
nodes to our kernels by name, and the network is timed whole without the
profiler. Kernels are timed in context, not one by one in tiny networks: at
these sizes a kernel takes a few microseconds under a per-call cost ten times
larger, and subtracting the two leaves noise. It appends each
measurement to a JSON-lines file as it goes, so an interrupted profile resumes
where it stopped. :func:`fit` turns the measurements into a
:class:`KernelLatencyModel`, saved as LightGBM text files plus one JSON (no
pickles) in the directory the target's TOML names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from edgecompress.core.errors import EdgecompressError
from edgecompress.core.fsutil import append_jsonl, read_jsonl, write_json, write_text
from edgecompress.costmodel.kernels import ACT_CODES, Kernel, ModelGraph, graph_kernels

FAMILIES = {"conv": "conv", "depthwise": "depthwise", "pointwise": "pointwise", "linear": "linear",
            "pool": "pool", "global_pool": "pool", "eltwise": "eltwise", "concat": "eltwise"}
KIND_CODES = {k: i for i, k in enumerate(FAMILIES)}
PRECISION_CODES = {"fp32": 0, "fp16": 1, "int8": 2}
FEATURES = ("precision", "kind", "in_channels", "out_channels", "kernel", "stride", "groups", "in_hw", "out_hw",
            "act", "log_macs", "log_weights", "log_in_elements", "log_out_elements")
FORMAT = 2
# The reference each regressor corrects: a plain roofline (50 GMAC/s, 20 GB/s of fp32 activation traffic,
# 1 us). Weights are left out of the traffic: at batch 1 a small model's weights stay in cache between
# inferences. The regressors learn the log of measured / reference, so they stay bounded where the
# configuration is new and the reference carries the scaling with size.
REFERENCE_GMACS, REFERENCE_GBS, REFERENCE_US = 50.0, 20.0, 1.0


def baseline_us(kernels: Iterable[Kernel]) -> np.ndarray:
    return np.array([k.macs / (REFERENCE_GMACS * 1e3) + 4 * (k.in_elements + k.out_elements) / (REFERENCE_GBS * 1e3)
                     + REFERENCE_US for k in kernels])


def kernel_features(kernels: Iterable[Kernel], precision: str) -> np.ndarray:
    rows = []
    for k in kernels:
        rows.append([
            PRECISION_CODES[precision], KIND_CODES[k.kind], k.in_channels, k.out_channels, k.kernel, k.stride,
            k.groups, k.in_hw, k.out_hw, ACT_CODES.get(k.act, len(ACT_CODES)),
            math.log1p(k.macs), math.log1p(k.weights), math.log1p(k.in_elements), math.log1p(k.out_elements),
        ])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES))


@dataclasses.dataclass
class KernelLatencyModel:
    boosters: dict  # family -> lightgbm.Booster (log microseconds)
    composition: dict  # precision -> {"a_ms", "b_us", "c"}
    info: dict  # provenance: runtime version, date, sample counts, fit errors

    def kernel_us(self, kernels: list[Kernel], precision: str) -> np.ndarray:
        if not kernels:
            return np.zeros(0)
        feats = kernel_features(kernels, precision)
        base = baseline_us(kernels)
        correction = np.full(len(kernels), self.info.get("fallback_log_correction", 0.0))
        families = np.array([FAMILIES[k.kind] for k in kernels])
        for family in set(families):
            if family in self.boosters:
                idx = np.flatnonzero(families == family)
                correction[idx] = self.boosters[family].predict(feats[idx])
        return base * np.exp(correction)

    def predict_ms(self, graph: ModelGraph, precision: str) -> float:
        if precision not in self.composition:
            raise EdgecompressError(f"the kernel latency model has no {precision} fit; run `edgecompress targets profile`")
        c = self.composition[precision]
        return compose(self.kernel_us(list(graph.kernels), precision), c["a_ms"], c["b_us"], c["c"])

    def save(self, directory: Path) -> None:
        for family, booster in self.boosters.items():
            write_text(directory / f"{family}.txt", booster.model_to_string())
        write_json(directory / "model.json", {"format": FORMAT, "features": list(FEATURES),
                                              "families": sorted(self.boosters), "composition": self.composition,
                                              "info": self.info})

    @classmethod
    def load(cls, directory: Path) -> KernelLatencyModel:
        import lightgbm as lgb

        meta_path = directory / "model.json"
        if not meta_path.exists():
            raise EdgecompressError(f"no kernel latency model in {directory}; run `edgecompress targets profile`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or tuple(meta["features"]) != FEATURES:
            raise EdgecompressError(f"kernel latency model in {directory} is from another version; "
                                    "run `edgecompress targets profile` again")
        boosters = {f: lgb.Booster(model_str=(directory / f"{f}.txt").read_text()) for f in meta["families"]}
        return cls(boosters, meta["composition"], meta["info"])


KERNEL_FLOOR_US = 0.2


def compose(kernel_us: np.ndarray, a_ms: float, b_us: float, c: float) -> float:
    """Model latency (ms) from per-kernel predictions: ``a + sum(max(c * t + b, floor))``.

    ``b`` is the per-kernel difference between a profiled run and a plain one: negative where the
    profiler's own cost per node inflates what it reports (ONNX Runtime), positive where the runtime adds
    dispatch cost between kernels that the profiler does not see. The floor keeps a tiny kernel from
    costing less than nothing.
    """
    return float(a_ms + np.maximum(c * kernel_us + b_us, KERNEL_FLOOR_US).sum() / 1e3)


# --- random networks: what the profile measures -----------------------------------------------------------

ACT_MODULES = ("relu", "relu6", "hardswish", "silu", "gelu")


def _act(name: str):
    from torch import nn

    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
            "": nn.Identity}[name]()


def _conv(c_in: int, c_out: int, k: int, s: int, groups: int, act: str):
    from torch import nn

    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), _act(act))


def random_network(seed: int):
    """A random CNN in the style of timm's (MobileNet/ResNet/RegNet, ConvNeXt and VoVNet blocks) and its input size.

    Resolution, widths, block types, kernel sizes, strides, expansion, grouped convolutions, squeeze-excitation
    (SE with a ReLU or SiLU and a sigmoid or hard-sigmoid gate; VoVNet's one-convolution eSE), activations
    (ReLU, ReLU6, HardSwish, SiLU, GELU), channel LayerNorm and concatenation are drawn from ``seed``; BatchNorm
    and residuals as timm writes them, so the export fuses like a real model's. Re-parameterizable models
    (RepVGG, MobileOne) export as plain convolutions after ``timm.utils.reparameterize_model``, which these cover.
    """
    import torch
    from torch import nn

    rng = random.Random(seed)
    size = rng.choice((32, 32, 64, 112, 224))
    width = rng.choice((8, 16, 24, 32)) if size >= 112 else rng.choice((8, 16, 32, 48, 64))
    act = rng.choice(ACT_MODULES)

    class SE(nn.Module):
        def __init__(self, c, gate, inner="relu"):
            super().__init__()
            r = max(8, c // 4)
            self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
            self.act, self.gate = _act(inner), (nn.Hardsigmoid() if gate == "hard" else nn.Sigmoid())

        def forward(self, x):
            return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))

    class ESE(nn.Module):  # VoVNet's effective SE: one full-width 1x1 convolution, a hard-sigmoid gate
        def __init__(self, c):
            super().__init__()
            self.fc, self.gate = nn.Conv2d(c, c, 1), nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))

    class LayerNorm2d(nn.LayerNorm):  # timm's: normalize over channels, channels last
        def forward(self, x):
            return nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                            self.eps).permute(0, 3, 1, 2)

    class OSA(nn.Module):  # VoVNet / DenseNet style: convolutions in a chain, all outputs concatenated
        def __init__(self, convs, project, ese):
            super().__init__()
            self.convs, self.project, self.ese = nn.ModuleList(convs), project, ese

        def forward(self, x):
            outs = [x]
            for conv in self.convs:
                outs.append(conv(outs[-1]))
            y = self.project(torch.cat(outs, 1))
            return self.ese(y) if self.ese is not None else y

    class Block(nn.Module):
        def __init__(self, body, residual):
            super().__init__()
            self.body, self.residual = body, residual

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)

    layers = [_conv(3, width, 3, 2 if size >= 64 else 1, 1, act)]
    c, hw = width, size // (2 if size >= 64 else 1)
    for _ in range(rng.randint(3, 7)):
        stride = 2 if hw > 1 and rng.random() < 0.5 else 1  # down to the 1x1 maps of a 32x32 input
        c_out = min(512, int(c * rng.choice((1, 1.5, 2)) if stride == 2 else c * rng.choice((1, 1, 1.5))))
        for i in range(rng.randint(1, 3)):
            s = stride if i == 0 else 1
            kind = rng.choice(("mbconv", "mbconv", "basic", "dwsep", "pool", "convnext", "osa"))
            block_act = rng.choice((act, act, "relu"))
            if kind == "pool" and s == 2:
                layers.append(nn.MaxPool2d(3, 2, 1) if rng.random() < 0.5 else nn.AvgPool2d(2, 2))
                hw = (hw + 1) // 2
                continue
            if kind == "pool":
                kind = "mbconv"
            if kind == "mbconv":
                e = rng.choice((1, 3, 4, 6))
                k = rng.choice((3, 3, 5))
                mid = c * e
                body = [_conv(c, mid, 1, 1, 1, block_act)] if e > 1 else []
                body.append(_conv(mid, mid, k, s, mid, block_act))
                if rng.random() < 0.4:
                    body.append(SE(mid, rng.choice(("hard", "sigmoid")), rng.choice(("relu", "silu"))))
                body.append(_conv(mid, c_out, 1, 1, 1, ""))
            elif kind == "convnext":
                # ConvNeXt downsamples (and widens) in a layer of its own
                stem = [_conv(c, c_out, 3 if s == 2 else 1, s, 1, "")] if s == 2 or c != c_out else []
                body = [*stem, nn.Conv2d(c_out, c_out, 7, 1, 3, groups=c_out), LayerNorm2d(c_out),
                        nn.Conv2d(c_out, 4 * c_out, 1), _act(rng.choice(("gelu", "gelu", block_act))),
                        nn.Conv2d(4 * c_out, c_out, 1)]
            elif kind == "osa":
                mid, n = max(8, c_out // 2), rng.randint(2, 4)
                if s == 2:  # VoVNet downsamples by pooling between its stages
                    layers.append(nn.MaxPool2d(3, 2, 1))
                    hw = (hw + 1) // 2
                convs = [_conv(c if i == 0 else mid, mid, 3, 1, 1, block_act) for i in range(n)]
                layers.append(OSA(convs, _conv(c + n * mid, c_out, 1, 1, 1, block_act),
                                  ESE(c_out) if rng.random() < 0.5 else None))
                c = c_out
                continue
            elif kind == "basic":
                groups = rng.choice((1, 1, max(1, c_out // 8))) if c_out % 8 == 0 and c % max(1, c_out // 8) == 0 else 1
                body = [_conv(c, c_out, 3, s, groups if c % groups == 0 else 1, block_act), _conv(c_out, c_out, 3, 1, 1, "")]
            else:
                body = [_conv(c, c, 3, s, c, block_act), _conv(c, c_out, 1, 1, 1, block_act)]
            layers.append(Block(nn.Sequential(*body), residual=(s == 1 and c == c_out)))
            c, hw = c_out, (hw + s - 1) // s
    head = rng.choice((0, 0, 256, 512))
    if head:
        layers.append(_conv(c, head, 1, 1, 1, act))
        c = head
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is not a no-op
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model, (1, 3, size, size)


# --- measuring --------------------------------------------------------------------------------------------

def artifact_for_timing(runtime, onnx_path: Path, precision: str, input_shape, workdir: Path) -> Path:
    """The runtime's artifact at ``precision``; int8 calibrated on random images, since only its speed counts."""
    from edgecompress.runtimes.base import make_artifact

    calib = np.random.default_rng(0).standard_normal((8, *input_shape[1:])).astype(np.float32)
    return make_artifact(runtime, onnx_path, precision, workdir, calib)


def time_session(infer: Callable, input_shape, *, min_runs: int = 30, max_seconds: float = 0.3) -> float:
    """Median latency in ms of ``infer`` on one input: 10 warm-up runs, then at least ``min_runs``."""
    x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
    for _ in range(10):
        infer(x)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter_ns()
        infer(x)
        times.append((time.perf_counter_ns() - start) / 1e6)
    return float(np.median(times))


FUSED_NODE = re.compile(r"^([A-Za-z]+)(?:_token_\d+)?$")


def attribute(times: dict[str, float], members: dict[str, int], graph_names: dict[str, int],
              fused: dict[str, list[int]] | None = None) -> tuple[dict[int, float], float]:
    """Share the runtime's node times out over our kernels.

    A runtime node belongs to the kernel whose ONNX node (or output tensor) has the longest name contained in
    the runtime node's name: runtimes keep ONNX names and add to them (``/conv/Conv/WithoutBiases``, a
    reorder named after the layer it feeds, ``.../Relu_output_0_nchwc`` for a fused conv). A node a fusion
    named after its operation alone (ONNX Runtime's ``Gelu``, ``Gelu_token_3``) goes to the next kernel of
    ``fused[op]`` (kernel indices in execution order). What matches nothing (the input's reorder, weight
    dequantization named after a weight) is returned unattributed.
    """
    names = sorted({**members, **graph_names}.items(), key=lambda kv: -len(kv[0]))
    queues = {op.lower(): list(ks) for op, ks in (fused or {}).items()}
    per_kernel: dict[int, float] = {}
    unattributed = 0.0
    for node, us in times.items():
        for name, k in names:
            if name in node:
                per_kernel[k] = per_kernel.get(k, 0.0) + us
                break
        else:
            m = FUSED_NODE.match(node)
            queue = queues.get(m.group(1).lower()) if m else None
            if queue:
                k = queue.pop(0)
                per_kernel[k] = per_kernel.get(k, 0.0) + us
            else:
                unattributed += us
    return per_kernel, unattributed


def _quantized_names(artifact: Path, members: dict[str, int]) -> dict[str, int]:
    """Names of nodes the int8 artifact added (Q/DQ, NNCF's), each mapped to the kernel it feeds or follows."""
    if artifact.suffix != ".onnx":
        return {}
    import onnx

    g = onnx.load(str(artifact)).graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    out: dict[str, int] = {}
    for node in g.node:
        if node.name in members or len(node.name) < 4:
            continue
        frontier, seen = [node], 0
        while frontier and seen < 8:
            nxt = []
            for n in frontier:
                for t in n.output:
                    for c in consumers.get(t, []):
                        if c.name in members:
                            out[node.name] = members[c.name]
                            break
                        nxt.append(c)
            if node.name in out:
                break
            frontier, seen = nxt, seen + 1
    return out


def profile_target(target, workdir: Path, *, networks: int = 60, seed: int = 0,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Profile random networks on this machine at every precision; resumable through ``workdir``/records.jsonl.

    Each record: the network's kernels, the time the runtime's profiler gives each kernel (averaged over 40
    runs), the time it could not attribute, and the network's median latency timed without the profiler.
    """
    from edgecompress.runtimes.base import export_onnx

    runtime = target.runtime()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "records.jsonl"
    records = read_jsonl(path, key=lambda r: r["key"])
    jobs = [(seed + i, p) for i in range(networks) for p in target.precisions]
    done = sum(_key(*j) in records for j in jobs)
    with tempfile.TemporaryDirectory() as tmp:
        for net_seed, precision in jobs:
            key = _key(net_seed, precision)
            if key in records:
                continue
            model, shape = random_network(net_seed)
            onnx_path = export_onnx(model, shape, Path(tmp) / f"net{net_seed}.onnx")  # as the pipeline exports
            members: dict[str, int] = {}
            graph = graph_kernels(onnx_path, members=members)
            work = Path(tmp) / f"{net_seed}-{precision}"
            artifact = artifact_for_timing(runtime, onnx_path, precision, shape, work)
            tensors = _tensor_owners(onnx_path, members)
            extra = _quantized_names(artifact, members) if precision == "int8" else {}
            fused = {"Gelu": [i for i, k in enumerate(graph.kernels) if k.kind == "eltwise" and k.act == "gelu"]}
            per_kernel, unattributed = attribute(runtime.node_times(artifact, shape), members, {**tensors, **extra},
                                                 fused)
            record = {"key": key, "seed": net_seed, "precision": precision, "input_shape": list(shape),
                      "latency_ms": time_session(runtime.session(artifact), shape),
                      "kernels": [dataclasses.asdict(k) for k in graph.kernels],
                      "kernel_us": [per_kernel.get(i, 0.0) for i in range(len(graph.kernels))],
                      "unattributed_us": unattributed}
            append_jsonl(path, record)
            records[key] = record
            done += 1
            if progress:
                progress(f"network {net_seed} {precision}", done, len(jobs))
            shutil.rmtree(work, ignore_errors=True)
    return records


def _tensor_owners(onnx_path: Path, members: dict[str, int]) -> dict[str, int]:
    import onnx

    out = {}
    for node in onnx.load(str(onnx_path)).graph.node:
        if node.name in members:
            for t in node.output:
                if len(t) >= 4:
                    out[t] = members[node.name]
    return out


def _key(seed, precision) -> str:
    return f"network:{seed}:{precision}"


# --- fitting ----------------------------------------------------------------------------------------------

def fit(records: dict, info: dict | None = None) -> KernelLatencyModel:
    """Kernel regressors from the profiler's per-kernel times, then ``(a, b, c)`` per precision from the totals."""
    import lightgbm as lgb

    networks = [r for r in records.values() if "kernel_us" in r]
    if len(networks) < 5:
        raise EdgecompressError(f"too few measurements to fit ({len(networks)} networks); profile more networks")
    by_family: dict[str, list] = {}
    for r in networks:
        for kd, us in zip(r["kernels"], r["kernel_us"]):
            k = Kernel(**kd)
            by_family.setdefault(FAMILIES[k.kind], []).append((k, r["precision"], max(us, 0.05)))
    params = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 8, "min_data_in_leaf": 3,
              "verbose": -1, "seed": 0, "num_threads": 1}

    def target(rows):
        return np.log([us for _, _, us in rows]) - np.log(baseline_us([k for k, _, _ in rows]))

    def train(rows):
        x = np.vstack([kernel_features([k], p) for k, p, _ in rows])
        y = target(rows)
        booster = lgb.train(params, lgb.Dataset(x, y, categorical_feature=[0, 1, 9]), num_boost_round=200)
        held_out = np.zeros(len(rows))  # 4-fold cross-validated error, the number to trust
        folds = np.arange(len(rows)) % 4
        for f in range(4):
            part = lgb.train(params, lgb.Dataset(x[folds != f], y[folds != f], categorical_feature=[0, 1, 9]),
                             num_boost_round=200)
            held_out[folds == f] = part.predict(x[folds == f])
        return booster, {"samples": len(rows), "cv_rms_log_error": float(np.sqrt(np.mean((held_out - y) ** 2))),
                         "reference_rms_log_error": float(np.sqrt(np.mean((y - y.mean()) ** 2)))}

    # One regressor per family with enough samples; a family without takes the reference times the median
    # correction over every kernel.
    boosters, fit_errors = {}, {}
    for family, rows in by_family.items():
        if len(rows) >= 12:
            boosters[family], fit_errors[family] = train(rows)
    every = [row for rows in by_family.values() for row in rows]
    model = KernelLatencyModel(boosters, {}, {**(info or {}), "kernel_fit": fit_errors,
                                              "fallback_log_correction": float(np.median(target(every)))})
    from scipy.optimize import least_squares

    for precision in sorted({r["precision"] for r in networks}):
        rows = [r for r in networks if r["precision"] == precision]
        preds = [model.kernel_us([Kernel(**k) for k in r["kernels"]], precision) for r in rows]
        measured = np.asarray([r["latency_ms"] for r in rows])

        def residuals(p, preds=preds, measured=measured):
            return np.array([compose(t, *p) for t in preds]) / measured - 1

        fitted = least_squares(residuals, x0=[0.02, 0.0, 1.0], bounds=([0.0, -50.0, 0.05], [10.0, 50.0, 5.0]),
                               loss="soft_l1", f_scale=0.1).x
        err = np.abs(residuals(fitted))
        model.composition[precision] = {"a_ms": float(fitted[0]), "b_us": float(fitted[1]), "c": float(fitted[2]),
                                        "networks": len(rows), "mape": float(err.mean()),
                                        "within_10pct": float((err <= 0.1).mean())}
    return model
