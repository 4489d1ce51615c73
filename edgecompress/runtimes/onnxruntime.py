"""ONNX Runtime (CPU execution provider)."""

from __future__ import annotations

from pathlib import Path

from edgecompress.runtimes.base import OnnxArtifactRuntime, run_local_benchmark


class OnnxRuntime(OnnxArtifactRuntime):
    name = "onnxruntime"

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__

    def benchmark(self, artifact: Path, *, warmup: int, runs: int) -> dict:
        return run_local_benchmark(self.name, artifact, warmup=warmup, runs=runs)
