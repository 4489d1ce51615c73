"""What every runtime shares: ONNX export from torch and NNCF post-training quantization."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgecompress.errors import EdgecompressError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(model, input_shape: tuple[int, ...], path: Path) -> Path:
    """fp32 ONNX with a dynamic batch axis (TorchScript exporter: stable for timm CNNs)."""
    import torch

    model = model.eval()
    with torch.no_grad():
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


def calibration_dataset(images: np.ndarray, transform: Callable | None = None):
    import nncf

    items = [images[i:i + 1] for i in range(len(images))]
    return nncf.Dataset(items, transform)


@dataclasses.dataclass(frozen=True)
class AccuracyControl:
    """Accuracy-aware int8: layers are returned to float, most sensitive first, until the drop is within ``max_drop``."""

    images: np.ndarray  # validation split, NCHW float32
    labels: np.ndarray
    max_drop: float  # absolute top-1
    max_iterations: int = 16  # layers reverted at most (bounds the time on a collapsing model)


def quantize_with_control(model, calib_images: np.ndarray, control: AccuracyControl | None, *, to_input, top1):
    """``nncf.quantize``, or ``nncf.quantize_with_accuracy_control`` when ``control`` is given.

    ``to_input(x)`` maps an NCHW batch to the model's input; ``top1(model, items)`` is the backend's
    validation function over (image, label) items.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    calib = calibration_dataset(calib_images, to_input)
    with nncf_quiet():
        if control is None:
            return nncf.quantize(model, calib, subset_size=len(calib_images))
        items = [(control.images[i:i + 1], int(control.labels[i])) for i in range(len(control.labels))]
        validation = nncf.Dataset(items, lambda item: to_input(item[0]))
        return nncf.quantize_with_accuracy_control(
            model, calibration_dataset=calib, validation_dataset=validation, validation_fn=top1,
            max_drop=control.max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib_images),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=control.max_iterations),
        )


def quantize_onnx(src: Path, calib_images: np.ndarray, dst: Path, control: AccuracyControl | None = None) -> Path:
    """Explicit-quantization (QDQ) ONNX: int8 per-channel weights, per-tensor activations."""
    import onnx

    def top1(model, items):
        import onnxruntime as ort

        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        hits = [float(session.run(None, {INPUT_NAME: x})[0].argmax() == y) for x, y in items]
        return float(np.mean(hits)), hits

    quantized = quantize_with_control(onnx.load(str(src)), calib_images, control,
                                      to_input=lambda x: {INPUT_NAME: x}, top1=top1)
    onnx.save(quantized, str(dst))
    return dst


class OnnxArtifactRuntime:
    """A runtime whose artifact is an ONNX file: fp32 as exported, int8 as QDQ ONNX.

    Verification runs the file in ONNX Runtime's CPU provider.
    """

    name = "onnx"

    def __init__(self, target):
        self.target = target

    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path:
        # fp32, fp16 (a build flag on the device) and the graph int8 calibration starts from are one file.
        dst = out_dir / "model.onnx"
        shutil.copyfile(onnx_fp32, dst)
        return dst

    def quantize(self, artifact: Path, calib_images, out_dir: Path, control: AccuracyControl | None = None) -> Path:
        return quantize_onnx(artifact, calib_images, out_dir / "model.onnx", control)

    def session(self, artifact: Path) -> Callable[[np.ndarray], np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {INPUT_NAME: x})[0]

    def deploy_notes(self, artifact: Path, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> dict:
        return {}


def run_local_benchmark(runtime_name: str, artifact: Path, *, warmup: int, runs: int) -> dict:
    """Time the artifact in a fresh process, so peak memory is the model's own."""
    cmd = [
        sys.executable, "-m", "edgecompress.runner",
        "--runtime", runtime_name, "--artifact", str(artifact),
        "--warmup", str(warmup), "--runs", str(runs),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgecompressError(f"benchmark of {artifact.name} in {runtime_name} failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
