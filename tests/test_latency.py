"""Kernel extraction from exported graphs, the kernel-level latency models, and `targets profile`."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.cli import main
from edgecompress.core.errors import EdgecompressError
from edgecompress.costmodel.cost import predict_cost
from edgecompress.costmodel.kernels import Kernel, ModelGraph, model_graph
from edgecompress.costmodel.latency import (
    KernelLatencyModel,
    fit,
    kernel_features,
    profile_target,
    random_network,
)
from edgecompress.costmodel.layers import profile_layers
from edgecompress.models import get_model, list_models, load_model
from edgecompress.targets import get_target, load_target_file


class Small(nn.Module):
    """conv-bn-relu, a residual dw-silu/pw block, global pool, linear: four kernels after fusion."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        return self.head(x.mean((2, 3)))


def test_graph_kernels_fuse_like_the_runtimes():
    graph = model_graph(Small().eval(), (1, 3, 16, 16))
    kinds = [(k.kind, k.act, k.residual) for k in graph.kernels]
    assert kinds == [("conv", "relu", False), ("depthwise", "silu", False), ("pointwise", "", True),
                     ("global_pool", "reducemean", False), ("linear", "", False)]
    stem = graph.kernels[0]
    assert (stem.in_channels, stem.out_channels, stem.kernel, stem.stride, stem.in_hw, stem.out_hw) == (3, 8, 3, 2, 16, 8)
    assert graph.kernels[1].groups == 8
    # Only what crosses kernels is materialized. The stem reads the input (768) and writes 512; the 1x1
    # with the fused residual reads the dw output (512) and the stem's (512) and writes 512: the peak, 1536.
    assert graph.peak_activation_elements == 1536


@pytest.mark.parametrize("task,name", [*(("digits", n) for n in list_models()),
                                       *(("fashion-mnist", n) for n in sorted(set(list_models(task="fashion-mnist"))
                                                                               - set(list_models())))])
def test_graph_macs_match_the_torch_profile(task, name):
    """Every zoo architecture's kernels (both zoos) count what torch computes: TensorFlow "same" padding (shapes
    known at run time only) and MobileViT's and EdgeNeXt's token MLPs (a linear layer once per token) included."""
    model = load_model(get_model(name, task=task), 10)
    graph = model_graph(model, (1, 3, 32, 32))
    assert graph.macs == sum(layer.macs for layer in profile_layers(model, (1, 3, 32, 32)))
    assert graph.params > 0 and graph.peak_activation_elements >= 3 * 32 * 32


def test_pruned_graph_keeps_image_input_and_classes():
    graph = model_graph(load_model(get_model("resnet10t"), 10), (1, 3, 32, 32))
    half = graph.pruned(0.5)
    assert half.kernels[0].in_channels == 3 and half.kernels[0].out_channels == graph.kernels[0].out_channels // 2
    assert half.kernels[-1].out_channels == 10
    assert 0.2 * graph.macs < half.macs < 0.35 * graph.macs
    assert graph.pruned(1.0) is graph


def test_roofline_reproduces_the_published_jetson_figures():
    import timm

    graph = model_graph(timm.create_model("resnet50").eval(), (1, 3, 224, 224))
    for target, published in (("jetson-orin-agx", 0.640), ("jetson-orin-nx", 1.082)):
        assert get_target(target).kernel_model() is None
        assert predict_cost(graph, get_target(target), "int8").latency_ms == pytest.approx(published, rel=0.05)


def test_2_4_sparsity_only_helps_where_kernels_exist():
    graph = model_graph(load_model(get_model("resnet10t"), 10), (1, 3, 32, 32))
    jetson, cpu = get_target("jetson-orin-agx"), get_target("openvino-cpu")
    assert predict_cost(graph, jetson, "int8", sparse_pattern="2:4").latency_ms < predict_cost(graph, jetson, "int8").latency_ms
    assert predict_cost(graph, cpu, "int8", sparse_pattern="2:4").latency_ms == predict_cost(graph, cpu, "int8").latency_ms


