"""Datasets: the embedded default (scikit-learn's digits) and ImageFolder trees.

Every dataset comes out the same way: a :class:`Dataset` with fixed, stratified
``train`` / ``calib`` / ``val`` / ``test`` splits of normalised NCHW float32
arrays, plus what an application needs to reproduce the preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgecompress.errors import DataError

SPLITS = ("train", "calib", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Share of unreadable images above which a data directory is refused, not cleaned.
MAX_CORRUPT_SHARE = 0.1
DIGITS_NAME = "digits"


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
        return {
            "num_classes": self.num_classes,
            "image_size": self.preprocess.image_size,
            "train_samples": int(len(self.splits["train"][1])),
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


def load_dataset(data_dir: Path | None, image_size: int = 32) -> Dataset:
    if data_dir is None:
        return load_digits(image_size)
    return load_image_folder(Path(data_dir), image_size)
