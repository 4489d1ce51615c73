"""A user's model as an ONNX graph: `build --model path/model.onnx` (post-training flows only)."""

import json

import numpy as np
import pytest
import torch

from edgecompress.cli import main
from edgecompress.models import get_model, load_model, parse_model_spec
from edgecompress.runtimes.base import export_onnx

ONNX_LINE = "is an ONNX graph: pruning needs the torch model, so only dense fp32/fp16/int8 candidates are planned"


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def zoo_torch():
    return load_model(get_model("lcnet_050"), 10)


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory, zoo_torch):
    """The zoo's lcnet_050 as a user would hand it over: exported with their own names at a fixed batch of 1 and
    opset 13 (HardSwish written as x * HardSigmoid(x))."""
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(zoo_torch, torch.zeros(1, 3, 32, 32), str(path), input_names=["images"],
                          output_names=["scores"], opset_version=13, dynamo=False)
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_spec_gives_an_onnx_entry(zoo_onnx):
    entry = parse_model_spec(str(zoo_onnx))
    assert (entry.source, entry.architecture, entry.name, entry.weights) == ("onnx", "onnx", "model.onnx", zoo_onnx)
    assert entry.num_classes == 10 and entry.input_size == 32 and entry.params > 100_000 and len(entry.sha256) == 64
    with pytest.raises(Exception, match="is an ONNX graph: this step needs a torch model"):
        load_model(entry, 10)