@pytest.mark.parametrize("target_name", ["ort-cpu", "openvino-cpu"])
def test_shipped_kernel_models_drive_the_local_targets(target_name):
    target = get_target(target_name)
    model = target.kernel_model()
    assert model is not None and set(target.precisions) <= set(model.composition)
    assert model.info["runtime_version"] == target.runtime().version()
    net = load_model(get_model("resnet10t"), 10)
    small, big = model_graph(net, (1, 3, 32, 32)), model_graph(net, (1, 3, 96, 96))  # 9x the work
    for precision in target.precisions:
        s, b = model.predict_ms(small, precision), model.predict_ms(big, precision)
        assert 0 < s < b, (precision, s, b)
        assert predict_cost(big, target, precision).latency_ms == pytest.approx(b)
        assert predict_cost(big, target, precision, channel_keep=0.5).latency_ms < b


def test_int8_helps_dense_convs_more_than_depthwise_on_openvino():
    """The issue's per-kernel precision effect, read from the shipped (measured) OpenVINO model."""
    model = get_target("openvino-cpu").kernel_model()
    dense = Kernel("c", "conv", 128, 128, 3, 1, 1, 16, 16, 128 * 128 * 9 * 256, 128 * 128 * 9, 128 * 256, 128 * 256, "relu")
    dw = Kernel("d", "depthwise", 128, 128, 3, 1, 128, 16, 16, 128 * 9 * 256, 128 * 9, 128 * 256, 128 * 256, "relu")

    def speedup(k):
        return model.kernel_us([k], "fp32")[0] / model.kernel_us([k], "int8")[0]

    assert speedup(dense) > speedup(dw)


def test_a_target_pointing_at_a_missing_model_fails_clearly(tmp_path):
    text = get_target("ort-cpu").path.read_text()
    import re

    text = re.sub(r'kernels = "[^"]*"', 'kernels = "nowhere"', text)
    path = tmp_path / "ort-cpu.toml"
    path.write_text(text)
    target = load_target_file(path)
    with pytest.raises(EdgecompressError, match="no kernel latency model in .*nowhere.*targets profile"):
        target.kernel_model()


def test_runtime_node_names_are_attributed_to_kernels():
    from edgecompress.costmodel.latency import attribute

    members = {"/stem/Conv": 0, "/stem/act/Relu": 0, "/blocks.0/conv/Conv": 1, "/blocks.0/Add": 1}
    tensors = {"/stem/act/Relu_output_0": 0}
    times = {
        "/stem/Conv/WithoutBiases": 10.0,  # OpenVINO keeps the ONNX name and adds to it
        "input_f32_abcd_bf16_acdb_/stem/Conv/WithoutBiases": 1.0,  # a reorder feeding the stem
        "/stem/act/Relu_output_0_nchwc": 2.0,  # ONNX Runtime names a fused conv after its output tensor
        "/blocks.0/conv/Conv": 5.0,
        "ReorderInput": 0.5,  # nothing of ours
    }
    per_kernel, unattributed = attribute(times, members, tensors)
    assert per_kernel == {0: 13.0, 1: 5.0} and unattributed == 0.5


