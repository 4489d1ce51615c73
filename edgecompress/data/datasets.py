"""Datasets: the named sources (the embedded digits, Fashion-MNIST) and ImageFolder trees.

Every dataset comes out the same way: a :class:`Dataset` with fixed, stratified
``train`` / ``calib`` / ``val`` / ``test`` splits, plus the :class:`Preprocess` an application needs to
reproduce the model input. The pixels stay uint8 (NHWC, as decoded and resized, one store shared by the
splits); each split's images are a :class:`NormalisedImages`, which reads as a normalised float32 NCHW
array but normalises only the rows an index asks for. 10,000 images at 224x224 hold 1.5 GB as uint8;
as float32 they took 6 GB per copy.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import shutil
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgecompress.core.errors import DataError, UnknownNameError

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
# The zoos are trained at 32x32 on the named sources, normalised to [-1, 1].
NAMED_IMAGE_SIZE = 32
NAMED_MEAN = NAMED_STD = (0.5, 0.5, 0.5)
# An ImageFolder's defaults when neither the caller nor a model says otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_MIN_SIZE, FOLDER_MAX_SIZE, FOLDER_SIZE_STEP = 32, 224, 8
SIZE_SAMPLE_FILES = 256  # image headers read to choose a folder's default size
RESIZE_MODES = ("squash", "center")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # PIL's filters, as timm names them
DECODE_BATCH = 64
DECODE_WORKERS = 8  # at most; never more than the cores
NORMALISE_CHUNK = 1024  # images normalised at once where a whole split is read (fingerprint, np.asarray)
# Pixels (per channel) of one inference batch (probes, evaluation): 256 images up to 100x100, fewer above, so that a
# batch's floats and its first layers' activations stay at a few hundred MB. At 224x224 a batch of 256 took the
# build from 2.5 GB (the uint8 store and the interpreter) to 4.4 GB while probing backbones.
INFERENCE_BATCH_PIXELS = 64 * 224 * 224


def inference_batch(images, most: int = 256, pixels: int = INFERENCE_BATCH_PIXELS) -> int:
    """Images per inference batch for ``images`` (anything with an NCHW ``shape``): ``pixels`` per channel at most,
    ``most`` images at most, one at least."""
    height, width = images.shape[-2:]
    return int(max(1, min(most, pixels // (height * width))))


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How raw RGB images become model input; written into every bundle as preprocess.json.

    Geometry (timm's eval transform): the image is resized to ``resize_size = floor(image_size / crop_pct)``
    with the PIL filter ``interpolation``, then its centre ``image_size`` x ``image_size`` is kept.
    ``resize="squash"`` resizes both sides to ``resize_size`` (the aspect is not kept; with ``crop_pct=1`` the
    whole image is squashed to the square); ``resize="center"`` resizes the shorter side, keeping the aspect.
    Then ``(pixel * scale - mean) / std`` per RGB channel, laid out ``layout``.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    color_order: str = "RGB"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0
    resize: str = "squash"
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if any(s <= 0 for s in self.std):
            raise DataError(f"std must be positive, not {self.std}")
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 1:
            raise DataError(f"image size must be a positive whole number of pixels, not {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        if self.resize not in RESIZE_MODES:
            raise DataError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise DataError(f"crop_pct must be in (0, 1], not {self.crop_pct}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @property
    def resize_size(self) -> int:
        """The side (squash) or shorter side (center) the image is resized to before the centre crop."""
        return max(self.image_size, math.floor(self.image_size / self.crop_pct))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, spec: dict) -> Preprocess:
        """The inverse of :meth:`to_dict`; keys it does not know (a bundle's input_name) are left out.

        A preprocess.json written before ``interpolation`` existed names the filter in ``resize`` and squashes.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k in fields}
        if "interpolation" not in values and values.get("resize") in INTERPOLATIONS:
            values["interpolation"], values["resize"] = values["resize"], "squash"
        return cls(**values)


def _three_floats(name: str, values) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be three numbers (R, G, B), not {values!r}") from None
    if len(out) != 3:
        raise DataError(f"{name} must be three numbers (R, G, B), not {len(out)}")
    return out


