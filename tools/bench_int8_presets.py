"""int8 schemes on fine-tuned compressed models: which activation scheme survives fine-tuning.

    python tools/bench_int8_presets.py --json > docs/bench_int8_presets.json

Each case (task, model, method, ratio) is compressed exactly as ``build`` and ``meta collect`` do
(prune, fine-tune 150 steps), exported to an fp32 OpenVINO IR (static batch 1), and quantized by
NNCF on the task's calibration split with every scheme below; top-1 is measured on the whole test
split, one image at a time, in OpenVINO's CPU plugin:

  sym_minmax        symmetric activations ("performance"), ranges from the calibration set's min and max
                    (the openvino-cpu preset of version 1)
  sym_default       symmetric activations, NNCF's default ranges (each image's extremes averaged for
                    per-tensor quantizers, min and max for per-channel ones)
  asym_default      asymmetric activations ("mixed"), NNCF's default ranges
  sym_default_b32   as sym_default, calibrated 32 images an inference with per-image statistics
                    (the openvino-cpu preset of version 2)
  asym_default_b32  as asym_default, 32 images an inference
  tool              the openvino-cpu runtime's own quantize() as `build` makes int8 (preset version 2:
                    min/max or NNCF's ranges, whichever agrees more with fp32 on the calibration images)

    python tools/bench_int8_presets.py --schemes sym_minmax sym_default_b32 tool --cases 0,1,2,11,12,13,14 --json

With ``--target ort-cpu`` or ``--target jetson-orin`` the same cases go through that runtime's ONNX Runtime
quantizer (its preset: u8 asymmetric activations for ONNX Runtime's CPU kernels, s8 symmetric for TensorRT) and
top-1 is measured in ONNX Runtime (the QDQ graph TensorRT builds from runs there with the same int8 arithmetic):

  minmax            the calibration set's min and max (the preset of version 1)
  percentile:P      the range holding P % of each tensor's values, for each of the preset's percentiles
                    (ort-cpu 99.999; TensorRT 99.9 and 99)
  tool              the runtime's own quantize() (preset version 2: whichever of those agrees most with fp32)

    python tools/bench_int8_presets.py --target ort-cpu --cases 0,1,2,11,12,13,14,15 --json > docs/bench_int8_presets_ort-cpu.json
    python tools/bench_int8_presets.py --target jetson-orin --cases 0,1,2,11,12,13,14,15 --json > docs/bench_int8_presets_jetson-orin.json

The default cases: the six Fashion-MNIST rows of meta-dataset v2 with the largest int8 loss (all over 15 pp), five
rows drawn from the other Fashion-MNIST rows (seed 0), the four dense digits models where min/max ranges had
beaten NNCF's default by 2-4 pp (docs/bench_int8.json), and the dense digits mobilenetv2_050 (layers kept float).
Compressed cases are kept under --work and reused by later runs (a run for another target only quantizes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMES = {  # name: (NNCF preset, activation ranges, images per calibration inference)
    "sym_minmax": ("performance", "minmax", 1),
    "sym_default": ("performance", "default", 1),
    "asym_default": ("mixed", "default", 1),
    "sym_default_b32": ("performance", "default", 32),
    "asym_default_b32": ("mixed", "default", 32),
}
# The digits models where min/max ranges beat NNCF's default by 2-4 pp (docs/bench_int8.json).
DIGITS_DENSE = ("lcnet_050", "mnasnet_050", "mobilenetv3_small_100", "regnetx_002")
# NNCF's default ("default"): per-tensor activations from each inference's extremes averaged, per-channel ones
# (the gate inputs of squeeze-excitation multiplies, on CPU) from the min and max.
RANGES = {"minmax": "MINMAX", "default": None}


# Chosen 2026-11-26 from meta-dataset v2's rows with the version-1 preset: the six largest int8 losses on
# Fashion-MNIST, five other Fashion-MNIST rows drawn at random (seed 0), the four digits models above.
CASES = (
    ("fashion-mnist", "lcnet_075", "nncf.magnitude_global", 0.3),
    ("fashion-mnist", "lcnet_075", "torch_pruning.l1", 0.1),
    ("fashion-mnist", "mobilenetv3_small_100", "torch_pruning.l1", 0.3),
    ("fashion-mnist", "lcnet_075", "torch_pruning.l1", 0.5),
    ("fashion-mnist", "mobilenetv3_small_100", "torch_pruning.l1", 0.5),
    ("fashion-mnist", "mobilenetv3_small_075", "torch_pruning.l1", 0.1),
    ("fashion-mnist", "mobilevitv2_050", "torch_pruning.l1", 0.1),
    ("fashion-mnist", "repghostnet_050", "torch_pruning.l1", 0.7),
    ("fashion-mnist", "dla46x_c", "torch_pruning.l1", 0.1),
    ("fashion-mnist", "mobilenetv3_small_050", "none", 0.0),
    ("fashion-mnist", "tf_mobilenetv3_small_minimal_100", "torch_pruning.l1", 0.5),
    *(("digits", m, "none", 0.0) for m in DIGITS_DENSE),
    # Its depthwise convolutions amplify near-dead channels (gain_outliers): int8 on ONNX Runtime kept their inputs
    # quantized until float_input_chains (10% top-1, fp32 80%).
    ("digits", "mobilenetv2_050", "none", 0.0),
)


def quantize(fp32_xml: Path, calib: np.ndarray, preset: str, ranges: str, batch: int):
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from edgecompress.runtimes.base import (
        calibration_dataset,
        gain_outliers,
        nncf_quiet,
    )
    from edgecompress.runtimes.openvino import OpenVinoRuntime, _set_batch

    model = ov.Core().read_model(str(fp32_xml))
    _set_batch(model, batch)
    # Statistics per image whatever the batch (batchwise_statistics): a batch of 32 makes NNCF's per-inference cost
    # 32 times rarer without changing what "each image's extremes averaged" means.
    adv = AdvancedQuantizationParameters(batchwise_statistics=True) if RANGES[ranges] is None else \
        AdvancedQuantizationParameters(activations_range_estimator_params=getattr(RangeEstimatorParametersSet, RANGES[ranges]),
                                       batchwise_statistics=True)
    dataset = calibration_dataset(calib, batch=batch)
    with nncf_quiet():
        quantized = nncf.quantize(model, dataset, subset_size=dataset.get_length(), target_device=nncf.TargetDevice.CPU,
                                  preset=nncf.QuantizationPreset(preset), advanced_parameters=adv,
                                  ignored_scope=nncf.IgnoredScope(names=gain_outliers(OpenVinoRuntime.conv_weights(model))))
    _set_batch(quantized, 1)
    return quantized


def onnx_top1(runtime, path: Path, x, y) -> float:
    """Top-1 of an ONNX artifact in ``runtime``'s own session (ONNX Runtime), one image at a time."""
    from edgecompress.pipeline import run_session

    return float((run_session(runtime.session(path), x, batch_size=1).argmax(1) == y).mean())


