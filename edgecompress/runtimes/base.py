"""What every runtime shares: ONNX export from torch and NNCF post-training quantization."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgecompress.core.errors import EdgecompressError
from edgecompress.core.sigstack import keep_signal_stack

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(model, input_shape: tuple[int, ...], path: Path) -> Path:
    """fp32 ONNX with a dynamic batch axis (TorchScript exporter: stable for timm CNNs).

    A model with re-parameterizable branches (RepVGG, MobileOne, RepGhost, FastViT) is exported as it deploys:
    its branches fused by ``timm.utils.reparameterize_model`` on a copy (exact in eval mode).
    """
    import torch

    model = model.eval()
    if any(hasattr(m, a) for m in model.modules() for a in ("fuse", "reparameterize", "switch_to_deploy")):
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model)
    # The tracer warns where a model's Python reads a tensor's size (MobileViT's patch padding): the graph is for this
    # height and width only, as every export here is (only the batch axis is dynamic), so the warning says nothing.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            torch.zeros(input_shape),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return path


@contextlib.contextmanager
def nncf_quiet():
    """NNCF draws progress bars and logs INFO lines on stdout; keep stdout for the tool's own output (--json)."""
    import logging

    logger = logging.getLogger("nncf")  # its handler holds the original stdout, so redirecting is not enough
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def calibration_batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """``images`` in batches of ``batch``, the last filled up with the first images, so that every batch has a
    graph's static batch size (a repeated image moves no min/max range)."""
    images = np.asarray(images)
    out = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.resize(images, (batch - len(chunk), *images.shape[1:]))])
        out.append(chunk)
    return out


def calibration_dataset(images: np.ndarray, transform: Callable | None = None, batch: int = 1):
    """The images as an ``nncf.Dataset`` of ``batch``-image items (calibration_batches)."""
    import nncf

    return nncf.Dataset(calibration_batches(images, batch), transform)


@dataclasses.dataclass(frozen=True)
class AccuracyControl:
    """Accuracy-aware int8: layers are returned to float, most sensitive first, until the drop is within ``max_drop``."""

    images: np.ndarray  # validation split, NCHW float32
    labels: np.ndarray
    max_drop: float  # absolute top-1
    max_iterations: int = 16  # layers reverted at most (bounds the time on a collapsing model)


# A convolution whose folded per-output-channel weight ranges span more than this is kept in float: see gain_outliers.
MAX_CHANNEL_GAIN_SPREAD = 256.0


