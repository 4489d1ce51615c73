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
        # Static batch 1, the shape it is timed and deployed at. OpenVINO 2026.4's CPU plugin runs NNCF int8 IRs with a
        # dynamic batch axis wrongly at batch 1 (lcnet_050: 12% top-1 at batch 1, 95% at batch 2 and up, 95% static).
        shape = model.input(0).get_partial_shape()
        shape[0] = 1
        model.reshape({model.input(0): shape})
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

        def infer(x: np.ndarray) -> np.ndarray:  # the IR takes one image at a time
            out = []
            for i in range(len(x)):
                request.infer({0: x[i:i + 1]})
                out.append(request.get_output_tensor(0).data.copy())
            return np.concatenate(out)

        return infer

    def benchmark(self, artifact: Path, *, warmup: int, runs: int) -> dict:
        return run_local_benchmark(self.name, artifact, warmup=warmup, runs=runs)

    def deploy_notes(self, artifact: Path, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> dict:
        return {}
