"""The model registry: the embedded zoos (one per task) and users' own timm weights.

``list_models("mobile*")`` and ``get_model("lcnet_050")`` query the zoo that
ships with the package for a task: the digits by default, the zoo trained on
Fashion-MNIST with ``task="fashion-mnist"`` (:func:`zoo_tasks` lists those that
ship). ``parse_model_spec("timm:resnet18=w.pth")`` describes a user's model.
:func:`load_model` builds the timm architecture and loads its weights with
``torch.load(..., weights_only=True)``, checking the sha256 where the zoo
manifest has one.

Layout: the digits zoo is ``zoo/manifest.json`` with its checkpoints beside it
(where it always was); every other task's is ``zoo/<task>/manifest.json``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import pickle
import zipfile
from functools import lru_cache
from pathlib import Path

from edgecompress.core.errors import UnknownNameError, UsageError, WeightsError
from edgecompress.core.fsutil import sha256_file

ZOO_DIR = Path(__file__).parent / "zoo"
MANIFEST = ZOO_DIR / "manifest.json"  # the digits zoo's
DEFAULT_TASK = "digits"


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    architecture: str
    weights: Path
    source: str  # "zoo", "user" (timm weights) or "onnx" (an ONNX graph: no torch model behind it)
    input_size: int | None = None
    num_classes: int | None = None
    params: int | None = None
    flops: int | None = None
    test_accuracy: float | None = None
    sha256: str | None = None
    # The task (a name in edgecompress.data.datasets.NAMED_DATASETS): a zoo model's training data; for a
    # user's weights, the task they were named under (zoo accuracies are matched within it only).
    task: str = DEFAULT_TASK

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = str(self.weights)
        return d


def zoo_dir(task: str = DEFAULT_TASK) -> Path:
    """Where ``task``'s zoo lives (whether or not it exists)."""
    return ZOO_DIR if task == DEFAULT_TASK else ZOO_DIR / task


def zoo_tasks() -> list[str]:
    """The tasks with a zoo manifest, the digits first."""
    others = sorted(p.parent.name for p in ZOO_DIR.glob("*/manifest.json"))
    return ([DEFAULT_TASK] if (ZOO_DIR / "manifest.json").is_file() else []) + others


@lru_cache(maxsize=8)
def _read_zoo(manifest: Path, task: str) -> tuple[dict[str, ModelEntry], frozenset[str]]:
    """Shipped entries by name, and the names the manifest records without a checkpoint ("shipped": false).

    Cached by the manifest's path, so a test pointing ZOO_DIR elsewhere reads its own manifest.
    """
    data = json.loads(manifest.read_text())
    entries, unshipped = {}, set()
    for row in data["models"]:
        if not row.get("shipped", True):
            unshipped.add(row["name"])
            continue
        entries[row["name"]] = ModelEntry(
            name=row["name"],
            architecture=row["architecture"],
            weights=manifest.parent / row["file"],
            source="zoo",
            input_size=row["input_size"],
            num_classes=row["num_classes"],
            params=row["params"],
            flops=row["flops"],
            test_accuracy=row["test_accuracy"],
            sha256=row["sha256"],
            task=task,
        )
    return entries, frozenset(unshipped)


def _zoo(task: str = DEFAULT_TASK) -> dict[str, ModelEntry]:
    manifest = zoo_dir(task) / "manifest.json"
    if not manifest.is_file():
        if task == DEFAULT_TASK:
            return {}  # a checkout before tools/train_zoo.py ran; callers say "the zoo is empty"
        from edgecompress.data.datasets import NAMED_DATASETS

        if task in NAMED_DATASETS:
            raise UsageError(f"no zoo is trained on {task} yet ({manifest} is missing); "
                             f"run tools/train_zoo.py --task {task}")
        raise UnknownNameError("zoo task", task, zoo_tasks())
    return _read_zoo(manifest, task)[0]


def list_models(pattern: str = "*", task: str = DEFAULT_TASK) -> list[str]:
    """Names of ``task``'s shipped zoo models matching the shell pattern."""
    return sorted(n for n in _zoo(task) if fnmatch.fnmatch(n, pattern))


def get_model(name: str, task: str = DEFAULT_TASK) -> ModelEntry:
    zoo = _zoo(task)
    if name not in zoo:
        manifest = zoo_dir(task) / "manifest.json"
        if manifest.is_file() and name in _read_zoo(manifest, task)[1]:
            raise WeightsError(
                f"zoo model {name} ({task}) is recorded but not shipped (the package's size budget); "
                f"train it with tools/train_zoo.py --task {task} --models {name} --out DIR and pass "
                f"--model timm:{name}=DIR/{name}.pth"
            )
        raise UnknownNameError("model", name, zoo)
    return zoo[name]