def test_canonical_form_and_predictions_match_torch(tmp_path, zoo_onnx, zoo_torch, digits):
    from edgecompress.onnx_model import canonical_onnx, inspect_onnx, predict_onnx

    x = digits.split("test")[0][:70]
    want = zoo_torch(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(predict_onnx(zoo_onnx, x), want, atol=1e-4)  # batch fixed to 1: one image at a time
    out = canonical_onnx(zoo_onnx, tmp_path / "c.onnx", digits.input_shape)
    info = inspect_onnx(out)
    assert (info.input_name, info.output_name, info.input_shape) == ("input", "logits", (None, 3, 32, 32))
    assert np.allclose(predict_onnx(out, x), want, atol=1e-4)


class _BatchOfOne(torch.nn.Module):
    """A graph with the batch of 1 written into it: it cannot be given a free batch axis."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(1, 4 * 32 * 32))


def test_graph_fixed_to_batch_one_stays_so(tmp_path, digits):
    from edgecompress.onnx_model import canonical_onnx, fixed_batch, predict_onnx

    torch.manual_seed(0)
    model = _BatchOfOne().eval()
    src = tmp_path / "b1.onnx"
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(src), opset_version=17, dynamo=False)
    out = canonical_onnx(src, tmp_path / "c.onnx", digits.input_shape)
    assert fixed_batch(out) == 1
    x = digits.split("test")[0][:5]
    want = np.concatenate([model(torch.from_numpy(x[i:i + 1])).detach().numpy() for i in range(len(x))])
    assert np.allclose(predict_onnx(out, x), want, atol=1e-4)


def test_kernel_graph_reads_as_the_torch_export(zoo_onnx, zoo_torch, digits):
    from edgecompress.costmodel.kernels import model_graph, onnx_graph

    from_torch = model_graph(zoo_torch, digits.input_shape)
    from_onnx = onnx_graph(zoo_onnx, digits.input_shape)
    assert not from_onnx.prunable and from_torch.prunable
    assert [(k.kind, k.act, k.macs) for k in from_onnx.kernels] == [(k.kind, k.act, k.macs) for k in from_torch.kernels]
    assert from_onnx.peak_activation_elements == from_torch.peak_activation_elements


def test_plan_holds_dense_candidates_only(zoo_onnx, digits, capsys):
    from edgecompress.build import model_facts
    from edgecompress.meta.predictor import AccuracyModel
    from edgecompress.models import parse_model_spec
    from edgecompress.plan.planner import Budget, plan
    from edgecompress.targets import get_target

    entries = {e.name: e for e in (parse_model_spec(str(zoo_onnx)), get_model("lcnet_050"))}
    graphs, accuracies = model_facts(entries, digits)
    assert capsys.readouterr().err.count(ONNX_LINE) == 1
    assert abs(accuracies["model.onnx"] - accuracies["lcnet_050"]) < 0.01
    accuracy_model = AccuracyModel.shipped(entries, digits, accuracies)  # featurizing the ONNX graph would need torch
    the_plan = plan(get_target("openvino-cpu"), Budget(latency_ms=1.0), graphs, accuracies, accuracy_model=accuracy_model)
    onnx_estimates = [e for e in the_plan.ranked if e.candidate.model == "model.onnx"]
    assert {e.candidate.prune.method for e in onnx_estimates} == {"none"}
    assert {e.candidate.quant.precision for e in onnx_estimates} == {"fp32", "fp16", "int8"}
    assert len({e.candidate.prune.method for e in the_plan.ranked if e.candidate.model == "lcnet_050"}) > 1
    by_precision = {e.candidate.quant.precision: e for e in onnx_estimates}
    assert by_precision["fp32"].accuracy == pytest.approx(accuracies["model.onnx"])
    assert by_precision["int8"].accuracy_low < by_precision["int8"].accuracy <= by_precision["fp32"].accuracy


def _garbage(tmp_path, model):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"this is not a protobuf at all" * 10)
    return path


def _exported(tmp_path, model, shape=(1, 3, 32, 32), name="m.onnx"):
    path = tmp_path / name
    export_onnx(model, shape, path)
    return path


def _flat_input(tmp_path, model):
    return _exported(tmp_path, torch.nn.Linear(3 * 32 * 32, 10), (1, 3 * 32 * 32))


def _five_classes(tmp_path, model):
    import timm

    return _exported(tmp_path, timm.create_model("lcnet_050", num_classes=5))


def _larger_images(tmp_path, model):
    path = tmp_path / "m48.onnx"
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, 3, 48, 48), str(path), opset_version=17, dynamo=False)
    return path


ONNX_INPUTS = [
    (lambda tmp, model: tmp / "missing.onnx", "does not exist"),
    (_garbage, "is not a valid ONNX model"),
    (_flat_input, "is 2-D"),
    (_five_classes, "scores 5 classes; the data has 10"),
    (_larger_images, "pass --image-size 48"),
]


@pytest.mark.parametrize("make_file, message", ONNX_INPUTS,
                         ids=["missing", "not-onnx", "not-an-image-input", "classes", "image-size"])
def test_bad_onnx_one_line_exit_2(capsys, tmp_path, zoo_torch, make_file, message):
    path = make_file(tmp_path, zoo_torch)
    code, _, err = run_cli(capsys, "build", "--target", "ort-cpu", "--latency", "1ms", "--model", str(path),
                           "--out", str(tmp_path / "run"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


@pytest.mark.slow
def test_build_from_onnx_end_to_end(tmp_path, capsys, zoo_onnx, zoo_torch, digits):
    argv = ["build", "--target", "ort-cpu", "--latency", "50ms", "--model", str(zoo_onnx), "--out", "run"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert err.count(ONNX_LINE) == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["choice"]["model"] == "model.onnx" and report["choice"]["prune_method"] == "none"
    assert all(c["prune_method"] == "none" for c in report["candidates"])
    assert report["per_class_accuracy"]["original"] and report["measured"]["latency_ms_p90"] > 0

    # The bundle verifies, and its artifact, run by someone else, scores what the torch model scores.
    code, _, err = run_cli(capsys, "verify", "run/bundle")
    assert code == 0, err
    from edgecompress.onnx_model import predict_onnx

    x, y = digits.split("test")
    artifact = tmp_path / "run" / report["artifact"]
    accuracy = float((predict_onnx(artifact, x).argmax(1) == y).mean())
    torch_accuracy = float((zoo_torch(torch.from_numpy(np.asarray(x))).argmax(1).numpy() == y).mean())
    assert accuracy == pytest.approx(report["measured"]["accuracy"], abs=1e-9)
    assert abs(accuracy - torch_accuracy) <= 0.02

    # `predict` on the bundle of a graph fixed to batch 1 (one image a call): the scores the artifact gives, by the
    # bundle's own preprocessing of PNG files written from the test images.
    from PIL import Image

    from edgecompress.deploy.bundle import predict, preprocess_image

    paths = []
    for i, image in enumerate(x[:3]):
        pixels = np.clip(np.asarray(image).transpose(1, 2, 0) * 0.5 + 0.5, 0, 1)  # the digits' mean = std = 0.5
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(paths[-1])
    code, out, err = run_cli(capsys, "predict", "run/bundle", *map(str, paths), "--top-k", "1")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3
    spec = json.loads((tmp_path / "run" / "bundle" / "preprocess.json").read_text())
    for path, result in zip(paths, predict(tmp_path / "run" / "bundle", paths)):
        logits = predict_onnx(artifact, preprocess_image(path, spec))
        assert result["top"][0]["label"] == digits.class_names[int(logits.argmax())]

    # Resume: every stage is reused and the choice is the same.
    code, _, err = run_cli(capsys, *argv[:-2], "--resume", "run")
    assert code == 0, err
    again = json.loads((tmp_path / "run" / "report.json").read_text())
    assert again["choice"] == report["choice"] and again["measured"] == report["measured"]
    assert any(s.endswith("/compress") for s in again["reused_stages"])
