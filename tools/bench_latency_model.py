"""Latency-model benchmark: predicted vs measured latency and memory on the local targets, Jetson vs published figures.

    python tools/bench_latency_model.py --json > docs/bench_latency_model.json    # resumable: rows go to --cache
    python tools/bench_latency_model.py --targets ort-cpu --json                   # one target

Variants: every zoo model with its channels pruned by torch-pruning L1 at 0, 30%
and 60% (the real pruned model, exported), at every precision of the target,
plus timm architectures outside the zoo with random weights, three at 32x32 and
three at 224x224, and eight architectures from families that are neither in
either zoo nor among the profiling networks (RepVGG and MobileOne, exported
re-parameterized; ReXNet, ConvNeXt, VoVNet-eSE, FastViT, DenseNet, GENet), each at
32x32 and 224x224 and reported on their own (``unseen``). Each is exported and made into the target's artifact exactly
as `build` does, then timed by the benchmark runner in a fresh process (20
warm-up, 200 timed runs, batch 1). The prediction is the cost model `plan` and
`build` use, from the variant's own exported graph (``predicted_ms``) and, for
the pruned zoo variants, from the parent's graph with its channels scaled as the
planner does before anything is pruned (``planner_ms``). The kernel models
were fitted by `edgecompress targets profile` on random networks, a separate
run on other architectures. Measurements are cached in --cache; predictions are
recomputed on every run, so a refitted model is re-scored without re-measuring.

The noise floor: each zoo model's and each unseen architecture's fp32 artifact
timed four times, in fresh processes; the share of re-measurements within 10% of
the first bounds what any predictor can reach on this machine, and
``within_10pct_vs_repeated`` scores the prediction against the median of those
four timings instead of one.

For the Jetson targets, whose latency is a roofline: ResNet-50 at int8, batch 1,
224x224, against the MLPerf Inference v3.1 SingleStream figures in FACTS.md.
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

from edgecompress.compress.methods import get_method  # noqa: E402
from edgecompress.core.errors import one_line  # noqa: E402
from edgecompress.core.fsutil import append_jsonl, read_jsonl  # noqa: E402
from edgecompress.costmodel.cost import predict_cost, roofline_ms  # noqa: E402
from edgecompress.costmodel.kernels import model_graph  # noqa: E402
from edgecompress.models import get_model, list_models, load_model  # noqa: E402
from edgecompress.runtimes.base import export_onnx, nncf_quiet  # noqa: E402
from edgecompress.targets import get_target  # noqa: E402

TARGETS = ("ort-cpu", "openvino-cpu")
RATIOS = (0.0, 0.3, 0.6)
OUTSIDE_ZOO = (("resnet18", 32), ("mobilenetv2_100", 32), ("regnety_002", 32),
               ("resnet18", 224), ("mobilenetv3_large_100", 224), ("efficientnet_b0", 224))
UNSEEN = tuple((arch, size) for arch in ("repvgg_a0", "mobileone_s0", "rexnet_100", "convnext_atto",
                                        "ese_vovnet19b_dw", "fastvit_t8", "densenet121", "gernet_s")
               for size in (32, 224))
PUBLISHED = (  # FACTS.md: MLPerf Inference v3.1, NVIDIA, JetPack 5.1.1, TensorRT 8.5.2, SingleStream p90
    ("jetson-orin-agx", "resnet50", 0.640),
    ("jetson-orin-nx", "resnet50", 1.082),
)


def variants():
    for name in list_models():
        for ratio in RATIOS:
            yield {"model": name, "ratio": ratio, "size": 32, "source": "zoo"}
    for arch, size in OUTSIDE_ZOO:
        yield {"model": arch, "ratio": 0.0, "size": size, "source": "timm"}
    for arch, size in UNSEEN:
        yield {"model": arch, "ratio": 0.0, "size": size, "source": "unseen"}


def build_variant(v: dict):
    import timm
    import torch

    if v["source"] == "zoo":
        parent = load_model(get_model(v["model"]), 10)
    else:
        torch.manual_seed(0)
        parent = timm.create_model(v["model"], pretrained=False, num_classes=10).eval()
    shape = (1, 3, v["size"], v["size"])
    if v["ratio"] == 0:
        return parent, parent, shape
    method = get_method("torch_pruning.l1")
    example = torch.zeros(shape)
    pruned = method.finalize(method.prepare(copy.deepcopy(parent), v["ratio"], example, None), example).eval()
    return parent, pruned, shape


def variant_artifact(runtime, v: dict, precision: str, workdir: Path) -> Path:
    """The variant exported and made into the runtime's artifact at ``precision`` as `build` does (int8 calibrated on
    random images: only its speed counts)."""
    _, model, shape = build_variant(v)
    onnx_path = export_onnx(model, shape, workdir / "model.onnx")
    out = workdir / precision
    out.mkdir()
    artifact = runtime.export(onnx_path, precision, out)
    if precision == "int8":
        calib = np.random.default_rng(0).standard_normal((32, *shape[1:])).astype(np.float32)
        qdir = workdir / "int8q"
        qdir.mkdir()
        with nncf_quiet():
            artifact = runtime.quantize(artifact, calib, qdir)
    return artifact


def measure(target, v: dict, precision: str, workdir: Path) -> dict:
    """What the device does with the variant's artifact (cached: the models can be refitted without it)."""
    runtime = target.runtime()
    measured = runtime.benchmark(variant_artifact(runtime, v, precision, workdir), warmup=20, runs=200)
    return {"target": target.name, **v, "precision": precision, "measured_ms": measured["latency_ms_median"],
            "measured_memory_mb": measured["peak_memory_mb"]}


