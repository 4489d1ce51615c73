"""Each pipeline stage on a small zoo model, for every target's runtime."""

import pytest

from edgecompress import pipeline
from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec
from edgecompress.core.errors import NumericalError
from edgecompress.models import get_model
from edgecompress.targets import get_target

MODEL = "lcnet_050"
TINY_FT = FinetuneSpec(steps=3, batch_size=16)


@pytest.fixture(scope="module")
def compressed_channel(tmp_path_factory, digits):
    cand = Candidate(model=MODEL, prune=PruneSpec(method="torch_pruning.l1", ratio=0.5), quant=QuantSpec(precision="int8"))
    out = tmp_path_factory.mktemp("compress")
    return pipeline.compress(cand, get_model(MODEL), digits, TINY_FT, out)


def test_compress_removes_channels_and_finetunes(compressed_channel):
    assert compressed_channel.checkpoint.is_file()
    assert compressed_channel.params < get_model(MODEL).params * 0.6
    assert compressed_channel.finetune_steps == TINY_FT.steps
    assert compressed_channel.baseline_accuracy == pytest.approx(get_model(MODEL).test_accuracy)


def test_compress_unstructured_keeps_sparsity_after_finetune(tmp_path, digits):
    cand = Candidate(model=MODEL, prune=PruneSpec(method="nncf.magnitude_global", ratio=0.7), quant=QuantSpec())
    out = pipeline.compress(cand, get_model(MODEL), digits, TINY_FT, tmp_path)
    assert out.zero_share == pytest.approx(0.7, abs=0.05)


@pytest.mark.parametrize("target_name", ["ort-cpu", "openvino-cpu", "jetson-orin-agx"])
def test_export_calibrate_verify_benchmark(target_name, compressed_channel, digits, tmp_path):
    target = get_target(target_name)
    (tmp_path / "e").mkdir()
    exported = pipeline.export(compressed_channel, target, digits, tmp_path / "e")
    calib_dir = tmp_path / "c"
    calib_dir.mkdir()
    calibrated = pipeline.calibrate(exported, target, digits, calib_dir)
    record = calibrated.calibration.pop("quant_preset")
    assert calibrated.calibration == {"source": "real", "samples": len(digits.split("calib")[1])}
    assert record["key"] == target.runtime().quant_preset().key()  # the artifact says how it was quantized
    if target.runtime_name == "onnxruntime" or target.runtime_name == "tensorrt":
        import onnx

        ops = {n.op_type for n in onnx.load(str(calibrated.artifact)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # explicit quantization (QDQ)
    verified = pipeline.verify(calibrated, target, digits)
    # int8 of the fine-tuned pruned model stays close to its torch accuracy.
    assert abs(verified.accuracy - compressed_channel.pruned_accuracy_torch) < 0.05
    pipeline.BENCH_RUNS, pipeline.BENCH_WARMUP = 20, 2
    result = pipeline.benchmark(verified, target)
    if target.local:
        assert result.measured["latency_ms_median"] > 0 and result.measured["runs"] == 20
        assert result.measured["model_size_mb"] > 0
    else:
        assert result.measured is None and "not measured" in result.where


def test_verify_rejects_nan(tmp_path, digits):
    """A model whose outputs turn NaN is caught at verify."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Div", ["input", "zero"], ["d"])
    flat = helper.make_node("GlobalAveragePool", ["d"], ["p"])
    reshape = helper.make_node("Flatten", ["p"], ["f"])
    pad = helper.make_node("Tile", ["f", "reps"], ["logits"])
    graph = helper.make_graph(
        [node, flat, reshape, pad], "nan",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 30])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]), helper.make_tensor("reps", TensorProto.INT64, [2], [1, 10])],
    )
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    cand = Candidate(model=MODEL, prune=PruneSpec(), quant=QuantSpec())
    calibrated = pipeline.CalibratedModel(candidate=cand, artifact=path, calibration={})
    with pytest.raises(NumericalError, match="NaN or Inf"):
        pipeline.verify(calibrated, get_target("ort-cpu"), digits)


def test_pipeline_reuses_finished_stages(tmp_path, small_digits):
    entries = {MODEL: get_model(MODEL)}
    cand = Candidate(model=MODEL, prune=PruneSpec(), quant=QuantSpec(precision="fp32"))
    pipeline.BENCH_RUNS, pipeline.BENCH_WARMUP = 10, 1
    first = pipeline.Pipeline(tmp_path, get_target("ort-cpu"), small_digits, entries, TINY_FT)
    a = first.run_candidate(cand)
    assert first.reused == []
    second = pipeline.Pipeline(tmp_path, get_target("ort-cpu"), small_digits, entries, TINY_FT)
    b = second.run_candidate(cand)
    assert len(second.reused) == 5
    assert a[2].accuracy == b[2].accuracy and a[3].measured == b[3].measured
    # No temporary directories are left beside the stages.
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_a_changed_method_setting_is_not_served_from_the_cache(tmp_path, small_digits, monkeypatch):
    """Method settings are in the compress stage's key: changing one rebuilds instead of reusing a stale stage."""
    import dataclasses

    from edgecompress.compress import methods

    entries = {MODEL: get_model(MODEL)}
    cand = Candidate(model=MODEL, prune=PruneSpec(method="woodfisher", ratio=0.5), quant=QuantSpec(precision="fp32"))
    pipeline.BENCH_RUNS, pipeline.BENCH_WARMUP = 10, 1
    pipeline.Pipeline(tmp_path, get_target("ort-cpu"), small_digits, entries, TINY_FT).run_candidate(cand)
    same = pipeline.Pipeline(tmp_path, get_target("ort-cpu"), small_digits, entries, TINY_FT)
    same.run_candidate(cand)
    assert len(same.reused) == 5
    method = methods.get_method("woodfisher")
    changed = dataclasses.replace(method, settings=dataclasses.replace(method.settings, samples=16))
    monkeypatch.setitem(methods.METHODS, "woodfisher", changed)
    other = pipeline.Pipeline(tmp_path, get_target("ort-cpu"), small_digits, entries, TINY_FT)
    other.run_candidate(cand)
    assert other.reused == []


@pytest.mark.parametrize("method, evaluations", [("none", 0), ("torch_pruning.l1", 1)])
def test_compress_does_not_evaluate_a_known_parent_again(tmp_path, small_digits, monkeypatch, method, evaluations):
    """The build measured each parent's accuracy to plan: compress takes it, and an uncompressed candidate is its
    parent (no evaluation at all; a 10,000-image split at 224 is minutes of it)."""
    calls = []
    real = pipeline.predict_torch
    monkeypatch.setattr(pipeline, "predict_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    cand = Candidate(model="lcnet_050", prune=PruneSpec(method=method, ratio=0.3 if method != "none" else 0.0),
                     quant=QuantSpec(precision="fp32"))
    out = tmp_path / "c"
    out.mkdir()
    compressed = pipeline.compress(cand, get_model("lcnet_050"), small_digits, FinetuneSpec(steps=2), out,
                                   baseline_accuracy=0.5)
    assert len(calls) == evaluations and compressed.baseline_accuracy == 0.5
    assert method != "none" or compressed.pruned_accuracy_torch == 0.5
