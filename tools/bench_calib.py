"""Calibration-data benchmark: int8 accuracy after calibration with real, few real, synthetic, noise and augmented sets.

    python tools/bench_calib.py --json > docs/bench_calib.json         # resumable: rows go to --cache
    python tools/bench_calib.py --models lcnet_050 --json              # a slice
    python tools/bench_calib.py --second-use                           # synthetic images in verification

For every zoo model, the dense fp32 OpenVINO IR is quantized by the same
runtime code as `build` (plain `nncf.quantize`, no accuracy control, so the
calibration set alone makes the difference) with each calibration set, and its
top-1 measured on the real test split:

  real                the real calibration split (306 images of the digits)
  few_real            10 real images per class (100)
  synthetic           512 images synthesized from those 100 (calib.synth, default spec, intensities
                      matched to the real images of their class, as `build` and `calib synth` do)
  synthetic_unmatched the same 512 before intensity matching
  noise               512 images of Gaussian noise in the normalised space
  few_real_augmented  512 images from the 100 by random shifts and horizontal flips

The synthesizer is trained once (its inputs do not depend on the model) and
cached; `synth_seconds` is the wall time of training plus sampling 512 images
(sampling only when the synthesizer was already in the cache: run with an empty
EDGECOMPRESS_CACHE to time training too).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgecompress.calib.synth import SynthSpec, few_shot, match_intensities, synthesize  # noqa: E402

from edgecompress.core.fsutil import append_jsonl, read_jsonl  # noqa: E402
from edgecompress.data.datasets import load_digits  # noqa: E402
from edgecompress.models import get_model, list_models, load_model  # noqa: E402
from edgecompress.pipeline import run_session  # noqa: E402
from edgecompress.runtimes.base import export_onnx  # noqa: E402
from edgecompress.targets import get_target  # noqa: E402

COUNT = 512
PER_CLASS = 10


def augmented(images: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.integers(0, len(images), size=count):
        x = images[i]
        dx, dy = rng.integers(-3, 4, size=2)
        x = np.roll(np.roll(x, dx, axis=2), dy, axis=1)
        out.append(x[:, :, ::-1] if rng.random() < 0.5 else x)
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def calibration_sets(data, spec: SynthSpec) -> tuple[dict, float, np.ndarray]:
    few_x, few_y = few_shot(data, PER_CLASS)
    started = time.time()
    raw, labels, _ = synthesize(data, few_x, few_y, count=COUNT, spec=spec, match=False)
    synthetic = match_intensities(raw, labels, few_x, few_y)
    synth_seconds = time.time() - started
    rng = np.random.default_rng(0)
    return {
        "real": data.split("calib")[0],
        "few_real": few_x,
        "synthetic": synthetic,
        "synthetic_unmatched": raw,
        "noise": rng.standard_normal((COUNT, *few_x.shape[1:])).astype(np.float32),
        "few_real_augmented": augmented(few_x, COUNT),
    }, synth_seconds, labels


def run_model(name: str, data, sets: dict) -> dict:
    runtime = get_target("openvino-cpu").runtime()
    x_test, y_test = data.split("test")
    row = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx = export_onnx(load_model(get_model(name), data.num_classes), data.input_shape, tmp / "m.onnx")
        (tmp / "fp32").mkdir()
        artifact = runtime.export(onnx, "fp32", tmp / "fp32")
        row["fp32"] = float((run_session(runtime.session(artifact), x_test).argmax(1) == y_test).mean())
        for key, images in sets.items():
            (tmp / key).mkdir()
            quantized = runtime.quantize(artifact, images, tmp / key)
            row[key] = float((run_session(runtime.session(quantized), x_test).argmax(1) == y_test).mean())
    return row


SECOND_USE_METHODS = (("none", 0.0), ("nncf.magnitude_global", 0.5), ("nncf.magnitude_global", 0.8),
                      ("torch_pruning.l1", 0.3), ("torch_pruning.l1", 0.5))


def second_use(data, synthetic: np.ndarray, synthetic_labels: np.ndarray) -> dict:
    """Does adding synthesized images to a small verification set rank candidates more like the full test split?

    Candidates: every zoo model under each of SECOND_USE_METHODS, one-shot (no fine-tuning, so accuracies
    spread). Rankings by top-1 on: the 360-image test split (the truth), 10 real validation images per
    class, and those 100 plus the 512 synthesized ones; Spearman correlation of each with the truth.
    """
    import copy

    import torch
    from scipy.stats import spearmanr

    from edgecompress.compress.finetune import predict_torch
    from edgecompress.compress.methods import PruneData, get_method

    x_test, y_test = data.split("test")
    x_val, y_val = data.split("val")
    keep = np.concatenate([np.flatnonzero(y_val == c)[:PER_CLASS] for c in range(data.num_classes)])
    x_small, y_small = x_val[keep], y_val[keep]
    x_aug, y_aug = np.concatenate([x_small, synthetic]), np.concatenate([y_small, synthetic_labels])
    x_train, y_train = data.split("train")
    example = torch.zeros(data.input_shape)
    samples = PruneData(torch.from_numpy(x_train[:128]), torch.from_numpy(y_train[:128]))
    truth, small, augmented_acc, names = [], [], [], []
    for name in list_models():
        parent = load_model(get_model(name), data.num_classes)
        for method_name, ratio in SECOND_USE_METHODS:
            method = get_method(method_name)
            model = method.finalize(method.prepare(copy.deepcopy(parent), ratio, example, samples), example).eval()
            for acc, (x, y) in zip((truth, small, augmented_acc), ((x_test, y_test), (x_small, y_small), (x_aug, y_aug))):
                acc.append(float((predict_torch(model, x).argmax(1) == y).mean()))
            names.append(f"{name}/{method_name}-{ratio}")
    return {
        "candidates": len(names),
        "spearman_small_real": float(spearmanr(small, truth).statistic),
        "spearman_small_real_plus_synthetic": float(spearmanr(augmented_acc, truth).statistic),
        "top1_agreement_small_real": names[int(np.argmax(small))] == names[int(np.argmax(truth))],
        "top1_agreement_plus_synthetic": names[int(np.argmax(augmented_acc))] == names[int(np.argmax(truth))],
        "verification_images": {"small_real": int(len(y_small)), "plus_synthetic": int(len(y_aug)), "test": int(len(y_test))},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--cache", type=Path, default=Path("bench_calib.jsonl"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--second-use", action="store_true",
                        help="instead: does synthetic data added to a small verification set rank candidates better?")
    args = parser.parse_args(argv)
    data = load_digits(32)
    sets, synth_seconds, synthetic_labels = calibration_sets(data, SynthSpec())
    if args.second_use:
        print(json.dumps(second_use(data, sets["synthetic"], synthetic_labels), indent=2))
        return
    done = read_jsonl(args.cache, key=lambda r: r["model"])
    rows = []
    for name in args.models or list_models():
        if name not in done:
            done[name] = {**run_model(name, data, sets), "synth_seconds": round(synth_seconds, 1)}
            append_jsonl(args.cache, done[name])
            print(json.dumps(done[name]), file=sys.stderr, flush=True)
        rows.append(done[name])
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
