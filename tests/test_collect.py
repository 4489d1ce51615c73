"""Meta-dataset collection: features on every zoo model; resume after an interruption (slow)."""

import copy
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from edgecompress.compress.methods import FinetuneSpec, spec_hash
from edgecompress.meta.collect import current_rows, read_rows
from edgecompress.meta.features import FEATURE_DOCS, Featurizer
from edgecompress.models import get_model, list_models, load_model


@pytest.mark.parametrize("name", list_models())
def test_features_on_every_zoo_model(name, digits):
    model = load_model(get_model(name), 10)
    featurizer = Featurizer(model, digits, get_model(name).test_accuracy)
    dense = featurizer.candidate_features("none", 0.0, "fp32")
    assert set(dense) == set(FEATURE_DOCS)  # every feature, each documented
    assert dense["f_params"] == get_model(name).params
    assert dense["f_oneshot_agreement"] == 1.0 and dense["f_oneshot_logit_rel_err"] == 0.0  # nothing changed
    assert dense["f_kept_weights"] == 1.0 and dense["f_oneshot_output_spread"] == pytest.approx(1.0)
    for method, ratio, precision in [("nncf.magnitude_global", 0.7, "fp32"), ("nncf.magnitude_local", 0.5, "int8"),
                                     ("torch_pruning.l1", 0.5, "fp16")]:
        feats = featurizer.candidate_features(method, ratio, precision)
        assert all(math.isfinite(v) for v in feats.values()), feats
        assert 0 < feats["f_mass_below_global"] < ratio  # the pruned weights are the small ones
        assert ratio <= feats["f_max_layer_pruned_global"] <= 1
        assert 0 <= feats["f_oneshot_agreement"] <= 1 and feats["f_oneshot_logit_rel_err"] > 0
        assert 0 < feats["f_kept_weights"] < 1 and feats["f_oneshot_output_spread"] >= 0
        assert 0 < feats["f_oneshot_classes"] <= 1
    # Global magnitude zeroes the asked share of the weights (the classifier's bias and norms are not weights).
    assert featurizer.candidate_features("nncf.magnitude_global", 0.7, "fp32")["f_kept_weights"] == pytest.approx(0.3, abs=0.02)


def test_one_pass_proxies_equal_a_simulated_copy_each(digits):
    """The precisions of a (method, ratio) share one pruned copy and its fp32 pass (which records the int8 ranges);
    fp16 and int8 are simulated on it and undone. The proxies are those of a fresh simulated copy each, to the bit."""
    import torch

    from edgecompress.meta.features import oneshot_proxies, simulate_precision

    featurizer = Featurizer(load_model(get_model("lcnet_050"), 10), digits, get_model("lcnet_050").test_accuracy)
    for method, ratio in [("torch_pruning.l1", 0.5), ("nncf.magnitude_global", 0.7)]:
        pruned = featurizer._one_shot_pruned(method, ratio)
        for precision in ("fp32", "fp16", "int8"):
            with torch.no_grad():
                logits = simulate_precision(copy.deepcopy(pruned), precision, featurizer.images)(featurizer.images)
            expected = oneshot_proxies(logits, featurizer.parent_logits)
            shared = featurizer.oneshot_features(method, ratio, precision)
            assert {k: shared[k] for k in expected} == expected, (method, ratio, precision)


def test_simulated_int8_changes_outputs_a_little(digits):
    import torch

    from edgecompress.meta.features import simulate_precision

    model = load_model(get_model("resnet10t"), 10)
    x = torch.from_numpy(digits.split("calib")[0][:64])
    with torch.no_grad():
        ref = model(x)
        fake = simulate_precision(copy.deepcopy(model), "int8", x)(x)
        half = simulate_precision(copy.deepcopy(model), "fp16", x)(x)
    err8 = float(torch.linalg.norm(fake - ref) / torch.linalg.norm(ref))
    err16 = float(torch.linalg.norm(half - ref) / torch.linalg.norm(ref))
    assert 0 < err16 < err8 < 0.2
    assert (fake.argmax(1) == ref.argmax(1)).float().mean() > 0.9