_GRAPHS: dict = {}


def predict(target, row: dict) -> dict:
    """The cost model's prediction from the variant's own exported graph, and the planner's from its parent's."""
    key = (row["model"], row["ratio"], row["size"])
    if key not in _GRAPHS:
        parent, model, shape = build_variant(row)
        _GRAPHS[key] = (model_graph(model, shape), model_graph(parent, shape) if row["ratio"] else None)
    graph, parent_graph = _GRAPHS[key]
    cost = predict_cost(graph, target, row["precision"])
    out = {**row, "kernels": len(graph.kernels), "macs": graph.macs, "predicted_ms": cost.latency_ms,
           "predicted_memory_mb": cost.memory_mb,
           "roofline_ms": roofline_ms(graph, target, row["precision"])}  # the spine's model, for comparison
    if parent_graph is not None:
        out["planner_ms"] = predict_cost(parent_graph, target, row["precision"], channel_keep=1 - row["ratio"]).latency_ms
    return out


def noise_floor(target, cache: Path, repeats: int = 3, skip=frozenset()) -> dict:
    """The same fp32 artifact of every zoo model and unseen architecture timed ``repeats`` more times, each in
    a fresh process.

    The share of those re-measurements within 10% of the first is the best any predictor could score against
    one timing; ``times`` (variant -> every timing) lets the prediction be scored against their median.
    """
    done = read_jsonl(cache, key=lambda r: (r["target"], r["model"], r.get("size", 32), r["repeat"]))
    runtime = target.runtime()
    ratios, times_by_variant = [], {}
    variants_fp32 = [v for v in variants() if v["source"] in ("zoo", "unseen") and v["ratio"] == 0
                     and (v["model"], v["size"]) not in skip]
    for v in variants_fp32:
        keys = [(target.name, v["model"], v["size"], i) for i in range(repeats + 1)]
        if all(k in done for k in keys):
            times = [done[k]["measured_ms"] for k in keys]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                artifact = variant_artifact(runtime, v, "fp32", Path(tmp))
                times = [runtime.benchmark(artifact, warmup=20, runs=200)["latency_ms_median"] for _ in range(repeats + 1)]
            for i, t in enumerate(times):
                append_jsonl(cache, {"target": target.name, "model": v["model"], "size": v["size"], "repeat": i,
                                     "measured_ms": t})
        ratios += [t / times[0] - 1 for t in times[1:]]
        times_by_variant[(v["model"], v["size"])] = times
    ratios = np.abs(np.array(ratios))
    return {"remeasurements": len(ratios), "within_10pct_of_first": float((ratios <= 0.10).mean()),
            "mean_abs_change": float(ratios.mean()), "times": times_by_variant}


