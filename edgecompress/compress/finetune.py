"""Training helpers shared by the zoo script and the compress stage's fine-tuning."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Normalised value of a black pixel is -1 for the digits; padding with the
# batch minimum keeps the background for any normalisation.
_PAD = 3


def augment(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random translation by up to 3 pixels (pad with the background, crop back)."""
    n, _, h, w = images.shape
    background = float(images.min())
    padded = F.pad(images, (_PAD, _PAD, _PAD, _PAD), value=background)
    dx, dy = rng.integers(0, 2 * _PAD + 1, size=2)
    return padded[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def predict_torch(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(model(torch.from_numpy(images[i:i + batch_size])).numpy())
    return np.concatenate(outs)


def evaluate_torch(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    logits = predict_torch(model, images)
    return float((logits.argmax(1) == labels).mean())


def finetune(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    teacher: torch.nn.Module | None = None,
    regularizer=None,
    seed: int = 0,
    on_step=None,
) -> torch.nn.Module:
    """Fine-tune for a fixed number of optimiser steps; with a teacher, add logit distillation.

    ``regularizer`` (a ``methods.Regularizer``, e.g. NNCF's RBLoss and its mask logits): its loss is added to
    every step's, and its parameters form their own optimiser group at its learning rate, without weight decay.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    own = {id(p) for p in regularizer.params} if regularizer is not None else set()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own]}]
    if own:
        groups.append({"params": list(regularizer.params), "lr": regularizer.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
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
        idx = torch.from_numpy(order[pos:pos + batch_size])
        pos += batch_size
        xb = augment(x[idx], rng)
        logits = model(xb)
        loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
        if teacher is not None:
            with torch.no_grad():
                soft = F.softmax(teacher(xb) / 2.0, dim=1)
            loss = 0.5 * loss + 0.5 * 4.0 * F.kl_div(F.log_softmax(logits / 2.0, dim=1), soft, reduction="batchmean")
        if active:
            loss = loss + regularizer.loss().to(loss.dtype)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step)
    return model.eval()