def preprocess_for_model(architecture: str) -> Preprocess:
    """The eval preprocessing timm's pretrained config gives ``architecture`` (``resnet18``, ``vit_small_patch16_224.augreg_in21k``):
    its mean, std, interpolation, crop_pct, crop mode and input size. No weights are downloaded.
    """
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(architecture):
        raise UnknownNameError("timm architecture", architecture, timm.list_models())
    cfg = get_pretrained_cfg(architecture)
    if cfg is None:  # an architecture registered without a config: ask a model (random weights, no download)
        cfg = timm.create_model(architecture, pretrained=False).pretrained_cfg
    get = cfg.get if isinstance(cfg, dict) else lambda key, default=None: getattr(cfg, key, default)
    input_size = get("input_size") or (3, 224, 224)
    interpolation = get("interpolation") or "bilinear"
    return Preprocess(
        image_size=int(input_size[-1]),
        mean=get("mean") or IMAGENET_MEAN,
        std=get("std") or IMAGENET_STD,
        resize="squash" if get("crop_mode") == "squash" else "center",
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
        crop_pct=min(float(get("crop_pct") or 1.0), 1.0),
    )


def _normalise(images_uint8_nhwc: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 (..., H, W, C) -> normalised float32 (..., 3, H, W); one channel (grey) broadcasts to RGB.

    Written in place into the one result array (a batch at 224x224 makes no float temporaries).
    """
    *lead, height, width, _ = images_uint8_nhwc.shape
    out = np.empty((*lead, 3, height, width), np.float32)
    np.moveaxis(out, -3, -1)[...] = images_uint8_nhwc
    out *= np.float32(pre.scale)
    out -= np.asarray(pre.mean, np.float32)[:, None, None]
    out /= np.asarray(pre.std, np.float32)[:, None, None]
    return out


class NormalisedImages:
    """A split's images: rows of a uint8 NHWC store (1 channel for grey sources, else 3), read as normalised
    float32 NCHW.

    Indexing normalises only what it returns, as the eager array would give it: ``x[i:j]``, ``x[index_array]``,
    ``x[mask]``, ``x[i]``, ``x[:, 0]``, ``x[:, :, ::4, ::4]``. ``len``, ``shape``, ``dtype`` and ``ndim`` are the
    float array's. ``np.asarray(x)`` builds the whole float32 split (fine for small ones); ``torch.from_numpy``
    needs a real array, so take batches: ``torch.from_numpy(x[idx])``.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, preprocess: Preprocess):
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
            raise ValueError(f"pixels must be uint8 (N, H, W, 1 or 3), not {pixels.dtype} {pixels.shape}")
        self.pixels = pixels  # the store, shared with the other splits
        self.rows = np.asarray(rows, dtype=np.int64)
        self.preprocess = preprocess

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), 3, *self.pixels.shape[1:3])

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"NormalisedImages(shape={self.shape}, stored uint8 {self.pixels.shape})"

    def subset(self, index) -> NormalisedImages:
        """The images at ``index`` (an index array or a slice), still uint8 until read."""
        return NormalisedImages(self.pixels, self.rows[index], self.preprocess)

    def with_preprocess(self, preprocess: Preprocess) -> NormalisedImages:
        """The same pixels normalised by another mean, std or scale (the geometry is the store's)."""
        return NormalisedImages(self.pixels, self.rows, preprocess)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 4 or any(k is Ellipsis or k is None for k in key):
            return np.asarray(self)[key]
        batch, channel, height, width = key + (slice(None),) * (4 - len(key))
        rows = self.rows[batch]
        if isinstance(height, slice) and isinstance(width, slice):
            # Normalising is per pixel, so cropping or striding the uint8 first gives the same floats.
            out = _normalise(self.pixels[rows, height, width], self.preprocess)
            return out if isinstance(channel, slice) and channel == slice(None) else out[..., channel, :, :]
        out = _normalise(self.pixels[rows], self.preprocess)
        return out[(Ellipsis, channel, height, width)]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("NormalisedImages are uint8 pixels; a float array is always a copy")
        out = np.empty(self.shape, np.float32)
        for start in range(0, len(self), NORMALISE_CHUNK):
            out[start:start + NORMALISE_CHUNK] = self[start:start + NORMALISE_CHUNK]
        return out if dtype is None else out.astype(dtype, copy=False)

    def min(self) -> np.float32:
        return self._extreme(np.min)

    def max(self) -> np.float32:
        return self._extreme(np.max)

    def _extreme(self, reduce) -> np.float32:
        """The whole split's min or max: normalising is increasing in each channel's pixel, so it is the extreme
        pixel of each channel, normalised."""
        if not len(self):
            raise ValueError("zero-size array to reduction operation, which has no identity")
        per_chunk = [reduce(self.pixels[self.rows[start:start + NORMALISE_CHUNK]], axis=(0, 1, 2))
                     for start in range(0, len(self), NORMALISE_CHUNK)]
        per_channel = reduce(np.stack(per_chunk), axis=0).reshape(1, 1, 1, -1)
        return reduce(_normalise(per_channel, self.preprocess))

    def is_grey(self) -> bool:
        """Every image has three equal channels (or the store holds one)."""
        if self.pixels.shape[-1] == 1:
            return True
        for start in range(0, len(self), NORMALISE_CHUNK):
            px = self.pixels[self.rows[start:start + NORMALISE_CHUNK]]
            if not (np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])):
                return False
        return True


