"""Training helpers shared by the zoo script, the compress stage's fine-tuning and transfer.

The optimiser, schedule, mixing and erasing come from timm's factories (``create_optimizer_v2``,
``CosineLRScheduler``, ``Mixup``, ``RandomErasing``); what is ours is the batch translation for small
images and the choice of a recipe (:class:`Augmentation`, the callers' step counts).
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
import torch.nn.functional as F

from edgecompress.data.datasets import INFERENCE_BATCH_PIXELS, inference_batch

# Pixels (per channel) of one forward and backward pass in a fine-tune: a step's batch larger than this is run in
# slices whose gradients add up (the same step, but for BatchNorm's statistics, taken per slice). Training keeps
# every activation for the backward pass: at 224x224, one pass over 64 images of mobilevit_xxs took a build to
# 6.3 GB. Batches of 64 up to 112x112 run whole, as they always did.
TRAIN_BATCH_PIXELS = INFERENCE_BATCH_PIXELS // 4

# Normalised value of a black pixel is -1 for the digits; padding with the
# batch minimum keeps the background for any normalisation.
_PAD = 3


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Batch augmentation of a fine-tune; the default is the translation every zoo and compression recipe uses.

    ``hflip`` suits natural images, not digits or text. ``erase_prob`` is timm's RandomErasing (per image,
    random pixels), ``mixup_alpha``/``cutmix_alpha`` timm's Mixup/CutMix on the batch (0 turns each off).
    """

    shift: int = _PAD
    hflip: bool = False
    erase_prob: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0


def augment(images: torch.Tensor, rng: np.random.Generator, shift: int = _PAD) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (pad with the background, crop back)."""
    if shift <= 0:
        return images
    _, _, h, w = images.shape
    background = float(images.min())
    padded = F.pad(images, (shift, shift, shift, shift), value=background)
    dx, dy = rng.integers(0, 2 * shift + 1, size=2)
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def predict_torch(model: torch.nn.Module, images, batch_size: int | None = None) -> np.ndarray:
    """Logits of ``images`` in batches of ``batch_size`` (by default as many as datasets.inference_batch allows)."""
    model.eval()
    batch_size = batch_size or inference_batch(images)
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(model(torch.from_numpy(np.asarray(images[i:i + batch_size]))).numpy())
    return np.concatenate(outs)


def evaluate_torch(model: torch.nn.Module, images, labels: np.ndarray) -> float:
    logits = predict_torch(model, images)
    return float((logits.argmax(1) == labels).mean())


def finetune(
    model: torch.nn.Module,
    images,
    labels: np.ndarray,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    teacher: torch.nn.Module | None = None,
    regularizer=None,
    seed: int = 0,
    on_step=None,
    augmentation: Augmentation = Augmentation(),
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    label_smoothing: float = 0.1,
) -> torch.nn.Module:
    """Fine-tune for a fixed number of optimiser steps (AdamW, cosine schedule); with a teacher, add logit distillation.

    ``images`` is any array-like that returns float32 NCHW batches when indexed with an index array; batches
    are read as they are needed. ``regularizer`` (a ``methods.Regularizer``, e.g. NNCF's RBLoss and its mask
    logits): its loss is added to every step's, and its parameters form their own optimiser group at its
    learning rate, without weight decay.
    """
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    # timm's RandomErasing draws from Python's random, its Mixup from numpy's global generator: seeded too, so that a
    # fine-tune (a transfer, whose recipe erases) is the same on every run.
    random.seed(seed)
    np.random.seed(seed)
    y = torch.from_numpy(np.asarray(labels))
    own = {id(p) for p in regularizer.params} if regularizer is not None else set()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    if own:
        groups.append({"params": list(regularizer.params), "lr": regularizer.lr, "weight_decay": 0.0})
    opt = create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=weight_decay)
    sched = CosineLRScheduler(opt, t_initial=max(steps, 1), warmup_t=warmup_steps, warmup_lr_init=lr * 0.01,
                              warmup_prefix=True, t_in_epochs=False)
    aug = augmentation
    erase = RandomErasing(probability=aug.erase_prob, mode="pixel", device="cpu") if aug.erase_prob > 0 else None
    mix = None
    if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
        with torch.no_grad():
            num_classes = model.eval()(torch.from_numpy(np.asarray(images[np.arange(1)]))).shape[1]
        mix = Mixup(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha, prob=aug.mix_prob,
                    label_smoothing=label_smoothing, num_classes=num_classes)
    if teacher is not None:
        teacher.eval()
    model.train()
    order = rng.permutation(len(y))
    pos = 0
    active = regularizer is not None
    for step in range(steps):
        if active and regularizer.freeze is not None and step >= regularizer.freeze_at * steps:
            regularizer.freeze()
            active = False
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(y)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        xb = augment(torch.from_numpy(np.asarray(images[idx])), rng, aug.shift)
        yb = y[idx]
        if aug.hflip:
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
        if erase is not None:
            xb = erase(xb)
        targets = yb
        if mix is not None and len(idx) % 2 == 0:  # timm's Mixup pairs the batch with its reverse
            xb, targets = mix(xb, yb)  # soft targets
        opt.zero_grad(set_to_none=True)
        step_slice = inference_batch(xb, most=len(xb), pixels=TRAIN_BATCH_PIXELS)
        for start in range(0, len(xb), step_slice):
            x, t = xb[start:start + step_slice], targets[start:start + step_slice]
            logits = model(x)
            if t.ndim == 2:
                loss = torch.sum(-t * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, t, label_smoothing=label_smoothing)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / 2.0, dim=1)
                loss = 0.5 * loss + 0.5 * 4.0 * F.kl_div(F.log_softmax(logits / 2.0, dim=1), soft, reduction="batchmean")
            loss = loss * (len(x) / len(xb))  # the batch's mean, slice by slice (x 1.0 where the batch is one slice)
            if active and start == 0:
                loss = loss + regularizer.loss().to(loss.dtype)
            loss.backward()
        opt.step()
        sched.step_update(step + 1)
        if on_step is not None:
            on_step(step)
    return model.eval()
