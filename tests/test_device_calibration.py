"""Calibrating the CPU targets' kernel latency models to the machine that runs the tool (edgecompress.costmodel.devicecal)."""

import dataclasses
import io
import json
import math
import os
from pathlib import Path

import pytest
from rich.console import Console

from edgecompress.cli import main
from edgecompress.core.errors import UsageError
from edgecompress.costmodel import devicecal
from edgecompress.costmodel.cost import describe, predict_cost
from edgecompress.costmodel.devicecal import (
    ReferenceNetwork,
    calibrate,
    ensure_calibrated,
    machine_fingerprint,
)
from edgecompress.costmodel.kernels import graph_kernels
from edgecompress.targets import get_target

TWO_NETWORKS = (ReferenceNetwork("lcnet_050", 32), ReferenceNetwork("resnet10t", 32))
EXPORT_REFERENCE = devicecal.reference_graph


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    """A cache of our own, no calibration active from another test, and a short reference set."""
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(devicecal, "_ACTIVE", {})
    monkeypatch.setattr(devicecal, "REFERENCES", TWO_NETWORKS)
    monkeypatch.setattr(devicecal, "load_average", lambda: 0.5)  # a quiet machine, whatever else runs beside the tests
    monkeypatch.chdir(tmp_path)


def fake_machine(monkeypatch, factor: float, *, cpu: str = "Fake CPU 9000") -> list:
    """This machine pretends to be ``cpu``, ``factor`` times slower than the kernel model predicts; returns the
    list of networks it was asked to time."""
    timed = []

    def measure(runtime, onnx_path, precisions, input_shape, workdir):
        timed.append(onnx_path.stem)
        graph = graph_kernels(onnx_path)
        return {p: factor * runtime.target.kernel_model().predict_ms(graph, p) for p in precisions}

    monkeypatch.setattr(devicecal, "measure_artifacts", measure)
    monkeypatch.setattr(devicecal, "reference_graph", EXPORT_REFERENCE)  # exports for real, after no_timing too
    monkeypatch.setattr(devicecal, "machine_fingerprint", lambda runtime: {
        "cpu": cpu, "logical_cores": 4, "isa": ["avx2"], "runtime": runtime.name, "runtime_version": "1.0"})
    return timed


def no_timing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("nothing should be timed or exported here")

    monkeypatch.setattr(devicecal, "measure_artifacts", refuse)
    monkeypatch.setattr(devicecal, "reference_graph", refuse)


def test_the_fingerprint_names_cpu_cores_isa_and_runtime():
    runtime = get_target("ort-cpu").runtime()
    fingerprint = machine_fingerprint(runtime)
    assert fingerprint["cpu"] and fingerprint["logical_cores"] == os.cpu_count()
    assert fingerprint["isa"] == sorted(fingerprint["isa"]) and set(fingerprint["isa"]) <= set(devicecal.ISA_FLAGS)
    assert (fingerprint["runtime"], fingerprint["runtime_version"]) == ("onnxruntime", runtime.version())
    assert devicecal.fingerprint_hash(fingerprint) == devicecal.fingerprint_hash(machine_fingerprint(runtime))
    assert devicecal.fingerprint_hash({**fingerprint, "logical_cores": 64}) != devicecal.fingerprint_hash(fingerprint)


def test_a_new_machine_is_calibrated_once_then_read_from_the_cache(monkeypatch):
    target = get_target("ort-cpu")
    timed = fake_machine(monkeypatch, 2.0)
    first = ensure_calibrated(target)
    assert len(timed) == len(TWO_NETWORKS) and not first.from_cache and first.cache_path.is_file()
    assert devicecal.active_calibration("ort-cpu") is first

    no_timing(monkeypatch)
    again = calibrate(target)
    assert again.from_cache and again.scales == first.scales and again.cache_path == first.cache_path

    timed = fake_machine(monkeypatch, 2.0, cpu="Another CPU")  # another machine: measured again, cached apart
    other = calibrate(target)
    assert len(timed) == len(TWO_NETWORKS) and not other.from_cache
    assert other.machine_hash != first.machine_hash and other.cache_path != first.cache_path

    first.cache_path.write_text("{ cut short")  # an interrupted write is measured again, not trusted
    timed = fake_machine(monkeypatch, 2.0)
    assert not calibrate(target).from_cache and len(timed) == len(TWO_NETWORKS)


