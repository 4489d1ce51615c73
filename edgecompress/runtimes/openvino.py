"""OpenVINO CPU plugin: IR (.xml + .bin), fp16 weight compression, NNCF int8."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgecompress.core.sigstack import keep_signal_stack
from edgecompress.runtimes.base import (
    NNCF_RANGES,
    AccuracyControl,
    QuantPreset,
    RunnerRuntime,
    calibration_batches,
    choose_ranges,
    has_attention,
    quantize_with_control,
)

# NNCF's OpenVINO flow for the CPU plugin: symmetric (PERFORMANCE) int8, per-channel weights, fast bias correction.
# Measured 2026-11-25 on the 4 digits models of docs/bench_peers.md: target_device CPU writes the same weights as ANY
# (identical .bin); MIXED and full bias correction were no faster and no more accurate beyond one test image.
# Version 2 (2026-11-26, tools/bench_int8_presets.py): activation ranges chosen per model ("choose": min/max or NNCF's
# averaged extremes, whichever int8 agrees more with the float model on the calibration images). Min/max alone
# collapsed fine-tuned hard-swish networks (lcnet_075, mobilenetv3_small_100: 1-2% of images drive the last layers
# 30-60 times past the rest, and a range that holds them leaves the others a step or two: 13-22% top-1 where fp32
# has 75-83%); NNCF's ranges alone cost dense digits models 2-4 pp. Calibrated 32 images an inference, statistics
# still per image.
OPENVINO_CPU_PRESET = QuantPreset(quantizer="nncf", target_device="CPU", preset="performance", activation_ranges="choose",
                                  calibration_batch=32, version=2)


@functools.cache
def openvino_core():
    """The process's one OpenVINO Core: every read and compile of ours goes through it, so its CPU plugin is made
    once (a plugin per Core costs its setup and maps a signal stack each time: core.sigstack)."""
    import openvino as ov

    return ov.Core()


def cpu_inference_precision() -> str:
    """The precision OpenVINO's CPU plugin computes float layers in on this machine, as it compiles our artifacts
    (no hint is set): "f32", or "bf16" on CPUs with bfloat16 instructions (AVX512_BF16, AMX), where an fp32 IR
    runs in bfloat16 and top-1 differs from torch's by up to a few tenths of a point."""
    return openvino_core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