def onnx_conv_weights(model):
    """(node name, weight array) of every convolution with constant weights in an ONNX ModelProto."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            yield node.name, numpy_helper.to_array(inits[node.input[1]])


def gain_outliers(conv_weights, limit: float = MAX_CHANNEL_GAIN_SPREAD) -> list[str]:
    """Convolutions that int8 with per-tensor activations cannot carry: some output channels' weights (BatchNorm
    folded in) are more than ``limit`` times the median channel's.

    Such a channel has a near-dead input (BatchNorm divided it by a tiny variance), so its input falls below one
    step of the layer's shared activation grid and rounds to zero, while its weight amplifies it back to full
    size in float. Depthwise convolutions in MobileNetV2-style blocks do this (the case Nagel et al. 2019 fix
    with cross-layer equalization): the zoo's mobilenetv2_050 has channels 96,000x the median and fell from
    80% to 10% top-1 in int8; kept in float, 79%.

    ``conv_weights``: (name, array) per convolution, from the runtime's own graph (its ``conv_weights``).
    """
    out = []
    for name, w in conv_weights:
        per_channel = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
        if per_channel.max() > limit * max(float(np.median(per_channel)), 1e-12):
            out.append(name)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantPreset:
    """How one runtime wants its int8 made: the quantizer that places the quantizers, and the scheme it asks for.

    Each runtime returns its own (``Runtime.quant_preset()``); the artifact records it (``read_quant_record``), and
    ``key()`` belongs in every cache key of a quantized artifact, since a different preset is a different artifact.
    Activation ranges (``activation_ranges``): the calibration set's min and max, or NNCF's default, which averages
    each image's extremes: min/max was 1 pp better over the dense digits zoo (`tools/bench_int8.py`), and collapsed
    fine-tuned hard-swish networks whose few outlier images set the range (`tools/bench_int8_presets.py`).
    """

    quantizer: str  # a key of QUANTIZERS: who writes the quantized graph
    # NNCF (quantizer "nncf"): nncf.TargetDevice and nncf.QuantizationPreset names; "performance" is symmetric
    # activations and weights, "mixed" asymmetric activations.
    target_device: str = "ANY"
    preset: str = "performance"
    # Graphs with attention (a Softmax inside) are quantized as nncf.ModelType.TRANSFORMER, which brings NNCF's
    # SmoothQuant and keeps its transformer-unfriendly quantizers out.
    transformer_when_attention: bool = True
    fast_bias_correction: bool = True
    # Activation ranges, one of range_choices(preset) or "choose". "minmax": the calibration set's min and max
    # (either quantizer). NNCF's "nncf": its default (the extremes of each calibration image averaged for
    # per-tensor quantizers, min and max for per-channel ones). ONNX Runtime's "percentile:P": the range that
    # holds P % of each tensor's calibration values, for each P of ``percentiles``. "choose": each of
    # range_choices(preset) made, and the one whose top-1 agrees more with the float model's on the calibration
    # images kept (choose_ranges).
    activation_ranges: str = "minmax"
    percentiles: tuple[float, ...] = (99.999,)
    # ONNX Runtime's quantize_static (quantizer "onnxruntime"): format, 8-bit types, weight granularity, symmetry.
    quant_format: str = "qdq"  # "qdq" | "qoperator"
    activation_type: str = "u8"  # "u8" | "s8"
    weight_type: str = "s8"
    per_channel: bool = True
    symmetric_activations: bool = False
    quantize_bias: bool = True  # int32 bias through DequantizeLinear (ONNX Runtime's QLinearConv); TensorRT keeps it float
    # Images per calibration inference, for a runtime that can reshape its graph (OpenVINO): NNCF's statistics cost
    # per inference, and min/max ranges are the same whatever the batch. Accuracy-aware int8 calibrates image by image.
    calibration_batch: int = 1
    version: int = 1

    def record(self) -> dict:
        """Everything that decides the artifact, as the report and the artifact's metadata keep it."""
        record = dataclasses.asdict(self)
        if self.quantizer != "onnxruntime":  # only ONNX Runtime's ranges take percentiles (and older keys stay)
            del record["percentiles"]
        else:
            record["percentiles"] = list(self.percentiles)  # as the artifact's JSON gives it back
        return {"type": "QuantPreset", **record}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


# NNCF's post-training quantization as the tool made every runtime's int8 before presets (and as callers that
# pass no preset still get it): symmetric, per-channel weights, per-tensor activations, no device specifics.
NNCF_DEFAULT = QuantPreset(quantizer="nncf")
NNCF_RANGES = ("minmax", "nncf")


def range_choices(preset: QuantPreset) -> tuple[str, ...]:
    """What activation_ranges="choose" chooses from for ``preset``'s quantizer, in order of preference at equal
    agreement."""
    if preset.quantizer == "nncf":
        return NNCF_RANGES
    return ("minmax", *(f"percentile:{p:g}" for p in preset.percentiles))


