"""TensorRT on Jetson: plain ONNX (fp32/fp16) or QDQ ONNX (int8) plus the trtexec build command.

Engines are specific to the GPU and the TensorRT version, so the engine is
built on the device (JetPack 6 ships TensorRT 10.3): ``--device`` runs trtexec
there (edgecompress.deploy.remote). Without a device, the artifact is verified in ONNX
Runtime (the QDQ graph runs there with the same int8 arithmetic); where the
tensorrt Python package and a CUDA GPU are on this machine, the engine is built
and timed here with the TensorRT Python API, otherwise the latency is the
target model's prediction.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from edgecompress.runtimes.base import INPUT_NAME, OnnxArtifactRuntime, QuantPreset

# TensorRT's explicit quantization takes INT8 Q/DQ with zero points of 0 only (symmetric; no UINT8 tensors) and
# fuses the bias itself: s8 symmetric per-tensor activations, s8 symmetric per-channel weights, float bias, QDQ.
# NNCF's QDQ writes u8 activations after ReLUs, which TensorRT's ONNX parser refuses.
# Version 2 (2026-11-26, tools/bench_int8_presets.py --target jetson-orin): activation ranges chosen per model among
# min/max and the 99.9th and 99th percentiles. Symmetric ranges need the narrower ones on fine-tuned hard-swish
# networks (lcnet_075 pruned 10%: fp32 83%, min/max 37%, 99.9 46%, 99 80%), and dense digits models lose 2-24 pp
# with 99 (lcnet_050: min/max 97%, 99.9 94%, 99 77%).
TENSORRT_PRESET = QuantPreset(quantizer="onnxruntime", quant_format="qdq", activation_type="s8", weight_type="s8",
                              per_channel=True, symmetric_activations=True, quantize_bias=False,
                              activation_ranges="choose", percentiles=(99.9, 99.0), version=2)


class TensorRtRuntime(OnnxArtifactRuntime):
    name = "tensorrt"
    # The engine examples run on the Jetson after build_engine.sh; the QDQ ONNX also runs in ONNX Runtime, which
    # checks the bundle off the device.
    bundle_examples = ("infer_tensorrt.py", "infer_tensorrt.cpp", "infer_onnxruntime.py", "infer_onnxruntime.cpp")
    verified_in = "onnxruntime (QDQ/ONNX graph; the TensorRT engine is built on the device)"
    measures_accuracy_on_device = False  # trtexec times the engine; it does not run a test split

    @staticmethod
    def version() -> str:
        try:
            import tensorrt

            return tensorrt.__version__
        except ImportError:
            return "not installed here (engine built on the device)"

    def quant_preset(self) -> QuantPreset:
        return TENSORRT_PRESET

    def unavailable_here(self) -> str | None:
        return local_tensorrt_missing()

    def thread_choices(self) -> tuple[int | None, ...]:
        return (None,)  # an engine's speed is the GPU's

    def benchmark(self, artifact: Path, *, warmup: int, runs: int, rounds: int = 10, threads: int | None = None) -> dict:
        """Build and time the engine on this machine's GPU (check ``unavailable_here`` first); ``threads`` is the CPU
        runtimes' setting, nothing to a GPU engine."""
        return time_engine_locally(artifact, onnx_precision(artifact), onnx_input_shape(artifact), warmup=warmup, runs=runs,
                                   rounds=rounds)

    def benchmark_interleaved(self, artifacts: list[Path], *, warmup: int, runs: int, rounds: int,
                              threads: int | None = None) -> list[dict]:
        # Each engine is built and timed on its own; the GPU is not shared with anything else here.
        return [self.benchmark(a, warmup=warmup, runs=runs, rounds=rounds) for a in artifacts]

    def benchmark_on_device(self, conn, workdir: str, remote_artifact: str, job) -> dict:
        """trtexec on the device builds the engine and times it; its summary is parsed (edgecompress.deploy.trtexec)."""
        from edgecompress.core.errors import DeviceError, TrtexecParseError
        from edgecompress.deploy.remote import keep_log, last_line
        from edgecompress.deploy.trtexec import parse_trtexec

        device = conn.device
        location = conn.options.trtexec
        probe = " || ".join(f"command -v {shlex.quote(p)}" for p in ((location,) if location else TRTEXEC_LOCATIONS))
        rc, out, _ = conn.run_shell(probe, timeout=30)
        if rc != 0 or not out.strip():
            where = location or "on PATH and in /usr/src/tensorrt/bin"
            raise DeviceError(f"{device}: trtexec not found ({where}); install TensorRT or pass --remote-trtexec PATH")
        trtexec = out.strip().splitlines()[0]
        engine = f"{workdir}/model.plan"
        local = Path(job.artifact)
        precision = job.precision or onnx_precision(local)
        flags = self.trtexec_flags(precision, onnx_input_shape(local), sparse=job.sparse)
        args = [trtexec, f"--onnx={remote_artifact}", *flags, f"--saveEngine={engine}",
                f"--warmUp={max(job.warmup, 1) * 10}", f"--iterations={job.runs}", "--avgRuns=1"]
        rc, out, err = conn.run(args, timeout=1800)
        keep_log(job.log_dir, args, out, err)
        if rc != 0:
            raise DeviceError(f"{device}: trtexec failed (exit {rc}): {last_line(out + err)}; its log is in device.log")
        rc2, size, _ = conn.run(["stat", "-c", "%s", engine], timeout=30)
        try:
            parsed = parse_trtexec(out + err)
        except TrtexecParseError as exc:
            raise DeviceError(f"{device}: {exc}; its log is in device.log") from None
        if rc2 == 0 and size.strip().isdigit():
            parsed["engine_size_mb"] = int(size.strip()) / 1e6
        parsed.update({"runtime": "tensorrt", "runtime_version": parsed["tensorrt_version"], "runs": job.runs,
                       "model_size_mb": parsed.get("engine_size_mb"), "peak_memory_mb": None})
        return parsed

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


