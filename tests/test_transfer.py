"""Transfer of the zoos' backbones to a user's data (edgecompress.compress.transfer) and its place in build."""

import json

import numpy as np
import pytest
import torch

from edgecompress.cli import main
from edgecompress.compress import transfer as tr
from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec
from edgecompress.data.datasets import NAMED_MEAN, NAMED_STD, load_dataset
from edgecompress.meta.predictor import DropPrior
from edgecompress.models import get_model, load_model


def write_digit_folder(root, classes=(0, 1, 2, 3), per_class=30):
    """A user's ImageFolder of real images: some of scikit-learn's digits, as 8-bit PNGs of 24x24."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for cls in classes:
        (root / f"digit{cls}").mkdir(parents=True, exist_ok=True)
        for i, ix in enumerate(np.flatnonzero(bunch.target == cls)[:per_class]):
            img = Image.fromarray((bunch.images[ix] * 255 / 16).astype(np.uint8)).resize((24, 24), Image.BILINEAR)
            img.convert("RGB").save(root / f"digit{cls}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """Four digit classes, normalised as the zoos' backbones were trained (build does so for transfer)."""
    return load_dataset(write_digit_folder(tmp_path_factory.mktemp("user") / "data"), 32, mean=NAMED_MEAN, std=NAMED_STD)


def test_recipe_scales_with_data_and_time(folder_data, digits):
    small, big = tr.recipe_for(folder_data), tr.recipe_for(digits)
    assert small.steps == tr.MIN_STEPS  # 72 training images: 10 epochs is fewer than the floor
    assert tr.MIN_STEPS <= big.steps <= tr.MAX_STEPS
    assert tr.recipe_for(folder_data, max_steps=7).steps == 7
    assert not small.hflip  # grey digits: a mirror changes the class


def test_backbone_keeps_features_and_gets_a_new_head(folder_data):
    entry = get_model("lcnet_050")
    original = load_model(entry, 10)
    model = tr.load_backbone(entry, folder_data.num_classes)
    x = torch.from_numpy(folder_data.split("test")[0][:4])
    assert model(x).shape == (4, folder_data.num_classes)
    with torch.no_grad():
        same = model.forward_head(model.forward_features(x), pre_logits=True)
        before = original.forward_head(original.forward_features(x), pre_logits=True)
    assert torch.allclose(same, before)


def test_checkpoint_classes_reads_the_head(tmp_path):
    import timm

    from edgecompress.models import parse_model_spec

    path = tmp_path / "imagenet_like.pth"
    torch.save(timm.create_model("lcnet_050", num_classes=1000).state_dict(), path)
    assert tr.checkpoint_classes(parse_model_spec(f"timm:lcnet_050={path}")) == 1000


def test_probe_ranks_a_trained_backbone_above_random_weights(tmp_path):
    """On the ten digits, a digits backbone's features separate the classes better than random features do
    (measured: 1.00 against 0.93 on 60 validation images; random conv features are strong on digits)."""
    import timm

    data = load_dataset(write_digit_folder(tmp_path / "ten", classes=range(10), per_class=60), 32,
                        mean=NAMED_MEAN, std=NAMED_STD)
    trained = tr.load_backbone(get_model("lcnet_050"), data.num_classes)
    torch.manual_seed(0)
    untrained = timm.create_model("lcnet_050", num_classes=data.num_classes)
    assert tr.probe(trained, data) > tr.probe(untrained, data) + 0.03


def test_transfer_learns_the_task_and_is_cached(folder_data, tmp_path):
    from edgecompress.compress.finetune import evaluate_torch

    recipe = tr.recipe_for(folder_data, max_steps=40)
    out = tmp_path / "t"
    entry = tr.transfer(get_model("lcnet_050"), folder_data, recipe, out)
    assert entry.source == "transfer" and entry.num_classes == folder_data.num_classes
    accuracy = evaluate_torch(load_model(entry, folder_data.num_classes), *folder_data.split("test"))
    assert accuracy > 0.8, accuracy  # four digit classes; chance is 0.25
    stamp = (out / "model.pth").stat().st_mtime_ns
    again = tr.transfer(get_model("lcnet_050"), folder_data, recipe, out)
    assert again.sha256 == entry.sha256 and (out / "model.pth").stat().st_mtime_ns == stamp
    other = tr.transfer(get_model("lcnet_050"), folder_data, tr.recipe_for(folder_data, max_steps=5), out)
    assert other.sha256 != entry.sha256  # another recipe is another transfer


