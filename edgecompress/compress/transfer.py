"""Transfer: the zoos' checkpoints as pretrained backbones for a user's own data.

"Pruning with model transfer", in four steps that ``build --data DIR`` runs when no model is given:

1. **probe** every architecture of the shipped zoos (the digits, Fashion-MNIST; one checkpoint each,
   :func:`backbones`): its penultimate features on a few training images per class, and a ridge-classifier
   probe's top-1 on the validation split. That is
   how well the backbone's features already separate the user's classes, in a second or two a backbone
   (a logistic-regression probe ranked the same backbones the same way at 20-100 times the cost).
2. **choose**: the planner ranks every (backbone, method, level, precision) candidate against the budget,
   with the probe standing in for the parent's accuracy and the meta-dataset's drop for each compression
   (:class:`edgecompress.meta.predictor.DropPrior`); the first ``top`` distinct backbones in that order are
   the ones worth training.
3. **transfer**: a new head for the user's classes and a full fine-tune with a recipe scaled to the data
   (:func:`recipe_for`: steps, timm's AdamW with warmup and cosine, augmentation that fits the images).
4. The transferred models are the build's parents; their compressed candidates are fine-tuned with the
   transferred model as teacher (``Pipeline(teacher=True)``).

A user's own ``timm:ARCH=weights.pth`` trained for another number of classes (an ImageNet checkpoint)
skips 1 and 2 and is transferred the same way. Each transfer is cached in the run directory under a hash
of its backbone, recipe and data, so ``--resume`` reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from edgecompress.core.errors import DataError, WeightsError
from edgecompress.core.fsutil import atomic_path, sha256_file, write_json
from edgecompress.models import (
    ModelEntry,
    get_model,
    list_models,
    load_model,
    read_state_dict,
    zoo_tasks,
)

# The zoo whose checkpoint of an architecture is the backbone, first first: Fashion-MNIST's zoo was trained on 59,000
# images of natural objects, the digits' on 970 images of 8x8 digits.
BACKBONE_PREFERENCE = ("fashion-mnist", "digits")
PROBE_PER_CLASS = 40  # training images per class the probe fits on
PROBE_VAL_MAX = 500  # validation images it is scored on
MIN_STEPS, MAX_STEPS = 100, 600  # a transfer's fine-tune, before a time budget cuts it
EPOCHS = 10  # passes over the training split when that lands between MIN_STEPS and MAX_STEPS


@dataclasses.dataclass(frozen=True)
class TransferRecipe:
    """A full fine-tune of a backbone with a new head (timm's AdamW, warmup then cosine)."""

    steps: int
    lr: float = 2e-3
    batch_size: int = 64
    warmup_steps: int = 10
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    hflip: bool = True
    erase_prob: float = 0.25
    mixup_alpha: float = 0.0
    seed: int = 0

    def augmentation(self):
        from edgecompress.compress.finetune import Augmentation

        return Augmentation(hflip=self.hflip, erase_prob=self.erase_prob, mixup_alpha=self.mixup_alpha)


def recipe_for(data, max_steps: int | None = None) -> TransferRecipe:
    """The recipe for ``data``: EPOCHS passes over the training split, within [MIN_STEPS, MAX_STEPS] steps.

    Small data gets more passes (100 steps over 500 images are 13 epochs), large data fewer (600 steps of 64
    are 1.3 epochs of 30,000 images). Horizontal flips only for colour images: grey images here are
    digits and documents, where a mirror changes the class. ``max_steps`` (a time budget) caps the steps.
    """
    batch = 64
    n = len(data.split("train")[1])
    steps = int(np.clip(np.ceil(EPOCHS * n / batch), MIN_STEPS, MAX_STEPS))
    if max_steps is not None:
        steps = max(1, min(steps, int(max_steps)))
    grey = bool(data.features()["grayscale"])
    return TransferRecipe(steps=steps, batch_size=batch, warmup_steps=min(10, steps // 10), hflip=not grey)


# ---------------------------------------------------------------- backbones
def backbones(tasks: list[str] | None = None) -> dict[str, ModelEntry]:
    """One shipped checkpoint per architecture of the zoos of ``tasks`` (default: all), named ``NAME@TASK``.

    An architecture in more than one zoo (22 of the 27 are in both) is taken from the first of
    :data:`BACKBONE_PREFERENCE` that has it: probing costs the same for each checkpoint (all 22 backbones at
    224x224 took 10 minutes), so a second copy of an architecture would double that for a backbone whose every
    weight the transfer fine-tunes anyway."""
    tasks = tasks or zoo_tasks()
    rank = {t: i for i, t in enumerate(BACKBONE_PREFERENCE)}
    out, seen = {}, set()
    for task in sorted(tasks, key=lambda t: rank.get(t, len(rank))):
        for name in list_models(task=task):
            entry = get_model(name, task)
            if entry.architecture not in seen:
                seen.add(entry.architecture)
                out[f"{name}@{task}"] = dataclasses.replace(entry, name=f"{name}@{task}")
    return out


def checkpoint_classes(entry: ModelEntry) -> int | None:
    """How many classes the checkpoint's head has (None if the architecture's head cannot be found in it)."""
    import timm

    if entry.num_classes is not None:
        return entry.num_classes
    cfg = timm.models.get_pretrained_cfg(entry.architecture)  # the head's name, without building the model
    classifier = cfg.classifier if cfg is not None else None
    if not classifier:
        return None
    weight = read_state_dict(entry.weights).get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def load_backbone(entry: ModelEntry, num_classes: int):
    """The checkpoint with its own head replaced by a freshly initialised one for ``num_classes``."""
    own = checkpoint_classes(entry)
    if own is None:
        raise WeightsError(f"cannot find the classifier of {entry.architecture} in {entry.weights}")
    model = load_model(dataclasses.replace(entry, num_classes=own), own)
    model.reset_classifier(num_classes)
    return model


def _pre_logits(model, images) -> np.ndarray:
    import torch

    from edgecompress.data.datasets import inference_batch

    model.eval()
    batch_size, out = inference_batch(images), []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.asarray(images[i:i + batch_size]))
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).flatten(1).numpy())
    return np.concatenate(out)