def agreement(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """How closely ``logits`` follow the float model's ``reference`` on the same images: (share of images with the
    same top-1, minus the mean squared logit difference), larger is closer; tuples compare by the first, then the
    second."""
    same = float((reference.argmax(1) == logits.argmax(1)).mean())
    return same, -float(np.mean((reference - logits) ** 2))


def choose_ranges(choices, make: Callable, logits: Callable, reference: np.ndarray) -> tuple[str, dict, object]:
    """activation_ranges="choose": ``make(ranges)`` the int8 model with each of ``choices`` and keep the one whose
    ``logits(model)`` on the calibration images agree more with the float model's ``reference`` (agreement).
    Returns the chosen name, each choice's share of images with the float top-1 (or why it could not be made), and
    the chosen model. A rule after the first that fails on this model is not a choice (ONNX Runtime's percentiles
    need a histogram that some tensors' ranges cannot hold: "Too many bins for data range").

    No range rule holds everywhere: min/max collapsed fine-tuned hard-swish networks whose few outlier images set
    the range; NNCF's averaged extremes and ONNX Runtime's percentiles cost some dense digits models 1-20 pp
    (tools/bench_int8_presets.py).
    """
    models, scores, failed = {}, {}, {}
    for r in choices:
        try:
            models[r] = make(r)
        except Exception as exc:  # a rule this model's tensors cannot take is no choice; the first must work
            if r == choices[0]:
                raise
            failed[r] = f"failed: {type(exc).__name__}: {exc}"[:200]
            continue
        scores[r] = agreement(reference, logits(models[r]))
    chosen = max(scores, key=lambda r: scores[r])  # max keeps the first of equals: the choices' order
    return chosen, {**{r: round(v[0], 4) for r, v in scores.items()}, **failed}, models[chosen]

QUANT_METADATA_KEY = "edgecompress.quant_preset"  # ONNX metadata_props key; OpenVINO rt_info path edgecompress/...


def _nncf_parameters(preset: QuantPreset, attention: bool) -> dict:
    """``nncf.quantize`` keyword arguments for ``preset`` (accepted by quantize_with_accuracy_control too)."""
    import nncf

    if preset.quantizer != "nncf":
        raise EdgecompressError(f"quant preset for {preset.quantizer!r} given to NNCF")
    kwargs = {"target_device": nncf.TargetDevice[preset.target_device],
              "preset": nncf.QuantizationPreset(preset.preset)}
    if attention and preset.transformer_when_attention:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    return kwargs


def quantize_with_control(model, calib_images: np.ndarray, control: AccuracyControl | None, *, to_input, top1,
                          conv_weights, preset: QuantPreset | None = None, attention: bool = False, batch: int = 1):
    """``nncf.quantize``, or ``nncf.quantize_with_accuracy_control`` when ``control`` is given.

    ``to_input(x)`` maps an NCHW batch to the model's input; ``top1(model, items)`` is the backend's
    validation function over (image, label) items; ``conv_weights(model)`` the backend's convolutions. ``preset``
    (an NNCF one; default ``NNCF_DEFAULT``) gives the device, symmetry and bias correction; ``attention`` says the
    graph has attention (``has_attention``) and its ``activation_ranges`` (one of NNCF_RANGES). Convolutions
    in ``gain_outliers`` stay in float. ``batch``: images per calibration inference (the model's batch axis must
    take it); accuracy control validates image by image, so it is only for ``control=None``.
    """
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    preset = preset or NNCF_DEFAULT
    scheme = _nncf_parameters(preset, attention)
    if batch > 1 and control is not None:
        raise EdgecompressError("accuracy-aware int8 calibrates and validates one image at a time (batch 1)")
    calib = calibration_dataset(calib_images, to_input, batch)
    ignored = nncf.IgnoredScope(names=gain_outliers(conv_weights(model)))
    if preset.activation_ranges not in NNCF_RANGES:  # "choose" is resolved before this (choose_ranges)
        raise EdgecompressError(f"activation_ranges {preset.activation_ranges!r}: NNCF takes one of {', '.join(NNCF_RANGES)}")
    # Statistics per image whatever the batch (batchwise_statistics): averaged extremes mean the same at batch 32.
    ranges = (AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                                             batchwise_statistics=batch > 1)
              if preset.activation_ranges == "minmax" else AdvancedQuantizationParameters(batchwise_statistics=batch > 1))
    with nncf_quiet():
        try:
            if control is None:
                return nncf.quantize(model, calib, subset_size=calib.get_length(), ignored_scope=ignored,
                                     fast_bias_correction=preset.fast_bias_correction, advanced_parameters=ranges, **scheme)
            items = [(control.images[i:i + 1], int(control.labels[i])) for i in range(len(control.labels))]
            validation = nncf.Dataset(items, lambda item: to_input(item[0]))
            return nncf.quantize_with_accuracy_control(
                model, calibration_dataset=calib, validation_dataset=validation, validation_fn=top1,
                max_drop=control.max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib_images),
                ignored_scope=ignored, advanced_quantization_parameters=ranges, fast_bias_correction=preset.fast_bias_correction,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=control.max_iterations),
                **scheme,
            )
        finally:
            keep_signal_stack()  # NNCF's OpenVINO Cores leave the thread's signal stack to chance (core.sigstack)


