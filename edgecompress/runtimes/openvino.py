"""OpenVINO CPU plugin: IR (.xml + .bin), fp16 weight compression, NNCF int8."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecompress.runtimes.base import AccuracyControl, quantize_with_control, run_local_benchmark


class OpenVinoRuntime:
    name = "openvino"

    def __init__(self, target):
        self.target = target

    @staticmethod
    def version() -> str:
        import openvino

        return openvino.get_version()

    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path:
        import openvino as ov

        model = ov.convert_model(str(onnx_fp32))
        dst = out_dir / "model.xml"
        ov.save_model(model, str(dst), compress_to_fp16=(precision == "fp16"))
        return dst

    def quantize(self, artifact: Path, calib_images, out_dir: Path, control: AccuracyControl | None = None) -> Path:
        import openvino as ov

        def top1(compiled, items):
            hits = [float(compiled(x)[0].argmax() == y) for x, y in items]
            return float(np.mean(hits)), hits

        model = ov.Core().read_model(str(artifact))
        quantized = quantize_with_control(model, calib_images, control, to_input=lambda x: x, top1=top1)
        dst = out_dir / "model.xml"
        ov.save_model(quantized, str(dst), compress_to_fp16=False)
        return dst

    def session(self, artifact: Path):
        import openvino as ov

        compiled = ov.Core().compile_model(str(artifact), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def infer(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return infer

    def benchmark(self, artifact: Path, *, warmup: int, runs: int) -> dict:
        return run_local_benchmark(self.name, artifact, warmup=warmup, runs=runs)

    def deploy_notes(self, artifact: Path, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> dict:
        return {}