def _chunks(images, size: int = NORMALISE_CHUNK):
    """Consecutive float32 batches of a split's images (a NormalisedImages or an array)."""
    for start in range(0, len(images), size):
        yield images[start:start + size]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    class_names: tuple[str, ...]
    preprocess: Preprocess
    # split name -> (images, labels int64): images a NormalisedImages (float32 NCHW on indexing), or a float32
    # NCHW array (a caller's own cut, e.g. tests' short splits)
    splits: dict
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

    @property
    def stored_bytes(self) -> int:
        """Bytes the images of every split hold (a pixel store the splits share counted once)."""
        stores = {}
        for images, _ in self.splits.values():
            array = images.pixels if isinstance(images, NormalisedImages) else images
            stores[id(array)] = array.nbytes
        return sum(stores.values())

    def split(self, name: str) -> tuple[NormalisedImages | np.ndarray, np.ndarray]:
        """(images, labels) of one split: images read as normalised float32 NCHW (see :class:`NormalisedImages`)."""
        return self.splits[name]

    def fingerprint(self) -> str:
        """A short hash of the data and the split, for cache keys."""
        digest = hashlib.sha256(self.name.encode())
        for split in SPLITS:
            images, labels = self.splits[split]
            digest.update(split.encode())
            # Batch by batch: the bytes of consecutive C-order rows are the whole array's.
            for start in range(0, len(images), NORMALISE_CHUNK):
                digest.update(np.ascontiguousarray(images[start:start + NORMALISE_CHUNK, :, ::4, ::4]).tobytes())
            digest.update(labels.tobytes())
        return digest.hexdigest()[:16]

    def features(self) -> dict:
        """Dataset meta-features (used by reports and the meta-predictor)."""
        calib = self.splits["calib"][0]
        return {
            "num_classes": self.num_classes,
            "image_size": self.preprocess.image_size,
            "train_samples": len(self.splits["train"][1]),
            # Grey images stored as RGB (the digits, Fashion-MNIST): three equal channels.
            "grayscale": int(bool(len(calib)) and _is_grey(calib)),
        }


def _is_grey(images) -> bool:
    if isinstance(images, NormalisedImages):
        return images.is_grey()
    return bool(np.array_equal(images[:, 0], images[:, 1]) and np.array_equal(images[:, 1], images[:, 2]))


