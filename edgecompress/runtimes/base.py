"""What every runtime shares: ONNX export from torch and NNCF post-training quantization."""

from __future__ import annotations

import contextlib
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


def nncf_quiet():
    """NNCF draws progress bars on stdout; keep stdout for the tool's own output (--json)."""
    return contextlib.redirect_stdout(sys.stderr)


def calibration_dataset(images: np.ndarray, transform: Callable | None = None):
    import nncf

    items = [images[i:i + 1] for i in range(len(images))]
    return nncf.Dataset(items, transform)


def quantize_onnx(src: Path, calib_images: np.ndarray, dst: Path) -> Path:
    """Explicit-quantization (QDQ) ONNX: int8 per-channel weights, per-tensor activations."""
    import nncf
    import onnx

    model = onnx.load(str(src))
    dataset = calibration_dataset(calib_images, lambda x: {INPUT_NAME: x})
    with nncf_quiet():
        quantized = nncf.quantize(model, dataset, subset_size=len(calib_images))
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

    def quantize(self, artifact: Path, calib_images, out_dir: Path) -> Path:
        return quantize_onnx(artifact, calib_images, out_dir / "model.onnx")

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