def test_a_calibration_measured_busy_is_measured_again_once_quiet(monkeypatch):
    target = get_target("ort-cpu")
    busy = (os.cpu_count() or 1) + 4.0
    monkeypatch.setattr(devicecal, "load_average", lambda: busy)
    timed = fake_machine(monkeypatch, 2.0)
    console = Console(file=io.StringIO(), width=300)
    first = calibrate(target, console=console)
    assert first.load_average_1m == busy and "was busy" in console.file.getvalue()
    assert calibrate(target).from_cache and len(timed) == len(TWO_NETWORKS)  # still busy: the cache is the best there is
    monkeypatch.setattr(devicecal, "load_average", lambda: 0.5)
    again = calibrate(target, console=console)
    assert not again.from_cache and len(timed) == 2 * len(TWO_NETWORKS) and again.load_average_1m == 0.5
    assert "measured on a busy machine" in console.file.getvalue()
    no_timing(monkeypatch)
    assert calibrate(target).from_cache  # quiet now, and cached quiet


def test_a_machine_three_times_slower_triples_the_predicted_latency(monkeypatch, tmp_path):
    target = get_target("openvino-cpu")
    _, graph, _ = devicecal.reference_graph(ReferenceNetwork("mobilenetv2_050", 32), tmp_path)
    before = {p: predict_cost(graph, target, p) for p in target.precisions}
    fake_machine(monkeypatch, 3.0)
    calibration = ensure_calibrated(target)
    assert set(calibration.scales) == {"fp32", "fp16", "int8"}
    assert all(s == pytest.approx(3.0) for s in calibration.scales.values())
    for precision, cost in before.items():
        after = predict_cost(graph, target, precision)
        assert after.latency_ms == pytest.approx(3 * cost.latency_ms)
        assert after.memory_mb == cost.memory_mb
        assert "rescaled x3.00 for " + precision in describe(target, precision)
    # Without the runtime installed, planning goes on with the model unscaled (and says so).
    monkeypatch.setattr(devicecal, "_ACTIVE", {})
    monkeypatch.setattr(type(target.runtime()), "version", staticmethod(lambda: __import__("openvino_is_not_here")))
    console = Console(file=io.StringIO())
    assert ensure_calibrated(target, console) is None and "not installed" in console.file.getvalue()
    assert predict_cost(graph, target, "fp32").latency_ms == before["fp32"].latency_ms
    assert "no device calibration applied" in describe(target, "fp32")
    # The Jetson's roofline is not this machine's to rescale.
    jetson = get_target("jetson-orin-nano")
    assert ensure_calibrated(jetson) is None and devicecal.active_calibration(jetson.name) is None


def test_a_model_fitted_on_this_machine_is_calibrated_too(monkeypatch, tmp_path):
    """The random networks a model is fitted on are not trained models: its own machine measures that bias on the
    trained reference networks like another machine's speed, and says so."""
    target = get_target("ort-cpu")
    kernel_model = target.kernel_model()
    _, graph, _ = devicecal.reference_graph(ReferenceNetwork("lcnet_050", 32), tmp_path)
    timed = fake_machine(monkeypatch, 0.8)
    monkeypatch.setitem(kernel_model.info, "machine", devicecal.machine_fingerprint(target.runtime()))  # the fake one
    calibration = ensure_calibrated(target)
    assert calibration.fitted_on_this_machine and timed
    assert calibration.scales == pytest.approx({"fp32": 0.8, "int8": 0.8})
    assert predict_cost(graph, target, "int8").latency_ms == pytest.approx(0.8 * kernel_model.predict_ms(graph, "int8"))
    assert "the machine it was fitted on" in describe(target, "int8")

    # The same model on a machine that differs in one ISA flag is calibrated, and not called its own.
    fitted_here = kernel_model.info["machine"]
    monkeypatch.setitem(kernel_model.info, "machine", {**fitted_here, "isa": ["avx2", "avx512f"]})
    calibration = devicecal.calibrate(target, force=True)
    assert not calibration.fitted_on_this_machine and calibration.scales["int8"] == pytest.approx(0.8)


