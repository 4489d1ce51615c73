"""int8 schemes on fine-tuned compressed models: which activation scheme survives fine-tuning.

    python tools/bench_int8_presets.py --json > docs/bench_int8_presets.json

Each case (task, model, method, ratio) is compressed exactly as ``build`` and ``meta collect`` do
(prune, fine-tune 150 steps), exported to an fp32 OpenVINO IR (static batch 1), and quantized by
NNCF on the task's calibration split with every scheme below; top-1 is measured on the whole test
split, one image at a time, in OpenVINO's CPU plugin:

  sym_minmax     symmetric activations ("performance"), ranges from the calibration set's min and max
                 (the openvino-cpu preset of version 1)
  sym_mean       symmetric activations, NNCF's default ranges (each image's extremes averaged)
  asym_minmax    asymmetric activations ("mixed"), min/max ranges
  asym_mean      asymmetric activations, NNCF's default ranges
  tool           the openvino-cpu runtime's own quantize() (today's preset), as `build` makes int8

The default cases are the eight Fashion-MNIST rows of meta-dataset v2 where int8 lost more than
15 pp against fp32, and eight rows drawn from the rest (seed 0).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
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


def default_cases(meta_path: Path, n_collapsed: int = 6, n_other: int = 5) -> list[tuple]:
    import pyarrow.parquet as pq

    acc: dict[tuple, dict] = {}
    for r in pq.read_table(meta_path).to_pylist():
        if r.get("task") == "fashion-mnist":
            acc.setdefault((r["task"], r["model"], r["method"], r["ratio"]), {})[r["precision"]] = r["accuracy"]
    drops = sorted(((v["fp32"] - v["int8"], k) for k, v in acc.items() if "fp32" in v and "int8" in v), reverse=True)
    collapsed = [k for d, k in drops if d > 0.15][:n_collapsed]
    rest = sorted(k for d, k in drops if d <= 0.15)
    return collapsed + random.Random(0).sample(rest, n_other) + [("digits", m, "none", 0.0) for m in DIGITS_DENSE]


def quantize(fp32_xml: Path, calib: np.ndarray, preset: str, ranges: str, batch: int):
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from edgecompress.runtimes.base import calibration_dataset, gain_outliers, nncf_quiet
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


def run_case(case, datasets) -> dict:
    import openvino as ov

    from edgecompress import pipeline
    from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec
    from edgecompress.data.datasets import load_dataset
    from edgecompress.models import parse_model_spec
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
        for name, scheme in SCHEMES.items():
            row[name] = top1(quantize(fp32.artifact, calib, *scheme), x, y)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--meta", type=Path, default=Path(__file__).resolve().parents[1] / "edgecompress/zoo/meta.parquet")
    args = ap.parse_args()
    datasets: dict = {}
    rows = []
    for case in default_cases(args.meta):
        rows.append(run_case(case, datasets))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    names = ["fp32", *SCHEMES]
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
