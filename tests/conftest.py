import os

import numpy as np
import pytest
import torch

from edgecompress.data.datasets import load_digits

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits():
    return load_digits(32)


@pytest.fixture(scope="session")
def small_digits(digits):
    """The digits with short splits, for stage tests that only need the mechanics."""
    import dataclasses

    splits = {name: (x[:64], y[:64]) for name, (x, y) in digits.splits.items()}
    return dataclasses.replace(digits, name="digits-small", splits=splits)


@pytest.fixture
def weights_file(tmp_path):
    """A user's own weights: a timm lcnet_050 with 10 classes, random init, saved as a state dict."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("lcnet_050", num_classes=10)
    path = tmp_path / "my_lcnet.pth"
    torch.save(model.state_dict(), path)
    return path


def write_images(root, classes, per_class, size=12, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


@pytest.fixture(autouse=True)
def _no_device_calibration_between_tests():
    """A calibration activated by one test's plan or build (process-wide, as it is for one CLI run) must not rescale
    the next test's predictions."""
    from edgecompress.costmodel import devicecal

    yield
    devicecal._ACTIVE.clear()
