import shutil

import pytest
import torch

from edgecompress.errors import UnknownNameError, UsageError, WeightsError
from edgecompress.models import get_model, load_model, parse_model_spec


def test_user_weights_load(weights_file):
    entry = parse_model_spec(f"timm:lcnet_050={weights_file}")
    assert entry.source == "user" and entry.architecture == "lcnet_050"
    model = load_model(entry, 10)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_user_weights_in_a_checkpoint_dict(tmp_path, weights_file):
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": torch.load(weights_file, weights_only=True), "epoch": 3}, wrapped)
    load_model(parse_model_spec(f"timm:lcnet_050={wrapped}"), 10)


@pytest.mark.parametrize("spec_fn, error, message", [
    (lambda w: f"timm:lcnet_050={w.parent / 'missing.pth'}", WeightsError, "does not exist"),
    (lambda w: f"timm:lcnet_05={w}", UnknownNameError, "did you mean"),
    (lambda w: "timm:lcnet_050", UsageError, "timm:ARCH="),
])
def test_bad_model_specs(weights_file, spec_fn, error, message):
    with pytest.raises(error, match=message):
        parse_model_spec(spec_fn(weights_file))


def test_truncated_weights(weights_file):
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        load_model(parse_model_spec(f"timm:lcnet_050={weights_file}"), 10)


def test_wrong_architecture(weights_file):
    with pytest.raises(WeightsError, match="does not fit architecture mobilenetv2_050"):
        load_model(parse_model_spec(f"timm:mobilenetv2_050={weights_file}"), 10)


def test_wrong_number_of_classes(weights_file):
    with pytest.raises(WeightsError, match="number of classes"):
        load_model(parse_model_spec(f"timm:lcnet_050={weights_file}"), 5)


def test_pickled_module_is_refused(tmp_path):
    import timm

    path = tmp_path / "module.pth"
    torch.save(timm.create_model("lcnet_050", num_classes=10), path)
    with pytest.raises(WeightsError, match="cannot read"):
        load_model(parse_model_spec(f"timm:lcnet_050={path}"), 10)


def test_zoo_sha_mismatch(tmp_path, monkeypatch):
    import dataclasses

    entry = get_model("lcnet_050")
    copy = tmp_path / "lcnet_050.pth"
    shutil.copy(entry.weights, copy)
    with open(copy, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(WeightsError, match="sha256"):
        load_model(dataclasses.replace(entry, weights=copy), 10)
