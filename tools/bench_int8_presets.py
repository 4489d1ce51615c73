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

The default cases: the six Fashion-MNIST rows of meta-dataset v2 with the largest int8 loss (all over 15 pp), five
rows drawn from the other Fashion-MNIST rows (seed 0), and the four dense digits models where min/max ranges had
beaten NNCF's default by 2-4 pp (docs/bench_int8.json).
"""

from __future__ import annotations

import argparse
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


def top1(model, x, y) -> float:
    import openvino as ov

    request = ov.Core().compile_model(model, "CPU").create_infer_request()
    out = []
    for i in range(len(x)):
        request.infer({0: x[i:i + 1]})
        out.append(request.get_output_tensor(0).data.argmax())
    return float((np.array(out) == y).mean())


def run_case(case, datasets, schemes) -> dict:
    import openvino as ov

    from edgecompress import pipeline
    from edgecompress.compress.methods import (
        Candidate,
        FinetuneSpec,
        PruneSpec,
        QuantSpec,
    )
    from edgecompress.data.datasets import load_dataset
    from edgecompress.models import parse_model_spec
    from edgecompress.runtimes.base import read_quant_record
    from edgecompress.targets import get_target

    task, model, method, ratio = case
    if task not in datasets:
        datasets[task] = load_dataset(None if task == "digits" else task, 32)
    data = datasets[task]
    entry = parse_model_spec(model, task=task)
    target = get_target("openvino-cpu")
    x, y = data.split("test")
    calib = data.split("calib")[0]
    row = {"task": task, "model": model, "method": method, "ratio": ratio}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cand = Candidate(model=entry.name, prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec())
        (tmp / "c").mkdir()
        compressed = pipeline.compress(cand, entry, data, FinetuneSpec(), tmp / "c")
        for sub in ("fp32", "int8"):
            (tmp / sub).mkdir()
        fp32 = pipeline.at_precision(compressed, "fp32", target, data, tmp / "fp32")
        row["fp32"] = top1(ov.Core().read_model(str(fp32.artifact)), x, y)
        for name in schemes:
            if name == "tool":
                tool = pipeline.at_precision(compressed, "int8", target, data, tmp / "int8")
                record = read_quant_record(tool.artifact)
                row["tool_ranges"] = record.get("activation_ranges_chosen", record["activation_ranges"])
                row[name] = top1(ov.Core().read_model(str(tool.artifact)), x, y)
            else:
                row[name] = top1(quantize(fp32.artifact, calib, *SCHEMES[name]), x, y)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--cases", type=lambda v: [int(i) for i in v.split(",")], default=None,
                    help="comma-separated indices into CASES (default: all)")
    ap.add_argument("--schemes", nargs="+", default=[*SCHEMES, "tool"], choices=[*SCHEMES, "tool"])
    args = ap.parse_args()
    datasets: dict = {}
    rows = []
    for case in [CASES[i] for i in args.cases] if args.cases else CASES:
        rows.append(run_case(case, datasets, args.schemes))
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
