"""The kernels a runtime executes, read from the exported ONNX graph.

CPU runtimes (ONNX Runtime, OpenVINO) and TensorRT do not run one kernel per
ONNX node: a convolution absorbs its folded BatchNorm, the activation after
it and a residual addition; reshapes cost nothing. :func:`graph_kernels`
walks the graph in execution order and groups it the same way, one
:class:`Kernel` per executed kernel, with the configuration the latency
regressors read (op kind, channels, spatial size, kernel size, stride,
groups, fused activation). :func:`peak_activation_elements` gives the largest
set of activations alive at once over the same order (liveness of every
tensor from its producer to its last consumer), which the memory model uses.

A :class:`Kernel` is a :class:`edgecompress.costmodel.layers.LayerProfile` (which
profiles the torch model for the meta-features) with what was fused into it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections import defaultdict
from pathlib import Path

from edgecompress.costmodel.layers import LayerProfile

KINDS = ("conv", "depthwise", "pointwise", "linear", "pool", "global_pool", "eltwise", "concat")
MAC_KINDS = ("conv", "depthwise", "pointwise", "linear")
ACTIVATIONS = {"Relu": "relu", "Clip": "relu6", "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid",
               "Sigmoid": "sigmoid", "Tanh": "tanh", "LeakyRelu": "leakyrelu", "Elu": "elu", "PRelu": "prelu",
               "Gelu": "gelu", "Softplus": "softplus", "Mish": "mish"}
# Fused activations, and for pool/eltwise kernels the operation (max, avg, add, mul, ...); others share one code.
ACT_CODES = {"": 0, **{v: i + 1 for i, v in enumerate(sorted(set(ACTIVATIONS.values()) | {
    "silu", "max", "avg", "add", "mul", "sub", "div", "slice", "concat", "reducemean", "globalaveragepool",
    "layernormalization", "softmax", "matmul"}))}}
NO_KERNEL = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Gather", "Constant", "Dropout",
             "Cast", "ConstantOfShape", "Transpose"}
POOLS = {"MaxPool": "max", "AveragePool": "avg"}
GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}
BINARY = {"Add", "Mul", "Sub", "Div"}


@dataclasses.dataclass(frozen=True)
class Kernel(LayerProfile):
    """One executed kernel: a layer profile (its kind one of KINDS, named after the ONNX node that leads it)
    plus what was fused into it."""

    act: str = ""  # fused activation ("" none); for pool/eltwise kernels, the operation
    residual: bool = False  # a residual addition fused into the kernel

    def scaled(self, keep_in: float, keep_out: float) -> Kernel:
        """This kernel with its input/output channels scaled (channel pruning)."""
        if keep_in == 1.0 and keep_out == 1.0:
            return self
        in_c = max(1, round(self.in_channels * keep_in))
        out_c = max(1, round(self.out_channels * keep_out))
        groups = out_c if self.kind == "depthwise" else self.groups
        mac_scale = keep_out if self.kind in ("depthwise", "pool", "global_pool", "eltwise", "concat") else keep_in * keep_out
        return dataclasses.replace(
            self, in_channels=in_c, out_channels=out_c, groups=groups,
            macs=int(self.macs * mac_scale), weights=int(self.weights * mac_scale),
            in_elements=int(self.in_elements * keep_in), out_elements=int(self.out_elements * keep_out))


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    """What the cost model needs of one exported model."""

    kernels: tuple[Kernel, ...]
    peak_activation_elements: int  # largest sum of live activation elements over the execution order
    # A torch model stands behind the graph; pruning methods need it. A user's ONNX graph (onnx_graph) has none, so
    # the planner gives it dense candidates only.
    prunable: bool = True

    @property
    def params(self) -> int:
        return sum(k.weights for k in self.kernels)

    @property
    def macs(self) -> int:
        return sum(k.macs for k in self.kernels)

    def pruned(self, channel_keep: float) -> ModelGraph:
        """The graph after removing ``1 - channel_keep`` of the channels of every prunable layer.

        The image input (3 channels) and the classifier's outputs are kept, as
        torch-pruning does with the classifier in ``ignored_layers``.
        """
        if channel_keep >= 1.0:
            return self
        last_linear = max((i for i, k in enumerate(self.kernels) if k.kind in MAC_KINDS), default=-1)
        out = []
        for i, k in enumerate(self.kernels):
            keep_in = 1.0 if k.in_channels <= 3 else channel_keep
            keep_out = 1.0 if i == last_linear else channel_keep
            out.append(k.scaled(keep_in, keep_out))
        return ModelGraph(tuple(out), int(self.peak_activation_elements * channel_keep))

    def low_rank(self, ratio: float) -> ModelGraph:
        """The graph after low-rank factorization removing ``ratio`` of each factorizable kernel's MACs.

        The same kernels :mod:`edgecompress.compress.lowrank` factorizes (1x1 and linear: two factors; k x k: Tucker-2,
        three), with ranks spread uniformly; the real ranks depend on each layer's spectrum, so this is the
        planner's estimate before anything is decomposed.
        """
        last_linear = max((i for i, k in enumerate(self.kernels) if k.kind in MAC_KINDS), default=-1)
        out: list[Kernel] = []
        for i, k in enumerate(self.kernels):
            if i == last_linear or k.kind not in ("conv", "pointwise", "linear") or k.in_channels <= 3 or k.groups != 1:
                out.append(k)
                continue
            # Positions per channel from the element counts: a linear layer over tokens has a row count that is
            # not always a square, and its in_hw is only that count's rounded square root.
            hw_in = k.in_elements // k.in_channels if k.in_elements else k.in_hw * k.in_hw
            hw_out = k.out_elements // k.out_channels if k.out_elements else k.out_hw * k.out_hw
            budget = (1 - ratio) * k.macs
            if k.kind == "conv":
                # hw_in*I*r + hw_out*(k^2 r^2 + r*O) = budget, one rank r for both modes
                a, b = hw_out * k.kernel ** 2, hw_in * k.in_channels + hw_out * k.out_channels
                r = max(1, int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)))
                mid = dataclasses.replace(k, name=k.name + "/core", in_channels=r, out_channels=r, act="", residual=False,
                                          macs=hw_out * r * r * k.kernel ** 2, weights=r * r * k.kernel ** 2,
                                          in_elements=r * hw_in, out_elements=r * hw_out)
                first = dataclasses.replace(k, name=k.name + "/in", kind="pointwise", out_channels=r, kernel=1, stride=1,
                                            out_hw=k.in_hw, act="", residual=False, macs=hw_in * k.in_channels * r,
                                            weights=k.in_channels * r, out_elements=r * hw_in)
                last = dataclasses.replace(k, name=k.name + "/out", kind="pointwise", in_channels=r, kernel=1, stride=1,
                                           in_hw=k.out_hw, macs=hw_out * r * k.out_channels, weights=r * k.out_channels,
                                           in_elements=r * hw_out)
                parts = [first, mid, last]
            else:
                r = max(1, int(budget / (hw_out * (k.in_channels + k.out_channels))))
                first = dataclasses.replace(k, name=k.name + "/in", out_channels=r, act="", residual=False,
                                            macs=hw_out * k.in_channels * r, weights=k.in_channels * r,
                                            out_elements=r * hw_out)
                last = dataclasses.replace(k, name=k.name + "/out", in_channels=r, stride=1, in_hw=k.out_hw,
                                           macs=hw_out * r * k.out_channels, weights=r * k.out_channels,
                                           in_elements=r * hw_out)
                parts = [first, last]
            out.extend(parts if sum(p.macs for p in parts) < k.macs else [k])
        return ModelGraph(tuple(out), self.peak_activation_elements)


def _numel(shape) -> int:
    n = 1
    for d in shape or []:
        n *= max(int(d), 1)
    return n


def _hw(shape) -> int:
    return int(shape[-1]) if shape and len(shape) >= 3 else 1


def _channels(shape) -> int:
    return int(shape[1]) if shape and len(shape) >= 2 else 1


def _attr(node, name, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def graph_kernels(onnx_model, members: dict | None = None) -> ModelGraph:
    """Group an ONNX model (path or ModelProto, batch 1) into executed kernels.

    Fusion follows what the CPU plugins and TensorRT do: Conv/Gemm absorb a
    BatchNorm, the activation chain after them (including SiLU written as
    ``x * sigmoid(x)`` and multiplications/additions by constants) and one
    residual Add whose other operand is already computed. Everything else
    that computes is its own kernel; shape-only ops are none. ``members``, if
    given, is filled with ONNX node name -> index of the kernel it runs in.
    """
    import onnx

    model = onnx.load(str(onnx_model)) if not isinstance(onnx_model, onnx.ModelProto) else onnx_model
    # data_prop: shapes computed from shapes (Shape -> Gather -> Concat -> Reshape, as a traced view writes them).
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = model.graph
    consts = {i.name: list(i.dims) for i in g.initializer}
    for node in g.node:
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input and node.input[0] in consts):
            consts[node.output[0]] = consts.get(node.input[0], []) if node.input else []
    shapes: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    shapes.update(_run_time_shapes(model, consts))
    consumers: dict[str, list] = defaultdict(list)
    for node in g.node:
        for t in node.input:
            consumers[t].append(node)

    kernels: list[dict] = []
    members = {} if members is None else members
    owner: dict[str, int] = {}  # tensor -> index of the kernel that produces it (for fusion)
    absorbed: set[int] = set()  # ids of nodes already fused into a kernel

    def dynamic_inputs(node):
        return [t for t in node.input if t and t not in consts]

    def fusable(tensor: str, node) -> int | None:
        """The kernel ``node`` can fuse into: the producer of ``tensor`` when ``node`` is its only consumer."""
        k = owner.get(tensor)
        if k is None or kernels[k]["kind"] not in MAC_KINDS:
            return None
        users = consumers.get(tensor, [])
        return k if len(users) == 1 and users[0] is node else None

    for node in g.node:
        if id(node) in absorbed:
            continue
        op = node.op_type
        out = node.output[0] if node.output else ""
        dyn = dynamic_inputs(node)
        if op in NO_KERNEL:
            if op in ("Identity", "Dropout", "Cast") and dyn and dyn[0] in owner:
                owner[out] = owner[dyn[0]]
            continue
        in_shape = shapes.get(dyn[0]) if dyn else None
        out_shape = shapes.get(out)
        chain = _erf_gelu(node, dyn, consumers, consts) if op == "Div" else None
        if chain:
            # GELU as exporters write it below opset 20: one kernel, as the runtimes fuse it (ONNX Runtime's
            # GeluFusion, an OpenVINO Gelu post-op)
            k = len(kernels)
            kernels.append(dict(
                name=node.name, kind="eltwise", in_channels=_channels(in_shape), out_channels=_channels(in_shape),
                kernel=1, stride=1, groups=1, in_hw=_hw(in_shape), out_hw=_hw(in_shape), macs=0, weights=0,
                in_elements=_numel(in_shape), out_elements=_numel(in_shape), act="gelu"))
            for n in chain:
                absorbed.add(id(n))
                members[n.name] = k
                owner[n.output[0]] = k
            continue
        if op == "Conv":
            w = consts.get(node.input[1]) or shapes.get(node.input[1])
            groups = int(_attr(node, "group", 1))
            k = int(w[2]) if len(w) > 2 else 1
            in_c, out_c = _channels(in_shape), int(w[0])
            if groups > 1 and groups == in_c:
                kind = "depthwise"
            elif k == 1 and (len(w) < 4 or w[3] == 1):
                kind = "pointwise"
            else:
                kind = "conv"
            strides = _attr(node, "strides", [1])
            kernels.append(dict(
                name=node.name, kind=kind, in_channels=in_c, out_channels=out_c, kernel=k, stride=int(strides[0]),
                groups=groups, in_hw=_hw(in_shape), out_hw=_hw(out_shape),
                macs=_numel(out_shape) * _numel(w[1:]), weights=_numel(w),
                in_elements=_numel(in_shape), out_elements=_numel(out_shape)))
            owner[out] = members[node.name] = len(kernels) - 1
            continue
        if op in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in consts:
            w = consts[node.input[1]]
            trans_b = int(_attr(node, "transB", 0))
            in_f, out_f = (int(w[1]), int(w[0])) if trans_b else (int(w[0]), int(w[1]))
            rows = _numel(in_shape) // max(in_f, 1)
            # Over several rows (a transformer's tokens, a channels-last MLP's pixels) it is a 1x1 convolution over
            # that many positions, as the runtimes run it, and it is timed as one: the latency regressors, fitted on
            # networks whose linear layers are classifier heads (one row), put MobileViT-XXS's 36 token layers at
            # 1.0 ms on ONNX Runtime, where the whole model runs in 0.7.
            side = max(1, round(math.sqrt(rows)))
            kernels.append(dict(
                name=node.name, kind="linear" if rows <= 1 else "pointwise", in_channels=in_f, out_channels=out_f,
                kernel=1, stride=1, groups=1, in_hw=side, out_hw=side, macs=rows * in_f * out_f, weights=in_f * out_f,
                in_elements=_numel(in_shape), out_elements=_numel(out_shape)))
            owner[out] = members[node.name] = len(kernels) - 1
            continue
        if op == "BatchNormalization" or op in ACTIVATIONS or (op in BINARY and len(dyn) == 1):
            k = fusable(dyn[0], node) if dyn else None
            if k is not None:
                if op in ACTIVATIONS and not kernels[k].get("act"):
                    kernels[k]["act"] = ACTIVATIONS[op]
                owner[out] = members[node.name] = k
                continue
        if op in ("Sigmoid", "HardSigmoid") and dyn:
            # SiLU / Swish: y = x * sigmoid(x), x feeding exactly the Sigmoid and the Mul; HardSwish the same with
            # HardSigmoid (as exporters write it below opset 14, and the runtimes fuse it back).
            x = dyn[0]
            users = consumers.get(x, [])
            muls = [u for u in users if u.op_type == "Mul" and out in u.input and x in u.input]
            k = owner.get(x)
            if k is not None and kernels[k]["kind"] in MAC_KINDS and len(users) == 2 and muls:
                kernels[k]["act"] = kernels[k].get("act") or ("silu" if op == "Sigmoid" else "hardswish")
                absorbed.add(id(muls[0]))
                owner[out] = owner[muls[0].output[0]] = members[node.name] = members[muls[0].name] = k
                continue
        if op == "Add" and len(dyn) == 2:
            for a, b in ((dyn[0], dyn[1]), (dyn[1], dyn[0])):
                k = fusable(a, node)
                if k is not None and not kernels[k].get("residual") and (owner.get(b) is None or owner[b] < k):
                    kernels[k]["residual"] = True
                    owner[out] = members[node.name] = k
                    break
            if out in owner:
                continue
        if op in POOLS:
            kernel = _attr(node, "kernel_shape", [1])
            strides = _attr(node, "strides", [1])
            kind, k, s = "pool", int(kernel[0]), int(strides[0])
        elif op in GLOBAL_POOLS:
            kind, k, s = "global_pool", _hw(in_shape), 1
        elif op == "Concat":
            kind, k, s = "concat", 1, 1
        else:
            kind, k, s = "eltwise", 1, 1
        ins = sum(_numel(shapes.get(t)) for t in dyn) if dyn else 0
        kernels.append(dict(
            name=node.name, kind=kind, in_channels=_channels(in_shape), out_channels=_channels(out_shape), kernel=k,
            stride=s, groups=1, in_hw=_hw(in_shape), out_hw=_hw(out_shape),
            macs=0, weights=0, in_elements=ins, out_elements=_numel(out_shape),
            act=POOLS.get(op, ACTIVATIONS.get(op, op.lower() if kind in ("eltwise", "global_pool") else ""))))
        owner[out] = members[node.name] = len(kernels) - 1
    return ModelGraph(tuple(Kernel(**k) for k in kernels), _peak_activation(g, consts, shapes, members, owner))


def _run_time_shapes(model, consts: dict) -> dict[str, list[int]]:
    """The shapes static inference leaves unknown, from one inference in ONNX Runtime on zeros at batch 1 ({} when
    none is unknown, the usual case).

    Padding computed from the input's size (TensorFlow "same", timm's tf_* models) and values reshaped by sizes
    that data propagation does not follow leave every shape after them unknown; counted as 1, tf_mobilenetv3_small_
    minimal_100's convolutions came to 1.02 M MACs against the 1.63 M they compute.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    g = model.graph
    known = {vi.name for vi in list(g.input) + list(g.value_info) + list(g.output)
             if vi.type.tensor_type.HasField("shape")
             and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    missing = {t for node in g.node if node.op_type != "Constant" for t in node.output
               if t and t not in consts and t not in known}
    if not missing:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in sorted(missing - outputs))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as the graph has it
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    feeds = {i.name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], dtypes.get(i.type, np.float32))
             for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    return {n: list(np.shape(v)) for n, v in zip(names, values) if n in missing}


