"""ONNX Runtime (CPU execution provider)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgecompress.runtimes.base import OnnxSessionMixin, quantize_onnx, run_local_benchmark


class OnnxRuntime(OnnxSessionMixin):
    name = "onnxruntime"

    def __init__(self, target):
        self.target = target

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__

    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path:
        # fp32 and the graph int8 calibration starts from are the same file.
        dst = out_dir / "model.onnx"
        shutil.copyfile(onnx_fp32, dst)
        return dst

    def quantize(self, artifact: Path, calib_images, out_dir: Path) -> Path:
        return quantize_onnx(artifact, calib_images, out_dir / "model.onnx")

    def session(self, artifact: Path):
        return self.onnx_session(artifact)

    def benchmark(self, artifact: Path, *, warmup: int, runs: int) -> dict:
        return run_local_benchmark(self.name, artifact, warmup=warmup, runs=runs)

    def deploy_notes(self, artifact: Path, precision: str) -> dict:
        return {}