def vs_repeated(rows: list[dict], times: dict) -> dict:
    """The fp32 predictions scored against the median of the repeated timings, not one timing."""
    err = np.array([r["predicted_ms"] / float(np.median(times[(r["model"], r["size"])])) - 1 for r in rows
                    if r["precision"] == "fp32" and r["ratio"] == 0 and (r["model"], r["size"]) in times])
    return {"variants": len(err), "within_10pct": float((np.abs(err) <= 0.10).mean()) if len(err) else None,
            "mape": float(np.abs(err).mean()) if len(err) else None}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in sorted({r["target"] for r in rows}):
        rs = [r for r in rows if r["target"] == name]
        unseen = [r for r in rs if r["source"] == "unseen"]
        err = np.array([r["predicted_ms"] / r["measured_ms"] - 1 for r in rs])
        roofline = np.array([r["roofline_ms"] / r["measured_ms"] - 1 for r in rs])
        mem = np.array([r["predicted_memory_mb"] / r["measured_memory_mb"] - 1 for r in rs if r["measured_memory_mb"] > 0])
        planner = np.array([r["planner_ms"] / r["measured_ms"] - 1 for r in rs if "planner_ms" in r])
        out[name] = {
            "variants": len(rs),
            "within_10pct": float((np.abs(err) <= 0.10).mean()),
            "mape": float(np.abs(err).mean()),
            "median_ape": float(np.median(np.abs(err))),
            "worst": max(rs, key=lambda r: abs(r["predicted_ms"] / r["measured_ms"] - 1))["model"],
            "within_10pct_by_precision": {p: float((np.abs(err[[r["precision"] == p for r in rs]]) <= 0.10).mean())
                                          for p in sorted({r["precision"] for r in rs})},
            "planner_within_10pct": float((np.abs(planner) <= 0.10).mean()) if len(planner) else None,
            "planner_mape": float(np.abs(planner).mean()) if len(planner) else None,
            "memory_mape": float(np.abs(mem).mean()) if len(mem) else None,
            "roofline_within_10pct": float((np.abs(roofline) <= 0.10).mean()),
            "roofline_mape": float(np.abs(roofline).mean()),
            "unseen": summarize_unseen(unseen) if unseen else None,
        }
    return out


def summarize_unseen(rows: list[dict]) -> dict:
    """The families outside the zoo and the profiling networks, on their own: by size and by architecture."""
    def score(rs):
        e = np.abs(np.array([r["predicted_ms"] / r["measured_ms"] - 1 for r in rs]))
        return {"variants": len(rs), "within_10pct": float((e <= 0.10).mean()), "within_25pct": float((e <= 0.25).mean()),
                "mape": float(e.mean()), "median_ape": float(np.median(e))}

    return {**score(rows),
            "by_size": {str(size): score([r for r in rows if r["size"] == size]) for size in sorted({r["size"] for r in rows})},
            "by_precision": {p: score([r for r in rows if r["precision"] == p]) for p in sorted({r["precision"] for r in rows})},
            "by_model": {f"{r['model']}@{r['size']}/{r['precision']}": round(r["predicted_ms"] / r["measured_ms"] - 1, 3)
                         for r in rows}}


def jetson_checks() -> list[dict]:
    import timm

    graph = model_graph(timm.create_model("resnet50", pretrained=False).eval(), (1, 3, 224, 224))
    rows = []
    for target_name, model, published in PUBLISHED:
        predicted = predict_cost(graph, get_target(target_name), "int8").latency_ms
        rows.append({"target": target_name, "model": model, "precision": "int8", "batch": 1, "input": 224,
                     "published_ms": published, "predicted_ms": predicted, "error": predicted / published - 1})
    return rows


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="*", default=list(TARGETS))
    parser.add_argument("--cache", type=Path, default=Path("bench_latency_model.jsonl"), help="finished rows (resume)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    done = read_jsonl(args.cache, key=lambda r: (r["target"], r["model"], r["ratio"], r["size"], r["precision"]))
    started = time.time()
    rows, failed = [], []
    for target_name in args.targets:
        target = get_target(target_name)
        for v in variants():
            for precision in target.precisions:
                key = (target_name, v["model"], v["ratio"], v["size"], precision)
                if key not in done:
                    with tempfile.TemporaryDirectory() as tmp:
                        try:
                            done[key] = measure(target, v, precision, Path(tmp))
                        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run a variant is a result
                            reason = one_line(exc)
                            done[key] = {"target": target_name, **v, "precision": precision, "failed": reason}
                    append_jsonl(args.cache, done[key])
                if "failed" in done[key]:
                    print(f"{target_name:13s} {v['model']:22s} {v['size']:3d} {precision}: failed: {done[key]['failed']}",
                          file=sys.stderr, flush=True)
                    failed.append(done[key])
                    continue
                r = predict(target, done[key])
                print(f"{target_name:13s} {v['model']:22s} {v['size']:3d} {v['ratio']:.1f} {precision}: measured "
                      f"{r['measured_ms']:.3f} ms, predicted {r['predicted_ms']:.3f}", file=sys.stderr, flush=True)
                rows.append(r)
    summary = summarize(rows)
    for target_name in args.targets:
        skip = {(r["model"], r["size"]) for r in failed if r["target"] == target_name and r["precision"] == "fp32"}
        floor = noise_floor(get_target(target_name), args.cache.with_suffix(".noise.jsonl"), skip=skip)
        times = floor.pop("times")
        summary[target_name]["noise_floor"] = floor
        summary[target_name]["within_10pct_vs_repeated"] = vs_repeated(
            [r for r in rows if r["target"] == target_name], times)
    result = {"date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - started, 1),
              "targets": summary, "jetson_published": jetson_checks(), "failed": failed, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