TRTEXEC_LOCATIONS = ("trtexec", "/usr/src/tensorrt/bin/trtexec")  # JetPack keeps it off PATH


def onnx_precision(path: Path) -> str:
    """int8 for an explicit-quantization (QDQ) graph; fp16 otherwise (TensorRT's usual build)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return "int8" if any(n.op_type == "QuantizeLinear" for n in graph.node) else "fp16"


def onnx_input_shape(path: Path) -> tuple[int, ...]:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)


def local_tensorrt_missing() -> str | None:
    """None when an engine can be built and timed here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install '.[tensorrt]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def time_engine_locally(onnx_path: Path, precision: str, input_shape: tuple[int, ...], *, warmup: int, runs: int,
                        rounds: int = 10, sparse: bool = False) -> dict:
    """Build a TensorRT engine from the ONNX with the Python API and time it on the local GPU (batch 1)."""
    import time

    import numpy as np
    import tensorrt as trt
    import torch

    from edgecompress.core.errors import EdgecompressError

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgecompressError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes carry the scales
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, input_shape, input_shape, input_shape)
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgecompressError(f"TensorRT could not build an engine from {onnx_path.name}")
    build_s = time.perf_counter() - started
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    context = engine.create_execution_context()
    context.set_input_shape(INPUT_NAME, input_shape)
    x = torch.randn(input_shape, device="cuda")
    out = torch.empty(tuple(context.get_tensor_shape("logits")), device="cuda")
    context.set_tensor_address(INPUT_NAME, x.data_ptr())
    context.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.Stream()
    for _ in range(warmup):
        context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return {
        "runtime": "tensorrt", "runtime_version": trt.__version__, "runs": runs, "warmup": warmup,
        "latency_ms_median": float(np.median(times)), "latency_ms_p90": float(np.percentile(times, 90)),
        "latency_ms_mean": float(np.mean(times)), "latency_ms_min": float(np.min(times)),
        "engine_build_s": build_s, "engine_size_mb": serialized.nbytes / 1e6, "model_size_mb": serialized.nbytes / 1e6,
        "peak_memory_mb": engine.device_memory_size / 1e6 + serialized.nbytes / 1e6,
        "gpu": torch.cuda.get_device_name(0), "precision": precision,
        "rounds_ms": [chunk.tolist() for chunk in np.array_split(np.asarray(times), max(1, min(rounds, runs)))],
    }
