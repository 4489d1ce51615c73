import numpy as np
import pytest
from conftest import write_images

from edgecompress.core.errors import DataError
from edgecompress.data.datasets import SPLITS, load_image_folder


def test_digits_split_is_fixed_stratified_and_disjoint(digits):
    sizes = {s: len(digits.split(s)[1]) for s in SPLITS}
    assert sum(sizes.values()) == 1797
    assert sizes["calib"] >= 300
    for s in SPLITS:
        x, y = digits.split(s)
        assert x.shape[1:] == (3, 32, 32) and x.dtype == np.float32
        counts = np.bincount(y, minlength=10)
        assert counts.min() > 0 and counts.max() - counts.min() <= max(3, 0.1 * counts.mean())
    # Disjoint: no test image also appears in train.
    train = {row.tobytes() for row in digits.split("train")[0][:, 0, ::4, ::4]}
    assert sum(row.tobytes() in train for row in digits.split("test")[0][:, 0, ::4, ::4]) < 10


def test_image_folder_flat(tmp_path):
    write_images(tmp_path, ["cat", "dog", "eel"], per_class=20)
    data = load_image_folder(tmp_path, image_size=16)
    assert data.class_names == ("cat", "dog", "eel")
    assert sum(len(data.split(s)[1]) for s in SPLITS) == 60
    assert data.split("train")[0].shape[1:] == (3, 16, 16)


def test_image_folder_presplit(tmp_path):
    write_images(tmp_path / "train", ["a", "b"], per_class=10)
    write_images(tmp_path / "val", ["a", "b"], per_class=10, seed=1)
    data = load_image_folder(tmp_path, image_size=8)
    assert len(data.split("train")[1]) + len(data.split("calib")[1]) == 20
    assert len(data.split("val")[1]) + len(data.split("test")[1]) == 20


def test_image_folder_skips_a_few_corrupt(tmp_path):
    write_images(tmp_path, ["a", "b"], per_class=30)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    data = load_image_folder(tmp_path, image_size=8)
    assert data.skipped_files == 1


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: write_images(root, ["only"], per_class=5), "one class"),
    (lambda root: [(root / c).mkdir(parents=True) for c in ("a", "b")], "no images"),
])
def test_image_folder_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        load_image_folder(root)


def test_image_folder_too_many_corrupt(tmp_path):
    write_images(tmp_path, ["a", "b"], per_class=5)
    for i in range(3):
        (tmp_path / "a" / f"bad{i}.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match="cannot be read"):
        load_image_folder(tmp_path)