def top1(model, x, y) -> float:
    import openvino as ov

    request = ov.Core().compile_model(model, "CPU").create_infer_request()
    out = []
    for i in range(len(x)):
        request.infer({0: x[i:i + 1]})
        out.append(request.get_output_tensor(0).data.argmax())
    return float((np.array(out) == y).mean())


def compressed_case(case, data, work: Path):
    """The case's compressed model as `build` makes it, kept under ``work`` so that other targets' runs reuse it."""
    import pickle

    from edgecompress import pipeline
    from edgecompress.compress.methods import (
        Candidate,
        FinetuneSpec,
        PruneSpec,
        QuantSpec,
    )
    from edgecompress.models import parse_model_spec

    task, model, method, ratio = case
    out = work / f"{task}_{model}_{method}_{ratio}"
    done = out / "compressed.pkl"
    if not done.exists():
        out.mkdir(parents=True, exist_ok=True)
        entry = parse_model_spec(model, task=task)
        cand = Candidate(model=entry.name, prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec())
        (out / "c").mkdir(exist_ok=True)
        done.with_suffix(".tmp").write_bytes(pickle.dumps(pipeline.compress(cand, entry, data, FinetuneSpec(), out / "c")))
        done.with_suffix(".tmp").rename(done)
    return pickle.loads(done.read_bytes())