def has_attention(op_types) -> bool:
    """A classifier graph with a Softmax inside has attention (its logits leave before any softmax)."""
    return any(t in ("Softmax", "SoftMax") for t in op_types)


def make_artifact(runtime, onnx_path: Path, precision: str, workdir: Path, calib_images: np.ndarray) -> Path:
    """``runtime``'s artifact of an exported ONNX at ``precision``, for timing it (profiling, calibrating to this
    machine, timing before training): int8 is quantized from the fp32 artifact on ``calib_images``, with NNCF's
    progress bars kept off the console. Written under ``workdir/<precision>``."""
    import io

    out = workdir / precision
    out.mkdir(parents=True, exist_ok=True)
    artifact = runtime.export(onnx_path, "fp32" if precision == "int8" else precision, out)
    if precision == "int8":
        (out / "quantized").mkdir(exist_ok=True)
        with nncf_quiet(), contextlib.redirect_stderr(io.StringIO()):
            artifact = runtime.quantize(artifact, calib_images, out / "quantized")
    return artifact


def quantize_onnx(src: Path, calib_images: np.ndarray, dst: Path, control: AccuracyControl | None = None, *,
                  preset: QuantPreset | None = None) -> Path:
    """Explicit-quantization (QDQ) ONNX of ``src`` by ``preset``'s quantizer (default ``NNCF_DEFAULT``); the
    preset is recorded in the file's metadata (``read_quant_record``)."""
    import onnx

    preset = preset or NNCF_DEFAULT
    quantizer = QUANTIZERS.get(preset.quantizer)
    if quantizer is None:
        raise EdgecompressError(f"unknown quantizer {preset.quantizer!r} (known: {', '.join(sorted(QUANTIZERS))})")
    extra, ranges, quantized = {}, preset.activation_ranges, None
    if ranges == "choose":
        from edgecompress.onnx_model import fixed_batch

        images = calibration_batches(calib_images, 1 if fixed_batch(src) else 32)  # a static-batch graph: one at a time

        def logits(model) -> np.ndarray:
            session = _onnx_session(model)
            return np.concatenate([session.run(None, {INPUT_NAME: x})[0] for x in images])[:len(calib_images)]

        ranges, extra["range_agreement"], quantized = choose_ranges(
            range_choices(preset), lambda r: quantizer(src, calib_images, None, dataclasses.replace(preset, activation_ranges=r))[0],
            logits, logits(onnx.load(str(src))))
        extra["activation_ranges_chosen"] = ranges
        how = preset.quantizer
    if quantized is None or control is not None:
        quantized, how = quantizer(src, calib_images, control, dataclasses.replace(preset, activation_ranges=ranges))
    _set_onnx_record(quantized, preset, how, extra)
    onnx.save(quantized, str(dst))
    return dst


def _onnx_session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _onnx_top1(model, items):
    session = _onnx_session(model)
    hits = [float(session.run(None, {INPUT_NAME: x})[0].argmax() == y) for x, y in items]
    return float(np.mean(hits)), hits


def _nncf_onnx(src: Path, calib_images: np.ndarray, control: AccuracyControl | None, preset: QuantPreset):
    import onnx

    model = onnx.load(str(src))
    quantized = quantize_with_control(model, calib_images, control, to_input=lambda x: {INPUT_NAME: x}, top1=_onnx_top1,
                                      conv_weights=onnx_conv_weights, preset=preset,
                                      attention=has_attention(n.op_type for n in model.graph.node))
    return quantized, "nncf" if control is None else "nncf accuracy control"