def test_refresh_features_keeps_measurements(tmp_path):

    from edgecompress.meta.collect import refresh_features
    from edgecompress.meta.features import FEATURES_VERSION
    from edgecompress.models import ZOO_DIR

    rows = [r for r in read_rows(ZOO_DIR / "meta.parquet") if r["model"] == "lcnet_050"][:4]
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "meta.parquet"
    # Rows of an older feature version, one feature missing (a feature added since) and one wrong.
    stale = [{k: v for k, v in r.items() if k != "f_kept_weights"} | {"f_ratio": -1.0, "features_version": 0}
             for r in rows]
    pq.write_table(pa.Table.from_pylist(stale), path)
    assert refresh_features(path) == len(rows)
    fresh = read_rows(path)
    for old, new in zip(rows, fresh):
        assert new["accuracy"] == old["accuracy"] and new["wall_seconds"] == old["wall_seconds"]
        assert new["f_ratio"] == old["ratio"] and 0 < new["f_kept_weights"] <= 1
        assert new["features_version"] == FEATURES_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert refresh_features(path) == 0  # nothing stale is left: a rerun (or a resumed refresh) has nothing to do
    # A current row with a feature that is no number (fp16 logits that overflowed, before the fix) is stale too.
    pq.write_table(pa.Table.from_pylist([fresh[0] | {"f_oneshot_output_spread": float("nan")}, *fresh[1:]]), path)
    assert refresh_features(path) == 1
    assert read_rows(path)[0]["f_oneshot_output_spread"] == fresh[0]["f_oneshot_output_spread"]


