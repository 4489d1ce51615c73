"""Latency measured before training: the plan's structures are timed on this machine, and the plan re-ranked."""

import json

import pytest

from edgecompress.costmodel.kernels import model_graph
from edgecompress.models import get_model, load_model
from edgecompress.plan.planner import Budget, plan, speed_key
from edgecompress.plan.premeasure import THREADS_GAIN, can_premeasure, fastest_threads, premeasure, to_time
from edgecompress.targets import get_target

MODEL = "lcnet_050"
SWEEP = {"none": (0.0,), "nncf.magnitude_global": (0.5,), "torch_pruning.l1": (0.5,)}


@pytest.fixture(scope="module")
def graphs(digits):
    return {MODEL: model_graph(load_model(get_model(MODEL), 10), digits.input_shape)}


def _plan(graphs, budget_ms, target="ort-cpu"):
    return plan(get_target(target), Budget(latency_ms=budget_ms), graphs, {MODEL: 0.95}, sweep=SWEEP,
                precisions=("fp32", "int8"))


def test_to_time_takes_one_artifact_per_structure_within_reach(graphs):
    target = get_target("ort-cpu")
    loose = _plan(graphs, 100.0)
    picked = to_time(loose, target)
    keys = [speed_key(e.candidate, target) for e in picked]
    # Masks run dense on the CPU: the dense model and its magnitude-pruned copy are one structure.
    assert len(keys) == len(set(keys)) == 4
    assert to_time(loose, target, limit=2) == picked[:2]
    tight = _plan(graphs, 1e-4)  # nothing is predicted within twice this budget
    assert to_time(tight, target) == []


def test_premeasure_times_here_and_reranks(graphs, digits, tmp_path):
    target = get_target("ort-cpu")
    the_plan = _plan(graphs, 100.0)
    found = premeasure(the_plan, target, {MODEL: get_model(MODEL)}, digits, tmp_path / "pm")
    latencies = found.latency_ms
    assert len(latencies) == 4 and all(ms > 0 for ms in latencies.values())
    # Each structure was timed at every thread count the runtime offers here, and keeps the fastest.
    assert set(found.threads) == set(latencies)
    assert set(found.threads.values()) <= set(target.runtime().thread_choices())
    saved = json.loads((tmp_path / "pm" / "latencies.json").read_text())
    for i, key in enumerate(saved["measured"]):
        figures = {t: saved["all_threads"][repr(t)][i] for t in target.runtime().thread_choices()}
        assert saved["threads"][key] == fastest_threads(figures) and saved["measured"][key] == figures[saved["threads"][key]]
    replanned = the_plan.with_premeasured(found, target)
    assert all(e.premeasured_ms == latencies[speed_key(e.candidate, target)] for e in replanned.ranked)
    assert all(e.threads == found.threads[speed_key(e.candidate, target)] for e in replanned.ranked)
    # A budget between the fastest and the slowest measured structure: only the measured-fast ones fit.
    budget_ms = sorted(latencies.values())[1] * 1.0001
    tight = _plan(graphs, budget_ms).with_premeasured(found, target)
    fits = [e for e in tight.ranked if e.fits]
    assert fits and all(e.premeasured_ms <= budget_ms for e in fits)
    assert all(e.premeasured_ms > budget_ms for e in tight.ranked if not e.fits)
    # Resumed: read back, nothing timed again.
    again = premeasure(the_plan, target, {MODEL: get_model(MODEL)}, digits, tmp_path / "pm")
    assert again == found


def test_fastest_threads_takes_the_fewest_threads_among_the_equally_fast():
    assert fastest_threads({None: 0.136, 1: 0.062}) == 1
    assert fastest_threads({None: 0.100, 1: 0.100 * (1 + THREADS_GAIN / 2)}) == 1  # a tie: the other cores stay free
    assert fastest_threads({None: 0.100, 1: 0.100 * (1 + 2 * THREADS_GAIN)}) is None
    assert fastest_threads({None: 0.062, 1: 0.136}) is None
    assert fastest_threads({None: 0.1}) is None


@pytest.mark.parametrize("target_name", ["ort-cpu", "openvino-cpu"])
def test_the_runner_runs_on_the_threads_it_is_given(target_name, digits, tmp_path):
    """--threads reaches the runtime: its own choice by default, one thread when asked (an artifact timed on one
    thread and shipped to run on its default would not be the artifact measured)."""
    import os

    from edgecompress.runtimes.base import export_onnx, make_artifact

    onnx_path = export_onnx(load_model(get_model(MODEL), 10).eval(), digits.input_shape, tmp_path / "model_fp32.onnx")
    runtime = get_target(target_name).runtime()
    artifact = make_artifact(runtime, onnx_path, "fp32", tmp_path, digits.split("calib")[0][:4])
    default, one = (runtime.benchmark(artifact, warmup=2, runs=20, rounds=2, threads=t) for t in (None, 1))
    assert default["threads"] is None and one["threads"] == 1 and one["latency_ms_median"] > 0
    assert one["runtime_threads"] == 1  # as the runtime itself reports it
    if target_name == "openvino-cpu":  # OpenVINO says what its own choice was
        assert default["runtime_threads"] >= 1
    assert runtime.thread_choices() == ((None, 1) if (os.cpu_count() or 1) > 1 else (None,))


def test_what_cannot_be_timed_here_says_why():
    assert can_premeasure(get_target("ort-cpu"), None) is None
    assert "not on this machine" in can_premeasure(get_target("jetson-orin-agx"), None)
    assert "remote device" in can_premeasure(get_target("ort-cpu"), ("dev", "ssh"))


def test_a_structure_the_runtime_refuses_is_left_out_of_the_plan(digits, tmp_path):
    """A real refusal: NNCF's int8 of tf_mobilenetv3_small_minimal_100 at 32x32 stops in ONNX Runtime (a TF-"same"
    padded depthwise convolution meets a 1x1 map). Its fp32 is timed; its int8 is left out with the reason, and a
    resumed pre-measurement remembers it."""
    import io

    import timm
    import torch
    from rich.console import Console

    from edgecompress.models import parse_model_spec

    arch = "tf_mobilenetv3_small_minimal_100"
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model(arch, pretrained=False, num_classes=10).state_dict(), weights)
    entry = parse_model_spec(f"timm:{arch}={weights}")
    graph = model_graph(load_model(entry, 10), digits.input_shape)
    target = get_target("ort-cpu")
    the_plan = plan(target, Budget(latency_ms=100.0), {entry.name: graph}, {entry.name: 0.9}, sweep={"none": (0.0,)},
                    precisions=("fp32", "int8"))
    console = Console(file=io.StringIO(), width=300)
    found = premeasure(the_plan, target, {entry.name: entry}, digits, tmp_path / "pm", console)
    [(key, why)] = found.failed.items()
    assert "int8" in repr(key)
    assert "INVALID_ARGUMENT" in why or "Invalid" in why
    assert "left out" in console.file.getvalue() and arch in console.file.getvalue()
    assert len(found.latency_ms) == 1 and key not in found.latency_ms
    replanned = the_plan.with_premeasured(found, target)
    assert [e.candidate.quant.precision for e in replanned.ranked] == ["fp32"]
    assert premeasure(the_plan, target, {entry.name: entry}, digits, tmp_path / "pm") == found