def run_case(case, datasets, schemes, target_name: str = "openvino-cpu", work: Path = Path("tools/.bench_int8_presets")) -> dict:
    import openvino as ov

    from edgecompress import pipeline
    from edgecompress.data.datasets import load_dataset
    from edgecompress.runtimes.base import quantize_onnx, read_quant_record
    from edgecompress.targets import get_target

    task, model, method, ratio = case
    if task not in datasets:
        datasets[task] = load_dataset(None if task == "digits" else task, 32)
    data = datasets[task]
    target = get_target(target_name)
    runtime = target.runtime()
    onnx_target = runtime.artifact_name.endswith(".onnx")
    x, y = data.split("test")
    calib = data.split("calib")[0]
    row = {"task": task, "model": model, "method": method, "ratio": ratio}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        compressed = compressed_case(case, data, work)
        for sub in ("fp32", "int8"):
            (tmp / sub).mkdir()
        fp32 = pipeline.at_precision(compressed, "fp32", target, data, tmp / "fp32")
        row["fp32"] = onnx_top1(runtime, fp32.artifact, x, y) if onnx_target else top1(ov.Core().read_model(str(fp32.artifact)), x, y)
        for name in schemes:
            if name == "tool":
                tool = pipeline.at_precision(compressed, "int8", target, data, tmp / "int8")
                record = read_quant_record(tool.artifact)
                row["tool_ranges"] = record.get("activation_ranges_chosen", record["activation_ranges"])
                row[name] = onnx_top1(runtime, tool.artifact, x, y) if onnx_target else top1(ov.Core().read_model(str(tool.artifact)), x, y)
            elif onnx_target:
                preset = dataclasses.replace(runtime.quant_preset(), activation_ranges=name)
                row[name] = onnx_top1(runtime, quantize_onnx(fp32.artifact, calib, tmp / f"{name}.onnx", preset=preset), x, y)
            else:
                row[name] = top1(quantize(fp32.artifact, calib, *SCHEMES[name]), x, y)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--cases", type=lambda v: [int(i) for i in v.split(",")], default=None,
                    help="comma-separated indices into CASES (default: all)")
    ap.add_argument("--target", default="openvino-cpu", choices=("openvino-cpu", "ort-cpu", "jetson-orin"),
                    help="whose int8: OpenVINO's NNCF schemes, or an ONNX Runtime quantizer preset's")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / ".bench_int8_presets",
                    help="compressed cases kept here, reused by later runs (other targets)")
    ap.add_argument("--schemes", nargs="+", default=None,
                    help="default: every scheme of the target's quantizer, and the tool's own")
    args = ap.parse_args()
    from edgecompress.runtimes.base import range_choices
    from edgecompress.targets import get_target

    preset = get_target(args.target).runtime().quant_preset()
    known = [*(range_choices(preset) if preset.quantizer == "onnxruntime" else SCHEMES), "tool"]
    args.schemes = args.schemes or known
    if set(args.schemes) - set(known):
        ap.error(f"--schemes for {args.target}: {', '.join(known)}")
    datasets: dict = {}
    rows = []
    for case in [CASES[i] for i in args.cases] if args.cases else CASES:
        rows.append(run_case(case, datasets, args.schemes, args.target, args.work))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    names = ["fp32", *args.schemes]
    mean = {n: float(np.mean([r[n] for r in rows])) for n in names}
    worst = {n: float(min(r[n] - r["fp32"] for r in rows)) for n in names}
    if args.json:
        print(json.dumps({"rows": rows, "mean": mean, "worst_drop": worst}, indent=1))
        return
    print("| task | model | method | ratio | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for r in rows:
        print(f"| {r['task']} | {r['model']} | {r['method']} | {r['ratio']} | " + " | ".join(f"{100 * r[n]:.1f}%" for n in names) + " |")
    print("| **mean** | | | | " + " | ".join(f"{100 * mean[n]:.2f}%" for n in names) + " |")
    print("| **worst drop** | | | | " + " | ".join(f"{100 * worst[n]:+.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