def _ort_static(src: Path, calib_images: np.ndarray, preset: QuantPreset, exclude: list[str]):
    """ONNX Runtime's own ``quantize_static``: it places Q/DQ where its CPU provider fuses them (QLinearConv
    after the convolution, the activation that follows quantized on its own), unlike NNCF's OpenVINO-style
    placement after the activation, which ONNX Runtime leaves as float convolutions plus (de)quantization."""
    import logging
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    ranges = preset.activation_ranges  # "choose" is resolved before this (choose_ranges)
    if ranges != "minmax" and not re.fullmatch(r"percentile:\d+(\.\d+)?", ranges):
        raise EdgecompressError(f"activation_ranges {ranges!r}: ONNX Runtime's quantizer takes minmax or percentile:P")
    method, percentile = ((CalibrationMethod.MinMax, {}) if ranges == "minmax" else
                          (CalibrationMethod.Percentile, {"CalibPercentile": float(ranges.split(":")[1])}))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(calib_images[i:i + 1] for i in range(len(calib_images)))

        def get_next(self):
            x = next(self._items, None)
            return None if x is None else {INPUT_NAME: x}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process: that rewrite renames nodes the profiler maps, and gains nothing here
    try:
        with tempfile.TemporaryDirectory() as tmp, nncf_quiet():
            out = Path(tmp) / "q.onnx"
            quantize_static(str(src), str(out), Reader(), quant_format=formats[preset.quant_format],
                            per_channel=preset.per_channel, activation_type=types[preset.activation_type],
                            weight_type=types[preset.weight_type], calibrate_method=method,
                            nodes_to_exclude=exclude,
                            extra_options={"ActivationSymmetric": preset.symmetric_activations, "WeightSymmetric": True,
                                           "QuantizeBias": preset.quantize_bias, **percentile})
            return onnx.load(str(out))
    finally:
        root.setLevel(level)


def float_convs(model) -> list[str]:
    """Names of the convolutions a QDQ ONNX graph leaves in float (weights not dequantized from int8)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
            and not (n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear")]


def float_input_chains(model, convs: list[str]) -> list[str]:
    """``convs`` and the nodes that make their inputs, back to and including the convolution or matrix product
    before them: what ONNX Runtime's quantizer must leave out to keep a convolution's input float.

    NNCF drops the quantizer on an ignored node's input; ONNX Runtime's ``nodes_to_exclude`` leaves the node float
    but still quantizes its input wherever the producer is quantized, which is what gain_outliers' convolutions
    cannot take (their near-dead input channels round to zero): mobilenetv2_050 on the digits, 80% fp32, was 10%
    in int8 with its 11 outlier depthwise convolutions excluded alone, on ONNX Runtime and TensorRT alike.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    out = []
    for name in convs:
        out.append(name)
        tensor = by_name[name].input[0]
        while tensor in producers and tensor not in inits:
            node = producers[tensor]
            out.append(node.name)
            if node.op_type in ("Conv", "Gemm", "MatMul") or not node.input:
                break
            tensor = node.input[0]
    return list(dict.fromkeys(out))


def _onnxruntime_onnx(src: Path, calib_images: np.ndarray, control: AccuracyControl | None, preset: QuantPreset):
    """ONNX Runtime's quantize_static; with ``control``, kept if the validation drop is within it, else the
    convolutions NNCF's accuracy restorer returns to float are left out of ONNX Runtime's quantization too."""
    import onnx

    model = onnx.load(str(src))
    exclude = float_input_chains(model, gain_outliers(onnx_conv_weights(model)))
    quantized = _ort_static(src, calib_images, preset, exclude)
    if control is None:
        return quantized, "onnxruntime"
    items = [(control.images[i:i + 1], int(control.labels[i])) for i in range(len(control.labels))]
    reference, _ = _onnx_top1(model, items)
    accuracy, _ = _onnx_top1(quantized, items)
    if accuracy >= reference - control.max_drop:
        return quantized, "onnxruntime"
    restored, _ = _nncf_onnx(src, calib_images, control, NNCF_DEFAULT)
    exclude = sorted(set(exclude) | set(float_input_chains(model, float_convs(restored))))
    return _ort_static(src, calib_images, preset, exclude), "onnxruntime, float layers from nncf accuracy control"