def test_gelu_is_one_kernel_and_its_fused_node_is_attributed(tmp_path):
    """GELU exported below opset 20 is five nodes; the runtimes run one (ONNX Runtime names it ``Gelu``,
    ``Gelu_token_0``): one kernel, and the fused node's time goes to it."""
    from edgecompress.costmodel.kernels import graph_kernels
    from edgecompress.costmodel.latency import attribute
    from edgecompress.runtimes.base import export_onnx

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 1), nn.GELU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    members: dict = {}
    graph = graph_kernels(export_onnx(model, (1, 3, 8, 8), tmp_path / "m.onnx"), members=members)
    assert [(k.kind, k.act) for k in graph.kernels] == [
        ("conv", ""), ("eltwise", "gelu"), ("pointwise", ""), ("eltwise", "gelu"), ("linear", "")]
    assert sorted(n.split("/")[-1] for n, k in members.items() if k == 1) == ["Add", "Div", "Erf", "Mul", "Mul_1"]
    times = {"/0/Conv_output_0_nchwc": 3.0, "Gelu": 2.0, "/2/Conv_output_0_nchwc": 1.0, "Gelu_token_0": 4.0,
             "/5/Gemm": 1.0, "ReorderOutput": 0.5}
    per_kernel, unattributed = attribute(times, members, {}, {"Gelu": [1, 3]})
    assert per_kernel == {0: 3.0, 1: 2.0, 2: 1.0, 3: 4.0, 4: 1.0} and unattributed == 0.5


def test_reparameterizable_models_export_as_they_deploy(tmp_path):
    """MobileOne's training branches are fused before export; the exported graph computes what the model does."""
    import onnxruntime as ort
    import timm

    from edgecompress.runtimes.base import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", pretrained=False, num_classes=10).eval()
    graph = model_graph(model, (1, 3, 32, 32))
    trained_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len([k for k in graph.kernels if k.kind in ("conv", "depthwise", "pointwise")]) < trained_convs / 2
    x = torch.randn(2, 3, 32, 32)
    path = export_onnx(model, (1, 3, 32, 32), tmp_path / "m.onnx")
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-3, atol=1e-3)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == trained_convs  # the caller's model is untouched


def test_export_says_nothing_of_a_models_size_reads(tmp_path):
    """MobileViT's Python reads its input's size; the tracer's warning about it reached every plan's console
    (the export is for that size, as every export here is). The graph still computes what the model does."""
    import warnings

    import onnxruntime as ort
    import timm

    from edgecompress.runtimes.base import export_onnx

    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, (1, 3, 32, 32), tmp_path / "m.onnx")
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0], model(x).numpy(),
                                   rtol=1e-3, atol=1e-3)


def test_random_networks_are_deterministic_and_varied():
    a, shape_a = random_network(3)
    b, shape_b = random_network(3)
    assert shape_a == shape_b and str(a) == str(b)
    sizes = {random_network(s)[1][-1] for s in range(12)}
    assert len(sizes) >= 3
    # the kernels of the architectures outside the zoo: GELU, channel LayerNorm, concatenation, grouped
    # convolutions, SE with a SiLU and VoVNet's eSE
    text = "".join(str(random_network(s)[0]) for s in range(30))
    for module in ("GELU", "LayerNorm2d", "OSA", "ESE", "SiLU", "Hardswish", "Hardsigmoid"):
        assert module in text, module
    assert re.search(r"groups=(?!1\b)\d+", text)
    out = a(torch.zeros(shape_a))
    assert out.shape == (1, 10)


def test_profile_resumes_and_fits(tmp_path):
    """A profile interrupted by Ctrl-C resumes without measuring anything twice, then fits a usable model."""
    target = get_target("ort-cpu")
    calls = []

    def stop_after_five(what, done, total):
        calls.append(what)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        profile_target(target, tmp_path, networks=6, progress=stop_after_five)
    first = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(first) == 5
    records = profile_target(target, tmp_path, networks=6)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert lines[:5] == first and len(lines) == len(records) == 6 * 2
    for r in records.values():  # the profiler's times were attributed to kernels, most of them
        assert len(r["kernel_us"]) == len(r["kernels"]) and sum(u > 0 for u in r["kernel_us"]) >= 0.8 * len(r["kernels"])
    model = fit(records, info={"target": "ort-cpu"})
    model.save(tmp_path / "model")
    loaded = KernelLatencyModel.load(tmp_path / "model")
    graph = model_graph(Small().eval(), (1, 3, 32, 32))
    for precision in ("fp32", "int8"):
        assert loaded.predict_ms(graph, precision) == pytest.approx(model.predict_ms(graph, precision))
        assert loaded.composition[precision]["networks"] == 6


