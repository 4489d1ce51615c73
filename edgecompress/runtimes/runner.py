"""Stand-alone benchmark runner: times an artifact in its runtime, batch 1.

It imports nothing from edgecompress, so it can be copied to a device and run
there with only numpy and the runtime installed:

    python runner.py --runtime openvino --artifact model.xml --runs 200 [--rounds 10] [--threads 1]

It times in rounds and prints one JSON line: the per-round times (``rounds_ms``,
which edgecompress.deploy.timing turns into statistics with confidence intervals), the
median of the round medians, p90/p99/mean/min latency in ms, peak memory in MB
(the resident memory the model adds to the loaded runtime), the runtime's
version, and, with --eval-npz, the top-1 accuracy. With several --artifact, the
rounds interleave them and the line is {"results": [one object per artifact]}.
"""

import argparse
import json
import os
import resource
import time


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_runtime(runtime):
    """Import the runtime and load its CPU plugin, so the memory baseline excludes them."""
    if runtime == "onnxruntime":
        import onnxruntime

        onnxruntime.get_available_providers()
    elif runtime == "openvino":
        from edgecompress.runtimes.openvino import openvino_core

        openvino_core().get_property("CPU", "FULL_DEVICE_NAME")


def _load(runtime, artifact, threads=None):
    """(infer, input shape, runtime version, the threads the runtime says it runs on (None where it does not say));
    ``threads``: the runtime's inference threads (None: its own choice)."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        shape[0] = 1
        said = session.get_session_options().intra_op_num_threads or None  # 0: its own choice, not said
        return (lambda x: session.run(None, {inp.name: x})[0]), shape, ort.__version__, said
    if runtime == "openvino":
        import openvino as ov

        from edgecompress.runtimes.openvino import openvino_core

        core = openvino_core()
        model = core.read_model(artifact)
        pshape = model.inputs[0].get_partial_shape()
        shape = [1] + [d.get_length() for d in list(pshape)[1:]]
        config = {"PERFORMANCE_HINT": "LATENCY", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()

        def infer(x):
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return infer, shape, ov.get_version(), int(compiled.get_property("INFERENCE_NUM_THREADS"))
    raise SystemExit(f"runner: unknown runtime {runtime!r}")


def _model_size_mb(artifact):
    size = os.path.getsize(artifact)
    if artifact.endswith(".xml"):
        size += os.path.getsize(artifact[:-4] + ".bin")
    return size / 1e6


def main(argv=None):
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--artifact", required=True, action="append",
                        help="repeatable: several artifacts are timed in interleaved rounds")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per artifact, over all rounds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-warmup", type=int, default=5,
                        help="untimed runs at the start of each round when several artifacts alternate")
    parser.add_argument("--threads", type=int, default=0,
                        help="the runtime's inference threads (0: its own choice, one per core)")
    parser.add_argument("--eval-npz", help="npz with 'images' (N,C,H,W float32) and 'labels' (first artifact)")
    args = parser.parse_args(argv)

    _warm_runtime(args.runtime)
    models = []
    for artifact in args.artifact:
        rss_before = _rss_bytes()
        load_start = time.perf_counter()
        infer, shape, version, runtime_threads = _load(args.runtime, artifact, args.threads or None)
        load_ms = (time.perf_counter() - load_start) * 1e3
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(args.warmup):
            infer(x)
        models.append({"artifact": artifact, "infer": infer, "x": x, "shape": shape, "version": version,
                       "runtime_threads": runtime_threads,
                       "load_ms": load_ms, "rss_before": rss_before, "rss_loaded": _rss_bytes(), "rounds_ms": []})
    rounds = max(1, min(args.rounds, args.runs))
    per_round = max(1, -(-args.runs // rounds))
    # Rounds interleave the artifacts, so a slow spell of the machine lands on all of them, not on one.
    # After another model ran, the first inferences pay for cold caches and sleeping worker threads: each round
    # starts with a few untimed runs, so an artifact timed among others is timed as it runs alone.
    round_warmup = args.round_warmup if len(models) > 1 else 0
    for _ in range(rounds):
        for m in models:
            infer, x, times = m["infer"], m["x"], []
            for _ in range(round_warmup):
                infer(x)
            for _ in range(per_round):
                start = time.perf_counter_ns()
                infer(x)
                times.append((time.perf_counter_ns() - start) / 1e6)
            m["rounds_ms"].append(times)
    results = []
    for m in models:
        times = [t for r in m["rounds_ms"] for t in r]
        results.append({
            "runtime": args.runtime,
            "runtime_version": m["version"],
            "threads": args.threads or None,  # as asked (None: the runtime's own choice)
            "runtime_threads": m["runtime_threads"],  # as the runtime says it runs (None where it does not say)
            "artifact": os.path.basename(m["artifact"]),
            "runs": len(times),
            "warmup": args.warmup,
            "latency_ms_median": float(np.median([np.median(r) for r in m["rounds_ms"]])),
            "latency_ms_p90": float(np.percentile(times, 90)),
            "latency_ms_p99": float(np.percentile(times, 99)),
            "latency_ms_mean": float(np.mean(times)),
            "latency_ms_min": float(np.min(times)),
            "rounds_ms": [[round(t, 5) for t in r] for r in m["rounds_ms"]],
            "load_ms": m["load_ms"],
            # Resident memory the model adds over what was loaded before it: weights, compiled graph, working
            # buffers (the process high-water mark is dominated by the runtime's own import).
            "peak_memory_mb": max(m["rss_loaded"], _rss_bytes() if len(models) == 1 else 0) / 1e6 - m["rss_before"] / 1e6,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
            "runtime_rss_mb": m["rss_before"] / 1e6,
            "model_size_mb": _model_size_mb(m["artifact"]),
            "input_shape": m["shape"],
        })
    if args.eval_npz:
        data = np.load(args.eval_npz)
        images, labels = data["images"], data["labels"]
        infer = models[0]["infer"]
        correct = sum(int(infer(images[i:i + 1]).argmax(1)[0] == labels[i]) for i in range(len(labels)))
        results[0]["accuracy"] = correct / max(len(labels), 1)
        results[0]["eval_samples"] = int(len(labels))
    print(json.dumps(results[0] if len(results) == 1 else {"results": results}))


if __name__ == "__main__":
    main()
