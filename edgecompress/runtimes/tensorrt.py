"""TensorRT on Jetson: plain ONNX (fp32/fp16) or QDQ ONNX (int8) plus the trtexec build command.

Engines are specific to the GPU and the TensorRT version, so the engine is
built on the device (JetPack 6 ships TensorRT 10.3). Here, with no device, the
artifact is verified in ONNX Runtime (the QDQ graph runs there with the same
int8 arithmetic) and its latency is the target model's prediction.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from edgecompress.runtimes.base import INPUT_NAME, OnnxSessionMixin, quantize_onnx


class TensorRtRuntime(OnnxSessionMixin):
    name = "tensorrt"

    def __init__(self, target):
        self.target = target

    @staticmethod
    def version() -> str:
        try:
            import tensorrt

            return tensorrt.__version__
        except ImportError:
            return "not installed here (engine built on the device)"

    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path:
        dst = out_dir / "model.onnx"
        shutil.copyfile(onnx_fp32, dst)
        return dst

    def quantize(self, artifact: Path, calib_images, out_dir: Path) -> Path:
        return quantize_onnx(artifact, calib_images, out_dir / "model.onnx")

    def session(self, artifact: Path):
        return self.onnx_session(artifact)

    def benchmark(self, artifact: Path, *, warmup: int, runs: int) -> dict | None:
        """None: nothing can be measured without the device."""
        return None

    @staticmethod
    def trtexec_command(onnx_name: str, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> str:
        shape = "x".join(str(d) for d in input_shape)
        args = ["trtexec", f"--onnx={onnx_name}", f"--shapes={INPUT_NAME}:{shape}"]
        if precision == "fp16":
            args.append("--fp16")
        elif precision == "int8":
            # Q/DQ nodes fix the int8 layers; --fp16 lets the rest run in fp16.
            args += ["--int8", "--fp16"]
        if sparse:
            args.append("--sparsity=enable")
        args.append(f"--saveEngine={Path(onnx_name).stem}.plan")
        return shlex.join(args)

    def deploy_notes(self, artifact: Path, precision: str, input_shape=(1, 3, 32, 32)) -> dict:
        return {"build_command": self.trtexec_command(artifact.name, precision, input_shape)}
