"""Calibration data synthesized by a class-conditional diffusion model (diffusers), on tiny budgets."""

import json

import numpy as np
import pytest

from edgecompress.cli import main

TINY = ["--steps", "4", "--sample-steps", "2"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECOMPRESS_CACHE", str(tmp_path / "cache"))


def test_synth_end_to_end_then_cached(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["calib", "synth", "--per-class", "3", "--count", "20", "--out", str(out), "--model", "lcnet_050", *TINY]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["real_images"] == 30
    assert set(manifest["count_per_class"].values()) == {2}
    assert manifest["spec"]["train_steps"] == 4 and manifest["spec"]["sample_steps"] == 2 and manifest["seed"] == 0
    assert 0 <= manifest["quality"]["model_top1_on_synthetic"] <= 1 and manifest["quality"]["feature_frechet_distance"] >= 0
    assert manifest["synthesizer"] == "trained on the real images" and manifest["train_seconds"] > 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [str(i) for i in range(10)]  # ImageFolder layout
    assert all(len(list((out / str(c)).glob("*.png"))) == 2 for c in range(10))
    capsys.readouterr()
    # Same inputs: the trained synthesizer comes from the cache, no retraining.
    assert main(["calib", "synth", "--per-class", "3", "--count", "20", "--out", str(tmp_path / "again"), *TINY]) == 0
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["synthesizer"].endswith("(cached)") and again["train_seconds"] == 0
    assert again["cache_key"] == manifest["cache_key"]


def test_local_pipeline_is_used_and_bad_ones_refused(tmp_path, capsys):
    from edgecompress.calib.synth import SynthSpec, _unet

    pipe = tmp_path / "pipe"
    _unet(32, 10, SynthSpec()).save_pretrained(str(pipe / "unet"))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    assert main(["calib", "synth", "--count", "10", "--out", str(tmp_path / "o"), "--pipeline", str(pipe), "--sample-steps", "2"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["synthesizer"] == str(pipe)
    capsys.readouterr()
    for bad in (tmp_path / "nothing", tmp_path):
        rc = main(["calib", "synth", "--count", "10", "--out", str(tmp_path / "x"), "--pipeline", str(bad)])
        assert rc == 2
        assert "is not a diffusers pipeline directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_too_few_samples_and_existing_out(tmp_path, capsys):
    assert main(["calib", "synth", "--per-class", "1", "--count", "10", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "at least 2 real images per class" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["calib", "synth", "--count", "10", "--out", str(tmp_path / "exists"), *TINY]) == 2
    assert "exists" in capsys.readouterr().err


def test_normalisation_round_trip(digits):
    from edgecompress.calib.synth import from_unit, to_unit

    x = digits.split("calib")[0][:8]
    pre = digits.preprocess
    np.testing.assert_allclose(from_unit(to_unit(x, pre.mean, pre.std), pre.mean, pre.std), x, atol=1e-5)


@pytest.mark.slow
def test_build_with_few_real_images_synthesizes_calibration(tmp_path, capsys, weights_file):
    """--calib auto with 12 images per class: fewer than 300 real calibration images, so int8 calibrates on synthetic ones."""
    from conftest import write_images

    write_images(tmp_path / "data", [str(i) for i in range(10)], per_class=12)
    out = tmp_path / "run"
    code = main(["build", "--target", "ort-cpu", "--latency", "50ms", "--data", str(tmp_path / "data"), "--model",
                 f"timm:lcnet_050={weights_file}", "--finetune-steps", "0", "--method", "none", "--precision", "int8",
                 "--synth-steps", "5", "--max-accuracy-drop", "100%", "--out", str(out), "--max-tries", "1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["choice"]["precision"] == "int8"
    calibration = report["calibration"]
    assert calibration["source"] == "synthetic" and calibration["samples"] == 512 and calibration["from_real_images"] < 120
    manifest = json.loads((out / "calibration" / "manifest.json").read_text())
    assert manifest["count"] == 512 and "quality" in manifest
    assert "512 images synthesized by a class-conditional diffusion model" in (out / "report.html").read_text()


def test_intensities_are_matched_to_the_real_class_and_structure_kept():
    from edgecompress.calib.synth import match_intensities

    rng = np.random.default_rng(0)
    real = np.repeat(rng.uniform(-1, -0.5, (6, 1, 8, 8)), 3, axis=1).astype(np.float32)  # grey, dark
    real[3:] += 1.2  # class 1 is bright
    real_labels = np.array([0, 0, 0, 1, 1, 1])
    synthetic = rng.normal(0.2, 0.3, (4, 3, 8, 8)).astype(np.float32)  # tinted, mid-grey
    labels = np.array([0, 1, 0, 1])
    out = match_intensities(synthetic, labels, real, real_labels)
    assert np.allclose(out, out[:, :1])  # no colour invented on grey data
    for i, c in enumerate(labels):
        ref = real[real_labels == c][:, 0]
        assert abs(out[i].mean() - ref.mean()) < 0.05 and out[i].min() >= ref.min() - 1e-6 and out[i].max() <= ref.max() + 1e-6
        grey = synthetic[i].mean(0).ravel()
        assert (np.argsort(out[i, 0].ravel(), kind="stable") == np.argsort(grey, kind="stable")).all()  # same ordering
    colour = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    assert not np.allclose(match_intensities(synthetic[:2], labels[:2] * 0, colour, np.zeros(2, int))[:, 0],
                           match_intensities(synthetic[:2], labels[:2] * 0, colour, np.zeros(2, int))[:, 1])