def parse_model_spec(spec: str, task: str = DEFAULT_TASK) -> ModelEntry:
    """``NAME`` (``task``'s zoo), ``timm:ARCH=path/to/weights.pth`` (user weights), ``timm:ARCH`` (timm's pretrained
    weights where the Hugging Face cache already holds them: nothing is downloaded) or ``path/to/model.onnx``."""
    if spec.lower().endswith(".onnx"):
        return _onnx_entry(Path(spec).expanduser(), task)
    if not spec.startswith("timm:"):
        return get_model(spec, task)
    body = spec[len("timm:"):]
    arch, path = body.split("=", 1) if "=" in body else (body, None)
    if not arch:
        raise UsageError(f"model {spec!r}: write timm:ARCH=path/to/weights.pth or timm:ARCH")
    import timm

    if arch not in timm.list_models():
        raise UnknownNameError("timm architecture", arch, timm.list_models())
    weights = cached_pretrained(arch) if path is None else Path(path).expanduser()
    if not weights.is_file():
        raise WeightsError(f"weights file {weights} does not exist")
    zoo_match = {e.sha256: e for e in (_zoo(task) if task in zoo_tasks() else {}).values()}
    digest = sha256_file(weights)
    known = zoo_match.get(digest)
    return ModelEntry(
        name=f"{arch}@{weights.stem}",
        architecture=arch,
        weights=weights,
        source="user",
        sha256=digest,
        test_accuracy=known.test_accuracy if known else None,
        task=task,
    )


PRETRAINED_FILES = ("model.safetensors", "pytorch_model.bin")


def cached_pretrained(arch: str) -> Path:
    """The file of timm's pretrained weights for ``arch`` in the local Hugging Face cache ($HF_HUB_CACHE or
    $HF_HOME/hub); a WeightsError saying how to get it when it is not there (this tool never downloads)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(arch)
    repo = cfg.hf_hub_id if cfg is not None else None
    if not repo:
        raise WeightsError(f"timm has no Hugging Face weights for {arch}; pass timm:{arch}=path/to/weights.pth")
    names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else PRETRAINED_FILES
    cache = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    raise WeightsError(f"timm's pretrained {arch} ({repo}) is not in the Hugging Face cache and nothing is downloaded "
                       f"here; on a machine online run `python -c \"import timm; timm.create_model('{arch}', "
                       f"pretrained=True)\"` and copy its cache, or pass timm:{arch}=path/to/weights.pth")


def read_state_dict(path: Path) -> dict:
    """A checkpoint's tensors: a torch file (a state dict, or {"state_dict": ...}) or safetensors."""
    import torch
    from safetensors import SafetensorError

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, SafetensorError) as exc:
        raise WeightsError(f"cannot read weights file {path}: {(str(exc) or type(exc).__name__).splitlines()[0][:200]}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds no state dict")
    return state


def _onnx_entry(path: Path, task: str) -> ModelEntry:
    """A user's ONNX graph, read and checked (edgecompress.onnx_model): its classes and image size where it fixes them."""
    from edgecompress.onnx_model import inspect_onnx

    info = inspect_onnx(path)
    return ModelEntry(name=path.name, architecture="onnx", weights=path, source="onnx", input_size=info.image_size,
                      num_classes=info.num_classes, params=info.params, sha256=sha256_file(path), task=task)


def predict(entry: ModelEntry, images, num_classes: int):
    """The uncompressed model's logits on ``images``: in torch, or in ONNX Runtime for an ONNX graph."""
    if entry.source == "onnx":
        from edgecompress.onnx_model import predict_onnx

        return predict_onnx(entry.weights, images)
    from edgecompress.compress.finetune import predict_torch

    return predict_torch(load_model(entry, num_classes), images)


def load_model(entry: ModelEntry, num_classes: int):
    """Build ``entry.architecture`` with ``num_classes`` outputs and load its weights (fp32, eval mode)."""
    import timm

    if entry.source == "onnx":
        raise UsageError(f"{entry.name} is an ONNX graph: this step needs a torch model (zoo name or timm:ARCH=weights.pth)")
    if not entry.weights.is_file():
        raise WeightsError(f"weights file {entry.weights} for {entry.name} does not exist")
    if entry.source == "zoo" and entry.sha256 and sha256_file(entry.weights) != entry.sha256:
        raise WeightsError(f"weights file {entry.weights} does not match the zoo manifest's sha256")
    if entry.num_classes is not None and entry.num_classes != num_classes:
        raise UsageError(
            f"model {entry.name} was trained for {entry.num_classes} classes; the data has {num_classes}"
        )
    state = read_state_dict(entry.weights)
    model = timm.create_model(entry.architecture, pretrained=False, num_classes=num_classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"weights file {entry.weights} does not fit architecture {entry.architecture}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors"
            + (f" (first missing: {missing[0]})" if missing else "")
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            head = "; is the number of classes right?" if tensor.ndim and key.startswith(("classifier", "fc", "head")) else ""
            raise WeightsError(
                f"weights file {entry.weights}: tensor {key} has shape {tuple(tensor.shape)}, "
                f"{entry.architecture} expects {tuple(expected[key].shape)}{head}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.eval()
