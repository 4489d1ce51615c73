"""Compression-method benchmark: every pruning method at matched levels, one-shot and fine-tuned, per zoo model.

    python tools/bench_methods.py --json > docs/bench_methods.json            # resumable: rows go to --cache
    python tools/bench_methods.py --models lcnet_050 --levels 0.7 --json      # a slice
    python tools/bench_methods.py --markdown                                  # summary tables of what is cached

For each (model, method, level): the method's own prepare/finalize (methods.METHODS)
on a fresh copy of the zoo model; top-1 on the test split right after pruning
(one-shot) and after the standard fine-tune (150 AdamW steps, as `build` does);
the largest per-class drop against the uncompressed model; the share of test
images whose prediction changed. Two fine-tunes are compared at the same number
of optimiser steps: plain (cross-entropy) and with the uncompressed model as
teacher (logit distillation, methods' "transfer-aware" recipe). For methods that
change the graph (channel pruning, low-rank), the OpenVINO latency of the fp32
artifact and of its parent are measured too. Levels are sparsity for
unstructured methods (50/70/90%), the channel ratio for channel pruning
(0.3/0.5/0.7, which removes about 51/75/91% of the MACs; ``macs_share`` is
reported), the MAC reduction for low-rank (0.5/0.75/0.9, matched to those), and
the fixed 50% of 2:4.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgecompress.compress.finetune import finetune, predict_torch  # noqa: E402
from edgecompress.compress.methods import METHODS, FinetuneSpec, PruneData, get_method  # noqa: E402
from edgecompress.core.fsutil import append_jsonl, read_jsonl  # noqa: E402
from edgecompress.costmodel.layers import profile_layers  # noqa: E402
from edgecompress.data.datasets import load_digits  # noqa: E402
from edgecompress.models import get_model, list_models, load_model  # noqa: E402

# Channel ratios 0.3/0.5/0.7 remove about 51/75/91% of the MACs; low-rank levels are MAC reductions, matched to them.
LEVELS = {"unstructured": (0.5, 0.7, 0.9), "channel": (0.3, 0.5, 0.7), "lowrank": (0.5, 0.75, 0.9), "semi-structured": (0.5,)}
SAMPLES = 256


def _cache_key(row: dict) -> tuple:
    return row["model"], row["method"], row["level"], row.get("steps")


def _scores(model, x, y, reference_pred):
    pred = predict_torch(model, x).argmax(1)
    per_class = np.array([(pred[y == c] == c).mean() for c in np.unique(y)])
    return float((pred == y).mean()), per_class, float((pred != reference_pred).mean())


def run_one(model_name: str, method_name: str, level: float, data, spec: FinetuneSpec, with_latency: bool) -> dict:
    import torch

    method = get_method(method_name)
    x_train, y_train = data.split("train")
    x_test, y_test = data.split("test")
    parent = load_model(get_model(model_name), data.num_classes)
    ref_pred = predict_torch(parent, x_test).argmax(1)
    base_acc, base_per_class, _ = _scores(parent, x_test, y_test, ref_pred)
    example = torch.zeros(data.input_shape)
    samples = PruneData(torch.from_numpy(x_train[:SAMPLES]), torch.from_numpy(y_train[:SAMPLES]))
    started = time.time()
    one_shot = method.finalize(method.prepare(copy.deepcopy(parent), level, example, samples), example)
    prune_seconds = time.time() - started
    # Learned masks (NNCF RB) prune only while fine-tuning: before it the model is the parent, so no one-shot figure.
    one_acc = None if method.learned else _scores(one_shot, x_test, y_test, ref_pred)[0]
    row = {"model": model_name, "method": method_name, "level": level, "baseline_accuracy": base_acc,
           "one_shot_accuracy": one_acc, "prune_seconds": round(prune_seconds, 2)}
    for recipe, teacher in (("plain", None), ("teacher", parent)):
        # Pruning is deterministic: each recipe starts from its own freshly pruned copy (masked models cannot be deep-copied).
        student = method.prepare(copy.deepcopy(parent), level, example, samples)
        reg = method.regularizer(student, level)
        student = finetune(student, x_train, y_train, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
                           teacher=teacher, regularizer=reg, seed=spec.seed)
        student = method.finalize(student, example).eval()
        acc, per_class, disagreement = _scores(student, x_test, y_test, ref_pred)
        key = "finetuned" if recipe == "plain" else "teacher_finetuned"
        row[f"{key}_accuracy"] = acc
        row[f"{key}_max_class_drop_pp"] = float((base_per_class - per_class).max() * 100)
        row[f"{key}_disagreement"] = disagreement
        if recipe == "plain":
            weights = [m.weight.detach() for m in student.modules() if hasattr(m, "weight") and m.weight is not None and m.weight.ndim > 1]
            row["zero_share"] = float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
            macs = sum(l.macs for l in profile_layers(student, data.input_shape))
            row["macs_share"] = macs / sum(l.macs for l in profile_layers(parent, data.input_shape))
            if with_latency and method.structural:
                row["openvino_latency_ms"] = _openvino_latency(student, data)
                row["baseline_openvino_latency_ms"] = _openvino_latency(parent, data)
    # The standard fine-tune is the plain one: its figures are the row's headline columns.
    row["max_class_drop_pp"] = row["finetuned_max_class_drop_pp"]
    row["disagreement"] = row["finetuned_disagreement"]
    return row


def _openvino_latency(model, data) -> float:
    from edgecompress.runtimes.base import export_onnx
    from edgecompress.targets import get_target

    runtime = get_target("openvino-cpu").runtime()
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, data.input_shape, Path(tmp) / "m.onnx")
        artifact = runtime.export(onnx, "fp32", Path(tmp))
        return runtime.benchmark(artifact, warmup=20, runs=200)["latency_ms_median"]


def markdown(rows: list[dict]) -> str:
    """Summary tables: per (method, level) means over the models measured, and the two comparisons the issue asks."""
    out = ["| method | level | models | one-shot | fine-tuned | with teacher | max class drop, pp | disagreement | MACs left | OpenVINO ms (parent) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["level"]), []).append(r)

    def mean(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    for (method, level), rs in sorted(groups.items()):
        lat = mean(rs, "openvino_latency_ms")
        base = mean(rs, "baseline_openvino_latency_ms")
        one_shot = mean(rs, "one_shot_accuracy")
        out.append(f"| {method} | {level:g} | {len(rs)} | " + (f"{one_shot * 100:.1f}%" if one_shot is not None else "n/a") + " | "
                   f"{mean(rs, 'finetuned_accuracy') * 100:.1f}% | {mean(rs, 'teacher_finetuned_accuracy') * 100:.1f}% | "
                   f"{mean(rs, 'max_class_drop_pp'):.1f} | {mean(rs, 'disagreement') * 100:.1f}% | "
                   f"{mean(rs, 'macs_share') * 100:.0f}% | " + (f"{lat:.3f} ({base:.3f})" if lat and base else "") + " |")
    by_key = {(r["model"], r["method"], r["level"]): r for r in rows}
    out += ["", "| comparison | level | models | wins | ties (within one test image) | losses | mean difference, pp |",
            "|---|---|---|---|---|---|---|"]
    comparisons = [
        ("WoodFisher vs NNCF global magnitude, one-shot", "woodfisher", "nncf.magnitude_global", "one_shot_accuracy", "one_shot_accuracy"),
        ("WoodFisher vs NNCF global magnitude, fine-tuned", "woodfisher", "nncf.magnitude_global", "finetuned_accuracy", "finetuned_accuracy"),
        ("NNCF RB (learned masks) vs NNCF global magnitude, fine-tuned", "nncf.rb", "nncf.magnitude_global", "finetuned_accuracy", "finetuned_accuracy"),
        ("NNCF local vs global magnitude, fine-tuned", "nncf.magnitude_local", "nncf.magnitude_global", "finetuned_accuracy", "finetuned_accuracy"),
    ]
    for level in sorted({r["level"] for r in rows}):
        pairs = []
        for name, a, b, ka, kb in comparisons:
            pairs = [(by_key[(m, a, level)][ka], by_key[(m, b, level)][kb]) for (m, meth, lv) in by_key
                     if meth == a and lv == level and (m, b, level) in by_key]
            if pairs:
                out.append(_comparison_row(name, level, pairs))
    for method in sorted({r["method"] for r in rows}):
        for level in sorted({r["level"] for r in rows if r["method"] == method}):
            pairs = [(r["teacher_finetuned_accuracy"], r["finetuned_accuracy"]) for r in groups[(method, level)]]
            out.append(_comparison_row(f"{method}: teacher vs plain fine-tune, same steps", level, pairs))
    return "\n".join(out)


def _comparison_row(name: str, level: float, pairs: list) -> str:
    diff = np.array([a - b for a, b in pairs])
    tie = 1.5 / 360  # one test image
    return (f"| {name} | {level:g} | {len(pairs)} | {int((diff > tie).sum())} | {int((np.abs(diff) <= tie).sum())} | "
            f"{int((diff < -tie).sum())} | {diff.mean() * 100:+.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--levels", nargs="*", type=float, default=None, help="override every method's levels")
    parser.add_argument("--steps", type=int, default=FinetuneSpec().steps)
    parser.add_argument("--cache", type=Path, default=Path("bench_methods.jsonl"), help="finished rows (resume)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print summary tables of the rows in --cache and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(list(read_jsonl(args.cache, key=_cache_key).values())))
        return
    data = load_digits(32)
    spec = FinetuneSpec(steps=args.steps)
    models = args.models or list_models()
    methods = args.methods or [m for m in METHODS if m != "none"]
    done = read_jsonl(args.cache, key=_cache_key)
    rows = []
    for method_name in methods:
        kind = get_method(method_name).kind
        levels = args.levels or ((get_method(method_name).fixed_ratio,) if get_method(method_name).fixed_ratio else LEVELS[kind])
        for level in levels:
            for model_name in models:
                key = (model_name, method_name, level, args.steps)
                if key not in done:
                    row = {**run_one(model_name, method_name, level, data, spec, not args.no_latency), "steps": args.steps}
                    append_jsonl(args.cache, row)
                    done[key] = row
                    print(f"{model_name} {method_name} {level}: one-shot {row['one_shot_accuracy']}, "
                          f"fine-tuned {row['finetuned_accuracy']:.3f}, with teacher {row['teacher_finetuned_accuracy']:.3f}",
                          file=sys.stderr, flush=True)
                rows.append(done[key])
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