def _with_preprocess(data: Dataset, pre: Preprocess) -> Dataset:
    """``data`` normalised by ``pre`` (same geometry: another mean, std or scale)."""
    if pre == data.preprocess:
        return data
    splits = {name: (images.with_preprocess(pre), labels) for name, (images, labels) in data.splits.items()}
    return dataclasses.replace(data, preprocess=pre, splits=splits)


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
            stop = len(idx) if i == len(names) - 1 else start + round(shares[name] * len(idx))
            out[name].extend(idx[start:stop].tolist())
            start = stop
    return {name: np.sort(np.asarray(ix, dtype=np.int64)) for name, ix in out.items()}


DIGITS_SHARES = {"train": 0.54, "calib": 0.17, "val": 0.09, "test": 0.20}


@lru_cache(maxsize=4)
def load_digits(image_size: int = NAMED_IMAGE_SIZE) -> Dataset:
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
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # N,S,S,1: grey
    labels = bunch.target.astype(np.int64)
    pre = Preprocess(image_size=image_size, mean=NAMED_MEAN, std=NAMED_STD)
    parts = _stratified_split(labels, DIGITS_SHARES, seed=0)
    splits = {name: (NormalisedImages(pixels, ix, pre), labels[ix]) for name, ix in parts.items()}
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


def _grey_to_pixels(grey: np.ndarray, size: int, chunk: int = 8192) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, S, S, 1): bilinear resize, rounded to uint8 like a grey image an application
    would pass (normalising broadcasts the one channel to RGB)."""
    import torch
    import torch.nn.functional as F

    out = np.empty((len(grey), size, size, 1), np.uint8)
    for start in range(0, len(grey), chunk):
        block = torch.from_numpy(grey[start:start + chunk]).float()[:, None] / 255.0
        if block.shape[-2:] != (size, size):
            block = F.interpolate(block, size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + chunk] = (block.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0, :, :, None].numpy()
    return out


def load_fashion_mnist(image_size: int = NAMED_IMAGE_SIZE, *, limit_per_class: int | None = None) -> Dataset:
    """Zalando's Fashion-MNIST (28x28 grey clothing, 10 classes) from Debian's ``dataset-fashion-mnist``,
    resized to RGB ``image_size`` and normalised like the digits (mean = std = 0.5).

    The files are read from ``$EDGECOMPRESS_FASHION_MNIST_DIR``, else /usr/share/datasets/fashion-mnist.
    The split is fixed (seed 0) and stratified: the official 60,000 training images give ``calib``
    (100 per class, 1,000) and ``train`` (the other 59,000); the official 10,000 test images give
    ``val`` and ``test`` (500 per class each, 5,000 each).

    ``limit_per_class=N`` (tests, quick runs) keeps the first N images of each class in every split,
    a subset of the full splits: N=20 gives 200 images per split, and from N=100 on calib stays whole.
    The name becomes ``fashion-mnist-N`` so fingerprints and cache keys differ from the full set's.
    At full size and 32x32 the pixels take about 72 MB (one grey channel, uint8).
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
    pre = Preprocess(image_size=image_size, mean=NAMED_MEAN, std=NAMED_STD)
    splits = {}
    for part, shares in (("train", FASHION_TRAIN_SHARES), ("t10k", FASHION_TEST_SHARES)):
        grey, labels = _read_idx_pair(root, *FASHION_MNIST_FILES[part])
        parts = _limit(_stratified_split(labels, shares, seed=0), labels, limit_per_class)
        for name, ix in parts.items():
            if len(ix) == 0:
                raise DataError(f"{root / FASHION_MNIST_FILES[part][0]} has too few images to make a {name} split")
        kept = np.unique(np.concatenate(list(parts.values())))  # only the images a split holds are resized
        pixels = _grey_to_pixels(grey[kept], image_size)
        for name, ix in parts.items():
            splits[name] = (NormalisedImages(pixels, np.searchsorted(kept, ix), pre), labels[ix])
    return Dataset(
        name=FASHION_MNIST_NAME if limit_per_class is None else f"{FASHION_MNIST_NAME}-{limit_per_class}",
        class_names=FASHION_MNIST_CLASSES,
        preprocess=pre,
        splits={name: splits[name] for name in SPLITS},
        task=FASHION_MNIST_NAME,
    )


