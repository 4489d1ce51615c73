"""int8 post-training quantization on every zoo model: what each of the tool's choices is worth.

    python tools/bench_int8.py --json > docs/bench_int8.json

For each zoo model, the dense fp32 model is quantized by NNCF with the 306 real
calibration images and its top-1 measured on the 360 test images, one image at a
time (batch 1, as it is timed and deployed), in OpenVINO (IR) and ONNX Runtime (QDQ ONNX):

  nncf_default     NNCF's defaults: activation ranges averaged over each image's extremes, every conv int8
  minmax           activation ranges from the calibration set's min and max
  tool             minmax, and the convolutions runtimes.base.gain_outliers finds kept in float
                   (the runtimes' own quantize(), which `build` uses)

and, for OpenVINO, the tool's int8 model saved with a dynamic batch axis (as before
2026-11-24) run at batch 1 and at batch 64, to show the plugin's batch-1 fault.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgecompress.data.datasets import load_digits  # noqa: E402
from edgecompress.models import get_model, list_models, load_model  # noqa: E402
from edgecompress.pipeline import run_session  # noqa: E402
from edgecompress.runtimes.base import calibration_dataset, export_onnx, gain_outliers, nncf_quiet, quantize_onnx  # noqa: E402
from edgecompress.targets import get_target  # noqa: E402


def _top1(logits, labels) -> float:
    return float((logits.argmax(1) == labels).mean())


def _nncf(model, calib, to_input, minmax: bool):
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    adv = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX) if minmax else None
    with nncf_quiet():
        return nncf.quantize(model, calibration_dataset(calib, to_input), subset_size=len(calib), advanced_parameters=adv)


def run_model(name: str, data) -> dict:
    import onnx
    import onnxruntime as ort
    import openvino as ov

    calib = data.split("calib")[0]
    x, y = data.split("test")
    core = ov.Core()
    row = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = export_onnx(load_model(get_model(name), data.num_classes), data.input_shape, tmp / "m.onnx")

        def ort_top1(model_proto) -> float:
            session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
            return _top1(run_session(lambda b: session.run(None, {"input": b})[0], x, batch_size=1), y)

        runtime = get_target("openvino-cpu").runtime()
        (tmp / "fp32").mkdir()
        (tmp / "int8").mkdir()
        fp32_ir = runtime.export(src, "fp32", tmp / "fp32")
        row["openvino_fp32"] = _top1(run_session(runtime.session(fp32_ir), x), y)
        static = core.read_model(str(fp32_ir))
        for label, minmax in (("nncf_default", False), ("minmax", True)):
            compiled = core.compile_model(_nncf(static, calib, lambda a: a, minmax), "CPU")
            row[f"openvino_{label}"] = _top1(run_session(lambda b: compiled(b)[0], x, batch_size=1), y)
        row["openvino_tool"] = _top1(run_session(runtime.session(runtime.quantize(fp32_ir, calib, tmp / "int8")), x), y)
        dynamic = core.read_model(str(tmp / "int8" / "model.xml"))
        dynamic.reshape({dynamic.input(0): [-1, *data.input_shape[1:]]})
        compiled = core.compile_model(dynamic, "CPU")
        for batch in (1, 64):
            row[f"openvino_tool_dynamic_batch{batch}"] = _top1(run_session(lambda b: compiled(b)[0], x, batch_size=batch), y)
        row["gain_outliers"] = len(gain_outliers(runtime.conv_weights(static)))

        row["ort_fp32"] = ort_top1(onnx.load(str(src)))
        for label, minmax in (("nncf_default", False), ("minmax", True)):
            row[f"ort_{label}"] = ort_top1(_nncf(onnx.load(str(src)), calib, lambda a: {"input": a}, minmax))
        row["ort_tool"] = ort_top1(onnx.load(str(quantize_onnx(src, calib, tmp / "q.onnx"))))
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = load_digits(32)
    rows = []
    for name in args.models or list_models():
        rows.append(run_model(name, data))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k not in ("model", "gain_outliers")]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    if args.json:
        print(json.dumps({"rows": rows, "mean": summary}, indent=2))


if __name__ == "__main__":
    main()
