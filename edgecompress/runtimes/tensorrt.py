"""TensorRT on Jetson: plain ONNX (fp32/fp16) or QDQ ONNX (int8) plus the trtexec build command.

Engines are specific to the GPU and the TensorRT version, so the engine is
built on the device (JetPack 6 ships TensorRT 10.3). Here, with no device, the
artifact is verified in ONNX Runtime (the QDQ graph runs there with the same
int8 arithmetic) and its latency is the target model's prediction.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from edgecompress.runtimes.base import INPUT_NAME, OnnxArtifactRuntime


class TensorRtRuntime(OnnxArtifactRuntime):
    name = "tensorrt"

    @staticmethod
    def version() -> str:
        try:
            import tensorrt

            return tensorrt.__version__
        except ImportError:
            return "not installed here (engine built on the device)"

    def benchmark(self, artifact: Path, *, warmup: int, runs: int) -> dict | None:
        """None: nothing can be measured without the device."""
        return None

    @staticmethod
    def trtexec_flags(precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> list[str]:
        shape = "x".join(str(d) for d in input_shape)
        args = [f"--shapes={INPUT_NAME}:{shape}"]
        if precision == "fp16":
            args.append("--fp16")
        elif precision == "int8":
            # Q/DQ nodes fix the int8 layers; --fp16 lets the rest run in fp16.
            args += ["--int8", "--fp16"]
        if sparse:
            args.append("--sparsity=enable")
        return args

    @classmethod
    def trtexec_command(cls, onnx_name: str, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> str:
        return shlex.join(["trtexec", f"--onnx={onnx_name}", *cls.trtexec_flags(precision, input_shape, sparse=sparse),
                           f"--saveEngine={Path(onnx_name).stem}.plan"])

    def deploy_notes(self, artifact: Path, precision: str, input_shape: tuple[int, ...], *, sparse: bool = False) -> dict:
        return {"build_command": self.trtexec_command(artifact.name, precision, input_shape, sparse=sparse)}