# ---------------------------------------------------------------- ImageFolder trees
def _fit(img, pre: Preprocess):
    """A PIL image resized and centre-cropped to ``pre.image_size`` square by ``pre``'s geometry; the same pixels as
    torchvision's ``Resize(resize_size or (resize_size, resize_size), interpolation)`` then ``CenterCrop(image_size)``."""
    from PIL import Image

    size, target = pre.image_size, pre.resize_size
    width, height = img.size
    if pre.resize == "squash":
        new_width = new_height = target
    else:  # the shorter side to target, the longer in proportion (rounded down, as torchvision does)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = target, int(target * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_width, new_height) != (width, height):
        img = img.resize((new_width, new_height), getattr(Image.Resampling, pre.interpolation.upper()))
    if (new_width, new_height) != (size, size):
        left, top = round((new_width - size) / 2.0), round((new_height - size) / 2.0)
        img = img.crop((left, top, left + size, top + size))
    return img


def _read_image(path: Path, pre: Preprocess | int) -> np.ndarray | None:
    """One image file as uint8 (S, S, 3) RGB by ``pre``'s geometry (an int: squashed to that square, bilinear), read
    as torchvision's ``default_loader`` reads it; None if it cannot be read."""
    from PIL import Image
    from torchvision.datasets.folder import default_loader

    if not isinstance(pre, Preprocess):
        pre = Preprocess(image_size=pre, mean=NAMED_MEAN, std=NAMED_STD)
    try:
        return np.array(_fit(default_loader(str(path)), pre), dtype=np.uint8)  # writable: torch collates it
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
        return None


class _DecodeFiles:
    """Files as a map-style dataset for a torch DataLoader: item i is (uint8 HWC pixels, readable)."""

    def __init__(self, paths: list[Path], pre: Preprocess):
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        pixels = _read_image(self.paths[i], self.pre)
        if pixels is None:
            size = self.pre.image_size
            return np.zeros((size, size, 3), np.uint8), False
        return pixels, True


