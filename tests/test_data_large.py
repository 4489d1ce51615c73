"""Real-size inputs (issue 17, item 3): uint8 storage with lazy normalisation, train/val/test layouts, preprocessing
from a model's pretrained config or the user, a default size that follows the data."""

import tracemalloc

import numpy as np
import pytest
import torch
from conftest import write_images

from edgecompress.core.errors import DataError, UnknownNameError
from edgecompress.data.datasets import (
    SPLITS,
    NormalisedImages,
    Preprocess,
    _normalise,
    _read_image,
    inference_batch,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
    preprocess_for_model,
)


def _write_sized(root, classes, per_class, size, seed=0, suffix=".png"):
    """Images of a given (width, height) with smooth content (a gradient and a block), so resizing matters."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.broadcast_to(ramp, (height, width, 3)) * rng.uniform(0.2, 1.0, 3)
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            arr = arr.copy()
            arr[top:top + height // 3, left:left + width // 3] = rng.integers(0, 255, 3)
            Image.fromarray(arr.astype(np.uint8)).save(root / cls / f"{i}{suffix}")


# ---------------------------------------------------------------- layouts
def test_train_val_test_are_each_respected(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], per_class=10)
    write_images(tmp_path / "val", ["a", "b"], per_class=6, seed=1)
    write_images(tmp_path / "test", ["a", "b"], per_class=4, seed=2)
    data = load_image_folder(tmp_path, image_size=12)
    sizes = {s: len(data.split(s)[1]) for s in SPLITS}
    assert sizes["train"] + sizes["calib"] == 20 and sizes["val"] == 12 and sizes["test"] == 8
    # The val split is exactly val/'s images, the test split test/'s.
    for split, folder in (("val", "val"), ("test", "test")):
        files = sorted((tmp_path / folder).rglob("*.png"))
        want = {_read_image(f, data.preprocess).tobytes() for f in files}
        images = data.split(split)[0]
        got = {np.rint((images[i:i + 1] * 0.229 + 0.485)[0, 0] * 255).tobytes() for i in range(len(images))}
        assert len(got) == len(want)
        assert np.array_equal(images[:], _normalise(np.stack([_read_image(f, data.preprocess) for f in files]),
                                                    data.preprocess))


@pytest.mark.parametrize("held", ["val", "test"])
def test_one_held_folder_gives_val_and_test(tmp_path, held):
    write_images(tmp_path / "train", ["a", "b"], per_class=10)
    write_images(tmp_path / held, ["a", "b"], per_class=10, seed=1)
    data = load_image_folder(tmp_path, image_size=8)
    sizes = {s: len(data.split(s)[1]) for s in SPLITS}
    assert sizes["train"] + sizes["calib"] == 20 and sizes["val"] + sizes["test"] == 20
    assert sizes["val"] == 6 and sizes["test"] == 14  # 30/70 of each class


def test_train_alone_is_split_like_a_flat_folder(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], per_class=20)
    data = load_image_folder(tmp_path, image_size=8)
    assert data.class_names == ("a", "b")
    assert {s: len(data.split(s)[1]) for s in SPLITS} == {"train": 24, "calib": 4, "val": 4, "test": 8}


def test_held_folders_without_train_are_refused(tmp_path):
    write_images(tmp_path / "val", ["a", "b"], per_class=5)
    write_images(tmp_path / "test", ["a", "b"], per_class=5)
    with pytest.raises(DataError, match="no train/"):
        load_image_folder(tmp_path)


def test_test_folder_must_hold_trains_classes(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], per_class=5)
    write_images(tmp_path / "val", ["a", "b"], per_class=5)
    write_images(tmp_path / "test", ["a", "c"], per_class=5)
    with pytest.raises(DataError, match="classes in .*test .*differ"):
        load_image_folder(tmp_path)


# ---------------------------------------------------------------- lazy normalisation
def test_lazy_split_reads_as_the_eager_array(tmp_path):
    _write_sized(tmp_path, ["a", "b", "c"], per_class=12, size=(40, 30))
    data = load_image_folder(tmp_path, image_size=16)
    images, labels = data.split("train")
    assert isinstance(images, NormalisedImages)
    eager = np.asarray(images)
    assert eager.dtype == np.float32 and eager.shape == images.shape == (len(labels), 3, 16, 16)
    assert images.dtype == np.float32 and images.ndim == 4 and len(images) == len(labels)
    # The eager normalisation of the same decoded files, as the loader did it before.
    pixels = images.pixels[images.rows]
    assert np.array_equal(eager, _normalise(pixels, data.preprocess))
    index = np.array([5, 0, 3, 3])
    mask = labels == 1
    for key in (slice(2, 9), index, mask, 4, (slice(None), 0), (slice(None), slice(None), slice(None, None, 4)),
                (slice(1, 5), slice(0, 2), slice(3, 9), slice(None, None, 2)), (index, 2), (Ellipsis, 0), (3, 1, 2, 5)):
        assert np.array_equal(images[key], eager[key]), key
    assert images.min() == eager.min() and images.max() == eager.max()
    assert np.array_equal(np.concatenate([images, data.split("val")[0]]),
                          np.concatenate([eager, np.asarray(data.split("val")[0])]))
    assert torch.equal(torch.from_numpy(images[index]), torch.from_numpy(eager[index]))
    np.savez(tmp_path / "split.npz", images=images, labels=labels)
    assert np.array_equal(np.load(tmp_path / "split.npz")["images"], eager)
    # A subset is still the uint8 store, read as the eager rows.
    subset = images.subset(index)
    assert isinstance(subset, NormalisedImages) and subset.pixels is images.pixels
    assert np.array_equal(np.asarray(subset), eager[index])


def test_inference_batches_shrink_with_the_image():
    """Inference reads 256 small images at once, but fewer at 224x224 (a batch of 256 there took 2 GB)."""
    assert inference_batch(np.zeros((1, 3, 32, 32))) == 256
    assert inference_batch(np.zeros((1, 3, 224, 224))) == 64
    assert inference_batch(np.zeros((1, 3, 4000, 4000))) == 1


def test_named_sources_keep_their_fingerprints_and_values(tmp_path, monkeypatch):
    """Cache keys depend on the fingerprint: these are the values the float32 loader gave (commit 980fb90)."""
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path))
    assert load_digits(32).fingerprint() == "cc06909030169f51"
    assert load_digits(16).fingerprint() == "83c2b9b1d863c974"
    try:
        small = load_fashion_mnist(32, limit_per_class=20)
    except DataError as exc:
        pytest.fail(f"needs Debian's dataset-fashion-mnist: {exc}")
    assert small.fingerprint() == "18c23890aff937e1"
    assert load_fashion_mnist(8, limit_per_class=5).fingerprint() == "77ed198326eb365c"
    assert small.features() == {"num_classes": 10, "image_size": 32, "train_samples": 200, "grayscale": 1}
    assert small.split("train")[0].pixels.shape[-1] == 1  # grey is stored once, not three times
    digits = load_digits(32)
    x = np.asarray(digits.split("test")[0])
    assert x.min() == -1.0 and x.max() == 1.0 and np.array_equal(x[:, 0], x[:, 2])


def test_a_folder_is_held_as_uint8(tmp_path):
    """400 images at 224x224: the dataset holds N*224*224*3 bytes, and loading or reading it in batches never
    holds a float32 copy of a split (4 bytes a value)."""
    count = 400
    _write_sized(tmp_path, [f"c{i}" for i in range(4)], per_class=count // 4, size=(48, 40), suffix=".jpg")
    uint8_bytes = count * 224 * 224 * 3
    tracemalloc.start()
    try:
        data = load_image_folder(tmp_path, image_size=224)
        _, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        held, _ = tracemalloc.get_traced_memory()
        for split in SPLITS:
            images, _ = data.split(split)
            for start in range(0, len(images), 32):
                assert images[start:start + 32].dtype == np.float32
        _, batch_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(data.split(s)[1]) for s in SPLITS) == count
    assert data.stored_bytes == uint8_bytes
    assert all(data.split(s)[0].pixels is data.split("train")[0].pixels for s in SPLITS)  # one store
    assert load_peak < 1.3 * uint8_bytes  # a float32 split would be 4 bytes a value
    assert batch_peak - held < 0.5 * uint8_bytes  # batches of 32; the smallest split as float32 is 0.4 of it


# ---------------------------------------------------------------- preprocessing
def test_pretrained_cfg_reaches_the_preprocess(tmp_path):
    pre = preprocess_for_model("resnet18")
    assert pre.to_dict()["mean"] == (0.485, 0.456, 0.406) and pre.to_dict()["std"] == (0.229, 0.224, 0.225)
    assert (pre.image_size, pre.interpolation, pre.crop_pct, pre.resize) == (224, "bicubic", 0.95, "center")
    assert preprocess_for_model("vit_base_patch16_224").mean == (0.5, 0.5, 0.5)
    _write_sized(tmp_path, ["a", "b"], per_class=10, size=(50, 36))
    data = load_dataset(tmp_path, 32, preprocess=pre)
    spec = data.preprocess.to_dict()
    assert spec["image_size"] == 32 and spec["mean"] == pre.mean and spec["std"] == pre.std
    assert spec["interpolation"] == "bicubic" and spec["crop_pct"] == 0.95 and spec["resize"] == "center"
    assert Preprocess.from_dict({**spec, "input_name": "input"}) == data.preprocess
    with pytest.raises(UnknownNameError, match="did you mean 'resnet18'"):
        preprocess_for_model("resnet18x")


@pytest.mark.parametrize("resize, interpolation, crop_pct", [
    ("center", "bicubic", 0.875), ("center", "bilinear", 1.0), ("squash", "bicubic", 0.9), ("squash", "bilinear", 1.0),
])
def test_geometry_is_timms_eval_transform(tmp_path, resize, interpolation, crop_pct):
    from timm.data import create_transform

    _write_sized(tmp_path, ["a"], per_class=2, size=(57, 41))
    _write_sized(tmp_path, ["b"], per_class=2, size=(30, 45))
    pre = Preprocess(image_size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), resize=resize,
                     interpolation=interpolation, crop_pct=crop_pct)
    transform = create_transform(input_size=(3, 24, 24), interpolation=interpolation, crop_pct=crop_pct,
                                 crop_mode=resize, mean=pre.mean, std=pre.std)
    for path in sorted(tmp_path.rglob("*.png")):
        from PIL import Image

        want = transform(Image.open(path).convert("RGB")).numpy()
        got = _normalise(_read_image(path, pre)[None], pre)[0]
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-5)


def test_user_mean_std_and_legacy_preprocess_json(tmp_path):
    write_images(tmp_path, ["a", "b"], per_class=10)
    data = load_dataset(tmp_path, 12, mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25], interpolation="nearest")
    assert data.preprocess.mean == (0.5, 0.5, 0.5) and data.preprocess.std == (0.25, 0.25, 0.25)
    x = data.split("test")[0]
    assert x.min() >= -2.0 and x.max() <= 2.0
    digits = load_dataset(None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert digits.preprocess.image_size == 32 and digits.split("calib")[0].min() == 0.0
    # A bundle written before interpolation existed named the filter in "resize".
    legacy = Preprocess.from_dict({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "bilinear"})
    assert (legacy.resize, legacy.interpolation, legacy.crop_pct) == ("squash", "bilinear", 1.0)


@pytest.mark.parametrize("size, expected", [((70, 90), 72), ((12, 12), 32), ((300, 400), 224), ((131, 100), 104)])
def test_default_size_follows_the_data(tmp_path, size, expected):
    _write_sized(tmp_path, ["a", "b"], per_class=10, size=size)
    data = load_dataset(tmp_path)
    assert data.preprocess.image_size == expected and data.split("train")[0].shape[2:] == (expected, expected)
    assert load_dataset(tmp_path, 16).preprocess.image_size == 16  # the caller's size wins


def test_named_sources_keep_32():
    assert load_dataset(None).preprocess.image_size == 32
    assert load_dataset("digits") is load_digits(32)


@pytest.mark.parametrize("kwargs, message", [
    ({"mean": (0.5, 0.5)}, "mean must be three numbers"),
    ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
    ({"crop_pct": 0.0}, r"crop_pct must be in \(0, 1\]"),
    ({"interpolation": "cubic"}, "interpolation must be one of"),
    ({"image_size": 0}, "image size must be a positive"),
])
def test_bad_preprocessing_is_one_line(tmp_path, kwargs, message):
    write_images(tmp_path, ["a", "b"], per_class=5)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(tmp_path, **kwargs)
    assert "\n" not in str(err.value)


def test_named_sources_refuse_another_geometry():
    with pytest.raises(DataError, match="digits is resized bilinearly") as err:
        load_dataset("digits", crop_pct=0.875)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("template", ["infer_onnxruntime.py", "infer_openvino.py", "infer_tensorrt.py"])
def test_bundle_examples_preprocess_like_the_tool(tmp_path, template):
    """The stand-alone examples in a bundle read preprocess.json's geometry as the tool does (and older files too)."""
    from PIL import Image

    from edgecompress.deploy import bundle

    source = (bundle.Path(bundle.__file__).parent / "bundle_templates" / template).read_text()
    start = source.index("def preprocess(")
    preprocess_src = source[start:source.index("\n\n\ndef ", start)]
    namespace = {"math": __import__("math"), "np": np, "Image": Image}
    exec(preprocess_src, namespace)  # noqa: S102 (our own template) the function alone: the runtime the example imports need not be installed
    _write_sized(tmp_path, ["a"], per_class=1, size=(57, 41))
    _write_sized(tmp_path, ["b"], per_class=1, size=(30, 45))
    for kwargs in ({}, {"resize": "center", "interpolation": "bicubic", "crop_pct": 0.875},
                   {"resize": "squash", "interpolation": "bicubic", "crop_pct": 0.9}):
        pre = Preprocess(image_size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), **kwargs)
        for path in sorted(tmp_path.rglob("*.png")):
            assert np.allclose(namespace["preprocess"](path, pre.to_dict()), _normalise(_read_image(path, pre)[None], pre),
                               atol=1e-6)
    legacy = {**Preprocess(image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3).to_dict(), "resize": "bilinear"}
    del legacy["interpolation"], legacy["crop_pct"]
    path = next(tmp_path.rglob("*.png"))
    assert np.allclose(namespace["preprocess"](path, legacy),
                       _normalise(_read_image(path, 24)[None], Preprocess.from_dict(legacy)), atol=1e-6)