def test_the_references_are_the_zoos_trained_models(tmp_path):
    """Not random weights: timm's initialization runs unlike a trained model (ONNX Runtime's int8 of a random-weight
    resnet10t ran 33x its prediction here)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgecompress.models import get_model, load_model

    onnx_path, _, _ = devicecal.reference_graph(ReferenceNetwork("resnet10t", 32), tmp_path)
    trained = load_model(get_model("resnet10t"), 10).state_dict()["fc.weight"].numpy()
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer]
    assert any(w.shape == trained.shape and np.allclose(w, trained) for w in weights)


def test_the_time_box_stops_after_the_minimum_number_of_networks(monkeypatch):
    timed = fake_machine(monkeypatch, 1.0)
    monkeypatch.setattr(devicecal, "TIME_BOX_S", 0.0)
    monkeypatch.setattr(devicecal, "MIN_REFERENCES", 1)
    calibration = calibrate(get_target("ort-cpu"))
    assert timed == ["lcnet_050@32"] and {m.network for m in calibration.measurements} == {"lcnet_050@32"}


def test_plan_predicts_with_the_calibration(monkeypatch, capsys):
    target = get_target("ort-cpu")
    argv = ["plan", "--target", "ort-cpu", "--latency", "1s", "--model", "lcnet_050", "--method", "torch_pruning.l1",
            "--top", "100", "--json"]
    fake_machine(monkeypatch, 1.0, cpu="Fake CPU 1")  # where the model was fitted, and predicts right
    monkeypatch.setitem(target.kernel_model().info, "machine", devicecal.machine_fingerprint(target.runtime()))
    assert main(argv) == 0
    fitted_here = {r["id"]: r["predicted"]["latency_ms"] for r in json.loads(capsys.readouterr().out)["recommendations"]}

    fake_machine(monkeypatch, 3.0)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "calibrating ort-cpu's latency model to this machine" in captured.err
    rescaled = {r["id"]: r["predicted"]["latency_ms"] for r in json.loads(captured.out)["recommendations"]}
    assert rescaled.keys() == fitted_here.keys() and len(rescaled) > 2
    assert all(rescaled[k] == pytest.approx(3 * v) for k, v in fitted_here.items())


def test_targets_calibrate_refuses_what_it_cannot_measure(capsys):
    assert main(["targets", "calibrate", "jetson-orin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "jetson-orin" in err and "another machine" in err
    ort = get_target("ort-cpu")
    without_model = dataclasses.replace(ort, latency=dataclasses.replace(ort.latency, kernels=None))
    with pytest.raises(UsageError, match="no kernel latency model"):
        calibrate(without_model)


def test_targets_calibrate_measures_ort_cpu_for_real_then_reads_the_cache(monkeypatch, capsys):
    monkeypatch.setattr(devicecal, "REFERENCES", TWO_NETWORKS[:1])  # one network, both precisions: a few seconds
    # As if fitted elsewhere: the shipped model may have been fitted on a machine like this one (then nothing is timed).
    monkeypatch.setitem(get_target("ort-cpu").kernel_model().info, "machine", {"cpu": "Another CPU", "logical_cores": 64})
    assert main(["targets", "calibrate", "ort-cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "ort-cpu" and not result["fitted_on_this_machine"] and not result["from_cache"]
    assert result["machine"] == machine_fingerprint(get_target("ort-cpu").runtime())
    assert {(m["network"], m["precision"]) for m in result["measurements"]} == {("lcnet_050@32", "fp32"),
                                                                                ("lcnet_050@32", "int8")}
    for m in result["measurements"]:
        assert 0 < m["measured_ms"] < 1000 and 0 < m["predicted_ms"] < 1000
        assert result["scales"][m["precision"]] == pytest.approx(m["measured_ms"] / m["predicted_ms"])
    assert all(math.isfinite(s) and s > 0 for s in result["scales"].values())
    assert json.loads(Path(result["cache_path"]).read_text())["scales"] == result["scales"]

    no_timing(monkeypatch)
    assert main(["targets", "calibrate", "ort-cpu"]) == 0
    out = capsys.readouterr().out
    assert "read from the cache" in out and result["cache_path"] in out

    timed = fake_machine(monkeypatch, 2.0)
    monkeypatch.setattr(devicecal, "machine_fingerprint", lambda runtime: result["machine"])
    assert main(["targets", "calibrate", "ort-cpu", "--force", "--json"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert timed == ["lcnet_050@32"] and forced["cache_path"] == result["cache_path"]
    assert forced["scales"] == {"fp32": pytest.approx(2.0), "int8": pytest.approx(2.0)}