def test_a_checkpoint_for_other_classes_is_transferred(folder_data, weights_file, tmp_path):
    """A user's timm checkpoint trained for 10 classes, on 4-class data: transferred, not refused."""
    import time

    from rich.console import Console

    from edgecompress.build import BuildOptions, resolve_models, transferred_parents
    from edgecompress.targets import get_target

    entries = resolve_models((f"timm:lcnet_050={weights_file}",), folder_data)
    options = BuildOptions(target=get_target("openvino-cpu"), budget=None)
    console = Console(file=open(tmp_path / "console.txt", "w"), width=200)  # noqa: SIM115
    parents, info, run_dir = transferred_parents(options, folder_data, entries, tmp_path / "run", time.time() + 1,
                                                 console)
    console.file.close()
    (parent,) = parents.values()
    assert parent.source == "transfer" and parent.num_classes == 4
    assert load_model(parent, 4)(torch.from_numpy(folder_data.split("test")[0][:2])).shape == (2, 4)
    assert info["backbones"][0]["steps"] < tr.MIN_STEPS  # the deadline cut the recipe
    assert "trained for 10 classes; your data has 4: transferring it" in (tmp_path / "console.txt").read_text()
    assert run_dir == tmp_path / "run" and (run_dir / "transfer").is_dir()  # the transfer is kept in the run


def _cand(model, method, ratio, precision):
    return Candidate(model=model, prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec(precision=precision))


def test_backbones_are_one_checkpoint_per_architecture():
    """Both zoos' architectures, each once: Fashion-MNIST's checkpoint where both zoos have it."""
    from edgecompress.models import get_model, list_models, zoo_tasks

    pool = tr.backbones()
    archs = [e.architecture for e in pool.values()]
    assert len(archs) == len(set(archs))
    assert set(archs) == {get_model(n, t).architecture for t in zoo_tasks() for n in list_models(task=t)}
    assert "lcnet_050@fashion-mnist" in pool and "resnet10t@digits" in pool and "lcnet_050@digits" not in pool
    assert len(tr.backbones(["digits"])) == len(list_models(task="digits"))


def test_drop_prior_reads_the_meta_dataset():
    rows = [{"method": "torch_pruning.l1", "precision": "fp32", "ratio": r, "accuracy_drop": d}
            for r, d in ((0.3, 0.01), (0.3, 0.03), (0.5, 0.02), (0.5, 0.10), (0.7, 0.05))]
    rows += [{"method": "none", "precision": "fp32", "ratio": 0.0, "accuracy_drop": 0.0}]
    prior = DropPrior(rows, {"a": 0.9})
    l1 = "torch_pruning.l1"
    cands = [_cand("a", "none", 0.0, "fp32"), _cand("a", l1, 0.3, "fp32"), _cand("a", l1, 0.5, "fp32"),
             _cand("a", l1, 0.7, "fp32"), _cand("a", "woodfisher", 0.7, "fp32")]
    expected, lower = prior(cands)
    assert expected[0] == pytest.approx(0.9)
    assert expected[1] == pytest.approx(0.9 - 0.02) and expected[2] == pytest.approx(0.9 - 0.06)
    assert expected[3] <= expected[2]  # never better for pruning more (0.7's lone row drops 0.05)
    assert expected[4] == pytest.approx(0.85)  # a method without rows: every method's rows at the nearest level
    assert (lower <= expected).all()


def test_drop_prior_is_the_one_source_of_dense_drops():
    """AccuracyModel.dense_drop (ONNX graphs) reads DropPrior.drop: a dense model's drop comes from dense rows only,
    is never below 0, and without rows falls back to DENSE_DROP_WITHOUT_ROWS."""
    from edgecompress.meta.predictor import DENSE_DROP_WITHOUT_ROWS

    rows = [{"method": "none", "precision": "int8", "ratio": 0.0, "accuracy_drop": d} for d in (-0.01, -0.02, 0.3)]
    rows += [{"method": "torch_pruning.l1", "precision": "fp16", "ratio": 0.5, "accuracy_drop": 0.2}]
    prior = DropPrior(rows, {})
    assert prior.drop("none", 0.0, "fp32") == (0.0, 0.0)
    assert prior.drop("none", 0.0, "int8")[0] == 0.0 and prior.drop("none", 0.0, "int8")[1] > 0.2
    assert prior.drop("none", 0.0, "fp16") == DENSE_DROP_WITHOUT_ROWS["fp16"]  # not the pruned fp16 row's 0.2
    assert DropPrior([], {}).drop("none", 0.0, "int8") == DENSE_DROP_WITHOUT_ROWS["int8"]


