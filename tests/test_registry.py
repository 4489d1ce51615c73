import json
import re
import subprocess
import sys

import pytest

from edgecompress.compress.methods import METHODS, get_method, list_methods
from edgecompress.core.errors import TargetFileError, UnknownNameError
from edgecompress.models import get_model, list_models, load_model
from edgecompress.targets import PRECISIONS, get_target, list_targets, load_target_file

REQUIRED_TARGETS = {"ort-cpu", "openvino-cpu", "jetson-orin-agx", "jetson-orin-nx", "jetson-orin-nano"}


def test_required_targets_present():
    assert REQUIRED_TARGETS <= set(list_targets())
    assert list_targets("jetson*") == ["jetson-orin-agx", "jetson-orin-nano", "jetson-orin-nx"]


@pytest.mark.parametrize("name", sorted(REQUIRED_TARGETS))
def test_target_contract(name):
    t = get_target(name)
    assert t.precisions and set(t.precisions) <= set(PRECISIONS)
    assert all(t.peak_gops[p] > 0 for p in t.precisions)
    assert t.memory_bandwidth_gbs > 0 and t.host_ram_mb() > 0
    assert t.runtime().name == t.runtime_name
    json.dumps(t.to_dict())


def test_alias_and_did_you_mean():
    assert get_target("jetson-orin").name == "jetson-orin-agx"
    with pytest.raises(UnknownNameError, match="did you mean 'openvino-cpu'"):
        get_target("openvino-cpux")


def test_listing_targets_imports_no_runtime():
    code = "import sys; from edgecompress.targets import list_targets, get_target; [get_target(n) for n in list_targets()]; " \
           "print([m for m in ('openvino', 'onnxruntime', 'tensorrt', 'torch') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("mutation, key", [
    (lambda s: s.replace('runtime = "openvino"', 'runtime = "tflite"'), "runtime"),
    (lambda s: s.replace("memory_bandwidth_gbs = 40.0\n", ""), "memory_bandwidth_gbs"),
    (lambda s: re.sub(r"\nefficiency = \{ conv = [0-9.]+", "\nefficiency = { conv = 1.5", s), "latency_model.efficiency.conv"),
    (lambda s: s.replace("fp16 = 160.0", "fp16 = \"fast\""), "peak_gops.fp16"),
    (lambda s: s + "\n[[[", "TOML"),
])
def test_malformed_target_names_file_and_key(tmp_path, mutation, key):
    src = get_target("openvino-cpu").path.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(mutation(src))
    with pytest.raises(TargetFileError) as err:
        load_target_file(bad)
    assert str(bad) in str(err.value) and key in str(err.value)


def test_zoo_has_24_architectures():
    # Their families: test_fashion_mnist.test_zoo_lists_follow_the_brief; the package's size budget:
    # test_models.test_every_shipped_zoo_loads_and_fits_the_package_budget.
    assert len(list_models()) >= 24


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_matches_manifest(name, digits):
    from edgecompress.compress.finetune import evaluate_torch
    from edgecompress.costmodel.layers import count_params

    entry = get_model(name)
    model = load_model(entry, digits.num_classes)
    assert count_params(model) == entry.params
    assert evaluate_torch(model, *digits.split("test")) == pytest.approx(entry.test_accuracy, abs=1e-6)


def test_unknown_model_did_you_mean():
    with pytest.raises(UnknownNameError, match="did you mean 'lcnet_050'"):
        get_model("lcnet_05")


@pytest.mark.parametrize("name", list_methods())
def test_method_registry(name):
    assert get_method(name) is METHODS[name]
    with pytest.raises(UnknownNameError):
        get_method(name + "x")