class OpenVinoRuntime(RunnerRuntime):
    name = "openvino"
    artifact_name = "model.xml"
    bundle_examples = ("infer_openvino.py",)

    @property
    def verified_in(self) -> str:
        """Where verify ran, with the precision the CPU plugin gave float layers: bf16 on CPUs that have it, unless
        told otherwise, which is also what the artifact gets where it is deployed on such a CPU with defaults."""
        return f"openvino (CPU plugin; float layers in {cpu_inference_precision()}, its default on this CPU)"

    @staticmethod
    def version() -> str:
        import openvino

        return openvino.get_version()

    def export(self, onnx_fp32: Path, precision: str, out_dir: Path) -> Path:
        import openvino as ov

        model = ov.convert_model(str(onnx_fp32))
        # Static batch 1, the shape it is timed and deployed at. OpenVINO 2026.4's CPU plugin runs NNCF int8 IRs with a
        # dynamic batch axis wrongly at batch 1 (lcnet_050: 12% top-1 at batch 1, 95% at batch 2 and up, 95% static).
        _set_batch(model, 1)
        dst = out_dir / self.artifact_name
        ov.save_model(model, str(dst), compress_to_fp16=(precision == "fp16"))
        return dst

    def quant_preset(self) -> QuantPreset:
        return OPENVINO_CPU_PRESET

    def quantize(self, artifact: Path, calib_images, out_dir: Path, control: AccuracyControl | None = None) -> Path:
        import dataclasses
        import json

        import openvino as ov

        def top1(compiled, items):
            hits = [float(compiled(x)[0].argmax() == y) for x, y in items]
            return float(np.mean(hits)), hits

        preset = self.quant_preset()
        record = {**preset.record(), "key": preset.key()}
        ranges, quantized = preset.activation_ranges, None
        if ranges == "choose":
            ranges, record["range_agreement"], quantized = self._choose_ranges(artifact, calib_images, preset)
            record["activation_ranges_chosen"] = ranges
        if quantized is None or control is not None:
            # Calibrated on a copy with a batch of calibration_batch images (NNCF's statistics cost per inference),
            # saved at static batch 1 as deployed (the CPU plugin's batch-1 fault with dynamic int8 IRs: export).
            # Accuracy control validates image by image: batch 1 throughout.
            batch = preset.calibration_batch if control is None else 1
            quantized = self._nncf(artifact, calib_images, dataclasses.replace(preset, activation_ranges=ranges), batch,
                                   control, top1)
        record["made_by"] = "nncf" if control is None else "nncf accuracy control"
        quantized.set_rt_info(json.dumps(record, sort_keys=True), ["edgecompress", "quant_preset"])
        dst = out_dir / self.artifact_name
        ov.save_model(quantized, str(dst), compress_to_fp16=False)
        return dst

    def _nncf(self, artifact: Path, calib_images, preset: QuantPreset, batch: int, control=None, top1=None):
        """NNCF's int8 of the IR at ``artifact`` by ``preset`` (concrete ranges), calibrated ``batch`` images an
        inference, returned at static batch 1."""
        model = openvino_core().read_model(str(artifact))
        if batch > 1:
            _set_batch(model, batch)
        quantized = quantize_with_control(model, calib_images, control, to_input=lambda x: x, top1=top1,
                                          conv_weights=self.conv_weights, preset=preset, batch=batch,
                                          attention=has_attention(op.get_type_name() for op in model.get_ordered_ops()))
        if batch > 1:
            _set_batch(quantized, 1)
        return quantized

    def _choose_ranges(self, artifact: Path, calib_images, preset: QuantPreset) -> tuple[str, dict, object]:
        """activation_ranges="choose" (choose_ranges) with NNCF's range rules, calibrated and compared
        ``calibration_batch`` images an inference; the chosen model comes back at static batch 1."""
        import dataclasses

        batch = max(preset.calibration_batch, 1)
        images = calibration_batches(calib_images, batch)

        def logits(model) -> np.ndarray:
            _set_batch(model, batch)
            request = openvino_core().compile_model(model, "CPU").create_infer_request()
            out = []
            for x in images:
                request.infer({0: x})
                out.append(request.get_output_tensor(0).data.copy())
            _set_batch(model, 1)
            return np.concatenate(out)[:len(calib_images)]

        return choose_ranges(NNCF_RANGES,
                             lambda r: self._nncf(artifact, calib_images, dataclasses.replace(preset, activation_ranges=r), batch),
                             logits, logits(openvino_core().read_model(str(artifact))))

    def session(self, artifact: Path):
        compiled = openvino_core().compile_model(str(artifact), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        keep_signal_stack()  # the first compile makes the Core's CPU plugin, which maps its own (core.sigstack)

        def infer(x: np.ndarray) -> np.ndarray:  # the IR takes one image at a time
            out = []
            for i in range(len(x)):
                request.infer({0: x[i:i + 1]})
                out.append(request.get_output_tensor(0).data.copy())
            return np.concatenate(out)

        return infer

    @staticmethod
    def conv_weights(model):
        """(friendly name, weight array) of every convolution with constant weights in an OpenVINO Model."""
        for op in model.get_ordered_ops():
            if op.get_type_name() in ("Convolution", "GroupConvolution"):
                weight = op.input_value(1).get_node()
                if weight.get_type_name() == "Constant":
                    data = weight.get_data()
                    yield op.get_friendly_name(), data.reshape(-1, *data.shape[-3:]) if data.ndim == 5 else data

    def artifact_files(self, artifact: Path) -> list[Path]:
        return [artifact, artifact.with_suffix(".bin")]

    def node_times(self, artifact: Path, input_shape, runs: int = 40) -> dict[str, float]:
        """Mean time per executed node (microseconds per inference), from OpenVINO's PERF_COUNT profiling."""
        import openvino as ov

        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        compiled = openvino_core().compile_model(str(artifact), "CPU", {"PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
        request = compiled.create_infer_request()
        keep_signal_stack()
        for _ in range(10):
            request.infer({0: x})
        totals: dict[str, float] = {}
        for _ in range(runs):
            request.infer({0: x})
            for info in request.get_profiling_info():
                if info.status == ov.ProfilingInfo.Status.EXECUTED:
                    totals[info.node_name] = totals.get(info.node_name, 0.0) + info.real_time.total_seconds() * 1e6
        return {n: t / runs for n, t in totals.items()}


def _set_batch(model, batch: int) -> None:
    """Fix the batch axis of an OpenVINO Model's input to ``batch``, in place."""
    shape = model.input(0).get_partial_shape()
    shape[0] = batch
    model.reshape({model.input(0): shape})