def _per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def _subset(images, index: np.ndarray):
    """``images[index]``, left unread where the split reads its images lazily (NormalisedImages)."""
    return images.subset(index) if hasattr(images, "subset") else images[index]


def probe(model, data) -> float:
    """Top-1 on the validation split of a ridge classifier on the backbone's standardised penultimate features."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = data.split("train")
    x_val, y_val = data.split("val")
    fit = _per_class(y_train, PROBE_PER_CLASS)
    score = np.arange(len(y_val)) if len(y_val) <= PROBE_VAL_MAX else \
        np.sort(np.random.default_rng(0).choice(len(y_val), PROBE_VAL_MAX, replace=False))
    f_train = _pre_logits(model, _subset(x_train, fit))
    f_val = _pre_logits(model, _subset(x_val, score))
    scaler = StandardScaler().fit(f_train)
    clf = RidgeClassifier(alpha=10.0).fit(scaler.transform(f_train), y_train[fit])
    return float((clf.predict(scaler.transform(f_val)) == y_val[score]).mean())


def probe_all(entries: dict[str, ModelEntry], data, console=None, *, stop_at: float | None = None,
              at_least: int = 1) -> tuple[dict[str, float], dict]:
    """Every backbone's probe top-1 and its kernel graph with the data's head (for the planner's costs).

    With ``stop_at`` (a time.time()), probing stops there once ``at_least`` backbones are done, smallest first
    (by parameters: the cheapest to probe, transfer and run), and says how many it left out."""
    from rich.progress import Progress

    from edgecompress.costmodel.kernels import model_graph

    probes, graphs = {}, {}
    order = sorted(entries, key=lambda n: (entries[n].params or 0, n)) if stop_at is not None else list(entries)
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("probing backbones on your data", total=len(entries))
        for name in order:
            entry = entries[name]
            if stop_at is not None and len(probes) >= at_least and time.time() > stop_at:
                if console is not None:
                    console.print(f"probing stopped at the time budget's share after {len(probes)} of "
                                  f"{len(entries)} backbones (the smallest)")
                break
            model = load_backbone(entry, data.num_classes)
            why = runs_on(model, data.input_shape)
            if why is None:
                probes[name] = probe(model, data)
                graphs[name] = model_graph(model, data.input_shape)
            elif console is not None:
                console.print(f"skipped {name}: it does not run on {data.input_shape[-2]}x{data.input_shape[-1]} "
                              f"images ({why})")
            progress.advance(bar)
    if not probes:
        raise DataError(f"no zoo backbone runs on {data.input_shape[-2]}x{data.input_shape[-1]} images; "
                        "try --image-size 32 or pass your own --model")
    return probes, graphs


def runs_on(model, input_shape) -> str | None:
    """None where ``model`` runs one image of ``input_shape`` (N, C, H, W), else why not, in one line. Some
    architectures only take some sizes: DLA's trees join branches whose sizes differ after odd downsamplings
    (48x48 gives 2x2 and 1x1)."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape[1:])))
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def choose(probes: dict[str, float], graphs: dict, target, budget, top: int, sweep=None, precisions=None) -> list[str]:
    """The first ``top`` distinct backbones in the planner's order, with the probes as parent accuracies."""
    from edgecompress.meta.predictor import DropPrior
    from edgecompress.plan.planner import plan

    the_plan = plan(target, budget, graphs, probes, sweep=sweep, accuracy_model=DropPrior.shipped(probes),
                    precisions=precisions)
    chosen: list[str] = []
    for est in the_plan.ranked:
        if est.candidate.model not in chosen:
            chosen.append(est.candidate.model)
        if len(chosen) == top:
            break
    return chosen


# ---------------------------------------------------------------- transfer
def step_seconds(entry: ModelEntry, data, recipe: TransferRecipe, steps: int = 3) -> float:
    """Seconds one fine-tune step of this backbone takes here (timed after one warm-up step)."""
    from edgecompress.compress.finetune import finetune

    x, y = data.split("train")
    model = load_backbone(entry, data.num_classes)
    finetune(model, x, y, steps=2, batch_size=recipe.batch_size)
    start = time.perf_counter()
    finetune(model, x, y, steps=steps, batch_size=recipe.batch_size, augmentation=recipe.augmentation())
    return (time.perf_counter() - start) / steps


def transfer(entry: ModelEntry, data, recipe: TransferRecipe, out: Path, *, on_step=None) -> ModelEntry:
    """Fine-tune ``entry`` with a new head on ``data``; cached in ``out`` under a hash of what went in.

    Returns the transferred model as a ModelEntry (source "transfer") whose fp32 state dict is in ``out``.
    """
    import torch

    from edgecompress.compress.finetune import finetune
    from edgecompress.compress.methods import spec_hash

    key = spec_hash("transfer", entry.architecture, entry.sha256, recipe, data.fingerprint())
    marker = out / "transfer.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec_hash") == key:
        return _transferred(entry, data, out / "model.pth", json.loads(marker.read_text()))
    with torch.random.fork_rng():  # the new head's initial weights follow the recipe's seed, not the process's past
        torch.manual_seed(recipe.seed)
        model = load_backbone(entry, data.num_classes)
    x, y = data.split("train")
    started = time.time()
    model = finetune(model, x, y, steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size,
                     seed=recipe.seed, on_step=on_step, augmentation=recipe.augmentation(),
                     weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_steps,
                     label_smoothing=recipe.label_smoothing)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        torch.save(model.state_dict(), tmp / "model.pth")
        info = {"spec_hash": key, "backbone": entry.name, "backbone_task": entry.task,
                "recipe": dataclasses.asdict(recipe), "seconds": round(time.time() - started, 1)}
        write_json(tmp / "transfer.json", info)
    return _transferred(entry, data, out / "model.pth", info)


def _transferred(entry: ModelEntry, data, weights: Path, info: dict) -> ModelEntry:
    return ModelEntry(name=entry.name.replace("@", "-from-"), architecture=entry.architecture, weights=weights,
                      source="transfer", num_classes=data.num_classes, params=entry.params, flops=entry.flops,
                      sha256=sha256_file(weights), task=data.task or "")
