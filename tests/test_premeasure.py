"""Latency measured before training: the plan's structures are timed on this machine, and the plan re-ranked."""

import pytest

from edgecompress.costmodel.kernels import model_graph
from edgecompress.models import get_model, load_model
from edgecompress.plan.planner import Budget, plan, speed_key
from edgecompress.plan.premeasure import can_premeasure, premeasure, to_time
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
    latencies = premeasure(the_plan, target, {MODEL: get_model(MODEL)}, digits, tmp_path / "pm")
    assert len(latencies) == 4 and all(ms > 0 for ms in latencies.values())
    replanned = the_plan.with_premeasured(latencies, target)
    assert all(e.premeasured_ms == latencies[speed_key(e.candidate, target)] for e in replanned.ranked)
    # A budget between the fastest and the slowest measured structure: only the measured-fast ones fit.
    budget_ms = sorted(latencies.values())[1] * 1.0001
    tight = _plan(graphs, budget_ms).with_premeasured(latencies, target)
    fits = [e for e in tight.ranked if e.fits]
    assert fits and all(e.premeasured_ms <= budget_ms for e in fits)
    assert all(e.premeasured_ms > budget_ms for e in tight.ranked if not e.fits)
    # Resumed: read back, nothing timed again.
    again = premeasure(the_plan, target, {MODEL: get_model(MODEL)}, digits, tmp_path / "pm")
    assert again == latencies


def test_what_cannot_be_timed_here_says_why():
    assert can_premeasure(get_target("ort-cpu"), None) is None
    assert "not on this machine" in can_premeasure(get_target("jetson-orin-agx"), None)
    assert "remote device" in can_premeasure(get_target("ort-cpu"), ("dev", "ssh"))