# Who writes a QDQ ONNX: (src, calibration images, control, preset) -> (ModelProto, how it was made, in words).
QUANTIZERS: dict[str, Callable] = {"nncf": _nncf_onnx, "onnxruntime": _onnxruntime_onnx}


def _set_onnx_record(model, preset: QuantPreset, how: str, extra: dict | None = None) -> None:
    record = json.dumps({**preset.record(), "key": preset.key(), "made_by": how, **(extra or {})}, sort_keys=True)
    for prop in list(model.metadata_props):
        if prop.key == QUANT_METADATA_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=QUANT_METADATA_KEY, value=record)


def read_quant_record(artifact: Path) -> dict | None:
    """The quant preset an int8 artifact was made with (``QuantPreset.record()`` plus ``key`` and ``made_by``), from
    the artifact itself: ONNX metadata_props, or an OpenVINO IR's rt_info; None for a float artifact."""
    artifact = Path(artifact)
    if artifact.suffix == ".xml":
        from edgecompress.runtimes.openvino import openvino_core

        model = openvino_core().read_model(str(artifact))
        if not model.has_rt_info(["edgecompress", "quant_preset"]):
            return None
        return json.loads(model.get_rt_info(["edgecompress", "quant_preset"]).astype(str))
    import onnx

    props = {p.key: p.value for p in onnx.load(str(artifact), load_external_data=False).metadata_props}
    return json.loads(props[QUANT_METADATA_KEY]) if QUANT_METADATA_KEY in props else None


