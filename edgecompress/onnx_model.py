"""A user's model given as an ONNX graph (``--model path/model.onnx``): reading it, checking it against the data,
running it in ONNX Runtime, and rewriting it into the form every runtime here starts from.

An ONNX graph has no torch model behind it, so only post-training flows apply to it: the dense model at fp32/fp16
and int8 by NNCF on the graph. What the pipeline's runtimes expect is what ``runtimes.base.export_onnx`` writes: one
NCHW input named ``input``, one output named ``logits``, a batch axis (the OpenVINO export then fixes it to 1, the
shape artifacts are timed and deployed at). :func:`canonical_onnx` rewrites a user's graph into that form; where the
graph cannot run at another batch size (a Reshape with the batch of 1 written into it), it stays at batch 1 and is
run one image at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edgecompress.core.errors import UsageError, WeightsError

MIN_OPSET = 13  # NNCF's ONNX backend quantizes opset 13 and up; older graphs are converted to runtimes.base.OPSET
PREDICT_BATCH = 64


@dataclasses.dataclass(frozen=True)
class OnnxGraphInfo:
    """The interface of an ONNX image classifier. A dimension is None where the graph leaves it free."""

    input_name: str
    input_shape: tuple[int | None, ...]
    output_name: str
    output_shape: tuple[int | None, ...]
    opset: int
    params: int  # elements of the float initializers

    @property
    def fixed_batch(self) -> int | None:
        return self.input_shape[0]

    @property
    def num_classes(self) -> int | None:
        return self.output_shape[1] if len(self.output_shape) == 2 else None

    @property
    def image_size(self) -> int | None:
        """The input's side where the graph fixes a square one."""
        h, w = self.input_shape[2:4]
        return h if h is not None and h == w else None


def _dims(value_info) -> tuple[int | None, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_onnx(path: Path):
    """The ModelProto, checked; a missing or broken file is a WeightsError in one line."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001  (protobuf DecodeError, onnx ValidationError, ...: not a usable graph)
        raise WeightsError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from None
    return model


def graph_info(model, path: Path) -> OnnxGraphInfo:
    """The classifier interface of ``model``; a graph that is not one image in, one score vector out is refused."""
    from onnx import TensorProto

    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]  # IR < 4 lists initializers among the inputs
    if len(inputs) != 1:
        raise WeightsError(f"{path} has {len(inputs)} inputs; an image classifier takes one (an NCHW image batch)")
    if len(g.output) != 1:
        raise WeightsError(f"{path} has {len(g.output)} outputs; an image classifier gives one (the class scores)")
    inp, out = inputs[0], g.output[0]
    shape = _dims(inp)
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT or len(shape) != 4:
        shown = "x".join("?" if d is None else str(d) for d in shape) or "unknown"
        raise WeightsError(f"{path}: input {inp.name!r} is {len(shape)}-D ({shown}); edgecompress feeds float32 "
                           "NCHW images (N x 3 x H x W)")
    if shape[1] is not None and shape[1] not in (1, 3) and shape[3] in (1, 3):
        raise WeightsError(f"{path}: input {inp.name!r} is {'x'.join(str(d) for d in shape)}, channels last; "
                           "edgecompress feeds NCHW images (N x 3 x H x W)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    params = sum(int(np.prod(i.dims)) for i in g.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))
    return OnnxGraphInfo(input_name=inp.name, input_shape=shape, output_name=out.name, output_shape=_dims(out),
                         opset=opset, params=params)


def inspect_onnx(path: Path) -> OnnxGraphInfo:
    return graph_info(load_onnx(path), Path(path))


def check_fits(path: Path, data) -> OnnxGraphInfo:
    """The graph takes the data's images and scores its classes; else one line that says what to change."""
    info = inspect_onnx(path)
    _, channels, height, width = data.input_shape
    if info.input_shape[1] is not None and info.input_shape[1] != channels:
        raise UsageError(f"{path.name} takes {info.input_shape[1]}-channel images; the data has {channels} channels")
    want = info.input_shape[2:4]
    if any(d is not None for d in want) and tuple(want) != (height, width):
        if info.image_size is not None:
            hint = f"pass --image-size {info.image_size}"
        else:
            hint = "edgecompress loads square images; re-export the model with a square input"
        raise UsageError(f"{path.name} takes {'x'.join('?' if d is None else str(d) for d in want)} images; the data is "
                         f"loaded at {height}x{width}: {hint}")
    if info.num_classes is not None and info.num_classes != data.num_classes:
        raise UsageError(f"{path.name} scores {info.num_classes} classes; the data has {data.num_classes}")
    return info


def session(path: Path, *, quiet: bool = False):
    """An ONNX Runtime CPU session; ``quiet`` keeps even its error log off the console (for runs expected to fail)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_onnx(path: Path, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Logits of ``images`` (NCHW float32) from the graph in ONNX Runtime, in batches; a graph whose batch axis is
    fixed is fed that many images at a time."""
    sess = session(path)
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or batch_size
    outs = []
    for i in range(0, len(images), step):
        x = np.ascontiguousarray(images[i:i + step], dtype=np.float32)  # a batch at a time: splits stay uint8
        if fixed and len(x) < fixed:  # the last short batch, padded and cut back
            x = np.concatenate([x, np.zeros((fixed - len(x), *x.shape[1:]), np.float32)])
            outs.append(sess.run(None, {inp.name: x})[0][:len(images) - i])
        else:
            outs.append(sess.run(None, {inp.name: x})[0])
    return np.concatenate(outs)


def _renamed(model, old: str, new: str) -> None:
    if old == new:
        return
    for node in model.graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new


def _set_shape(value_info, dims) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        elif d is not None:
            dim.dim_value = d


def _rewritten(model, info: OnnxGraphInfo, input_shape: tuple[int, ...], batch: str | int):
    """A copy of ``model`` in export_onnx's form: ``input`` (batch, C, H, W) -> ``logits`` (batch, classes)."""
    import onnx
    from onnx import version_converter

    from edgecompress.runtimes.base import INPUT_NAME, OPSET, OUTPUT_NAME

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name for i in g.initializer}
    for item in list(g.input):
        if item.name in inits:  # initializers listed as inputs could be fed from outside; they are weights here
            g.input.remove(item)
    _renamed(model, info.input_name, INPUT_NAME)
    _renamed(model, info.output_name, OUTPUT_NAME)
    g.input[0].name, g.output[0].name = INPUT_NAME, OUTPUT_NAME
    _set_shape(g.input[0], (batch, *input_shape[1:]))
    _set_shape(g.output[0], (batch, info.num_classes))
    del g.value_info[:]  # shapes recorded for another batch or image size would contradict the new input
    if info.opset < MIN_OPSET:
        try:
            model = version_converter.convert_version(model, OPSET)
        except Exception as exc:  # noqa: BLE001  (the converter raises whatever its adapters do)
            raise WeightsError(f"ONNX graph at opset {info.opset}: cannot convert it to opset {OPSET} for int8 "
                               f"quantization ({_first_line(exc)}); export it at opset {MIN_OPSET} or later") from None
    return model