def _decode_files(paths: list[Path], pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (R, S, S, 3) of the R readable files, in order, and which files were readable.

    A torch DataLoader decodes and resizes in worker processes (up to one per core); batches are written into
    one preallocated uint8 array, so no list of images or float copy is ever held.
    """
    from torch.utils.data import DataLoader

    size = pre.image_size
    pixels = np.empty((len(paths), size, size, 3), np.uint8)
    readable = np.zeros(len(paths), bool)
    workers = 0 if len(paths) <= 2 * DECODE_BATCH else min(DECODE_WORKERS, os.cpu_count() or 1)
    loader = DataLoader(_DecodeFiles(paths, pre), batch_size=DECODE_BATCH, shuffle=False, num_workers=workers)
    filled = done = 0
    with _progress(len(paths), f"decoding {len(paths)} images at {size}x{size}") as advance:
        for batch, ok in loader:
            ok = ok.numpy()
            good = int(ok.sum())
            # A batch without a bad file is written as it comes (a masked copy would be one more batch held).
            pixels[filled:filled + good] = batch.numpy() if good == len(ok) else batch.numpy()[ok]
            readable[done:done + len(ok)] = ok
            filled, done = filled + good, done + len(ok)
            advance(len(ok))
    return (pixels if filled == len(paths) else pixels[:filled].copy()), readable


class _progress:
    """A transient rich bar on an interactive stderr for large folders; otherwise nothing."""

    MIN_FILES = 1000

    def __init__(self, total: int, description: str):
        self.total, self.description, self.bar = total, description, None

    def __enter__(self):
        if self.total < self.MIN_FILES or not sys.stderr.isatty():
            return lambda n: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _scan_class_dirs(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folders, hidden ones left out) and (file, label) pairs, as torchvision's ImageFolder
    finds them (files with an image suffix anywhere under the class folder, walked in sorted order)."""
    from torchvision.datasets.folder import make_dataset

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        return classes, []
    samples = make_dataset(root, {c: i for i, c in enumerate(classes)}, extensions=tuple(sorted(IMAGE_SUFFIXES)),
                           allow_empty=True)
    return classes, [(Path(path), label) for path, label in samples]


def _typical_size(paths: list[Path]) -> int:
    """A folder's default image size: the median shorter side of up to SIZE_SAMPLE_FILES images spread over the
    folder (headers only), rounded to a multiple of 8 and held within 32..224."""
    from PIL import Image

    step = max(1, len(paths) // SIZE_SAMPLE_FILES)
    sides = []
    for path in paths[::step][:SIZE_SAMPLE_FILES]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    if not sides:
        return FOLDER_MIN_SIZE
    size = math.floor(float(np.median(sides)) / FOLDER_SIZE_STEP + 0.5) * FOLDER_SIZE_STEP  # halves round up
    return int(min(max(size, FOLDER_MIN_SIZE), FOLDER_MAX_SIZE))


FLAT_SHARES = {"train": 0.6, "calib": 0.1, "val": 0.1, "test": 0.2}
TRAIN_SHARES = {"train": 0.8, "calib": 0.2}
HELD_SHARES = {"val": 0.3, "test": 0.7}
PART_NAMES = ("train", "val", "test")


def _parts(root: Path) -> dict[str, Path]:
    """The folders a tree's images come from, by the rule in :func:`load_image_folder`."""
    present = {name: root / name for name in PART_NAMES if (root / name).is_dir()}
    others = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in present]
    if "train" in present and len(present) > 1:
        return present
    if set(present) == {"train"} and not others:
        return {"all": root / "train"}
    if present and "train" not in present and not others:
        raise DataError(f"data directory {root} has {' and '.join(n + '/' for n in present)} but no train/ "
                        "(expected train/ beside val/ or test/)")
    return {"all": root}


def _resolve_preprocess(base: Preprocess | None, image_size, mean, std, interpolation, crop_pct, default_size,
                        default_mean=IMAGENET_MEAN, default_std=IMAGENET_STD) -> Preprocess:
    """``base`` (else the defaults) with every argument that is not None put over it; ``default_size()`` when no
    size is given at all."""
    fields = base.to_dict() if base is not None else {"image_size": None, "mean": default_mean, "std": default_std}
    given = {"image_size": image_size, "mean": mean, "std": std, "interpolation": interpolation, "crop_pct": crop_pct}
    fields.update({key: value for key, value in given.items() if value is not None})
    if fields["image_size"] is None:
        fields["image_size"] = default_size()
    return Preprocess(**fields)


def load_image_folder(root: Path, image_size: int | None = None, *, mean=None, std=None, interpolation: str | None = None,
                      crop_pct: float | None = None, preprocess: Preprocess | None = None) -> Dataset:
    """An ImageFolder tree, decoded to uint8 once (torchvision's ``default_loader``, a DataLoader's workers).

    Which folder gives which split (stratified by class, seed 0):

    - ``root/<class>/*`` (or ``root/train/<class>/*`` alone): 60% train, 10% calib, 10% val, 20% test.
    - ``root/train`` + ``root/val`` + ``root/test``: train -> train + calib (80/20); val -> val; test -> test.
    - ``root/train`` + ``root/val``: train -> train + calib (80/20); val -> val + test (30/70).
    - ``root/train`` + ``root/test``: train -> train + calib (80/20); test -> val + test (30/70).

    ``val/`` and ``test/`` must hold train's classes. Unreadable images are skipped and counted; above 10% the
    directory is refused.

    Preprocessing: ``preprocess`` (e.g. :func:`preprocess_for_model`) is the base and every other argument given
    overrides its field. Without either: ImageNet's mean and std, squashed bilinear, at the size the images suggest
    (their median shorter side, rounded to a multiple of 8, within 32..224).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a directory")
    parts = _parts(root)
    first = next(iter(parts.values()))
    classes, files = _scan_class_dirs(first)
    part_of = [next(iter(parts))] * len(files)
    if not classes:
        raise DataError(f"data directory {first} has no class folders (expected {first}/<class>/<image>)")
    if len(classes) < 2:
        raise DataError(f"data directory {first} has one class ({classes[0]}); classification needs at least two")
    for name, folder in list(parts.items())[1:]:
        held_classes, held_files = _scan_class_dirs(folder)
        if held_classes != classes:
            raise DataError(f"classes in {folder} ({', '.join(held_classes) or 'none'}) differ from "
                            f"{first} ({', '.join(classes)})")
        files += held_files
        part_of += [name] * len(held_files)
    if not files:
        raise DataError(f"data directory {root} has class folders but no images")
    paths = [path for path, _ in files]
    pre = _resolve_preprocess(preprocess, image_size, mean, std, interpolation, crop_pct, lambda: _typical_size(paths))
    pixels, readable = _decode_files(paths, pre)
    bad = int((~readable).sum())
    if bad > MAX_CORRUPT_SHARE * len(files):
        raise DataError(f"{bad} of {len(files)} images in {root} cannot be read (limit {MAX_CORRUPT_SHARE:.0%})")
    labels = np.asarray([label for _, label in files], np.int64)[readable]
    part_of = np.asarray(part_of)[readable]
    rows: dict[str, np.ndarray] = {}
    for name in parts:
        in_part = np.flatnonzero(part_of == name)
        if name == "all":
            shares = FLAT_SHARES
        elif name == "train":
            shares = TRAIN_SHARES
        elif {"val", "test"} <= set(parts):
            shares = {name: 1.0}
        else:
            shares = HELD_SHARES
        for split, ix in _stratified_split(labels[in_part], shares, seed=0).items():
            rows[split] = in_part[ix]
    for split in SPLITS:
        if len(rows[split]) == 0:
            raise DataError(f"data directory {root} has too few images to make a {split} split")
    return Dataset(
        name=f"folder:{root.resolve()}",
        class_names=tuple(classes),
        preprocess=pre,
        splits={split: (NormalisedImages(pixels, rows[split], pre), labels[rows[split]]) for split in SPLITS},
        skipped_files=bad,
    )


# Data sources known by name: ``--data NAME`` (an existing directory of that name wins).
NAMED_DATASETS = {
    DIGITS_NAME: load_digits,
    FASHION_MNIST_NAME: load_fashion_mnist,
}


def load_dataset(data_dir: str | Path | None, image_size: int | None = None, *, mean=None, std=None,
                 interpolation: str | None = None, crop_pct: float | None = None,
                 preprocess: Preprocess | None = None) -> Dataset:
    """``None`` (the digits), a name from :data:`NAMED_DATASETS`, or an ImageFolder directory (:func:`load_image_folder`).

    ``preprocess`` (e.g. :func:`preprocess_for_model`) is the base and every other argument given overrides its field.
    Unset, the named sources are 32x32 with mean = std = 0.5 (their zoos are trained so) and a folder follows its
    images. The named sources are small grey squares resized bilinearly, so for them only the size, mean and std
    can change.
    """
    if data_dir is None or (str(data_dir) in NAMED_DATASETS and not Path(data_dir).is_dir()):
        name = DIGITS_NAME if data_dir is None else str(data_dir)
        pre = _resolve_preprocess(preprocess, image_size, mean, std, interpolation, crop_pct, lambda: NAMED_IMAGE_SIZE,
                                  default_mean=NAMED_MEAN, default_std=NAMED_STD)
        if pre.interpolation != "bilinear" or pre.crop_pct != 1.0:
            raise DataError(f"{name} is resized bilinearly from small grey squares; interpolation "
                            f"{pre.interpolation!r} and crop_pct {pre.crop_pct} apply to image folders only")
        data = NAMED_DATASETS[name](pre.image_size)
        return _with_preprocess(data, dataclasses.replace(data.preprocess, mean=pre.mean, std=pre.std, scale=pre.scale))
    return load_image_folder(Path(data_dir), image_size, mean=mean, std=std, interpolation=interpolation,
                             crop_pct=crop_pct, preprocess=preprocess)
