"""Spine benchmark: every zoo model, fp32 vs int8 (and fp16 on OpenVINO), on ort-cpu and openvino-cpu.

    python tools/bench_spine.py --json > docs/bench_spine.json
    python tools/bench_spine.py --fit            # also fit the CPU targets' latency constants

For each (target, model, precision): the artifact is built with the same stage
functions as `edgecompress build` (no pruning), its top-1 accuracy measured in
the runtime on the test split, its latency timed by the benchmark runner
(20 warm-up, 200 timed runs, batch 1), and the cost model's prediction put
beside it. --fit refits overhead_ms, per_layer_us and the per-kernel
efficiencies of each CPU target by least squares on log latency, and prints
the TOML values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgecompress import pipeline  # noqa: E402
from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec  # noqa: E402
from edgecompress.costmodel.cost import fit_roofline, predict_cost  # noqa: E402
from edgecompress.costmodel.kernels import model_graph  # noqa: E402
from edgecompress.data.datasets import load_digits  # noqa: E402
from edgecompress.models import get_model, list_models, load_model  # noqa: E402
from edgecompress.targets import get_target  # noqa: E402

TARGETS = ("openvino-cpu", "ort-cpu")


def measure(target_name: str, model_name: str, data, workdir: Path) -> list[dict]:
    target = get_target(target_name)
    entry = get_model(model_name)
    layers = model_graph(load_model(entry, data.num_classes), data.input_shape)
    base = Candidate(model=model_name, prune=PruneSpec(), quant=QuantSpec())
    cdir = workdir / f"{target_name}-{model_name}"
    (cdir / "c").mkdir(parents=True)
    compressed = pipeline.compress(base, entry, data, FinetuneSpec(steps=0), cdir / "c")
    rows = []
    for precision in target.precisions:
        calibrated = pipeline.at_precision(compressed, precision, target, data, cdir)
        verified = pipeline.verify(calibrated, target, data)
        measured = pipeline.benchmark(verified, target).measured
        rows.append({
            "target": target_name, "model": model_name, "precision": precision,
            "accuracy": verified.accuracy, "baseline_accuracy": compressed.baseline_accuracy,
            "latency_ms_median": measured["latency_ms_median"], "latency_ms_p90": measured["latency_ms_p90"],
            "peak_memory_mb": measured["peak_memory_mb"], "model_size_mb": measured["model_size_mb"],
            "predicted_latency_ms": predict_cost(layers, target, precision).latency_ms,
            "predicted_memory_mb": predict_cost(layers, target, precision).memory_mb,
        })
        print(f"{target_name:13s} {model_name:22s} {precision}: {measured['latency_ms_median']:.3f} ms "
              f"(predicted {rows[-1]['predicted_latency_ms']:.3f}), accuracy {verified.accuracy:.4f}", file=sys.stderr)
    return rows


def fit_target(target_name: str, rows: list[dict], data) -> dict:
    """The roofline's constants refitted to these measurements (edgecompress.costmodel.cost.fit_roofline)."""
    target = get_target(target_name)
    rows = [r for r in rows if r["target"] == target_name]
    graphs = {m: model_graph(load_model(get_model(m), 10), data.input_shape) for m in {r["model"] for r in rows}}
    fitted, rms = fit_roofline(target, [(graphs[r["model"]], r["precision"], None, r["latency_ms_median"]) for r in rows])
    return {
        "overhead_ms": round(fitted.overhead_ms, 4), "per_layer_us": round(fitted.per_layer_us, 3),
        "efficiency": {k: round(v, 4) for k, v in fitted.efficiency.items()},
        "int8_efficiency": {k: round(v, 4) for k, v in fitted.int8_efficiency.items()},
        "runtime_overhead_mb": round(float(np.median([r["peak_memory_mb"] - r["model_size_mb"] for r in rows])), 1),
        "rms_log_error": rms,
    }


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--fit", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    data = load_digits(32)
    models = args.models or list_models()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target_name in args.targets:
            for model_name in models:
                rows.extend(measure(target_name, model_name, data, Path(tmp)))
    result = {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1), "rows": rows}
    if args.fit:
        result["fit"] = {t: fit_target(t, rows, data) for t in args.targets}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("| target | model | precision | accuracy | median ms | p90 ms | predicted ms | peak MB | file MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['target']} | {r['model']} | {r['precision']} | {r['accuracy'] * 100:.2f}% | {r['latency_ms_median']:.3f} | "
                  f"{r['latency_ms_p90']:.3f} | {r['predicted_latency_ms']:.3f} | {r['peak_memory_mb']:.1f} | {r['model_size_mb']:.2f} |")
        if args.fit:
            print(json.dumps(result["fit"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
