"""Datasets: the named sources (the embedded digits, Fashion-MNIST) and ImageFolder trees.

Every dataset comes out the same way: a :class:`Dataset` with fixed, stratified
``train`` / ``calib`` / ``val`` / ``test`` splits of normalised NCHW float32
arrays, plus what an application needs to reproduce the preprocessing.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import shutil
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgecompress.core.errors import DataError

SPLITS = ("train", "calib", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Share of unreadable images above which a data directory is refused, not cleaned.
MAX_CORRUPT_SHARE = 0.1
DIGITS_NAME = "digits"
FASHION_MNIST_NAME = "fashion-mnist"
# Where Debian's dataset-fashion-mnist puts the IDX files; the variable overrides it.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "EDGECOMPRESS_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How raw RGB images become model input; written into every bundle."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    color_order: str = "RGB"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0
    resize: str = "bilinear"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    preprocess: Preprocess
    splits: dict  # split name -> (images float32 NCHW, labels int64)
    skipped_files: int = 0
    # The zoo task whose models were trained on this data (edgecompress.models.zoo_tasks()); None for a user's folder.
    # A limited or shortened copy keeps the task: the zoo's models apply, its manifest accuracies do not.
    task: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        size = self.preprocess.image_size
        return (1, 3, size, size)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self.splits[name]

    def fingerprint(self) -> str:
        """A short hash of the data and the split, for cache keys."""
        digest = hashlib.sha256(self.name.encode())
        for split in SPLITS:
            images, labels = self.splits[split]
            digest.update(split.encode())
            digest.update(np.ascontiguousarray(images[:, :, ::4, ::4]).tobytes())
            digest.update(labels.tobytes())
        return digest.hexdigest()[:16]

    def features(self) -> dict:
        """Dataset meta-features (used by reports and the meta-predictor)."""
        calib = self.splits["calib"][0]
        return {
            "num_classes": self.num_classes,
            "image_size": self.preprocess.image_size,
            "train_samples": int(len(self.splits["train"][1])),
            # Grey images stored as RGB (the digits, Fashion-MNIST): three equal channels.
            "grayscale": int(bool(len(calib)) and np.array_equal(calib[:, 0], calib[:, 1]) and np.array_equal(calib[:, 1], calib[:, 2])),
        }


def _normalise(images_uint8_nhwc: np.ndarray, pre: Preprocess) -> np.ndarray:
    x = images_uint8_nhwc.astype(np.float32) * pre.scale
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _stratified_split(labels: np.ndarray, shares: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Index arrays per split, each class divided in the same proportions."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {name: [] for name in shares}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        start = 0
        names = list(shares)
        for i, name in enumerate(names):
            stop = len(idx) if i == len(names) - 1 else start + int(round(shares[name] * len(idx)))
            out[name].extend(idx[start:stop].tolist())
            start = stop
    return {name: np.sort(np.asarray(ix, dtype=np.int64)) for name, ix in out.items()}


DIGITS_SHARES = {"train": 0.54, "calib": 0.17, "val": 0.09, "test": 0.20}


@lru_cache(maxsize=4)
def load_digits(image_size: int = 32) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits, resized to RGB ``image_size``.

    The split is fixed (seed 0) and stratified: 54% train, 17% calibration
    (about 300 images), 9% validation, 20% test.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    gray = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # N,1,8,8 in [0,1]
    big = F.interpolate(gray, size=(image_size, image_size), mode="bilinear", align_corners=False)
    rgb_uint8 = (big.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    images = rgb_uint8.permute(0, 2, 3, 1).numpy()
    labels = bunch.target.astype(np.int64)
    pre = Preprocess(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = _normalise(images, pre)
    parts = _stratified_split(labels, DIGITS_SHARES, seed=0)
    splits = {name: (x[ix], labels[ix]) for name, ix in parts.items()}
    return Dataset(
        name=DIGITS_NAME,
        class_names=tuple(str(i) for i in range(10)),
        preprocess=pre,
        splits=splits,
        task=DIGITS_NAME,
    )


# Fashion-MNIST's official 60,000 training images give train and calib (1/60 of each class: 100 of
# its 6,000); its 10,000 test images give val and test (half each: 500 per class), so no image of the
# official test set is ever trained on.
FASHION_TRAIN_SHARES = {"calib": 1 / 60, "train": 1.0}  # the last split takes the rest
FASHION_TEST_SHARES = {"val": 0.5, "test": 0.5}


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def _unpacked(gz: Path) -> Path:
    """The un-gzipped copy of ``gz`` in the cache (torchvision's IDX reader opens plain files only).

    Keyed by the source's path, size and mtime, so a replaced file is unpacked again; written
    atomically, so an interrupted unpack is never mistaken for a finished one.
    """
    from edgecompress.core.fsutil import atomic_path, cache_dir

    stat = gz.stat()
    key = hashlib.sha256(f"{gz.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / FASHION_MNIST_NAME / f"{gz.name.removesuffix('.gz')}-{key}"
    if not dest.is_file():
        try:
            with atomic_path(dest) as tmp, gzip.open(gz, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise DataError(f"{gz} is not a readable gzip file ({exc}); reinstall dataset-fashion-mnist") from exc
        except PermissionError as exc:
            raise DataError(f"cannot unpack {gz.name} into {dest.parent} ({exc.strerror}); "
                            "set EDGECOMPRESS_CACHE to a writable directory") from exc
    return dest


def _read_idx_pair(root: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W) and int64 labels (N,) of one official Fashion-MNIST part."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images_gz, labels_gz = root / images_name, root / labels_name
    try:
        images = read_image_file(str(_unpacked(images_gz))).numpy()
        labels = read_label_file(str(_unpacked(labels_gz))).numpy().astype(np.int64)
    except (AssertionError, TypeError, ValueError, RuntimeError) as exc:  # torchvision checks the header with assert
        raise DataError(f"{images_gz} or {labels_gz} is not an IDX file of images and labels ({exc or 'bad header'})") from exc
    if len(images) != len(labels):
        raise DataError(f"{images_gz} has {len(images)} images but {labels_gz} has {len(labels)} labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_gz} has labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images, labels


def _limit(parts: dict[str, np.ndarray], labels: np.ndarray, per_class: int | None) -> dict[str, np.ndarray]:
    """The first ``per_class`` indices of each class in every split (all of them when None)."""
    if per_class is None:
        return parts
    out = {}
    for name, ix in parts.items():
        keep = [ix[labels[ix] == cls][:per_class] for cls in np.unique(labels[ix])]
        out[name] = np.sort(np.concatenate(keep)) if keep else ix
    return out


def _grey_to_input(grey: np.ndarray, pre: Preprocess, chunk: int = 8192) -> np.ndarray:
    """uint8 (N, H, W) -> normalised float32 (N, 3, S, S): bilinear resize, rounded to uint8 like an RGB image
    an application would pass, the grey copied to three channels. Chunked, so the only full-size array is the result."""
    import torch
    import torch.nn.functional as F

    size = pre.image_size
    out = np.empty((len(grey), 3, size, size), np.float32)
    for start in range(0, len(grey), chunk):
        block = torch.from_numpy(grey[start:start + chunk]).float()[:, None] / 255.0
        if block.shape[-2:] != (size, size):
            block = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False)
        block_uint8 = (block.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0, :, :, None].numpy()  # N,S,S,1
        out[start:start + chunk] = _normalise(block_uint8, pre)  # the single channel broadcasts to RGB
    return out


def load_fashion_mnist(image_size: int = 32, *, limit_per_class: int | None = None) -> Dataset:
    """Zalando's Fashion-MNIST (28x28 grey clothing, 10 classes) from Debian's ``dataset-fashion-mnist``,
    resized to RGB ``image_size`` and normalised like the digits (mean = std = 0.5).

    The files are read from ``$EDGECOMPRESS_FASHION_MNIST_DIR``, else /usr/share/datasets/fashion-mnist.
    The split is fixed (seed 0) and stratified: the official 60,000 training images give ``calib``
    (100 per class, 1,000) and ``train`` (the other 59,000); the official 10,000 test images give
    ``val`` and ``test`` (500 per class each, 5,000 each).

    ``limit_per_class=N`` (tests, quick runs) keeps the first N images of each class in every split,
    a subset of the full splits: N=20 gives 200 images per split, and from N=100 on calib stays whole.
    The name becomes ``fashion-mnist-N`` so fingerprints and cache keys differ from the full set's.
    At full size the float32 arrays take about 860 MB.
    """
    if limit_per_class is not None and limit_per_class < 1:
        raise DataError(f"limit_per_class must be at least 1, not {limit_per_class}")
    return _load_fashion_mnist(fashion_mnist_dir(), image_size, limit_per_class)


@lru_cache(maxsize=2)  # by directory too, so pointing $EDGECOMPRESS_FASHION_MNIST_DIR elsewhere takes effect
def _load_fashion_mnist(root: Path, image_size: int, limit_per_class: int | None) -> Dataset:
    missing = [root / f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST is not installed: {', '.join(str(m) for m in missing)} missing; "
            f"run `apt-get install dataset-fashion-mnist` or point ${FASHION_MNIST_ENV} at a directory with the IDX files"
        )
    pre = Preprocess(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    splits = {}
    for part, shares in (("train", FASHION_TRAIN_SHARES), ("t10k", FASHION_TEST_SHARES)):
        grey, labels = _read_idx_pair(root, *FASHION_MNIST_FILES[part])
        parts = _limit(_stratified_split(labels, shares, seed=0), labels, limit_per_class)
        for name, ix in parts.items():
            if len(ix) == 0:
                raise DataError(f"{root / FASHION_MNIST_FILES[part][0]} has too few images to make a {name} split")
            splits[name] = (_grey_to_input(grey[ix], pre), labels[ix])
    return Dataset(
        name=FASHION_MNIST_NAME if limit_per_class is None else f"{FASHION_MNIST_NAME}-{limit_per_class}",
        class_names=FASHION_MNIST_CLASSES,
        preprocess=pre,
        splits={name: splits[name] for name in SPLITS},
        task=FASHION_MNIST_NAME,
    )


def _read_image(path: Path, size: int) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _scan_class_dirs(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, label))
    return classes, files


def _load_files(files: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray, int]:
    images, labels, bad = [], [], 0
    for path, label in files:
        arr = _read_image(path, size)
        if arr is None:
            bad += 1
            continue
        images.append(arr)
        labels.append(label)
    return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), np.asarray(labels, np.int64), bad


def load_image_folder(root: Path, image_size: int = 32) -> Dataset:
    """An ImageFolder tree: ``root/<class>/*.png``, or ``root/{train,val[,test]}/<class>/``.

    Without a train/val layout, a stratified split is made (seed 0). Unreadable
    images are skipped and counted; above 10% the directory is refused.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    pre = Preprocess(image_size=image_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    presplit = (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir())
    if presplit:
        classes, train_files = _scan_class_dirs(root / "train")
        held = root / "val" if (root / "val").is_dir() else root / "test"
        held_classes, held_files = _scan_class_dirs(held)
        if held_classes != classes:
            raise DataError(
                f"classes in {held} ({', '.join(held_classes)}) differ from {root / 'train'} ({', '.join(classes)})"
            )
        all_files = train_files + held_files
    else:
        classes, all_files = _scan_class_dirs(root)
    if not classes:
        raise DataError(f"data directory {root} has no class folders (expected {root}/<class>/<image>)")
    if len(classes) < 2:
        raise DataError(f"data directory {root} has one class ({classes[0]}); classification needs at least two")
    if not all_files:
        raise DataError(f"data directory {root} has class folders but no images")
    if presplit:
        x_train, y_train, bad_train = _load_files(train_files, image_size)
        x_held, y_held, bad_held = _load_files(held_files, image_size)
        bad = bad_train + bad_held
    else:
        x_all, y_all, bad = _load_files(all_files, image_size)
    if bad > MAX_CORRUPT_SHARE * len(all_files):
        raise DataError(
            f"{bad} of {len(all_files)} images in {root} cannot be read (limit {MAX_CORRUPT_SHARE:.0%})"
        )
    if presplit:
        # train -> train + calib; held-out -> val + test
        tr = _stratified_split(y_train, {"train": 0.8, "calib": 0.2}, seed=0)
        he = _stratified_split(y_held, {"val": 0.3, "test": 0.7}, seed=0)
        splits = {
            "train": (x_train[tr["train"]], y_train[tr["train"]]),
            "calib": (x_train[tr["calib"]], y_train[tr["calib"]]),
            "val": (x_held[he["val"]], y_held[he["val"]]),
            "test": (x_held[he["test"]], y_held[he["test"]]),
        }
    else:
        parts = _stratified_split(y_all, {"train": 0.6, "calib": 0.1, "val": 0.1, "test": 0.2}, seed=0)
        splits = {name: (x_all[ix], y_all[ix]) for name, ix in parts.items()}
    for name, (_, labels) in splits.items():
        if len(labels) == 0:
            raise DataError(f"data directory {root} has too few images to make a {name} split")
    splits = {name: (_normalise(images, pre), labels) for name, (images, labels) in splits.items()}
    return Dataset(
        name=f"folder:{root.resolve()}",
        class_names=tuple(classes),
        preprocess=pre,
        splits=splits,
        skipped_files=bad,
    )


# Data sources known by name: ``--data NAME`` (an existing directory of that name wins).
NAMED_DATASETS = {
    DIGITS_NAME: load_digits,
    FASHION_MNIST_NAME: load_fashion_mnist,
}


def load_dataset(data_dir: str | Path | None, image_size: int = 32) -> Dataset:
    """``None`` (the digits), a name from :data:`NAMED_DATASETS`, or an ImageFolder directory."""
    if data_dir is None:
        return load_digits(image_size)
    if str(data_dir) in NAMED_DATASETS and not Path(data_dir).is_dir():
        return NAMED_DATASETS[str(data_dir)](image_size)
    return load_image_folder(Path(data_dir), image_size)