def _erf_gelu(div, dyn: list[str], consumers: dict, consts: dict) -> list | None:
    """The nodes of ``x * 0.5 * (1 + erf(x / sqrt(2)))`` that start at ``div`` (Div, Erf, Add, Mul[, Mul]), or None."""
    if len(dyn) != 1 or div.input[0] != dyn[0]:
        return None
    x = dyn[0]

    def only(tensor, op_type):
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    erf = only(div.output[0], "Erf")
    add = erf and only(erf.output[0], "Add")
    mul = add and only(add.output[0], "Mul")
    if not mul or x not in mul.input or not any(t in consts for t in add.input):
        return None
    chain = [div, erf, add, mul]
    half = only(mul.output[0], "Mul")
    if half is not None and any(t in consts for t in half.input):
        chain.append(half)
    return chain


def _peak_activation(g, consts: dict, shapes: dict, members: dict, owner: dict) -> int:
    """Largest sum of live activation elements while a kernel runs.

    Only what crosses kernels is materialized: the graph's inputs and each kernel's outputs that another
    kernel (or the graph's output) reads; a tensor lives from its producer to its last consumer. Tensors
    inside a fused kernel never reach memory, and shape-only ops alias their input.
    """
    alias: dict[str, str] = {}
    for node in g.node:
        if node.name not in members and node.op_type in NO_KERNEL and node.input and node.input[0] not in consts:
            for t in node.output:
                alias[t] = alias.get(node.input[0], node.input[0])
    producer = {t: k for t, k in owner.items()}
    n_kernels = max(members.values(), default=-1) + 1
    first: dict[str, int] = {i.name: -1 for i in g.input if i.name not in consts}
    last: dict[str, int] = {}
    for node in g.node:
        k = members.get(node.name)
        if k is None:
            continue
        for t in node.input:
            root = alias.get(t, t)
            if not root or root in consts or producer.get(root) == k:
                continue
            first.setdefault(root, producer.get(root, -1))
            last[root] = max(last.get(root, -1), k)
    for o in g.output:
        root = alias.get(o.name, o.name)
        first.setdefault(root, producer.get(root, n_kernels - 1))
        last[root] = n_kernels
    peak = 0
    for i in range(n_kernels):
        live = sum(_numel(shapes.get(t)) for t, f in first.items() if f <= i <= last.get(t, f))
        peak = max(peak, live)
    return peak


def model_graph(model, input_shape: tuple[int, ...]) -> ModelGraph:
    """Export a torch model to ONNX (as the pipeline does) and read its kernels."""
    from edgecompress.runtimes.base import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, (1, *input_shape[1:]), Path(tmp) / "model.onnx")
        return graph_kernels(path)


def onnx_graph(path: Path, input_shape: tuple[int, ...]) -> ModelGraph:
    """The kernels of a user's ONNX graph (edgecompress.onnx_model), read as the pipeline exports it: batch 1 at the
    data's image size."""
    from edgecompress.onnx_model import canonical_onnx

    with tempfile.TemporaryDirectory() as tmp:
        static = canonical_onnx(Path(path), Path(tmp) / "model.onnx", (1, *input_shape[1:]), static_batch=True)
        return dataclasses.replace(graph_kernels(static), prunable=False)