def canonical_onnx(src: Path, dst: Path, input_shape: tuple[int, ...], *, static_batch: bool = False) -> Path:
    """``src`` rewritten as ``runtimes.base.export_onnx`` would have written it, at ``input_shape``'s image size.

    The batch axis is free where the graph computes the same scores for a batch of two as for each image alone;
    otherwise (or with ``static_batch``) it is fixed to 1. Returns ``dst``.
    """
    import onnx

    model = load_onnx(src)
    info = graph_info(model, Path(src))
    if not static_batch:
        dynamic = _rewritten(model, info, input_shape, "batch")
        onnx.save(dynamic, str(dst))
        if _batches_alike(dst, src, input_shape):
            return dst
    onnx.save(_rewritten(model, info, input_shape, 1), str(dst))
    return dst


def _batches_alike(rewritten: Path, original: Path, input_shape: tuple[int, ...]) -> bool:
    """The rewritten graph gives, for two images at once, the original's scores for each alone."""
    from edgecompress.runtimes.base import INPUT_NAME

    x = np.random.default_rng(0).standard_normal((2, *input_shape[1:])).astype(np.float32)
    try:
        both = session(rewritten, quiet=True).run(None, {INPUT_NAME: x})[0]
    except Exception:  # noqa: BLE001  (a shape written into the graph for batch 1: the batch of two is refused)
        return False
    alone = predict_onnx(original, x, batch_size=1)
    return both.shape == alone.shape and bool(np.allclose(both, alone, rtol=1e-3, atol=1e-4))


def fixed_batch(path: Path) -> int | None:
    """The batch size ``path``'s input is fixed to, or None where it is free."""
    return inspect_onnx(path).fixed_batch


def weight_stats(path: Path) -> tuple[int, float]:
    """(elements of the float weights, share of them that are zero), from the graph's initializers."""
    from onnx import TensorProto, numpy_helper

    model = load_onnx(path)
    total = zeros = 0
    for init in model.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(init.dims) > 1:
            w = numpy_helper.to_array(init)
            total += w.size
            zeros += int((w == 0).sum())
    return total, zeros / max(total, 1)