def test_transfer_and_zoo_models_read_a_folder_as_the_zoo_was_trained(tmp_path):
    from edgecompress.build import BuildOptions, preprocess_args
    from edgecompress.targets import get_target

    base = dict(target=get_target("openvino-cpu"), budget=None, data_dir=tmp_path)
    assert preprocess_args(BuildOptions(**base)) == {"mean": NAMED_MEAN, "std": NAMED_STD}
    assert preprocess_args(BuildOptions(**base, model_specs=("lcnet_050",)))["mean"] == NAMED_MEAN
    resnet = preprocess_args(BuildOptions(**base, model_specs=("timm:resnet18=w.pth",)))
    assert resnet["mean"] == pytest.approx((0.485, 0.456, 0.406)) and resnet["crop_pct"] == pytest.approx(0.95)  # timm resnet18.a1_in1k
    assert "image_size" not in resnet  # the folder's own size, not pretrained_cfg's 224
    assert preprocess_args(BuildOptions(**base, std=(0.2, 0.2, 0.2)))["std"] == (0.2, 0.2, 0.2)


@pytest.mark.slow
def test_build_transfers_the_zoo_to_a_folder(tmp_path, monkeypatch, capsys):
    """build --data DIR without --model: probe, transfer the best backbone, compress with it as teacher, bundle."""
    pool = {n: e for n, e in tr.backbones(["digits"]).items() if n.split("@")[0] in ("lcnet_050", "mobilenetv2_050", "resnet10t")}
    monkeypatch.setattr(tr, "backbones", lambda tasks=None: pool)
    data = write_digit_folder(tmp_path / "data", per_class=40)
    out = tmp_path / "run"
    args = ["build", "--data", str(data), "--target", "openvino-cpu", "--latency", "50ms", "--transfer-top", "1",
            "--precision", "fp32", "--finetune-steps", "10", "--time-budget", "20min", "--out", str(out), "--max-tries", "1"]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [b["backbone"] for b in report["transfer"]["backbones"]][0] in pool
    assert set(report["transfer"]["probes"]) == set(pool)
    assert report["choice"]["model"].endswith("-from-digits")
    assert report["measured"]["accuracy"] > 0.7
    assert (out / "bundle").is_dir() and "Transfer" in (out / "report.html").read_text()
    assert any(p.name == "transfer.json" for p in (out / "transfer").rglob("*"))


def _hf_cache(root, arch, num_classes=1000):
    """timm's pretrained ``arch`` laid out as huggingface_hub caches it (refs/main -> snapshots/<rev>/)."""
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(timm.create_model(arch, num_classes=num_classes).state_dict(), str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_timm_pretrained_weights_come_from_the_local_cache(tmp_path, monkeypatch, folder_data):
    from edgecompress.core.errors import WeightsError
    from edgecompress.models import parse_model_spec

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="not in the Hugging Face cache and nothing is downloaded"):
        parse_model_spec("timm:lcnet_050")
    file = _hf_cache(tmp_path / "hub", "lcnet_050")
    entry = parse_model_spec("timm:lcnet_050")
    assert entry.weights == file and entry.source == "user"
    assert tr.checkpoint_classes(entry) == 1000  # an ImageNet head: build transfers it
    assert tr.load_backbone(entry, folder_data.num_classes)(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_a_backbone_that_cannot_take_the_image_size_is_skipped(tmp_path):
    """DLA's trees join branches of different sizes at 48x48 (2x2 against 1x1): that backbone is left out with a
    line, the others are probed, and none left is a one-line error (a build on such a folder crashed)."""
    import io

    from rich.console import Console

    from edgecompress.core.errors import DataError

    data = load_dataset(write_digit_folder(tmp_path / "d", per_class=12), 48, mean=NAMED_MEAN, std=NAMED_STD)
    pool = {**tr.backbones(), **tr.backbones(["digits"])}
    out = io.StringIO()
    probes, graphs = tr.probe_all({n: pool[n] for n in ("dla46_c@fashion-mnist", "lcnet_050@digits")}, data,
                                  Console(file=out, width=200))
    assert set(probes) == set(graphs) == {"lcnet_050@digits"}
    assert "skipped dla46_c@fashion-mnist: it does not run on 48x48 images" in out.getvalue()
    with pytest.raises(DataError, match="no zoo backbone runs on 48x48"):
        tr.probe_all({"dla46_c@fashion-mnist": pool["dla46_c@fashion-mnist"]}, data)


def test_a_transfer_is_reproducible(folder_data, tmp_path):
    """The new head's initial weights come from the recipe's seed, not from whatever drew random numbers before."""
    recipe = tr.recipe_for(folder_data, max_steps=3)
    first = tr.transfer(get_model("lcnet_050"), folder_data, recipe, tmp_path / "a")
    torch.rand(1000)  # the process's random state moves on
    second = tr.transfer(get_model("lcnet_050"), folder_data, recipe, tmp_path / "b")
    a, b = torch.load(first.weights), torch.load(second.weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