def test_refresh_of_a_model_features_change_keeps_the_one_shot_proxies(tmp_path):
    """Rows of a version that differs from today's in some feature groups (the per-model features, the probe) get
    those recomputed; the rest, the one-shot proxies the costly part, is kept as it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edgecompress.meta.collect import refresh_features
    from edgecompress.meta.features import FEATURES_VERSION, VERSION_CHANGES
    from edgecompress.models import ZOO_DIR

    rows = [r for r in read_rows(ZOO_DIR / "meta.parquet") if r["model"] == "lcnet_050"][:3]
    path = tmp_path / "meta.parquet"
    before_model_change = min(v for v, groups in VERSION_CHANGES.items() if "model" in groups) - 1
    older = [r | {"f_flops": 1, "f_oneshot_agreement": -1.0, "features_version": before_model_change} for r in rows]
    pq.write_table(pa.Table.from_pylist(older), path)
    assert refresh_features(path) == len(rows)
    for old, new in zip(rows, read_rows(path)):
        assert new["f_flops"] > 1 and new["f_oneshot_agreement"] == -1.0  # model features recomputed, proxies kept
        assert new["features_version"] == FEATURES_VERSION and new["accuracy"] == old["accuracy"]
        assert 0 <= new["f_probe_agreement"] <= 1  # and the probe, added since


def test_probe_tells_a_collapse_from_a_recovery(digits):
    """The fine-tuning probe runs at high ratios only, is the same on every run, and separates what one-shot
    proxies cannot tell apart: lcnet_050 on the digits, 90% of its weights pruned, never recovers (88 pp lost after
    fine-tuning), and 70% pruned it loses nothing."""
    from edgecompress.meta.features import Featurizer

    model = load_model(get_model("lcnet_050"), 10)
    first, second = Featurizer(model, digits, 0.97), Featurizer(model, digits, 0.97)
    assert first.probe_features("nncf.magnitude_global", 0.5) == {"f_probe_agreement": 1.0}  # not probed
    collapse = first.probe_features("nncf.magnitude_global", 0.9)["f_probe_agreement"]
    assert collapse == second.probe_features("nncf.magnitude_global", 0.9)["f_probe_agreement"]
    recovery = first.probe_features("nncf.magnitude_global", 0.7)["f_probe_agreement"]
    assert collapse < 0.5 < recovery


def test_probe_of_a_model_with_dropout_does_not_depend_on_what_ran_before(digits):
    """GhostNet's head has dropout, which draws from torch's global generator in training mode: the probe seeds it
    (the refresh of session 18 found probes of ghostnet_050 that differed from the collection's)."""
    model = load_model(get_model("ghostnet_050"), 10)
    values = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        values.append(Featurizer(model, digits, 0.97).probe_features("nncf.magnitude_global", 0.9))
    assert values[0] == values[1]


def test_oneshot_proxies_of_overflowed_logits_are_numbers():
    """Simulated fp16 of a hard-pruned model can overflow to inf and NaN; its features stay numbers (ridge takes no
    NaN, and `meta train` failed on three such rows)."""
    from edgecompress.meta.features import FP16_MAX, oneshot_proxies

    parent = torch.randn(8, 10)
    logits = parent.clone()
    logits[0, 0], logits[1, 1], logits[2] = float("inf"), float("-inf"), float("nan")
    feats = oneshot_proxies(logits, parent)
    assert all(math.isfinite(v) for v in feats.values())
    assert feats["f_oneshot_agreement"] < 1
    same = oneshot_proxies(torch.full((8, 10), float("nan")), parent)
    assert same["f_oneshot_output_spread"] == 0 and same["f_oneshot_classes"] == 0.1  # every image the same answer
    assert oneshot_proxies(parent * FP16_MAX, parent)["f_oneshot_agreement"] == 1  # finite logits are as they were
    # Finite logits near float32's largest (a fine-tune that diverged): the norm is taken where it does not overflow.
    huge = torch.full((8, 10), 3e38)
    huge[:, 0] = -3e38
    assert all(math.isfinite(v) for v in oneshot_proxies(huge, parent).values())


def test_a_precision_the_runtime_refuses_costs_its_row_only(digits, monkeypatch):
    """OpenVINO could not compile one int8 model (semnasnet_050, local magnitude 0.9, on the digits: "could not append
    an elementwise post-op"); its fp32 and fp16 rows were lost with it while a job was all or nothing."""
    from edgecompress import pipeline
    from edgecompress.meta.collect import CollectJob, run_job

    at_precision = pipeline.at_precision

    def refusing(compressed, precision, *args, **kwargs):
        if precision == "int8":
            raise RuntimeError("Exception from src/inference/src/dev/plugin.cpp:54:\ncould not append an elementwise post-op")
        return at_precision(compressed, precision, *args, **kwargs)

    monkeypatch.setattr(pipeline, "at_precision", refusing)
    job = CollectJob(model_spec="lcnet_050", method="torch_pruning.l1", ratio=0.3, precisions=("fp32", "int8"),
                     finetune=FinetuneSpec(steps=2), data_dir=None, image_size=32)
    rows, errors = run_job(job, digits)
    assert [r["precision"] for r in rows] == ["fp32"] and 0 < rows[0]["accuracy"] <= 1
    assert errors == {"int8": "could not append an elementwise post-op"}

    def mistaken(*args, **kwargs):  # our own mistake is no runtime's refusal: it stops the job
        raise KeyError("precision")

    monkeypatch.setattr(pipeline, "at_precision", mistaken)
    with pytest.raises(KeyError):
        run_job(job, digits)


ARGS = ["meta", "collect", "--models", "lcnet_050", "--methods", "none", "--methods", "torch_pruning.l1",
        "--ratios", "0.3,0.5,0.7", "--precisions", "fp32", "--finetune-steps", "2"]


@pytest.mark.slow
def test_collect_resumes_after_ctrl_c(tmp_path):
    out = tmp_path / "meta.parquet"
    cmd = [sys.executable, "-m", "edgecompress.cli", *ARGS, "--out", str(out)]
    # Ctrl-C as a terminal sends it: SIGINT at its default in the child, whatever this process inherited (a shell
    # starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt: the collection ran
    # to its end and this test failed when the suite ran in the background).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not out.exists():
        time.sleep(0.05)
    assert proc.poll() is None, "collection finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=120)
    first = read_rows(out)  # a complete, readable file, never a half-written one
    assert 1 <= len(first) < 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 4
    assert sorted((r["method"], r["ratio"]) for r in rows) == [("none", 0.0), ("torch_pruning.l1", 0.3),
                                                               ("torch_pruning.l1", 0.5), ("torch_pruning.l1", 0.7)]
    # The rows from before the interruption were kept, not recomputed.
    kept = {(r["method"], r["ratio"]): r["wall_seconds"] for r in rows}
    assert all(kept[(r["method"], r["ratio"])] == r["wall_seconds"] for r in first)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert '"new_rows": 0' in again.stdout
    # Another fine-tuning seed is another recipe: new rows beside the old, and not the predictor's to train on.
    seed = subprocess.run([*cmd, "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert seed.returncode == 0, seed.stderr[-2000:]
    rows = read_rows(out)
    assert sorted(r["recipe"] for r in rows) == sorted([spec_hash(FinetuneSpec(steps=2))] * 4
                                                       + [spec_hash(FinetuneSpec(steps=2, seed=1))] * 4)
    # The predictor trains on the default recipe's rows only: seed 0.
    from edgecompress.models import ZOO_DIR

    shipped = current_rows(read_rows(ZOO_DIR / "meta.parquet"))[0]
    assert current_rows([shipped | {"recipe": spec_hash(FinetuneSpec(seed=1))}]) == []


def test_collect_bad_input(capsys, tmp_path):
    from edgecompress.cli import main

    assert main(["meta", "collect", "--out", str(tmp_path / "m.csv")]) == 2
    assert "parquet" in capsys.readouterr().err
    assert main(["meta", "collect", "--out", str(tmp_path / "m.parquet"), "--precisions", "int4"]) == 2
    assert "unknown int4" in capsys.readouterr().err
    assert main(["meta", "collect", "--out", str(tmp_path / "m.parquet"), "--methods", "optimal_brain_damage"]) == 2


def test_collect_defaults_to_the_zoo_of_the_task(tmp_path, capsys):
    from edgecompress.cli import main
    from edgecompress.meta.collect import zoo_models_for

    assert zoo_models_for(None) == list_models()
    assert zoo_models_for("fashion-mnist") == list_models(task="fashion-mnist")
    (tmp_path / "mine").mkdir()
    assert main(["meta", "collect", "--out", str(tmp_path / "m.parquet"), "--data", str(tmp_path / "mine")]) == 2
    assert "--models timm:ARCH=weights.pth" in capsys.readouterr().err


def test_task_meta_features_tell_tasks_apart(digits, tmp_path):
    """Grey digits against a colour folder; the parent's confidence and margin on the task's own images."""
    from conftest import write_images

    from edgecompress.data.datasets import load_image_folder

    write_images(tmp_path / "folder", ["a", "b", "c"], per_class=12, size=16)
    colour = load_image_folder(tmp_path / "folder", 32)
    assert digits.features()["grayscale"] == 1 and colour.features()["grayscale"] == 0
    trained = Featurizer(load_model(get_model("resnet10t"), 10), digits, 0.99).candidate_features("none", 0.0, "fp32")
    assert trained["f_images_per_class"] == pytest.approx(len(digits.split("train")[1]) / 10)
    assert 0.1 < trained["f_parent_confidence"] <= 1 and trained["f_parent_margin"] > 0
    import timm

    untrained = Featurizer(timm.create_model("resnet10t", num_classes=10).eval(), digits, 0.1)
    assert untrained.candidate_features("none", 0.0, "fp32")["f_parent_confidence"] < trained["f_parent_confidence"]
