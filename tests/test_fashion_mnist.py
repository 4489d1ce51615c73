"""Fashion-MNIST as a named data source, and its zoo training script's quick run.

The tests on the real files need Debian's dataset-fashion-mnist (.ci/run installs it); without it
they fail and say so. The split mechanics are also checked on small synthetic IDX files, where every
image is unique, so disjointness is exact.
"""

import gzip
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_images

from edgecompress.core.errors import DataError
from edgecompress.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FASHION_MNIST_FILES,
    NAMED_DATASETS,
    SPLITS,
    _load_fashion_mnist,
    load_dataset,
    load_digits,
    load_fashion_mnist,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fashion_small():
    try:
        return load_fashion_mnist(32, limit_per_class=20)
    except DataError as exc:
        pytest.fail(f"the Fashion-MNIST tests need Debian's dataset-fashion-mnist: {exc}")


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Unpacked IDX files go to this module's own cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGECOMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def _idx(path: Path, array: np.ndarray) -> None:
    """An IDX file (big-endian header: magic 0x08 = uint8, number of dimensions, then each size), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion(root: Path, train_per_class: int = 60, test_per_class: int = 20) -> None:
    """Fashion-MNIST's four files with unique 28x28 images: pixel (0, 0..2) spell the image's number."""
    root.mkdir(parents=True, exist_ok=True)
    offset = 0
    for part, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10), per_class)
        numbers = offset + np.arange(len(labels))
        offset += len(labels)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = numbers // 65536, numbers // 256 % 256, numbers % 256
        images[:, 10:18, 10:18] = (labels * 25)[:, None, None]
        images_name, labels_name = FASHION_MNIST_FILES[part]
        _idx(root / images_name, images)
        _idx(root / labels_name, labels)


def _numbers(x: np.ndarray) -> set[int]:
    """The numbers written into synthetic images (at image_size 28 nothing is resized, so they survive)."""
    pixels = np.rint((x[:, 0, 0, :3] * 0.5 + 0.5) * 255).astype(np.int64)
    return set((pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2]).tolist())


def test_small_named_source(fashion_small):
    data = fashion_small
    assert data.name == "fashion-mnist-20" and data.task == "fashion-mnist"
    assert data.class_names == FASHION_MNIST_CLASSES
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert data.preprocess.mean == (0.5, 0.5, 0.5) and data.preprocess.std == (0.5, 0.5, 0.5)
    for split in SPLITS:
        x, y = data.split(split)
        assert x.shape == (200, 3, 32, 32) and x.dtype == np.float32
        assert np.bincount(y, minlength=10).tolist() == [20] * 10
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])  # grey as RGB
    assert data.features() == {"num_classes": 10, "image_size": 32, "train_samples": 200, "grayscale": 1}
    assert data.fingerprint() != load_fashion_mnist(32, limit_per_class=21).fingerprint()


def test_full_splits_sizes_and_subset():
    """At full size (read at 8x8 to stay light): 59,000 / 1,000 from the training file, 5,000 / 5,000 from the test file."""
    full = load_dataset("fashion-mnist", 8)
    assert full.name == "fashion-mnist" and full is load_fashion_mnist(8)
    counts = {s: np.bincount(full.split(s)[1], minlength=10).tolist() for s in SPLITS}
    assert counts == {"train": [5900] * 10, "calib": [100] * 10, "val": [500] * 10, "test": [500] * 10}
    limited = load_fashion_mnist(8, limit_per_class=30)
    for split in SPLITS:  # a limited dataset is a subset of the full one's split, never of another split
        rows = {r.tobytes() for r in full.split(split)[0][:, 0]}
        assert all(r.tobytes() in rows for r in limited.split(split)[0][:, 0])


def test_split_is_stratified_disjoint_and_fixed(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    data = load_fashion_mnist(28)
    assert data.name == "fashion-mnist"
    sizes = {s: np.bincount(data.split(s)[1], minlength=10).tolist() for s in SPLITS}
    assert sizes == {"train": [59] * 10, "calib": [1] * 10, "val": [10] * 10, "test": [10] * 10}
    numbers = {s: _numbers(data.split(s)[0]) for s in SPLITS}
    assert numbers["train"] | numbers["calib"] == set(range(600))  # from the training file only
    assert numbers["val"] | numbers["test"] == set(range(600, 800))
    assert not numbers["train"] & numbers["calib"] and not numbers["val"] & numbers["test"]
    uncached = _load_fashion_mnist.__wrapped__(tmp_path / "fm", 28, None)
    assert uncached is not data and uncached.fingerprint() == data.fingerprint()  # the split is fixed
    limited = load_fashion_mnist(28, limit_per_class=5)
    assert {s: len(limited.split(s)[1]) for s in SPLITS} == {"train": 50, "calib": 10, "val": 50, "test": 50}
    assert all(_numbers(limited.split(s)[0]) <= numbers[s] for s in SPLITS)


def test_resized_like_the_digits(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path / "fm", test_per_class=2)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    x, y = load_fashion_mnist(32).split("test")
    centre = x[:, 0, 14:18, 14:18].mean(axis=(1, 2))  # the class's grey square, scaled up from 28 to 32
    assert np.allclose(centre, (y * 25 / 255 - 0.5) / 0.5, atol=1e-6)


def test_missing_files_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist(32, limit_per_class=20)
    assert FASHION_MNIST_ENV in str(err.value) and "train-images-idx3-ubyte.gz" in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b"not gzip at all", "not a readable gzip file"),
    (gzip.compress(b"\xff" * 64), "not an IDX file"),
])
def test_corrupt_files(tmp_path, monkeypatch, content, message):
    write_fake_fashion(tmp_path, test_per_class=2)
    (tmp_path / FASHION_MNIST_FILES["t10k"][0]).write_bytes(content)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataError, match=message):
        load_fashion_mnist(28)


def test_images_and_labels_must_agree(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path, test_per_class=2)
    _idx(tmp_path / FASHION_MNIST_FILES["t10k"][1], np.zeros(3, np.uint8))
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(DataError, match="has 20 images but .* has 3 labels"):
        load_fashion_mnist(28)


def test_load_dataset_names(tmp_path, monkeypatch):
    assert set(NAMED_DATASETS) == {"digits", "fashion-mnist"}
    assert load_dataset("digits", 32) is load_digits(32)
    assert load_dataset(None, 32) is load_digits(32)
    write_fake_fashion(tmp_path / "fm", test_per_class=2)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    assert load_dataset(Path("fashion-mnist"), 28).task == "fashion-mnist"
    # A directory of that name is the user's ImageFolder, not the named source.
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "fashion-mnist", ["a", "b"], per_class=10)
    assert load_dataset("fashion-mnist", 8).name.startswith("folder:")


def _train_zoo():
    """tools/train_zoo.py as a module (tools/ is no package); registered first, as its dataclasses need."""
    if "train_zoo" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_zoo", ROOT / "tools" / "train_zoo.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_zoo"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_zoo"]


def test_zoo_lists_follow_the_brief():
    import timm

    tz = _train_zoo()
    for zoo in (tz.ZOO, tz.FASHION_ZOO):  # issue 16: at least 24 architectures of 10 families, trained on each task
        assert len(zoo) >= 24
        assert all(name in timm.list_models() for name in zoo)
        # Families by the name's leading letters (mobilenetv2/v3/v4 count as one, mnasnet and semnasnet too).
        families = {re.match(r"[a-z]+", name.removeprefix("tf_").removeprefix("sem")).group() for name in zoo}
        assert len(families) >= 10, families
    # The digits' recipe and list are those their shipped manifest was trained with.
    rows = json.loads((ROOT / "edgecompress" / "zoo" / "manifest.json").read_text())["models"]
    assert {r["name"] for r in rows} == set(tz.ZOO)
    assert all(r["recipe_hash"] == tz.recipe_hash(r["name"]) and r["recipe"] == tz.recipe_for(r["name"]) for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--task", "fashion-mnist", "--epochs", "1"], "--out"),
    (["--task", "fashion-mnist", "--limit-per-class", "5"], "--out"),
    (["--task", "digits", "--limit-per-class", "5", "--out", "x"], "fashion-mnist"),
    (["--task", "fashion-mnist", "--models", "resnet50"], "not in the fashion-mnist zoo list"),
])
def test_zoo_script_refuses(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _train_zoo().main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_zoo_quick_run_resumes_and_loads(tmp_path, monkeypatch):
    """A quick run goes to --out only; a second run skips the finished model; the checkpoint loads."""
    import torch

    from edgecompress.models import load_model, parse_model_spec

    write_fake_fashion(tmp_path / "fm", train_per_class=60, test_per_class=4)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    out = tmp_path / "zoo"
    argv = ["--task", "fashion-mnist", "--models", "lcnet_050", "--epochs", "1", "--limit-per-class", "8", "--out", str(out)]
    tz = _train_zoo()
    assert tz.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "fashion-mnist" and manifest["recipe"]["epochs"] == 1
    (row,) = manifest["models"]
    assert row["shipped"] and row["task"] == "fashion-mnist" and row["recipe"]["limit_per_class"] == 8
    before = (out / "lcnet_050.pth").stat().st_mtime_ns
    assert tz.main(argv) == 0
    assert (out / "lcnet_050.pth").stat().st_mtime_ns == before  # skipped, not retrained
    entry = parse_model_spec(f"timm:lcnet_050={out / 'lcnet_050.pth'}", task="fashion-mnist")
    model = load_model(entry, 10)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert not (ROOT / "tools" / ".zoo_work" / "fashion-mnist" / f"lcnet_050-{row['recipe_hash']}.pt").exists()


def test_zoo_trainers_side_by_side_keep_each_others_rows(tmp_path, monkeypatch):
    """Two trainers of one zoo (--models with other names) each write their row to the manifest read again under its
    lock: here the second model's training runs a whole trainer of the first, which finishes in between."""
    write_fake_fashion(tmp_path / "fm", train_per_class=60, test_per_class=4)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    out = tmp_path / "zoo"
    quick = ["--task", "fashion-mnist", "--epochs", "1", "--limit-per-class", "8", "--out", str(out)]
    tz = _train_zoo()
    train_one = tz.train_one

    def beside(name, *args, **kwargs):
        if name == "lcnet_035":
            assert tz.main([*quick, "--models", "lcnet_050"]) == 0
        return train_one(name, *args, **kwargs)

    monkeypatch.setattr(tz, "train_one", beside)
    assert tz.main([*quick, "--models", "lcnet_035"]) == 0
    rows = json.loads((out / "manifest.json").read_text())["models"]
    assert [r["name"] for r in rows] == ["lcnet_035", "lcnet_050"]