def test_profile_cli(tmp_path, capsys):
    code = main(["targets", "profile", "ort-cpu", "--networks", "5", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "model")])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out)
    assert set(summary["composition"]) == {"fp32", "int8"}
    assert (tmp_path / "model" / "model.json").exists()


def test_profile_refuses_a_remote_target(capsys):
    assert main(["targets", "profile", "jetson-orin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be profiled here" in err[0]


def test_features_have_one_row_per_kernel():
    graph = model_graph(Small().eval(), (1, 3, 16, 16))
    x = kernel_features(graph.kernels, "int8")
    assert x.shape == (len(graph.kernels), 14) and np.all(x[:, 0] == 2)
    assert ModelGraph((), 0).macs == 0


def _device_run(tmp_path, target, slowdown):
    """A finished build's run directory whose device measured the roofline's prediction times ``slowdown``."""
    import dataclasses

    from edgecompress.compress.methods import get_method
    from edgecompress.costmodel.cost import roofline_ms
    from edgecompress.report import BuildReport, CandidateRecord, Measured, write_report

    slow = dataclasses.replace(target, latency=dataclasses.replace(
        target.latency, per_layer_us=target.latency.per_layer_us * slowdown, overhead_ms=0.2))
    candidates = []
    for name in ("lcnet_050", "resnet10t", "mobilenetv2_050", "regnetx_002"):
        graph = model_graph(load_model(get_model(name), 10), (1, 3, 32, 32))
        for method, ratio, precision in (("none", 0.0, "fp16"), ("torch_pruning.l1", 0.5, "int8"), ("sparse24", 0.5, "int8")):
            m = get_method(method)
            ms = roofline_ms(m.graph_after(graph, ratio), slow, precision, sparse=m.sparse_pattern is not None)
            candidates.append(CandidateRecord(
                id=f"{name}-{method}-{precision}", model=name, prune_method=method, prune_ratio=ratio, precision=precision,
                predicted={}, fits_budget_predicted=True, tried=True, measured=Measured(latency_ms_median=ms)))
    run = tmp_path / "run"
    run.mkdir()
    write_report(run, BuildReport(
        tool_version="test", command="edgecompress build", target=target.name, runtime=target.runtime_name,
        runtime_version="10.3", budget={"latency_ms": 1.0}, dataset={"name": "digits", "image_size": 32, "num_classes": 10},
        test_samples=360, accuracy_basis="test", plan_ms=1.0, candidates=tuple(candidates), run_dir=str(run),
        device={"name": "nvidia@orin"}))
    return run


def test_refit_from_device_measurements(tmp_path, capsys):
    """A Jetson slower per kernel than the data sheet says: the refit finds it and the new TOML predicts it."""
    target = get_target("jetson-orin-agx")
    run = _device_run(tmp_path, target, slowdown=3.0)
    out = tmp_path / "jetson-orin-agx.toml"
    assert main(["targets", "refit", "jetson-orin", str(run), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["measurements"] == 12 and summary["mean_abs_error_before"] > 0.5
    assert summary["mean_abs_error_after"] < 0.05
    refitted = load_target_file(out)
    assert refitted.latency.per_layer_us > 2 * target.latency.per_layer_us
    assert refitted.peak_gops == target.peak_gops and "targets refit" in refitted.sources[-1]
    # Nothing is overwritten without --force; a run without --device, or for another target, is refused.
    assert main(["targets", "refit", "jetson-orin", str(run), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["targets", "refit", "jetson-orin-nx", str(run), "--out", str(tmp_path / "nx.toml")]) == 2
    assert "built for jetson-orin-agx" in capsys.readouterr().err
    assert main(["targets", "refit", "ort-cpu", str(run), "--out", str(tmp_path / "o.toml")]) == 2
    assert "kernel model" in capsys.readouterr().err
