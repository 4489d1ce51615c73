"""Stand-alone benchmark runner: times an artifact in its runtime, batch 1.

It imports nothing from edgecompress, so it can be copied to a device and run
there with only numpy and the runtime installed:

    python runner.py --runtime openvino --artifact model.xml --runs 200

It prints one JSON line: median/p90/mean/min latency in ms, peak memory in MB
(the process's resident high-water mark minus what it held before loading the
model), the runtime's version, and, with --eval-npz, the top-1 accuracy.
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
        import openvino as ov

        ov.Core().get_property("CPU", "FULL_DEVICE_NAME")


def _load(runtime, artifact):
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(artifact, options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        shape[0] = 1
        return (lambda x: session.run(None, {inp.name: x})[0]), shape, ort.__version__
    if runtime == "openvino":
        import openvino as ov

        core = ov.Core()
        model = core.read_model(artifact)
        pshape = model.inputs[0].get_partial_shape()
        shape = [1] + [d.get_length() for d in list(pshape)[1:]]
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()

        def infer(x):
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()

        return infer, shape, ov.get_version()
    raise SystemExit(f"runner: unknown runtime {runtime!r}")


def main(argv=None):
    import numpy as np

    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--eval-npz", help="npz with 'images' (N,C,H,W float32) and 'labels'")
    args = parser.parse_args(argv)

    _warm_runtime(args.runtime)
    rss_before = _rss_bytes()
    load_start = time.perf_counter()
    infer, shape, version = _load(args.runtime, args.artifact)
    load_ms = (time.perf_counter() - load_start) * 1e3
    rss_loaded = _rss_bytes()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(args.warmup):
        infer(x)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter_ns()
        infer(x)
        times.append((time.perf_counter_ns() - start) / 1e6)
    result = {
        "runtime": args.runtime,
        "runtime_version": version,
        "runs": args.runs,
        "warmup": args.warmup,
        "latency_ms_median": float(np.median(times)),
        "latency_ms_p90": float(np.percentile(times, 90)),
        "latency_ms_mean": float(np.mean(times)),
        "latency_ms_min": float(np.min(times)),
        "load_ms": load_ms,
        # Resident memory the model adds over the loaded runtime: weights, compiled
        # graph, working buffers (sampled after loading and after the timed runs;
        # the process high-water mark is dominated by the runtime's own import).
        "peak_memory_mb": max(rss_loaded, _rss_bytes()) / 1e6 - rss_before / 1e6,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
        "runtime_rss_mb": rss_before / 1e6,
        "model_size_mb": os.path.getsize(args.artifact) / 1e6 + (
            os.path.getsize(args.artifact[:-4] + ".bin") / 1e6 if args.artifact.endswith(".xml") else 0.0
        ),
        "input_shape": shape,
    }
    if args.eval_npz:
        data = np.load(args.eval_npz)
        images, labels = data["images"], data["labels"]
        correct = 0
        for i in range(len(labels)):
            correct += int(infer(images[i:i + 1]).argmax(1)[0] == labels[i])
        result["accuracy"] = correct / max(len(labels), 1)
        result["eval_samples"] = int(len(labels))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
