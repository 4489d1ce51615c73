import shutil

import pytest
import torch

from edgecompress.core.errors import UnknownNameError, UsageError, WeightsError
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
    (lambda w: "timm:", UsageError, "timm:ARCH="),
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


def _write_zoo(root, task, rows):
    import json

    folder = root if task == "digits" else root / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"task": task, "models": rows}))
    return folder


def _row(name, folder, *, shipped=True, num_classes=10):
    import timm

    from edgecompress.core.fsutil import sha256_file

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes)
    path = folder / f"{name}.pth"
    if shipped:
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return {"name": name, "architecture": name, "file": path.name, "input_size": 32, "num_classes": num_classes,
            "params": 1, "flops": 1, "test_accuracy": 0.5, "sha256": sha256_file(path) if shipped else "0" * 64,
            "shipped": shipped}


@pytest.fixture
def two_zoos(tmp_path, monkeypatch):
    """A digits zoo (one model) and a fashion-mnist zoo (one shipped, one recorded only) in a temporary ZOO_DIR."""
    import edgecompress.models as models

    monkeypatch.setattr(models, "ZOO_DIR", tmp_path)
    _write_zoo(tmp_path, "digits", [_row("lcnet_050", tmp_path)])
    fashion = tmp_path / "fashion-mnist"
    fashion.mkdir()
    _write_zoo(tmp_path, "fashion-mnist", [_row("lcnet_035", fashion), _row("starnet_s050", fashion, shipped=False)])
    (tmp_path / "predictor").mkdir()  # a folder without a manifest is no task
    return tmp_path


def test_zoo_per_task(two_zoos):
    from edgecompress.models import list_models, zoo_dir, zoo_tasks

    assert zoo_tasks() == ["digits", "fashion-mnist"]
    assert list_models() == ["lcnet_050"] == list_models(task="digits")
    assert list_models("lc*", task="fashion-mnist") == ["lcnet_035"]  # the unshipped model is not listed
    assert zoo_dir("fashion-mnist") == two_zoos / "fashion-mnist"
    digits_entry, fashion_entry = get_model("lcnet_050"), get_model("lcnet_035", task="fashion-mnist")
    assert digits_entry.task == "digits" and digits_entry.weights == two_zoos / "lcnet_050.pth"
    assert fashion_entry.task == "fashion-mnist" and fashion_entry.weights == two_zoos / "fashion-mnist" / "lcnet_035.pth"
    assert parse_model_spec("lcnet_035", task="fashion-mnist") == fashion_entry
    assert load_model(fashion_entry, 10)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    # User weights equal to a zoo checkpoint take its accuracy within the same task only.
    assert parse_model_spec(f"timm:lcnet_035={fashion_entry.weights}", task="fashion-mnist").test_accuracy == 0.5
    assert parse_model_spec(f"timm:lcnet_035={fashion_entry.weights}").test_accuracy is None


def test_zoo_task_errors(two_zoos):
    from edgecompress.models import list_models

    with pytest.raises(UnknownNameError, match="did you mean 'lcnet_035'"):
        get_model("lcnet_050", task="fashion-mnist")
    with pytest.raises(UnknownNameError, match="unknown zoo task 'fashion'; did you mean 'fashion-mnist'"):
        list_models(task="fashion")
    with pytest.raises(WeightsError, match="recorded but not shipped.*--task fashion-mnist --models starnet_s050"):
        get_model("starnet_s050", task="fashion-mnist")


def test_zoo_without_the_digits_manifest(tmp_path, monkeypatch):
    import edgecompress.models as models

    monkeypatch.setattr(models, "ZOO_DIR", tmp_path)
    assert models.zoo_tasks() == [] and models.list_models() == []
    with pytest.raises(UsageError, match="no zoo is trained on fashion-mnist yet.*train_zoo.py --task fashion-mnist"):
        models.list_models(task="fashion-mnist")


def test_every_shipped_zoo_loads_and_fits_the_package_budget():
    """Each task's shipped checkpoints load at their manifest's size; all of them together stay within the package's
    budget (tools/train_zoo.py SHIP_BUDGET_BYTES: issue 16's "about 100 MB")."""
    from edgecompress.costmodel.layers import count_params
    from edgecompress.models import list_models, zoo_tasks

    assert zoo_tasks()[0] == "digits"
    total = 0
    for task in zoo_tasks():
        for name in list_models(task=task):
            entry = get_model(name, task=task)
            assert entry.task == task
            assert count_params(load_model(entry, entry.num_classes)) == entry.params  # sha256 checked on load
            total += entry.weights.stat().st_size
    assert total <= 102e6