@runtime_checkable
class Runtime(Protocol):
    """Everything the tool knows about one runtime (its int8 scheme too: ``quant_preset``); code outside ``runtimes/`` asks this object, never its name.

    A runtime class is registered in ``targets.RUNTIMES`` (or another package's ``edgecompress.runtimes`` entry point)
    and instantiated with its target (``Target.runtime()``);
    tests/test_runtimes.py runs the same contract over every registered one.
    """

    name: str  # as target files name it: runtime = "..."
    artifact_name: str  # the artifact's file name in a stage directory and a bundle
    bundle_examples: tuple[str, ...]  # inference examples (bundle_templates/) an application team gets
    verified_in: str  # where verify runs the artifact, in words for the report
    measures_accuracy_on_device: bool  # the device benchmark can also score the test split

    def version(self) -> str: ...
    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path: ...
    def quant_preset(self) -> QuantPreset: ...
    def quantize(self, artifact: Path, calib_images: np.ndarray, out_dir: Path, control: AccuracyControl | None = None) -> Path: ...
    def session(self, artifact: Path) -> Callable[[np.ndarray], np.ndarray]: ...
    def artifact_files(self, artifact: Path) -> list[Path]: ...
    def unavailable_here(self) -> str | None: ...
    def benchmark(self, artifact: Path, *, warmup: int, runs: int, rounds: int = 10, threads: int | None = None) -> dict: ...
    def benchmark_interleaved(self, artifacts: list[Path], *, warmup: int, runs: int, rounds: int,
                              threads: int | None = None) -> list[dict]: ...
    def thread_choices(self) -> tuple[int | None, ...]: ...
    def benchmark_on_device(self, conn, workdir: str, remote_artifact: str, job) -> dict: ...
    def node_times(self, artifact: Path, input_shape, runs: int = 40) -> dict[str, float]: ...
    def deploy_notes(self, artifact: Path, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> dict: ...


class RunnerRuntime:
    """A runtime the stand-alone runner (runtimes/runner.py) times in a fresh process, here or on a device over SSH."""

    measures_accuracy_on_device = True

    def __init__(self, target):
        self.target = target

    def artifact_files(self, artifact: Path) -> list[Path]:
        return [artifact]

    def unavailable_here(self) -> str | None:
        return None

    def thread_choices(self) -> tuple[int | None, ...]:
        """The inference thread counts that pre-measurement compares on this machine: the runtime's own choice
        (None: a thread per core), and one thread where there are more. Batch-1 inference of a small network can run
        faster on one: on 2 cores, resnet10t L1 0.70 ran in 0.062 ms on one ONNX Runtime thread against 0.136 ms on
        its default two, and in 0.108 ms on one OpenVINO thread against 0.122 ms, whose two-thread processes also
        ran 1.5x slower in about one of six (docs/benchmarks.md, session 12)."""
        return (None, 1) if (os.cpu_count() or 1) > 1 else (None,)

    def benchmark(self, artifact: Path, *, warmup: int, runs: int, rounds: int = 10, threads: int | None = None) -> dict:
        return run_local_benchmark(self.name, [artifact], warmup=warmup, runs=runs, rounds=rounds, threads=threads)[0]

    def benchmark_interleaved(self, artifacts: list[Path], *, warmup: int, runs: int, rounds: int,
                              threads: int | None = None) -> list[dict]:
        """Several artifacts in one fresh process, their rounds interleaved (for comparing them)."""
        return run_local_benchmark(self.name, artifacts, warmup=warmup, runs=runs, rounds=rounds, threads=threads)

    def benchmark_on_device(self, conn, workdir: str, remote_artifact: str, job) -> dict:
        from edgecompress.deploy.remote import run_runner_on_device

        return run_runner_on_device(conn, workdir, self.name, remote_artifact, job)

    def node_times(self, artifact: Path, input_shape, runs: int = 40) -> dict[str, float]:
        raise EdgecompressError(f"no per-kernel profiler for runtime {self.name!r}")

    def deploy_notes(self, artifact: Path, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> dict:
        return {}


class OnnxArtifactRuntime(RunnerRuntime):
    """A runtime whose artifact is an ONNX file: fp32 as exported, int8 as QDQ ONNX; verified in ONNX Runtime's CPU
    provider."""

    name = "onnx"
    artifact_name = "model.onnx"
    bundle_examples: tuple[str, ...] = ("infer_onnxruntime.py", "infer_onnxruntime.cpp")
    verified_in = "onnxruntime"

    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path:
        # fp32, fp16 (a build flag on the device) and the graph int8 calibration starts from are one file.
        dst = out_dir / self.artifact_name
        shutil.copyfile(onnx_fp32, dst)
        return dst

    def quant_preset(self) -> QuantPreset:
        return NNCF_DEFAULT

    def quantize(self, artifact: Path, calib_images, out_dir: Path, control: AccuracyControl | None = None) -> Path:
        return quantize_onnx(artifact, calib_images, out_dir / self.artifact_name, control, preset=self.quant_preset())

    conv_weights = staticmethod(onnx_conv_weights)

    def session(self, artifact: Path) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {INPUT_NAME: x})[0]


BENCHMARK_PRIORITY = -10  # nice value of the benchmark process, where the user may raise priority (root)


def _ahead_of_the_builder() -> None:
    """In the benchmark's process: run ahead of the building process, so that its leftover runtime and torch threads
    cannot take the cores from the timed runs. (Builds timed candidates up to 1.8x slower than the same artifacts
    timed alone; this alone has not been shown to close that gap.) Without the right to raise priority, it runs at
    the builder's."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, 0, BENCHMARK_PRIORITY)
    except OSError:
        pass


def run_local_benchmark(runtime_name: str, artifacts: list[Path], *, warmup: int, runs: int, rounds: int = 10,
                        threads: int | None = None) -> list[dict]:
    """Time artifacts in a fresh process (the stand-alone runner), so peak memory is the model's own; several
    artifacts are timed in interleaved rounds, so a slow spell of the machine lands on all of them alike.
    ``threads``: the runtime's inference threads (None: its own choice)."""
    cmd = [sys.executable, "-m", "edgecompress.runtimes.runner", "--runtime", runtime_name,
           *[arg for a in artifacts for arg in ("--artifact", str(a))],
           "--warmup", str(warmup), "--runs", str(runs), "--rounds", str(rounds), "--threads", str(threads or 0)]
    keep_signal_stack()  # its SIGCHLD is handled on that stack when torch's DataLoader has set a handler
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_ahead_of_the_builder)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgecompressError(f"benchmark of {', '.join(a.name for a in artifacts)} in {runtime_name} failed: {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["results"] if "results" in result else [result]
