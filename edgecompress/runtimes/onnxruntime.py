"""ONNX Runtime (CPU execution provider)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from edgecompress.runtimes.base import OnnxArtifactRuntime, QuantPreset

# ONNX Runtime's own static quantizer, QDQ, u8 activations and s8 per-channel weights (the pair its x86 kernels
# run as QLinearConv; s8 activations ran 2.8x slower than u8 on resnet10t). NNCF's QDQ places the quantizer after
# the activation, so ONNX Runtime fuses nothing in HardSwish networks: lcnet_050 int8 0.71-0.87 ms against
# 0.16 ms with this preset (fp32 0.10 ms). Measured 2026-11-25, docs/bench_peers.md.
# Version 2 (2026-11-26): activation ranges chosen per model (min/max, or the range holding 99.999% of each
# tensor's calibration values, whichever int8 agrees more with fp32 on the calibration images): min/max alone
# lost 12 pp on a fine-tuned lcnet_075 (71% against 83%), percentiles alone up to 3 pp on dense digits models
# (tools/bench_int8_presets.py --target ort-cpu).
ORT_CPU_PRESET = QuantPreset(quantizer="onnxruntime", quant_format="qdq", activation_type="u8", weight_type="s8",
                             per_channel=True, activation_ranges="choose", percentiles=(99.999,), version=2)


class OnnxRuntime(OnnxArtifactRuntime):
    name = "onnxruntime"

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__

    def quant_preset(self) -> QuantPreset:
        return ORT_CPU_PRESET

    def node_times(self, artifact: Path, input_shape, runs: int = 40) -> dict[str, float]:
        """Mean time per executed node (microseconds per inference), from ONNX Runtime's own profiler trace."""
        import onnxruntime as ort

        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "ort")
            session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            for _ in range(10 + runs):
                session.run(None, {name: x})
            trace = json.loads(Path(session.end_profiling()).read_text())
        # The warm-up runs are in the trace too: keep each node's last ``runs`` events.
        events: dict[str, list] = {}
        for e in trace:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                events.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"])
        return {n: float(np.mean(d[-runs:])) for n, d in events.items()}
