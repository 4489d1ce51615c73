"""report.json is a versioned BuildReport, written and read by one pair of functions."""

import json

import pytest

from edgecompress.core.errors import UsageError
from edgecompress.report import REPORT_FORMAT, BuildReport, CandidateRecord, Measured, read_report, write_report


def _report(run_dir) -> BuildReport:
    measured = Measured(latency_ms_median=0.2, latency_ms_p90=0.25, peak_memory_mb=30.0, model_size_mb=0.5,
                        accuracy=0.97, baseline_accuracy=0.98)
    candidates = (
        CandidateRecord(id="a", model="lcnet_050", prune_method="none", prune_ratio=0.0, precision="fp32",
                        predicted={"latency_ms": 0.3, "memory_mb": 20.0, "accuracy": 0.98, "accuracy_low": 0.97},
                        fits_budget_predicted=True, tried=True, outcome="rejected: latency 0.400 ms > budget 0.3 ms",
                        measured=Measured(latency_ms_median=0.4, accuracy=0.98, baseline_accuracy=0.98)),
        CandidateRecord(id="b", model="lcnet_050", prune_method="torch_pruning.l1", prune_ratio=0.5, precision="int8",
                        predicted={"latency_ms": 0.1, "memory_mb": 10.0, "accuracy": 0.96, "accuracy_low": 0.93},
                        fits_budget_predicted=True, tried=True, outcome="chosen", measured=measured),
        CandidateRecord(id="c", model="lcnet_050", prune_method="none", prune_ratio=0.0, precision="fp16",
                        predicted={"latency_ms": 0.3, "memory_mb": 15.0, "accuracy": 0.98, "accuracy_low": 0.97},
                        fits_budget_predicted=False),
    )
    return BuildReport(
        tool_version="0.1.0", command="edgecompress build --target ort-cpu --latency 0.3ms", target="ort-cpu",
        runtime="onnxruntime", runtime_version="1.32.0", budget={"latency_ms": 0.3, "memory_mb": None, "max_accuracy_drop": 0.02},
        dataset={"name": "digits", "num_classes": 10, "image_size": 32, "train_samples": 970}, test_samples=360,
        accuracy_basis="meta-predictor", plan_ms=12.0, candidates=candidates, run_dir=str(run_dir), wall_seconds=30.0,
        reused_stages=("b/compress",), choice={"model": "lcnet_050", "prune_method": "torch_pruning.l1", "prune_ratio": 0.5,
                                               "precision": "int8", "method_description": "L1"},
        choice_id="b", artifact="bundle/model.onnx", bundle="bundle", measured=measured, measured_where="this machine",
        predicted={"latency_ms": 0.1, "memory_mb": 10.0, "accuracy": 0.96, "accuracy_low": 0.93, "latency_model": "kernel model"},
    )


def test_report_round_trip(tmp_path):
    report = _report(tmp_path)
    write_report(tmp_path, report)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["format"] == REPORT_FORMAT
    assert data["measured"]["latency_ms_median"] == 0.2 and data["candidates"][0]["tried"] is True
    again = read_report(tmp_path)
    assert again == report
    assert again.chosen.outcome == "chosen" and again.chosen.measured.accuracy == 0.97
    html = (tmp_path / "report.html").read_text()
    assert "lcnet_050" in html and "rejected: latency 0.400 ms" in html


def test_report_says_the_inference_threads_of_the_choice(tmp_path):
    import dataclasses

    report = _report(tmp_path)
    write_report(tmp_path, dataclasses.replace(report, measured=dataclasses.replace(report.measured, threads=1)))
    assert "<th>inference threads</th><td>1 (" in (tmp_path / "report.html").read_text()
    write_report(tmp_path, report)  # a report from before threads were chosen: the runtime's own
    assert "<th>inference threads</th><td>the runtime's own choice</td>" in (tmp_path / "report.html").read_text()


def test_report_without_a_choice_renders(tmp_path):
    import dataclasses

    report = dataclasses.replace(_report(tmp_path), choice=None, choice_id=None, artifact=None, bundle=None,
                                 measured=None, measured_where=None, predicted=None)
    write_report(tmp_path, report)
    assert read_report(tmp_path).chosen is None
    assert "edgecompress build for ort-cpu" in (tmp_path / "report.html").read_text()


def test_reads_a_report_from_before_the_format_field(tmp_path):
    data = _report(tmp_path).to_json()
    del data["format"]
    (tmp_path / "report.json").write_text(json.dumps(data))
    assert read_report(tmp_path).choice_id == "b"


def test_refuses_a_newer_or_foreign_report(tmp_path):
    data = _report(tmp_path).to_json()
    (tmp_path / "report.json").write_text(json.dumps({**data, "format": REPORT_FORMAT + 1}))
    with pytest.raises(UsageError, match="report format"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"target": "ort-cpu"}))
    with pytest.raises(UsageError, match="not a build report"):
        read_report(tmp_path)
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(UsageError, match="not valid JSON"):
        read_report(tmp_path)
    with pytest.raises(UsageError, match="no report.json"):
        read_report(tmp_path / "nowhere")
